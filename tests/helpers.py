"""Plain helpers the tests share: the repo root, a free port, running train.py, reading its metrics."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the quick-run settings most training tests share: small, float32, every step logged
QUICK = ["config/tiny.py", "--dtype='float32'", "--log_interval=1", "--eval_iters=1", "--tensorboard=False",
         "--batch_size=4", "--block_size=64", "--warmup_iters=2"]


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


def assert_picture(path, min_size=(300, 200), max_bytes=200_000):
    """A PNG that matplotlib drew: a sensible size, small, and not blank (many colours, not one flat field)."""
    from PIL import Image
    assert os.path.getsize(path) <= max_bytes, (path, os.path.getsize(path))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1], (path, im.size)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) >= 20, (path, len(colours))
    assert max(n for n, _ in colours) < 0.97 * im.width * im.height, path  # something is drawn on the white
