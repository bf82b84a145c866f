"""Issue 13, part 4: a rehearsal of phi-2's real width on the CPU. Two blocks of phi-2's exact shapes (width 2560,
32 heads of 80 dims with rotary on 32, MLP 10240, vocabulary 51,200) go through the production stack: 2 gloo ranks,
FSDP2 full_shard, full activation checkpointing, torch.compile, RoPE scaled x2 for a block past 2048. It must
1. give the losses of a plain reference (one process, eager, gradient accumulation for the same global batch),
2. resume from a checkpoint taken mid-run to the losses of the uninterrupted run,
3. export a directory that transformers loads with our logits, positions past 2048 included.

The production run is float32 here, not bfloat16, for two reasons found while writing this test (torch 2.13 CPU):
- without bf16 matrix units (AVX2 only, like the 2-core CI machines) PyTorch's bf16 `grad @ W` runs at 0.48 GFLOP/s
  against 49 in fp32, so one bf16 step at this width takes most of an hour;
- inductor's C++ code for a bf16 backward does not compile on any CPU: the bias grads of dense and fc2 are the same
  column sum (the block adds both outputs), stored twice under one variable name ("conflicting declaration
  at_BFloat16_tmp_acc0_vec"); `torch.compile(lambda x: a(x) + b(x))` over two bf16 Linears reproduces it.
So this rehearses sharding, checkpointing, compile, AC and RoPE scaling at full size; bf16 numerics need a GPU."""
import os
import shutil
import time

import pytest
import torch
import transformers

from helpers import read_jsonl, run_train, train_losses

from model.export import load_for_inference
from model.phi import Phi, PhiConfig

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]  # about 15 minutes: not in CI's command (README)

BLOCK = 2056    # the smallest multiple of 8 past phi-2's 2048 positions; rope_scaling_factor=2 makes room for it
STEPS = 3       # three losses to compare; the checkpoint at step 2 leaves one step to resume
CKPT_STEP = 2
# every run: constant LR (min_lr = learning_rate, no warm-up), evals at 0 and at the end only. At 1e-4 the loss
# falls by ~1 nat a step; at 3e-4 the second step overshot (11.3 -> 17.4)
COMMON = ["--batch_size=1", f"--block_size={BLOCK}", "--rope_scaling_factor=2", f"--max_iters={STEPS}",
          "--learning_rate=1e-4", "--min_lr=1e-4", "--warmup_iters=0", "--eval_interval=1000", "--eval_iters=1",
          "--log_interval=1", "--tensorboard=False"]
# one process: 2 micro-batches of 1 read global sequences 0 and 1, as ranks 0 and 1 do with one each
REFERENCE = ["--fsdp=none", "--dtype=float32", "--compile=False", "--activation_checkpointing=none",
             "--grad_accum=2", "--ckpt_interval=1000"]
PRODUCTION = ["--fsdp=full_shard", "--dtype=float32", "--compile=True", "--activation_checkpointing=full",
              "--grad_accum=1", f"--ckpt_interval={CKPT_STEP}"]


def write_phi2_layers(path, n_layers=2):
    """A random Phi with phi-2's shapes as a local HF dir (config.json + model.safetensors), the runs' init_from.
    resid_pdrop is 0: phi-2's 0.1 would draw different dropout masks in one process and on two ranks."""
    cfg = PhiConfig.preset("phi-2")
    cfg.num_hidden_layers, cfg.resid_pdrop = n_layers, 0.0
    torch.manual_seed(0)
    Phi(cfg).save_pretrained(path)
    return path


def timed_run(times, name, args, **kw):
    t0 = time.perf_counter()
    run_train(args, timeout=1800, **kw)
    times[name] = round(time.perf_counter() - t0)


def metric(out, key):
    return {r["step"]: r[key] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if key in r}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The three runs the checks share. Their checkpoints (5 GB each) are deleted afterwards."""
    root = tmp_path_factory.mktemp("rehearsal")
    init = write_phi2_layers(str(root / "phi2-2layers"))
    common = [*COMMON, f"--data_dir={tiny_data}", f"--init_from={init}"]
    out = {name: str(root / name) for name in ("reference", "production", "resumed")}
    times = {}
    # the one process gets both cores; each rank of the 2-rank runs gets one
    timed_run(times, "reference", [*common, *REFERENCE, f"--out_dir={out['reference']}"],
              env={"OMP_NUM_THREADS": "2"})
    timed_run(times, "production", [*common, *PRODUCTION, f"--out_dir={out['production']}"], nproc=2)
    mid = os.path.join(out["production"], "ckpt", f"step-{CKPT_STEP:06d}")
    timed_run(times, "resumed", [*common, *PRODUCTION, f"--out_dir={out['resumed']}", f"--resume={mid}"], nproc=2)
    print(f"\nrehearsal wall times (s): {times}")
    yield out
    shutil.rmtree(root, ignore_errors=True)


def test_production_stack_matches_reference(runs):
    ref, prod = train_losses(runs["reference"]), train_losses(runs["production"])
    ref_gn, prod_gn = metric(runs["reference"], "grad_norm"), metric(runs["production"], "grad_norm")
    steps = range(1, STEPS + 1)
    diffs = [abs(prod[s] - ref[s]) / ref[s] for s in steps]
    gn_diff = abs(prod_gn[1] - ref_gn[1]) / ref_gn[1]
    print(f"\nreference {[ref[s] for s in steps]}, grad norms {[ref_gn[s] for s in steps]}"
          f"\nproduction {[prod[s] for s in steps]}, grad norms {[prod_gn[s] for s in steps]}"
          f"\nrelative differences: losses {diffs}, step-1 grad norm {gn_diff}")
    assert ref[STEPS] < ref[1] - 1.0  # the steps move the loss, so the later comparisons test the updates
    # step 1: the same weights and tokens, fp32 sums in another order (FSDP, compile): a few fp32 ulps (6e-8)
    assert diffs[0] <= 1e-6, (ref, prod)
    # later steps also see the grad norm, which clipping divides by (grad_clip=1 < ~7). PyTorch's CPU fp32 norm
    # loses ~1e-3 on these 131M-element grads (pytorch#169237; 7.9e-4 measured, a different error for each rank's
    # half), which moves Adam's second step by ~1e-3 of that step's effect on the loss (~1 nat): ~1e-3 nats,
    # 1e-4 of a loss near 10
    assert max(diffs) <= 1e-4, (ref, prod)
    # the step-1 gradient, scale included, which Adam alone would hide: twice that norm error. A lost factor of
    # world_size in the loss normalisation would be 50%
    assert gn_diff <= 2e-3, (ref_gn, prod_gn)


def test_resume_from_mid_run_checkpoint(runs):
    full, resumed = train_losses(runs["production"]), train_losses(runs["resumed"])
    assert sorted(resumed) == list(range(CKPT_STEP + 1, STEPS + 1))  # it really started at the checkpoint
    # the same kernels on the same data in the same order: exact, as tests/test_resume.py asserts
    assert [resumed[s] for s in resumed] == [full[s] for s in resumed]
    # the final eval: the weights after the last step are the same too
    assert metric(runs["resumed"], "val_loss")[STEPS] == metric(runs["production"], "val_loss")[STEPS]


def test_export_loads_in_transformers_with_same_logits(runs):
    path = os.path.join(runs["production"], "best")
    ours, _ = load_for_inference(path)
    assert ours.cfg.rope_scaling == {"type": "linear", "factor": 2.0} and ours.cfg.max_position_embeddings == 4096
    hf = transformers.PhiForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))  # the tokenizer's ids
    with torch.no_grad():
        # RoPE is relative, so positions 0..7 already test the x2 scaling; the last ones read our table past
        # phi-2's 2048 rows, where transformers computes the angles afresh
        for start in (0, BLOCK - 8):
            pos = torch.arange(start, start + 8)[None]
            want, got = hf(idx, position_ids=pos).logits, ours(idx, pos=pos)
            err = (want - got).abs().max().item()
            print(f"\nlogits at positions {start}..{start + 7}: max |ours - transformers| = {err:.2e}")
            assert want.abs().max() > 1.0  # O(1) logits, so an absolute tolerance means something
            # both fp32 with the same weights; the kernels differ (gelu, attention), as in tests/test_model.py
            assert err <= 1e-4
