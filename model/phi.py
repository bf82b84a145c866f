"""Phi (phi-1/1.5/2) in plain PyTorch. Parameter names equal HF PhiForCausalLM keys, so HF
checkpoints load and save without a conversion table.

    model = Phi.from_pretrained("path/to/phi-2")            # HF dir: config.json + safetensors
    logits = model(idx)                                     # (B, T, vocab)
    _, loss = model(idx, targets)                           # chunked cross-entropy, ignore_index=-100
    model.save_pretrained("out/export", max_shard_size="2GB")
"""
import dataclasses
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

IGNORE_INDEX = -100
CE_CHUNK = 512  # rows of logits alive at once in the chunked loss: 512 x 51200 fp32 = 105 MB


class ModelLoadError(ValueError):
    pass


@dataclass
class PhiConfig:
    # names and defaults follow HF PhiConfig, so a config.json maps 1:1
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None = num_attention_heads
    partial_rotary_factor: float = 0.5  # rotary on the first int(head_dim * f) dims of each head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"type": "linear", "factor": f}
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    qk_layernorm: bool = False
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        """From an HF config.json dict (4.x flat rope keys or 5.x rope_parameters); unknown keys are ignored."""
        if d.get("model_type", "phi") != "phi":
            raise ModelLoadError(f"model_type is {d.get('model_type')!r}, expected 'phi'")
        if d.get("hidden_act", "gelu_new") != "gelu_new":
            raise ModelLoadError(f"hidden_act is {d['hidden_act']!r}, only 'gelu_new' (Phi) is supported")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ModelLoadError(f"rope type {kind!r} is not supported, use none or 'linear'")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kw["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)))
        kw["rope_scaling"] = {"type": "linear", "factor": float(rope["factor"])} if kind == "linear" else None
        return cls(**kw)

    def to_hf_dict(self):
        """Flat config.json keys that transformers 4.x and 5.x both read."""
        return {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
                "attention_dropout": 0.0, "tie_word_embeddings": False, **dataclasses.asdict(self)}

    @classmethod
    def preset(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}, choose from {sorted(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "phi-2": dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                  num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048, resid_pdrop=0.1),
    # trains on a CPU in minutes (config/tiny.py); train.py sets vocab_size from the data
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512),
    # unit tests: 3 heads of 16 dims, rotary on 8 of them
    "test": dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=3, partial_rotary_factor=0.5, max_position_embeddings=128),
}


def gelu_new(x):
    # HF's gelu_new (the tanh approximation) as one fused kernel: ~1e-7 from the written-out formula
    return F.gelu(x, approximate="tanh")


def apply_rope(x, cos, sin):
    # NeoX-style rotation of the first rotary_dim dims; the rest pass through
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    return torch.cat(((xr * cos) + (torch.cat((-x2, x1), dim=-1) * sin), xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.dense = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size)
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, kv=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_layernorm"):
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_head
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # generation: write this step into the static cache, attend over all of it under `mask`
            k_cache, v_cache, slots, mask = kv
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
            y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask,
                                               enable_gqa=gqa).to(v.dtype)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(gelu_new(self.fc1(x)))


class Block(nn.Module):
    """Attention and MLP in parallel on one shared input_layernorm."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, cos, sin, kv=None):
        h = self.input_layernorm(x)
        return self.resid_dropout(self.self_attn(h, cos, sin, kv)) + self.resid_dropout(self.mlp(h)) + x


class ChunkedCrossEntropy(torch.autograd.Function):
    """CE of h @ w.T + b, CE_CHUNK rows at a time, gradients included: each chunk's logits turn into
    softmax - onehot at once and are multiplied out, so (N, vocab) fp32 never exists and backward only
    scales the stored gradients instead of recomputing the logits (a whole lm_head matmul saved)."""

    @staticmethod
    def forward(ctx, h, w, b, targets, mean, need_grad):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_grad else None
        need_w = need_grad and (w.requires_grad or b.requires_grad)  # frozen lm_head: no (vocab, hidden) products
        dw = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        db = torch.zeros_like(b, dtype=torch.float32) if need_w else None
        for s in range(0, len(h), CE_CHUNK):
            hc, t = h[s:s + CE_CHUNK], targets[s:s + CE_CHUNK]
            logits, valid = torch.addmm(b, hc, w.t()).float(), t != IGNORE_INDEX
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, t.clamp(min=0)[:, None])[:, 0]) * valid).sum()
            if need_grad:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(t), device=g.device), t.clamp(min=0)] -= 1.0
                g = g.mul_(valid[:, None]).to(h.dtype)
                dh[s:s + CE_CHUNK] = g @ w
                if need_w:
                    dw += (g.t() @ hc).float()
                    db += g.float().sum(0)
        scale = 1.0 / (targets != IGNORE_INDEX).sum() if mean else torch.ones((), device=h.device)
        ctx.save_for_backward(dh, dw, db, scale)
        ctx.dtypes = w.dtype, b.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db, scale = ctx.saved_tensors
        s = grad * scale
        dw, db = (None, None) if dw is None else ((dw * s).to(ctx.dtypes[0]), (db * s).to(ctx.dtypes[1]))
        return dh * s.to(dh.dtype), dw, db, None, None, None


def chunked_cross_entropy(h, w, b, targets, reduction="mean"):
    """Next-token loss from final hidden states h (..., C) and lm_head w, b; targets -100 are ignored.
    reduction "sum" lets the caller divide by the valid-token count over micro-batches and ranks."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or b.requires_grad)
    return ChunkedCrossEntropy.apply(h.flatten(0, -2), w, b, targets.flatten(), reduction == "mean", need_grad)


class Phi(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            final_layernorm=nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        rotary_dim = int(cfg.hidden_size // cfg.num_attention_heads * cfg.partial_rotary_factor)
        # rope tables are derived from cfg, never saved: init_rope() rebuilds them (e.g. after to_empty)
        self.register_buffer("rope_cos", torch.empty(cfg.max_position_embeddings, rotary_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_position_embeddings, rotary_dim), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """HF Phi init (normal 0.02, zero bias, unit LayerNorm), drawn from the global torch RNG."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self):
        # same arithmetic as transformers: inv_freq on the CPU in fp32, linear scaling divides inv_freq
        cfg, rd = self.cfg, self.rope_cos.shape[1]
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
        if cfg.rope_scaling:
            inv_freq /= cfg.rope_scaling["factor"]
        device = self.lm_head.weight.device
        freqs = torch.arange(cfg.max_position_embeddings, device=device).float()[:, None] * inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()

    def forward(self, idx, targets=None, reduction="mean", pos=None, cache=None, last_only=False):
        """idx (B, T) -> logits (B, T, V); with targets -> (None, loss). Generation passes pos (B, T) rope
        positions and a cache with per-layer k/v lists plus the slots and mask of this step."""
        T = idx.shape[1]
        if pos is None:
            if T > self.rope_cos.shape[0]:
                raise ValueError(f"sequence length {T} > max_position_embeddings {self.rope_cos.shape[0]}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
        x = F.dropout(self.model.embed_tokens(idx), self.cfg.embd_pdrop, self.training)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.slots, cache.mask)
            x = layer(x, cos, sin, kv)
        x = self.model.final_layernorm(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x)
        return None, chunked_cross_entropy(x, self.lm_head.weight, self.lm_head.bias, targets, reduction)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load an HF Phi directory; built on meta, so the weights exist in memory only once."""
        cfg, sd = load_hf_state_dict(path)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict({k: sd.pop(k).to(device=device, dtype=dtype) for k in list(sd)}, assign=True)
        model.init_rope()
        return model

    def save_pretrained(self, path, max_shard_size="5GB"):
        """config.json + safetensors shards (+ index when more than one) that transformers loads."""
        limit = parse_size(max_shard_size)
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(path):  # shards of an earlier save would shadow or mix with this one
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f):
                os.remove(os.path.join(path, f))
        shards, size = [{}], 0
        for k, v in self.state_dict().items():
            n = v.numel() * v.element_size()
            if shards[-1] and size + n > limit:
                shards, size = shards + [{}], 0
            shards[-1][k], size = v.detach().contiguous().cpu(), size + n
        dtype = str(self.lm_head.weight.dtype).removeprefix("torch.")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**self.cfg.to_hf_dict(), "torch_dtype": dtype, "dtype": dtype}, f, indent=2)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for shard in shards for v in shard.values())
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def parse_size(s):
    """5000000, "5GB" (10^9) or "4GiB" (2^30) -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(s))
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"max_shard_size {s!r}: use bytes or a size like '2GB' or '500MiB'")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def _read_json(file, what):
    if not os.path.isfile(file):
        raise ModelLoadError(f"{file}: missing ({what})")
    try:
        with open(file) as f:
            return json.load(f)
    except ValueError as e:
        raise ModelLoadError(f"{file}: invalid JSON ({e})") from None


def load_hf_state_dict(path):
    """-> (PhiConfig, {name: tensor}) from an HF dir. Names and shapes are checked against config.json
    from the safetensors headers before any tensor is read."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: no such model directory")
    cfg_file, index = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors.index.json")
    d = _read_json(cfg_file, "an HF model directory needs config.json")
    try:
        cfg = PhiConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{cfg_file}: {e}") from None
    if os.path.isfile(index):
        files = sorted(set(_read_json(index, "").get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        pickles = [f for f in sorted(os.listdir(path)) if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles:
            raise ModelLoadError(f"{os.path.join(path, pickles[0])}: pickle checkpoint refused, safetensors only "
                                 "(re-save it with save_pretrained(..., safe_serialization=True))")
        raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in Phi(cfg).state_dict().items()}
    where = {}
    for file in (os.path.join(path, name) for name in files):
        if not os.path.isfile(file):
            raise ModelLoadError(f"{file}: missing (listed in model.safetensors.index.json)")
        try:
            with safe_open(file, "pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors has its own error types for corrupt headers
            raise ModelLoadError(f"{file}: unreadable safetensors file ({e})") from None
        for k, shape in shapes.items():
            if k not in expected and not k.endswith("rotary_emb.inv_freq"):  # old exports carry this buffer
                raise ModelLoadError(f"{file}: unexpected tensor {k!r} for the Phi model in config.json")
            if k in expected and shape != expected[k]:
                raise ModelLoadError(f"{file}: tensor {k!r} has shape {shape}, config.json implies {expected[k]}")
            where[k] = file
    missing = [k for k in expected if k not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: missing tensor {missing[0]!r}{more}")
    sd = {}
    for file in sorted(set(where.values())):
        with safe_open(file, "pt") as f:
            sd.update({k: f.get_tensor(k) for k in f.keys() if k in expected})
    return cfg, sd
