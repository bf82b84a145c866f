"""Issue 5 end to end through train.py: kill -9 and resume bit-exactly, corrupt checkpoints, reshard 2<->1,
a rank dying under torchrun --max-restarts, and retention. CPU, gloo, real processes, float32."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import QUICK, ROOT, free_port, read_jsonl, run_train, train_losses

import ckpt
from model.export import load_for_inference

pytestmark = pytest.mark.slow  # every test runs train.py, most under torchrun
STEPS = 12
# every step logged, evals and checkpoints every 4 steps: checkpoints at 4, 8, 12; half the documents rearranged for
# fill-in-the-middle (data/fim.py), which must resume as exactly as the rest
SCHEDULE = [f"--max_iters={STEPS}", "--eval_interval=4", "--ckpt_interval=4", "--fim_rate=0.5"]
TMP_RE = re.compile(r"^step-(\d+)\.tmp$")  # a checkpoint being written
TWO = ["--batch_size=2"]  # 2 ranks x 2 == 1 rank x 4 (QUICK): the same global batch


def args(out, tiny_data, *extra):
    return [*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", *SCHEDULE, *extra]


def torchrun(log, out, tiny_data, *extra, restarts=0):
    """Start a 2-rank run in the background, output to the file `log`; returns (launcher, worker pids)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--max-restarts={restarts}", "train.py",
           *args(out, tiny_data, *TWO, *extra)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    pids = []

    def started():
        pids[:] = workers(proc)
        return len(pids) == 2
    wait_for(started, "2 workers", proc, log)
    return proc, pids


def workers(proc):
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in children.split()]


def wait_for(cond, what, proc, log, timeout=180):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"run ended before {what}:\n{open(log).read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def steps_logged(out):
    """The newest step in metrics.jsonl of a run still writing it (a half-written last line is skipped)."""
    path = os.path.join(out, "metrics.jsonl")
    lines = open(path).read().split("\n")[:-1] if os.path.exists(path) else []
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def final_weights(out):
    model, _ = load_for_inference(os.path.join(out, "ckpt", f"step-{STEPS:06d}"))
    return model.state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


def resumed_from(log):
    lines = [line for line in log.splitlines() if line.startswith("resumed from ")]
    assert len(lines) == 1, log[-3000:]
    path = lines[0].split()[2]
    assert not path.endswith(".tmp")  # a .tmp directory is never loaded
    return path, int(lines[0].split()[-1])


@pytest.fixture(scope="module")
def ref2(tiny_data, tmp_path_factory):
    """The uninterrupted 2-rank run every resumed run must reproduce."""
    out = str(tmp_path_factory.mktemp("resume") / "ref2")
    run_train(args(out, tiny_data, *TWO), nproc=2)
    return out, train_losses(out), final_weights(out)


# -- 1. kill -9 the whole run, then resume=auto -------------------------------------------------------------------

@pytest.mark.parametrize("when", ["plain_step", "during_save"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, tiny_data, ref2, when):
    _, ref_losses, ref_weights = ref2
    out = str(tmp_path / "run")
    root = os.path.join(out, "ckpt")
    # checkpoints every step give many saves to catch in flight; saving must not change the losses
    extra = ["--ckpt_interval=1"] if when == "during_save" else []
    log = str(tmp_path / "killed.log")
    proc, pids = torchrun(log, out, tiny_data, *extra)
    if when == "plain_step":
        kill_at = random.randint(5, 7)  # after the checkpoint at 4, before the one at 8
        wait_for(lambda: steps_logged(out) >= kill_at, f"step {kill_at}", proc, log)
    else:
        kill_at = random.randint(3, 10)

        def saving():  # step-N.tmp exists, with N >= kill_at
            names = os.listdir(root) if os.path.isdir(root) else []
            return any(int(m.group(1)) >= kill_at for m in map(TMP_RE.match, names) if m)
        wait_for(saving, f"a checkpoint >= {kill_at} being written", proc, log)
    for pid in [proc.pid, *pids]:  # the whole run, as when a node loses power
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if when == "during_save":
        tmps = [int(m.group(1)) for m in map(TMP_RE.match, os.listdir(root)) if m]
        assert tmps, "the kill missed the save"  # the kill really left a partial checkpoint
    r = run_train(args(out, tiny_data, *TWO, *extra, "--resume=auto"), nproc=2)
    path, step = resumed_from(r.stdout)
    assert ckpt.STEP_RE.match(os.path.basename(path)) and step < STEPS
    if when == "during_save":
        assert step == max(tmps) - 1  # the newest committed one, not the partial one
    losses = train_losses(out)  # a later record of a step (after the resume) wins
    before = [s for s in range(1, step + 1) if losses[s] != ref_losses[s]]
    assert not before, f"steps {before} differ before any kill: run-to-run nondeterminism, not a resume bug"
    assert [losses[s] for s in range(step + 1, STEPS + 1)] == [ref_losses[s] for s in range(step + 1, STEPS + 1)]
    assert_same_weights(final_weights(out), ref_weights)


# -- 2. a corrupt newest checkpoint --------------------------------------------------------------------------------

def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)  # tensor data, not the header
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage, reason", [(truncate, "truncated?"), (flip_byte, "checksum mismatch (corrupt)")])
def test_corrupt_newest_checkpoint(tmp_path, tiny_data, ref2, damage, reason):
    out = str(tmp_path / "run")
    shutil.copytree(ref2[0], out)
    newest, previous = (os.path.join(out, "ckpt", f"step-{s:06d}") for s in (STEPS, 8))
    shard = os.path.join(newest, sorted(n for n in os.listdir(newest) if n.endswith(".safetensors"))[0])
    damage(shard)

    r = subprocess.run([sys.executable, "ckpt.py", "verify", newest], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and shard in r.stdout and reason in r.stdout

    # auto falls back to step 8, warns naming the skipped one; max_iters=8 means nothing is left to train
    r = run_train(args(out, tiny_data, "--max_iters=8", "--resume=auto"))
    assert f"skipping checkpoint {newest}: {shard}" in r.stderr
    assert resumed_from(r.stdout) == (previous, 8)

    r = run_train(args(out, tiny_data, f"--resume={newest}"), check=False)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0  # one line, no traceback
    assert r.stderr.startswith(f"error: cannot resume from {newest}: {shard}") and reason in r.stderr


# -- 3. reshard: 2 ranks -> 1 and 1 -> 2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref1(tiny_data, tmp_path_factory):
    """The uninterrupted single-process run."""
    out = str(tmp_path_factory.mktemp("resume") / "ref1")
    run_train(args(out, tiny_data))
    return out, train_losses(out)


def from_checkpoint(src_out, out, step):
    os.makedirs(os.path.join(out, "ckpt"))
    shutil.copytree(os.path.join(src_out, "ckpt", f"step-{step:06d}"), os.path.join(out, "ckpt", f"step-{step:06d}"))


@pytest.mark.parametrize("saved_by, resumed_on", [(2, 1), (1, 2)])
def test_reshard_continues_the_losses(tmp_path, tiny_data, ref1, ref2, saved_by, resumed_on):
    src, ref_losses = (ref2[0], ref2[1]) if saved_by == 2 else ref1
    out = str(tmp_path / "run")
    from_checkpoint(src, out, 4)
    r = run_train(args(out, tiny_data, *(TWO if resumed_on == 2 else [])), nproc=resumed_on)
    assert resumed_from(r.stdout)[1] == 4
    assert f"was saved by {saved_by} ranks, loading on {resumed_on}" in r.stdout
    losses = train_losses(out)
    assert sorted(losses) == list(range(5, STEPS + 1))
    assert max(abs(losses[s] - ref_losses[s]) for s in losses) <= 1e-5, (losses, ref_losses)


# -- 4. one rank dies; torchrun restarts the group -----------------------------------------------------------------

def test_one_rank_dies_torchrun_restarts(tmp_path, tiny_data, ref2):
    _, ref_losses, ref_weights = ref2
    out = str(tmp_path / "run")
    log = str(tmp_path / "run.log")
    proc, pids = torchrun(log, out, tiny_data, "--resume=auto", restarts=1)
    wait_for(lambda: steps_logged(out) >= 6 and ckpt.find_resume(out, "auto"), "a checkpoint and step 6", proc, log)
    os.kill(pids[1], signal.SIGKILL)  # one worker, not the launcher
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:  # leave no run behind: the restarted workers, then the launcher
        for pid in [*workers(proc), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the restarted group did not finish:\n{open(log).read()[-2000:]}") from None
    text = open(log).read()
    assert proc.returncode == 0, text[-3000:]
    path, step = resumed_from(text)
    assert step in (4, 8)
    assert train_losses(out) == ref_losses  # every step, the replayed ones included
    assert_same_weights(final_weights(out), ref_weights)


# -- 5. retention --------------------------------------------------------------------------------------------------

def test_retention_keeps_last_and_best(tmp_path, tiny_data):
    out = str(tmp_path / "run")
    # early_stop_mode=max ranks the *highest* val loss best: an old checkpoint, which keep_last alone would delete
    run_train(args(out, tiny_data, "--max_iters=6", "--eval_interval=1", "--ckpt_interval=1", "--keep_last=2",
                   "--keep_best=1", "--early_stop_mode=max", "--patience=0"))
    val = {r["step"]: r["val_loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "val_loss" in r}
    best = max(range(1, 7), key=lambda s: val[s])
    assert best < 5  # otherwise this test proves nothing
    kept = [step for step, _, _ in ckpt.list_checkpoints(os.path.join(out, "ckpt"))]
    assert kept == sorted({best, 5, 6})
    assert not [n for n in os.listdir(os.path.join(out, "ckpt")) if n.endswith(".tmp")]
    r = subprocess.run([sys.executable, "ckpt.py", "ls", out], cwd=ROOT, capture_output=True, text=True)
    rows = {int(line.split()[0]): line for line in r.stdout.splitlines()[1:]}
    assert r.returncode == 0 and sorted(rows) == kept
    assert rows[best].rstrip().endswith("best") and rows[6].rstrip().endswith("latest")
