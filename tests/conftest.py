"""Shared fixtures: one small prepared corpus and one trained tiny run serve the whole suite."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by test processes: oversubscription costs 2x

import json
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, nproc=1, check=True, timeout=600, env=None):
    """Run train.py as a user would: plain python for one process, torchrun for several."""
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train.py", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "loss" in r}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic corpus with a trained BPE tokenizer, prepared once through data/prepare.py."""
    from data.prepare import prepare
    out = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare(["synthetic:600"], out=out, train_tokenizer=512)
    return out


# the quick-run settings most training tests share: small, float32, every step logged
QUICK = ["config/tiny.py", "--dtype='float32'", "--log_interval=1", "--eval_iters=1", "--tensorboard=False",
         "--batch_size=4", "--block_size=64", "--warmup_iters=2"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The README's `python train.py config/tiny.py`, data preparation included, in a temporary place;
    its checkpoints serve the monitor, ckpt and validate tests."""
    root = tmp_path_factory.mktemp("run")
    out = str(root / "tiny")
    run_train(["config/tiny.py", f"--out_dir={out}", f"--data_dir={root / 'data'}"], timeout=1200)  # ~8 min here
    return out
