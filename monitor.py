"""
Training metrics for sheikh-coder: console line, metrics.jsonl, TensorBoard, W&B, system stats, run summary.

    mon = Monitor(out_dir, config, rank=rank, wandb_mode="offline", device=device,
                  flops_per_token=flops_per_token(model_cfg, block_size))
    mon.log_step(step, {"loss": 2.31, "lr": 3e-4, "grad_norm": 0.9, "tokens": 65536, "dt": 0.41, "data_wait": 0.002})
    mon.log_eval(step, {"val_loss": 2.1, "val_loss/xml": 1.9, "val_acc/xml": 0.61})
    mon.event(step, "lr_reduced", "val_loss flat for 3 evals", lr=1.5e-4)
    mon.finish({"stop_reason": "max_steps", "tokens": 6.5e7, "checkpoints": [...], "export_path": "out/hf"})

Only rank 0 writes; on other ranks every call returns at once. Nothing here syncs the GPU: pass plain
floats, not tensors, and call log_step every log_interval steps (a call costs well under a millisecond
with TensorBoard, about a millisecond more with W&B).

metrics.jsonl holds one object per call, each with step, kind ("train" | "eval" | "event") and time (unix s):
  train: the metrics given, plus ppl, tok_per_s (global), tok_per_s_device, tflops (achieved, per device),
         mfu (% of the device's peak; null when unknown or CPU), mem/allocated_gib, mem/reserved_gib,
         mem/peak_gib (CUDA only), mem/rss_gib; every system_interval steps sys/cpu_pct, sys/ram_used_gib,
         sys/ram_pct, sys/disk_free_gib and, with NVML, gpu/util_pct, gpu/mem_used_gib, gpu/temp_c,
         gpu/power_w; plus whatever the callbacks return.
  eval:  the metrics given, plus val_ppl<suffix> for each val_loss<suffix> (e.g. val_ppl/xml).
  event: event, reason and the extra keyword arguments.
TensorBoard tags and W&B keys equal the JSON keys (numbers only, nulls skipped); an event becomes the
scalar event/<name> = 1 (its numeric extras event/<name>/<key>) and TensorBoard text under "events".
Files: out_dir/metrics.jsonl, out_dir/tb/, out_dir/wandb/ (or $WANDB_DIR), out_dir/summary.{json,md}.
"""
import importlib
import json
import os
import secrets
import statistics
import string
import sys
import time

import psutil
import torch
from tensorboard.compat.proto.summary_pb2 import Summary

from evals.loss import perplexity


class MonitorError(ValueError):
    pass


WANDB_INIT_TIMEOUT = 15  # seconds; wandb's own default (90 s, with retries) stalls runs on nodes without network


# -----------------------------------------------------------------------------
# FLOPs and MFU

def non_embedding_params(cfg):
    """Parameters a token's matmuls touch: all of Phi except embed_tokens (a lookup, no FLOPs).
    lm_head is a real (d x V) matmul, so it counts, as in torchtitan and the PaLM appendix."""
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H = cfg.num_attention_heads
    q = d // H
    kv = (getattr(cfg, "num_key_value_heads", None) or H) * q
    attn = 2 * (d * d + d) + 2 * (d * kv + kv)  # q_proj + dense, k_proj + v_proj (all with bias)
    mlp = (d * f + f) + (f * d + d)  # fc1, fc2
    norms = 2 * d + (4 * q if getattr(cfg, "qk_layernorm", False) else 0)  # input_layernorm (+ q/k layernorm)
    return L * (attn + mlp + norms) + 2 * d + (d * V + V)  # + final_layernorm + lm_head


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token: 6*N + 12*L*H*Q*T (PaLM appendix B). Forward+backward of every weight,
    plus attention scores and weighted sum over the full (unmasked) T x T window."""
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    return float(6 * non_embedding_params(cfg) + 12 * L * H * (cfg.hidden_size // H) * seq_len)


# Per device: dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s and memory in GiB, from the vendors'
# datasheets (memory as the driver reports it: an "80GB" H100 shows 81,559 MiB). Each entry's words must all
# appear in the lower-cased device name; the first match wins. plan.py takes --gpu names from here too.
DEVICES = [
    (("h100", "nvl"), 835e12, 93.6),
    (("h100", "pcie"), 756e12, 79.6),
    (("h100",), 989e12, 79.6),  # SXM: "NVIDIA H100 80GB HBM3"
    (("h200", "nvl"), 835e12, 140.4),
    (("h200",), 989e12, 140.4),
    (("gh200",), 989e12, 95.6),  # the 96 GB HBM3 version
    (("b200",), 2250e12, 178.4),
    (("a100", "40gb"), 312e12, 39.4),
    (("a100",), 312e12, 79.3),
    (("a10g",), 125e12, 22.5),  # NVIDIA publishes no A10G sheet; taken equal to the A10
    (("a10",), 125e12, 22.5),
    (("l40s",), 362e12, 45.0),
    (("l40",), 181e12, 45.0),
    (("l4",), 121e12, 22.5),
    (("4090",), 165.2e12, 24.0),  # GeForce: bf16 with fp32 accumulate, which is what PyTorch uses
    (("v100",), 125e12, 31.7),  # fp16 only; the 32 GB version
    (("t4",), 65e12, 15.0),  # fp16 only
    (("mi300x",), 1307.4e12, 192.0),
    (("mi325x",), 1307.4e12, 256.0),
]


def device_spec(device_name):
    """(peak FLOP/s, memory GiB) of a device from its name (torch.cuda.get_device_name, or plan.py's --gpu),
    or (None, None) when unknown (CPU too)."""
    words = set("".join(c if c.isalnum() else " " for c in device_name.lower()).split())
    for need, flops, gib in DEVICES:
        if words.issuperset(need):
            return flops, gib
    return None, None


def peak_flops(device_name):
    return device_spec(device_name)[0]


# -----------------------------------------------------------------------------

def _load_callback(path):
    mod, sep, name = path.partition(":")
    if not (sep and mod and name):
        raise MonitorError(f"callback {path!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except AttributeError:
        raise MonitorError(f"callback {path!r}: module {mod!r} has no attribute {name!r}") from None
    except Exception as e:  # ImportError, or the module itself failed
        raise MonitorError(f"callback {path!r}: cannot import {mod!r}: {type(e).__name__}: {e}; "
                           f"fix the path or PYTHONPATH") from None
    if not callable(fn):
        raise MonitorError(f"callback {path!r} is not callable")
    return fn


def _one_line(e):
    """An exception as one short line: wandb and pydantic put the useful part on later lines."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:300]}"


def _count(n):
    """12,345,678 -> '12.3M': token counts on a step line."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _gib(n):
    return n / 2**30


def _fmt(v):
    """How summary.md and the console print a number; tests compare against this."""
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


class Monitor:
    def __init__(self, out_dir, config, rank=0, tensorboard=True, wandb_mode="disabled",
                 wandb_project="sheikh-coder", run_id=None, callbacks=(), system_interval=50,
                 flops_per_token=None, device=None):
        # callbacks resolve on every rank, so a bad path stops all ranks alike
        self.callbacks = [(p, _load_callback(p)) for p in callbacks]
        mode = os.environ.get("WANDB_MODE") or wandb_mode  # the environment wins, as with wandb itself
        if mode not in ("online", "offline", "disabled"):
            raise MonitorError(f"wandb_mode {mode!r}: use online, offline or disabled (check WANDB_MODE)")
        self.run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.active = rank == 0
        if not self.active:
            return
        self.out_dir = str(out_dir)
        self.config = dict(config)
        self.system_interval = system_interval
        self.flops_per_token = flops_per_token
        self.device = torch.device(device or "cpu")
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.cuda = self.device.type == "cuda"
        self.device_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.peak_flops = peak_flops(self.device_name)
        self.t0 = time.time()
        self.last_sys_step = None
        self.process = psutil.Process()
        psutil.cpu_percent()  # the first call only starts the measuring window
        os.makedirs(self.out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(self.out_dir, "metrics.jsonl"), "a+b", buffering=0)
        if self.jsonl.seek(0, os.SEEK_END) and (self.jsonl.seek(-1, os.SEEK_END), self.jsonl.read(1))[1] != b"\n":
            self.jsonl.write(b"\n")  # end the line a crash tore, so the next record parses
        self.nvml = self._init_nvml() if self.cuda else None
        self.tb = self._init_tensorboard() if tensorboard else None
        self.wandb = self._init_wandb(mode, wandb_project) if mode != "disabled" else None

    def _warn(self, msg):
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def _init_nvml(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            try:  # NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so match by UUID
                uuid = str(torch.cuda.get_device_properties(self.device).uuid)
                return pynvml, pynvml.nvmlDeviceGetHandleByUUID(("GPU-" + uuid).encode())
            except Exception:
                return pynvml, pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
        except Exception as e:
            self._warn(f"GPU stats off (NVML): {_one_line(e)}")
            return None

    def _init_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            tb = SummaryWriter(os.path.join(self.out_dir, "tb"), flush_secs=30)
            hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.config.items()}
            for s in hparams(hp, {"loss": 0.0, "val_loss": 0.0}):  # links hparams to the scalar tags of this run
                tb.file_writer.add_summary(s)
            return tb
        except Exception as e:
            self._warn(f"TensorBoard off: {_one_line(e)}")
            return None

    def _init_wandb(self, mode, project):
        try:
            import wandb
        except ImportError:
            self._warn("W&B off: wandb is not installed (pip install wandb, or wandb_mode=disabled)")
            return None
        try:
            settings = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT, silent=True, console="off")
            wandb.setup(settings)  # silences wandb's own lines too (login, sync hints): our warning is the one line
            run = wandb.init(project=project, id=self.run_id, resume="allow", mode=mode, config=self.config,
                             dir=os.environ.get("WANDB_DIR", self.out_dir), settings=settings)
            run.define_metric("*", step_metric="step")  # our step, so rollbacks and resumes may revisit steps
            return run
        except Exception as e:
            self._warn(f"W&B off: {_one_line(e)}")
            return None

    def _system_stats(self):
        vm = psutil.virtual_memory()
        s = {"sys/cpu_pct": psutil.cpu_percent(), "sys/ram_used_gib": _gib(vm.total - vm.available),
             "sys/ram_pct": vm.percent, "sys/disk_free_gib": _gib(psutil.disk_usage(self.out_dir).free)}
        if self.nvml:
            nv, h = self.nvml
            try:
                s["gpu/util_pct"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                s["gpu/mem_used_gib"] = _gib(nv.nvmlDeviceGetMemoryInfo(h).used)
                s["gpu/temp_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
                s["gpu/power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception as e:
                self._warn(f"GPU stats off (NVML): {_one_line(e)}")
                self.nvml = None
        return s

    def _write(self, record, scalars):
        """record -> metrics.jsonl; scalars (numbers only) -> TensorBoard and W&B at record['step']."""
        self.jsonl.write((json.dumps(record, default=str) + "\n").encode())  # one unbuffered write per record
        step = record["step"]
        if self.tb:  # one event holding every scalar: ~10x cheaper than add_scalar per tag
            values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
            self.tb.file_writer.add_summary(Summary(value=values), step)
        if self.wandb:
            try:
                self.wandb.log({"step": step, **scalars})
            except Exception as e:
                self._warn(f"W&B off: {_one_line(e)}")
                self.wandb = None

    def log_step(self, step, metrics, model=None):
        """metrics from train.py: loss, lr, grad_norm, tokens (global, this step), tokens_seen (global, so far),
        epochs/<lang> (epochs of each language's train stream so far), dt (s), data_wait (s)."""
        if not self.active:
            return
        m = {k: (v if v is None or isinstance(v, int) else float(v)) for k, v in metrics.items()}
        if m.get("loss") is not None:
            m["ppl"] = perplexity(m["loss"])
        if m.get("tokens") and m.get("dt"):
            m["tok_per_s"] = m["tokens"] / m["dt"]
            m["tok_per_s_device"] = m["tok_per_s"] / self.world_size
            if self.flops_per_token:
                flops = self.flops_per_token * m["tok_per_s_device"]
                m["tflops"] = flops / 1e12
                m["mfu"] = 100 * flops / self.peak_flops if self.peak_flops else None  # percent of peak
        if self.cuda:  # allocator counters live on the host: no sync
            m["mem/allocated_gib"] = _gib(torch.cuda.memory_allocated(self.device))
            m["mem/reserved_gib"] = _gib(torch.cuda.memory_reserved(self.device))
            m["mem/peak_gib"] = _gib(torch.cuda.max_memory_allocated(self.device))
        m["mem/rss_gib"] = _gib(self.process.memory_info().rss)
        if self.last_sys_step is None or step - self.last_sys_step >= self.system_interval:
            self.last_sys_step = step
            m.update(self._system_stats())
        for path, fn in list(self.callbacks):
            try:
                m.update({k: float(v) for k, v in (fn(step, m, model) or {}).items()})
            except Exception as e:
                self._warn(f"callback {path} off: {_one_line(e)}")
                self.callbacks.remove((path, fn))
        self._write({"step": step, "kind": "train", "time": time.time(), **m},
                    {k: v for k, v in m.items() if isinstance(v, (int, float))})
        line = f"step {step}"
        for key, label, fmt in (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("grad_norm", "norm", ".3f")):
            if m.get(key) is not None:
                line += f" | {label} {m[key]:{fmt}}"
        if m.get("dt"):
            line += f" | {m['dt'] * 1000:.1f}ms"
            if m.get("data_wait") is not None:
                line += f" (data {m['data_wait'] * 1000:.1f}ms)"
        if m.get("tok_per_s"):
            line += f" | {m['tok_per_s']:,.0f} tok/s"
        if m.get("tflops") is not None:
            line += f" | {m['tflops']:.3g} TFLOP/s"
        if m.get("mfu") is not None:
            line += f" | mfu {m['mfu']:.1f}%"
        if m.get("tokens_seen") is not None:
            line += f" | {_count(m['tokens_seen'])} tok seen"
        epochs = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("epochs/")}
        if epochs:
            line += " | epochs " + " ".join(f"{lang} {v:.3g}" for lang, v in epochs.items())
        if self.cuda:
            line += f" | mem {m['mem/peak_gib']:.1f}GiB"
        print(line, flush=True)

    def log_eval(self, step, metrics):
        """e.g. {"val_loss": .., "val_loss/xml": .., "val_acc/xml": ..}; val_ppl* is added for each val_loss*."""
        if not self.active:
            return
        m = {k: (None if v is None else float(v)) for k, v in metrics.items()}
        for k in [k for k in m if k.startswith("val_loss") and m[k] is not None]:
            m.setdefault("val_ppl" + k[len("val_loss"):], perplexity(m[k]))
        self._write({"step": step, "kind": "eval", "time": time.time(), **m},
                    {k: v for k, v in m.items() if v is not None})
        if self.tb:
            self.tb.flush()
        print(f"eval step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in m.items()), flush=True)

    def event(self, step, event, reason, **extra):
        """Early-stopping events: patience, lr_reduced, skip, rollback, stop; extra numbers become scalars too."""
        if not self.active:
            return
        nums = {f"event/{event}/{k}": float(v) for k, v in extra.items() if isinstance(v, (int, float))}
        self._write({"step": step, "kind": "event", "time": time.time(), "event": event, "reason": reason, **extra},
                    {f"event/{event}": 1.0, **nums})
        if self.tb:
            self.tb.add_text("events", f"{event}: {reason}", step)
        more = "".join(f", {k}={v}" for k, v in extra.items())
        print(f"event step {step} | {event}: {reason}{more}", flush=True)

    def finish(self, info):
        """Write summary.json + summary.md from metrics.jsonl and info, then close every sink.
        info: stop_reason, tokens, steps, best_metric, best_step, best_metric_name, higher_is_better, checkpoints,
        export_path, final_eval (dict); anything missing is taken from metrics.jsonl where it can be."""
        if not self.active:
            return None
        self.jsonl.close()
        s = summarize(self.out_dir, info, self.config, time.time() - self.t0, self.run_id, self.device_name)
        with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
            json.dump(s, f, indent=2, default=str)
        plot_run(self.out_dir, os.path.join(self.out_dir, "loss.png"))
        with open(os.path.join(self.out_dir, "summary.md"), "w") as f:
            f.write(summary_md(s))
        if self.tb:
            self.tb.close()
        if self.wandb:
            try:
                self.wandb.summary.update({k: v for k, v in s.items() if isinstance(v, (int, float, str))})
                self.wandb.finish()
            except Exception as e:
                self._warn(f"W&B finish failed: {_one_line(e)}")
        if self.nvml:
            self.nvml[0].nvmlShutdown()
        self.active = False
        return s


# -----------------------------------------------------------------------------
# run summary

def read_metrics(out_dir):
    """metrics.jsonl -> (train steps, evals, events). A later record for the same step (after a resume
    or a rollback) replaces the earlier one."""
    steps, evals, events = {}, {}, []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash
                continue
            if r["kind"] == "event":
                events.append(r)
            else:
                (steps if r["kind"] == "train" else evals)[r["step"]] = r
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)], events


def _median(records, key):
    vals = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _max(records, key):
    vals = [r[key] for r in records if r.get(key) is not None]
    return max(vals) if vals else None


def summarize(out_dir, info, config, wall_time_s, run_id, device_name):
    steps, evals, events = read_metrics(out_dir)
    best_name = info.get("best_metric_name", "val_loss")
    best, best_step = info.get("best_metric"), info.get("best_step")
    if best is None:  # not given: the best eval record, in the direction info says (lower by default)
        scored = [r for r in evals if r.get(best_name) is not None]
        if scored:
            pick = max if info.get("higher_is_better") else min
            b = pick(scored, key=lambda r: r[best_name])
            best, best_step = b[best_name], b["step"]
    final_eval = info.get("final_eval")
    if final_eval is None and evals:
        final_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "kind", "time")}
    return {
        "run_id": run_id,
        "stop_reason": info.get("stop_reason"),
        "steps": info.get("steps", steps[-1]["step"] if steps else 0),
        "tokens": info.get("tokens", sum(r.get("tokens") or 0 for r in steps)),
        "epochs": info.get("epochs") or {k.split("/", 1)[1]: v for k, v in (steps[-1] if steps else {}).items()
                                         if k.startswith("epochs/")},  # of each language's train stream
        "wall_time_s": info.get("wall_time_s", wall_time_s),  # train.py may add up resumed sessions
        "device": device_name,
        "final_loss": steps[-1]["loss"] if steps else None,
        "best_metric_name": best_name,
        "best_metric": best,
        "best_step": best_step,
        "median_tok_per_s": _median(steps, "tok_per_s"),
        "median_tflops": _median(steps, "tflops"),
        "median_mfu": _median(steps, "mfu"),
        "peak_mem_gib": _max(steps, "mem/peak_gib"),
        "peak_rss_gib": _max(steps, "mem/rss_gib"),
        "trainable_params": info.get("trainable_params"),  # of the whole model, not one rank's shard
        "final_eval": final_eval or {},
        "events": [{"step": e["step"], "event": e["event"], "reason": e["reason"]} for e in events],
        "checkpoints": list(info.get("checkpoints", [])),
        "export_path": info.get("export_path"),
        "config": {k: v for k, v in config.items() if v is None or isinstance(v, (int, float, str, bool))},
    }


MARKED = {"lr_reduced": "tab:orange", "rollback": "tab:red", "skip": "tab:purple", "stop": "tab:gray"}


def plot_run(out_dir, path):
    """A small PNG: train loss and each language's val loss by step, the LR on the right axis, and the eval events
    (LR cuts, rollbacks, skipped steps, early stop) as dotted lines. Returns path, or None with nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    steps, evals, events = read_metrics(out_dir)
    if not steps:
        return None
    fig = Figure(figsize=(7, 3.6), dpi=90)
    ax = fig.subplots()
    ax.plot([r["step"] for r in steps if "loss" in r], [r["loss"] for r in steps if "loss" in r], color="black", lw=1,
            label="train")
    for key in sorted({k for r in evals for k in r if k.startswith("val_loss/")}):
        pts = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        ax.plot(*zip(*pts), marker=".", ms=3, lw=1, label=f"val {key.split('/', 1)[1]}")
    for e in events:
        if e["event"] in MARKED:
            ax.axvline(e["step"], color=MARKED[e["event"]], ls=":", lw=1.2)
    for name, color in MARKED.items():  # one legend entry per kind of event that happened
        if any(e["event"] == name for e in events):
            ax.plot([], [], color=color, ls=":", label=name)
    ax.set(xlabel="step", ylabel="loss")
    ax.legend(fontsize=7, ncol=2)
    lr = ax.twinx()
    lr.plot([r["step"] for r in steps if "lr" in r], [r["lr"] for r in steps if "lr" in r], color="tab:gray", lw=0.8,
            alpha=0.6)  # callers of log_step may leave out the LR
    lr.set_ylabel("LR", color="tab:gray")
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path, **kw):
    """Save matplotlib Figure `fig` as PNG `path` under a temporary name, then rename it: a reader (a markdown
    viewer, a sync to the Hub) never sees half a picture. kw go to savefig. Returns path."""
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp, **kw)
    os.replace(tmp, path)
    return path


def summary_md(s):
    rows = [
        ("stop reason", s["stop_reason"] or "n/a"),
        ("steps", _fmt(s["steps"])),
        ("tokens", _fmt(s["tokens"])),
        ("epochs of each train stream", ", ".join(f"{lang} {_fmt(v)}" for lang, v in s["epochs"].items()) or "n/a"),
        ("wall time (s)", _fmt(s["wall_time_s"])),
        ("device", s["device"]),
        ("final train loss", _fmt(s["final_loss"])),
        (f"best {s['best_metric_name']}", f"{_fmt(s['best_metric'])} at step {_fmt(s['best_step'])}"),
        ("median tok/s", _fmt(s["median_tok_per_s"])),
        ("median TFLOP/s per device", _fmt(s["median_tflops"])),
        ("median MFU (%)", _fmt(s["median_mfu"])),
        ("peak CUDA memory (GiB)", _fmt(s["peak_mem_gib"])),
        ("peak process RSS (GiB)", _fmt(s["peak_rss_gib"])),
        ("trainable parameters", _fmt(s["trainable_params"])),
        ("HF export", s["export_path"] or "n/a"),
    ]
    out = [f"# Run summary: {s['run_id']}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", "![train and val loss, LR and events](loss.png)"] * (s["final_loss"] is not None)  # plot_run's
    out += ["", "## Final eval", "", "| metric | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v)} |" for k, v in s["final_eval"].items()]
    out += ["", "## Events", ""] + [f"- step {e['step']}: {e['event']}: {e['reason']}" for e in s["events"]]
    out += ["(none)"] * (not s["events"])
    out += ["", "## Checkpoints", ""] + [f"- {c}" for c in s["checkpoints"]] + ["(none)"] * (not s["checkpoints"])
    out += ["", "## Config", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {_fmt(v) if isinstance(v, float) else v} |" for k, v in s["config"].items()]
    return "\n".join(out) + "\n"
