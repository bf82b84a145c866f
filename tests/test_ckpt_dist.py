"""Real 2-rank gloo FSDP2 checkpoints: save on 1 process -> load on 2 FSDP ranks -> save on 2 -> load on 1.

Model and optimizer state must come back bit-exactly across every world-size change, and each rank's RNG too;
for an odd-shaped MLP (uneven shards) and for a small Phi sharded per block.
"""
import importlib.util
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

import ckpt

pytestmark = pytest.mark.slow  # two spawned gloo ranks (~10 s); test_ckpt.py covers ckpt.py in one process
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
KINDS = ("mlp", "phi") if importlib.util.find_spec("model.phi") else ("mlp",)


def make(kind, fsdp):
    """Same init on every rank. "mlp": odd sizes so FSDP shards are uneven (5 rows -> 3 + 2);
    "phi": the real model, sharded per block as train.py does."""
    torch.manual_seed(0)
    if kind == "phi":
        from model.phi import Phi, PhiConfig
        model = Phi(PhiConfig.preset("test"))
        blocks = list(model.model.layers)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.GELU(), torch.nn.Linear(6, 5), torch.nn.GELU(),
                                    torch.nn.Linear(5, 3))
        blocks = list(model[::2])
    if fsdp:
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(kind, model, opt, step, rank=0, world=1):
    """One step on a fixed global batch of 4; each rank takes its slice. Returns this rank's loss."""
    g = torch.Generator().manual_seed(step)
    if kind == "phi":
        x = torch.randint(0, 128, (4, 17), generator=g)
        x, y = x[:, :-1], x[:, 1:]
    else:
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
    b = 4 // world
    x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
    loss = model(x, y)[1] if kind == "phi" else ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def full_state(model, opt):
    """Flat full (unsharded) model + optimizer tensors; collective under FSDP, empty off rank 0."""
    msd, osd = get_state_dict(model, opt, options=FULL)
    flat = {f"model.{k}": v for k, v in msd.items()}
    flat.update({f"optim.{k}.{n}": v for k, d in osd.get("state", {}).items() for n, v in d.items()})
    return flat


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        for kind in KINDS:
            check_2_ranks(kind, rank, world, f"{tmp}/{kind}")
        dist.barrier()  # tear down together: a rank destroying gloo while its peer still works can abort
    finally:
        dist.destroy_process_group()


def check_2_ranks(kind, rank, world, tmp):
    model, opt = make(kind, fsdp=True)
    # 1 -> 2: the checkpoint saved by one plain process loads into two FSDP ranks
    state = ckpt.load(ckpt.find_resume(f"{tmp}/a", "auto"), model, opt)
    assert state["step"] == 2 and state["ckpt"]["world_size"] == 1
    ref = full_state(model, opt)
    if rank == 0:
        assert_same(ref, load_file(f"{tmp}/ref_a.safetensors"))
    loss = train_step(kind, model, opt, 2, rank, world)
    # 2 ranks save; each rank's RNG comes back on reload
    torch.manual_seed(100 + rank)
    path = ckpt.save(f"{tmp}/b", 3, model, opt, {"step": 3, "tokens": 12}, metric=1.5)
    draws = torch.rand(3).tolist()
    ref = full_state(model, opt)
    torch.manual_seed(0)
    ckpt.load(path, model, opt)
    assert torch.rand(3).tolist() == draws
    # a corrupt shard written by rank 1: both ranks skip it (auto) or refuse it (explicit path)
    bad = ckpt.save(f"{tmp}/b", 4, model, opt, {"step": 4})
    shard = f"{bad}/shard-00002-model-00001-of-00001.safetensors"
    if rank == 0:
        data = bytearray(open(shard, "rb").read())
        data[-1] ^= 0xFF
        open(shard, "wb").write(data)
    dist.barrier()
    assert ckpt.find_resume(f"{tmp}/b", "auto") == path
    with pytest.raises(ckpt.CheckpointError, match=f"cannot resume from {bad}: {shard}: checksum mismatch"):
        ckpt.find_resume(f"{tmp}/b", bad)
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    if rank == 0:
        save_file(ref, f"{tmp}/ref_b.safetensors")
        json.dump({"path": path, "draws": draws, "loss": sum(losses) / world}, open(f"{tmp}/b.json", "w"))


def test_reshard_1_to_2_to_1_bit_exact():
    with tempfile.TemporaryDirectory() as tmp:
        ref_losses = {}
        for kind in KINDS:
            model, opt = make(kind, fsdp=False)
            for step in range(2):
                train_step(kind, model, opt, step)
            ckpt.save(f"{tmp}/{kind}/a", 2, model, opt, {"step": 2, "tokens": 8})
            save_file(full_state(model, opt), f"{tmp}/{kind}/ref_a.safetensors")
            ref_losses[kind] = train_step(kind, model, opt, 2)

        mp.spawn(worker, args=(2, tmp), nprocs=2)

        for kind in KINDS:
            b = json.load(open(f"{tmp}/{kind}/b.json"))
            assert b["loss"] == pytest.approx(ref_losses[kind], abs=1e-5)  # same step on 2 ranks as on 1
            assert ckpt.verify(b["path"]) == []
            assert ckpt.verify(f"{tmp}/{kind}/b/ckpt/step-000004") != []
            assert sorted(n for n in os.listdir(b["path"]) if n.endswith(".safetensors")) == [
                "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]

            # 2 -> 1: a plain, unsharded model gets the same full weights and optimizer state, and rank 0's RNG
            model, opt = make(kind, fsdp=False)
            state = ckpt.load(b["path"], model, opt)
            assert state["step"] == 3 and state["tokens"] == 12 and state["ckpt"]["world_size"] == 2
            assert_same(full_state(model, opt), load_file(f"{tmp}/{kind}/ref_b.safetensors"))
            assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-2
            assert torch.rand(3).tolist() == b["draws"]
