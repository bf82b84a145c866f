"""The measured side of plan.py's check: three real training steps of a config, through train.py's own setup,
build_model, adamw and train_step, on random tokens; prints each rank's peak memory as JSON.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/peak_run.py CONFIG [--key=value ...]            # one process
    torchrun --nproc_per_node=2 tests/peak_run.py CONFIG [--key=value ...]                    # gloo ranks

The peak is the process's peak RSS during the steps (VmHWM, reset through /proc/self/clear_refs once the model
is built, so rank 0's full copy of the weights is not counted) minus its RSS before the model was built (after
imports and the process group): the memory that tensors of training took. Three conditions make that honest:
tensors dominate (models of >= 100M parameters), glibc returns freed memory at once (MALLOC_MMAP_THRESHOLD_
puts every allocation of 64 KiB or more in its own mapping, unmapped on free, so the RSS follows live tensors
and not what the heap keeps), and one thread per process (no per-thread kernel scratch).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import reset_peak, rss_bytes  # noqa: E402
from model.parallel import build_model  # noqa: E402
from train import DTYPES, Guard, adamw, load_config, setup, train_step  # noqa: E402


def main(args):
    cfg = load_config(args)
    rank, world_size, device = setup(cfg)
    ptdtype = DTYPES[cfg.dtype]
    before = rss_bytes()
    model, mcfg, sharded = build_model(cfg, 0, rank, world_size, device, ptdtype)
    reset_peak(device)  # VmHWM := VmRSS
    amp = not sharded and ptdtype != torch.float32
    ctx = torch.autocast("cpu", dtype=ptdtype) if amp else torch.autocast("cpu", enabled=False)
    optimizer, guard = adamw(model, cfg), Guard()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(rank)
    for _ in range(3):
        x = torch.randint(0, mcfg.vocab_size, (cfg.grad_accum, cfg.batch_size, cfg.block_size + 1))
        batches = [(b[:, :-1], b[:, 1:]) for b in x]
        train_step(model, optimizer, scaler, batches, ctx, cfg, guard, sharded, signalled=False, nan=False)
    peak = rss_bytes("VmHWM") - before
    peaks = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(peaks, peak)
        dist.destroy_process_group()
    else:
        peaks = [peak]
    if rank == 0:
        print(json.dumps(dict(peak_bytes=peaks)))


if __name__ == "__main__":
    main(sys.argv[1:])
