"""TokenLoader: exact resume, disjoint ranks under real gloo, world-size changes, mixture, val batches, speed."""
import json
import os
import shutil
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.loader import PATTERN_LEN, DataError, TokenLoader, read_meta, val_batches

B, T = 4, 32


@pytest.fixture
def data_dir(tiny_data):  # conftest.py: synthetic corpus prepared once per session
    return tiny_data


def take(loader, n):
    return [torch.cat(loader.next_batch(), dim=1) for _ in range(n)]


def test_batches_shape_and_shift(data_dir):
    x, y = TokenLoader(data_dir, B, T).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < read_meta(data_dir)["vocab_size"]


def test_resume_equals_uninterrupted(data_dir):
    ref = take(TokenLoader(data_dir, B, T, seed=3), 7)
    first = TokenLoader(data_dir, B, T, seed=3)
    got = take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, no pickle
    second = TokenLoader(data_dir, B, T, seed=3)
    second.load_state_dict(state)
    got += take(second, 4)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert not torch.equal(ref[0], take(TokenLoader(data_dir, B, T, seed=4), 1)[0])


def test_accumulation_equals_bigger_batch(data_dir):
    big = take(TokenLoader(data_dir, 2 * B, T), 3)
    small = take(TokenLoader(data_dir, B, T), 6)
    for i in range(3):
        assert torch.equal(big[i], torch.cat(small[2 * i:2 * i + 2]))


def test_ranks_are_slices_of_the_global_batch(data_dir):
    big = take(TokenLoader(data_dir, 2 * B, T), 3)
    r0 = take(TokenLoader(data_dir, B, T, rank=0, world_size=2), 3)
    r1 = take(TokenLoader(data_dir, B, T, rank=1, world_size=2), 3)
    for i in range(3):
        assert torch.equal(big[i], torch.cat([r0[i], r1[i]]))


def _gloo_worker(rank, world, port, data_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = TokenLoader(data_dir, B, T, rank=rank, world_size=world, seed=7)
    mine = torch.stack(take(loader, 5))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)  # the real collective, as training would use
    if rank == 0:
        torch.save({"all": torch.stack(gathered), "state": json.dumps(loader.state_dict())}, out)
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_disjoint_and_resume_on_one(data_dir, tmp_path, capsys):
    out = str(tmp_path / "gathered.pt")
    mp.spawn(_gloo_worker, args=(2, free_port(), data_dir, out), nprocs=2, join=True)
    saved = torch.load(out, weights_only=True)
    gathered, state = saved["all"], json.loads(saved["state"])  # (rank, step, B, T+1)
    # each rank got exactly its own slice of the global batch, so the ranks are disjoint
    one = TokenLoader(data_dir, 2 * B, T, seed=7)
    ref = take(one, 8)
    for step in range(5):
        assert torch.equal(torch.cat([gathered[0, step], gathered[1, step]]), ref[step])
    # 2 -> 1: a single rank with twice the batch continues exactly where the pair stopped
    single = TokenLoader(data_dir, 2 * B, T, seed=7)
    capsys.readouterr()
    single.load_state_dict(state)
    log = capsys.readouterr().out
    assert "global sequence 40" in log and "world_size 2 -> 1" in log
    for step in range(5, 8):
        assert torch.equal(take(single, 1)[0], ref[step])


def test_rank_indices_disjoint(data_dir):
    # global indices per rank over many steps: disjoint and together contiguous
    world, steps = 3, 10
    seen = []
    for r in range(world):
        loader = TokenLoader(data_dir, B, T, rank=r, world_size=world)
        for _ in range(steps):
            start = loader.index + r * B
            seen += range(start, start + B)
            loader.next_batch()
    assert sorted(seen) == list(range(world * B * steps))


def test_mixture_is_exact_per_cycle(data_dir):
    loader = TokenLoader(data_dir, B, T, mixture={"xml": 0.5, "mdx": 0.2, "js": 0.3})
    langs = [loader.sequence(i)[0] for i in range(PATTERN_LEN)]
    assert (langs.count("xml"), langs.count("mdx"), langs.count("js")) == (500, 200, 300)
    only = TokenLoader(data_dir, B, T, mixture={"js": 1.0})
    assert {only.sequence(i)[0] for i in range(50)} == {"js"}
    with pytest.raises(DataError, match="mixture names \\['ts'\\]"):
        TokenLoader(data_dir, B, T, mixture={"ts": 1.0})


def test_no_chunk_repeats_within_an_epoch(data_dir):
    loader = TokenLoader(data_dir, B, T, mixture={"mdx": 1.0})
    n = loader._chunks("mdx")
    offsets = [loader._offset(0, k) for k in range(n)]
    assert len(set(offsets)) == n
    assert max(offsets) + T + 1 <= len(loader.data["mdx"])
    second = [loader._offset(0, n + k) for k in range(n)]  # next epoch: new order, shifted cut
    assert second != offsets


def test_mixture_change_is_logged(data_dir, capsys):
    a = TokenLoader(data_dir, B, T)
    take(a, 2)
    b = TokenLoader(data_dir, B, T, mixture={"js": 1.0})
    b.load_state_dict(a.state_dict())
    assert "mixture" in capsys.readouterr().out and b.index == 2 * B


def test_val_batches_fixed(data_dir):
    v1 = val_batches(data_dir, "xml", B, T, 3)
    v2 = val_batches(data_dir, "xml", B, T, 3)
    assert len(v1) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(v1, v2))
    assert v1[0][0].shape == (B, T) and torch.equal(v1[0][0][:, 1:], v1[0][1][:, :-1])
    with pytest.raises(DataError, match="no val data for language 'ts'"):
        val_batches(data_dir, "ts", B, T, 1)
    assert val_batches(data_dir, "mdx", B, 100_000, 1) == []  # less than one sequence: nothing to evaluate


def test_damaged_data_is_reported(data_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    with open(bad / "train_js.bin", "ab") as f:
        f.write(b"\0")  # one stray byte: not a multiple of uint16
    with pytest.raises(DataError, match="not a multiple of 2"):
        TokenLoader(bad, B, T)
    os.unlink(bad / "meta.json")
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenLoader(bad, B, T)


def test_loader_is_20x_faster_than_tiny_training(data_dir):
    from model.phi import Phi, PhiConfig
    cfg = PhiConfig.preset("tiny")
    cfg.vocab_size = read_meta(data_dir)["vocab_size"]
    torch.manual_seed(0)
    model = Phi(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = TokenLoader(data_dir, 8, 128)
    x, y = loader.next_batch()

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(2):
        step()
    train_s = (time.perf_counter() - t) / 2
    t = time.perf_counter()
    for _ in range(50):
        loader.next_batch()
    load_s = (time.perf_counter() - t) / 50
    print(f"tiny train step {train_s * 1e3:.1f} ms, loader batch {load_s * 1e3:.3f} ms, ratio {train_s / load_s:.0f}x")
    assert train_s / load_s >= 20
    assert load_s <= 0.05 / 20  # also against a fast machine's tiny step of ~50 ms
