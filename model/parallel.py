"""How a Phi is built for training on N ranks: weights read or initialised once, on rank 0; LLaMA-Pro
expansion and RoPE scaling; then one function per technique, applied in a fixed order (float8 linears,
activation checkpointing, compile per block, FSDP2 per block and on the root) to a model built on meta.

    model, model_cfg, sharded = build_model(cfg, vocab_size, rank, world_size, device, param_dtype)
    bs = largest_micro_batch(model, cfg.batch_size, cfg.block_size, vocab_size, device, ctx)   # auto_batch_size

train.py's Config decides every setting used here. plan.py builds through scratch_config(), shape() and
parallel_model() too, so a change here changes the plan.
"""
import dataclasses
import functools
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.expand import expand_state_dict
from model.phi import Phi, PhiConfig, load_hf_state_dict


def apply_ac(model, mode, every):
    """Recompute activations in backward instead of storing them: "full" every block's, "selective" those of
    every every-th block, "op" all but the matmuls' (apply_op_ac). Parameter names stay HF's."""
    if mode == "op":
        return apply_op_ac(model)
    for i, block in enumerate(model.model.layers):
        if mode == "full" or (mode == "selective" and i % every == 0):
            block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# Per-op AC keeps the outputs of the matmuls (float8's too) and of attention, the FLOPs; everything else
# (LayerNorm, RoPE, GELU, dropout, casts, adds) is recomputed in backward. aten.max is float8's amax: a scalar.
OP_AC_SAVE = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              torch.ops.aten._scaled_mm.default, torch.ops.aten.max.default,
              torch.ops.aten._scaled_dot_product_flash_attention.default,
              torch.ops.aten._scaled_dot_product_efficient_attention.default,
              torch.ops.aten._scaled_dot_product_cudnn_attention.default,
              torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


def _op_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in OP_AC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def apply_op_ac(model):
    """activation_checkpointing="op": every block checkpointed with torch's selective checkpointing, which
    stores what the policy saves and recomputes the rest (torchtitan's op-level SAC)."""
    contexts = functools.partial(create_selective_checkpoint_contexts, _op_policy)
    for block in model.model.layers:
        block.forward = lambda *a, _f=block.forward, **k: checkpoint(_f, *a, use_reentrant=False,
                                                                      context_fn=contexts, **k)


def apply_float8(model, recipe, emulate, sharded, device_type):
    """float8="tensorwise" or "rowwise": torchao's Float8Linear in place of each block linear whose dimensions are
    multiples of 16 (what float8 matmuls need); lm_head and the embeddings stay. The fp32 master weights and
    their names do not change, so checkpoints move freely between float8 on and off. Tensorwise over FSDP
    all-gathers the weights in float8 (1 byte), with the scales float8_scales() computes after each step."""
    if device_type == "cuda" and not emulate and torch.cuda.get_device_capability() < (8, 9):
        raise ValueError(f"float8 needs float8 tensor cores (compute capability 8.9+: H100, H200, L40S, 4090); "
                         f"{torch.cuda.get_device_name()} has none: set float8=''")
    if device_type != "cuda" and not emulate:
        raise ValueError("float8 needs a CUDA GPU with float8 tensor cores; set float8='' on the CPU "
                         "(float8_emulate=True runs torchao's emulation, for tests)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ValueError("float8 needs torchao: pip install -r requirements.txt") from None
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate,
                                 enable_fsdp_float8_all_gather=sharded and recipe == "tensorwise")
    convert_to_float8_training(model.model.layers, config=config,
                               module_filter_fn=lambda m, _: m.in_features % 16 == 0 and m.out_features % 16 == 0)
    if config.enable_fsdp_float8_all_gather:  # weights loaded by a rollback: their scales, not the old weights'
        model.register_load_state_dict_post_hook(lambda module, _: float8_scales(module, recipe))


def float8_scales(model, float8):
    """After each optimizer step: with tensorwise float8 over FSDP, the scales of the next float8 all-gathers,
    all in one all-reduce (torchao's precompute_float8_dynamic_scale_for_fsdp); otherwise nothing."""
    if float8 == "tensorwise":
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
        precompute_float8_dynamic_scale_for_fsdp(model)


def apply_compile(model):
    for block in model.model.layers:
        block.compile()


def apply_fsdp(model, cfg, param_dtype, world_size, device_type):
    if cfg.fsdp == "hybrid":
        shard = cfg.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        grid = torch.arange(world_size).view(world_size // shard, shard)
        # the mesh's groups made here: init_device_mesh's would wait torch's default 30 minutes, not dist_timeout
        groups = [dist.new_subgroups_by_enumeration(ranks, timeout=timedelta(minutes=cfg.dist_timeout))[0]
                  for ranks in (grid.T.tolist(), grid.tolist())]  # replicas of a shard, then the shards of a replica
        mesh = DeviceMesh.from_group(groups, device_type, mesh=grid, mesh_dim_names=("replicate", "shard"))
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
    """A Phi on meta, frozen as configured, with float8, AC, compile and FSDP applied. -> (model, sharded)"""
    with torch.device("meta"):
        model = Phi(mcfg)
    if cfg.train_only_new_layers:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in new_layers:
            model.model.layers[i].requires_grad_(True)
    sharded = world_size > 1 or cfg.cpu_offload
    if cfg.float8:
        apply_float8(model, cfg.float8, cfg.float8_emulate, sharded, device_type)
    if cfg.activation_checkpointing != "none":
        apply_ac(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
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
