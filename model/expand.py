"""LLaMA-Pro block expansion (Wu et al., 2024): grow a pretrained Phi by identity blocks, so that training on a new
domain can go into new blocks while the old ones keep what they know (train.py: expand_layers,
train_only_new_layers)."""
import dataclasses

import torch

ZEROED = ("self_attn.dense.weight", "self_attn.dense.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def expand_state_dict(cfg, sd, n_new):
    """Insert n_new copies of blocks, one after the last block of each of n_new even groups. A copy gets
    self_attn.dense and mlp.fc2 zeroed, so its residual branch adds nothing and the model computes the same
    function. sd may be empty (ranks that receive weights by broadcast). -> (new cfg, new sd, new block indices)."""
    n = cfg.num_hidden_layers
    if not 0 < n_new <= n:
        raise ValueError(f"expand_layers: n_new must be in 1..{n}, got {n_new}")
    after = {(i + 1) * n // n_new - 1 for i in range(n_new)}
    src = [j for i in range(n) for j in ([i, i] if i in after else [i])]  # source block of each new position
    new = [i for i in range(1, len(src)) if src[i] == src[i - 1]]
    out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for i, j in enumerate(src):
        for k, v in sd.items():
            if k.startswith(f"model.layers.{j}."):
                rest = k[len(f"model.layers.{j}."):]
                copied = torch.zeros_like(v) if rest in ZEROED else v.clone()
                out[f"model.layers.{i}.{rest}"] = copied if i in new else v
    return dataclasses.replace(cfg, num_hidden_layers=len(src)), out, new
