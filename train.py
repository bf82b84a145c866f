"""Continued pre-training of Phi (phi-2 -> Sheikh-2.5-Coder) with FSDP2, in one file that reads top to bottom.

  python train.py config/tiny.py                              # laptop CPU: synthetic corpus, a few minutes
  torchrun --nproc_per_node=8 train.py config/phi2_xml.py     # one 8-GPU node
  python train.py config/tiny.py --max_iters=200 --dtype=float32   # later files and flags override earlier ones

Every option, its default and its meaning is in `Config` below; nothing else decides how training runs.
"""
import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor

import ckpt
import cluster
import config
import remote
from data.fim import check_rates
from data.format import data_tokenizer
from data.loader import DataError, TokenLoader, read_meta
from evals.domain import quick_domain_metrics
from evals.loss import lang_metrics, val_sets
from model.export import export
from model.parallel import build_model, float8_scales, largest_micro_batch
from model.phi import ModelLoadError
from monitor import Monitor, flops_per_token


@dataclass
class Config:
    # data and output
    out_dir: str = "out"                  # checkpoints, metrics.jsonl, TensorBoard, summary, best/ export
    data_dir: str = "data/tiny"           # output of data/prepare.py: meta.json + {split}_{lang}.bin
    synthetic_docs: int = 0               # >0: prepare this many synthetic documents in data_dir if it is empty
    tokenizer_vocab: int = 2048           # BPE vocabulary trained for the synthetic corpus
    mixture: dict = field(default_factory=dict)  # language weights, e.g. {"xml": 0.4, "py": 0.1}; {} = by token count
    fim_rate: float = 0.0                 # fraction of documents rearranged for fill-in-the-middle (StarCoder: 0.5)
    fim_spm_rate: float = 0.5             # of those, the fraction in suffix-prefix-middle order (StarCoder: 0.5)
    init_from: str = "scratch"            # "scratch", or a local HF directory such as a phi-2 download
    model_preset: str = "tiny"            # PhiConfig preset when init_from="scratch"
    resume: str = "auto"                  # "auto": newest verified checkpoint in out_dir; "never"; or a checkpoint path
    # schedule
    max_iters: int = 0                    # optimizer steps; 0: from train_tokens (set exactly one of the two)
    train_tokens: float = 0.0             # token budget, e.g. 500e9: max_iters = train_tokens / tokens per step
    eval_interval: int = 100              # steps between evals; early stopping decides at each eval
    eval_iters: int = 8                   # val batches per language per eval
    eval_domain_prompts: int = 0          # >0: also score XML/MDX/JS validity of greedy completions (domain_valid...)
    eval_domain_tokens: int = 128         # tokens generated per domain prompt
    ckpt_interval: int = 500              # steps between checkpoints; one is also written at the end
    log_interval: int = 10                # steps between step lines
    seed: int = 1337                      # weights and data order; rank r seeds dropout with seed + r
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
    batch_size: int = 8                   # micro-batch per rank, in sequences
    block_size: int = 128                 # sequence length
    grad_accum: int = 1                   # micro-batches per optimizer step
    auto_batch_size: bool = False         # halve batch_size until a step fits in memory, raising grad_accum to match
    # optimizer and schedule
    learning_rate: float = 1e-3           # peak LR
    min_lr: float = 1e-4                  # LR at the end of the decay
    warmup_iters: int = 100               # linear warm-up steps
    lr_schedule: str = "cosine"           # "cosine" decay over max_iters, or "wsd": warm-up, stable, then linear decay
    wsd_decay_frac: float = 0.2           # wsd: the last fraction of max_iters that decays
    weight_decay: float = 0.1             # AdamW decay on matrices only: never biases, norms or embeddings
    beta1: float = 0.9                    # AdamW first-moment decay
    beta2: float = 0.95                   # AdamW second-moment decay
    grad_clip: float = 1.0                # max global grad norm; 0 disables clipping
    # model changes for continued pre-training
    expand_layers: int = 0                # LLaMA-Pro: insert this many identity-initialised blocks
    train_only_new_layers: bool = False   # freeze everything but the inserted blocks
    rope_scaling_factor: float = 1.0      # >1: linear RoPE scaling, context grows by this factor
    # system
    dtype: str = "bfloat16"               # bfloat16 (fp32 master weights, reductions), float16 (+ scaler), float32
    compile: bool = False                 # torch.compile each block
    float8: str = ""                      # "tensorwise" or "rowwise": torchao float8 matmuls in the blocks; "" = off
    float8_emulate: bool = False          # float8 without float8 hardware (CPU tests): torchao's emulation, no speed-up
    activation_checkpointing: str = "none"  # "none", "full" (every block), "op" (keep matmul outputs) or "selective"
    ac_every: int = 2                     # selective: checkpoint blocks 0, k, 2k, ...
    fsdp: str = "full_shard"              # full_shard (ZeRO-3), shard_grad_op (ZeRO-2), hybrid (HSDP), none (1 process)
    hsdp_shard_size: int = 0              # hybrid: ranks in one shard group; 0 = the ranks of one node
    dist_timeout: float = 10.0            # minutes a collective waits for a rank before the run fails (and restarts)
    cpu_offload: bool = False             # FSDP keeps parameters, grads and optimizer state in host memory
    # early stopping and divergence recovery
    early_stop_metric: str = "val_loss"   # any eval metric, e.g. "val_loss/xml" or "valid/xml"
    early_stop_mode: str = "min"          # "min" for losses, "max" for rates
    patience: int = 5                     # evals without improvement before an LR cut (then the stop); 0 = off
    min_delta: float = 0.0                # smaller improvements do not count
    plateau_lr_factor: float = 0.5        # LR multiplier on a plateau...
    max_lr_reductions: int = 2            # ...applied at most this often; the next plateau stops the run
    guard_warmup: int = 20                # steps of running loss statistics before the spike checks start
    spike_sigma: float = 6.0              # skip a step whose loss is this many std above its running mean
    grad_spike_factor: float = 10.0       # skip a step whose grad norm exceeds this many times its running mean
    max_skips: int = 3                    # consecutive skipped steps before rolling back to the last checkpoint
    rollback_lr_factor: float = 0.5       # LR multiplier after each rollback
    max_rollbacks: int = 3                # more rollbacks than this stops the run
    fault_nan_steps: list = field(default_factory=list)  # test hook: NaN loss at these step attempts (skips count too)
    fault_oom_above: int = 0              # test hook: auto_batch_size finds micro-batches above this out of memory
    # checkpoints
    keep_last: int = 3                    # newest checkpoints kept
    keep_best: int = 1                    # best checkpoints by early_stop_metric, never deleted
    ckpt_async: bool = False              # CUDA: write checkpoints in the background
    remote: str = ""                      # URL mirroring each checkpoint (s3://, gs://, az://, file://); "" = none
    remote_warn_after: int = 3            # consecutive failed uploads before a loud warning
    # monitoring
    tensorboard: bool = True              # event files in out_dir/tb
    wandb_mode: str = "disabled"          # "online", "offline" or "disabled"
    wandb_project: str = "sheikh-coder"   # W&B project of the run
    callbacks: list = field(default_factory=list)  # "pkg.mod:fn" metric callbacks, fn(step, metrics, model) -> dict
    system_interval: int = 50             # steps between CPU/GPU/disk stats


CHOICES = dict(lr_schedule=("cosine", "wsd"), dtype=("bfloat16", "float16", "float32"),
               activation_checkpointing=("none", "full", "selective", "op"), float8=("", "tensorwise", "rowwise"),
               fsdp=("full_shard", "shard_grad_op", "hybrid", "none"), early_stop_mode=("min", "max"),
               wandb_mode=("online", "offline", "disabled"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the dtype key's values
POSITIVE = ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters", "ckpt_interval", "log_interval",
            "ac_every", "learning_rate", "tokenizer_vocab", "eval_domain_tokens")


def load_config(args):
    """config/a.py [config/b.py] --key=value ...: typed and checked, with one-line errors (config/__init__.py)."""
    cfg = config.load(Config, args, choices=CHOICES, positive=POSITIVE)
    if not 0 <= cfg.wsd_decay_frac <= 1:
        raise ValueError(f"config key 'wsd_decay_frac' must be in [0, 1], got {cfg.wsd_decay_frac}")
    check_rates(cfg.fim_rate, cfg.fim_spm_rate)
    if (cfg.max_iters > 0) == (cfg.train_tokens > 0):
        raise ValueError(f"set exactly one of max_iters (steps) and train_tokens (a token budget), got max_iters="
                         f"{cfg.max_iters} and train_tokens={cfg.train_tokens:g}: --max_iters=0 trains by tokens")
    return cfg


def get_lr(cfg, step, scale):
    """Linear warm-up, then cosine or WSD decay to min_lr; `scale` carries plateau and rollback cuts."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters * scale
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay_start = cfg.max_iters * (1 - cfg.wsd_decay_frac)
        coeff = 1.0 if step < decay_start else max(0.0, 1 - (step - decay_start) / max(1, cfg.max_iters - decay_start))
    return (cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)) * scale


@dataclass
class EarlyStop:
    """Patience on early_stop_metric, and the LR scale that plateau and rollback cuts multiply."""
    best: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    lr_reductions: int = 0
    lr_scale: float = 1.0


@dataclass
class Guard:
    """The divergence guard: running loss and grad-norm statistics, and its skips and rollbacks."""
    loss_mean: float = 0.0
    loss_var: float = 0.0
    gnorm_mean: float = 0.0
    good_steps: int = 0
    skips: int = 0
    rollbacks: int = 0


@dataclass
class Progress:
    """Where the run stands. Saved in every checkpoint, so a resumed run decides as the uninterrupted one."""
    step: int = 0
    tokens: int = 0
    early_stop: EarlyStop = field(default_factory=EarlyStop)
    guard: Guard = field(default_factory=Guard)


def restore_progress(state):
    """Progress from a checkpoint's train state (older ones kept the guard's statistics in early_stop)."""
    keys, early = {f.name for f in dataclasses.fields(EarlyStop)}, state["early_stop"]
    return Progress(state["step"], state["tokens"], EarlyStop(**{k: early[k] for k in keys if k in early}),
                    Guard(**(state.get("guard") or {k: v for k, v in early.items() if k not in keys})))


def eval_decision(es, cfg, metrics, step):
    """Patience on the chosen metric: cut the LR on a plateau, stop after max_lr_reductions cuts."""
    if cfg.early_stop_metric not in metrics:
        raise ValueError(f"early_stop_metric '{cfg.early_stop_metric}' is not an eval metric; "
                         f"choose one of {', '.join(sorted(metrics))}")
    value = metrics[cfg.early_stop_metric]
    if es.best is None or (value - es.best if cfg.early_stop_mode == "max" else es.best - value) > cfg.min_delta:
        es.best, es.best_step, es.bad_evals = value, step, 0
        return None, None
    es.bad_evals += 1
    if cfg.patience == 0 or es.bad_evals < cfg.patience:
        return None, None
    es.bad_evals = 0
    why = (f"{cfg.early_stop_metric} did not improve by {cfg.min_delta} for {cfg.patience} evals "
           f"(best {es.best:.4f} at step {es.best_step})")
    if es.lr_reductions < cfg.max_lr_reductions:
        es.lr_reductions += 1
        es.lr_scale *= cfg.plateau_lr_factor
        return "lr_reduced", why + f"; LR x{cfg.plateau_lr_factor}"
    return "stop", why


def guard_verdict(guard, cfg, loss, gnorm):
    """The divergence guard: None for a healthy step, else why it must be skipped. Updates running stats."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        return f"non-finite loss {loss} or grad norm {gnorm}"
    if guard.good_steps >= cfg.guard_warmup:
        std = math.sqrt(guard.loss_var)
        if loss > guard.loss_mean + cfg.spike_sigma * std + 1e-6:
            return f"loss {loss:.4f} is {cfg.spike_sigma} std above its running mean {guard.loss_mean:.4f}"
        if gnorm > cfg.grad_spike_factor * guard.gnorm_mean:
            return f"grad norm {gnorm:.3g} is over {cfg.grad_spike_factor}x its running mean {guard.gnorm_mean:.3g}"
    a = 0.05 if guard.good_steps else 1.0  # exponential moving statistics, ~20-step memory
    delta = loss - guard.loss_mean
    guard.loss_mean += a * delta
    guard.loss_var = (1 - a) * (guard.loss_var + a * delta * delta)
    guard.gnorm_mean += a * (gnorm - guard.gnorm_mean)
    guard.good_steps += 1
    return None


def adamw(model, cfg):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel per step on CUDA, and on the CPU too (1.5 ms against 5 ms foreach for the tiny model)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


# -- one run, piece by piece ----------------------------------------------------------------------------------------

def setup(cfg):
    """Device and process group. -> (rank, world_size, device)"""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.fsdp == "none" and world_size > 1:
        raise ValueError("fsdp=none trains in one process; use full_shard or shard_grad_op under torchrun")
    if (cfg.ckpt_async or cfg.cpu_offload) and device.type != "cuda":
        raise ValueError("ckpt_async and cpu_offload need CUDA; set them to False on the CPU")
    if world_size > 1 or cfg.cpu_offload:  # offloading is FSDP's, so one process gets a one-rank group
        cluster.init_process_group(device, cfg.dist_timeout)  # + a heartbeat: a failure names a rank that stopped
    return rank, world_size, device


def prepare_data(cfg, master):
    """meta.json of data_dir; the synthetic corpus is prepared on first use, by rank 0 while the others wait."""
    if cfg.synthetic_docs and not os.path.exists(os.path.join(cfg.data_dir, "meta.json")) and master:
        from data.prepare import prepare
        prepare([f"synthetic:{cfg.synthetic_docs}"], out=cfg.data_dir, train_tokenizer=cfg.tokenizer_vocab)
    if dist.is_initialized():
        dist.barrier()
    return read_meta(cfg.data_dir)


def train_step(model, optimizer, scaler, batches, ctx, cfg, guard, sharded, signalled, nan):
    """One optimizer step. The loss is every micro-batch's summed loss over the global valid-token count, so
    accumulation and ranks give the same step; gradients sync on the last micro-batch only. Then clipping
    (on FSDP's DTensors too), the guard's verdict, and the optimizer step unless the guard refuses it.
    -> (loss, grad norm before clipping, verdict: None or why the step was skipped, any rank signalled)"""
    n_valid = sum((y != -100).sum() for _, y in batches).float()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(n_valid)
    loss_sum = torch.zeros((), device=n_valid.device)
    for micro, (x, y) in enumerate(batches):
        if sharded:
            model.set_requires_gradient_sync(micro == len(batches) - 1)
        with ctx:
            _, micro_sum = model(x, y, reduction="sum")
        if nan:  # the fault_nan_steps test hook
            micro_sum = micro_sum * float("nan")
        scaler.scale(micro_sum * world_size / n_valid).backward()  # FSDP averages over ranks; undo that
        loss_sum += micro_sum.detach()
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    gnorm = gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm
    shared = torch.stack([loss_sum, torch.tensor(float(signalled), device=loss_sum.device)])
    if world_size > 1:
        dist.all_reduce(shared)
    # the one host sync per step: the guard must judge the step before the optimizer takes it
    loss_sum_v, any_signal, n_valid_v, gnorm_v = torch.cat([shared, n_valid.view(1), gnorm.view(1).float()]).tolist()
    loss = loss_sum_v / n_valid_v
    overflow = scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(gnorm_v)  # fp16: the scaler's job
    verdict = None if overflow else guard_verdict(guard, cfg, loss, gnorm_v)
    if verdict is None:
        scaler.step(optimizer)
        scaler.update()
        float8_scales(model, cfg.float8)  # tensorwise float8 over FSDP: the next all-gathers' scales, one all-reduce
        guard.skips = 0
    else:
        guard.skips += 1
    optimizer.zero_grad(set_to_none=True)
    return loss, gnorm_v, verdict, bool(any_signal)


def save_checkpoint(cfg, p, model, optimizer, loader, scaler, mcfg, run_id, metric):
    """A checkpoint of everything a resume needs, ranked by the early-stopping metric. -> its path"""
    state = dict(step=p.step, tokens=p.tokens, config=dataclasses.asdict(cfg), model_config=mcfg.to_hf_dict(),
                 early_stop=dataclasses.asdict(p.early_stop), guard=dataclasses.asdict(p.guard),
                 loader=loader.state_dict(), run_id=run_id, scaler=scaler.state_dict() if scaler.is_enabled() else None,
                 world_size=dist.get_world_size() if dist.is_initialized() else 1)
    return ckpt.save(cfg.out_dir, p.step, model, optimizer, state, metric=metric,
                     higher_is_better=cfg.early_stop_mode == "max", keep_last=cfg.keep_last, keep_best=cfg.keep_best,
                     async_save=cfg.ckpt_async)


def rollback(cfg, p, model, optimizer, loader, verdict, monitor, mirror):
    """After max_skips refused steps in a row: back to the newest checkpoint that verifies (here or on the remote),
    with the LR scaled by rollback_lr_factor. The data position and the early-stopping state stay, so the batches
    that caused the trouble stay skipped. -> why the run must stop, or None"""
    p.guard.skips, p.guard.rollbacks = 0, p.guard.rollbacks + 1
    path = ckpt.find_resume(cfg.out_dir, "auto")
    path = remote.restore(mirror, cfg.out_dir, path) if mirror else path  # nodes without a shared disk
    if p.guard.rollbacks > cfg.max_rollbacks or path is None:
        why = f": {cfg.max_rollbacks} rollbacks did not help" if path else " before the first checkpoint"
        return f"diverged{why} ({verdict})"
    position = loader.state_dict()
    state = ckpt.load(path, model, optimizer)
    loader.load_state_dict(position)
    p.step, p.tokens = state["step"], state["tokens"]
    p.early_stop.lr_scale *= cfg.rollback_lr_factor
    monitor.event(p.step, "rollback", f"{verdict}; back to {os.path.basename(path)}, "
                                      f"LR scale {p.early_stop.lr_scale:.3g}")
    return None


def main(args):
    cfg = load_config(args)
    rank, world_size, device = setup(cfg)
    master = rank == 0
    mirror = remote.open_mirror(cfg) if cfg.remote else None  # probed now: bad credentials fail fast, in one line
    if mirror is None:  # then every node must see one out_dir, or no node would hold a whole checkpoint
        ckpt.require_shared(cfg.out_dir)
    ptdtype = DTYPES[cfg.dtype]
    meta = prepare_data(cfg, master)
    tokenizer = data_tokenizer(meta) if cfg.eval_domain_prompts else None

    # -- model: AC, compile and FSDP2 per block; bf16 compute over fp32 master weights
    model, mcfg, sharded = build_model(cfg, meta["vocab_size"], rank, world_size, device, ptdtype)
    amp = not sharded and ptdtype != torch.float32  # FSDP's MixedPrecisionPolicy casts; a single process autocasts
    ctx = torch.autocast(device.type, dtype=ptdtype) if amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    if cfg.auto_batch_size:
        bs = largest_micro_batch(model, cfg.batch_size, cfg.block_size, meta["vocab_size"], device, ctx,
                                 cfg.fault_oom_above)
        cfg.grad_accum, cfg.batch_size = cfg.grad_accum * cfg.batch_size // bs, bs
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world_size
    if cfg.train_tokens:  # the token budget sets the steps, and so the LR schedule's horizon
        cfg.max_iters = math.ceil(cfg.train_tokens / tokens_per_step)
    if master:  # the batch size and the steps are final now
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    optimizer = adamw(model, cfg)
    loader = TokenLoader(cfg.data_dir, cfg.batch_size, cfg.block_size, rank=rank, world_size=world_size,
                         mixture=cfg.mixture or None, seed=cfg.seed, device=device, fim_rate=cfg.fim_rate,
                         fim_spm_rate=cfg.fim_spm_rate)
    val = val_sets(cfg.data_dir, meta["langs"], cfg.batch_size, cfg.block_size, cfg.eval_iters, rank, world_size,
                   device)
    val_fim = val_sets(cfg.data_dir, meta["langs"], cfg.batch_size, cfg.block_size, cfg.eval_iters, rank, world_size,
                       device, cfg.fim_spm_rate) if cfg.fim_rate else {}  # every document rearranged: val_loss_fim

    # -- resume: weights, optimizer, data position, RNG and early-stopping state
    p, run_id = Progress(), None
    path = ckpt.find_resume(cfg.out_dir, cfg.resume)
    path = remote.restore(mirror, cfg.out_dir, path) if mirror and cfg.resume == "auto" else path  # a fresh node?
    if path:
        state = ckpt.load(path, model, optimizer)
        p, run_id = restore_progress(state), state.get("run_id")
        loader.load_state_dict(state["loader"])
        if cfg.dtype == "float16" and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if master:
            print(f"resumed from {path} at step {p.step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; weights came from rank 0
    monitor = Monitor(cfg.out_dir, dataclasses.asdict(cfg), rank=rank, tensorboard=cfg.tensorboard,
                      wandb_mode=cfg.wandb_mode, wandb_project=cfg.wandb_project, run_id=run_id,
                      callbacks=cfg.callbacks, system_interval=cfg.system_interval,
                      flops_per_token=flops_per_token(mcfg, cfg.block_size), device=device)

    # -- signals: the first SIGTERM/SIGINT finishes the step, saves and exits 0; a second SIGINT aborts
    signalled = []

    def on_signal(signum, frame):
        if signalled and signum == signal.SIGINT:
            os._exit(130)
        signalled.append(signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    # -- the loop. Evals and checkpoints happen at the top, so a checkpoint at step s holds every decision made at s
    stop_reason, metrics, saved = None, {}, []
    resumed_at = p.step if path else -1  # that step's eval and checkpoint are already done
    attempt = p.step  # counts skipped and rolled-back steps too, never goes back
    step_time = data_wait = timed = 0  # accumulated between step lines, excluding evals and checkpoints
    while True:
        at_end = p.step == cfg.max_iters
        if p.step != resumed_at and (p.step % cfg.eval_interval == 0 or at_end):
            metrics = lang_metrics(model, val, ctx)  # per-language val loss, perplexity, accuracy (validate.py's ppl)
            metrics |= lang_metrics(model, val_fim, ctx, suffix="_fim") if val_fim else {}
            if cfg.eval_domain_prompts:  # + XML/MDX/JS validity of greedy completions, as validate.py scores it
                metrics |= quick_domain_metrics(model, tokenizer, cfg.eval_domain_prompts, cfg.eval_domain_tokens,
                                                data_dir=cfg.data_dir, ctx=ctx)
            monitor.log_eval(p.step, metrics)
            action, why = eval_decision(p.early_stop, cfg, metrics, p.step)
            if action:
                monitor.event(p.step, action, why)
            if action == "stop":
                stop_reason = stop_reason or f"early stop: {why}"
        if p.step != resumed_at and p.step > 0 and (p.step % cfg.ckpt_interval == 0 or at_end or stop_reason):
            saved.append(save_checkpoint(cfg, p, model, optimizer, loader, scaler, mcfg, monitor.run_id,
                                         metrics.get(cfg.early_stop_metric)))
            for event in remote.upload(mirror, saved[-1], p.step) if mirror else []:  # earlier uploads' events
                monitor.event(*event)
        if stop_reason or p.step >= cfg.max_iters:
            stop_reason = stop_reason or f"reached max_iters={cfg.max_iters}"
            break

        # one optimizer step; all micro-batches come first so the loss is normalised by the global valid-token count
        attempt += 1
        lr = get_lr(cfg, p.step, p.early_stop.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
        data_wait += time.perf_counter() - t0
        loss, gnorm, verdict, any_signal = train_step(model, optimizer, scaler, batches, ctx, cfg, p.guard, sharded,
                                                      bool(signalled), nan=attempt in cfg.fault_nan_steps)
        if verdict is None:
            p.step, p.tokens = p.step + 1, p.tokens + tokens_per_step
        else:
            monitor.event(p.step, "skip", verdict)
        step_time, timed = step_time + time.perf_counter() - t0, timed + 1
        if p.guard.skips >= cfg.max_skips:
            stop_reason = rollback(cfg, p, model, optimizer, loader, verdict, monitor, mirror)
            if stop_reason:
                monitor.event(p.step, "stop", stop_reason)
                break
            resumed_at = p.step
            continue
        if any_signal:  # finish at the top of the loop: eval if due, checkpoint, stop
            stop_reason = f"signal {signal.Signals(signalled[0]).name}" if signalled else "signal on another rank"
        if verdict is None and (p.step % cfg.log_interval == 0 or p.step == 1):
            monitor.log_step(p.step, dict(loss=loss, lr=lr, grad_norm=gnorm, tokens=tokens_per_step,
                                          tokens_seen=p.tokens, dt=step_time / timed, data_wait=data_wait / timed,
                                          **{f"epochs/{k}": v for k, v in loader.epochs().items()}), model=model)
            step_time = data_wait = timed = 0

    # -- the end: export the best checkpoint for HF, write the summary
    if master:
        print(f"stopped at step {p.step}: {stop_reason}")
    ckpt.wait()  # an async save must be committed before export
    for event in remote.close(mirror) if mirror else []:
        monitor.event(*event)
    export_path = os.path.join(cfg.out_dir, "best") if saved and master else None
    monitor.finish(dict(stop_reason=stop_reason, best_metric=p.early_stop.best, best_step=p.early_stop.best_step,
                        steps=p.step, tokens=p.tokens, epochs=loader.epochs(), best_metric_name=cfg.early_stop_metric,
                        checkpoints=saved, export_path=export_path, final_eval=metrics or None,  # None: the last
                        trainable_params=sum(w.numel() for w in model.parameters() if w.requires_grad)))  # eval logged
    if export_path:  # after the summary and its loss plot, which the model card shows
        best = ckpt.best_checkpoint(cfg.out_dir, cfg.early_stop_mode == "max") or saved[-1]
        best = remote.complete(mirror, best) if mirror else best  # nodes without a shared disk hold part of it
        export(best, export_path)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        record(cluster.naming_silent_ranks(main))(sys.argv[1:])  # torchrun's summary shows a failed rank's traceback
    except (ValueError, DataError, ModelLoadError, ckpt.CheckpointError, FileNotFoundError, cluster.RankSilent) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
