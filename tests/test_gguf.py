"""GGUF export (python -m model.export CKPT OUT --gguf): the file read back with gguf's own reader, and run by
llama.cpp itself through llama-cpp-python (marked `llamacpp`: pip builds llama.cpp from source first)."""
import dataclasses
import json
import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import ckpt
from data.fim import FIM_TOKENS
from data.loader import read_meta
from evals.domain import PROMPTS, heldout_docs
from helpers import run_train
from model import export, gguf as our_gguf, phi
from model.generate import generate

LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF"'
                     ' pip install llama-cpp-python==0.3.36')


def random_ckpt(root, data_dir):
    """A train.py-style checkpoint of a small random Phi (rows of 64: q8_0's 32-value blocks fit) whose config names
    data_dir, as export finds the tokenizer."""
    meta = os.path.join(data_dir, "meta.json")
    vocab = json.load(open(meta))["vocab_size"] if os.path.isfile(meta) else 128
    cfg = phi.PhiConfig(**{**phi.PRESETS["test"], "hidden_size": 64, "num_attention_heads": 2,
                           "intermediate_size": 128, "vocab_size": vocab + 5,  # free rows, as phi-2 has
                           "rope_scaling": {"type": "linear", "factor": 2.0}})
    torch.manual_seed(0)
    model = phi.Phi(cfg)
    with torch.no_grad():  # sharp attention, so that positions (RoPE) show in the logits
        for block in model.model.layers:
            block.self_attn.q_proj.weight *= 10
            block.self_attn.k_proj.weight *= 10
    opt = torch.optim.AdamW(model.parameters())
    return ckpt.save(root, 1, model, opt, {"step": 1, "config": {"data_dir": str(data_dir)},
                                           "model_config": cfg.to_hf_dict()}), model


def fields(reader):
    """{key: value} of a GGUF file's metadata, strings decoded."""
    return {k: f.contents() for k, f in reader.fields.items()}


def test_gguf_holds_the_weights_tokenizer_and_fim_ids(tiny_data, tmp_path):
    path, model = random_ckpt(tmp_path / "run", tiny_data)
    out = tmp_path / "hf"
    assert export.main([path, str(out), "--gguf"]) == 0
    assert export.main([path, str(out), "--gguf", "--gguf_type", "q8_0"]) == 0
    f16, q8 = gguf.GGUFReader(f"{out}.f16.gguf"), gguf.GGUFReader(f"{out}.q8_0.gguf")
    meta = fields(f16)
    cfg = model.cfg
    assert meta["general.architecture"] == "phi2"
    assert (meta["phi2.block_count"], meta["phi2.embedding_length"], meta["phi2.feed_forward_length"],
            meta["phi2.attention.head_count"], meta["phi2.rope.dimension_count"], meta["phi2.context_length"]) == \
        (2, 64, 128, 2, 16, cfg.max_position_embeddings)
    assert meta["phi2.rope.scaling.type"] == "linear" and meta["phi2.rope.scaling.factor"] == 2.0

    # the tokenizer: every id's text and kind, GPT-2's pre-tokenizer, merges, the ids llama.cpp and editors read
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size == len(vocab) + 5
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(len(vocab), cfg.vocab_size)]
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == {vocab[t] for t in ["<|endoftext|>", *FIM_TOKENS.values()]}
    assert set(types[-5:]) == {gguf.TokenType.UNUSED}
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    spec = json.loads((out / "tokenizer.json").read_text())
    assert len(meta["tokenizer.ggml.merges"]) == len(spec["model"]["merges"]) > 100
    data_meta = read_meta(tiny_data)
    assert meta["tokenizer.ggml.eos_token_id"] == data_meta["eos_id"]
    assert meta["tokenizer.ggml.add_bos_token"] is False and "tokenizer.chat_template" not in meta
    assert [meta[f"tokenizer.ggml.fim_{k}_token_id"] for k in ("pre", "suf", "mid")] == \
        [data_meta["fim"][k] for k in ("prefix", "suffix", "middle")]
    assert "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>" in meta["general.description"]

    # the weights under llama.cpp's names: f16 is the fp16 rounding of ours, q8_0 within its 8-bit step
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, cfg.num_hidden_layers)
    sd = model.state_dict()
    for reader, kind in ((f16, "f16"), (q8, "q8_0")):
        got = {t.name: t for t in reader.tensors}
        assert set(got) == {names.get_name(k, try_suffixes=(".weight", ".bias")) for k in sd}
        for k, v in sd.items():
            t = got[names.get_name(k, try_suffixes=(".weight", ".bias"))]
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(v.shape)
            if v.ndim == 1:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(arr, v.numpy()), k
            elif kind == "f16":
                assert t.tensor_type == gguf.GGMLQuantizationType.F16, k
                assert np.array_equal(arr, v.half().numpy()), k
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, k
                # half a step of each 32-value block's scale (max/127), + that scale's own fp16 rounding
                step = np.abs(v.numpy()).reshape(-1, 32).max(1, keepdims=True) / 127
                assert (np.abs(arr.reshape(-1, 32) - v.numpy().reshape(-1, 32)) <= 0.57 * step).all(), k
    assert fields(q8)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert os.path.getsize(f"{out}.q8_0.gguf") < 0.7 * os.path.getsize(f"{out}.f16.gguf")


def test_gguf_bad_input_is_one_line_and_writes_nothing(tiny_data, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    path, _ = random_ckpt(tmp_path / "run", tiny_data)
    no_tok, _ = random_ckpt(tmp_path / "notok", tmp_path / "gone")  # its data dir (and tokenizer) is not there
    (tmp_path / "words" / "tok").mkdir(parents=True)  # a tokenizer llama.cpp's gpt2 BPE cannot stand for
    word = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "words" / "tok" / "tokenizer.json"))
    (tmp_path / "words" / "meta.json").write_text(json.dumps({"tokenizer": str(tmp_path / "words" / "tok"), "vocab_size": 2}))
    words, _ = random_ckpt(tmp_path / "wordrun", tmp_path / "words")
    for args, msg in [([no_tok, "--gguf"], "no tokenizer for the GGUF file"),
                      ([words, "--gguf"], "only byte-level BPE with GPT-2's pre-tokenizer (phi-2's, data/prepare.py's) "
                                          "maps to llama.cpp's gpt2 tokenizer; this one is WordLevel with a Whitespace"),
                      ([path, "--gguf", "--gguf_type", "q4"], "the GGUF types written here are f16, q8_0"),
                      ([path, "--gguf_type", "q8_0"], "--gguf_type needs --gguf")]:
        out = tmp_path / "out"
        assert export.main([args[0], str(out), *args[1:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)
        assert not out.exists() and not list(tmp_path.glob("out.*")), args


# -----------------------------------------------------------------------------
# llama.cpp itself


def llama(path):
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.fail(f"llama-cpp-python is not installed: {LLAMA_CPP_INSTALL}")
    return Llama(str(path), n_ctx=0, n_batch=512, n_threads=1, logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def trained_gguf(tiny_data, tmp_path_factory):
    """config/tiny.py trained briefly with FIM on the shared corpus, exported as HF dir + f16 and q8_0 GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    run_train(["config/tiny.py", f"--out_dir={root / 'run'}", f"--data_dir={tiny_data}", "--max_iters=300",
               "--fim_rate=0.5", "--eval_interval=100", "--ckpt_interval=300", "--log_interval=100",
               "--tensorboard=False"], timeout=900)
    hf = root / "hf"
    for kind in our_gguf.GGUF_TYPES:
        assert export.main([str(root / "run"), str(hf), "--gguf", "--gguf_type", kind]) == 0
    return hf


def greedy_llama(llm, ids, n, eos):
    """llama.cpp's own greedy sampler (temperature 0), up to n tokens before EOS."""
    out = []
    for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == eos or len(out) == n:
            break
        out.append(t)
    return out


def prompts(tiny_data, tok):
    """Two of our prompts per language, and an XML val document's middle asked for in PSM and in SPM."""
    texts = [p for lang in ("xml", "mdx", "js") for p in PROMPTS[lang][:2]]
    doc = heldout_docs(tiny_data, "xml", 1, max_tokens=200)[0]
    lines = doc.splitlines(keepends=True)
    prefix, suffix = "".join(lines[:2]), "".join(lines[3:])
    pre, suf, mid = (FIM_TOKENS[k] for k in ("prefix", "suffix", "middle"))
    texts += [f"{pre}{prefix}{suf}{suffix}{mid}", f"{pre}{suf}{suffix}{mid}{prefix}"]
    return [tok.encode(t, add_special_tokens=False) for t in texts], texts


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_runs_the_export_as_we_do(trained_gguf, tiny_data):
    model, _ = export.load_for_inference(str(trained_gguf))
    tok = AutoTokenizer.from_pretrained(trained_gguf, local_files_only=True)
    ids, texts = prompts(tiny_data, tok)
    eos, n = tok.eos_token_id, 32

    f16 = llama(f"{trained_gguf}.f16.gguf")
    # llama.cpp's tokenizer (from the GGUF) cuts our prompts, FIM sentinels included, as the HF tokenizer does
    assert [f16.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == ids
    assert [f16.detokenize(i, special=True).decode() for i in ids] == texts
    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(f16.model)
    fim = tok.convert_tokens_to_ids([FIM_TOKENS[k] for k in ("prefix", "suffix", "middle")])
    assert [llama_cpp.llama_vocab_fim_pre(vocab), llama_cpp.llama_vocab_fim_suf(vocab),
            llama_cpp.llama_vocab_fim_mid(vocab)] == fim  # what llama.cpp's /infill uses

    ours = [generate(model, [p], max_new_tokens=n, eos_id=eos)[0] for p in ids]
    assert sum(map(len, ours)) > 5 * len(ids)  # the prompts are continued, not ended at once
    # f16: the same greedy tokens; the logits along ours within 0.02 (weights rounded to fp16, llama.cpp's
    # fp16 GELU table and its own matmul order; measured 0.006 where the logits span about 24)
    worst = span = 0.0
    for p, o in zip(ids, ours):
        assert greedy_llama(f16, p, n, eos) == o, tok.decode(p)
        f16.reset()
        f16.eval(p + o)
        with torch.no_grad():
            want = model(torch.tensor([p + o]))[0].numpy()
        worst = max(worst, float(np.abs(f16.scores[:len(p + o)] - want).max()))
        span = max(span, float(want.max() - want.min()))
    print(f"f16: greedy tokens equal on {len(ids)} prompts, logits max |diff| {worst:.4f} (logits span {span:.1f})")
    assert worst < 0.02

    # q8_0: greedy tokens mostly agree; counted as the share of each continuation before the first difference
    q8 = llama(f"{trained_gguf}.q8_0.gguf")
    same = total = 0
    for p, o in zip(ids, ours):
        got = greedy_llama(q8, p, n, eos)
        k = next((i for i, (a, b) in enumerate(zip(got, o)) if a != b), min(len(got), len(o)))
        same, total = same + k, total + max(len(o), 1)
    print(f"q8_0: {same}/{total} greedy tokens agree before the first difference ({same / total:.3f})")
    assert same / total >= 0.8


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_applies_our_linear_rope_scaling(tiny_data, tmp_path):
    path, model = random_ckpt(tmp_path / "run", tiny_data)  # RoPE x2 (linear), as config/phi2_xml.py trains
    assert export.main([path, str(tmp_path / "hf"), "--gguf"]) == 0
    llm = llama(tmp_path / "hf.f16.gguf")
    ids = torch.randint(0, 512, (model.cfg.max_position_embeddings,), generator=torch.Generator().manual_seed(0))
    llm.eval(ids.tolist())
    got = llm.scores[:len(ids)]
    unscaled = phi.Phi(dataclasses.replace(model.cfg, rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        want, other = (m.eval()(ids[None])[0].numpy() for m in (model, unscaled))
    diff, wrong = float(np.abs(got - want).max()), float(np.abs(got - other).max())
    print(f"RoPE x2: logits max |diff| {diff:.5f}; against the same weights without the scaling {wrong:.5f}")
    assert diff < 0.01 and wrong > 10 * diff
