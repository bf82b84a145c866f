"""Export a training checkpoint of a Phi to an HF dir (python -m model.export); transformers loads it offline with
the same logits."""
import json
import os

import pytest
import torch

import ckpt
import transformers
from model import export, phi


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tok.train_from_iterator(["<a x='1'/> const x = 1;", "# title\n<Box />"] * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint as train.py writes it: model_config (HF dict) and config.data_dir -> meta.json -> tokenizer."""
    tmp = tmp_path_factory.mktemp("export")
    make_tokenizer(tmp / "tok")
    (tmp / "data").mkdir()
    json.dump({"tokenizer": str(tmp / "tok"), "eos_id": 0, "vocab_size": 100},
              open(tmp / "data" / "meta.json", "w"))
    cfg = phi.PhiConfig(**{**phi.PRESETS["test"], "rope_scaling": {"type": "linear", "factor": 2.0}})
    torch.manual_seed(0)
    model = phi.Phi(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    path = ckpt.save(tmp / "run", 1, model, opt, {"step": 1, "config": {"data_dir": str(tmp / "data")},
                                                  "model_config": cfg.to_hf_dict()})
    with torch.no_grad():
        logits = model(idx)
    return tmp, path, idx, logits


def test_export_loads_in_transformers_with_same_logits(trained):
    tmp, path, idx, logits = trained
    out = tmp / "hf"
    assert export.main([path, str(out), "--max_shard_size", "30KB"]) == 0
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    # every file as the umask gives config.json: others on a cluster read the weights too (save_pretrained: 0600)
    assert {os.stat(out / f).st_mode & 0o777 for f in files} == {os.stat(out / "config.json").st_mode & 0o777}
    assert json.load(open(out / "generation_config.json"))["eos_token_id"] == 0
    assert json.load(open(out / "config.json"))["eos_token_id"] == 0  # not HF Phi's default of 2

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    rope = hf.config.rope_parameters if hasattr(hf.config, "rope_parameters") else hf.config.rope_scaling
    assert rope["factor"] == 2.0 and rope.get("rope_type", rope.get("type")) == "linear"
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits, atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.decode(tok.encode("<Box />")) == "<Box />"
    assert tok.eos_token == "<|endoftext|>"


def test_load_for_inference_from_ckpt_and_export(trained):
    tmp, path, idx, logits = trained
    model, tok_dir = export.load_for_inference(path)
    assert tok_dir == str(tmp / "tok")
    assert model.cfg.rope_scaling == {"type": "linear", "factor": 2.0}
    with torch.no_grad():
        assert torch.equal(model(idx), logits)
    export.export(path, tmp / "hf2")
    model, tok_dir = export.load_for_inference(str(tmp / "hf2"), dtype=torch.float32)
    assert tok_dir == str(tmp / "hf2")
    with torch.no_grad():
        assert torch.equal(model(idx), logits)
    with pytest.raises(ckpt.CheckpointError, match="neither a training checkpoint"):
        export.load_for_inference(str(tmp / "data"))
