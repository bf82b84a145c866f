"""Issue 26: two torchrun launchers on 127.0.0.1 are two nodes of 2 ranks each, training HSDP (fsdp=hybrid, 2
replicas x 2 shards) as on a cluster. On a shared out_dir, one run survives a hung rank (SIGSTOP) and a lost node
(kill -9 of a launcher and its ranks, then started again) with every loss of a 4-rank single-launcher run. With an
out_dir per node, a run mirrors to S3, rolls back from it, exports, and a fresh node resumes from it; without the
remote, the same out_dirs are refused at startup, untouched."""
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import QUICK, ROOT, free_port, read_jsonl, run_train, train_losses

pytestmark = pytest.mark.slow  # real launchers, 4 gloo ranks on 2 cores
STEPS = 16
TIMEOUT_MIN = 0.2  # dist_timeout: a collective fails after 12 s
# 4 ranks x batch 1 = QUICK's batch of 4; checkpoints at 4, 8, 12, 16
HSDP = [f"--max_iters={STEPS}", "--eval_interval=4", "--ckpt_interval=4", "--batch_size=1", "--fsdp='hybrid'",
        "--hsdp_shard_size=2", f"--dist_timeout={TIMEOUT_MIN}"]


def args(out, tiny_data, *extra):
    return [*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", *HSDP, *extra]


def launch(tmp_path, name, port, train_args, restarts=0, env=None, nproc=2):
    """One node: a torchrun of nproc ranks joining the c10d rendezvous at 127.0.0.1:port, every rank's output in
    its own files under tmp_path/name-logs (--log-dir), its stdout also in tmp_path/name.log. A rank that fails
    gives the others 5 s to say why before torchrun kills them (--shutdown-timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mn", f"--max-restarts={restarts}",
           "--shutdown-timeout=5", f"--log-dir={tmp_path / (name + '-logs')}", "--redirects=3", "--tee=1", "train.py",
           *train_args]
    # a store per attempt, so a node started again joins the others (slurm/train.sbatch sets it too)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    with open(tmp_path / f"{name}.log", "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def two_nodes(tmp_path, train_args, restarts=0, env=None, names=("a", "b"), nproc=2):
    """Launcher a first: it hosts the rendezvous, so it is the node that is never lost here (as node 0 under Slurm)."""
    port = free_port()
    a = launch(tmp_path, names[0], port, train_args(0), restarts, env, nproc)
    wait_for(lambda: listening(port), "launcher a's rendezvous", [a], tmp_path)
    return port, a, launch(tmp_path, names[1], port, train_args(1), restarts, env, nproc)


def listening(port):
    r = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


def wait_for(cond, what, procs, tmp_path, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a launcher ended before {what}:\n{console(tmp_path)[-4000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{console(tmp_path)[-4000:]}"
        time.sleep(0.05)


def console(tmp_path):
    return "".join(f"== {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.log")))


def ranks(launcher):
    """{global rank: pid} of a launcher's running workers."""
    pids = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    out = {}
    for pid in map(int, pids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            out[int(env[b"RANK"])] = pid  # a worker that just exited is not one
    return out


def rank_errors(tmp_path, name, attempt):
    """{local rank: stderr.log text} of one attempt of a launcher (torchrun --log-dir: run/attempt_N/LOCAL_RANK)."""
    files = glob.glob(str(tmp_path / f"{name}-logs" / "mn_*" / f"attempt_{attempt}" / "*" / "stderr.log"))
    return {int(f.split(os.sep)[-2]): open(f).read() for f in files}


def rank_stdout(tmp_path, name, attempt, local_rank=0):
    """The lines of one rank's stdout.log so far ([] before it starts)."""
    files = glob.glob(str(tmp_path / f"{name}-logs" / "mn_*" / f"attempt_{attempt}" / str(local_rank) / "stdout.log"))
    return open(files[0]).read().splitlines() if files else []


def last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    lines = open(path).read().split("\n")[:-1] if os.path.exists(path) else []
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def finish(procs, tmp_path, timeout=300):
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        kill(procs)
    assert all(p.returncode == 0 for p in procs), console(tmp_path)[-6000:]


def kill(procs, *pids):
    """Leave nothing running: these pids, then each launcher's workers, then the launcher."""
    for pid in [*pids, *(q for p in procs if p.poll() is None for q in [*ranks(p).values(), p.pid])]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def test_hsdp_two_launchers_survive_a_hung_rank_and_a_lost_node(tmp_path, tiny_data):
    ref = str(tmp_path / "ref")
    run_train(args(ref, tiny_data), nproc=4)  # one launcher, 4 ranks: the same mesh (2 x 2)
    out = str(tmp_path / "shared")
    port, a, b = two_nodes(tmp_path, lambda node: args(out, tiny_data), restarts=3)
    procs, victim = [a, b], None
    try:
        # 1. a hung rank: SIGSTOP rank 3 (not rank 0, whose process holds the store) after the checkpoint at 4
        wait_for(lambda: max(steps_logged(out), default=0) >= 6, "step 6", procs, tmp_path)
        assert sorted(ranks(a)) == [0, 1], ranks(a)  # the rendezvous ranks nodes by pid: a, started first, is node 0
        victim = ranks(b)[3]
        t0 = time.time()
        os.kill(victim, signal.SIGSTOP)

        def errors():  # the other three ranks' errors, each in its own log
            return [t for n in ("a", "b") for t in rank_errors(tmp_path, n, 0).values() if "error: " in t]
        wait_for(lambda: len(errors()) == 3, "the other ranks' errors", procs, tmp_path)
        took, errs = time.time() - t0, errors()
        print(f"the other ranks named rank 3 {took:.1f}s after its SIGSTOP (dist_timeout {TIMEOUT_MIN * 60:.0f}s)")
        assert took < TIMEOUT_MIN * 60 + 15, took  # within the timeout, plus the heartbeat check and slack
        for text in errs:
            assert "Traceback" not in text, text  # one line, not a traceback per rank
            line = last_line(text)
            assert line.startswith("error: rank 3 (") and "stopped answering" in line and "; on rank " in line, line
        # torchrun restarts both nodes from the newest checkpoint
        wait_for(lambda: console(tmp_path).count("resumed from ") >= 1 and max(steps_logged(out)) >= 10
                 and steps_logged(out)[-1] >= 10, "the restarted run past step 10", procs, tmp_path)
        # 2. a lost node: kill -9 launcher b and its ranks, then start it again
        lost = ranks(b)
        assert sorted(lost) == [2, 3], lost
        for pid in [b.pid, *lost.values()]:
            os.kill(pid, signal.SIGKILL)
        b.wait()
        t0 = time.time()
        time.sleep(1)
        b2 = launch(tmp_path, "b2", port, args(out, tiny_data), restarts=3)
        procs = [a, b2]
        wait_for(lambda: any(line.startswith("resumed from ") for line in rank_stdout(tmp_path, "a", 2)),
                 "the resume after the node came back", procs, tmp_path)
        print(f"node b killed and started again 1s later: resumed {time.time() - t0:.1f}s after the kill")
        finish(procs, tmp_path)
    finally:
        kill(procs, *([victim] if victim else []))  # torchrun killed the stopped rank, unless the test failed first
    # the ranks of node a named node b's ranks, in one line each
    for text in rank_errors(tmp_path, "a", 1).values():
        line = last_line(text)
        assert "stopped answering" in line and all(f"rank {r} (" in line for r in lost), line
    # every loss is the single launcher's; each resume's first step follows its checkpoint
    ref_losses, losses = train_losses(ref), train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == ref_losses, {s: (losses[s], ref_losses[s]) for s in losses if losses[s] != ref_losses[s]}
    for attempt in (1, 2):  # rank 0's own log of each restart: it resumed, and went on with the next step
        lines = rank_stdout(tmp_path, "a", attempt)
        resumed = [line for line in lines if line.startswith("resumed from ")]
        first = next(int(line.split()[1]) for line in lines if line.startswith("step "))
        assert len(resumed) == 1 and first == int(resumed[0].rsplit(" ", 1)[1]) + 1, lines


def test_hsdp_without_a_shared_disk(tmp_path, tiny_data, s3):
    url = "s3://ckpts/multinode"
    nodes = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    def mirrored(node):  # a NaN at step attempt 10 with max_skips=1 rolls back: to what only the remote holds whole
        return args(nodes[node], tiny_data, f"--remote={url}", "--fault_nan_steps=[10]", "--max_skips=1")
    _, a, b = two_nodes(tmp_path, mirrored, env=s3.env)
    finish([a, b], tmp_path)
    master = next(n for n in nodes if os.path.exists(os.path.join(n, "metrics.jsonl")))
    rollbacks = [r for r in read_jsonl(os.path.join(master, "metrics.jsonl")) if r.get("event") == "rollback"]
    assert len(rollbacks) == 1 and "back to step-000008" in rollbacks[0]["reason"], rollbacks
    assert f"remote: downloading {url}/ckpt/step-000008" in console(tmp_path)
    assert train_losses(master)[STEPS] > 0 and os.path.isfile(os.path.join(master, "best", "config.json"))
    def shards(node):
        return sorted(os.path.basename(p)[:11] for p in glob.glob(os.path.join(node, "ckpt", "step-000016", "shard-*")))
    other = nodes[1 - nodes.index(master)]
    assert shards(other) == ["shard-00003", "shard-00004"]  # each node committed its own ranks' shards
    assert len(shards(master)) == 4  # the export completed rank 0's copy from the remote

    # the same out_dirs without the remote (one rank a node will do): refused at startup, in one line on every
    # rank, nothing touched
    def snapshot():
        files = [p for n in nodes for p in glob.glob(f"{n}/**", recursive=True) if os.path.isfile(p)]
        return {p: (os.path.getsize(p), os.path.getmtime(p)) for p in files}
    before = snapshot()
    _, c, d = two_nodes(tmp_path, lambda node: args(nodes[node], tiny_data, "--max_iters=20"), names=("c", "d"),
                        nproc=1)
    for p in (c, d):
        assert p.wait(120) != 0
    assert snapshot() == before
    errs = [(node, t) for node, n in enumerate(("c", "d")) for t in rank_errors(tmp_path, n, 0).values()]
    assert len(errs) == 2
    for node, text in errs:
        assert text.count("\n") == 1, text  # one line
        assert text.startswith(f"error: out_dir {nodes[node]} is not one shared directory: rank 1 does not see the "
                               f"file rank 0 wrote there"), text
        assert "put out_dir on a filesystem every node mounts, or set remote=" in text, text
    # torchrun's summary shows the first failed rank's traceback (its error file, by train.py's `record`), once
    summary = (tmp_path / "c.log").read_text()
    assert "Root Cause (first observed failure)" in summary and summary.count("CheckpointError: out_dir") == 1, summary

    # a fresh node: an empty out_dir, the remote, one process
    fresh = str(tmp_path / "fresh")
    r = run_train([*args(fresh, tiny_data, f"--remote={url}", f"--max_iters={STEPS + 2}"), "--batch_size=4"],
                  env=s3.env)
    assert f"remote: downloading {url}/ckpt/step-000016" in r.stdout
    assert f"resumed from {fresh}/ckpt/step-000016 at step {STEPS}" in r.stdout
    assert sorted(train_losses(fresh)) == [STEPS + 1, STEPS + 2]
