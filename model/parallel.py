"""How a Phi is built for training on N ranks: weights read or initialised once, on rank 0; LLaMA-Pro
expansion and RoPE scaling; then one function per parallelism technique, applied in a fixed order
(activation checkpointing, compile per block, FSDP2 per block and on the root) to a model built on meta.

    model, model_cfg, sharded = build_model(cfg, vocab_size, rank, world_size, device, param_dtype)
    bs = largest_micro_batch(model, cfg.batch_size, cfg.block_size, vocab_size, device, ctx)   # auto_batch_size

train.py's Config decides every setting used here. plan.py builds through scratch_config(), shape() and
parallel_model() too, so a change here changes the plan.
"""
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from model.expand import expand_state_dict
from model.phi import Phi, PhiConfig, load_hf_state_dict


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


def scratch_config(cfg, vocab_size):
    """The model_preset, its vocabulary grown to the tokenizer's (rounded up to a multiple of 64)."""
    mcfg = PhiConfig.preset(cfg.model_preset)
    mcfg.vocab_size = max(mcfg.vocab_size, -(-vocab_size // 64) * 64)
    return mcfg


def shape(cfg, mcfg, state, vocab_size):
    """LLaMA-Pro expansion and RoPE scaling of a model config and its weights, with the checks a run needs.
    state may be empty (ranks that receive weights by broadcast; plan.py). -> (mcfg, state, new block indices)"""
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
    return mcfg, state, new_layers


def parallel_model(cfg, mcfg, new_layers, param_dtype, world_size, device_type):
    """A Phi on meta, frozen as configured, with AC, compile and FSDP applied. -> (model, sharded)"""
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
        apply_fsdp(model, cfg, param_dtype, world_size, device_type)
    return model, sharded


def build_model(cfg, vocab_size, rank, world_size, device, param_dtype):
    """Rank 0 holds the full weights once, on the host; every rank builds on meta and receives only its shards."""
    if cfg.init_from == "scratch":
        mcfg = scratch_config(cfg, vocab_size)
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
    mcfg, state, new_layers = shape(cfg, mcfg, state, vocab_size)
    model, sharded = parallel_model(cfg, mcfg, new_layers, param_dtype, world_size, device.type)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)
    if sharded:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(state)
    model.init_rope()
    return model, mcfg, sharded


def largest_micro_batch(model, batch_size, block_size, vocab_size, device, ctx, fault_oom_above=0):
    """The largest micro-batch up to batch_size whose forward and backward fit, by halving on out-of-memory;
    agreed on by all ranks. fault_oom_above > 0 (a test hook) makes larger ones fail as if out of memory."""
    bs = batch_size
    while True:
        try:
            if fault_oom_above and bs > fault_oom_above:
                raise torch.OutOfMemoryError(f"fault_oom_above={fault_oom_above}")
            x = torch.randint(0, vocab_size, (bs, block_size), device=device)
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
