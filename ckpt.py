"""Sharded safetensors training checkpoints: atomic, verified, reshardable, exportable to HF.

Usage:
  python ckpt.py export CKPT OUT_DIR   # HF model dir: config, sharded safetensors + index, tokenizer
  python ckpt.py ls OUT_DIR            # one row per checkpoint under OUT_DIR/ckpt
  python ckpt.py verify CKPT           # exit 0 only if the checkpoint is complete

Layout:
  {out_dir}/ckpt/step-000123/
    shard-0000R-model-00001-of-00001.safetensors   rank R-1's model + optimizer tensors (DCP, HF storage
                                                   layout: keys model.<fqn>, optim.<fqn>.<exp_avg|...>)
    train_state.json                               what train.py passed + "ckpt": RNG of every rank, optimizer
                                                   param_groups, world size, metric
    manifest.json                                  size + sum64 per 32 MiB of every other file; written last
  {out_dir}/ckpt/latest                            name of the newest committed checkpoint (atomic replace)

No pickle on disk: DCP's pickled .metadata file is never written. The HF storage layout keeps shapes, dtypes
and shard offsets in each safetensors JSON header, and HuggingFaceStorageReader rebuilds DCP's metadata from
those headers, so loading parses only safetensors and JSON. Tensors are the only thing DCP stores; every
non-tensor (optimizer param_groups, RNG, train state) is JSON. (DCP still exchanges its plans between the
ranks of the running job with all_gather_object; that never touches a file.)
sum64 is the sum of a chunk's little-endian 64-bit words mod 2**64 (a short last word zero-padded). It catches
truncation, torn writes, any damage confined to one word and random damage elsewhere (a miss needs the damage to
sum to 0 mod 2**64), at memory speed: crc32 ran at a third of it and made loading slower than safetensors'
load_file. It misses reordered words within a chunk and guards against accidents, not an attacker:
safetensors + JSON already make a hostile file harmless to parse.

Collective: save, load, find_resume and wait must be called on every rank when a process group exists.
"""
import argparse
import errno
import json
import math
import mmap
import os
import random
import re
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import save_file
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint._hf_utils import _gen_file_name
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.futures import Future


class CheckpointError(RuntimeError):
    pass


STEP_RE = re.compile(r"^step-(\d+)$")
RETRIES = 4  # attempts for transient I/O errors, backoff 0.5s, 1s, 2s
CHUNK = 32 << 20  # the manifest keeps a sum64 per 32 MiB, so checksumming runs on all cores
_POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
_pending = None  # (future, commit) of an async save still writing
_verified = set()  # stat keys of checkpoints verified by this process: find_resume + load read the data once
_async_group = None  # gloo group, so async writes never share a stream with training collectives


def _free_bytes(path):
    """Free bytes on the filesystem of `path`. Tests monkeypatch this to simulate a full disk."""
    return shutil.disk_usage(path).free


# -------------------------------------------------------------------------------------------------
# small helpers: ranks, collectives, files


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj):
    if _rank_world()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if _rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if _rank_world()[1] > 1:
        dist.barrier()


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
    return (int(words.sum(dtype=np.uint64)) + tail) % 2**64


def _sums(path, parallel=True):
    """sum64 of each CHUNK of a file, on the thread pool (numpy releases the GIL) unless not parallel."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            sums = (_POOL.map if parallel else map)(lambda o: _sum64(view[o:o + CHUNK]), range(0, size, CHUNK))
            return [f"{c:016x}" for c in sums]
        finally:
            view.release()


def _file_entry(path):
    return {"size": os.path.getsize(path), "sum64": _sums(path)}


class _Writer(HuggingFaceStorageWriter):
    """DCP's HF-format writer with each rank file written by safetensors.save_file straight from the tensors
    (DCP's own path serialises a full copy in memory first), fsynced, then checksummed for the manifest."""

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
                if t.untyped_storage().nbytes() != t.nbytes:  # a view (e.g. of FSDP padding): own storage
                    t = t.clone()
                tensors[item.index.fqn] = t
                offsets[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
                results.append(WriteResult(index=item.index, size_in_bytes=t.nbytes,
                                           storage_data=_StorageInfo(name, 0, t.nbytes)))
            try:
                save_file(tensors, path, metadata={"DCP_SHARDING_INFO": json.dumps(offsets), "DCP_VERSION": "1.0",
                                                   "format": "pt"})
            except SafetensorError as e:  # its I/O errors carry the errno only in the text
                m = re.search(r"os error (\d+)", str(e))
                raise OSError(int(m.group(1)) if m else errno.EIO, str(e)) from None
            synced = _POOL.submit(_fsync_file, path)  # checksum from the page cache while the disk flushes
            self.sums[name] = _file_entry(path)
            synced.result()
        future = Future()
        future.set_result(results)
        return future


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


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# -------------------------------------------------------------------------------------------------
# RNG states as JSON lists


def _rng_state():
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": list(random.getstate()),
    }
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


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# -------------------------------------------------------------------------------------------------
# state: tensors go to DCP, optimizer param_groups go to JSON


def _state(model, optimizer):
    """-> (tensors for DCP, param_groups as JSON, whether the optimizer has state yet)."""
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
    groups = []
    for g in optim_sd["param_groups"]:
        for k, v in g.items():
            if isinstance(v, torch.Tensor):
                raise CheckpointError(f"optimizer param_group '{k}' is a tensor; use a float")
        groups.append({k: list(v) if isinstance(v, tuple) else v for k, v in g.items()})
    return tensors, groups, had_state


def _local_bytes(tree):
    if isinstance(tree, dict):
        return sum(_local_bytes(v) for v in tree.values())
    local = tree.to_local() if hasattr(tree, "to_local") else tree
    return local.numel() * local.element_size()


# -------------------------------------------------------------------------------------------------
# save


def save(out_dir, step, model, optimizer, train_state, metric=None, keep_last=3, keep_best=1, async_save=False):
    """Save a checkpoint of step `step` under {out_dir}/ckpt; returns its final path (collective).

    train_state must be JSON-able. metric: early-stopping metric, lower is better (None = not ranked).
    async_save (CUDA only, else ignored): returns once tensors are staged to CPU; the checkpoint is committed
    by the next save() or wait(). Raises CheckpointError; the previous checkpoint is never touched.
    """
    wait()
    rank, world = _rank_world()
    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    os.makedirs(root, exist_ok=True)
    tensors, groups, had_state = _state(model, optimizer)
    info = _gather({"rng": _rng_state(), "bytes": _local_bytes(tensors), "free": _free_bytes(root)})
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
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        os.makedirs(tmp)
    _barrier()

    def cleanup():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit():
        results, err = _gather(writer.sums), None
        if rank == 0:
            files = {k: v for sums in results for k, v in sums.items()}
            try:
                _retry(lambda: _commit(root, tmp, final, step, metric, world, state, files), f"committing {final}")
                _retain(root, final, keep_last, keep_best)
            except CheckpointError as e:
                err = str(e)
        err = _broadcast(err)
        if err:
            cleanup()
            raise CheckpointError(err)

    writer = _Writer(tmp)
    if async_save and torch.cuda.is_available():
        global _pending, _async_group
        if world > 1 and _async_group is None:
            _async_group = dist.new_group(backend="gloo")
        future = _dcp_call(lambda: dcp.async_save(tensors, storage_writer=writer, process_group=_async_group),
                           f"staging {tmp}", cleanup)
        _pending = (future, lambda: (_dcp_call(future.result, f"writing {tmp}", cleanup), commit()))
        return final
    _dcp_call(lambda: _retry_dcp(lambda: dcp.save(tensors, storage_writer=writer)), f"writing {tmp}", cleanup)
    commit()
    return final


def wait():
    """Finish and commit an async save still in flight (collective; no-op if none). Call it once after the
    training loop when saving with async_save; save, load and find_resume call it first themselves."""
    global _pending
    if _pending is not None:
        _, finish = _pending
        _pending = None
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
        with warnings.catch_warnings():
            # DCP warns on every single-process call; one process is a supported case here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn()
    except dcp.api.CheckpointException as e:
        exc = next(iter(e.failures.values()))[0]
        if cleanup is not None:
            cleanup()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{what} failed: disk full; free space or lower keep_last") from None
        raise CheckpointError(f"{what} failed: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def _commit(root, tmp, final, step, metric, world, state, files):
    """Rank 0: train state + manifest into tmp, fsync, rename, then point `latest` at it. Idempotent."""
    if os.path.isdir(tmp):
        path = os.path.join(tmp, "train_state.json")
        _write_durable(path, json.dumps(state))
        files["train_state.json"] = _file_entry(path)
        manifest = {"version": 1, "step": step, "metric": metric, "world_size": world, "files": files}
        _write_durable(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):  # same step saved again (e.g. after resuming from an older checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    _write_durable(os.path.join(root, "latest.tmp"), os.path.basename(final) + "\n")
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    _fsync_dir(root)


def list_checkpoints(root):
    """[(step, path, metric or None)] of committed checkpoint dirs under root, oldest first; never .tmp."""
    out = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = STEP_RE.match(name)
        if m:
            path = os.path.join(root, name)
            try:
                metric = _read_json(os.path.join(path, "manifest.json")).get("metric")
            except (OSError, ValueError, AttributeError):
                metric = None
            out.append((int(m.group(1)), path, metric))
    return sorted(out)


def by_metric(ckpts):
    """[(metric, step, path)] of the checkpoints with a finite metric, best (lowest) first."""
    return sorted((m, step, path) for step, path, m in ckpts if isinstance(m, (int, float)) and math.isfinite(m))


def best_checkpoint(out_dir):
    """Path of the checkpoint with the lowest metric under out_dir/ckpt, or None when none has one."""
    ranked = by_metric(list_checkpoints(os.path.join(out_dir, "ckpt")))
    return ranked[0][2] if ranked else None


def _retain(root, final, keep_last, keep_best):
    """Keep `final`, the newest keep_last and the best keep_best (lowest metric); delete the rest and stale
    .tmp dirs (one save at a time, so any other .tmp is from a crash)."""
    ckpts = list_checkpoints(root)
    keep = {final} | ({path for _, path, _ in ckpts[-keep_last:]} if keep_last > 0 else set())
    keep |= {path for _, _, path in by_metric(ckpts)[:keep_best]}
    for _, path, _ in ckpts:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.endswith(".tmp") and os.path.isdir(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# verify and resume


def verify(path):
    """Problems with checkpoint dir `path`, each naming the file; [] means complete and intact."""
    return _check(path, 0, 1)


def _check(path, part, nparts, only=None, parallel=True):
    """Check manifest.json and the files in slice [part::nparts] of it (ranks split the reading).
    only: check just these files of the manifest. parallel: checksum on the thread pool."""
    if not os.path.isdir(path):
        return [f"{path}: not a directory"]
    mpath = os.path.join(path, "manifest.json")
    try:
        files = _read_json(mpath)["files"]
        entries = [(name, int(e["size"]), list(e["sum64"])) for name, e in sorted(files.items())]
    except FileNotFoundError:
        return [f"{mpath}: missing (save did not complete)"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{mpath}: unreadable ({type(e).__name__}: {e})"]
    problems = []
    if part == 0 and only is None:
        extra = sorted(set(os.listdir(path)) - set(files) - {"manifest.json"})
        problems += [f"{os.path.join(path, name)}: not in manifest" for name in extra]
    if part == 0 and "train_state.json" not in files:
        problems.append(f"{mpath}: lists no train_state.json")
    if only is not None:
        entries = [e for e in entries if e[0] in only]
    for name, size, sums in entries[part::nparts]:
        fpath = os.path.join(path, name)
        if os.path.basename(name) != name:
            problems.append(f"{mpath}: bad file name {name!r}")
        elif not os.path.isfile(fpath):
            problems.append(f"{fpath}: missing")
        elif os.path.getsize(fpath) != size:
            problems.append(f"{fpath}: size {os.path.getsize(fpath)} != {size} in manifest (truncated?)")
        elif _sums(fpath, parallel) != sums:
            problems.append(f"{fpath}: checksum mismatch (corrupt)")
    return problems


def _stat_key(path):
    try:
        return os.path.realpath(path), tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.stat().st_ino)
                                                    for e in os.scandir(path)))
    except OSError:
        return None


def _verify_all(path):
    """verify() with the reading split across ranks (collective). Skips the reading when this process
    verified the same files (same names, sizes, mtimes, inodes) before."""
    rank, world = _rank_world()
    key = _stat_key(path)
    problems = [p for ps in _gather([] if key in _verified else _check(path, rank, world)) for p in ps]
    if not problems and key is not None:
        _verified.add(key)
    return problems


def find_resume(out_dir, resume="auto"):
    """Checkpoint to resume from, or None (collective). resume: "auto" | "never" | a checkpoint path.

    auto: the newest checkpoint under {out_dir}/ckpt that verifies; skipped ones get a warning with the reason.
    A path must verify, else CheckpointError.
    """
    wait()  # an async save still writing becomes a candidate first
    if resume == "never":
        return None
    if resume != "auto":
        problems = _verify_all(resume)
        if problems:
            raise CheckpointError(f"cannot resume from {resume}: {problems[0]}"
                                  + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        return resume
    for _, path, _ in reversed(list_checkpoints(os.path.join(out_dir, "ckpt"))):
        problems = _verify_all(path)
        if not problems:
            return path
        if _rank_world()[0] == 0:
            warnings.warn(f"skipping checkpoint {path}: {problems[0]}", stacklevel=2)
    return None


# -------------------------------------------------------------------------------------------------
# load


def load(path, model, optimizer):
    """Load checkpoint `path` into model and optimizer (any world size), restore this rank's RNG, and return
    the train state dict (what save() got, plus "ckpt"). Collective. Unless find_resume verified `path` in this
    process already, the checksums run on other threads while the shards are read, and a mismatch raises
    CheckpointError after the read: the model and optimizer then hold part of the checkpoint, so call
    find_resume first to keep them intact (train.py does)."""
    wait()
    rank, world = _rank_world()
    key = _stat_key(path)
    verified = key in _verified
    if not verified:  # train_state.json first: its numbers shape the load
        problems = [p for ps in _gather(_check(path, 0, 1, only={"train_state.json"})) for p in ps]
        if problems:
            raise CheckpointError(f"cannot load {path}: {problems[0]}")
    state = _read_json(os.path.join(path, "train_state.json"))
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
        check = ex.submit(lambda: [] if verified else _check(path, rank, world, parallel=False))
        try:
            _dcp_call(lambda: dcp.load(tensors, storage_reader=reader), f"loading {path}")
        finally:
            problems = [p for ps in _gather(check.result()) for p in ps]  # a damaged file may be why DCP failed
            if problems:
                raise CheckpointError(f"cannot load {path}: {problems[0]}")
    if key is not None:
        _verified.add(key)
    groups = [{k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in saved.items()}
              for saved, cur in zip(meta["param_groups"], optim_sd["param_groups"])]
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors.get("optim", {}), "param_groups": groups})
    if not meta["optim_state"]:
        optimizer.state.clear()
    saved_world = meta["world_size"]
    if rank < saved_world:
        _set_rng_state(meta["rng"][rank])
    else:
        _seed_all(1_000_003 * state.get("step", 0) + rank)
    if saved_world != world and rank == 0:
        extra = f"; ranks >= {saved_world} seed their RNG from (step, rank)" if world > saved_world else ""
        print(f"ckpt: {path} was saved by {saved_world} ranks, loading on {world}: "
              f"model and optimizer resharded{extra}")
    return state


# -------------------------------------------------------------------------------------------------
# export and inference


def _full_model_state(path):
    """Full (unsharded) model tensors of a training checkpoint, assembled from the rank shards."""
    from safetensors import safe_open
    full, pieces = {}, []
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as f:
            offsets = json.loads((f.metadata() or {}).get("DCP_SHARDING_INFO", "{}"))
            for key in f.keys():
                if key.startswith("model."):
                    t = f.get_tensor(key)
                    off = offsets.get(key, {}).get("saved_offsets", [0] * t.dim())
                    pieces.append((key[len("model."):], off, t))
    for key, off, t in pieces:
        size = [o + s for o, s in zip(off, t.shape)]
        if key not in full:
            full[key] = [size, t.dtype, []]
        full[key][0] = [max(a, b) for a, b in zip(full[key][0], size)]
        full[key][2].append((off, t))
    out = {}
    for key, (size, dtype, parts) in full.items():
        out[key] = torch.empty(size, dtype=dtype)
        for off, t in parts:
            out[key][tuple(slice(o, o + s) for o, s in zip(off, t.shape))] = t
    return out


def _data_meta(state):
    """The run's {config.data_dir}/meta.json (tokenizer dir, eos_id), or {} when it is not there."""
    data_dir = (state.get("config") or {}).get("data_dir")
    path = os.path.join(data_dir, "meta.json") if data_dir else ""
    return _read_json(path) if os.path.isfile(path) else {}


def _tokenizer_dir(meta):
    tok = meta.get("tokenizer")
    return tok if tok and os.path.isdir(tok) else None


def _model_from_ckpt(path, dtype=torch.float32, device="cpu"):
    from model.phi import Phi, PhiConfig
    problems = verify(path)
    if problems:
        raise CheckpointError(f"cannot read {path}: {problems[0]}")
    state = _read_json(os.path.join(path, "train_state.json"))
    if "model_config" not in state:
        raise CheckpointError(f"{path}/train_state.json has no model_config; it was not saved by train.py")
    cfg = PhiConfig.from_dict(state["model_config"])
    with torch.device("meta"):  # weights exist in memory once, as in Phi.from_pretrained
        model = Phi(cfg)
    sd = _full_model_state(path)
    if set(sd) != set(model.state_dict()):
        diff = sorted(set(sd) ^ set(model.state_dict()))
        raise CheckpointError(f"{path}: weights do not match model_config ({len(diff)} keys differ, e.g. {diff[0]})")
    model.load_state_dict({k: sd.pop(k).to(device=device, dtype=dtype) for k in list(sd)}, assign=True)
    model.init_rope()
    return model, state


def export(ckpt_path, out_dir, max_shard_size="2GB"):
    """Write an HF model directory from a training checkpoint; returns out_dir."""
    model, state = _model_from_ckpt(ckpt_path)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    meta = _data_meta(state)
    tok = _tokenizer_dir(meta)
    if tok is None:
        warnings.warn(f"{ckpt_path}: no tokenizer found via config.data_dir/meta.json; exported without one")
    else:
        for name in os.listdir(tok):
            if os.path.isfile(os.path.join(tok, name)):
                shutil.copy2(os.path.join(tok, name), os.path.join(out_dir, name))
    ids = {"bos_token_id": meta["eos_id"], "eos_token_id": meta["eos_id"]} if "eos_id" in meta else {}
    config = _read_json(os.path.join(out_dir, "config.json"))  # HF's PhiConfig defaults to bos 1 / eos 2
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, **ids}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, **ids}, f, indent=2)
    return out_dir


def load_for_inference(path, dtype=torch.float32, device="cpu"):
    """(Phi in eval mode, tokenizer dir or None) from a training checkpoint or an HF export dir."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        model, state = _model_from_ckpt(path, dtype, device)
        return model.eval(), _tokenizer_dir(_data_meta(state))
    if os.path.isfile(os.path.join(path, "config.json")):
        from model.phi import Phi
        model = Phi.from_pretrained(path, dtype=dtype, device=device)
        has_tok = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
        return model.eval(), path if has_tok else None
    raise CheckpointError(f"{path} is neither a training checkpoint (manifest.json) nor an HF dir (config.json)")


# -------------------------------------------------------------------------------------------------
# throughput (used by bench.py)


def bench_io(tmp_dir, n_params=32 << 20, repeats=3):
    """GB/s of save()/load() vs safetensors save_file/load_file (+ copy into the same tensors) on one full
    state: an n_params fp32 model with AdamW state, one process. Best of `repeats`, interleaved, so a busy
    disk hurts both alike. Returns a dict of GB/s and the ratios ours/safetensors (save also vs save_file + fsync).

    python -c "import ckpt; print(ckpt.bench_io('/tmp'))"
    """
    from safetensors.torch import load_file
    os.makedirs(tmp_dir, exist_ok=True)
    width = 2048
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_params // width**2)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    tensors, _, _ = _state(model, opt)
    flat = {f"model.{k}": v for k, v in tensors["model"].items()}
    flat.update({f"optim.{k}.{n}": v for k, d in tensors["optim"].items() for n, v in d.items()})
    gb = sum(v.numel() * v.element_size() for v in flat.values()) / 1e9
    ref = os.path.join(tmp_dir, "ref.safetensors")

    def ref_save_fsync():  # the durable baseline: a checkpoint must survive a power cut, so save() fsyncs
        save_file(flat, ref)
        with open(ref, "rb") as f:
            os.fsync(f.fileno())

    def ref_load():
        for k, v in load_file(ref).items():
            flat[k].copy_(v)
    steps = [("st_save", lambda: save_file(flat, ref)), ("st_save_fsync", ref_save_fsync),
             ("save", lambda: save(tmp_dir, 1, model, opt, {})),
             ("st_load", ref_load), ("load", lambda: load(os.path.join(tmp_dir, "ckpt", "step-000001"), model, opt))]
    best = {}
    for _ in range(repeats):
        for name, fn in steps:
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    os.remove(ref)
    shutil.rmtree(os.path.join(tmp_dir, "ckpt"))
    r = {"gb": gb, **{f"{k}_gbps": gb / v for k, v in best.items()}}
    r.update(save_ratio=r["save_gbps"] / r["st_save_gbps"], load_ratio=r["load_gbps"] / r["st_load_gbps"],
             save_ratio_fsync=r["save_gbps"] / r["st_save_fsync_gbps"])
    return r


# -------------------------------------------------------------------------------------------------
# CLI


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def cmd_ls(out_dir):
    root = os.path.join(out_dir, "ckpt")
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise CheckpointError(f"no checkpoints in {root}")
    latest = None
    if os.path.isfile(os.path.join(root, "latest")):
        latest = open(os.path.join(root, "latest")).read().strip()
    ranked = by_metric(ckpts)
    best = ranked[0][1] if ranked else None
    print(f"{'step':>8}  {'metric':>10}  {'size':>10}  {'verifies':<8}  flags")
    for step, path, metric in ckpts:
        problems = verify(path)
        flags = [f for f, on in (("latest", os.path.basename(path) == latest), ("best", step == best)) if on]
        m = f"{metric:.4f}" if metric is not None else "-"
        print(f"{step:>8}  {m:>10}  {_dir_bytes(path) / 1e6:>8.1f}MB  {'yes' if not problems else 'NO':<8}  "
              f"{','.join(flags)}{'  ' + problems[0] if problems else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\nLayout")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help="write an HF model dir from a training checkpoint")
    p.add_argument("ckpt", help="checkpoint dir, e.g. out/ckpt/step-000123")
    p.add_argument("out", help="output dir for the HF model")
    p.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    p = sub.add_parser("ls", help="table of the checkpoints under OUT_DIR/ckpt")
    p.add_argument("out_dir", help="training output dir (the one holding ckpt/)")
    p = sub.add_parser("verify", help="check sizes and checksums; exit 0 only if complete")
    p.add_argument("ckpt", help="checkpoint dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "export":
            print(export(args.ckpt, args.out, args.max_shard_size))
        elif args.cmd == "ls":
            cmd_ls(args.out_dir)
        else:
            problems = verify(args.ckpt)
            for p in problems:
                print(p)
            if problems:
                return 1
            print(f"{args.ckpt}: ok")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
