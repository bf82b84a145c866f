"""Batched generation for Phi with a static KV cache, gpt-fast style (prefill, then decode_one_token).

    from model.generate import generate, generate_text
    new_ids = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=20)                # greedy
    texts = generate_text(model, tok, ["def f(x):"], max_new_tokens=64, temperature=0.8, top_p=0.95,
                          stop=["\\ndef "], seed=0)

Prompts are left-padded to one length; each row sees only its own tokens and gets rope positions
counted from its first real token, so a row's output does not depend on the others in the batch.
Every step has fixed shapes (one token, the whole cache under a mask), so decode_one_token compiles.

Command line (an HF model dir with tokenizer.json, e.g. an export):
    python -m model.generate MODEL_DIR "def fib(n):" --max-new-tokens 64 [--temperature 0.8 --top-p 0.95 --seed 0]
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class KVCache:
    k: list  # per layer (B, n_kv_heads, S, head_dim)
    v: list
    slots: torch.Tensor | None = None  # (T,) cache positions written by the current forward
    mask: torch.Tensor | None = None  # (B, 1, T, S) bool, True = may attend


def new_cache(model, batch, length):
    cfg, w = model.cfg, model.lm_head.weight
    shape = (batch, cfg.num_key_value_heads, length, cfg.hidden_size // cfg.num_attention_heads)
    n = len(model.model.layers)
    return KVCache([torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(n)],
                   [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(n)])


def _forward(model, idx, slots, pad, cache):
    # causal over cache slots and blind to left padding; a pad query still sees itself, so no softmax row is empty
    keys = torch.arange(cache.k[0].shape[2], device=idx.device)
    q = slots[:, None]
    cache.slots = slots
    cache.mask = ((keys <= q) & ((keys >= pad[:, None, None]) | (keys == q)))[:, None]
    pos = (slots[None] - pad[:, None]).clamp(min=0)
    return model(idx, pos=pos, cache=cache, last_only=True)[:, -1].float()


def prefill(model, idx, pad, cache):
    """idx (B, P) left-padded prompts, pad (B,) pad counts -> logits (B, V) for the next token."""
    return _forward(model, idx, torch.arange(idx.shape[1], device=idx.device), pad, cache)


def decode_one_token(model, tok, slot, pad, cache):
    """tok (B, 1) at cache slot (1,) -> logits (B, V)."""
    return _forward(model, tok, slot, pad, cache)


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """(B, V) fp32 logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already covers top_p
        logits = logits.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop=None,
             tokenizer=None, seed=None, eos_id=None):
    """-> new token ids per prompt, ending before eos or with the token that completed a stop string."""
    if stop and tokenizer is None:
        raise ValueError("generate: stop strings need a tokenizer to decode the output")
    if not prompts or min(map(len, prompts)) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    B, P = len(prompts), max(map(len, prompts))
    if P + max_new_tokens > model.cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt {P} + max_new_tokens {max_new_tokens} > max_position_embeddings "
                         f"{model.cfg.max_position_embeddings}")
    device = model.lm_head.weight.device
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=device)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    cache = new_cache(model, B, P + max_new_tokens)
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    # sharded models run collectives in every forward, so all ranks must take the same number of steps
    may_stop_early = not (dist.is_available() and dist.is_initialized())
    was_training = model.training
    model.eval()
    out, done = [[] for _ in prompts], [False] * B
    logits = prefill(model, idx, pad, cache)
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, gen)
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            if t == eos_id:
                done[b] = True
                continue
            out[b].append(t)
            if stop and any(s in tokenizer.decode(out[b]) for s in stop):
                done[b] = True
        if i == max_new_tokens - 1 or (all(done) and may_stop_early):
            break
        logits = decode_one_token(model, tok[:, None], torch.tensor([P + i], device=device), pad, cache)
    model.train(was_training)
    return out


def cut_at_stop(text, stop):
    """text up to the first occurrence of any stop string (all of it when none occurs)."""
    return text[:min([text.find(s) for s in stop if s in text], default=len(text))]


def generate_text(model, tokenizer, prompts, **kw):
    """Strings in, completions out (cut before the first stop string). tokenizer: HF tokenizers or transformers."""
    ids = [getattr(e, "ids", e) for e in (tokenizer.encode(p) for p in prompts)]
    texts = [tokenizer.decode(o) for o in generate(model, ids, tokenizer=tokenizer, **kw)]
    return [cut_at_stop(t, kw.get("stop") or []) for t in texts]


def main():
    ap = argparse.ArgumentParser(description="Complete prompts with a Phi model directory.")
    ap.add_argument("model_dir")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--stop", action="append", help="stop string (repeatable)")
    ap.add_argument("--seed", type=int)
    args = ap.parse_args()
    from tokenizers import Tokenizer
    from model.phi import Phi
    try:
        model = Phi.from_pretrained(args.model_dir)
        tok_file = os.path.join(args.model_dir, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ValueError(f"{tok_file}: missing (generation needs the tokenizer next to the weights)")
        gen_file = os.path.join(args.model_dir, "generation_config.json")
        eos = json.load(open(gen_file)).get("eos_token_id") if os.path.isfile(gen_file) else None
        texts = generate_text(model, Tokenizer.from_file(tok_file), args.prompts, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop=args.stop,
                              seed=args.seed, eos_id=eos[0] if isinstance(eos, list) else eos)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for prompt, text in zip(args.prompts, texts):
        print(prompt + text)


if __name__ == "__main__":
    main()
