"""An HF Phi dir -> one GGUF file that llama.cpp (and ollama, LM Studio) runs: the `phi2` architecture, written with
the `gguf` package that llama.cpp maintains.

    path = write_gguf("hf/tiny", "hf/tiny.f16.gguf", "f16")   # or "q8_0"; python -m model.export ... --gguf

Our parameter names are HF's, and gguf's own name map for PHI2 turns them into llama.cpp's. The tokenizer goes in
as llama.cpp's "gpt2" BPE (tokens, types, merges, special ids): byte-level BPE with GPT-2's pre-tokenizer, as
phi-2's and data/prepare.py's are. The prompt format is plain text with no BOS and no chat template, and the FIM
sentinels' ids are in `tokenizer.ggml.fim_{pre,suf,mid}_token_id`, where llama.cpp's /infill and editors' FIM
templates look for them.
"""
import json
import os

import gguf
import torch
from tokenizers import Tokenizer

from data.fim import FIM_TOKENS
from model.phi import load_hf_state_dict

# what this file writes: 2-D weights in that type (q8_0 falls back to f16 where a row is not a whole number of
# 32-value blocks, as llama.cpp's convert_hf_to_gguf.py does), norms and biases in f32
GGUF_TYPES = ("f16", "q8_0")


class GGUFError(ValueError):
    """Bad input for a GGUF export; the message is one line with the fix."""


def gguf_path(hf_dir, gguf_type):
    """Where model.export writes the GGUF file of HF dir `hf_dir`: beside it, hf/tiny -> hf/tiny.f16.gguf."""
    return f"{os.path.normpath(hf_dir)}.{gguf_type}.gguf"


def check_type(gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"unknown --gguf_type {gguf_type!r}: the GGUF types written here are {', '.join(GGUF_TYPES)}")


def gguf_vocab(hf_dir):
    """(tokens, token types, the tokenizers.Tokenizer) of hf_dir's tokenizer.json, checked to be byte-level BPE."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise GGUFError(f"{hf_dir} has no tokenizer.json, and a GGUF file must carry its tokenizer: export a "
                        f"checkpoint whose config.data_dir/meta.json names its tokenizer, or copy tokenizer.json there")
    with open(path) as f:
        spec = json.load(f)
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") \
            or not pre.get("use_regex", True):
        raise GGUFError(f"{path}: only byte-level BPE with GPT-2's pre-tokenizer (phi-2's, data/prepare.py's) maps to "
                        f"llama.cpp's gpt2 tokenizer; this one is {model.get('type')} with a {pre.get('type')} "
                        f"pre-tokenizer")
    tok = Tokenizer.from_file(path)
    added = tok.get_added_tokens_decoder()  # id -> AddedToken: stored as raw text, their type from `special`
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    return tokens, types, tok


def _tensor(t, gguf_type):
    """(numpy data, gguf raw dtype or None) of one tensor in the file's type."""
    if t.ndim == 1:
        return t.float().numpy(), None
    if gguf_type == "q8_0":
        try:
            q8 = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(t.float().numpy(), q8), q8
        except gguf.QuantError:  # a row that is not a whole number of blocks (a width not divisible by 32)
            pass
    return t.to(torch.float16).numpy(), None


def write_gguf(hf_dir, path, gguf_type="f16"):
    """Write the Phi model of HF dir `hf_dir` (config.json, safetensors, tokenizer.json) to GGUF file `path`
    (written under a temporary name, then renamed); returns path."""
    check_type(gguf_type)
    tokens, types, tok = gguf_vocab(hf_dir)
    cfg, sd = load_hf_state_dict(hf_dir)
    if cfg.qk_layernorm:
        raise GGUFError(f"{hf_dir}: llama.cpp's phi2 has no q/k LayerNorm (qk_layernorm=True cannot be exported)")
    if len(tokens) > cfg.vocab_size:
        raise GGUFError(f"{hf_dir}: the tokenizer has {len(tokens)} tokens but the model {cfg.vocab_size} rows")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]  # llama.cpp wants a token per row
    types += [gguf.TokenType.UNUSED] * (cfg.vocab_size - len(types))
    vocab = tok.get_vocab(with_added_tokens=True)
    fim = {k: vocab.get(t) for k, t in FIM_TOKENS.items()}
    fim = fim if None not in fim.values() else None

    tmp = f"{path}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI2])
    w.add_name(os.path.basename(os.path.normpath(hf_dir)))
    w.add_description("Plain-text completion: no BOS, no chat template."
                      + (f" Infill: {FIM_TOKENS['prefix']}{{prefix}}{FIM_TOKENS['suffix']}{{suffix}}"
                         f"{FIM_TOKENS['middle']}, the model writes the middle and then EOS." if fim else ""))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_rope_dimension_count(int(cfg.hidden_size // cfg.num_attention_heads * cfg.partial_rotary_factor))
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's pre-tokenizer regex (phi-2's too)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))  # merges, bos/eos/unk ids
    special.add_special_token.update(bos=False, eos=False)  # prompts are raw text, as in training
    special.add_to_gguf(w, quiet=True)
    if fim:
        w.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, fim["prefix"])
        w.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, fim["suffix"])
        w.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, fim["middle"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, cfg.num_hidden_layers)
    for k in list(sd):
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFError(f"{hf_dir}: tensor {k!r} has no llama.cpp phi2 name")
        data, raw_dtype = _tensor(sd.pop(k), gguf_type)  # pop: each f32 tensor is freed once converted
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
