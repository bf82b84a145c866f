"""Plan a run on N GPUs from a laptop: does this config fit, how large a micro-batch can it take, how fast is it?

  python plan.py config/phi2_xml.py --world_size=8 --gpu=h100 --json=plan.json
  python plan.py config/phi2_xml_1gpu.py --world_size=1 --gpu_mem_gib=80 --batch_size=2

Arguments are train.py's (config files, --key=value flags) plus --world_size (ranks to simulate), --gpu (a
name from monitor.py's DEVICES, e.g. h100, h200, a100-40gb) or --gpu_mem_gib, and --json (also write the result).

How. The model is built by train.py's own code: model/parallel.py's shape() and parallel_model() (freezing,
activation checkpointing, FSDP2 per block with the mixed-precision policy), on fake tensors, which have shapes
but no memory, and a fake process group of world_size ranks, so collectives cost nothing. AdamW (fused, as
train.py's adamw()) takes a first step on zero gradients to create its state; then train.py's train_step runs
a second, whole optimizer step under torch's FSDPMemTracker (MemTracker for one unsharded process), which
counts every tensor alive on rank 0 by category. The peak is the largest total seen during that step.

Where the CPU and CUDA differ:
  attention  SDPA runs under sdpa_kernel(FLASH_ATTENTION). On the CPU that is the CPU flash kernel, which
             keeps the output and a float32 logsumexp per query, exactly what CUDA's flash kernel keeps: no
             T x T matrix is ever allocated, in forward or backward. A shape flash cannot run is an error.
  compile    simulated eager: on an H200 the compiled phi-2 step peaked 1% above the simulation, as the
             eager one did (BENCHMARKS.md, bench.py --gpu-table).
  float8     torchao's emulation of the same Float8Linear: weights all-gathered in 1 byte under FSDP, as on
             CUDA, but each matmul dequantizes its float8 operands to bf16 temporaries that CUDA's float8
             matmul never makes: the temporaries are overcounted (bench.py --gpu-table's (b) rows say by how much).
  AC "op"    torch's selective checkpointing runs for real: what its policy saves is what is counted.
  grad_accum two micro-batches stand for any number >= 2: what accumulation holds (FSDP's unsharded float32
             gradients between syncs, or a single process's .grad) exists from the second one on.
Not seen: the CUDA caching allocator's fragmentation, NCCL's buffers and the CUDA context (0.5-1 GiB).
`fits` therefore keeps 10% of the GPU's memory free.

Output: a table, and the same as JSON with the keys peak_gib, breakdown (GiB per category), gpu_mem_gib,
fits, max_batch_size (the largest micro-batch that fits, by simulation, up to batch_size x grad_accum, beyond
which the tokens per step would change; 0 if 1 does not), tokens_per_step, flops_per_token (monitor.py's
formula) and est_tokens_per_s (per GPU, at mfu_pct of the GPU's peak FLOP/s).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.distributed.tensor._sharding_prop as sharding_prop
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from model.parallel import parallel_model, scratch_config, shape
from model.phi import Phi, PhiConfig
from monitor import DEVICES, device_spec, flops_per_token, non_embedding_params
from train import DTYPES, Guard, adamw, load_config, train_step

HEADROOM = 0.10  # of the GPU's memory, for fragmentation, NCCL's buffers and the CUDA context
MFU = 40.0  # % of peak FLOP/s for est_tokens_per_s: what tuned FSDP runs of models this size reach on H100s
GIB = 2**30
# the tracker's categories -> the plan's
CATEGORIES = {"parameters": ("Sharded Param", "Unsharded Param", "Parameter", "Buffer"),
              "gradients": ("Sharded Grad", "Unsharded Grad", "Gradient"),
              "optimizer_state": ("OptState", "Optstate"),
              "activations": ("Activation", "Inputs"),
              "temporaries": ("Temp",),
              "collective_buffers": ("All Gather", "Reduce Scatter")}


class FakeScalars(TorchDispatchMode):
    """train_step's one host sync (.tolist()) has no values to read on fake tensors: every scalar reads 1.0,
    a finite loss and grad norm, so the guard lets the optimizer step run."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0
        return func(*args, **(kwargs or {}))


def model_config(cfg):
    """The model's shape, before expansion and RoPE scaling, as build_model makes it: the model_preset grown to the
    tokenizer's vocabulary (data_dir's meta.json, where prepared) for init_from="scratch"; else init_from's
    config.json where it is on this machine, else the model_preset. -> (PhiConfig, the vocabulary, its source)"""
    meta = os.path.join(cfg.data_dir, "meta.json")
    vocab = 0
    if os.path.isfile(meta):
        with open(meta) as f:
            vocab = json.load(f)["vocab_size"]
    path = os.path.join(cfg.init_from, "config.json")
    if cfg.init_from == "scratch":
        return scratch_config(cfg, vocab), vocab, f"preset {cfg.model_preset!r}"
    if os.path.isfile(path):
        with open(path) as f:
            return PhiConfig.from_dict(json.load(f)), vocab, path
    where = f", as init_from {cfg.init_from} is not on this machine"
    return PhiConfig.preset(cfg.model_preset), vocab, f"preset {cfg.model_preset!r}{where}"


def categories(snapshot):
    """The tracker's peak snapshot -> {plan category: bytes}"""
    named = {getattr(k, "value", k): v for k, v in snapshot.items()}
    return {cat: sum(named.get(n, 0) for n in names) for cat, names in CATEGORIES.items()}


def simulate(cfg, mcfg, new_layers, world_size, batch_size):
    """One optimizer step of this config on rank 0 of world_size, micro-batch batch_size.
    -> (peak bytes, {category: bytes at the peak}, {the tracker's own category: bytes at the peak, and
    forward_activations: the activations alive when the forward has returned})"""
    # float8 on fake tensors: torchao's emulation (the docstring says what it counts)
    cfg = dataclasses.replace(cfg, batch_size=batch_size, compile=False, float8_emulate=True)
    ptdtype = DTYPES[cfg.dtype]
    # the device mesh reads real values from the process group: built before fake tensors take over
    model, sharded = parallel_model(cfg, dataclasses.replace(mcfg), new_layers, ptdtype, world_size, "cpu")
    amp = not sharded and ptdtype != torch.float32  # as train.py: FSDP casts, a single process autocasts
    ctx = torch.autocast("cpu", dtype=ptdtype) if amp else nullcontext()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp16's scaler holds no memory worth counting
    # DTensor's sharding propagation builds global-shape tensors in the active fake mode, which the tracker
    # would count; in a real run they are never allocated. With its own fake mode the tracker skips them.
    detect, hook = sharding_prop.detect_fake_mode, None
    sharding_prop.detect_fake_mode = lambda *a: None
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model.to_empty(device="cpu")
            model.init_rope()
            model.train()
            optimizer = adamw(model, cfg)
            for p in model.parameters():  # AdamW's first step creates its state
                p.grad = torch.zeros_like(p) if p.requires_grad else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            x = torch.randint(0, mcfg.vocab_size, (batch_size, cfg.block_size + 1))
            batches = [(x[:, :-1], x[:, 1:])] * min(cfg.grad_accum, 2)
            tracker = FSDPMemTracker(model, optimizer) if sharded else MemTracker()
            if not sharded:
                tracker.track_external(model, optimizer)
            # the trackers refuse a root module called twice per step, as accumulation does: their per-module
            # statistics (not the peak) are reset first, by a global hook that runs before theirs
            hook = register_module_forward_pre_hook(lambda m, a: tracker.reset_mod_stats() if m is model else None)
            with tracker, FakeScalars():
                train_step(model, optimizer, scaler, batches, ctx, cfg, Guard(), sharded, signalled=False, nan=False)
    finally:
        sharding_prop.detect_fake_mode = detect
        if hook:
            hook.remove()
    (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    named = {getattr(k, "value", k): v for k, v in snapshot.items()}
    # what the forward leaves for backward: the activations when the root module's forward has returned
    (after,) = [v for k, v in tracker.memory_tracking[model].snapshots.items() if k.name in ("AFT_POST_FW", "POST_FW")]
    (after,) = after[-1].values()
    named["forward_activations"] = categories(after)["activations"]
    return snapshot["Total"], categories(snapshot), named


def max_batch_size(sim, cap, limit, b0, peak0, activations0):
    """The largest micro-batch up to limit whose simulated peak is <= cap, from a first simulation at b0. Each
    guess is the straight line through the two known peaks nearest the cap (activations scale with the batch,
    the rest does not); it is simulated, until the largest fit and the smallest miss are neighbours.
    -> (size, simulations run)"""
    known = {0: peak0 - activations0, b0: peak0}  # batch 0: what does not scale with the batch
    lo, hi = (b0, limit + 1) if peak0 <= cap else (0, b0)
    while hi - lo > 1:
        (b1, p1), (b2, p2) = sorted(known.items(), key=lambda kv: abs(kv[1] - cap))[:2]
        slope = (p2 - p1) / (b2 - b1) if p2 != p1 else 1.0
        b = min(max(b1 + int((cap - p1) // slope), lo + 1), hi - 1)
        known[b] = sim(b)
        lo, hi = (b, hi) if known[b] <= cap else (lo, b)
    return lo, len(known) - 2


def plan(args, world_size, gpu, gpu_mem_gib):
    cfg = load_config(args)
    if world_size < 1:
        raise ValueError(f"--world_size must be >= 1, got {world_size}")
    if cfg.cpu_offload:
        raise ValueError("plan.py does not simulate cpu_offload (host memory); set --cpu_offload=False")
    if cfg.fsdp == "none" and world_size > 1:
        raise ValueError("fsdp=none trains in one process; use --world_size=1 or fsdp=full_shard")
    if cfg.fsdp == "hybrid":
        cfg.hsdp_shard_size = cfg.hsdp_shard_size or min(8, world_size)  # torchrun's default: one 8-GPU node
        if world_size % cfg.hsdp_shard_size:
            raise ValueError(f"fsdp=hybrid: world_size {world_size} is not a multiple of the shard group "
                             f"({cfg.hsdp_shard_size} ranks); set --hsdp_shard_size to a divisor of it")
    flops = None
    if gpu:
        flops, gpu_mem_gib_named = device_spec(gpu)
        if flops is None:
            names = ", ".join("-".join(words) for words, _, _ in DEVICES)
            raise ValueError(f"unknown GPU {gpu!r}; use one of {names}, or --gpu_mem_gib=N")
        gpu_mem_gib = gpu_mem_gib or gpu_mem_gib_named
    if not gpu_mem_gib or gpu_mem_gib <= 0:
        raise ValueError("name the GPU: --gpu=h100 (see monitor.py DEVICES) or --gpu_mem_gib=N")
    mcfg, vocab, source = model_config(cfg)
    mcfg, _, new_layers = shape(cfg, mcfg, {}, vocab)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        t0 = time.perf_counter()
        peak, breakdown, tracker = simulate(cfg, mcfg, new_layers, world_size, cfg.batch_size)
        cap = gpu_mem_gib * (1 - HEADROOM) * GIB
        sim = lambda b: simulate(cfg, mcfg, new_layers, world_size, b)[0]  # noqa: E731
        limit = cfg.batch_size * cfg.grad_accum  # a larger micro-batch would change the tokens per step
        best, n_sims = max_batch_size(sim, cap, limit, cfg.batch_size, peak,
                                      breakdown["activations"] + breakdown["temporaries"])
    finally:
        dist.destroy_process_group()
    fpt = flops_per_token(mcfg, cfg.block_size)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Phi(mcfg).parameters())
    return dict(
        config=args, world_size=world_size, gpu=gpu, model=source, params=n_params,
        non_embedding_params=non_embedding_params(mcfg), layers=mcfg.num_hidden_layers,
        batch_size=cfg.batch_size, block_size=cfg.block_size, grad_accum=cfg.grad_accum, fsdp=cfg.fsdp,
        dtype=cfg.dtype, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile, float8=cfg.float8,
        peak_gib=peak / GIB, breakdown={k: v / GIB for k, v in breakdown.items()},
        forward_activations_gib=tracker.pop("forward_activations") / GIB,
        tracker_gib={k: v / GIB for k, v in tracker.items() if k != "Total"}, gpu_mem_gib=gpu_mem_gib,
        headroom=HEADROOM, fits=peak <= cap, max_batch_size=best, max_batch_size_searched=limit,
        tokens_per_step=cfg.batch_size * cfg.block_size * cfg.grad_accum * world_size, flops_per_token=fpt,
        mfu_pct=MFU, est_tokens_per_s=flops * MFU / 100 / fpt if flops else None,
        simulations=1 + n_sims, seconds=time.perf_counter() - t0)


def print_plan(p):
    gpu = p["gpu"] or "GPU"
    print(f"plan: {' '.join(p['config'])}\n  on {p['world_size']} x {gpu} ({p['gpu_mem_gib']:.1f} GiB), "
          f"fsdp={p['fsdp']}, {p['dtype']}, AC {p['activation_checkpointing']}"
          f"{', float8 ' + p['float8'] + ' (emulated)' if p['float8'] else ''}"
          f"{', compile simulated eager' if p['compile'] else ''}")
    print(f"  model: {p['params'] / 1e6:,.1f}M parameters, {p['layers']} blocks ({p['model']})")
    print(f"  micro-batch {p['batch_size']} x {p['block_size']:,} tokens, grad_accum {p['grad_accum']}: "
          f"{p['tokens_per_step']:,} tokens per optimizer step")
    print(f"{'peak per rank':<34}{p['peak_gib']:>8.2f} GiB")
    for k, v in p["breakdown"].items():
        print(f"  {k.replace('_', ' '):<32}{v:>8.2f}")
    print(f"{'activations when forward returns':<34}{p['forward_activations_gib']:>8.2f}     (kept for backward)")
    cap = p["gpu_mem_gib"] * (1 - p["headroom"])
    print(f"{'fits':<34}{'yes' if p['fits'] else 'NO':>8}     (peak <= {cap:.1f} GiB: {100 * p['headroom']:.0f}% "
          f"kept for fragmentation, NCCL and the CUDA context)")
    print(f"{'max micro-batch that fits':<34}{p['max_batch_size']:>8}     (searched up to "
          f"{p['max_batch_size_searched']}, batch_size x grad_accum: the tokens of one step)")
    print(f"{'FLOPs per token':<34}{p['flops_per_token']:>8.3g}")
    est = f"{p['est_tokens_per_s']:,.0f}" if p["est_tokens_per_s"] else "-"
    print(f"{'tokens/s per GPU at ' + format(p['mfu_pct'], '.0f') + '% MFU':<34}{est:>8}")
    print(f"({p['simulations']} simulation{'s' if p['simulations'] > 1 else ''} in {p['seconds']:.0f}s)")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Other arguments are train.py's: config files and --key=value flags.")
    ap.add_argument("--world_size", type=int, default=1, help="ranks to simulate")
    ap.add_argument("--gpu", help="a device name from monitor.py's DEVICES, e.g. h100")
    ap.add_argument("--gpu_mem_gib", type=float, help="the GPU's memory, where --gpu does not name it")
    ap.add_argument("--json", help="also write the plan here")
    a, rest = ap.parse_known_args(argv)
    p = plan(rest, a.world_size, a.gpu, a.gpu_mem_gib)
    print_plan(p)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(p, f, indent=1)
    if not p["max_batch_size"]:
        print(f"error: does not fit even at micro-batch 1 ({p['peak_gib']:.1f} GiB per rank): raise world_size, "
              f"set activation_checkpointing='full', or lower block_size", file=sys.stderr)
        sys.exit(1)
    if not p["fits"]:
        print(f"note: micro-batch {p['batch_size']} does not fit; --batch_size={p['max_batch_size']} does "
              f"(raise grad_accum to keep the tokens per step)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
