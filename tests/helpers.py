"""Plain helpers the tests share: the repo root, a free port, running train.py, reading its metrics, and the S3
server (SeaweedFS) that conftest.py's `s3` fixture starts."""
import json
import os
import socket
import subprocess
import sys
import time

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


# -- an S3 server on 127.0.0.1 -------------------------------------------------------------------------------------

S3_USER = {"identities": [{"name": "test", "credentials": [{"accessKey": "testkey", "secretKey": "testsecret"}],
                           "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}


def wait_port(port, proc, what, timeout=60):
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.time() < deadline, f"{what} did not listen on {port} within {timeout}s"
            time.sleep(0.1)


def stop(proc, timeout=10):
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class S3:
    """`weed mini` (SeaweedFS) bound to 127.0.0.1, telemetry off, with one identity and no bucket auto-creation;
    stop() and start() keep its data, as a server that goes down and comes back."""

    def __init__(self, tmp):
        self.dir, self.ports = str(tmp), {k: free_port() for k in ("master", "volume", "filer", "s3", "admin")}
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "s3.json"), "w") as f:
            json.dump(S3_USER, f)
        self.env = {"AWS_ACCESS_KEY_ID": "testkey", "AWS_SECRET_ACCESS_KEY": "testsecret",
                    "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{self.ports['s3']}", "AWS_DEFAULT_REGION": "us-east-1"}
        self.start()
        for attempt in range(100):  # the S3 gateway answers before the filer behind it is ready
            try:
                self.fs().mkdir("ckpts")
                break
            except Exception:
                time.sleep(0.2)

    def start(self):
        ports = [f"-{k}.port={p}" for k, p in self.ports.items()] + \
            [f"-{k}.port.grpc={p + 10000}" for k, p in self.ports.items()]
        self.proc = subprocess.Popen(
            ["weed", "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-s3.config={self.dir}/s3.json", "-s3.autoCreateBucket=false", *ports],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.ports["s3"], self.proc, "SeaweedFS")

    def fs(self):
        import s3fs
        return s3fs.S3FileSystem(key="testkey", secret="testsecret", endpoint_url=self.env["AWS_ENDPOINT_URL_S3"],
                                 skip_instance_cache=True)
