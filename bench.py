"""Speed against baselines, side by side in one run, by the command anyone can re-run (issue 8).

  python bench.py                                          # everything on config/tiny.py
  python bench.py --what train,ckpt --json out/bench.json  # some measurements, JSON as well as the table
  python bench.py --config config/tiny.py --batch_size=16  # train.py config files and --key=value flags
  python bench.py --smoke --json /tmp/bench.json           # everything, small shapes, under a minute on a CPU
  python bench.py --gpu-table --json $OUT/gpu.json         # one H100/H200, <= 8 minutes: phi-2 + 5 blocks at
                                                           # T=2048 and 32k, AC, float8, HF, the CUDA-only paths;
                                                           # each row in the JSON as soon as it is measured
  python bench.py --gpu-table --smoke --json /tmp/gpu.json # the same rows on the CPU, tiny, in under a minute

Each measurement is a JSON object: name, ours, baseline, unit, ratio (ours / baseline), better
("higher"/"lower") and details. The baselines:
  train    transformers.PhiForCausalLM from the same PhiConfig, trained by a plain loop (forward with labels,
           backward, clip, AdamW step) with the same shapes, batch, optimizer, dtype, AC and compile settings.
           Median step time after warm-up. CUDA: each side alone in a fresh process, wall time. CPU: both sides
           in one fresh process, steps alternating, timed by the process's CPU time (a shared box steals wall
           time from whoever runs). Peak memory, each side alone in a fresh process: CUDA max_memory_allocated;
           CPU the peak RSS while training (VmHWM, reset through /proc/self/clear_refs once the model is built)
           minus the RSS before the model was built.
  ckpt     safetensors save_file / load_file of the same tensors (ckpt_io).
  loader   the batches per second the training step of this config consumes.
  prepare  tokenizers' encode_batch over the same files (listed, read, decoded), without cleaning, dedup or writing,
           with as many threads as prepare.py has worker processes (1 and 2), each pair in a fresh process.
           The corpus is real: PREPARE_CORPUS, what `npm ci --prefix checkers` and `pip install` put on disk.
           Beside it, in the same process: prepare.py with decontamination off (what decontamination costs), and
           prepare.py reading the same documents from one parquet file with The Stack's columns.
  monitor  the same step loop with TensorBoard off and W&B disabled (metrics.jsonl is always written), logging
           every log_interval steps as train.py does; the median of on/off ratios of paired blocks.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import psutil
import torch
import transformers

import ckpt
import plan
from model.phi import PRESETS, Phi, PhiConfig
from monitor import Monitor, flops_per_token, non_embedding_params, peak_flops
from model.parallel import (apply_ac, apply_compile, build_model, largest_micro_batch, parallel_model,
                            scratch_config, shape)
import train
from train import DTYPES, Guard, adamw, load_config, train_step

SCALER = torch.amp.GradScaler(enabled=False)  # no loss scaling on either side, fp16 included
SITE = sysconfig.get_paths()["purelib"]
# real JavaScript, TypeScript, Markdown (the checkers' npm packages) and XML, SVG, Python and text (packages that
# requirements.txt installs)
PREPARE_CORPUS = ["checkers/node_modules", *(os.path.join(SITE, p) for p in ("lxml", "matplotlib", "werkzeug",
                                                                             "jinja2"))]
PREPARE_SMOKE = ["checkers/node_modules/micromark-core-commonmark"]  # 0.26 MB of the same


# -- train: ours and the HF loop, in fresh processes -------------------------------------------------------------------

def rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS


def peak_bytes(device, before):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - before
    return rss_bytes("VmHWM") - before


def our_step(model, opt, batches, ctx, cfg, sharded, guard):
    """train.py's own train_step: forward and backward, clipping, the one host sync, the guard, AdamW."""
    train_step(model, opt, SCALER, batches, ctx, cfg, guard, sharded, signalled=False, nan=False)


def hf_step(model, opt, batches, ctx, cfg):
    """The plain loop everyone writes: HF shifts `labels` itself, so it predicts T-1 tokens of x. No KV cache: in
    training it is dead weight, and it grows again in a checkpoint's recompute, which per-op AC refuses."""
    for x, _ in batches:
        with ctx:
            loss = model(input_ids=x, labels=x, use_cache=False).loss / len(batches)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    loss.item()
    opt.step()
    opt.zero_grad(set_to_none=True)


def model_config(cfg):
    if cfg.init_from != "scratch" or cfg.expand_layers or cfg.rope_scaling_factor != 1:
        raise ValueError("bench.py measures random-init models: set init_from='scratch', expand_layers=0, "
                         "rope_scaling_factor=1.0")
    return PhiConfig.preset(cfg.model_preset)


def setup(side, cfg, device):
    """-> a no-argument training step for one side, and the model's PhiConfig."""
    mcfg, ptdtype = model_config(cfg), DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, mcfg.vocab_size, (
        cfg.grad_accum, cfg.batch_size, cfg.block_size + 1), device=device)]
    if side == "ours":
        model, mcfg, sharded = build_model(cfg, mcfg.vocab_size, 0, 1, device, ptdtype)
        step = functools.partial(our_step, sharded=sharded, guard=Guard())
    else:
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**mcfg.to_hf_dict())).to(device)
        if cfg.activation_checkpointing != "none":  # the same techniques, applied the same way
            apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
        if cfg.compile:
            apply_compile(model)
        step = hf_step
    model.train()
    opt = adamw(model, cfg)
    ctx = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    return lambda: step(model, opt, batches, ctx, cfg), mcfg


def timed(step, device):
    t, c = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def train_side(side, args, steps, warmup):
    """One side alone in this (fresh) process -> wall and CPU step times, peak memory, FLOPs per token."""
    cfg = load_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    step, mcfg = setup(side, cfg, device)
    reset_peak(device)
    try:
        times = [timed(step, device) for _ in range(warmup + steps)][warmup:]
    except torch.OutOfMemoryError:
        return dict(oom=True)
    return dict(times=[t for t, _ in times], cpu_times=[c for _, c in times], peak=peak_bytes(device, before),
                fpt=flops_per_token(mcfg, cfg.block_size), micro_batches=cfg.grad_accum,
                tokens=cfg.grad_accum * cfg.batch_size * cfg.block_size, device=device.type,
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def train_pair(args, steps, warmup):
    """CPU timing: both sides in this (fresh) process, their steps alternating, so the load that
    neighbours put on a shared box falls on both alike. -> {side: [(wall, cpu), ...]}"""
    cfg, device = load_config(args), torch.device("cpu")
    steps_of = {side: setup(side, cfg, device)[0] for side in ("ours", "hf")}
    times = {side: [] for side in steps_of}
    for i in range(warmup + steps):
        for side in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            times[side].append(timed(steps_of[side], device))
    return {side: t[warmup:] for side, t in times.items()}


def fresh_processes(n):
    # fork on the CPU: nothing has computed in this process yet (train runs first), and a fork starts in
    # milliseconds where spawn re-imports torch and transformers; CUDA needs spawn
    return ProcessPoolExecutor(n, mp_context=mp.get_context("spawn" if torch.cuda.is_available() else "fork"))


def in_fresh_process(fn, *args):
    with fresh_processes(1) as ex:
        return ex.submit(fn, *args).result()


def bench_train(args, steps, warmup, label="train"):
    """CUDA: each side in its own process (timing and memory). CPU: memory likewise, timing by train_pair;
    the step time is the process's CPU time there, as neighbours on a shared box steal wall time."""
    cuda = torch.cuda.is_available()
    if cuda:  # one at a time: each times its own steps
        runs = {side: in_fresh_process(train_side, side, args, steps, warmup) for side in ("ours", "hf")}
    else:  # only peak memory here, which is per process: both at once
        with fresh_processes(2) as ex:
            runs = {side: ex.submit(train_side, side, args, 2, 1) for side in ("ours", "hf")}
            runs = {side: f.result() for side, f in runs.items()}
    oom = [side for side, run in runs.items() if run.get("oom")]
    if oom:
        return [row(f"{label}/tokens_per_s", None, None, "tok/s", "higher", out_of_memory=oom)], None
    if not cuda:
        for side, t in in_fresh_process(train_pair, args, steps, warmup).items():
            runs[side].update(times=[w for w, _ in t], cpu_times=[c for _, c in t])
    fig, info = {}, runs["ours"]
    pf = peak_flops(info["device_name"]) if cuda else None
    for side, run in runs.items():
        dt = statistics.median(run["times" if cuda else "cpu_times"])
        fig[side] = dict(dt=dt, tok_s=info["tokens"] / dt, wall=statistics.median(run["times"]),
                         peak=run["peak"] / 2**20, mfu=100 * info["fpt"] * info["tokens"] / dt / pf if pf else None)
    o, b = fig["ours"], fig["hf"]
    rows = [row(f"{label}/step_time", o["dt"] * 1e3, b["dt"] * 1e3, "ms", "lower", steps=steps, warmup=warmup,
                tokens_per_step=info["tokens"], clock="wall" if cuda else "process CPU time",
                wall_ms=o["wall"] * 1e3, baseline_wall_ms=b["wall"] * 1e3),
            row(f"{label}/tokens_per_s", o["tok_s"], b["tok_s"], "tok/s", "higher", mfu_pct=o["mfu"],
                baseline_mfu_pct=b["mfu"]),
            row(f"{label}/peak_memory", o["peak"], b["peak"], "MiB", "lower", how="cuda max_memory_allocated" if cuda
                else "peak RSS while training minus RSS before the model was built")]
    return rows, info["micro_batches"] / o["dt"]  # loader batches per second the run consumes


# -- ckpt, loader, prepare, monitor -----------------------------------------------------------------------------------

def ckpt_io(tmp_dir, n_params=32 << 20, repeats=3):
    """GB/s of ckpt.save()/load() vs safetensors save_file/load_file (+ copy into the same tensors) on one full
    state: an n_params fp32 model with AdamW state, one process. Best of `repeats`, interleaved, so a busy
    disk hurts both alike. Returns a dict of GB/s and the ratios ours/safetensors (save also vs save_file + fsync)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict
    os.makedirs(tmp_dir, exist_ok=True)
    width = 2048
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_params // width**2)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)  # the tensors ckpt.save writes
    flat = {f"model.{k}": v for k, v in model_sd.items()}
    flat.update({f"optim.{k}.{n}": v for k, d in optim_sd["state"].items() for n, v in d.items()
                 if isinstance(v, torch.Tensor)})
    gb = sum(v.numel() * v.element_size() for v in flat.values()) / 1e9
    ref = os.path.join(tmp_dir, "ref.safetensors")

    def ref_save_fsync():  # the durable baseline: a checkpoint must survive a power cut, so save() fsyncs
        save_file(flat, ref)
        with open(ref, "rb") as f:
            os.fsync(f.fileno())

    def ref_load():
        for k, v in load_file(ref).items():
            flat[k].copy_(v)

    def stock_save():  # what ckpt._Writer replaces: DCP's own HF writer, which only writes (no checksums)
        shutil.rmtree(os.path.join(tmp_dir, "stock"), ignore_errors=True)
        writer = HuggingFaceStorageWriter(os.path.join(tmp_dir, "stock"), save_distributed=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd["state"]}, storage_writer=writer)
    steps = [("st_save", lambda: save_file(flat, ref)), ("st_save_fsync", ref_save_fsync),
             ("save", lambda: ckpt.save(tmp_dir, 1, model, opt, {})), ("stock_save", stock_save),
             ("st_load", ref_load),
             ("load", lambda: ckpt.load(os.path.join(tmp_dir, "ckpt", "step-000001"), model, opt))]
    best = {}
    for _ in range(repeats):
        for name, fn in steps:
            t = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    os.remove(ref)
    shutil.rmtree(os.path.join(tmp_dir, "ckpt"))
    shutil.rmtree(os.path.join(tmp_dir, "stock"))
    r = {"gb": gb, **{f"{k}_gbps": gb / v for k, v in best.items()}}
    r.update(save_ratio=r["save_gbps"] / r["st_save_gbps"], load_ratio=r["load_gbps"] / r["st_load_gbps"],
             save_ratio_fsync=r["save_gbps"] / r["st_save_fsync_gbps"])
    return r


def bench_ckpt(tmp, n_params, repeats):
    r = ckpt_io(tmp, n_params=n_params, repeats=repeats)
    info = dict(gb=r["gb"], params=n_params, repeats=repeats, best_of=True)
    return [row("ckpt/save", r["save_gbps"], r["st_save_gbps"], "GB/s", "higher",
                vs_save_file_fsync=r["save_ratio_fsync"], **info),
            row("ckpt/load", r["load_gbps"], r["st_load_gbps"], "GB/s", "higher", **info),
            row("ckpt/writer", r["save_gbps"], r["stock_save_gbps"], "GB/s", "higher",
                baseline_is="DCP's HuggingFaceStorageWriter, which only writes (ours also checksums)", **info)]


def train_tokenizer(sources, out, vocab):
    """A byte-level BPE learned from the corpus by prepare.py (which also reads every file once, so both sides
    of the measurement find them in the page cache)."""
    from data.prepare import prepare
    return prepare(sources, out=out, train_tokenizer=vocab, quiet=True)["tokenizer"]


def stack_parquet(files, path):
    """The files' texts as one parquet file with The Stack's content, lang and path columns (UTF-8 files only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.sources import LANG_OF_EXT
    rows = []
    for f in files:
        try:
            rows.append((f.read_bytes().decode("utf-8"), LANG_OF_EXT[f.suffix.lower()], str(f)))
        except UnicodeDecodeError:
            continue
    pq.write_table(pa.table(dict(zip(("content", "lang", "path"), zip(*rows)))), path, row_group_size=256)
    return path


def prepare_pair(sources, tokenizer, out, workers, repeats):
    """In a fresh process whose tokenizers run `workers` threads (RAYON_NUM_THREADS): prepare.py end to end with
    `workers` processes, against encode_batch of the same files' text, and of the documents that pass the filters
    (what prepare.py tokenizes), listing and reading alone, prepare.py with decontamination off, and prepare.py from
    a parquet file of the same files, alternating. -> best seconds of each, prepare.py's meta, MB that pass the
    filters, MB per language."""
    from tokenizers import Tokenizer

    from data import decontam
    from data.dedup import lsh_bands
    from data.prepare import NEAR_DEDUP, Filters, clean, load_tokenizer, prepare
    from data.sources import LANG_OF_EXT, parse_source, source_units

    def listing():  # the corpus files, as prepare.py lists them
        return [f for src in sources for f in source_units(*parse_source(src)[:2])]
    files = listing()
    tok = Tokenizer.from_file(os.path.join(tokenizer, "tokenizer.json"))
    load_tokenizer(tokenizer), lsh_bands(NEAR_DEDUP)  # imports paid once per process (~2 s): not timed on either side
    filtered = [text for f in files if (text := clean(str(f), LANG_OF_EXT[f.suffix.lower()], f.read_bytes(),
                                                      Filters())[0]) is not None]
    parquet = stack_parquet(files, out + ".parquet")
    bench = decontam.load(list(decontam.DEFAULT))
    sides = ("ours", "base", "filtered", "read", "nodecon", "parquet", "decon")
    best = {}
    for r in range(repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            if side in ("ours", "nodecon", "parquet"):
                shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            if side in ("ours", "nodecon", "parquet"):
                got = prepare([parquet] if side == "parquet" else sources, out, tokenizer=tokenizer, workers=workers,
                              quiet=True, decontaminate=["none"] if side == "nodecon" else None)
                meta = got if side == "ours" else meta
            elif side == "base":  # from the same directories, as prepare.py starts: listing, reading, decoding
                tok.encode_batch([f.read_bytes().decode("utf-8", errors="replace") for f in listing()],
                                 add_special_tokens=False)
            elif side == "filtered":
                tok.encode_batch(filtered, add_special_tokens=False)
            elif side == "decon":  # the check itself, on the documents prepare.py checks, in this one process
                [decontam.overlaps(text.encode("utf-8"), bench) for text in filtered]
            else:  # what a second pass over the sources would cost: listing and reading them again
                [f.read_bytes() for f in listing()]
            best[side] = min(best.get(side, float("inf")), time.perf_counter() - t)
    shutil.rmtree(out, ignore_errors=True)
    meta = prepare(sources, out, tokenizer=tokenizer, workers=workers, quiet=True)  # the loader's data, the default
    by_lang = Counter()
    for f in files:
        by_lang[LANG_OF_EXT[f.suffix.lower()]] += f.stat().st_size / 1e6
    return best, meta, sum(len(t.encode()) for t in filtered) / 1e6, by_lang


def bench_prepare(tmp, smoke, vocab):
    """MB/s of data/prepare.py (near-dedup on, its default) against encode_batch on the same real files, at 1 and 2
    workers; each pair alone in a fresh process, the tokenizers' thread pool sized by RAYON_NUM_THREADS."""
    sources = PREPARE_SMOKE if smoke else PREPARE_CORPUS
    for src in sources:
        if not os.path.isdir(src):
            raise ValueError(f"bench prepare: {src} is missing: run `npm ci --prefix checkers` (the README's install)")
    # spawned, not forked: a fork of this process can hang on a lock that one of its threads (the checkpoint
    # writers of the measurements before) held at that moment; a spawned child also starts its own tokenizers threads
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        tokenizer = ex.submit(train_tokenizer, sources, os.path.join(tmp, "tok"), vocab).result()
    rows = []
    for workers in (1, 2):
        env = os.environ.get("RAYON_NUM_THREADS")
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # the child's tokenizers read it when they start their threads
        try:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
                out = os.path.join(tmp, f"data{workers}")
                best, meta, filtered_mb, by_lang = ex.submit(prepare_pair, sources, tokenizer, out, workers,
                                                             1 if smoke else 3).result()
        finally:
            if env is None:
                del os.environ["RAYON_NUM_THREADS"]
            else:
                os.environ["RAYON_NUM_THREADS"] = env
        mb = meta["mb_read"]
        rows.append(row(f"prepare/throughput_{workers}w", mb / best["ours"], mb / best["base"], "MB/s", "higher",
                        workers=workers, sources=sources, mb=mb, docs=sum(s["docs_read"] for s in meta["sources"]),
                        mb_by_lang={lang: round(v, 3) for lang, v in sorted(by_lang.items())},
                        dropped=meta["filters"]["dropped"], vocab=meta["vocab_size"], best_of=1 if smoke else 3,
                        baseline_is="encode_batch of every file, listing the directories and reading included",
                        seconds=best["ours"], baseline_seconds=best["base"],
                        # stricter: encode_batch of only the documents that pass the filters, which prepare.py tokenizes
                        filtered_mb=filtered_mb, filtered_seconds=best["filtered"],
                        strict_ratio=best["filtered"] / best["ours"], read_seconds=best["read"]))
        # what decontamination costs: prepare.py's time with it (its default) over its time without, and the check
        # alone over the same documents (one process: its share of the workers' time is this over prepare's x workers)
        rows.append(row(f"prepare/decontamination_{workers}w", best["ours"], best["nodecon"], "s", "lower",
                        workers=workers, share_of_prepare=(best["ours"] - best["nodecon"]) / best["ours"],
                        check_seconds=best["decon"], check_share=best["decon"] / (best["ours"] * workers),
                        contaminated=meta["contaminated"], benchmarks=meta["decontamination"]["benchmarks"],
                        baseline_is="prepare.py with --decontaminate=none"))
        # the same documents from one parquet file (The Stack's columns) against the directories
        rows.append(row(f"prepare/parquet_{workers}w", mb / best["parquet"], mb / best["ours"], "MB/s", "higher",
                        workers=workers, mb=mb, seconds=best["parquet"], baseline_seconds=best["ours"],
                        baseline_is="prepare.py on the directories the parquet file was written from"))
    return rows, os.path.join(tmp, "data1")


def bench_archive(tmp, smoke):
    """ckpt.py pack: MB/s of each format and its compression ratio, against tar without compression in the same
    run, on a checkpoint of the tiny model (fp32 weights + AdamW state after 20 steps) and on bf16 weights of
    phi-2 width (an MLP matrix, random normal with std 0.02 like trained weights). Unpack: MB/s, verified."""
    import tarfile

    import remote
    torch.manual_seed(0)
    tiny = Phi(PhiConfig(**PRESETS["test" if smoke else "tiny"]))
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    for _ in range(2 if smoke else 20):
        x = torch.randint(0, tiny.cfg.vocab_size, (4, 64))
        tiny(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    wide = torch.nn.Linear(2560, 1024 if smoke else 10240, bias=False).to(torch.bfloat16)
    torch.nn.init.normal_(wide.weight, std=0.02)
    rows = []
    for what, model, optim in (("tiny", tiny, opt), ("phi2_bf16", wide, torch.optim.SGD(wide.parameters()))):
        path = ckpt.save(os.path.join(tmp, f"arch-{what}"), 1, model, optim, {})
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        t = time.perf_counter()
        with tarfile.open(os.path.join(tmp, "plain.tar"), "w") as tar:
            tar.add(path, arcname="step-000001")
        base = size / 1e6 / (time.perf_counter() - t)
        for fmt in remote.FORMATS:
            archive = os.path.join(tmp, f"{what}{fmt}")
            t = time.perf_counter()
            remote.pack(path, archive)
            ours = size / 1e6 / (time.perf_counter() - t)
            t = time.perf_counter()
            shutil.rmtree(remote.unpack(archive, os.path.join(tmp, "unpacked")))
            rows.append(row(f"archive/{what}/{fmt[5:]}", ours, base, "MB/s", "higher", mb=size / 1e6,
                            compression_ratio=size / os.path.getsize(archive),
                            unpack_mb_per_s=size / 1e6 / (time.perf_counter() - t),
                            baseline_is="tar without compression"))
            os.remove(archive)
    return rows


def bench_loader(cfg, data_dir, n_batches, consumed):
    from data.loader import TokenLoader
    loader = TokenLoader(data_dir, cfg.batch_size, cfg.block_size, seed=cfg.seed)
    loader.next_batch()
    t = time.perf_counter()
    for _ in range(n_batches):
        loader.next_batch()
    ours = n_batches / (time.perf_counter() - t)
    return [row("loader/batches_per_s", ours, consumed, "batch/s", "higher", batch_size=cfg.batch_size,
                block_size=cfg.block_size, baseline_is="batches per second the training step consumes")]


def cpu_tree():
    """CPU seconds of this process and of its children (W&B logs from a service process)."""
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    times = []
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a child may exit between the listing and the read
            t = p.cpu_times()
            times.append(t.user + t.system)
    return times[0], sum(times[1:])


def bench_monitor(cfg, tmp, pairs):
    """The training step loop, all sinks on vs off: `pairs` pairs of blocks of log_interval steps with one log_step
    each, as train.py logs, in alternating order. Two figures:
    - monitor/step_time, the A/B: the median of the pairs' on/off ratios of the block's cost (CPU: the CPU time of
      this process and its children; CUDA: wall time). Its spread (in the details) is the machine's noise.
    - monitor/sink_cpu, direct: the CPU the sinks use per block, on top of the step: log_step's own extra CPU time
      (on minus off) plus the CPU of the sinks' background threads (TensorBoard's writer, W&B's) and of the W&B
      service process, which run all the time: their CPU seconds per second over the whole measurement, times a
      step's wall time. Against the step's cost, it gives the overhead without the step's noise."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mcfg, sharded = build_model(cfg, model_config(cfg).vocab_size, 0, 1, device, DTYPES[cfg.dtype])
    opt = adamw(model, cfg)
    ctx = torch.autocast(device.type, dtype=DTYPES[cfg.dtype]) if cfg.dtype != "float32" else nullcontext()
    x = torch.randint(0, mcfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=device)
    batches = [(x[:, :-1], x[:, 1:])]
    os.environ.pop("WANDB_MODE", None)  # it would override wandb_mode on both sides
    kw = dict(config=vars(cfg), system_interval=cfg.system_interval, device=device,
              flops_per_token=flops_per_token(mcfg, cfg.block_size))
    with contextlib.redirect_stdout(io.StringIO()):
        mons = {"on": Monitor(os.path.join(tmp, "on"), tensorboard=True, wandb_mode="offline", **kw),
                "off": Monitor(os.path.join(tmp, "off"), tensorboard=False, wandb_mode="disabled", **kw)}
    step, n = 0, cfg.log_interval

    def background():  # CPU seconds of this process's threads other than the main one, and of its children
        ids = {t.native_id for t in threading.enumerate() if t is not threading.main_thread()}
        return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids) + cpu_tree()[1]

    guard = Guard()

    def block(mon):
        """-> (cost per step, log_step's own CPU time, the children's CPU time, wall time per step)"""
        nonlocal step
        t0, (own0, kids0) = time.perf_counter(), cpu_tree()
        for _ in range(n):
            t = time.perf_counter()
            our_step(model, opt, batches, ctx, cfg, sharded, guard)
            step += 1
        c = time.thread_time()
        mon.log_step(step, dict(loss=1.0, lr=1e-3, grad_norm=1.0, dt=time.perf_counter() - t, data_wait=0.0,
                                tokens=cfg.batch_size * cfg.block_size), model=model)
        log_cpu = time.thread_time() - c
        wall, (own, kids) = (time.perf_counter() - t0) / n, cpu_tree()
        return (wall if device.type == "cuda" else (own - own0 + kids - kids0) / n), log_cpu, kids - kids0, wall

    our_step(model, opt, batches, ctx, cfg, sharded, guard)  # warm-up
    runs = {"on": [], "off": []}
    with contextlib.redirect_stdout(io.StringIO()):  # the console line is printed on both sides; not shown here
        for m in mons.values():  # a run pays the first log (W&B: tens of ms) once, not every log_interval
            m.log_step(0, dict(loss=1.0, lr=1e-3, grad_norm=1.0, dt=1.0, data_wait=0.0, tokens=1), model=model)
        bg0, t0 = background(), time.perf_counter()
        for k in range(pairs):
            for side in ("on", "off") if k % 2 == 0 else ("off", "on"):
                runs[side].append(block(mons[side]))
        bg = (background() - bg0) / (time.perf_counter() - t0)  # CPU seconds per second: it runs all the time
        sinks = dict(tensorboard=mons["on"].tb is not None, wandb=mons["on"].wandb is not None)  # a failed sink is off
        for m in mons.values():
            m.finish({"stop_reason": "bench"})
    ratios = sorted(a[0] / b[0] for a, b in zip(runs["on"], runs["off"]))
    ratio = statistics.median(ratios)
    med = {side: [statistics.median(v) for v in zip(*r)] for side, r in runs.items()}
    (_, lon, kon, _), (off, loff, koff, _) = med["on"], med["off"]
    sink = (lon - loff) / n + bg * statistics.median(w for r in runs.values() for _, _, _, w in r)  # CPU s per step
    clock = "wall" if device.type == "cuda" else "CPU time of the process tree"
    return [row("monitor/step_time", ratio * off * 1e3, off * 1e3, "ms", "lower", overhead_pct=100 * (ratio - 1),
                pair_ratios=ratios, log_interval=n, pairs=pairs, clock=clock, sinks_on=sinks,
                children_cpu_ms_per_block_on=kon * 1e3, children_cpu_ms_per_block_off=koff * 1e3),
            row("monitor/sink_cpu", (off + sink) * 1e3, off * 1e3, "ms", "lower", overhead_pct=100 * sink / off,
                log_step_cpu_ms_on=lon * 1e3, log_step_cpu_ms_off=loff * 1e3, background_cpu_pct_of_a_core=bg * 100,
                log_interval=n, sinks_on=sinks, step_clock=clock)]


# -- the GPU table: one command for a lent GPU, each row written as it is measured (issue 25) --------------------------

# The real shapes, and --smoke's: the same rows through the same code on the CPU, tiny, compile off, float8 emulated.
# base: config/phi2_xml.py's model (phi-2 + 5 LLaMA-Pro blocks = 37) from random weights made on the device.
GPU_SHAPES = dict(
    real=dict(base=["config/phi2_xml.py", "--init_from=scratch", "--dtype=bfloat16", "--compile=True"],
              short=["--block_size=2048", "--rope_scaling_factor=1.0"], long=["--block_size=32768"],  # RoPE x16
              paths=dict(num_hidden_layers=2), steps=5, loss_steps=50, long_steps=2, oom_batch=1024, fault_oom=0,
              budget=450, guard=180, long_guard=200, paths_guard=90, min_start=40, seqs=8, limit=64, long_limit=8),
    smoke=dict(base=["config/phi2_xml.py", "--init_from=scratch", "--dtype=bfloat16", "--compile=False",
                     "--model_preset=test", "--expand_layers=1", "--float8_emulate=True"],
               short=["--block_size=64", "--rope_scaling_factor=1.0"], long=["--block_size=512"],
               paths=dict(num_hidden_layers=2), steps=2, loss_steps=6, long_steps=1, oom_batch=8, fault_oom=2,
               budget=90, guard=40, long_guard=40, paths_guard=40, min_start=5, seqs=4, limit=4, long_limit=4,
               mem_gib=0.02))
LEARNABLE = 1024  # tokens drawn from the first 1,024 ids: a loss that falls from ln(vocab) within a few steps


def save_row(path, r):
    """One row into the table's JSON at once, atomically, replacing a row of the same name: a call cut later
    keeps every row measured before."""
    with open(path) as f:
        table = json.load(f)
    names = [x["name"] for x in table["results"]]
    if r["name"] in names:
        table["results"][names.index(r["name"])] = r
    else:
        table["results"].append(r)
    with open(path + ".tmp", "w") as f:
        json.dump(table, f, indent=1)
    os.replace(path + ".tmp", path)


def load_rows(path):
    with open(path) as f:
        return {r["name"]: r for r in json.load(f)["results"]}


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "float32" else nullcontext()


def _batches(cfg, vocab, n_steps, device):
    """n_steps steps of grad_accum micro-batches, the same for every row with the same seed and shapes."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, min(LEARNABLE, vocab), (n_steps, cfg.grad_accum, cfg.batch_size, cfg.block_size + 1),
                      generator=g).to(device)
    return [[(m[:, :-1], m[:, 1:]) for m in step] for step in x]


def _steps(step, all_batches, warmup, device):
    """-> (wall seconds per step after warm-up, what every step returned). CUDA: synchronised before each clock
    read."""
    times, results = [], []
    for batches in all_batches:
        t = time.perf_counter()
        results.append(step(batches))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[warmup:], results


def _speed(spec, mcfg, cfg, times, device, before):
    """tokens/s, MFU with and without attention FLOPs, peak memory: the details every train row carries."""
    dt = statistics.median(times)
    tok_s = cfg.grad_accum * cfg.batch_size * cfg.block_size / dt
    pf = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    attn = flops_per_token(mcfg, cfg.block_size)
    return tok_s, dict(
        group=spec["name"][0], step_ms=dt * 1e3, steps=len(times), micro_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum, block_size=cfg.block_size, layers=mcfg.num_hidden_layers,
        ac=cfg.activation_checkpointing, float8=cfg.float8, compile=cfg.compile, dtype=cfg.dtype,
        peak_mib=peak_bytes(device, before) / 2**20,
        mfu_pct=100 * attn * tok_s / pf if pf else None, flops_per_token=attn,
        # monitor.py's FLOPs count attention over the full T x T window (PaLM); a causal kernel does half of it
        mfu_attention="counted, full T x T window (monitor.flops_per_token)",
        mfu_pct_no_attention=100 * 6 * non_embedding_params(mcfg) * tok_s / pf if pf else None)


def _profile(step, batches, device, top=10):
    """One step under torch.profiler, so that a row whose goal is missed says why: the ops with the most self
    time (CUDA: the kernels, by GPU time) and the share of the step's span in which the GPU ran no kernel."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        step(batches)
        if cuda:
            torch.cuda.synchronize()
    kind, key = (DeviceType.CUDA, "self_device_time_total") if cuda else (DeviceType.CPU, "self_cpu_time_total")
    ops = sorted((e for e in prof.key_averages() if e.device_type == kind), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in ops)
    events = prof.events()
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    busy, end = 0, -math.inf  # the union of the kernels' intervals (streams overlap), in microseconds
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA):
        busy, end = busy + max(0, b - max(a, end)), max(end, b)
    return dict(span_ms=span / 1e3, clock="GPU kernels" if cuda else "CPU ops (self time)",
                gpu_idle_pct=100 * (1 - busy / span) if cuda and span else None,
                top=[dict(name=e.key[:120], ms=getattr(e, key) / 1e3, pct=100 * getattr(e, key) / total, calls=e.count)
                     for e in ops[:top]])


def _gpu_train(spec, path):
    """Our step, train.py's train_step, on the model parallel_model builds (float8, AC, compile), its random
    weights made on the device; a constant LR (the config's peak)."""
    cfg, device = load_config(spec["args"]), _device()
    mcfg, _, new_layers = shape(cfg, scratch_config(cfg, 0), {}, 0)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    model, _ = parallel_model(cfg, mcfg, new_layers, DTYPES[cfg.dtype], 1, device.type)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    model.init_weights()
    model.train()
    opt, guard, ctx = adamw(model, cfg), Guard(), _autocast(device, cfg.dtype)
    all_batches = _batches(cfg, mcfg.vocab_size, spec["warmup"] + spec["steps"], device)
    step = lambda b: train_step(model, opt, SCALER, b, ctx, cfg, guard, False, False, False)  # noqa: E731
    reset_peak(device)
    times, results = _steps(step, all_batches, spec["warmup"], device)
    tok_s, details = _speed(spec, mcfg, cfg, times, device, before)
    details["profile"] = _profile(step, all_batches[-1], device)  # after the peak was read: one more step
    losses = details["losses"] = [loss for loss, _, _, _ in results]
    skips = sum(verdict is not None for _, _, verdict, _ in results)  # a skipped step has no optimizer step
    details["status"] = f"measured; the guard skipped {skips} steps" if skips else "measured"
    base = load_rows(path).get(spec.get("baseline_row"), {})
    if base.get("ours"):  # float8 against its bf16 twin: the same batches, step by step
        details["loss_max_rel_diff"] = max(abs(a - b) / b for a, b in zip(losses, base["details"]["losses"]))
    return row(spec["name"], tok_s, base.get("ours"), "tok/s", "higher", **details)


def _gpu_hf(spec, path):
    """transformers.PhiForCausalLM, the same shape, AC and compile, in bench's plain HF loop; ours is the best
    row of (a), whose settings these are."""
    cfg, device = load_config(spec["args"]), _device()
    mcfg = shape(cfg, scratch_config(cfg, 0), {}, 0)[0]
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**mcfg.to_hf_dict()))
    if cfg.activation_checkpointing != "none":
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    model.train()
    opt, ctx = adamw(model, cfg), _autocast(device, cfg.dtype)
    all_batches = _batches(cfg, mcfg.vocab_size, spec["warmup"] + spec["steps"], device)
    reset_peak(device)
    times, _ = _steps(lambda b: hf_step(model, opt, b, ctx, cfg), all_batches, spec["warmup"], device)
    hf, details = _speed(spec, mcfg, cfg, times, device, before)
    ours = load_rows(path).get(spec["baseline_row"], {}).get("ours")
    return row(spec["name"], ours, hf, "tok/s", "higher", hf_tokens_per_s=hf, ours_row=spec["baseline_row"], **details)


def _paths_model(spec, device):
    """phi-2's width with few blocks, on the device: the paths that never ran need no more."""
    torch.manual_seed(0)
    with torch.device(device):
        return Phi(PhiConfig(**{**PRESETS[load_config(spec["args"]).model_preset], **spec["paths"]}))


def _gpu_ckpt_async(spec, path):
    """How long ckpt.save blocks the step loop with async_save (it returns once the tensors are staged on the
    host), against a synchronous save of the same state; both checkpoints verified."""
    cfg, device = load_config(spec["args"]), _device()
    model = _paths_model(spec, device)
    opt, ctx = adamw(model, cfg), _autocast(device, cfg.dtype)
    batches = _batches(cfg, model.cfg.vocab_size, 4, device)
    step = lambda b: train_step(model, opt, SCALER, b, ctx, cfg, Guard(), False, False, False)  # noqa: E731
    step(batches[0])  # AdamW's state exists
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        sync = ckpt.save(os.path.join(tmp, "sync"), 1, model, opt, {})
        sync_s = time.perf_counter() - t
        t = time.perf_counter()
        path_async = ckpt.save(os.path.join(tmp, "async"), 1, model, opt, {}, async_save=True)
        blocked = time.perf_counter() - t
        steps_s = _steps(step, batches[1:], 0, device)[0]  # the loop goes on while the files are written
        ckpt.wait()
        committed = time.perf_counter() - t
        bad = ckpt.verify(sync) + ckpt.verify(path_async)
        gb = sum(os.path.getsize(os.path.join(sync, f)) for f in os.listdir(sync)) / 1e9
    return row(spec["name"], blocked, sync_s, "s", "lower", committed_s=committed, gb=gb, verify_problems=bad,
               steps_while_writing_ms=[s * 1e3 for s in steps_s], params=sum(p.numel() for p in model.parameters()),
               note=None if device.type == "cuda" else "CPU: ckpt.save writes synchronously (async is CUDA only)")


def _offload_step(args, device):
    """-> seconds of one step (after a warm-up step) through train.py's setup and build_model."""
    cfg = load_config(args)
    device = train.setup(cfg)[2] if cfg.cpu_offload else device  # offloading is FSDP's: a one-rank group
    model, mcfg, sharded = build_model(cfg, 0, 0, 1, device, DTYPES[cfg.dtype])
    opt, guard = adamw(model, cfg), Guard()
    ctx = nullcontext() if sharded else _autocast(device, cfg.dtype)
    step = lambda b: train_step(model, opt, SCALER, b, ctx, cfg, guard, sharded, False, False)  # noqa: E731
    return _steps(step, _batches(cfg, mcfg.vocab_size, 2, device), 1, device)[0][0]


def _gpu_cpu_offload(spec, path):
    """One step with cpu_offload (FSDP keeps parameters, gradients and AdamW state in host memory), against the
    same step without it."""
    device = _device()
    if device.type != "cuda":
        return row(spec["name"], None, None, "ms", "lower", status="skipped: cpu_offload needs CUDA")
    with tempfile.TemporaryDirectory() as tmp:
        _paths_model(spec, "cpu").save_pretrained(tmp)
        args = spec["args"] + [f"--init_from={tmp}", "--expand_layers=0"]
        plain = _offload_step(args + ["--cpu_offload=False"], device)
        offload = _offload_step(args + ["--cpu_offload=True"], device)
    return row(spec["name"], offload * 1e3, plain * 1e3, "ms", "lower", baseline_is="the same step without it")


def _gpu_auto_batch(spec, path):
    """train.py's auto_batch_size (largest_micro_batch) from a micro-batch that cannot fit: halving on real
    out-of-memory errors to one whose forward and backward run (--smoke: the fault_oom_above test hook)."""
    cfg, device = load_config(spec["args"]), _device()
    model = _paths_model(spec, device)
    t = time.perf_counter()
    bs = largest_micro_batch(model, spec["oom_batch"], cfg.block_size, model.cfg.vocab_size, device,
                             _autocast(device, cfg.dtype), spec["fault_oom"])
    tried = [spec["oom_batch"] >> i for i in range(spec["oom_batch"].bit_length()) if spec["oom_batch"] >> i >= bs]
    return row(spec["name"], bs, None, "seqs", "higher", requested=spec["oom_batch"], out_of_memory_at=tried[:-1],
               block_size=cfg.block_size, seconds=time.perf_counter() - t, fault_hook=spec["fault_oom"] or None)


def _gpu_fp16(spec, path):
    """10 steps in float16 with the GradScaler through train_step: finite losses, the scale moving. The scaler is
    train.py's but grows after 2 clean steps (its default: 2000), so 10 steps show growth and back-off."""
    cfg, device = load_config(spec["args"] + ["--dtype=float16"]), _device()
    model = _paths_model(spec, device)
    opt, guard, ctx = adamw(model, cfg), Guard(), _autocast(device, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type, growth_interval=2)
    losses, scales, skipped = [], [], 0
    for batches in _batches(cfg, model.cfg.vocab_size, 10, device):
        loss, _, verdict, _ = train_step(model, opt, scaler, batches, ctx, cfg, guard, False, False, False)
        losses.append(loss)
        scales.append(scaler.get_scale())
        skipped += verdict is not None
    finite = sum(math.isfinite(v) for v in losses)
    return row(spec["name"], finite, len(losses), "steps", "higher", losses=losses, scales=scales,
               guard_skips=skipped, scale_moved=len(set(scales)) > 1)


def _gpu_nvml(spec, path):
    """The Monitor's system stats on this device: what metrics.jsonl gets every system_interval steps."""
    device = _device()
    with tempfile.TemporaryDirectory() as tmp:
        mon = Monitor(tmp, {}, tensorboard=False, system_interval=1, device=device)
        mon.log_step(1, dict(loss=1.0, dt=0.1, tokens=1))
        mon.finish({"stop_reason": "bench"})
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            record = json.loads(f.readline())
    gpu = {k: v for k, v in record.items() if k.startswith(("gpu/", "sys/"))}
    return row(spec["name"], sum(k.startswith("gpu/") for k in gpu), 4, "stats", "higher", **gpu)


def _row_main(spec, path):
    """A row in its own process: measured, then written to the JSON at once."""
    t = time.perf_counter()
    try:
        r = spec["fn"](spec, path)
    except torch.OutOfMemoryError:
        r = row(spec["name"], None, None, "tok/s", "higher", status="out of memory")
    except Exception as e:  # a row that breaks is a row of the table, with its one-line reason
        r = row(spec["name"], None, None, "-", "higher", status=f"error: {type(e).__name__}: {str(e)[:300]}")
    r["details"].setdefault("status", "measured")
    r["details"].update(wall_s=time.perf_counter() - t, args=spec.get("args"), device=str(_device()))
    save_row(path, r)
    print_table([r])


@dataclasses.dataclass
class GpuTable:
    """One --gpu-table call: where rows go, when the budget ends, the row processes' context and the simulations."""
    path: str
    shapes: dict
    deadline: float  # time.monotonic() after which no row starts
    mem_gib: float
    ctx: object  # multiprocessing context: forkserver, its server has imported bench once
    pool: ProcessPoolExecutor  # plan.py's simulations, on the host's cores while the device measures
    sims: dict = dataclasses.field(default_factory=dict)  # tuple(args) -> future of plan.plan


def simulate(t, args):
    """plan.py on these arguments for this device's memory, started once and shared. -> a future"""
    if tuple(args) not in t.sims:
        t.sims[tuple(args)] = t.pool.submit(plan.plan, list(args), 1, None, t.mem_gib)
    return t.sims[tuple(args)]


def planned(t, future):
    """A simulation's result, waited for within the budget. -> (plan.plan's dict, None) or (None, why not)"""
    try:
        return future.result(timeout=max(1.0, t.deadline - time.monotonic())), None
    except Exception as e:  # plan.py's own error, or the budget's end: the rows that need it say which
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def run_row(t, spec, sim_args=None):
    """One row in a fresh process (forked from the server), killed at its guard; each row that ends, however
    it ends, is in the JSON at once. sim_args: plan.py's arguments for the simulated peak beside the measured."""
    if spec["name"] in load_rows(t.path):  # measured already: the plan's largest was 4, or an earlier call
        return
    left = t.deadline - time.monotonic()
    if left < t.shapes["min_start"]:
        save_row(t.path, row(spec["name"], None, None, "-", "higher", status="not run: the budget ran out"))
        return
    future = simulate(t, sim_args) if sim_args else None
    guard = min(spec["guard"], left)
    proc = t.ctx.Process(target=_row_main, args=(spec, t.path))
    proc.start()
    proc.join(guard)
    if proc.is_alive():
        proc.kill()
        proc.join()
        save_row(t.path, row(spec["name"], None, None, "-", "higher", status=f"timed out after {guard:.0f} s"))
    elif spec["name"] not in load_rows(t.path):
        save_row(t.path, row(spec["name"], None, None, "-", "higher", status=f"crashed: exit code {proc.exitcode}"))
    r = load_rows(t.path)[spec["name"]]
    p, why = planned(t, future) if future and r["details"].get("peak_mib") else (None, None)
    if why:
        r["details"]["simulated"] = f"plan.py: {why}"
        save_row(t.path, r)
    if p:
        sim = p["peak_gib"] * 1024
        r["details"].update(simulated_mib=sim, simulated_over_measured=sim / r["details"]["peak_mib"])
        save_row(t.path, r)


def train_spec(t, name, args, steps=None, warmup=2, **extra):
    return dict(name=name, fn=_gpu_train, args=args, steps=steps or t.shapes["steps"], warmup=warmup,
                guard=t.shapes["guard"], **extra)


def _cuda_device():
    return torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30


def a_args(t, ac, mb):
    """(a)'s arguments: T=2048, sequences per optimizer step fixed, so micro-batches compare at the same
    optimizer cost (the recipe accumulates too)."""
    sh = t.shapes
    return sh["base"] + sh["short"] + [f"--activation_checkpointing={ac}", f"--batch_size={mb}",
                                       f"--grad_accum={max(1, sh['seqs'] // mb)}"]


def a_row(t, ac, mb, largest):
    """A row of (a): AC mode ac at micro-batch mb ("largest": the plan's), where the plan says it fits."""
    p, why = planned(t, largest)
    fit = p["max_batch_size"] if p else None
    mb = fit if mb == "largest" else mb
    name = f"a/ac={ac},mb={mb or 'largest'}"
    if fit is None:
        save_row(t.path, row(name, None, None, "-", "higher", status=f"not run: plan.py: {why}"))
    elif not mb or mb > fit:
        save_row(t.path, row(name, None, None, "-", "higher", status=f"skipped: does not fit (plan.py's largest "
                                                                       f"micro-batch: {fit})"))
    else:
        run_row(t, train_spec(t, name, a_args(t, ac, mb)), a_args(t, ac, mb))


def best_row(t):
    """The measured row of (a) with the most tokens/s, or None."""
    rows = [r for n, r in load_rows(t.path).items() if n.startswith("a/") and r["ours"]]
    return max(rows, key=lambda r: r["ours"], default=None)


def gpu_table(path, smoke, groups, budget, command):
    """The rows of issue 25, most important first: (a) phi-2's real shape at T=2048, each AC mode at the plan's
    largest micro-batch; (b) float8 on the best of (a); (c) T=32,768; (d) HF at the best of (a); (e) the CUDA
    paths that never ran; then the rest of (a)'s micro-batch x AC grid (1, 2 and 4). Each row is one process with a time
    guard, written to the JSON when it ends; no row starts after the budget. An existing JSON from the same
    device is continued: rows measured (or skipped by the plan) stay, the others are run again."""
    cuda = torch.cuda.is_available()
    if not (cuda or smoke):
        raise ValueError("--gpu-table needs a CUDA device; --gpu-table --smoke runs it on the CPU")
    sh = GPU_SHAPES["smoke" if smoke else "real"]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["bench"])  # a row's process starts in milliseconds, CUDA untouched in the server
    device, mem = f"cpu ({os.cpu_count()} cores)", sh["mem_gib"] if not cuda else None
    if cuda:  # asked in a process that ends: a CUDA context here would hold GPU memory the rows need
        with ProcessPoolExecutor(1, mp_context=ctx) as ex:
            device, mem = ex.submit(_cuda_device).result()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    call = dict(command=command, date=datetime.date.today().isoformat(), commit=commit, torch=torch.__version__,
                budget_s=budget or sh["budget"])
    table = dict(device=device, memory_gib=mem, calls=[], results=[])
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        if table.get("device") != device:
            raise ValueError(f"{path} holds rows measured on {table.get('device')}, this is {device}: "
                             f"pass another --json")
        table["results"] = [r for r in table["results"] if r["details"].get("status", "").startswith(
            ("measured", "skipped"))]
    table["calls"].append(call)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    long_ = sh["base"] + sh["long"]
    acs = ("none", "op", "full")
    with ProcessPoolExecutor(2 if smoke else 4, mp_context=ctx) as pool:  # 4: cores left for compile
        t = GpuTable(path, sh, time.monotonic() + (budget or sh["budget"]), mem, ctx, pool)
        largest = {ac: simulate(t, a_args(t, ac, 1)[:-1] + [f"--grad_accum={sh['limit']}"]) for ac in acs}
        largest_long = {ac: simulate(t, long_ + [f"--activation_checkpointing={ac}", "--batch_size=1",
                                                 f"--grad_accum={sh['long_limit']}"]) for ac in ("full", "op")}
        if "a" in groups:  # op at 1 first: the plan's largest micro-batches are simulated meanwhile
            for ac, mb in (("op", 1), ("none", "largest"), ("op", "largest"), ("full", "largest")):
                a_row(t, ac, mb, largest[ac])
        best = best_row(t)
        if best is None and groups & {"b", "d"}:
            print("bench: no row of (a) measured: (b) and (d) need its best setting", flush=True)
        if "b" in groups and best:  # its bf16 twin again, for the same steps' losses and speed in one run
            args, steps = best["details"]["args"], sh["loss_steps"] - 2
            run_row(t, train_spec(t, "b/bf16", args, steps=steps), args)
            for recipe in ("tensorwise", "rowwise"):
                f8 = args + [f"--float8={recipe}"]
                run_row(t, train_spec(t, f"b/float8={recipe}", f8, steps=steps, baseline_row="b/bf16"), f8)
        if "c" in groups:
            for ac in ("full", "op"):
                p, why = planned(t, largest_long[ac])
                mb = p["max_batch_size"] if p else None
                name = f"c/T={long_[-1].split('=')[1]},ac={ac},mb={mb or 'largest'}"
                if not mb:
                    save_row(t.path, row(name, None, None, "-", "higher", status="skipped: does not fit at micro-"
                                         "batch 1 (plan.py)" if p else f"not run: plan.py: {why}"))
                    continue
                args = long_ + [f"--activation_checkpointing={ac}", f"--batch_size={mb}", "--grad_accum=1"]
                spec = train_spec(t, name, args, steps=sh["long_steps"], warmup=1)
                run_row(t, dict(spec, guard=sh["long_guard"]), args)
        if "d" in groups and best:  # HF's loss makes full fp32 logits: at an out-of-memory, half the micro-batch
            args = best["details"]["args"]
            for name in ("d/hf", "d/hf,half micro-batch"):
                run_row(t, dict(name=name, fn=_gpu_hf, args=args, steps=sh["steps"], warmup=2, guard=sh["guard"],
                                baseline_row=best["name"]))
                if load_rows(t.path)[name]["details"]["status"] != "out of memory":
                    break
                mb, accum = best["details"]["micro_batch"] // 2, best["details"]["grad_accum"] * 2
                args = args + [f"--batch_size={max(1, mb)}", f"--grad_accum={accum}"]
        if "e" in groups:
            args = sh["base"] + sh["short"] + ["--compile=False", "--activation_checkpointing=none", "--batch_size=1",
                                               "--grad_accum=1"]
            for name, fn in (("e/ckpt_async", _gpu_ckpt_async), ("e/cpu_offload", _gpu_cpu_offload),
                             ("e/auto_batch_size", _gpu_auto_batch), ("e/fp16_scaler", _gpu_fp16),
                             ("e/nvml", _gpu_nvml)):
                run_row(t, dict(name=name, fn=fn, args=args, paths=sh["paths"], oom_batch=sh["oom_batch"],
                                fault_oom=sh["fault_oom"], guard=sh["paths_guard"]))
        if "a" in groups:  # the rest of the grid: the micro-batch curve of each AC mode
            for mb in (1, 2, 4):
                for ac in acs:
                    a_row(t, ac, mb, largest[ac])
        pool.shutdown(cancel_futures=True)  # simulations no row waits for any more
    rows = list(load_rows(path).values())
    print_table(rows)
    return rows


# -- output ------------------------------------------------------------------------------------------------------------

def row(name, ours, baseline, unit, better, **details):
    ratio = ours / baseline if ours is not None and baseline else None
    return dict(name=name, ours=ours, baseline=baseline, unit=unit, ratio=ratio, better=better, details=details)


def fmt(v):
    return "-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def print_table(rows):
    print(f"{'measurement':<28}{'ours':>12}{'baseline':>12}  {'unit':<8}{'ratio':>8}  better")
    for r in rows:
        print(f"{r['name']:<28}{fmt(r['ours']):>12}{fmt(r['baseline']):>12}  {r['unit']:<8}{fmt(r['ratio']):>8}  "
              f"{r['better']}")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments are train.py's: config files and --key=value flags.")
    p.add_argument("--config", action="append", default=[], help="a train.py config file (default config/tiny.py)")
    p.add_argument("--what", default="train,ckpt,archive,loader,prepare,monitor", help="comma-separated measurements")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="small shapes and few steps: under a minute on a CPU")
    p.add_argument("--gpu-table", action="store_true", help="one H100/H200, issue 25's rows (see gpu_table)")
    p.add_argument("--rows", default="a,b,c,d,e", help="--gpu-table: the groups of rows to run")
    p.add_argument("--budget", type=float, help="--gpu-table: seconds after which no row starts (450; smoke 90)")
    p.add_argument("--steps", type=int, default=None, help="measured training steps of each side")
    a, rest = p.parse_known_args(argv)
    if a.gpu_table:
        groups = set(a.rows.split(","))
        if groups - set("abcde"):
            raise ValueError(f"--rows: unknown group {sorted(groups - set('abcde'))[0]!r}; use a,b,c,d,e")
        gpu_table(a.json or "out/gpu_table.json", a.smoke, groups, a.budget, "python bench.py " + " ".join(argv))
        return
    files = a.config + [x for x in rest if not x.startswith("--")] or ["config/tiny.py"]
    flags = ["--batch_size=4", "--block_size=64"] if a.smoke else []
    flags += [x for x in rest if x.startswith("--")]  # the user's flags win
    args = files + flags
    what = set(a.what.split(","))
    unknown = what - {"train", "ckpt", "archive", "loader", "prepare", "monitor"}
    if unknown:
        raise ValueError(f"--what: unknown measurement {sorted(unknown)[0]!r}; "
                         f"use train,ckpt,archive,loader,prepare,monitor")
    steps = a.steps or (3 if a.smoke else 30)
    cfg = load_config(args)
    model_config(cfg)
    rows, consumed = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("train", "ckpt", "prepare", "loader", "monitor", "archive"):  # zstd's threads, then no fork
            if name not in what and not (name == "prepare" and "loader" in what):
                continue
            t = time.perf_counter()
            if name == "train":
                r, consumed = bench_train(args, steps, 1 if a.smoke else 3)
            elif name == "ckpt":
                r = bench_ckpt(tmp, (4 << 20) if a.smoke else (32 << 20), 1 if a.smoke else 3)
            elif name == "archive":
                r = bench_archive(tmp, a.smoke)
            elif name == "prepare":  # also makes the loader's data
                r, data_dir = bench_prepare(tmp, a.smoke, 512 if a.smoke else cfg.tokenizer_vocab)
                r = r if "prepare" in what else []
            elif name == "loader":
                if consumed is None:  # a short measured run of our step, in this process
                    run = train_side("ours", args, 3, 1)
                    clock = "cpu_times" if run["device"] == "cpu" else "times"
                    consumed = cfg.grad_accum / statistics.median(run[clock])
                r = bench_loader(cfg, data_dir, 50 if a.smoke else 500, consumed)
            else:
                r = bench_monitor(cfg, tmp, 2 if a.smoke else 8)
            rows += r
            print(f"bench: {name} done in {time.perf_counter() - t:.0f}s", flush=True)
    print_table(rows)
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
        out = dict(command="python bench.py " + " ".join(argv), date=datetime.date.today().isoformat(),
                   commit=commit, device=device, torch_threads=torch.get_num_threads(), results=rows)
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
