"""ckpt.py in one process: bit-exact resume, corruption, crashes mid-save, retention, full disk, CLI."""
import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import ckpt
import remote  # ckpt.py's command line (remote.main), which reads URLs too

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def train(model, opt, steps):
    """Steps draw data and dropout masks from the global RNG, so a resume must restore it to match."""
    losses = []
    for _ in steps:
        loss = ((model(torch.randn(4, 8)) - torch.randn(4, 3)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def saved(tmp_path, steps=(1, 2), **kw):
    """A run that saved at each of `steps`; returns the checkpoint paths."""
    model, opt = make()
    paths, done = [], 0
    for s in steps:
        train(model, opt, range(s - done))
        done = s
        paths.append(ckpt.save(tmp_path, s, model, opt, {"step": s}, **kw))
    return paths


def test_resume_is_bit_exact(tmp_path):
    model, opt = make()
    ref = train(model, opt, range(6))
    ref_weights = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = make()
    train(model, opt, range(3))
    ckpt.save(tmp_path, 3, model, opt, {"step": 3, "loader": {"index": 12}})
    torch.manual_seed(123)  # a new process would start from another RNG state

    model, opt = make()
    state = ckpt.load(ckpt.find_resume(tmp_path, "auto"), model, opt)
    assert state["step"] == 3 and state["loader"] == {"index": 12}
    assert train(model, opt, range(3)) == ref[3:]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k


def test_save_before_first_step_changes_nothing(tmp_path):
    model, opt = make()
    ref = train(model, opt, range(2))
    model, opt = make()
    path = ckpt.save(tmp_path, 0, model, opt, {"step": 0})
    assert not opt.state  # DCP's state init must not leak into the run
    assert train(model, opt, range(2)) == ref
    model, opt = make()
    ckpt.load(path, model, opt)
    assert not opt.state
    assert train(model, opt, range(2)) == ref


def test_layout_manifest_and_latest(tmp_path):
    p1, p2 = saved(tmp_path)
    assert p2 == str(tmp_path / "ckpt" / "step-000002")
    assert sorted(os.listdir(p2)) == ["manifest.json", "shard-00001-model-00001-of-00001.safetensors",
                                      "train_state.json"]
    manifest = json.load(open(f"{p2}/manifest.json"))
    assert set(manifest["files"]) == {"shard-00001-model-00001-of-00001.safetensors", "train_state.json"}
    assert manifest["files"]["train_state.json"]["size"] == os.path.getsize(f"{p2}/train_state.json")
    assert open(tmp_path / "ckpt" / "latest").read() == "step-000002\n"
    state = json.load(open(f"{p2}/train_state.json"))
    assert len(state["ckpt"]["rng"]) == 1 and len(state["ckpt"]["rng"][0]["torch"]) == 5056
    assert not any(n.endswith(".metadata") for n in os.listdir(p2))  # DCP's pickled metadata is never written


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_is_named_and_skipped(tmp_path, damage, capsys):
    p1, p2 = saved(tmp_path)
    shard = f"{p2}/shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(open(shard, "rb").read())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[len(data) // 2] ^= 0x01
    open(shard, "wb").write(data)

    problems = ckpt.verify(p2)
    assert len(problems) == 1 and problems[0].startswith(shard)
    assert ("truncated" if damage == "truncate" else "checksum mismatch") in problems[0]
    with pytest.warns(UserWarning, match=f"skipping checkpoint {p2}: {shard}"):
        assert ckpt.find_resume(tmp_path, "auto") == p1
    with pytest.raises(ckpt.CheckpointError, match=f"cannot resume from {p2}: {shard}") as e:
        ckpt.find_resume(tmp_path, p2)
    assert "\n" not in str(e.value)
    model, opt = make()
    with pytest.raises(ckpt.CheckpointError, match=f"cannot load {p2}: {shard}") as e:
        ckpt.load(p2, model, opt)  # checksums run while the shard is read; the error comes after the read
    assert "\n" not in str(e.value)
    assert remote.main(["verify", p2]) == 1
    assert shard in capsys.readouterr().out
    assert remote.main(["verify", p1]) == 0


def test_missing_manifest_extra_file_and_bad_json(tmp_path):
    p1, p2 = saved(tmp_path)
    open(f"{p1}/stray.safetensors", "wb").write(b"x")
    assert ckpt.verify(p1) == [f"{p1}/stray.safetensors: not in manifest"]
    os.remove(f"{p2}/manifest.json")
    assert "missing (save did not complete)" in ckpt.verify(p2)[0]
    open(f"{p2}/manifest.json", "w").write("{not json")
    assert "unreadable" in ckpt.verify(p2)[0]
    assert ckpt.verify(str(tmp_path / "nope")) == [f"{tmp_path}/nope: not a directory"]


CRASH = """
import sys, time, torch
sys.path.insert(0, {root!r})
import ckpt
model = torch.nn.Linear(64, 64)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 64)).sum().backward(); opt.step()
ckpt.save({out!r}, 1, model, opt, {{"step": 1}})
def hang(*args):  # shards are written, the commit has not happened: the parent kills us here
    print("saving", flush=True); time.sleep(600)
ckpt._commit = hang
ckpt.save({out!r}, 2, model, opt, {{"step": 2}})
"""


def test_kill_during_save_keeps_previous(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CRASH.format(root=ROOT, out=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "saving\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tmp_path / "ckpt"
    assert sorted(os.listdir(root)) == ["latest", "step-000001", "step-000002.tmp"]
    assert any(n.endswith(".safetensors") for n in os.listdir(root / "step-000002.tmp"))
    assert open(root / "latest").read() == "step-000001\n"
    assert ckpt.find_resume(tmp_path, "auto") == str(root / "step-000001")  # the .tmp is never a candidate
    model, opt = make()
    ckpt.save(tmp_path, 2, model, opt, {"step": 2})  # the next save replaces the partial dir
    assert sorted(os.listdir(root)) == ["latest", "step-000001", "step-000002"]


def test_retention_keeps_last_and_best(tmp_path):
    model, opt = make()
    metrics = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 1.5, 6: 4.0}
    for step, metric in metrics.items():
        ckpt.save(tmp_path, step, model, opt, {"step": step}, metric=metric, keep_last=2, keep_best=1)
    kept = [s for s, _, _ in ckpt.list_checkpoints(tmp_path / "ckpt")]
    assert kept == [2, 5, 6]  # best (1.0 at step 2) + last two
    ckpt.save(tmp_path, 7, model, opt, {"step": 7}, metric=0.5, keep_last=1, keep_best=2)
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path / "ckpt")] == [2, 7]
    ckpt.save(tmp_path, 8, model, opt, {"step": 8}, keep_last=0, keep_best=0)  # the new one always stays
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path / "ckpt")] == [8]


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    (p1,) = saved(tmp_path, steps=(1,))
    before = {n: open(f"{p1}/{n}", "rb").read() for n in os.listdir(p1)}
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 1000)
    model, opt = make()
    with pytest.raises(ckpt.CheckpointError, match=r"not enough disk space in .*ckpt: checkpoint needs ~0\.1 MB, "
                                                   r"0\.0 MB free; free space or lower keep_last"):
        ckpt.save(tmp_path, 2, model, opt, {"step": 2})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step-000001"]
    assert {n: open(f"{p1}/{n}", "rb").read() for n in os.listdir(p1)} == before
    assert ckpt.verify(p1) == []


def test_disk_full_while_writing_on_a_tiny_tmpfs(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (p1,) = saved(disk, steps=(1,))  # ~5 KB fits
        big = torch.nn.Linear(256, 256)
        opt = torch.optim.AdamW(big.parameters())
        with pytest.raises(ckpt.CheckpointError, match="not enough disk space"):  # caught by the estimate
            ckpt.save(disk, 2, big, opt, {"step": 2})
        monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 1 << 40)  # now the write itself runs out
        with pytest.raises(ckpt.CheckpointError, match=r"writing .*step-000002.tmp failed: disk full; free space"):
            ckpt.save(disk, 2, big, opt, {"step": 2})
        assert sorted(os.listdir(disk / "ckpt")) == ["latest", "step-000001"]
        assert ckpt.verify(p1) == [] and ckpt.find_resume(disk, "auto") == p1
    finally:
        subprocess.run(["umount", str(disk)])


def test_transient_io_error_is_retried(tmp_path, monkeypatch):
    real, calls = ckpt._fsync_dir, []

    def flaky(path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(path)
    monkeypatch.setattr(ckpt, "_fsync_dir", flaky)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    (p1,) = saved(tmp_path, steps=(1,))
    assert ckpt.verify(p1) == [] and len(calls) > 1

    monkeypatch.setattr(ckpt, "_fsync_dir", lambda path: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    model, opt = make()
    with pytest.raises(ckpt.CheckpointError, match="committing .*step-000002 failed: .*No space"):
        ckpt.save(tmp_path, 2, model, opt, {"step": 2})
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path / "ckpt")] == [1]
    assert not os.path.exists(tmp_path / "ckpt" / "step-000002.tmp")


def test_find_resume_never_and_empty(tmp_path):
    assert ckpt.find_resume(tmp_path, "never") is None
    assert ckpt.find_resume(tmp_path, "auto") is None
    with pytest.raises(ckpt.CheckpointError, match="not a directory"):
        ckpt.find_resume(tmp_path, str(tmp_path / "missing"))


def test_cli_ls_verify_help(tmp_path, capsys):
    model, opt = make()
    for step, metric in ((1, 2.0), (2, 1.0), (3, 1.5)):
        ckpt.save(tmp_path, step, model, opt, {"step": step}, metric=metric)
    shard = tmp_path / "ckpt" / "step-000001" / "shard-00001-model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    assert remote.main(["ls", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()

    def size(step):  # every file of the checkpoint dir, in MB
        return f"{sum(f.stat().st_size for f in (tmp_path / 'ckpt' / f'step-{step:06d}').iterdir()) / 1e6:.1f}MB"
    assert rows[0].split() == ["step", "metric", "size", "verifies", "flags"]
    assert rows[1].split()[:4] == ["1", "2.0000", size(1), "NO"] and str(shard) in rows[1]
    assert rows[2].split() == ["2", "1.0000", size(2), "yes", "best"]
    assert rows[3].split() == ["3", "1.5000", size(3), "yes", "latest"]
    assert remote.main(["ls", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoints in") and err.count("\n") == 1
    for sub in ("ls", "verify"):
        with pytest.raises(SystemExit) as e:
            remote.main([sub, "--help"])
        assert e.value.code == 0 and "usage: " in capsys.readouterr().out
    # the real script: exit status 1 and the file named
    r = subprocess.run([sys.executable, f"{ROOT}/ckpt.py", "verify", str(shard.parent)], capture_output=True, text=True)
    assert r.returncode == 1 and str(shard) in r.stdout


def test_ranking_direction_is_explicit(tmp_path, capsys):
    """A "max" metric (a validity rate) ranks the highest first, in retention, `ls` and best_checkpoint alike."""
    model, opt = make()
    for step, metric in ((1, 0.2), (2, 0.9), (3, 0.5), (4, 0.1)):
        ckpt.save(tmp_path, step, model, opt, {"step": step}, metric=metric, higher_is_better=True, keep_last=1,
                  keep_best=1)
    assert [s for s, _, _ in ckpt.list_checkpoints(tmp_path / "ckpt")] == [2, 4]  # the best (0.9) and the newest
    assert ckpt.best_checkpoint(tmp_path, higher_is_better=True).endswith("step-000002")
    assert ckpt.best_checkpoint(tmp_path, higher_is_better=False).endswith("step-000004")
    assert remote.main(["ls", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[0] == "2" and rows[1].split()[-1] == "best"
    assert ckpt.best_first([(1, "a", 0.5), (2, "b", 0.5), (3, "c", float("nan"))], True) == [(0.5, 1, "a"),
                                                                                              (0.5, 2, "b")]


def test_resolve_and_train_state(tmp_path):
    (p1, p2) = saved(tmp_path, steps=(1, 2))
    assert ckpt.resolve(str(tmp_path)) == p2 and ckpt.resolve(str(tmp_path / "ckpt")) == p2
    assert ckpt.resolve(p1) == p1
    assert ckpt.train_state(p2)["step"] == 2 and ckpt.train_state(str(tmp_path)) is None
    shard = f"{p2}/shard-00001-model-00001-of-00001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000002"):
        assert ckpt.resolve(str(tmp_path)) == p1  # the newest that verifies, as resume=auto
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve(str(tmp_path / "nope"))


def test_load_into_other_model_is_one_line_error(tmp_path):
    (p1,) = saved(tmp_path, steps=(1,))
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 3))
    with pytest.raises(ckpt.CheckpointError, match=f"loading {p1} failed") as e:
        ckpt.load(p1, model, torch.optim.AdamW(model.parameters()))
    assert "\n" not in str(e.value)


def test_checksum_per_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "CHUNK", 1000)
    (p1,) = saved(tmp_path, steps=(1,))
    shard = f"{p1}/shard-00001-model-00001-of-00001.safetensors"
    entry = json.load(open(f"{p1}/manifest.json"))["files"][os.path.basename(shard)]
    assert len(entry["xxh3"]) == -(-entry["size"] // 1000) > 1
    data = bytearray(open(shard, "rb").read())
    data[2500] ^= 0x10
    open(shard, "wb").write(data)
    assert ckpt.verify(p1) == [f"{shard}: checksum mismatch (corrupt)"]


def test_sum64_against_python():
    rng = random.Random(0)
    for n in (0, 7, 8, 9, 1003):
        data = bytes(rng.randrange(256) for _ in range(n))
        padded = data + bytes(-n % 8)
        expect = sum(struct.unpack(f"<{len(padded) // 8}Q", padded)) % 2**64
        assert ckpt._sum64(memoryview(data)) == f"{expect:016x}"
    assert ckpt._sum64(b"\xff" * 16) == f"{2**64 - 2:016x}"  # wraps mod 2**64


def test_async_save_commits_on_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # async is CUDA-only; CPU tensors stand in
    model, opt = make()
    train(model, opt, range(1))
    path = ckpt.save(tmp_path, 1, model, opt, {"step": 1}, async_save=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, range(1))  # training goes on while it writes; the checkpoint keeps the staged copy
    ckpt.wait()
    assert ckpt.verify(path) == [] and open(tmp_path / "ckpt" / "latest").read() == "step-000001\n"
    monkeypatch.undo()
    model, opt = make()
    ckpt.load(path, model, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
