"""model/phi.py against the real transformers PhiForCausalLM: parity, export, expansion, loss, bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from model.expand import expand_state_dict
from model.phi import CE_CHUNK, ModelLoadError, Phi, PhiConfig, chunked_cross_entropy, load_hf_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# heads not a power of two, rotary fractions 0.4 / 0.5, qk_layernorm on and off, GQA, linear rope scaling
HF_CONFIGS = [
    dict(hidden_size=48, num_attention_heads=3, partial_rotary_factor=0.4, qk_layernorm=False),
    dict(hidden_size=48, num_attention_heads=6, partial_rotary_factor=0.5, qk_layernorm=True),
    dict(hidden_size=80, num_attention_heads=5, partial_rotary_factor=0.4, qk_layernorm=True, num_key_value_heads=5,
         rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 4.0}),
    dict(hidden_size=48, num_attention_heads=6, partial_rotary_factor=0.5, num_key_value_heads=2),
]


def randomize(model, seed=0):
    # default inits give near-zero logits; O(1) logits make the 1e-5 comparisons meaningful
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.3 if p.dim() > 1 else noise * 0.1 + name.endswith("layernorm.weight"))
    return model


def hf_model(tmp_path, name, **kw):
    cfg = transformers.PhiConfig(vocab_size=97, intermediate_size=64, num_hidden_layers=2,
                                 max_position_embeddings=64, **kw)
    model = randomize(transformers.PhiForCausalLM(cfg).eval())
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def shifted(idx):
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)


@pytest.mark.parametrize("kw", HF_CONFIGS)
def test_parity_with_transformers(tmp_path, kw):
    hf, path = hf_model(tmp_path, "hf", **kw)
    ours = Phi.from_pretrained(path).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx, labels=idx)
        logits = ours(idx)
        _, loss = ours(idx, shifted(idx))  # HF shifts labels itself; ours takes next-token targets
    assert ref.logits.abs().max() > 1.0
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-5


def test_export_sharded_loads_in_transformers(tmp_path):
    cfg = PhiConfig(vocab_size=97, hidden_size=80, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5,
                    partial_rotary_factor=0.4, qk_layernorm=True, rope_theta=2000.0, max_position_embeddings=64,
                    rope_scaling={"type": "linear", "factor": 2.0})
    torch.manual_seed(0)
    ours = randomize(Phi(cfg)).eval()
    ours.save_pretrained(tmp_path / "out", max_shard_size="60KB")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and set(index["weight_map"]) == set(ours.state_dict())
    for s in shards:
        with safe_open(str(tmp_path / "out" / s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
    conf = json.loads((tmp_path / "out/config.json").read_text())
    assert conf["model_type"] == "phi" and conf["rope_theta"] == 2000.0 and conf["partial_rotary_factor"] == 0.4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    again = Phi.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        want = ours(idx)
        assert (hf(idx).logits - want).abs().max().item() <= 1e-5
        assert torch.equal(again(idx), want)
    assert again.cfg == cfg


def test_from_pretrained_casts_dtype_keeps_fp32_rope(tmp_path):
    _, path = hf_model(tmp_path, "hf", hidden_size=48, num_attention_heads=3)
    m = Phi.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.rope_cos.device.type == "cpu" and m.rope_cos.dtype == torch.float32
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_config_roundtrip_and_presets():
    cfg = PhiConfig.preset("tiny")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 4, 4, 512)
    assert PhiConfig.from_dict(cfg.to_hf_dict()) == cfg
    scaled = PhiConfig(rope_scaling={"type": "linear", "factor": 2.0})
    hf = transformers.PhiConfig(**scaled.to_hf_dict())  # transformers 5 reads the flat 4.x-style keys
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 2.0
    assert PhiConfig.from_dict(hf.to_dict()) == scaled
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        PhiConfig.preset("nope")


def test_expansion_keeps_function_and_counts():
    torch.manual_seed(0)
    cfg = PhiConfig.preset("test")
    model = randomize(Phi(cfg)).eval()
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    cfg2, sd2, new = expand_state_dict(cfg, model.state_dict(), 2)
    grown = Phi(cfg2).eval()
    grown.load_state_dict(sd2)  # strict: every key of the grown model, nothing else
    idx = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(idx), grown(idx))
    assert new == [1, 3] and cfg2.num_hidden_layers == 4
    assert sum(p.numel() for p in grown.parameters()) == sum(p.numel() for p in model.parameters()) + 2 * per_layer
    assert torch.equal(sd2["model.layers.1.mlp.fc1.weight"], sd2["model.layers.0.mlp.fc1.weight"])
    assert not sd2["model.layers.1.mlp.fc2.weight"].any() and sd2["model.layers.2.mlp.fc2.weight"].any()
    assert expand_state_dict(cfg, {}, 2) == (cfg2, {}, new)  # ranks that get weights by broadcast pass {}
    with pytest.raises(ValueError, match=r"n_new must be in 1..2, got 3"):
        expand_state_dict(cfg, {}, 3)


def test_phi2_parameter_counts_on_meta():
    cfg = PhiConfig.preset("phi-2")
    cfg2, _, new = expand_state_dict(cfg, {}, 5)
    with torch.device("meta"):
        model, grown = Phi(cfg), Phi(cfg2)
    assert sum(p.numel() for p in model.parameters()) == 2_779_683_840
    assert cfg2.num_hidden_layers == 37 and len(new) == 5 and new[-1] == 36
    assert sum(p.numel() for p in grown.parameters()) == 3_173_040_640


def test_init_weights_after_to_empty_matches_and_is_seeded():
    cfg = PhiConfig.preset("test")
    a = Phi(cfg)
    with torch.device("meta"):
        b = Phi(cfg)
    b.to_empty(device="cpu")
    torch.manual_seed(3)
    a.init_weights()
    torch.manual_seed(3)
    b.init_weights()
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert torch.equal(a.rope_cos, b.rope_cos) and torch.equal(a.rope_sin, b.rope_sin)
    assert a.rope_cos.shape == (cfg.max_position_embeddings, 8)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_full_cross_entropy(reduction, monkeypatch):
    monkeypatch.setattr("model.phi.CE_CHUNK", 7)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, 2:9] = -100
    loss = chunked_cross_entropy(h, w, b, t, reduction)
    grads = torch.autograd.grad(loss, (h, w, b))
    ref = F.cross_entropy(F.linear(h, w, b).view(-1, 50), t.view(-1), reduction=reduction, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref, (h, w, b))
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for x, y in zip(grads, ref_grads):
        assert x.shape == y.shape and (x - y).abs().max().item() <= 1e-5


PEAK_SCRIPT = r"""
import re, sys, torch
from model.phi import chunked_cross_entropy
def kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
T, V, C = 8192, 51200, 32
h = torch.randn(1, T, C, requires_grad=True)
w = (torch.randn(V, C) * 0.02).requires_grad_()
b = torch.zeros(V, requires_grad=True)
t = torch.randint(0, V, (1, T))
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
base = kib("VmRSS")
chunked_cross_entropy(h, w, b, t).backward()
print(kib("VmHWM") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_chunked_loss_peak_memory():
    # a fresh process, so the RSS high-water mark of forward+backward is this loss's alone
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    full_logits = 8192 * 51200 * 4  # any full-logits version holds at least this fp32 tensor (measured: ~3x more)
    assert CE_CHUNK * 51200 * 4 <= peak < full_logits / 3, f"peak {peak / 1e6:.0f} MB"


def write_hf(tmp_path, mutate_config=None, mutate_sd=None):
    path = tmp_path / "m"
    torch.manual_seed(0)
    Phi(PhiConfig.preset("test")).save_pretrained(path)
    if mutate_config:
        conf = json.loads((path / "config.json").read_text())
        mutate_config(conf)
        (path / "config.json").write_text(json.dumps(conf))
    if mutate_sd:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        mutate_sd(sd)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_bad_input_messages(tmp_path):
    def err(path):
        with pytest.raises(ModelLoadError) as e:
            Phi.from_pretrained(path)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert re.fullmatch(r".*/nope: no such model directory", err(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "empty/config.json: missing" in err(tmp_path / "empty")
    p = write_hf(tmp_path, mutate_config=lambda c: c.update(model_type="llama"))
    assert err(p) == f"{p}/config.json: model_type is 'llama', expected 'phi'"
    (p / "config.json").write_text("{not json")
    assert err(p).startswith(f"{p}/config.json: ")
    p = write_hf(tmp_path, mutate_sd=lambda sd: sd.update({"model.layers.1.mlp.fc1.weight": torch.zeros(96, 40)}))
    assert err(p) == (f"{p}/model.safetensors: tensor 'model.layers.1.mlp.fc1.weight' has shape [96, 40], "
                      "config.json implies [96, 48]")
    p = write_hf(tmp_path, mutate_sd=lambda sd: sd.pop("lm_head.bias"))
    assert err(p) == f"{p}: missing tensor 'lm_head.bias'"
    p = write_hf(tmp_path, mutate_sd=lambda sd: sd.update(extra=torch.zeros(1)))
    assert err(p) == f"{p}/model.safetensors: unexpected tensor 'extra' for the Phi model in config.json"
    os.remove(p / "model.safetensors")
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = err(p)
    assert msg.startswith(f"{p}/pytorch_model.bin: pickle checkpoint refused, safetensors only")
    os.remove(p / "pytorch_model.bin")
    assert err(p) == f"{p}: no model.safetensors or model.safetensors.index.json"
    (p / "model.safetensors").write_bytes(b"garbage")
    assert err(p).startswith(f"{p}/model.safetensors: unreadable safetensors file")


def test_load_hf_state_dict_returns_config_and_tensors(tmp_path):
    p = write_hf(tmp_path)
    cfg, sd = load_hf_state_dict(p)
    assert cfg == PhiConfig.preset("test")
    assert sd["lm_head.bias"].shape == (cfg.vocab_size,) and len(sd) == len(Phi(cfg).state_dict())
