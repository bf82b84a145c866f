"""plan.py: the JSON it promises, physics it must obey, its errors, and its peaks against real CPU training runs."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, free_port

import plan
from model.phi import Phi, PhiConfig
from monitor import flops_per_token

KEYS = {"peak_gib", "breakdown", "gpu_mem_gib", "fits", "max_batch_size", "tokens_per_step", "flops_per_token",
        "est_tokens_per_s"}
CATEGORIES = {"parameters", "gradients", "optimizer_state", "activations", "temporaries", "collective_buffers"}


def model_dir(path, width, layers, vocab, heads, weights=False):
    """A local HF directory of a Phi shape: config.json for plan.py, plus random weights for a real run."""
    cfg = PhiConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=4096)
    if weights:
        torch.manual_seed(0)
        Phi(cfg).save_pretrained(path)
    else:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f)
    return str(path)


def run_plan(args, timeout=300):
    return subprocess.run([sys.executable, "plan.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_json_keys_and_figures(tmp_path):
    out = tmp_path / "p.json"
    r = run_plan(["config/tiny.py", "--world_size=2", "--gpu=h100", "--batch_size=4", "--grad_accum=3",
                  f"--json={out}"])
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())
    assert KEYS <= set(p) and set(p["breakdown"]) == CATEGORIES
    assert abs(sum(p["breakdown"].values()) - p["peak_gib"]) < 1e-9 * p["peak_gib"]  # the categories cover the peak
    assert p["gpu_mem_gib"] == 79.6 and p["fits"] is True and p["max_batch_size"] == 12  # capped at batch x accum
    assert p["tokens_per_step"] == 4 * 256 * 3 * 2
    fpt = flops_per_token(PhiConfig.preset("tiny"), 256)
    assert p["flops_per_token"] == fpt and p["est_tokens_per_s"] == pytest.approx(989e12 * 0.40 / fpt)
    assert f"{p['peak_gib']:.2f} GiB" in r.stdout and "10% kept" in r.stdout


def sim(tmp_path, *flags, world_size=4):
    d = model_dir(tmp_path / "m", width=512, layers=8, vocab=256, heads=8)  # a small vocab: little CE state
    # no prepared data: the README's train command leaves data/tiny (a 2,048-token vocabulary) in the checkout
    return plan.plan(["config/tiny.py", f"--init_from={d}", f"--data_dir={tmp_path / 'no-data'}", "--batch_size=2",
                      "--block_size=1024", "--dtype=bfloat16", *flags], world_size, "h100", None)


@pytest.mark.slow
def test_memory_follows_physics(tmp_path):
    # full AC keeps one block input per block: twice the tokens, twice the activations
    a1 = sim(tmp_path, "--activation_checkpointing=full")
    a2 = sim(tmp_path, "--activation_checkpointing=full", "--block_size=2048")
    assert 1.9 < a2["forward_activations_gib"] / a1["forward_activations_gib"] < 2.1
    # twice the ranks, half the shards: sharded parameters and AdamW state halve exactly, up to FSDP's padding
    r8 = sim(tmp_path, "--activation_checkpointing=full", world_size=8)
    for k in ("Sharded Param", "OptState"):
        assert r8["tracker_gib"][k] / a1["tracker_gib"][k] == pytest.approx(0.5, rel=0.01), k
    # the sharded gradients exist after the step's reduce-scatter: compare the whole steps' state
    assert r8["breakdown"]["optimizer_state"] == pytest.approx(a1["breakdown"]["optimizer_state"] / 2, rel=0.01)
    none = sim(tmp_path, "--activation_checkpointing=none")
    assert none["peak_gib"] > a1["peak_gib"] and none["forward_activations_gib"] > 3 * a1["forward_activations_gib"]
    # per-op AC keeps the matmuls' and attention's outputs, not the element-wise ones: between full and none
    op = sim(tmp_path, "--activation_checkpointing=op")
    for k in ("peak_gib", "forward_activations_gib"):
        assert a1[k] < op[k] < none[k], (k, a1[k], op[k], none[k])
    # tensorwise float8 all-gathers the block weights in 1 byte instead of bf16's 2 (LayerNorm and biases stay 2);
    # the master weights and AdamW state do not change
    f8 = sim(tmp_path, "--activation_checkpointing=full", "--float8=tensorwise")
    for k in ("All Gather", "Unsharded Param"):
        assert 0.5 < f8["tracker_gib"][k] / a1["tracker_gib"][k] < 0.55, (k, f8["tracker_gib"], a1["tracker_gib"])
    for k in ("Sharded Param", "OptState"):
        assert f8["tracker_gib"][k] == a1["tracker_gib"][k]


@pytest.mark.slow
def test_max_batch_size_is_the_largest_that_fits(tmp_path):
    d = model_dir(tmp_path / "m", width=256, layers=2, vocab=4096, heads=4)
    args = ["config/tiny.py", f"--init_from={d}", "--block_size=512", "--batch_size=1", "--grad_accum=16"]
    p1 = plan.plan(args, 2, None, 1000.0)
    p5 = plan.plan(args + ["--batch_size=5"], 2, None, 1000.0)  # with the same accumulation, as the search
    p6 = plan.plan(args + ["--batch_size=6"], 2, None, 1000.0)
    assert p1["peak_gib"] < p5["peak_gib"] < p6["peak_gib"]
    mem = (p5["peak_gib"] + p6["peak_gib"]) / 2 / 0.9  # the cap (90%) falls between batch 5 and batch 6
    p = plan.plan(args, 2, None, mem)
    assert p["fits"] and p["max_batch_size"] == 5 and p["simulations"] <= 5


@pytest.mark.parametrize("flags, world_size, gpu, message", [
    (["--fsdp='hybrid'", "--hsdp_shard_size=8"], 12, "h100",
     "fsdp=hybrid: world_size 12 is not a multiple of the shard group (8 ranks)"),
    ([], 2, None, "name the GPU: --gpu=h100"),
    (["--fsdp='none'"], 2, "h100", "fsdp=none trains in one process"),
])
def test_bad_input_messages(flags, world_size, gpu, message):
    with pytest.raises(ValueError) as e:
        plan.plan(["config/tiny.py", *flags], world_size, gpu, None)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_gpu_is_one_line_and_exit_1():
    r = run_plan(["config/tiny.py", "--gpu=h900"])
    assert r.returncode == 1 and r.stderr.startswith("error: unknown GPU 'h900'; use one of h100-nvl, h100-pcie, h100")
    assert r.stderr.count("\n") == 1, r.stderr


def test_too_big_exits_nonzero_and_says_what_to_change(tmp_path):
    out = tmp_path / "p.json"
    r = run_plan(["config/tiny.py", "--world_size=2", "--gpu_mem_gib=0.01", f"--json={out}"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "does not fit even at micro-batch 1" in r.stderr and "raise world_size" in r.stderr
    p = json.loads(out.read_text())
    assert p["fits"] is False and p["max_batch_size"] == 0


@pytest.mark.slow
def test_phi2_xml_on_8_h100_in_under_two_minutes(tmp_path):
    out = tmp_path / "p.json"
    t = time.perf_counter()
    r = run_plan(["config/phi2_xml.py", "--world_size=8", "--gpu=h100", f"--json={out}"])
    took = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    p = json.loads(out.read_text())
    assert KEYS <= set(p) and p["fits"] and p["tokens_per_step"] == 1_048_576 and took < 120, took


# Simulated against measured: three real 3-step runs that differ in width, depth, sequence length, AC mode,
# sharding and rank count. The measured peak is tests/peak_run.py's (its docstring gives the method).
MEASURED = [
    dict(nproc=1, shape=(1024, 6, 32000, 16),
         flags=["--fsdp='none'", "--batch_size=1", "--block_size=512", "--activation_checkpointing='none'"]),
    dict(nproc=2, shape=(768, 8, 50000, 12),
         flags=["--fsdp='full_shard'", "--batch_size=1", "--block_size=512", "--grad_accum=2",
                "--activation_checkpointing='full'"]),
    dict(nproc=2, shape=(512, 8, 100000, 8),
         flags=["--fsdp='shard_grad_op'", "--batch_size=1", "--block_size=1024",
                "--activation_checkpointing='selective'"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", MEASURED, ids=["1proc-none", "2rank-full-accum", "2rank-zero2-selective"])
def test_simulated_peak_within_15pct_of_measured(tmp_path, case):
    d = model_dir(tmp_path / "m", *case["shape"], weights=True)
    args = ["config/tiny.py", f"--init_from={d}", "--dtype='float32'", *case["flags"]]
    p = plan.plan(args, case["nproc"], None, 1000.0)
    assert p["params"] >= 100e6  # tensors dominate the process's memory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "tests/peak_run.py", *args] if case["nproc"] == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "tests/peak_run.py", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak_bytes"]
    assert len(measured) == case["nproc"]
    for m in measured:
        assert abs(p["peak_gib"] * 2**30 / m - 1) <= 0.15, (p["peak_gib"], m / 2**30, p["breakdown"])
