"""model/generate.py: greedy equals transformers' generate(), the KV cache changes nothing, seeds repeat."""
import os
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models

from model.generate import generate, generate_text, main, sample
from model.phi import Phi

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789(){};=+-*/ \n"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 9, 9, 1, 2], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def models_pair(tmp_path_factory):
    """The same random weights as a transformers PhiForCausalLM and as our Phi."""
    cfg = transformers.PhiConfig(vocab_size=len(CHARS), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=3, partial_rotary_factor=0.5, qk_layernorm=True,
                                 max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    hf = transformers.PhiForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) logits, so greedy choices are not near-ties
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.3 if p.dim() > 1 else noise * 0.1 + name.endswith("layernorm.weight"))
    path = tmp_path_factory.mktemp("gen") / "hf"
    hf.save_pretrained(path)
    return hf, Phi.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(CHARS)}, [], unk_token=None))  # one token per char
    tok.decoder = decoders.Fuse()
    return tok


def test_greedy_matches_transformers_generate(models_pair):
    hf, ours = models_pair
    got = generate(ours, PROMPTS, max_new_tokens=20)  # one left-padded batch
    assert [len(o) for o in got] == [20] * len(PROMPTS)
    assert len({t for o in got for t in o}) > 10  # the check below would be weak on a constant output
    for p, o in zip(PROMPTS, got):
        want = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert o == want[0, len(p):].tolist()


def no_cache_decode(model, prompt, n, **kw):
    # the obvious reference: rerun the whole sequence for every token
    gen = torch.Generator().manual_seed(kw.pop("seed")) if "seed" in kw else None
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, sample(model(x)[:, -1].float(), generator=gen, **kw)[:, None]], dim=1)
    return x[0, len(prompt):].tolist()


def test_kv_cache_equals_no_cache(models_pair):
    _, ours = models_pair
    got = generate(ours, PROMPTS, max_new_tokens=12)
    assert got == [no_cache_decode(ours, p, 12) for p in PROMPTS]
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    assert generate(ours, [PROMPTS[0]], 12, seed=5, **kw) == [no_cache_decode(ours, PROMPTS[0], 12, seed=5, **kw)]


def test_sampling_repeats_with_seed(models_pair):
    _, ours = models_pair
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=30, top_p=0.95)
    a = generate(ours, PROMPTS, seed=1, **kw)
    assert a == generate(ours, PROMPTS, seed=1, **kw)
    assert a != generate(ours, PROMPTS, seed=2, **kw)
    greedy = generate(ours, PROMPTS, max_new_tokens=16)
    assert generate(ours, PROMPTS, 16, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(ours, PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=3) == greedy
    assert not ours.training


def test_eos_and_stop_strings_cut_rows(models_pair, tokenizer):
    _, ours = models_pair
    full = generate(ours, PROMPTS, max_new_tokens=20)
    eos = full[0][5]
    cut = generate(ours, PROMPTS, max_new_tokens=20, eos_id=eos)
    assert cut == [o[:o.index(eos)] if eos in o else o for o in full]

    prompts = ["ab(c", "x = 1"]
    texts = generate_text(ours, tokenizer, prompts, max_new_tokens=20)
    stop = texts[0][6:8]  # a string the first row produces mid-way
    got = generate_text(ours, tokenizer, prompts, max_new_tokens=20, stop=[stop])
    assert got[0] == texts[0][:texts[0].index(stop)]
    assert got[1] == (texts[1][:texts[1].index(stop)] if stop in texts[1] else texts[1])
    ids = generate(ours, [tokenizer.encode(p).ids for p in prompts], 20, stop=[stop], tokenizer=tokenizer)
    assert stop in tokenizer.decode(ids[0]) and stop not in tokenizer.decode(ids[0][:-1])


def test_generate_rejects_bad_requests(models_pair):
    _, ours = models_pair
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(ours, PROMPTS, 5, stop=["x"])
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        generate(ours, PROMPTS, 60)
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[1], []], 5)


def test_command_line_completes_and_fails_in_one_line(models_pair, tokenizer, tmp_path, monkeypatch, capsys):
    _, ours = models_pair
    ours.save_pretrained(tmp_path / "m")
    tokenizer.save(str(tmp_path / "m/tokenizer.json"))
    monkeypatch.setattr(sys, "argv", ["generate.py", str(tmp_path / "m"), "ab(c", "--max-new-tokens", "12"])
    main()
    assert capsys.readouterr().out == "ab(c" + generate_text(ours, tokenizer, ["ab(c"], max_new_tokens=12)[0] + "\n"
    os.remove(tmp_path / "m/model.safetensors")
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'm'}: no model.safetensors or model.safetensors.index.json\n"
