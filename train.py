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
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer

import ckpt
import config
from data.loader import DataError, TokenLoader, read_meta, val_batches
from model.expand import expand_state_dict
from model.phi import ModelLoadError, Phi, PhiConfig, load_hf_state_dict
from monitor import Monitor, flops_per_token


@dataclass
class Config:
    # data and output
    out_dir: str = "out"                  # checkpoints, metrics.jsonl, TensorBoard, summary, best/ export
    data_dir: str = "data/tiny"           # output of data/prepare.py: meta.json + {split}_{lang}.bin
    synthetic_docs: int = 0               # >0: prepare this many synthetic documents in data_dir if it is empty
    tokenizer_vocab: int = 2048           # BPE vocabulary trained for the synthetic corpus
    mixture: dict = field(default_factory=dict)  # language weights, e.g. {"xml": 0.4, "js": 0.4}; {} = by token count
    init_from: str = "scratch"            # "scratch", or a local HF directory such as a phi-2 download
    model_preset: str = "tiny"            # PhiConfig preset when init_from="scratch"
    resume: str = "auto"                  # "auto": newest verified checkpoint in out_dir; "never"; or a checkpoint path
    # schedule
    max_iters: int = 1000                 # optimizer steps
    eval_interval: int = 100              # steps between evals; early stopping decides at each eval
    eval_iters: int = 8                   # val batches per language per eval
    eval_domain_prompts: int = 0          # >0: also score XML/MDX/JS validity of greedy completions ("domain_valid", ...)
    eval_domain_tokens: int = 128         # tokens generated per domain prompt
    ckpt_interval: int = 500              # steps between checkpoints; one is also written at the end
    log_interval: int = 10                # steps between step lines
    seed: int = 1337                      # weights and data order; rank r seeds dropout with seed + r
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
    batch_size: int = 8                   # micro-batch per rank, in sequences
    block_size: int = 128                 # sequence length
    grad_accum: int = 1                   # micro-batches per optimizer step
    auto_batch_size: bool = False         # CUDA: halve batch_size until a step fits, raising grad_accum to match
    # optimizer and schedule
    learning_rate: float = 1e-3           # peak LR
    min_lr: float = 1e-4                  # LR at the end of the decay
    warmup_iters: int = 100               # linear warm-up steps
    lr_schedule: str = "cosine"           # "cosine" decay over max_iters, or "wsd": warm-up, stable, then linear decay
    wsd_decay_frac: float = 0.2           # wsd: the last fraction of max_iters that decays
    weight_decay: float = 0.1             # AdamW decay on matrices only: never biases, norms or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                # max global grad norm; 0 disables clipping
    # model changes for continued pre-training
    expand_layers: int = 0                # LLaMA-Pro: insert this many identity-initialised blocks
    train_only_new_layers: bool = False   # freeze everything but the inserted blocks
    rope_scaling_factor: float = 1.0      # >1: linear RoPE scaling, context grows by this factor
    # system
    dtype: str = "bfloat16"               # "bfloat16" (fp32 master weights and reductions), "float16" (+ grad scaler), "float32"
    compile: bool = False                 # torch.compile each block
    activation_checkpointing: str = "none"  # "none", "full" (every block) or "selective" (every ac_every-th block)
    ac_every: int = 2                     # selective: checkpoint blocks 0, k, 2k, ...
    fsdp: str = "full_shard"              # full_shard (ZeRO-3), shard_grad_op (ZeRO-2), hybrid (HSDP), none; a single process never shards
    hsdp_shard_size: int = 0              # hybrid: ranks in one shard group; 0 = the ranks of one node
    cpu_offload: bool = False             # FSDP keeps parameters, grads and optimizer state in host memory
    # early stopping and divergence recovery
    early_stop_metric: str = "val_loss"   # any eval metric, e.g. "val_loss/xml" or "valid/xml"
    early_stop_mode: str = "min"          # "min" for losses, "max" for rates
    patience: int = 5                     # evals without improvement before the LR is cut (then before stopping); 0 = off
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
    # checkpoints
    keep_last: int = 3                    # newest checkpoints kept
    keep_best: int = 1                    # best checkpoints by early_stop_metric, never deleted
    ckpt_async: bool = False              # CUDA: write checkpoints in the background
    # monitoring
    tensorboard: bool = True              # event files in out_dir/tb
    wandb_mode: str = "disabled"          # "online", "offline" or "disabled"
    wandb_project: str = "sheikh-coder"
    callbacks: list = field(default_factory=list)  # "pkg.mod:fn" metric callbacks, fn(step, metrics, model) -> dict
    system_interval: int = 50             # steps between CPU/GPU/disk stats


CHOICES = dict(lr_schedule=("cosine", "wsd"), dtype=("bfloat16", "float16", "float32"),
               activation_checkpointing=("none", "full", "selective"),
               fsdp=("full_shard", "shard_grad_op", "hybrid", "none"), early_stop_mode=("min", "max"),
               wandb_mode=("online", "offline", "disabled"))
POSITIVE = ("batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters", "ckpt_interval", "log_interval",
            "ac_every", "learning_rate", "tokenizer_vocab", "eval_domain_tokens")


def load_config(args):
    """config/a.py [config/b.py] --key=value ...: typed, with one-line errors (see config/__init__.py)."""
    cfg = config.load(Config, args)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key '{key}' must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}")
    for key in POSITIVE:
        if not getattr(cfg, key) > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {getattr(cfg, key)!r}")
    if not 0 <= cfg.wsd_decay_frac <= 1:
        raise ValueError(f"config key 'wsd_decay_frac' must be in [0, 1], got {cfg.wsd_decay_frac}")
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
    """Everything early stopping and the divergence guard know; saved in checkpoints so a resume decides the same."""
    best: float | None = None
    best_step: int = -1
    bad_evals: int = 0
    lr_reductions: int = 0
    lr_scale: float = 1.0
    loss_mean: float = 0.0
    loss_var: float = 0.0
    gnorm_mean: float = 0.0
    good_steps: int = 0
    skips: int = 0
    rollbacks: int = 0


def eval_decision(es, cfg, value, step):
    """Patience on the chosen metric: cut the LR on a plateau, stop after max_lr_reductions cuts."""
    sign = 1 if cfg.early_stop_mode == "min" else -1
    if es.best is None or sign * (es.best - value) > cfg.min_delta:
        es.best, es.best_step, es.bad_evals = value, step, 0
        return None, None
    es.bad_evals += 1
    if cfg.patience == 0 or es.bad_evals < cfg.patience:
        return None, None
    es.bad_evals = 0
    why = f"{cfg.early_stop_metric} did not improve by {cfg.min_delta} for {cfg.patience} evals (best {es.best:.4f} at step {es.best_step})"
    if es.lr_reductions < cfg.max_lr_reductions:
        es.lr_reductions += 1
        es.lr_scale *= cfg.plateau_lr_factor
        return "lr_reduced", why + f"; LR x{cfg.plateau_lr_factor}"
    return "stop", why


def guard_verdict(es, cfg, loss, gnorm):
    """The divergence guard: None for a healthy step, else why it must be skipped. Updates running stats."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        return f"non-finite loss {loss} or grad norm {gnorm}"
    if es.good_steps >= cfg.guard_warmup:
        std = math.sqrt(es.loss_var)
        if loss > es.loss_mean + cfg.spike_sigma * std + 1e-6:
            return f"loss {loss:.4f} is {cfg.spike_sigma} std above its running mean {es.loss_mean:.4f}"
        if gnorm > cfg.grad_spike_factor * es.gnorm_mean:
            return f"grad norm {gnorm:.3g} is over {cfg.grad_spike_factor}x its running mean {es.gnorm_mean:.3g}"
    a = 0.05 if es.good_steps else 1.0  # exponential moving statistics, ~20-step memory
    delta = loss - es.loss_mean
    es.loss_mean += a * delta
    es.loss_var = (1 - a) * (es.loss_var + a * delta * delta)
    es.gnorm_mean += a * (gnorm - es.gnorm_mean)
    es.good_steps += 1
    return None


# -- parallelism: one function per technique, applied in this order ---------------------------------------------------

def apply_ac(model, mode, every):
    """Recompute block activations in backward instead of storing them; parameter names stay HF's."""
    for i, block in enumerate(model.model.layers):
        if mode == "full" or (mode == "selective" and i % every == 0):
            block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def apply_compile(model):
    for block in model.model.layers:
        block.compile()


def apply_fsdp(model, cfg, param_dtype, world_size, device_type):
    if cfg.fsdp == "hybrid":
        shard = cfg.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        mesh = init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device_type, (world_size,))
    kw = dict(mesh=mesh, reshard_after_forward=cfg.fsdp != "shard_grad_op",
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
    for block in model.model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)


def build_model(cfg, vocab_size, rank, world_size, device, param_dtype):
    """Rank 0 holds the full weights once, on the host; every rank builds on meta and receives only its shards."""
    if cfg.init_from == "scratch":
        mcfg = PhiConfig.preset(cfg.model_preset)
        mcfg.vocab_size = max(mcfg.vocab_size, -(-vocab_size // 64) * 64)
        state = {}  # only rank 0 holds weights
        if rank == 0:
            torch.manual_seed(cfg.seed)
            full = Phi(mcfg)
            full.init_weights()
            state = full.state_dict()
    elif rank == 0:
        mcfg, state = load_hf_state_dict(cfg.init_from)  # config and weights, validated
    else:
        with open(os.path.join(cfg.init_from, "config.json")) as f:
            mcfg, state = PhiConfig.from_dict(json.load(f)), {}
    new_layers = []
    if cfg.expand_layers:
        mcfg, state, new_layers = expand_state_dict(mcfg, state, cfg.expand_layers)
    if cfg.rope_scaling_factor != 1:
        mcfg.rope_scaling = {"type": "linear", "factor": cfg.rope_scaling_factor}
        mcfg.max_position_embeddings = int(mcfg.max_position_embeddings * cfg.rope_scaling_factor)
    if vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({vocab_size}) is larger than the model's ({mcfg.vocab_size}); "
                         f"prepare the data with the model's tokenizer")
    if cfg.block_size > mcfg.max_position_embeddings:
        raise ValueError(f"block_size {cfg.block_size} exceeds the model's {mcfg.max_position_embeddings} positions; "
                         f"lower block_size or raise rope_scaling_factor")
    with torch.device("meta"):
        model = Phi(mcfg)
    if cfg.train_only_new_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in new_layers:
            model.model.layers[i].requires_grad_(True)
    if cfg.activation_checkpointing != "none":
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    sharded = world_size > 1 or cfg.cpu_offload
    if sharded:
        apply_fsdp(model, cfg, param_dtype, world_size, device.type)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    if sharded:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(state)
    model.init_rope()
    return model, mcfg, sharded


def adamw(model, cfg):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    # fused: one kernel per step on CUDA, and on the CPU too (1.5 ms against 5 ms foreach for the tiny model)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def forward_backward(model, batches, ctx, scaler, sharded, nan=False):
    """Gradients of one optimizer step: the summed loss of every micro-batch over the global valid-token count,
    so accumulation and ranks give the same step. Gradient sync only on the last micro-batch. -> (loss sum, count)"""
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
    return loss_sum, n_valid


def clip_grads(model, optimizer, scaler, max_norm):
    """Unscale (fp16) and clip the global grad norm; works on FSDP's DTensors. -> the norm before clipping."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return gnorm.full_tensor() if isinstance(gnorm, DTensor) else gnorm


@torch.no_grad()
def evaluate(model, val, ctx, device):
    """Per-language loss, perplexity and token accuracy on fixed val batches, summed over ranks."""
    model.eval()
    out, total = {}, torch.zeros(2, device=device)
    for lang, batches in val.items():
        s = torch.zeros(3, device=device)  # loss sum, correct tokens, tokens
        for x, y in batches:
            with ctx:
                logits = model(x)
            logits, y = logits.flatten(0, 1), y.flatten()
            for i in range(0, y.numel(), 8192):  # fp32 logits only 8k rows at a time: 32k contexts fit
                s[0] += F.cross_entropy(logits[i:i + 8192].float(), y[i:i + 8192], reduction="sum", ignore_index=-100)
            s[1] += ((logits.argmax(-1) == y) & (y != -100)).sum()
            s[2] += (y != -100).sum()
        if dist.is_initialized():
            dist.all_reduce(s)
        loss_sum, correct, n = s.tolist()
        out[f"val_loss/{lang}"] = loss_sum / n
        out[f"val_ppl/{lang}"] = math.exp(min(loss_sum / n, 50))
        out[f"val_acc/{lang}"] = correct / n
        total += s[[0, 2]]
    out["val_loss"] = (total[0] / total[1]).item()
    out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    model.train()
    return out


def find_batch_size(model, cfg, vocab_size, device, ctx):
    """Largest micro-batch whose forward+backward fits, by halving on CUDA OOM; agreed on by all ranks."""
    bs = cfg.batch_size
    while True:
        try:
            x = torch.randint(0, vocab_size, (bs, cfg.block_size), device=device)
            with ctx:
                _, loss = model(x, x)
            loss.backward()
            ok = torch.ones(1, device=device)
        except torch.OutOfMemoryError:
            ok = torch.zeros(1, device=device)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() or bs == 1:
            return bs
        bs //= 2


def main(args):
    cfg = load_config(args)

    # -- device, process group, seeds
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.fsdp == "none" and world_size > 1:
        raise ValueError("fsdp=none trains in one process; use full_shard or shard_grad_op under torchrun")
    if (cfg.auto_batch_size or cfg.ckpt_async or cfg.cpu_offload) and device.type != "cuda":
        raise ValueError("auto_batch_size, ckpt_async and cpu_offload need CUDA; set them to False on the CPU")
    store = None
    if world_size > 1:  # torchrun's store outlives a restart: a fresh prefix per attempt hides the dead group's keys
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/",
                                 next(dist.rendezvous("env://"))[0])
    elif cfg.cpu_offload:  # offloading is FSDP's, so one process gets a one-rank group
        store = dist.HashStore()
    if store is not None:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=store, device_id=device if device.type == "cuda" else None)
    master = rank == 0
    if master:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]

    # -- data: the synthetic corpus is prepared on first use, by rank 0 while the others wait
    if cfg.synthetic_docs and not os.path.exists(os.path.join(cfg.data_dir, "meta.json")) and master:
        from data.prepare import prepare
        prepare([f"synthetic:{cfg.synthetic_docs}"], out=cfg.data_dir, train_tokenizer=cfg.tokenizer_vocab)
    if dist.is_initialized():
        dist.barrier()
    meta = read_meta(cfg.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(meta["tokenizer"]) if cfg.eval_domain_prompts else None

    # -- model: AC, compile and FSDP2 per block; bf16 compute over fp32 master weights
    model, mcfg, sharded = build_model(cfg, meta["vocab_size"], rank, world_size, device, ptdtype)
    amp = not sharded and ptdtype != torch.float32  # FSDP's MixedPrecisionPolicy casts; a single process autocasts
    ctx = torch.autocast(device.type, dtype=ptdtype) if amp else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    if cfg.auto_batch_size:
        bs = find_batch_size(model, cfg, meta["vocab_size"], device, ctx)
        cfg.grad_accum, cfg.batch_size = cfg.grad_accum * cfg.batch_size // bs, bs
        if master:
            print(f"auto_batch_size: batch_size={cfg.batch_size} grad_accum={cfg.grad_accum}")
    optimizer = adamw(model, cfg)
    loader = TokenLoader(cfg.data_dir, cfg.batch_size, cfg.block_size, rank=rank, world_size=world_size,
                         mixture=cfg.mixture or None, seed=cfg.seed, device=device)
    per_rank = -(-cfg.eval_iters // world_size)  # ranks split the fixed val batches
    val = {lang: val_batches(cfg.data_dir, lang, cfg.batch_size, cfg.block_size, per_rank * world_size, device)[rank::world_size]
           for lang in meta["langs"]}
    val = {lang: b for lang, b in val.items() if b}

    # -- resume: weights, optimizer, data position, RNG and early-stopping state
    step, tokens, es, run_id = 0, 0, EarlyStop(), None
    path = ckpt.find_resume(cfg.out_dir, cfg.resume)
    if path:
        state = ckpt.load(path, model, optimizer)
        step, tokens, run_id = state["step"], state["tokens"], state.get("run_id")
        es = EarlyStop(**state["early_stop"])
        loader.load_state_dict(state["loader"])
        if cfg.dtype == "float16" and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if master:
            print(f"resumed from {path} at step {step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; weights came from rank 0
    monitor = Monitor(cfg.out_dir, dataclasses.asdict(cfg), rank=rank, tensorboard=cfg.tensorboard,
                      wandb_mode=cfg.wandb_mode, wandb_project=cfg.wandb_project, run_id=run_id,
                      callbacks=cfg.callbacks, system_interval=cfg.system_interval,
                      flops_per_token=flops_per_token(mcfg, cfg.block_size), device=device)

    def save(metric):  # ckpt keeps the lowest metric as best, so "max" metrics arrive negated
        state = dict(step=step, tokens=tokens, config=dataclasses.asdict(cfg), model_config=mcfg.to_hf_dict(),
                     early_stop=dataclasses.asdict(es), loader=loader.state_dict(), run_id=monitor.run_id,
                     scaler=scaler.state_dict() if scaler.is_enabled() else None, world_size=world_size)
        return ckpt.save(cfg.out_dir, step, model, optimizer, state, metric=metric, keep_last=cfg.keep_last,
                         keep_best=cfg.keep_best, async_save=cfg.ckpt_async)

    # -- signals: the first SIGTERM/SIGINT finishes the step, saves and exits 0; a second SIGINT aborts
    signalled = []

    def on_signal(signum, frame):
        if signalled and signum == signal.SIGINT:
            os._exit(130)
        signalled.append(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # -- the loop. Evals and checkpoints happen at the top, so a checkpoint at step s holds every decision made at s
    stop_reason, metrics, saved = None, {}, []
    resumed_at = step if path else -1  # that step's eval and checkpoint are already done
    attempt = step
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world_size
    step_time = data_wait = timed = 0  # accumulated between step lines, excluding evals and checkpoints
    while True:
        if step != resumed_at and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            metrics = evaluate(model, val, ctx, device)
            if cfg.eval_domain_prompts:  # every rank generates the same greedy tokens, as FSDP needs
                from validate import quick_domain_metrics
                with torch.no_grad(), ctx:
                    model.eval()
                    metrics |= quick_domain_metrics(model, tokenizer, cfg.eval_domain_prompts, cfg.eval_domain_tokens,
                                                    data_dir=cfg.data_dir)
                    model.train()
            monitor.log_eval(step, metrics)
            if cfg.early_stop_metric not in metrics:
                raise ValueError(f"early_stop_metric '{cfg.early_stop_metric}' is not an eval metric; "
                                 f"choose one of {', '.join(sorted(metrics))}")
            action, why = eval_decision(es, cfg, metrics[cfg.early_stop_metric], step)
            if action:
                monitor.event(step, action, why)
            if action == "stop":
                stop_reason = stop_reason or f"early stop: {why}"
        if step != resumed_at and step > 0 and (step % cfg.ckpt_interval == 0 or step == cfg.max_iters or stop_reason):
            metric = metrics.get(cfg.early_stop_metric)
            saved.append(save(None if metric is None else metric if cfg.early_stop_mode == "min" else -metric))
        if stop_reason or step >= cfg.max_iters:
            stop_reason = stop_reason or f"reached max_iters={cfg.max_iters}"
            break

        # one optimizer step; all micro-batches come first so the loss is normalised by the global valid-token count
        attempt += 1  # counts skipped and rolled-back steps too, never goes back
        lr = get_lr(cfg, step, es.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
        data_wait += time.perf_counter() - t0
        loss_sum, n_valid = forward_backward(model, batches, ctx, scaler, sharded, nan=attempt in cfg.fault_nan_steps)
        gnorm = clip_grads(model, optimizer, scaler, cfg.grad_clip)
        shared = torch.stack([loss_sum, torch.tensor(float(len(signalled)), device=device)])
        if dist.is_initialized():
            dist.all_reduce(shared)
        # the one host sync per step: the guard must judge the step before the optimizer takes it
        loss_sum_v, any_signal, n_valid_v, gnorm_v = torch.cat([shared, n_valid.view(1), gnorm.view(1).float()]).tolist()
        loss_v = loss_sum_v / n_valid_v
        overflow = scaler.is_enabled() and math.isfinite(loss_v) and not math.isfinite(gnorm_v)  # fp16: the scaler's job
        verdict = None if overflow else guard_verdict(es, cfg, loss_v, gnorm_v)
        if verdict is None:
            scaler.step(optimizer)
            scaler.update()
            es.skips = 0
            step, tokens = step + 1, tokens + tokens_per_step
        else:
            es.skips += 1
            monitor.event(step, "skip", verdict)
        optimizer.zero_grad(set_to_none=True)
        step_time, timed = step_time + time.perf_counter() - t0, timed + 1

        if es.skips >= cfg.max_skips:  # roll back to the last good weights with a lower LR; the bad data stays skipped
            es.skips, es.rollbacks = 0, es.rollbacks + 1
            path = ckpt.find_resume(cfg.out_dir, "auto")
            if es.rollbacks > cfg.max_rollbacks or path is None:
                stop_reason = (f"diverged: {cfg.max_rollbacks} rollbacks did not help" if path
                               else "diverged before the first checkpoint") + f" ({verdict})"
                monitor.event(step, "stop", stop_reason)
                break
            position, kept = loader.state_dict(), dataclasses.asdict(es)
            state = ckpt.load(path, model, optimizer)
            loader.load_state_dict(position)
            es = EarlyStop(**kept)
            es.lr_scale *= cfg.rollback_lr_factor
            step, tokens, resumed_at = state["step"], state["tokens"], state["step"]
            monitor.event(step, "rollback", f"{verdict}; back to {os.path.basename(path)}, LR scale {es.lr_scale:.3g}")
            continue
        if any_signal:  # finish at the top of the loop: eval if due, checkpoint, stop
            stop_reason = f"signal {signal.Signals(signalled[0]).name}" if signalled else "signal on another rank"
        if verdict is None and (step % cfg.log_interval == 0 or step == 1):
            monitor.log_step(step, dict(loss=loss_v, lr=lr, grad_norm=gnorm_v, tokens=tokens_per_step,
                                        dt=step_time / timed, data_wait=data_wait / timed), model=model)
            step_time = data_wait = timed = 0

    # -- the end: export the best checkpoint for HF, write the summary
    if master:
        print(f"stopped at step {step}: {stop_reason}")
    ckpt.wait()  # an async save must be committed before export
    export_path = None
    if saved and master:
        best = ckpt.best_checkpoint(cfg.out_dir) or saved[-1]
        export_path = ckpt.export(best, os.path.join(cfg.out_dir, "best"))
    monitor.finish(dict(stop_reason=stop_reason, best_metric=es.best, best_step=es.best_step, steps=step, tokens=tokens,
                        best_metric_name=cfg.early_stop_metric,
                        checkpoints=saved, export_path=export_path, final_eval=metrics))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, DataError, ModelLoadError, ckpt.CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
