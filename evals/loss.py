"""Per-language validation loss, perplexity and next-token accuracy, and log-likelihood scoring.

train.py's eval, validate.py's `ppl` task and monitor.py's perplexity all use these functions, so the
numbers agree to the last digit on the same checkpoint and data.
"""
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data.format import data_tokenizer
from data.loader import read_meta, val_batches

ROWS = 8192  # fp32 logits for 8k positions at a time: 32k contexts fit


def perplexity(loss):
    """exp(loss), capped at exp(50): exp overflows past ~709 and a diverged run should still log."""
    return math.exp(min(loss, 50.0))


def val_sets(data_dir, langs, batch_size, block_size, eval_iters, rank=0, world_size=1, device="cpu",
             fim_spm_rate=None):
    """{lang: this rank's share of the fixed val batches}. eval_iters rounds up to a multiple of world_size,
    and ranks take every world_size-th batch; languages without val data are left out. With fim_spm_rate:
    the same batches with every document rearranged for fill-in-the-middle (val_batches)."""
    n = -(-eval_iters // world_size) * world_size
    val = {lang: val_batches(data_dir, lang, batch_size, block_size, n, device, fim_spm_rate)[rank::world_size]
           for lang in langs}
    return {lang: batches for lang, batches in val.items() if batches}


@torch.no_grad()
def lang_metrics(model, val, ctx=nullcontext(), suffix=""):
    """val_loss/<lang>, val_ppl/<lang>, val_acc/<lang> and the token-weighted val_loss, val_ppl over all
    languages, for {lang: [(x, y)]}; suffix "_fim" names them val_loss_fim/<lang>, ... Sums are all-reduced
    when a process group exists, so every rank gets the numbers of all ranks' batches."""
    was_training = model.training
    model.eval()
    device = next(iter(val.values()))[0][0].device
    out, total = {}, torch.zeros(2, device=device)
    for lang, batches in val.items():
        s = torch.zeros(3, device=device)  # loss sum, correct tokens, tokens
        for x, y in batches:
            with ctx:
                logits = model(x)
            logits, y = logits.flatten(0, 1), y.flatten()
            for i in range(0, y.numel(), ROWS):
                s[0] += F.cross_entropy(logits[i:i + ROWS].float(), y[i:i + ROWS], reduction="sum", ignore_index=-100)
            s[1] += ((logits.argmax(-1) == y) & (y != -100)).sum()
            s[2] += (y != -100).sum()
        if dist.is_initialized():
            dist.all_reduce(s)
        loss_sum, correct, n = s.tolist()
        out[f"val_loss{suffix}/{lang}"] = loss_sum / n
        out[f"val_ppl{suffix}/{lang}"] = perplexity(loss_sum / n)
        out[f"val_acc{suffix}/{lang}"] = correct / n
        total += s[[0, 2]]
    out[f"val_loss{suffix}"] = (total[0] / total[1]).item()
    out[f"val_ppl{suffix}"] = perplexity(out[f"val_loss{suffix}"])
    model.train(was_training)
    return out


def evaluate(run):
    """validate.py's `ppl` task: lang_metrics on the val split. A training checkpoint is scored on the batches its
    run's eval used (batch_size, block_size, eval_iters and world size from its config), so the numbers equal
    what train.py logged; other models on 4-row batches of up to 1024 tokens (fewer when a val split is small).
    With the FIM sentinels in the data, also val_loss_fim: the same batches with every document rearranged."""
    s, model, trained = run.settings, run.model, run.train_config
    meta = read_meta(s.data_dir)
    data_tok = data_tokenizer(meta)
    if data_tok.get_vocab() != run.tokenizer.get_vocab():
        return {"skipped": f"{s.data_dir} was tokenized with another tokenizer than the model's"}, []
    batch, iters, world = trained.get("batch_size", 4), s.limit or trained.get("eval_iters", 20), run.train_world_size
    device = model.lm_head.weight.device
    # val_loss_fim too where the data has the sentinels: a FIM run logged it, and its fim_rate=0 twin is compared on it
    fim = trained.get("fim_spm_rate", 0.5) if meta.get("fim") else None
    val, val_fim = {}, {}
    for lang in tqdm(meta["langs"], desc="ppl", leave=False):
        n_val = meta["files"][f"val_{lang}"]["tokens"]
        block = trained.get("block_size") or min(model.cfg.max_position_embeddings, 1024, n_val - 1)
        if block < 1:
            continue
        for spm, into in ((None, val), (fim, val_fim)) if fim is not None else ((None, val),):
            # all ranks' batches, read once, in rank order, so the sums add up as train.py's all-reduce does
            batches = val_sets(s.data_dir, [lang], batch, block, -(-iters // world) * world, device=device,
                               fim_spm_rate=spm).get(lang, [])
            into[lang] = [b for r in range(world) for b in batches[r::world]]
    val, val_fim = ({lang: b for lang, b in v.items() if b} for v in (val, val_fim))
    if not val:
        return {"skipped": f"no val data in {s.data_dir}"}, []
    return lang_metrics(model, val) | (lang_metrics(model, val_fim, suffix="_fim") if val_fim else {}), []


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs, batch_size, desc="score"):
    """Sum of log p(continuation | context) for each (context, continuation) string pair, tokenized as
    lm-evaluation-harness does: the context's trailing spaces move to the continuation, whose tokens are those the
    whole string has after the context's count; the sequence is cut from the left to the context size + 1."""
    max_len = model.cfg.max_position_embeddings
    device = model.lm_head.weight.device
    out = []
    for b in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
        seqs = []
        for ctx, cont in pairs[b:b + batch_size]:
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont
            c = tokenizer.encode(ctx, add_special_tokens=False)
            d = tokenizer.encode(ctx + cont, add_special_tokens=False)[len(c):]
            seqs.append(((c + d)[-(max_len + 1):], len(d)))
        T = max(len(s) for s, _ in seqs) - 1
        x = torch.zeros(len(seqs), T, dtype=torch.long)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, (s, n) in enumerate(seqs):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            y[i, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
        y = y.to(device)
        lp = model(x.to(device)).float().log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        out += (lp * (y >= 0)).sum(1).tolist()
    return out
