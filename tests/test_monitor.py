"""monitor.py: FLOPs/MFU arithmetic, every sink read back (metrics.jsonl, TensorBoard, W&B offline), summary."""
import dataclasses
import glob
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import monitor
from monitor import Monitor, MonitorError, flops_per_token, non_embedding_params, peak_flops, read_metrics

# phi-2's config.json
PHI2 = SimpleNamespace(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                       num_attention_heads=32, qk_layernorm=False)


def test_flops_per_token_phi2_by_hand():
    # per layer: q,k,v,dense 4*(2560*2560+2560) + fc1 (2560*10240+10240) + fc2 (10240*2560+2560) + ln 2*2560
    per_layer = 4 * (2560 * 2560 + 2560) + (2560 * 10240 + 10240) + (10240 * 2560 + 2560) + 2 * 2560
    assert per_layer == 78_671_360
    n = 32 * per_layer + 2 * 2560 + (2560 * 51200 + 51200)  # + final_layernorm + lm_head
    assert non_embedding_params(PHI2) == n == 2_648_611_840
    attn = 12 * 32 * 32 * 80 * 2048  # 12*L*H*Q*T
    assert flops_per_token(PHI2, 2048) == 6 * n + attn == 17_904_936_960
    assert flops_per_token(PHI2, 2048) == pytest.approx(1.79e10, rel=1e-3)
    # only the attention term depends on T
    assert flops_per_token(PHI2, 4096) - flops_per_token(PHI2, 2048) == attn


def test_non_embedding_params_equals_real_phi():
    phi = pytest.importorskip("model.phi")
    test = phi.PhiConfig.preset("test")
    # phi-2 is checked by hand above; building it, even on meta, is slow
    for cfg in (phi.PhiConfig.preset("tiny"), test, dataclasses.replace(test, qk_layernorm=True),
                dataclasses.replace(test, num_key_value_heads=1)):
        with torch.device("meta"):
            model = phi.Phi(cfg)
        n = sum(p.numel() for k, p in model.named_parameters() if "embed_tokens" not in k)
        assert non_embedding_params(cfg) == n, cfg
    assert flops_per_token(phi.PhiConfig.preset("phi-2"), 2048) == 17_904_936_960


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA A10G") == 125e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert peak_flops("AMD Instinct MI300X") == 1307.4e12
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA GeForce GTX 1080") is None


def fake_step(i):
    return {"loss": 4.0 - 0.3 * i, "lr": 3e-4 * min(1, i / 3), "grad_norm": 1.5 / i, "tokens": 8192,
            "dt": 0.25 + 0.01 * i, "data_wait": 0.001 * i}


CALLBACK = """
def extra(step, metrics, model):
    return {"cb/loss_x2": 2 * metrics["loss"], "cb/has_model": float(model is not None)}

def broken(step, metrics, model):
    raise KeyError("nope")
"""


@pytest.fixture
def callback_module(tmp_path, monkeypatch):
    (tmp_path / "my_cbs.py").write_text(CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_cbs"
    sys.modules.pop("my_cbs", None)


def run_fake(out, callbacks=()):
    mon = Monitor(out, {"lr": 3e-4, "block_size": 256, "preset": "tiny", "mixture": {"xml": 1.0}},
                  callbacks=callbacks, system_interval=2, flops_per_token=1e9)
    for i in range(1, 6):
        mon.log_step(i, fake_step(i), model=torch.nn.Linear(2, 2))
        if i % 2 == 0:
            mon.log_eval(i, {"val_loss": 3.5 - 0.2 * i + (0.5 if i == 4 else 0.0), "val_loss/xml": 3.0 - 0.1 * i,
                             "val_acc/xml": 0.3 + 0.05 * i, "val_loss/js": 3.6 - 0.1 * i,
                             "val_acc/js": None})  # not computed: null in the jsonl, no TensorBoard point
    mon.event(4, "patience", "val_loss did not improve (1/3)", best=3.1, waited=1)
    s = mon.finish({"stop_reason": "max_steps", "checkpoints": [f"{out}/ckpt/step-000004"],
                    "export_path": f"{out}/hf"})
    return mon, s


def test_sinks_jsonl_and_tensorboard_agree(tmp_path, callback_module, capsys):
    out = str(tmp_path / "run")
    run_fake(out, callbacks=[f"{callback_module}:extra"])
    steps, evals, events = read_metrics(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [2, 4]
    assert {r["kind"] for r in steps} == {"train"} and {r["kind"] for r in evals} == {"eval"}
    assert [(e["event"], e["reason"], e["waited"]) for e in events] == [
        ("patience", "val_loss did not improve (1/3)", 1)]

    r = steps[2]  # step 3, by hand
    assert r["loss"] == pytest.approx(3.1) and r["ppl"] == pytest.approx(math.exp(3.1))
    assert r["tok_per_s"] == pytest.approx(8192 / 0.28) == r["tok_per_s_device"]
    assert r["tflops"] == pytest.approx(1e9 * 8192 / 0.28 / 1e12)
    assert r["mfu"] is None  # CPU: no peak, no guess
    assert r["cb/loss_x2"] == pytest.approx(6.2) and r["cb/has_model"] == 1.0
    # this process's RSS in GiB: a unit slip (bytes, MiB) or another process's figure is off by far more than 2x
    assert r["mem/rss_gib"] == pytest.approx(psutil.Process().memory_info().rss / 2**30, rel=0.5)
    sys_steps = [r["step"] for r in steps if "sys/cpu_pct" in r]
    assert sys_steps == [1, 3, 5]  # every system_interval=2 steps
    s = steps[0]
    assert s["sys/disk_free_gib"] == pytest.approx(psutil.disk_usage(out).free / 2**30, rel=0.05)
    # a percent (not a fraction) of this machine's RAM, and the same snapshot as ram_used_gib
    assert s["sys/ram_pct"] == pytest.approx(100 * s["sys/ram_used_gib"] * 2**30 / psutil.virtual_memory().total,
                                             abs=0.1)
    assert evals[0]["val_ppl/xml"] == pytest.approx(math.exp(2.8)) and evals[0]["val_acc/js"] is None

    ea = EventAccumulator(os.path.join(out, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    want = {"loss", "ppl", "lr", "grad_norm", "tokens", "dt", "data_wait", "tok_per_s", "tok_per_s_device",
            "tflops", "mem/rss_gib", "sys/cpu_pct", "sys/ram_used_gib", "sys/ram_pct", "sys/disk_free_gib",
            "cb/loss_x2", "cb/has_model", "val_loss", "val_loss/xml", "val_loss/js", "val_acc/xml", "val_ppl",
            "val_ppl/xml", "val_ppl/js", "event/patience", "event/patience/best", "event/patience/waited"}
    assert tags == want  # no mfu tag: null is not written as a number
    records = {"train": steps, "eval": evals}
    for tag in want - {"event/patience", "event/patience/best", "event/patience/waited"}:
        src = [r for r in records["eval" if tag.startswith("val_") else "train"] if tag in r]
        got = ea.Scalars(tag)
        assert [e.step for e in got] == [r["step"] for r in src], tag
        assert [e.value for e in got] == pytest.approx([r[tag] for r in src], rel=1e-6), tag
    assert [(e.step, e.value) for e in ea.Scalars("event/patience/best")] == [(4, pytest.approx(3.1))]
    assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")

    console = capsys.readouterr().out.splitlines()
    assert console[0] == ("step 1 | loss 3.7000 | lr 1.00e-04 | norm 1.500 | 260.0ms (data 1.0ms) | 31,508 tok/s"
                          " | 31.5 TFLOP/s")
    assert sum(line.startswith("eval step") for line in console) == 2
    assert "event step 4 | patience: val_loss did not improve (1/3), best=3.1, waited=1" in console


def test_mfu_from_device_peak(tmp_path):
    mon = Monitor(tmp_path, {}, tensorboard=False, flops_per_token=1e9)
    mon.peak_flops = 989e12  # as looked up for an H100 SXM
    mon.log_step(1, {"loss": 2.0, "tokens": 8192, "dt": 0.5})
    mon.finish({})
    (r,), _, _ = read_metrics(tmp_path)
    assert r["tok_per_s"] == 16384.0
    assert r["tflops"] == pytest.approx(16.384)
    assert r["mfu"] == pytest.approx(100 * 16.384e12 / 989e12)


def test_summary_matches_jsonl(tmp_path):
    out = str(tmp_path)
    _, s = run_fake(out)
    steps, evals, _ = read_metrics(out)
    best = min(evals, key=lambda r: r["val_loss"])
    md = open(os.path.join(out, "summary.md")).read()
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(json.dumps(s))
    assert s["best_step"] == best["step"] == 2 and s["best_metric"] == best["val_loss"]
    assert s["median_tok_per_s"] == statistics.median(r["tok_per_s"] for r in steps)
    assert s["tokens"] == 5 * 8192 and s["steps"] == 5 and s["final_loss"] == steps[-1]["loss"]
    cells = [line.strip("|").split("|", 1) for line in md.splitlines() if line.startswith("| ")]
    rows = {k.strip(): v.strip() for k, v in cells}
    assert rows["stop reason"] == "max_steps"
    assert rows["best val_loss"] == f"{best['val_loss']:.6g} at step 2"
    assert rows["median tok/s"] == f"{statistics.median(r['tok_per_s'] for r in steps):.6g}"
    assert rows["median TFLOP/s per device"] == f"{statistics.median(r['tflops'] for r in steps):.6g}"
    assert rows["median MFU (%)"] == "n/a"
    assert rows["tokens"] == "40960" and rows["steps"] == "5"
    assert rows["peak process RSS (GiB)"] == f"{max(r['mem/rss_gib'] for r in steps):.6g}"
    assert rows["final train loss"] == f"{steps[-1]['loss']:.6g}"
    for k in ("val_loss/xml", "val_acc/xml", "val_loss/js"):  # final eval per language = last eval record
        assert rows[k] == f"{evals[-1][k]:.6g}"
    assert f"- {out}/ckpt/step-000004" in md and rows["HF export"] == f"{out}/hf"
    assert "- step 4: patience: val_loss did not improve (1/3)" in md


def test_resume_torn_line_and_later_records_replace_earlier(tmp_path):
    mon = Monitor(tmp_path, {}, tensorboard=False)
    for i in (1, 2, 3):
        mon.log_step(i, {"loss": float(i), "tokens": 10, "dt": 1.0})
    mon.finish({})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tra')  # the process died mid-line
    mon = Monitor(tmp_path, {}, tensorboard=False)  # resumed from step 2
    mon.log_step(3, {"loss": 0.5, "tokens": 10, "dt": 1.0})
    mon.log_step(4, {"loss": float("nan"), "tokens": 10, "dt": 1.0})  # a diverged step is logged, not fatal
    s = mon.finish({"stop_reason": "done", "wall_time_s": 12.5})
    assert s["steps"] == 4 and math.isnan(s["final_loss"]) and s["tokens"] == 40 and s["wall_time_s"] == 12.5
    steps, _, _ = read_metrics(tmp_path)
    assert [r["loss"] for r in steps[:3]] == [1.0, 2.0, 0.5] and math.isnan(steps[3]["ppl"])
    assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 6  # 3 + torn + 2


def test_callback_errors(tmp_path, callback_module, capfd):
    with pytest.raises(MonitorError, match=r"callback 'no_such_mod:fn': cannot import 'no_such_mod'"):
        Monitor(tmp_path, {}, callbacks=["no_such_mod:fn"])
    with pytest.raises(MonitorError, match=r"expected 'package.module:function'"):
        Monitor(tmp_path, {}, callbacks=["my_cbs.extra"])
    with pytest.raises(MonitorError, match=r"has no attribute 'missing'"):
        Monitor(tmp_path, {}, callbacks=["my_cbs:missing"])
    capfd.readouterr()
    mon = Monitor(tmp_path, {}, tensorboard=False, callbacks=["my_cbs:broken", "my_cbs:extra"])
    for i in (1, 2, 3):
        mon.log_step(i, {"loss": 1.0})
    mon.finish({})
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["warning: callback my_cbs:broken off: KeyError: 'nope'"]
    steps, _, _ = read_metrics(tmp_path)
    assert [r["cb/loss_x2"] for r in steps] == [2.0, 2.0, 2.0]


def test_other_ranks_write_nothing(tmp_path):
    mon = Monitor(tmp_path / "r1", {}, rank=1, wandb_mode="offline")
    mon.log_step(1, {"loss": 1.0})
    mon.log_eval(1, {"val_loss": 1.0})
    mon.event(1, "stop", "x")
    mon.finish({})
    assert not (tmp_path / "r1").exists()


def test_wandb_online_without_key_fails_fast_with_one_warning(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    t = time.time()
    mon = Monitor(tmp_path / "run", {"lr": 1e-3}, wandb_mode="online")
    assert time.time() - t < 10
    assert mon.wandb is None
    mon.log_step(1, {"loss": 1.0})
    mon.finish({"stop_reason": "done"})
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: W&B off: ")
    assert read_metrics(tmp_path / "run")[0][0]["loss"] == 1.0


def test_wandb_online_with_key_but_no_network_one_warning(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setattr(monitor, "WANDB_INIT_TIMEOUT", 2)
    t = time.time()
    mon = Monitor(tmp_path / "run", {}, tensorboard=False, wandb_mode="online")
    assert mon.wandb is None and time.time() - t < 20
    mon.log_step(1, {"loss": 1.0})
    mon.finish({})
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: W&B off: "), err
    assert read_metrics(tmp_path / "run")[0][0]["loss"] == 1.0


def test_wandb_missing_package_one_warning(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    mon = Monitor(tmp_path, {}, tensorboard=False, wandb_mode="offline")
    mon.log_step(1, {"loss": 1.0})
    mon.finish({})
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["warning: W&B off: wandb is not installed (pip install wandb, or wandb_mode=disabled)"]


def test_wandb_offline_run_dir_and_resume_keeps_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over wandb_mode="disabled"
    monkeypatch.delenv("WANDB_DIR", raising=False)
    mon = Monitor(tmp_path, {"lr": 1e-3}, tensorboard=False)
    run_id = mon.run_id
    assert mon.wandb is not None and mon.wandb.id == run_id
    mon.log_step(1, {"loss": 2.0, "tokens": 100, "dt": 0.1})
    mon.event(1, "stop", "test")
    mon.finish({"stop_reason": "test"})
    first = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert len(first) == 1 and glob.glob(first[0] + "/*.wandb")

    # wandb names offline run dirs by the second: start the resumed session in a later one
    time.sleep(1 - time.time() % 1)
    mon = Monitor(tmp_path, {"lr": 1e-3}, tensorboard=False, run_id=run_id)  # resume
    assert mon.run_id == run_id and mon.wandb.id == run_id
    mon.log_step(2, {"loss": 1.5, "tokens": 100, "dt": 0.1})
    mon.finish({"stop_reason": "test"})
    # one directory per session, both of the same run: the first kept, the resumed one wrote its own records
    runs = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and first[0] in runs
    (second,) = set(runs) - set(first)
    assert glob.glob(f"{second}/run-{run_id}.wandb")
    assert json.load(open(tmp_path / "summary.json"))["run_id"] == run_id


def test_bad_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(MonitorError, match="wandb_mode 'cloud'"):
        Monitor(tmp_path, {}, wandb_mode="cloud")
