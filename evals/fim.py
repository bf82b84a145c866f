"""Infilling: does the model write the middle of a held-out document from what comes before and after it?

From up to n_prompts val documents per language (short enough for the context), up to PER_DOC spans of each kind
are cut, one at a time, at a seeded choice:
- line: one line after the first (SantaCoder's single-line infilling);
- block: the body of a block, the lines after a line that opens an element, JSX tag, function or literal
  (domain.OPENS) that are indented deeper than it: an element's content, a function's body.
The middle starts with the newline and indentation before its text, so the prefix ends after a word and the cuts
fall where a byte-level BPE splits the whole document as well: a cut inside a run of whitespace would give the
model a token boundary it never saw in training.

The model writes the middle in both orders data/fim.py trains, until EOS (a line's middle is cut where its line
ends): PSM, `<fim_prefix> prefix <fim_suffix> suffix <fim_middle>` (exact_match, valid_rate), and SPM,
`<fim_prefix> <fim_suffix> suffix <fim_middle> prefix` (spm_exact_match, spm_valid_rate). Beside them the
left-to-right baseline: the same model after the prefix alone, cut to as many lines as the middle has
(l2r_exact_match, l2r_valid_rate). exact: the middle written exactly, surrounding whitespace aside; valid: prefix +
written middle + suffix parses (XML, MDX, JS: domain.check_docs), beside reference_valid_rate, the share of the
untouched documents that parse. Per language and kind too, e.g. xml/line/spm_exact_match.
"""
import re

import numpy as np
import torch

from data.fim import FIM_TOKENS
from data.loader import read_meta
from evals.domain import OPENS, check_docs, heldout_docs
from evals.sampling import gen_budget
from model.generate import generate

LINE_TOKENS = 48  # new tokens for one line
PER_DOC = 4  # lines, and blocks, cut from each document (one at a time)
CHECKED = ("xml", "mdx", "js")  # languages with a parser; the others get exact match only


def cut(doc, start, end):
    """(prefix, middle, suffix) with the middle doc[start:end] plus the whitespace before it: cuts then fall where a
    byte-level BPE splits the whole document too (before a newline, after a word), as in training."""
    a = len(doc[:start].rstrip())
    return (doc[:a], doc[a:end], doc[end:]) if a else None


def line_spans(doc):
    """(start, end) of the text of every non-blank line after the first."""
    lines = doc.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(x) for x in lines])
    return [(starts[i] + len(x) - len(x.lstrip()), starts[i] + len(x.rstrip())) for i, x in enumerate(lines)
            if x.strip() and i > 0]


def block_spans(doc, lang):
    """(start, end) of the body of every block that an opening line starts and a later line closes."""
    lines = doc.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(x) for x in lines])
    indent = [len(x) - len(x.lstrip()) for x in lines]
    spans = []
    for i, line in enumerate(lines[:-1]):
        if lang not in OPENS or not OPENS[lang].search(line.rstrip("\n")):
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or indent[j] > indent[i]):
            j += 1
        body = [k for k in range(i + 1, j) if lines[k].strip()]
        if body and j < len(lines):
            spans.append((starts[body[0]] + indent[body[0]], starts[body[-1]] + len(lines[body[-1]].rstrip())))
    return spans


def first_line(text):
    """The whitespace a text starts with and its first line of text: what a line's middle is."""
    return re.match(r"\s*[^\n]*", text).group(0)


def lines_like(text, middle):
    """text cut before the newline that would start one more line than the middle has."""
    return "\n".join(text.split("\n")[:middle.count("\n") + 1])


def cases(data_dir, langs, n_docs, max_tokens, seed):
    """[(lang, kind, prefix, middle, suffix)]: from up to n_docs val documents per language, up to PER_DOC lines
    and PER_DOC blocks of each, drawn with a seeded generator."""
    out = []
    for lang in langs:
        for d, doc in enumerate(heldout_docs(data_dir, lang, n_docs, max_tokens)):
            rng = np.random.default_rng([seed, d, len(out)])
            for kind, spans in (("line", line_spans(doc)), ("block", block_spans(doc, lang))):
                for k in rng.permutation(len(spans))[:PER_DOC]:
                    span = cut(doc, *spans[k])
                    if span and span[1].strip():
                        out.append((lang, kind, *span))
    return out


def infill(model, tokenizer, prompts, budgets, batch_size):
    """Generated text for each prompt (token ids), to EOS or the budget, in batches of one budget and similar
    lengths. Sentinels a model writes stay in the text: they are its mistakes."""
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    texts = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        new = generate(model, [prompts[i] for i in rows], max_new_tokens=max(budgets[i] for i in rows),
                       eos_id=tokenizer.eos_token_id)
        for i, ids in zip(rows, new):
            texts[i] = tokenizer.decode(ids[:budgets[i]])
    return texts


@torch.no_grad()
def evaluate(run):
    """validate.py's fim task."""
    s, model, tok = run.settings, run.model, run.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in FIM_TOKENS.items()}
    if any(i is None or i == tok.unk_token_id for i in ids.values()):
        return {"skipped": "the model's tokenizer has no FIM sentinels (data/prepare.py adds them)"}, []
    block_budget = gen_budget(model, s.max_new_tokens)
    room = model.cfg.max_position_embeddings - block_budget - len(ids)  # tokens a document may take
    langs = read_meta(s.data_dir)["langs"]
    todo = cases(s.data_dir, langs, s.limit or s.n_prompts, room, s.seed)
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    prompts = {"": [], "spm_": [], "l2r_": []}
    for lang, kind, pre, mid, suf in todo:
        p = enc(pre)[-room:]  # a prefix longer than the room keeps its end, the suffix its start
        q = enc(suf)[:room - len(p)]
        prompts[""].append([ids["prefix"]] + p + [ids["suffix"]] + q + [ids["middle"]])
        prompts["spm_"].append([ids["prefix"], ids["suffix"]] + q + [ids["middle"]] + p)
        prompts["l2r_"].append(p)
    budgets = [LINE_TOKENS if kind == "line" else block_budget for _, kind, _, _, _ in todo]
    rows = [{"task": "fim", "task_id": f"fim/{lang}/{kind}-{i}", "lang": lang, "kind": kind, "prefix": pre,
             "suffix": suf, "middle": mid} for i, (lang, kind, pre, mid, suf) in enumerate(todo)]
    for order, batch in prompts.items():
        for r, text in zip(rows, infill(model, tok, batch, budgets, s.batch_size)):
            # a line ends where its line ends; left to right, a block also stops where the middle would
            text = (first_line(text) if r["kind"] == "line" else lines_like(text, r["middle"]) if order == "l2r_"
                    else text)
            r.update({f"{order}completion": text, f"{order}exact": text.strip() == r["middle"].strip()})
    for lang in CHECKED:
        mine = [r for r in rows if r["lang"] == lang]
        for order in ("", "spm_", "l2r_", "reference_"):
            key = "middle" if order == "reference_" else f"{order}completion"
            for r, (ok, err) in zip(mine, check_docs(lang, [r["prefix"] + r[key] + r["suffix"] for r in mine])):
                r.update({f"{order}valid": ok} | ({"detail": err} if not order else {}))
    metrics = {"n": len(rows)}
    for name, sel in [("", rows)] + [(f"{lang}/{kind}/", [r for r in rows if r["lang"] == lang and r["kind"] == kind])
                                      for lang in langs for kind in ("line", "block")]:
        for order in ("", "spm_", "l2r_") if sel else ():
            metrics[f"{name}{order}exact_match"] = sum(r[f"{order}exact"] for r in sel) / len(sel)
        checked = [r for r in sel if "valid" in r]
        for order in ("", "spm_", "l2r_", "reference_") if checked else ():
            metrics[f"{name}{order}valid_rate"] = sum(r[f"{order}valid"] for r in checked) / len(checked)
    metrics["failures"] = [f'{r["task_id"]}: wrote {r["completion"][:60]!r} for {r["middle"][:60]!r}'
                           for r in rows if not r["exact"]][:5]
    return metrics, rows
