"""Sharded safetensors training checkpoints: atomic, verified, reshardable. Storage only: nothing here knows
the model (python -m model.export gives it a shape). remote.py builds on this module's public functions: it mirrors
checkpoints to object storage and runs the command line below.

Usage (a URL works wherever a dir does for ls and verify: s3://, gs://, az://, file://):
  python ckpt.py ls OUT_DIR                      # one row per checkpoint under OUT_DIR/ckpt
  python ckpt.py verify CKPT                     # exit 0 only if the checkpoint is complete
  python ckpt.py push CKPT URL | pull URL OUT_DIR   # copy one to / from a remote run root
  python ckpt.py pack CKPT OUT.tar.zst | unpack ARCHIVE DIR   # .tar.zst, .tar.gz, .tar.bz2, .tar.xz

Layout:
  {out_dir}/ckpt/step-000123/
    shard-0000R-model-00001-of-00001.safetensors   rank R-1's model + optimizer tensors (DCP, HF storage
                                                   layout: keys model.<fqn>, optim.<fqn>.<exp_avg|...>)
    train_state.json                               what train.py passed + "ckpt": RNG of every rank, optimizer
                                                   param_groups, world size, metric
    manifest.json                                  size + xxh3_64 per 32 MiB of every other file, the metric and
                                                   whether higher is better; written last
  {out_dir}/ckpt/latest                            name of the newest committed checkpoint (atomic replace)

No pickle on disk: shapes, dtypes and shard offsets live in each safetensors header, from which
HuggingFaceStorageReader rebuilds DCP's metadata; every non-tensor is JSON. The checksum guards against accidents,
not an attacker. Version 1 manifests hold sum64 (blind to reordered words); they still verify. Nodes need not share
a disk: each commits its own ranks' files, and a remote holds the whole. Collective: save, load, find_resume, wait,
unshared_ranks, require_shared.
"""
import errno
import json
import math
import mmap
import os
import posixpath
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
from safetensors import SafetensorError
from safetensors.torch import save_file
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.futures import Future
import xxhash


class CheckpointError(RuntimeError):
    pass


STEP_RE = re.compile(r"^step-(\d+)$")
RETRIES = 4  # attempts for transient I/O errors, backoff 0.5s, 1s, 2s
CHUNK = 32 << 20  # the manifest keeps a checksum per 32 MiB, so checksumming runs on all cores
LOCAL = fsspec.filesystem("file")  # verify and list read a local dir and a remote one through the same calls
_POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
_pending = None  # finish() of an async save still writing: wait for its files, then commit
_async_group = None  # gloo group, so async writes never share a stream with training collectives


def _free_bytes(path):
    return shutil.disk_usage(path).free  # tests monkeypatch this to simulate a full disk


# -- small helpers: ranks, collectives, checksums, files ---------------------------------------------------------------

def rank_world():
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj):
    """Every rank's obj, in rank order (collective); [obj] in one process."""
    if rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _retry(fn, what):
    """Run fn, retrying transient OSErrors with backoff; a full disk is not transient."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except OSError as e:
            if e.errno == errno.ENOSPC or attempt == RETRIES - 1:
                raise CheckpointError(f"{what} failed: {e}") from e
            time.sleep(0.5 * 2**attempt)


def _sum64(buf):
    words = np.frombuffer(buf, dtype="<u8", count=len(buf) // 8)
    tail = int.from_bytes(bytes(buf[len(words) * 8:]), "little")
    return f"{(int(words.sum(dtype=np.uint64)) + tail) % 2**64:016x}"


DIGESTS = {"xxh3": xxhash.xxh3_64_hexdigest, "sum64": _sum64}  # a manifest entry's key names its checksum


def _sums(path, parallel=True, algo="xxh3", fs=None):
    """Checksums of each CHUNK of a local file, on the thread pool unless not parallel; streamed from fs if given."""
    if fs is not None:
        with fs.open(path, "rb", block_size=CHUNK) as f:
            return [DIGESTS[algo](c) for c in iter(lambda: f.read(CHUNK), b"")]
    size = os.path.getsize(path)
    if size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            return list((_POOL.map if parallel else map)(lambda o: DIGESTS[algo](view[o:o + CHUNK]),
                                                         range(0, size, CHUNK)))
        finally:
            view.release()


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# -- DCP's internals ---------------------------------------------------------------------------------------------------
# The one place that reaches inside DCP. The stock HuggingFaceStorageWriter serialises a rank's whole shard to
# bytes before writing (bench.py's ckpt/writer row: 6x slower here); _Writer writes with save_file straight from
# the tensors and checksums while the file is fsynced. Its files must be named and headed as the stock writer's for
# HuggingFaceStorageReader, so the names and keys are DCP's own, imported, never retyped.
from torch.distributed.checkpoint._hf_utils import (  # noqa: E402
    CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY, FORMAT_VALUE, HF_DCP_VERSION, SAVED_OFFSETS_KEY, _gen_file_name)
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402


class _Writer(HuggingFaceStorageWriter):
    """DCP's HF-format writer with each rank file written by safetensors.save_file straight from the tensors,
    fsynced, then checksummed for the manifest."""

    def __init__(self, path):
        super().__init__(path, save_distributed=True)
        self.sums = {}

    def write_data(self, plan, planner):
        results = []
        if plan.items:  # ranks whose tensors DCP deduplicated away write no file
            name = _gen_file_name(1, 1, plan.storage_data["shard_index"])
            path = os.path.join(self.path, name)
            tensors, offsets = {}, {}
            for item in plan.items:
                t = planner.resolve_data(item).detach().cpu().contiguous()
                if type(t) is not torch.Tensor:  # a subclass wrapping plain values (torchao's float8 weights)
                    t, subclass = torch.empty(t.shape, dtype=t.dtype), t
                    t.copy_(subclass)  # the subclass's copy_ writes its values into the plain tensor
                if t.untyped_storage().nbytes() != t.nbytes:  # a view (e.g. of FSDP padding): own storage
                    t = t.clone()
                tensors[item.index.fqn] = t
                offsets[item.index.fqn] = {SAVED_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                results.append(WriteResult(index=item.index, size_in_bytes=t.nbytes,
                                           storage_data=_StorageInfo(name, 0, t.nbytes)))
            try:
                save_file(tensors, path, metadata={CUSTOM_METADATA_KEY: json.dumps(offsets),
                                                   DCP_VERSION_KEY: str(HF_DCP_VERSION), FORMAT_KEY: FORMAT_VALUE})
            except SafetensorError as e:  # its I/O errors carry the errno only in the text
                m = re.search(r"os error (\d+)", str(e))
                raise OSError(int(m.group(1)) if m else errno.EIO, str(e)) from None
            synced = _POOL.submit(_fsync_file, path)  # checksum from the page cache while the disk flushes
            self.sums[name] = {"size": os.path.getsize(path), "xxh3": _sums(path)}
            synced.result()
        future = Future()
        future.set_result(results)
        return future


# -- RNG states as JSON lists ------------------------------------------------------------------------------------------

def _rng_state():
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _state(model, optimizer):
    """Tensors go to DCP, optimizer param_groups to JSON. -> (tensors, param_groups, whether the optimizer has
    state yet)"""
    had_state = bool(optimizer.state)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if not had_state:
        optimizer.state.clear()  # get_state_dict ran a zero-lr step to create state; undo it (bit-exact)
    tensors = {"model": model_sd}
    if had_state:
        for fqn, per_param in optim_sd["state"].items():
            for k, v in per_param.items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"optimizer state {fqn}.{k} is not a tensor; only tensor state is supported")
        tensors["optim"] = optim_sd["state"]
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim_sd["param_groups"]]
    bad = [k for g in groups for k, v in g.items() if isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"optimizer param_group '{bad[0]}' is a tensor; use a float")
    return tensors, groups, had_state


def _local_bytes(tree):
    if isinstance(tree, dict):
        return sum(_local_bytes(v) for v in tree.values())
    local = tree.to_local() if hasattr(tree, "to_local") else tree
    return local.numel() * local.element_size()


# -- one out_dir, or one per node --------------------------------------------------------------------------------------

def unshared_ranks(path):
    """Ranks that do not see rank 0's dir `path` (collective; every rank gets the same list): rank 0 writes a
    probe file there, and every rank looks for it in its own `path`. Nodes without a shared disk are listed."""
    rank, world = rank_world()
    if world == 1:
        return []
    os.makedirs(path, exist_ok=True)
    name = f".shared-{uuid.uuid4().hex}"  # a new name: no client cache of a network filesystem knows it yet
    if rank == 0:
        open(os.path.join(path, name), "w").close()
    seen = gather(os.path.exists(os.path.join(path, gather(name)[0])))  # the first gather: rank 0 has written it
    if rank == 0:
        os.remove(os.path.join(path, name))
    return [r for r, ok in enumerate(seen) if not ok]


def require_shared(out_dir):
    """Raise CheckpointError unless every rank sees rank 0's out_dir (collective): without a remote mirror, each
    node would hold only its own ranks' shard files, so no checkpoint could be loaded or exported."""
    apart = unshared_ranks(out_dir)
    if apart:
        who = (f"rank {apart[0]} does" if len(apart) == 1 else "ranks " + ", ".join(map(str, apart[:8]))
               + (f" and {len(apart) - 8} more" if len(apart) > 8 else "") + " do")
        raise CheckpointError(f"out_dir {out_dir} is not one shared directory: {who} not see the file rank 0 wrote "
                              f"there, so no node would hold a whole checkpoint; put out_dir on a filesystem every "
                              f"node mounts, or set remote= to an object store URL (s3://, gs://, az://) that every "
                              f"checkpoint is mirrored to")


# -- save --------------------------------------------------------------------------------------------------------------

def save(out_dir, step, model, optimizer, train_state, metric=None, higher_is_better=False, keep_last=3, keep_best=1,
         async_save=False):
    """Save a checkpoint of step `step` under {out_dir}/ckpt; returns its final path (collective). train_state
    must be JSON-able; metric ranks checkpoints for keep_best (None: unranked) in the direction higher_is_better
    says. async_save (CUDA only, else ignored) returns once tensors are staged to CPU; the next save() or wait()
    commits. Raises CheckpointError; the previous checkpoint is never touched."""
    wait()
    rank, world = rank_world()
    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    os.makedirs(root, exist_ok=True)
    tensors, groups, had_state = _state(model, optimizer)
    info = gather({"rng": _rng_state(), "bytes": _local_bytes(tensors), "free": _free_bytes(root)})
    need = int(sum(i["bytes"] for i in info) * 1.01) + (64 << 10) * world  # + headers, JSON with RNG states
    free = min(i["free"] for i in info)
    if free < need:
        raise CheckpointError(f"not enough disk space in {root}: checkpoint needs ~{need / 1e6:.1f} MB, "
                              f"{free / 1e6:.1f} MB free; free space or lower keep_last")
    metric = None if metric is None else float(metric)
    state = dict(train_state, ckpt={"rng": [i["rng"] for i in info], "param_groups": groups,
                                    "optim_state": had_state, "world_size": world, "metric": metric})
    try:  # every rank checks, so no rank is left waiting for a rank 0 that failed
        json.dumps(state)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"train_state is not JSON-able: {e}") from e
    # rank 0 commits, and so does the first rank of each node that does not see rank 0's out_dir
    apart = rank in unshared_ranks(root)
    committer = rank == 0 or (apart and int(os.environ.get("LOCAL_RANK", 0)) == 0)
    if committer:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    writer = _Writer(tmp)

    def cleanup():
        if committer:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit():
        results, err = gather(writer.sums), None
        if committer:
            files = {k: v for sums in results for k, v in sums.items()}
            try:
                _retry(lambda: _commit(root, tmp, final, step, metric, higher_is_better, world, state, files),
                       f"committing {final}")
                _retain(root, final, keep_last, keep_best, higher_is_better)
            except CheckpointError as e:
                err = str(e)
        err = next((e for e in gather(err) if e), None)  # any committer's failure fails the save everywhere
        if err:
            cleanup()
            raise CheckpointError(err)

    if async_save and torch.cuda.is_available():
        global _pending, _async_group
        if world > 1 and _async_group is None:
            _async_group = dist.new_group(backend="gloo")
        future = _dcp_call(lambda: dcp.async_save(tensors, storage_writer=writer, process_group=_async_group),
                           f"staging {tmp}", cleanup)
        _pending = lambda: (_dcp_call(future.result, f"writing {tmp}", cleanup), commit())
        return final
    _dcp_call(lambda: _retry_dcp(lambda: dcp.save(tensors, storage_writer=writer)), f"writing {tmp}", cleanup)
    commit()
    return final


def saving():
    """Whether an async save is still being written (its checkpoint dir appears when wait() commits it)."""
    return _pending is not None


def wait():
    """Finish and commit an async save still in flight (collective; no-op if none). Call it once after the
    training loop when saving with async_save; save, load and find_resume call it first themselves."""
    global _pending
    if _pending is not None:
        finish, _pending = _pending, None
        finish()


def _retry_dcp(fn):
    """DCP gathers every rank's failure and raises on all ranks alike, so all ranks retry in step."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except dcp.api.CheckpointException as e:
            errors = [exc for exc, _ in e.failures.values()]
            transient = all(isinstance(x, OSError) and x.errno != errno.ENOSPC for x in errors)
            if not transient or attempt == RETRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def _dcp_call(fn, what, cleanup=None):
    """Run a DCP call; its CheckpointException (failures of all ranks) becomes a one-line CheckpointError."""
    try:
        with warnings.catch_warnings():  # DCP warns on every single-process call, a supported case here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn()
    except dcp.api.CheckpointException as e:
        exc = next(iter(e.failures.values()))[0]
        if cleanup is not None:
            cleanup()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{what} failed: disk full; free space or lower keep_last") from None
        raise CheckpointError(f"{what} failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _commit(root, tmp, final, step, metric, higher_is_better, world, state, files):
    """Rank 0: train state + manifest into tmp, fsync, rename, then point `latest` at it. Idempotent."""
    if os.path.isdir(tmp):
        path = os.path.join(tmp, "train_state.json")
        _write_durable(path, json.dumps(state))
        files["train_state.json"] = {"size": os.path.getsize(path), "xxh3": _sums(path)}
        manifest = {"version": 2, "step": step, "metric": metric, "higher_is_better": higher_is_better,
                    "world_size": world, "files": files}
        _write_durable(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):  # same step saved again (e.g. after resuming from an older checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    _write_durable(os.path.join(root, "latest.tmp"), os.path.basename(final) + "\n")
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _fsync_dir(root)


def read_manifest(path, fs=LOCAL):
    """Checkpoint `path`'s manifest.json, or {} when it is missing or unreadable."""
    try:
        return dict(json.loads(fs.cat_file(posixpath.join(path, "manifest.json"))))
    except (OSError, ValueError, TypeError):
        return {}


def listdir(path, fs=LOCAL):
    """Names in dir `path` on filesystem fs; [] when it is not a dir."""
    fs.invalidate_cache(path)  # object stores cache listings
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)] if fs.isdir(path) else []


def list_checkpoints(root, fs=LOCAL):
    """[(step, path, metric or None)] of committed checkpoint dirs under root, oldest first; never .tmp.
    On a remote (fs), a checkpoint without its manifest does not exist."""
    found = [(int(m.group(1)), posixpath.join(root, n), read_manifest(posixpath.join(root, n), fs))
             for n in listdir(root, fs) if (m := STEP_RE.match(n))]
    return sorted((step, path, man.get("metric")) for step, path, man in found if fs is LOCAL or man)


def kept(ckpts, final, keep_last, keep_best, higher_is_better):
    """Paths retention keeps: `final`, the newest keep_last and the best keep_best of ckpts."""
    keep = {final} | ({path for _, path, _ in ckpts[-keep_last:]} if keep_last > 0 else set())
    return keep | {path for _, _, path in best_first(ckpts, higher_is_better)[:keep_best]}


def best_first(ckpts, higher_is_better):
    """[(metric, step, path)] of the checkpoints with a finite metric, best first (the older of equals first).
    The one ranking of checkpoints: retention, `ls` and train.py's export of the best all use it."""
    scored = [(m, step, path) for step, path, m in sorted(ckpts) if isinstance(m, (int, float)) and math.isfinite(m)]
    return sorted(scored, key=lambda r: r[0], reverse=higher_is_better)  # stable: equals stay oldest first


def best_checkpoint(out_dir, higher_is_better):
    """Path of the best-ranked checkpoint under out_dir/ckpt, or None when none has a metric."""
    ranked = best_first(list_checkpoints(os.path.join(out_dir, "ckpt")), higher_is_better)
    return ranked[0][2] if ranked else None


def _retain(root, final, keep_last, keep_best, higher_is_better):
    """Keep `final`, the newest keep_last and the best keep_best; delete the rest and stale .tmp dirs
    (one save at a time, so any other .tmp is from a crash)."""
    ckpts = list_checkpoints(root)
    keep = kept(ckpts, final, keep_last, keep_best, higher_is_better)
    for _, path, _ in ckpts:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -- verify and resume -------------------------------------------------------------------------------------------------

def verify(path, fs=LOCAL):
    """Problems with checkpoint dir `path` (on filesystem fs), each naming the file; [] means complete and intact."""
    return _check(path, 0, 1, fs=fs)


def _check(path, part, nparts, only=None, parallel=True, fs=LOCAL):
    """Check manifest.json and its files: every part sees that each file is there with its size (a node without
    rank 0's disk may lack some), and checksums the files of slice [part::nparts] (ranks split the reading).
    only: check just these files of the manifest. parallel: checksum on the thread pool. fs: where path is."""
    if not fs.isdir(path):
        return [f"{path}: not a directory"]
    mpath = posixpath.join(path, "manifest.json")
    try:
        files = json.loads(fs.cat_file(mpath))["files"]
        algo = lambda e: "xxh3" if "xxh3" in e else "sum64"  # noqa: E731  version 1 manifests hold sum64
        entries = [(name, int(e["size"]), algo(e), list(e[algo(e)])) for name, e in sorted(files.items())]
    except FileNotFoundError:
        return [f"{mpath}: missing (save did not complete)"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{mpath}: unreadable ({type(e).__name__}: {e})"]
    problems = []
    if part == 0 and only is None:
        extra = sorted(set(listdir(path, fs)) - set(files) - {"manifest.json"})
        problems += [f"{posixpath.join(path, name)}: not in manifest" for name in extra]
    if part == 0 and "train_state.json" not in files:
        problems.append(f"{mpath}: lists no train_state.json")
    chosen = [e for e in entries if only is None or e[0] in only]
    reading = {e[0] for e in chosen[part::nparts]}
    for name, size, algo, sums in chosen:
        fpath = posixpath.join(path, name)
        if posixpath.basename(name) != name or name in ("", ".", ".."):
            problems.append(f"{mpath}: bad file name {name!r}")
        elif not fs.isfile(fpath):
            problems.append(f"{fpath}: missing")
        elif fs.size(fpath) != size:
            problems.append(f"{fpath}: size {fs.size(fpath)} != {size} in manifest (truncated?)")
        elif name in reading and _sums(fpath, parallel, algo, None if fs is LOCAL else fs) != sums:
            problems.append(f"{fpath}: checksum mismatch (corrupt)")
    return problems


def _verify_all(path):
    """verify() with the reading split across ranks (collective); each problem once."""
    rank, world = rank_world()
    return list(dict.fromkeys(p for ps in gather(_check(path, rank, world)) for p in ps))


def find_resume(out_dir, resume="auto"):
    """Checkpoint to resume from, or None (collective). resume: "auto" (the newest under {out_dir}/ckpt that
    verifies; skipped ones get a warning with the reason), "never", or a checkpoint path that must verify."""
    wait()  # an async save still writing becomes a candidate first
    if resume == "never":
        return None
    if resume != "auto":
        problems = _verify_all(resume)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"cannot resume from {resume}: {problems[0]}{more}")
        return resume
    for _, path, _ in reversed(list_checkpoints(os.path.join(out_dir, "ckpt"))):
        problems = _verify_all(path)
        if not problems:
            return path
        if rank_world()[0] == 0:
            warnings.warn(f"skipping checkpoint {path}: {problems[0]}", stacklevel=2)
    return None


# -- load --------------------------------------------------------------------------------------------------------------

def load(path, model, optimizer):
    """Load checkpoint `path` into model and optimizer (any world size), restore this rank's RNG; -> the train
    state (what save() got, plus "ckpt"). Collective. Checksums run beside the read, so a mismatch raises after it,
    with the model holding part of the checkpoint: call find_resume first (train.py does)."""
    wait()
    rank, world = rank_world()
    problems = [p for ps in gather(_check(path, 0, 1, only={"train_state.json"})) for p in ps]
    if problems:  # train_state.json first: its numbers shape the load
        raise CheckpointError(f"cannot load {path}: {problems[0]}")
    state = json.loads(LOCAL.cat_file(os.path.join(path, "train_state.json")))
    meta = state["ckpt"]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    if len(meta["param_groups"]) != len(optim_sd["param_groups"]):
        raise CheckpointError(f"{path} has {len(meta['param_groups'])} optimizer param groups, "
                              f"the optimizer has {len(optim_sd['param_groups'])}")
    tensors = {"model": model_sd}
    if meta["optim_state"]:
        tensors["optim"] = optim_sd["state"]
    reader = HuggingFaceStorageReader(path)
    with ThreadPoolExecutor(1) as ex:  # checksums on one other core while this one reads (measured faster than 2)
        check = ex.submit(lambda: _check(path, rank, world, parallel=False))
        try:
            _dcp_call(lambda: dcp.load(tensors, storage_reader=reader), f"loading {path}")
        finally:
            problems = [p for ps in gather(check.result()) for p in ps]  # a damaged file may be why DCP failed
            if problems:
                raise CheckpointError(f"cannot load {path}: {problems[0]}")
    groups = [{k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in saved.items()}
              for saved, cur in zip(meta["param_groups"], optim_sd["param_groups"])]
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors.get("optim", {}), "param_groups": groups})
    if not meta["optim_state"]:
        optimizer.state.clear()
    saved_world = meta["world_size"]
    if rank < saved_world:
        _set_rng_state(meta["rng"][rank])
    else:  # a rank the saving run did not have
        seed = 1_000_003 * state.get("step", 0) + rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
    if saved_world != world and rank == 0:
        extra = f"; ranks >= {saved_world} seed their RNG from (step, rank)" if world > saved_world else ""
        print(f"ckpt: {path} was saved by {saved_world} ranks, loading on {world}: "
              f"model and optimizer resharded{extra}")
    return state


# -- reading checkpoints outside training ------------------------------------------------------------------------------

def resolve(path):
    """The checkpoint or model dir `path` names: a run dir (or its ckpt/) means its newest checkpoint that verifies,
    as resume=auto picks it; a checkpoint or HF dir is itself. Raises CheckpointError when nothing usable is there."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; pass a training run dir, a checkpoint dir or an HF model dir")
    run = os.path.dirname(os.path.abspath(path)) if os.path.basename(os.path.abspath(path)) == "ckpt" else path
    if not list_checkpoints(os.path.join(run, "ckpt")):
        return path
    found = find_resume(run, "auto")
    if found is None:
        raise CheckpointError(f"no checkpoint under {os.path.join(run, 'ckpt')} verifies; see the warnings above")
    return found


def train_state(path):
    """train_state.json of checkpoint dir `path` (what train.py saved, plus "ckpt"); None for an HF model dir."""
    file = os.path.join(path, "train_state.json")
    try:
        return json.loads(LOCAL.cat_file(file)) if os.path.isfile(os.path.join(path, "manifest.json")) else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e}); the checkpoint is damaged") from None


if __name__ == "__main__":  # the command line reads URLs too, so it lives in remote.py, which builds on this module
    import remote
    sys.exit(remote.main())
