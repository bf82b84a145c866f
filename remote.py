"""Checkpoints that leave the node: a mirror in object storage, and compressed archives.

  remote = "s3://bucket/runs/tiny"      # train.py: every committed checkpoint is mirrored there in the background
  python ckpt.py push out/tiny/ckpt/step-001500 s3://bucket/runs/tiny
  python ckpt.py pull s3://bucket/runs/tiny out/tiny           # the newest complete remote checkpoint
  python ckpt.py pack out/tiny/ckpt/step-001500 tiny.tar.zst   # or .tar.gz, .tar.bz2, .tar.xz
  python ckpt.py unpack tiny.tar.zst out/tiny/ckpt             # verified, then moved into place

A remote run root looks like an out_dir: {url}/ckpt/step-000123/... and {url}/ckpt/latest. Any fsspec URL works:
s3:// (s3fs), gs:// (gcsfs), az:// (adlfs), file://. Credentials come from each cloud's own environment and
configuration files (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*), never from our config.

Order is the contract: shard files first (each rank its own, so nodes need not share a disk), then
train_state.json, then manifest.json, then latest. A remote checkpoint without its manifest does not exist for
any reader here. A failed upload is retried by the backend's own retry policy only; then it is an event, never a
stop, and the next checkpoint's upload catches up.

This module builds on ckpt.py's public functions only, and ckpt.py never imports it; ckpt.py's command line
(main below) lives here because it reads URLs too.
"""
import argparse
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta

import fsspec
import torch.distributed as dist
import zstandard

import ckpt
from ckpt import CheckpointError


def _why(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def connect(url):
    """(filesystem, path) of a URL; an unknown scheme or a missing backend fails in one line."""
    if "://" not in url:
        raise CheckpointError(f"remote {url!r} is not a URL; use s3://bucket/prefix, gs://, az:// or file:///path")
    try:  # file:// creates its folders as object stores do; no cached client, whose credentials may be stale
        return fsspec.core.url_to_fs(url, skip_instance_cache=True,
                                     **({"auto_mkdir": True} if url.startswith("file://") else {}))
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"remote {url!r}: {_why(e)}; use s3://, gs://, az:// or file://") from None


def locate(path):
    """(filesystem, path) of a local dir or a URL: ckpt.py's ls and verify read either through the same calls."""
    return connect(path) if "://" in path else (ckpt.LOCAL, path)


def probe(url):
    """Write and delete one object under url, so wrong credentials or a missing bucket fail at startup."""
    fs, root = connect(url)
    path = posixpath.join(root, f".probe-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(path, b"probe")
        fs.rm_file(path)
    except Exception as e:  # each backend raises its own types
        raise CheckpointError(f"remote {url} is not writable ({_why(e)}); check that the bucket exists and the "
                              f"credentials in the environment") from None
    return fs, root


def _sizes_ok(fs, path):
    """Cheap completeness of a remote checkpoint: every file its manifest lists is there with its size."""
    files = ckpt.read_manifest(path, fs).get("files", {})
    try:
        return bool(files) and all(fs.size(posixpath.join(path, n)) == e["size"] for n, e in files.items())
    except (OSError, KeyError, TypeError):
        return False


def resolve(url, fs=None, root=None):
    """Remote path of the checkpoint a URL names: itself when it ends in step-N, else the newest complete one
    under {url}/ckpt (None when there is none)."""
    if fs is None:
        fs, root = connect(url)
    if ckpt.STEP_RE.match(posixpath.basename(root.rstrip("/"))):
        return root.rstrip("/")
    complete = [path for _, path, _ in ckpt.list_checkpoints(posixpath.join(root, "ckpt"), fs) if _sizes_ok(fs, path)]
    return complete[-1] if complete else None


# -- copying one checkpoint ---------------------------------------------------------------------------------------------

def _put(fs, path, dest, names):
    for name in names:
        fs.put_file(os.path.join(path, name), posixpath.join(dest, name))


def _publish(fs, path, dest):
    """The last steps of an upload, in the order that makes the checkpoint exist: state, manifest, latest."""
    _put(fs, path, dest, ["train_state.json", "manifest.json"])
    fs.pipe_file(posixpath.join(posixpath.dirname(dest), "latest"), (posixpath.basename(dest) + "\n").encode())


def _download(fs, src, final):
    """Copy remote checkpoint src into local dir `final` through a staging dir; verified before it replaces
    anything, so a failed or damaged download never takes the place of a checkpoint."""
    stage = f"{final}.pull-{uuid.uuid4().hex[:8]}"
    os.makedirs(stage)
    try:
        files = ckpt.read_manifest(src, fs).get("files")
        if not files:
            raise CheckpointError(f"{fs.unstrip_protocol(src)}: no readable manifest.json")
        for name in [*sorted(files), "manifest.json"]:
            if posixpath.basename(name) != name or name in (".", ".."):  # a manifest names files, never paths
                raise CheckpointError(f"{fs.unstrip_protocol(src)}/manifest.json: bad file name {name!r}")
            fs.get_file(posixpath.join(src, name), os.path.join(stage, name))
        problems = ckpt.verify(stage)
        if problems:
            raise CheckpointError(f"download of {fs.unstrip_protocol(src)} does not verify: {problems[0]}")
        if os.path.isdir(final) and not ckpt.verify(final):  # another node sharing this disk was first
            return final
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        if os.path.isdir(final):
            os.rename(final, old)  # an incomplete local copy (this node's ranks only)
        os.rename(stage, final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def push(path, url):
    """Upload local checkpoint `path` to run root `url`, in the mirror's order. -> remote URL of it"""
    problems = ckpt.verify(path)
    if problems:
        raise CheckpointError(f"cannot push {path}: {problems[0]}")
    fs, root = probe(url)
    dest = posixpath.join(root, "ckpt", os.path.basename(os.path.abspath(path)))
    shards = sorted(set(ckpt.read_manifest(path)["files"]) - {"train_state.json"})
    try:
        for i, name in enumerate(shards, 1):
            print(f"push: {name} ({os.path.getsize(os.path.join(path, name)) / 1e6:.1f} MB, {i}/{len(shards)})")
            _put(fs, path, dest, [name])
        _publish(fs, path, dest)
    except Exception as e:  # each backend raises its own types
        raise CheckpointError(f"push to {url} failed ({_why(e)}); nothing is published until all files are there")
    return f"{url.rstrip('/')}/ckpt/{posixpath.basename(dest)}"


def pull(url, out_dir):
    """Download the checkpoint `url` names (a step-N URL, or a run root: its newest complete checkpoint) into
    out_dir/ckpt, verified. -> local path"""
    fs, root = connect(url)
    src = resolve(url, fs, root)
    if src is None:
        raise CheckpointError(f"no complete checkpoint under {url}/ckpt")
    name = posixpath.basename(src)
    src_url = url.rstrip("/") if src == root.rstrip("/") else f"{url.rstrip('/')}/ckpt/{name}"
    t = time.time()
    try:
        final = _download(fs, src, os.path.join(out_dir, "ckpt", posixpath.basename(src)))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"pull of {src_url} failed ({_why(e)}); nothing was replaced")
    size = sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final))
    print(f"pull: {src_url} -> {final} ({size / 1e6:.1f} MB, {size / 1e6 / (time.time() - t):.1f} MB/s)")
    return final


# -- the mirror of a training run ---------------------------------------------------------------------------------------

@dataclass
class Mirror:
    """A run's remote and what its uploads did. The upload thread appends (step, event, reason) to events;
    rank 0's loop logs them."""
    url: str
    fs: object
    root: str
    keep_last: int
    keep_best: int
    higher_is_better: bool
    warn_after: int                     # consecutive failed uploads before a loud warning
    group: object = None                # gloo group: the uploads' one collective never meets training's
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    jobs: list = field(default_factory=list)
    events: list = field(default_factory=list)
    failures: int = 0
    newest: str = ""                    # the last checkpoint this run uploaded


def open_mirror(cfg):
    """The Mirror of train.py's cfg.remote, probed on every rank (a one-line error on all of them if any fails);
    retention as cfg.keep_last and cfg.keep_best rank local checkpoints."""
    err, fs, root = None, None, None
    try:
        fs, root = probe(cfg.remote)
    except CheckpointError as e:
        err = str(e)
    err = next((e for e in ckpt.gather(err) if e), None)
    if err:
        raise CheckpointError(err)
    world = ckpt.rank_world()[1]  # the uploads' group fails after dist_timeout too, as training's does
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=cfg.dist_timeout)) if world > 1 else None
    return Mirror(cfg.remote.rstrip("/"), fs, root.rstrip("/"), cfg.keep_last, cfg.keep_best,
                  cfg.early_stop_mode == "max", cfg.remote_warn_after, group)


def upload(m, path, step):
    """Mirror committed local checkpoint `path` in the background (every rank calls it; returns at once).
    -> the events of uploads finished since the last call: (step, event, reason) for the run's log"""
    m.jobs.append(m.pool.submit(_upload, m, path, step, len(m.jobs)))
    return events(m)


def _gather(m, obj):
    if m.group is None:
        return [obj]
    out = [None] * dist.get_world_size(m.group)
    dist.all_gather_object(out, obj, group=m.group)
    return out


def _upload(m, path, step, job):
    rank = ckpt.rank_world()[0]
    dest, t = posixpath.join(m.root, "ckpt", os.path.basename(path)), time.time()
    while ckpt.saving() and not os.path.isdir(path):  # an async save (CUDA) not committed yet
        time.sleep(0.5)
    err = "superseded" if len(m.jobs) > job + 1 else None  # a newer checkpoint is queued: it is what matters
    if err is None:
        try:  # rank r wrote shard-{r+1:05d}-*
            _put(m.fs, path, dest, sorted(n for n in os.listdir(path) if n.startswith(f"shard-{rank + 1:05d}-")))
        except Exception as e:
            err = _why(e) if os.path.isdir(path) else "superseded"  # local retention removed it meanwhile
    errs = [e for e in _gather(m, err) if e]
    failed = [e for e in errs if e != "superseded"]
    if rank != 0 or (errs and not failed):
        return
    if not errs:
        try:
            _publish(m.fs, path, dest)
            _retain(m, dest)
        except Exception as e:
            failed = [_why(e)]
    if failed:
        m.failures += 1
        m.events.append((step, "remote_failed", f"upload of {os.path.basename(path)} to {m.url}: {failed[0]}"))
        if m.failures % m.warn_after == 0:
            msg = (f"{m.failures} uploads in a row failed; the newest remote checkpoint is {m.newest or 'none'}. "
                   f"Training goes on; check {m.url}")
            print(f"WARNING: remote: {msg}", file=sys.stderr, flush=True)
            m.events.append((step, "remote_warning", msg))
        return
    if m.failures:
        m.events.append((step, "remote_recovered", f"{os.path.basename(path)} uploaded after {m.failures} failures"))
    m.failures, m.newest = 0, os.path.basename(path)
    print(f"remote: {os.path.basename(path)} -> {m.url}/ckpt ({time.time() - t:.1f}s)", flush=True)


def _retain(m, dest):
    """keep_last and keep_best on the remote too. A deleted checkpoint loses its manifest first, so no reader
    ever sees it half deleted; step dirs without a manifest are failed uploads."""
    root = posixpath.join(m.root, "ckpt")
    keep = ckpt.kept(ckpt.list_checkpoints(root, m.fs), dest, m.keep_last, m.keep_best, m.higher_is_better)
    for name in ckpt.listdir(root, m.fs):
        path = posixpath.join(root, name)
        if ckpt.STEP_RE.match(name) and path not in keep:
            if m.fs.exists(posixpath.join(path, "manifest.json")):
                m.fs.rm_file(posixpath.join(path, "manifest.json"))
            m.fs.rm(path, recursive=True)


def events(m):
    """(step, event, reason) of uploads finished since the last call."""
    out = []
    while m.events:
        out.append(m.events.pop(0))
    return out


def close(m):
    """Wait for the uploads still running (every rank). -> their events not yet taken"""
    for job in m.jobs:
        job.result()
    m.pool.shutdown()
    return events(m)


def complete(m, path):
    """Local checkpoint `path` when it verifies here, else its remote copy downloaded in its place (one process)."""
    if not ckpt.verify(path):
        return path
    return _download(m.fs, posixpath.join(m.root, "ckpt", os.path.basename(path)), path)


def restore(m, out_dir, local):
    """resume=auto and rollbacks: the newest complete remote checkpoint when it is newer than `local` (the newest
    local one that verifies, or None), downloaded into out_dir/ckpt and verified. Collective: rank 0 picks for every
    rank, once this run's uploads in flight are done. The first rank of each node downloads on a thread while all
    ranks meet once a second, so no collective ever waits on the download, whatever its length: the process
    group's timeout cannot fire. -> the path to load"""
    for job in m.jobs:  # a rollback may need the checkpoint still being uploaded
        job.result()
    rank = ckpt.rank_world()[0]
    src = resolve(m.url, m.fs, m.root) if rank == 0 else None
    local_step = int(ckpt.STEP_RE.match(os.path.basename(local)).group(1)) if local else -1
    src = ckpt.gather(src if src and int(ckpt.STEP_RE.match(posixpath.basename(src)).group(1)) > local_step
                      else None)[0]
    if src is None:
        return local
    final = os.path.join(out_dir, "ckpt", posixpath.basename(src))
    if rank == 0:
        print(f"remote: downloading {m.url}/ckpt/{posixpath.basename(src)} to {final}", flush=True)
    with ThreadPoolExecutor(1) as ex:
        job = ex.submit(_download, m.fs, src, final) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None
        while not all(ckpt.gather(job is None or bool(wait([job], timeout=1).done))):
            pass
        err = next((e for e in ckpt.gather(job and job.exception() and _why(job.exception())) if e), None)
    if err:
        raise CheckpointError(f"resume from {m.url}: {err}")
    return final


# -- archives -----------------------------------------------------------------------------------------------------------

FORMATS = {".tar.zst": None, ".tar.gz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz"}  # suffix -> tarfile's compression


def _format(path):
    for suffix, comp in FORMATS.items():
        if path.endswith(suffix):
            return suffix, comp
    raise CheckpointError(f"{path}: unknown archive type; name it .tar.zst, .tar.gz, .tar.bz2 or .tar.xz")


def pack(src, out):
    """Write dir `src` as one archive `out` (its top folder named as src), through a temporary file, so a failed
    pack never leaves a partial archive under the final name. -> out"""
    suffix, comp = _format(out)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            if comp is None:  # zstd on every core; tarfile streams into it
                with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(f, closefd=False) as z, \
                        tarfile.open(fileobj=z, mode="w|") as tar:
                    tar.add(src, arcname=os.path.basename(os.path.abspath(src)))
            else:
                with tarfile.open(fileobj=f, mode=f"w:{comp}") as tar:
                    tar.add(src, arcname=os.path.basename(os.path.abspath(src)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def unpack(archive, dest):
    """Extract a checkpoint archive into dest/<its step-N folder>: tarfile's "data" filter refuses absolute paths,
    "..", links out of the folder and device files; the checkpoint must verify before it is moved into place.
    -> the checkpoint's path"""
    _, comp = _format(archive)
    os.makedirs(dest, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".unpack-", dir=dest)
    try:
        with open(archive, "rb") as f:
            stream = zstandard.ZstdDecompressor().stream_reader(f) if comp is None else f
            with tarfile.open(fileobj=stream, mode="r|" if comp is None else f"r:{comp}") as tar:
                tar.extractall(stage, filter="data")
        tops = os.listdir(stage)
        if len(tops) != 1 or not ckpt.STEP_RE.match(tops[0]):
            raise CheckpointError(f"{archive}: holds {tops[:3]}, not one step-N checkpoint folder")
        problems = ckpt.verify(os.path.join(stage, tops[0]))
        if problems:
            raise CheckpointError(f"{archive}: the checkpoint does not verify: {problems[0]}")
        final = os.path.join(dest, tops[0])
        if os.path.exists(final):
            raise CheckpointError(f"{final} already exists; unpack into another dir or remove it")
        os.rename(os.path.join(stage, tops[0]), final)
        return final
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as e:
        raise CheckpointError(f"{archive}: not a complete, safe archive ({_why(e)})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# -- ckpt.py's command line ---------------------------------------------------------------------------------------------

def table(fs, out_dir):
    """ckpt.py ls: one row per checkpoint under out_dir/ckpt on filesystem fs, each verified."""
    root = posixpath.join(out_dir, "ckpt")
    ckpts, latest = ckpt.list_checkpoints(root, fs), posixpath.join(root, "latest")
    if not ckpts:
        raise CheckpointError(f"no checkpoints in {root}")
    latest = fs.cat_file(latest).decode().strip() if fs.isfile(latest) else None
    higher = bool(ckpt.read_manifest(ckpts[-1][1], fs).get("higher_is_better"))  # as the newest was saved
    ranked = ckpt.best_first(ckpts, higher)
    rows = [f"{'step':>8}  {'metric':>10}  {'size':>10}  {'verifies':<8}  flags"]
    for step, path, metric in ckpts:
        problems = ckpt.verify(path, fs)
        flags = [f for f, on in (("latest", posixpath.basename(path) == latest),
                                 ("best", bool(ranked) and step == ranked[0][1])) if on]
        size = sum(fs.size(posixpath.join(path, n)) for n in ckpt.listdir(path, fs))
        rows.append(f"{step:>8}  {'-' if metric is None else f'{metric:.4f}':>10}  {size / 1e6:>8.1f}MB  "
                    f"{'yes' if not problems else 'NO':<8}  {','.join(flags)}{'  ' + problems[0] if problems else ''}")
    return "\n".join(rows)


def command(a):
    """ckpt.py ls, push, pull, pack, unpack from their parsed arguments. -> what to print"""
    if a.cmd == "ls":
        return table(*locate(a.out_dir))
    if a.cmd == "push":
        return push(a.ckpt, a.url)
    if a.cmd == "pull":
        return pull(a.url, a.out_dir)
    if a.cmd == "unpack":
        return unpack(a.archive, a.dir)
    problems = ckpt.verify(a.ckpt)
    if problems:
        raise CheckpointError(f"cannot pack {a.ckpt}: {problems[0]}")
    return pack(a.ckpt, a.archive)


def main(argv=None):
    """python ckpt.py COMMAND ... (ckpt.py's usage): local dirs and URLs alike. -> exit status"""
    ap = argparse.ArgumentParser(prog="ckpt.py", description=ckpt.__doc__.split("\n\nLayout")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, help, args in [("ls", "table of the checkpoints under OUT_DIR/ckpt", ["out_dir"]),
                            ("verify", "check sizes and checksums; exit 0 only if complete", ["ckpt"]),
                            ("push", "upload checkpoint CKPT to run root URL, manifest last", ["ckpt", "url"]),
                            ("pull", "download URL's checkpoint (a run root: its newest) into OUT_DIR/ckpt",
                             ["url", "out_dir"]),
                            ("pack", "write checkpoint CKPT as one compressed archive", ["ckpt", "archive"]),
                            ("unpack", "extract ARCHIVE into DIR/step-N, safely, verified", ["archive", "dir"])]:
        p = sub.add_parser(cmd, help=help)
        for a in args:
            p.add_argument(a)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "verify":
            fs, path = locate(a.ckpt)
            problems = ckpt.verify(path, fs)
            print("\n".join(problems) if problems else f"{a.ckpt}: ok")
            return 1 if problems else 0
        print(command(a))
        return 0
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
