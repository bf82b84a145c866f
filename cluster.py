"""Ranks on many nodes: the process group, its timeout, and a heartbeat, so that a failure names the rank that stopped.

    cluster.init_process_group(device, timeout_min)    # train.py's setup, under torchrun
    record(cluster.naming_silent_ranks(main))(argv)     # a failed run says which rank stopped answering, in one line

Every collective fails after dist_timeout minutes instead of waiting forever. The error gloo or NCCL raises then
says that something timed out, not who. So each rank's thread adds 1 to its own counter in torchrun's store every
BEAT seconds; the threads of a stopped or frozen process, or of a lost node, stop with it. When the run fails on a
rank, that rank reads every counter twice, SILENT seconds apart, and names the ranks whose counters stood still
(the ranks that failed too and said so are not among them): RankSilent, one line, exit 1, and torchrun restarts
the group from the last checkpoint if --max-restarts allows.
"""
import datetime
import functools
import os
import socket
import threading
import time

import torch.distributed as dist

BEAT = 1.0  # seconds between a rank's heartbeats
SILENT = 3 * BEAT  # a rank whose counter stands still this long is not running
_store = None  # this rank's handle on the store, once the heartbeat runs


class RankSilent(RuntimeError):
    """The run failed while these ranks had stopped answering."""


def init_process_group(device, timeout_min):
    """One process group of torchrun's ranks (or of this process alone: FSDP's CPU offloading needs one) whose
    collectives fail after timeout_min minutes; with several ranks, this rank's heartbeat starts."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    timeout = datetime.timedelta(minutes=timeout_min)
    if world == 1:
        store = dist.HashStore()
    else:
        store = next(dist.rendezvous("env://", timeout=timeout))[0]
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's own store outlives a restart: a fresh prefix per attempt hides the dead group's keys. A
            # replaced node counts its attempts from 0, so it never meets the others here (pytorch#135712): with
            # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every attempt gets a new store instead, and no prefix
            store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world, store=store,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    if world > 1:
        _start_heartbeat(store, rank)


def _start_heartbeat(store, rank):
    global _store
    _store = store.clone()  # a store client per thread (Store.clone)
    _store.set_timeout(datetime.timedelta(seconds=10 * BEAT))  # when the store itself is gone, say so soon
    _store.set(f"host/{rank}", f"{socket.gethostname()}, local rank {os.environ.get('LOCAL_RANK', 0)}")
    threading.Thread(target=_beat, args=(store.clone(), f"beat/{rank}"), daemon=True).start()


def _beat(store, key):
    while dist.is_initialized():  # destroy_process_group ends it, before rank 0 takes a store of its own away
        try:
            store.add(key, 1)
        except dist.DistError:  # the store is gone: the run is ending or failing, and says so itself
            return
        time.sleep(BEAT)


def silent_ranks(failed_rank, error):
    """After a failure on this rank: says so in the store, then -> [(rank, where)] of the ranks whose heartbeat
    stood still for SILENT seconds and that did not say they failed."""
    world = dist.get_world_size()
    _store.set(f"failed/{failed_rank}", error)

    def counts():
        return [_store.add(f"beat/{r}", 0) for r in range(world)]
    before = counts()
    time.sleep(SILENT)
    after = counts()
    silent = [r for r in range(world) if after[r] == before[r] and not _store.check([f"failed/{r}"])]
    named = [(r, _store.get(f"host/{r}").decode() if _store.check([f"host/{r}"]) else "never started") for r in silent]
    _store.set(f"named/{failed_rank}", "1")
    if failed_rank == 0:  # the store may live in this process (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): it stays
        # until every rank still running has read it, or 2 x SILENT, lest they find it gone and name no one
        others, deadline = [f"named/{r}" for r in range(world) if r not in silent], time.monotonic() + 2 * SILENT
        while not _store.check(others) and time.monotonic() < deadline:
            time.sleep(0.1)
    return named


def naming_silent_ranks(fn):
    """fn, whose failure in a run of several ranks becomes RankSilent when some ranks stopped answering: one line
    naming them and what failed here. Other failures go on as they were."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if _store is None or not dist.is_initialized():  # one process, or no group (yet, or any more)
                raise
            rank, error = dist.get_rank(), f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            try:
                silent = silent_ranks(rank, error)
            except dist.DistError:  # the store did not answer: it lives in rank 0's process or in node 0's torchrun
                where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                raise RankSilent(f"the store at {where} stopped answering (it lives in rank 0 or in the first "
                                 f"node's torchrun), and on rank {rank}: {error}") from e
            if not silent:
                raise
            who = "; ".join(f"rank {r} ({where})" for r, where in silent[:8]) + (" ..." if len(silent) > 8 else "")
            raise RankSilent(f"{who} stopped answering: no heartbeat for {SILENT:.0f}s (stopped, frozen, or its node "
                             f"is lost); on rank {rank}: {error}") from e
    return run
