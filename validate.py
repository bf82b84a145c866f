"""Validate a checkpoint: is it good at XML, MDX and JavaScript, and can it still code?

Usage:
  python validate.py --ckpt out/tiny                        # training run dir, checkpoint dir or HF dir
  python validate.py --ckpt out/export --compare ~/phi-2 --tasks xml mdx js js-exec humaneval
  python validate.py --ckpt ~/phi-2 --tasks mbpp mmlu --mbpp mbpp.jsonl --mmlu mmlu/data --limit 50
  python validate.py --samples out/validate/samples.jsonl --tasks js-exec humaneval   # no model needed

Tasks: ppl xml mdx js js-exec humaneval mbpp mmlu codebleu (default: all whose inputs are present).
xml/mdx/js prompt with our prompt set and the beginnings of held-out documents short enough to be
finished in the token budget, each cut after a line that opens something (element, JSX, block) the
completion must close. They report valid_rate (the whole document parses) and prefix_valid_rate
(no error before the end, and for XML/MDX some markup written: what a model whose documents outgrow
--max-new-tokens or its context can still get right).
Writes {out}/report.json, {out}/report.md and {out}/samples.jsonl: every prompt, completion and
verdict, which --samples scores again, e.g. on a safer machine than the one that generated it.
Generated code only ever runs in checkers/execute.py's sandboxes; XML, MDX and JS are parsed, never run.
Validity and CodeBLEU decode greedily; js-exec, humaneval and mbpp draw --n-samples per problem
(greedy when 1, else --temperature with top_p 0.95) and report unbiased pass@k.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkers import execute
from ckpt import CheckpointError
from data.loader import DataError
from model.phi import ModelLoadError
from checkers.syntax import check_js, check_mdx, check_xml, mdx_exact, node_available, valid_prefix

TASKS = ["ppl", "xml", "mdx", "js", "js-exec", "humaneval", "mbpp", "mmlu", "codebleu"]
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. (2021)
MBPP_STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"]  # bigcode-evaluation-harness

# Beginnings of documents we wrote, so validity has prompts even without a data dir.
PROMPTS = {
    "xml": [
        '<?xml version="1.0" encoding="UTF-8"?>\n<catalog>\n  <book id="bk101">\n    <author>',
        '<?xml version="1.0" encoding="UTF-8"?>\n<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        '  <modelVersion>4.0.0</modelVersion>\n  <groupId>',
        '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="120" viewBox="0 0 120 120">\n  <rect ',
        '<?xml version="1.0"?>\n<config>\n  <server port="8080">\n',
        '<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0">\n  <channel>\n    <title>',
        '<orders>\n  <order id="1001" status="shipped">\n    <item sku="A-1" qty="2"/>\n',
        '<?xml version="1.0" encoding="UTF-8"?>\n<manifest xmlns:android="http://schemas.android.com/apk/res/android">\n',
        '<users>\n  <user>\n    <name>Ada</name>\n',
    ],
    "mdx": [  # each opens JSX or an expression that the completion must close
        "---\ntitle: Getting started\n---\n\nimport { Callout } from './components'\n\n# Getting started\n\n"
        "<Callout type=\"info\">\n",
        "# Button\n\nThe `Button` component triggers an action.\n\n<Button variant=\"primary\">",
        "export const meta = { title: 'Introduction' }\n\n# {meta.",
        "import Chart from '../components/Chart'\n\n## Monthly sales\n\n<Chart data={[",
        "# Installation\n\n<Steps>\n\n```bash\nnpm install my-lib\n```\n\n",
        "---\ntitle: Release notes\n---\n\n## v2.0.0\n\n<Badge color=\"green\">",
        "import { Tabs, Tab } from './tabs'\n\n<Tabs>\n  <Tab label=\"npm\">\n",
        "# API\n\n<Note>\n",
    ],
    "js": [
        "function debounce(fn, wait) {\n",
        "export async function fetchJson(url, options = {}) {\n",
        "class Stack {\n  constructor() {\n",
        "const express = require('express');\nconst app = express();\n\n",
        "/**\n * Returns the sum of an array of numbers.\n * @param {number[]} xs\n */\nfunction sum(xs) {\n",
        "import { useState } from 'react';\n\nexport function useToggle(initial = false) {\n",
        "const users = [\n  { name: 'Ada', age: 36 },\n",
        "module.exports = {\n  mode: 'production',\n",
    ],
}


class ValidateError(ValueError):
    """Bad input to validate.py; the message is one line with the fix."""


@dataclasses.dataclass
class Settings:
    tasks: list
    data_dir: str | None = None
    n_samples: int = 1
    temperature: float = 0.8
    max_new_tokens: int = 512
    batch_size: int = 16
    limit: int | None = None
    n_prompts: int = 50  # held-out document prompts per language
    workers: int = os.cpu_count() or 1
    seed: int = 0
    js_problems: str = str(execute.JS_PROBLEMS)
    mbpp: str | None = None
    mmlu: str | None = None
    mmlu_shots: int = 5


# -----------------------------------------------------------------------------
# loading


def resolve_ckpt(path):
    """A training run dir or its ckpt/ dir means its latest checkpoint."""
    p = Path(path)
    for latest in (p / "ckpt" / "latest", p / "latest"):
        if latest.is_file():
            return str(latest.parent / latest.read_text().strip())
    if not p.exists():
        raise ValidateError(f"checkpoint {path} does not exist; pass a training run/checkpoint dir or an HF model dir")
    return str(p)


def ckpt_data_dir(path):
    """The data dir a training checkpoint was trained on, or None (HF dirs)."""
    state = Path(resolve_ckpt(path)) / "train_state.json"
    return json.loads(state.read_text()).get("config", {}).get("data_dir") if state.is_file() else None


def load(path, device, dtype, data_dir=None):
    """(model, tokenizer) from a training checkpoint or an HF dir; the tokenizer comes from the
    checkpoint, else from the data dir's meta.json."""
    from ckpt import load_for_inference
    from data.loader import read_meta
    from transformers import AutoTokenizer
    path = resolve_ckpt(path)
    model, tok_dir = load_for_inference(path, dtype=dtype, device=device)
    if tok_dir is None and data_dir:
        tok_dir = read_meta(data_dir)["tokenizer"]
    if tok_dir is None:
        raise ValidateError(f"{path} has no tokenizer: copy tokenizer.json (+ tokenizer_config.json) into it, "
                            f"or pass --data-dir of the data it was trained on")
    return model, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


# -----------------------------------------------------------------------------
# generation


def cut(text, stop):
    return text[:min([text.find(s) for s in stop if s in text], default=len(text))]


def complete(model, tokenizer, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0, batch_size=16, desc="generate"):
    """Completions for prompt strings, cut before the first stop string, and whether each ran out of tokens.
    Prompts that leave no room are cut from the left; batches group prompts of similar length."""
    from model.generate import generate
    max_pos = model.cfg.max_position_embeddings
    max_new = gen_budget(model, max_new_tokens)
    ids = [tokenizer.encode(p, add_special_tokens=False)[-(max_pos - max_new):] or [tokenizer.eos_token_id or 0]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts, truncated = [None] * len(ids), [False] * len(ids)
    eos = tokenizer.eos_token_id
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        rows = order[b:b + batch_size]
        n = min(max_new, max_pos - max(len(ids[i]) for i in rows))
        out = generate(model, [ids[i] for i in rows], max_new_tokens=n, temperature=temperature,
                       top_p=0.95 if temperature > 0 else None, stop=list(stop) or None, tokenizer=tokenizer,
                       seed=seed + b, eos_id=eos)
        for i, o in zip(rows, out):
            text = tokenizer.decode(o, skip_special_tokens=True)
            texts[i] = cut(text, stop)
            truncated[i] = len(o) == n and texts[i] == text
    return texts, truncated


def samples_for(run, task, items, stop, n=1, max_new_tokens=None):
    """items [(task_id, prompt)] -> {task_id: [(completion, truncated)] * n}, from --samples or the model."""
    if run.samples is not None:
        got = run.samples.get(task, {})
        return {tid: [(cut(c, stop), False) for c in got[tid]] for tid, _ in items if tid in got}
    s = run.settings
    temperature = s.temperature if n > 1 else 0.0
    prompts = [p for _, p in items for _ in range(n)]
    texts, trunc = complete(run.model, run.tokenizer, prompts, max_new_tokens or s.max_new_tokens, stop,
                            temperature, s.seed, s.batch_size, desc=f"{task}: generate")
    return {tid: list(zip(texts[i * n:(i + 1) * n], trunc[i * n:(i + 1) * n])) for i, (tid, _) in enumerate(items)}


# -----------------------------------------------------------------------------
# held-out documents


def heldout_docs(data_dir, lang, n, max_tokens=None):
    """Up to n decoded val documents of a language (of at most max_tokens), evenly spread over val_{lang}.bin."""
    from data.loader import open_tokens, read_meta
    from transformers import AutoTokenizer
    meta = read_meta(data_dir)
    if lang not in meta["langs"]:
        return []
    tokens = np.asarray(open_tokens(data_dir, meta, "val", lang))
    ends = np.flatnonzero(tokens == meta["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    spans = [(a, b) for a, b in zip(starts, ends) if b > a and (max_tokens is None or b - a <= max_tokens)]
    pick = [spans[i] for i in np.linspace(0, len(spans) - 1, min(n, len(spans))).astype(int)] if spans else []
    tok = AutoTokenizer.from_pretrained(meta["tokenizer"], local_files_only=True)
    return [tok.decode(tokens[a:b].tolist()) for a, b in pick]


def split_doc(doc, frac):
    """(first lines, rest) with about frac of the lines in the first part, at least one line."""
    lines = doc.splitlines(keepends=True)
    k = max(1, int(len(lines) * frac))
    return "".join(lines[:k]), "".join(lines[k:])


# A line that opens what the rest of the document must close: an XML element, a JSX element, a JS block,
# call or literal. Prompts end after one, so a completion must close it (plain text is valid MDX, and a
# bare identifier is a valid JS statement: a prompt cut between blocks would test nothing).
OPENS = {"xml": re.compile(r"<[A-Za-z_][^<>]*(?<!/)>\s*$"),
         "mdx": re.compile(r"^\s*<[A-Z][\w.]*(\s[^<>]*)?(?<!/)>\s*$"),
         "js": re.compile(r"[{(\[]\s*$")}


def doc_prompt(lang, doc):
    """The beginning of a held-out document: through the first opening line from a quarter of the
    lines on (else the first anywhere, else a quarter of the lines)."""
    lines = doc.splitlines(keepends=True)
    k = max(1, int(len(lines) * 0.25))
    opens = [i for i, line in enumerate(lines[:-1]) if OPENS[lang].search(line)]
    k = next((i + 1 for i in opens if i + 1 >= k), opens[0] + 1 if opens else k)
    return "".join(lines[:k])


def gen_budget(model, max_new_tokens):
    """New tokens complete() can give: half the context at most, so prompts keep the other half."""
    return min(max_new_tokens, model.cfg.max_position_embeddings // 2)


def validity_prompts(lang, data_dir, n_prompts, limit, max_tokens=None):
    """Our prompt set, then beginnings of held-out documents short enough (max_tokens) to be completed.
    Trailing whitespace is cut: BPE merges a newline with the indent after it, so a prompt ending in a
    bare newline ends on a token seen mostly at the end of documents."""
    items = [(f"{lang}/set-{i}", p) for i, p in enumerate(PROMPTS[lang])]
    if data_dir:
        docs = heldout_docs(data_dir, lang, n_prompts, max_tokens)
        items += [(f"{lang}/val-{i}", doc_prompt(lang, d)) for i, d in enumerate(docs)]
    items = [(tid, p.rstrip()) for tid, p in items]
    return items[:limit] if limit else items


# -----------------------------------------------------------------------------
# tasks: each returns (metrics, sample rows)


def check_docs(lang, docs):
    """[(ok, err)] for whole documents. XML is cut after the root element closes, where a model that
    does not stop would otherwise fail on the text that follows a complete document."""
    if lang == "mdx":
        return check_mdx(docs)
    if lang == "js":
        return [check_js(d) for d in docs]
    out = []
    for d in docs:
        ok, err = check_xml(d)
        m = re.search(r"Extra content at the end of the document, line (\d+), column (\d+)", err or "")
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            lines = d.split("\n")
            ok, err = check_xml("\n".join(lines[:line - 1] + [lines[line - 1][:col - 1]]))
        out.append((ok, err))
    return out


# Plain text is valid inside any XML element or MDX paragraph (a random model's output often is), so
# prefix validity also asks for some markup: a tag; for MDX also an expression, heading, list, fence or ESM.
MARKUP = {"xml": re.compile(r"<[A-Za-z_/!?][^<>]*>"),
          "mdx": re.compile(r"<[A-Za-z/>]|\{|^(#{1,6} |[-*] |\d+\. |```|import |export )", re.M)}


def prefix_ok(lang, prompt, completion, ok, err):
    """Valid or only cut short (no error before the end), with some markup written."""
    markup = lang not in MARKUP or bool(MARKUP[lang].search(completion))
    return markup and (ok or valid_prefix(lang, prompt + completion, err))


def eval_validity(run, lang):
    s = run.settings
    budget = gen_budget(run.model, s.max_new_tokens) if run.model is not None else s.max_new_tokens
    items = validity_prompts(lang, s.data_dir, s.n_prompts, s.limit, max_tokens=budget)
    if run.samples is not None:  # prompts come with the samples
        items = [(tid, run.sample_prompts.get(tid, "")) for tid in run.samples.get(lang, {})]
    got = samples_for(run, lang, items, stop=())
    prompts = dict(items)
    rows = [{"task": lang, "task_id": tid, "prompt": prompts[tid], "completion": c, "truncated": t}
            for tid, cs in got.items() for c, t in cs]
    for r, (ok, err) in zip(rows, check_docs(lang, [r["prompt"] + r["completion"] for r in rows])):
        r.update(ok=ok, detail=err, prefix_ok=prefix_ok(lang, r["prompt"], r["completion"], ok, err))
    n = len(rows)
    metrics = {"n": n, "valid_rate": sum(r["ok"] for r in rows) / max(n, 1),
               "prefix_valid_rate": sum(r["prefix_ok"] for r in rows) / max(n, 1),
               "truncated_rate": sum(r["truncated"] for r in rows) / max(n, 1),
               "failures": [f'{r["task_id"]}: {r["detail"]}' for r in rows if not r["ok"]][:5]}
    if lang == "mdx":
        metrics["approximate"] = not mdx_exact()
    return metrics, rows


def pass_rates(rows):
    """Mean unbiased pass@k over problems, for k in 1, 10, 100 up to the samples per problem."""
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(r["ok"])
    n_min = min((len(v) for v in by_task.values()), default=0)
    out = {"problems": len(by_task), "samples": len(rows)}
    for k in (1, 10, 100):
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = sum(execute.pass_at_k(len(v), sum(v), k) for v in by_task.values()) / len(by_task)
    return out


def eval_exec(run, task, problems, runner, timeout):
    """problems: [(task_id, prompt, stop, program(completion) -> str)]; runs every sample in a sandbox."""
    items = [(tid, prompt) for tid, prompt, _, _ in problems]
    by_stop = {}
    for tid, prompt, stop, _ in problems:  # one generate() call per distinct stop list
        by_stop.setdefault(tuple(stop), []).append((tid, prompt))
    got = {}
    for stop, group in by_stop.items():
        got.update(samples_for(run, task, group, stop, n=run.settings.n_samples))
    program, prompts = {tid: fn for tid, _, _, fn in problems}, dict(items)
    rows = [{"task": task, "task_id": tid, "prompt": prompts[tid], "completion": c, "truncated": t}
            for tid, cs in got.items() for c, t in cs]
    results = execute.run_many([program[r["task_id"]](r["completion"]) for r in rows],
                               lambda p: runner(p, timeout=timeout), run.settings.workers, desc=f"{task}: execute")
    for r, (ok, detail) in zip(rows, results):
        r.update(ok=ok, detail=detail)
    metrics = pass_rates(rows)
    metrics["failures"] = [f'{r["task_id"]}: {r["detail"]}' for r in rows if not r["ok"]][:5]
    return metrics, rows


def eval_js_exec(run):
    problems = execute.load_js_problems(run.settings.js_problems)[:run.settings.limit]
    return eval_exec(run, "js-exec", [(p["name"], p["prompt"], p["stop_tokens"],
                                       lambda c, p=p: execute.js_program(p, c)) for p in problems],
                     execute.run_js, timeout=5.0)


def eval_humaneval(run):
    problems = execute.humaneval_problems()[:run.settings.limit]
    return eval_exec(run, "humaneval", [(p["task_id"], p["prompt"], HUMANEVAL_STOP,
                                         lambda c, p=p: execute.humaneval_program(p, c)) for p in problems],
                     execute.run_python, timeout=10.0)


def load_mbpp(path):
    """MBPP JSONL (text or prompt, code, test_list, optional test_setup_code / test_imports)."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ValidateError(f"cannot read MBPP file {path} ({e}); pass the JSONL release with --mbpp")
    for i, r in enumerate(rows):
        if "test_list" not in r or not ({"text", "prompt"} & r.keys()):
            raise ValidateError(f"{path}: record {i} lacks text/prompt or test_list; expected MBPP JSONL")
    return rows


def mbpp_prompt(r):
    return f'"""\n{r.get("text") or r["prompt"]}\n{r["test_list"][0]}\n"""\n'


def mbpp_program(r, completion):
    setup = r.get("test_setup_code") or "\n".join(r.get("test_imports") or [])
    return f"{mbpp_prompt(r)}{completion}\n\n{setup}\n" + "\n".join(r["test_list"]) + "\n"


def eval_mbpp(run):
    rows = load_mbpp(run.settings.mbpp)[:run.settings.limit]
    return eval_exec(run, "mbpp", [(f'mbpp/{r.get("task_id", i)}', mbpp_prompt(r), MBPP_STOP,
                                    lambda c, r=r: mbpp_program(r, c)) for i, r in enumerate(rows)],
                     execute.run_python, timeout=10.0)


def eval_codebleu(run):
    """Complete held-out JS from its first half; compare the next lines with CodeBLEU and exact match."""
    from codebleu import calc_codebleu
    if run.samples is not None:
        refs = run.sample_refs
        items = [(tid, run.sample_prompts.get(tid, "")) for tid in run.samples.get("codebleu", {})]
    else:
        items, refs = [], {}
        for i, doc in enumerate(heldout_docs(run.settings.data_dir, "js", run.settings.limit or run.settings.n_prompts)):
            prompt, rest = split_doc(doc, 0.5)
            ref = "".join(rest.splitlines(keepends=True)[:8])
            if ref.strip():
                items.append((f"codebleu/{i}", prompt))
                refs[f"codebleu/{i}"] = ref
    got = samples_for(run, "codebleu", items, stop=(), max_new_tokens=min(192, run.settings.max_new_tokens))
    rows = []
    for tid, prompt in items:
        if tid in got:
            ref = refs[tid]
            hyp = "".join(got[tid][0][0].splitlines(keepends=True)[:len(ref.splitlines())])
            rows.append({"task": "codebleu", "task_id": tid, "prompt": prompt, "completion": got[tid][0][0],
                         "reference": ref, "ok": hyp.strip() == ref.strip(), "hypothesis": hyp})
    if not rows:
        return {"n": 0}, rows
    scores = calc_codebleu([r["reference"] for r in rows], [r["hypothesis"] for r in rows], lang="javascript")
    # The combined score counts a data-flow match of 0 as 1 (`dataflow or 1`: no data flow in the
    # references looks like a perfect match), so we also report the plain mean of the four components.
    strict = sum(scores[k] for k in ("ngram_match_score", "weighted_ngram_match_score", "syntax_match_score",
                                     "dataflow_match_score")) / 4
    return {"n": len(rows), "exact_match": sum(r["ok"] for r in rows) / len(rows), **scores, "codebleu_strict": strict}, rows


@torch.no_grad()
def eval_ppl(run):
    from data.loader import read_meta, val_batches
    from transformers import AutoTokenizer
    s, model = run.settings, run.model
    meta = read_meta(s.data_dir)
    data_tok = AutoTokenizer.from_pretrained(meta["tokenizer"], local_files_only=True)
    if data_tok.get_vocab() != run.tokenizer.get_vocab():
        return {"skipped": f"{s.data_dir} was tokenized with another tokenizer than the model's"}, []
    device = model.lm_head.weight.device
    block = min(model.cfg.max_position_embeddings, 1024)
    out = {}
    for lang in tqdm(meta["langs"], desc="ppl", leave=False):
        loss = correct = count = 0.0
        n_val = meta["files"][f"val_{lang}"]["tokens"]  # a small val split still gets rows, only shorter
        for x, y in val_batches(s.data_dir, lang, 4, min(block, n_val - 1), s.limit or 20, device=device):
            for i in range(x.shape[0]):  # one row at a time keeps (T, vocab) logits small
                logits = model(x[i:i + 1])[0].float()
                loss += F.cross_entropy(logits, y[i], reduction="sum").item()
                correct += (logits.argmax(-1) == y[i]).sum().item()
                count += y[i].numel()
        if not count:  # no val tokens at all for this language
            continue
        out[f"loss/{lang}"] = loss / count
        out[f"ppl/{lang}"] = math.exp(loss / count)
        out[f"acc/{lang}"] = correct / count
    return out, []


def load_mmlu(path):
    """(test, dev) lists of (subject, question, [4 choices], answer index) from the CSV release
    (data/{dev,test}/*_{split}.csv, no header) or parquet files (question, subject, choices, answer)."""
    import csv
    p = Path(path)
    files = sorted(p.rglob("*.csv")) + sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    test, dev = [], []
    for f in files:
        if f.suffix == ".csv":
            subject = re.sub(r"_(test|dev|val)$", "", f.stem)
            try:
                with open(f, newline="", encoding="utf-8") as fh:
                    rows = [(subject, r[0], r[1:5], "ABCD".index(r[5].strip())) for r in csv.reader(fh) if r]
            except (OSError, IndexError, ValueError) as e:
                raise ValidateError(f"{f}: not an MMLU CSV (question,A,B,C,D,answer) ({e})")
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValidateError(f"reading {f} needs pyarrow: `pip install pyarrow`, or pass the CSV release")
            t = pq.read_table(f).to_pylist()
            rows = [(r.get("subject", f.stem), r["question"], list(r["choices"]), int(r["answer"])) for r in t]
        else:
            raise ValidateError(f"{f}: MMLU must be the CSV release (a dir or .csv) or .parquet")
        (dev if "dev" in f.name else test if "test" in f.name or not p.is_dir() else []).extend(rows)
    if not test:
        raise ValidateError(f"no MMLU test questions under {path}; pass the CSV release dir (with test/) or a file")
    return test, dev


def mmlu_question(q, choices, answer=None):
    text = q + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", choices)) + "\nAnswer:"
    return text + (f" {'ABCD'[answer]}\n\n" if answer is not None else "")


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs, batch_size):
    """Sum of log p(continuation | context) for each (context, continuation) string pair."""
    max_len = model.cfg.max_position_embeddings
    device = model.lm_head.weight.device
    out = []
    for b in tqdm(range(0, len(pairs), batch_size), desc="mmlu: score", leave=False):
        seqs = []
        for ctx, cont in pairs[b:b + batch_size]:
            c, d = tokenizer.encode(ctx, add_special_tokens=False), tokenizer.encode(cont, add_special_tokens=False)
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


def eval_mmlu(run):
    test, dev = load_mmlu(run.settings.mmlu)
    test = test[:run.settings.limit]
    shots = {}
    for row in dev:
        shots.setdefault(row[0], []).append(row)
    k = run.settings.mmlu_shots
    pairs = []
    for subject, q, choices, _ in test:
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        ctx = head + "".join(mmlu_question(sq, sc, sa) for _, sq, sc, sa in shots.get(subject, [])[:k]) + mmlu_question(q, choices)
        pairs += [(ctx, f" {l}") for l in "ABCD"]
    lls = loglikelihoods(run.model, run.tokenizer, pairs, run.settings.batch_size)
    per_subject, rows = {}, []
    for i, (subject, q, choices, answer) in enumerate(test):
        pred = int(np.argmax(lls[4 * i:4 * i + 4]))
        per_subject.setdefault(subject, []).append(pred == answer)
        rows.append({"task": "mmlu", "task_id": f"mmlu/{subject}/{i}", "ok": pred == answer, "detail": "ABCD"[pred]})
    return {"n": len(test), "shots": k if dev else 0, "accuracy": sum(r["ok"] for r in rows) / len(rows),
            "macro_accuracy": sum(sum(v) / len(v) for v in per_subject.values()) / len(per_subject),
            "per_subject": {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}}, rows


# -----------------------------------------------------------------------------
# one checkpoint, all tasks


@dataclasses.dataclass
class Run:
    settings: Settings
    model: object = None
    tokenizer: object = None
    samples: dict | None = None  # task -> task_id -> [completion], when scoring --samples
    sample_prompts: dict = dataclasses.field(default_factory=dict)
    sample_refs: dict = dataclasses.field(default_factory=dict)


def unavailable(s, has_model):
    """{task: why it cannot run} for the tasks whose inputs are missing."""
    why = {}
    if not s.mbpp:
        why["mbpp"] = "needs --mbpp FILE.jsonl"
    if not s.mmlu:
        why["mmlu"] = "needs --mmlu PATH (CSV release dir or parquet)"
    if not s.data_dir:
        why["ppl"] = "needs held-out data: pass --data-dir or a training checkpoint"
        if has_model:  # from --samples, codebleu has its references
            why["codebleu"] = why["ppl"]
    if not has_model:
        why["ppl"] = why["mmlu"] = "needs a model (--ckpt)"
    return why


def evaluate(run):
    """{task: metrics} for run.settings.tasks, and every sample row."""
    fns = {"ppl": eval_ppl, "xml": lambda r: eval_validity(r, "xml"), "mdx": lambda r: eval_validity(r, "mdx"),
           "js": lambda r: eval_validity(r, "js"), "js-exec": eval_js_exec, "humaneval": eval_humaneval,
           "mbpp": eval_mbpp, "mmlu": eval_mmlu, "codebleu": eval_codebleu}
    results, rows = {}, []
    for task in run.settings.tasks:
        t0 = time.time()
        metrics, task_rows = fns[task](run)
        metrics["seconds"] = round(time.time() - t0, 1)
        results[task] = metrics
        rows += task_rows
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and k != "seconds"), file=sys.stderr)
    return results, rows


@torch.no_grad()
def quick_domain_metrics(model, tokenizer, n_prompts=4, max_new_tokens=128, data_dir=None, batch_size=8):
    """XML/MDX/JS validity of greedy completions of a few prompts: cheap enough for train.py's eval.
    -> {"xml_valid", "mdx_valid", "js_valid", "domain_valid" (their mean), and the same with _prefix_valid:
    no error before the end, which is what a small context can reach}. Call it on every rank."""
    out = {}
    for lang in ("xml", "mdx", "js"):
        items = validity_prompts(lang, None, 0, n_prompts)
        if data_dir:
            items += validity_prompts(lang, data_dir, n_prompts, None, gen_budget(model, max_new_tokens))[len(PROMPTS[lang]):]
        texts, _ = complete(model, tokenizer, [p for _, p in items], max_new_tokens, batch_size=batch_size, desc=lang)
        checks = check_docs(lang, [p + t for (_, p), t in zip(items, texts)])
        out[f"{lang}_valid"] = sum(ok for ok, _ in checks) / len(checks)
        out[f"{lang}_prefix_valid"] = sum(prefix_ok(lang, p, t, ok, e)
                                          for (_, p), t, (ok, e) in zip(items, texts, checks)) / len(checks)
    out["domain_valid"] = sum(out[f"{lang}_valid"] for lang in ("xml", "mdx", "js")) / 3
    out["domain_prefix_valid"] = sum(out[f"{lang}_prefix_valid"] for lang in ("xml", "mdx", "js")) / 3
    return out


# -----------------------------------------------------------------------------
# reports


def read_samples(path, js_problems=execute.JS_PROBLEMS):
    """--samples JSONL (task_id, completion, optional task/prompt/reference) -> Run fields."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ValidateError(f"cannot read --samples {path} ({e}); expected JSON lines with task_id and completion")
    js_names = {p["name"] for p in execute.load_js_problems(js_problems)} if Path(js_problems).is_file() else set()
    samples, prompts, refs = {}, {}, {}
    for i, r in enumerate(rows):
        if "task_id" not in r or "completion" not in r:
            raise ValidateError(f"{path}: line {i + 1} lacks task_id or completion")
        tid = str(r["task_id"])
        task = r.get("task") or ("humaneval" if tid.startswith("HumanEval/") else "js-exec" if tid in js_names
                                 else tid.split("/")[0])
        if task not in TASKS or task in ("ppl", "mmlu"):
            raise ValidateError(f"{path}: line {i + 1}: cannot tell the task of {tid!r}; add a \"task\" field")
        samples.setdefault(task, {}).setdefault(tid, []).append(r["completion"])
        prompts[tid] = r.get("prompt", prompts.get(tid, ""))
        if "reference" in r:
            refs[tid] = r["reference"]
    return samples, prompts, refs


def fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_reports(out, runs, settings, from_samples=False):
    """runs: [(name, {task: metrics})]; a second run is shown beside the first with deltas (first - second)."""
    info = {k: v for k, v in execute.sandbox_info().items() if not k.startswith("_")}
    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "settings": dataclasses.asdict(settings), "sandbox": info,
              "node": node_available(), "mdx_exact": mdx_exact(),
              "runs": [{"ckpt": name, "tasks": tasks} for name, tasks in runs]}
    if len(runs) == 2:
        a, b = runs[0][1], runs[1][1]
        report["delta"] = {t: {k: a[t][k] - b[t][k] for k, v in a[t].items() if k != "seconds" and
                               isinstance(v, (int, float)) and not isinstance(v, bool) and
                               isinstance(b.get(t, {}).get(k), (int, float))} for t in a if t in b}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "report.json").write_text(json.dumps(report, indent=1) + "\n")

    names = [name for name, _ in runs]
    md = ["# Validation report", "", f"Created {report['created']}.", ""]
    if from_samples:
        md += [f"- completions from `{names[0]}`, scored without generating", ""]
    else:
        md += [f"- {'checkpoint' if i == 0 else 'compared with'}: `{n}`" for i, n in enumerate(names)]
        md += [f"- validity and CodeBLEU: greedy, up to {settings.max_new_tokens} new tokens; pass@k: {settings.n_samples} "
               f"sample(s) per problem" + (f" at temperature {settings.temperature}, top_p 0.95" if settings.n_samples > 1
                                           else ", greedy"),
               "- valid_rate: whole documents that parse; prefix_valid_rate: also counts documents that only "
               "stop too early (no error before their end) and, for XML and MDX, write some markup, since plain text "
               "is valid inside any element or paragraph", ""]
    head = "| task | metric | " + " | ".join(f"`{Path(n).name or n}`" for n in names)
    md += [head + (" | Δ (first − second) |" if len(runs) == 2 else " |"), "|" + "---|" * (2 + len(runs) + (len(runs) == 2))]
    for task, metrics in runs[0][1].items():
        for k, v in metrics.items():
            if k == "seconds" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            cells = [fmt(tasks.get(task, {}).get(k, "")) for _, tasks in runs]
            if len(runs) == 2:
                cells.append(fmt(report["delta"].get(task, {}).get(k, "")))
            md.append(f"| {task} | {k} | " + " | ".join(cells) + " |")
    notes = [f"{name}: {task} skipped: {m['skipped']}" for name, tasks in runs for task, m in tasks.items() if "skipped" in m]
    if "mdx" in settings.tasks and not mdx_exact():
        notes.append("MDX validity is APPROXIMATE: Node or @mdx-js/mdx is missing (run `npm ci --prefix checkers`)")
    if {"humaneval", "mbpp", "js-exec"} & set(settings.tasks):
        notes.append("sandbox: " + ", ".join(f"{k}={v}" for k, v in info.items())
                     + ("" if info.get("network_isolated") else " (NO network isolation: `unshare -n` is not available here)"))
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    for name, tasks in runs:
        fails = [(t, "".join(c if c.isprintable() and c != "`" else "?" for c in f[:200]))
                 for t, m in tasks.items() for f in m.get("failures", [])]
        if fails:
            md += ["", f"## Example failures: `{name}`", ""] + [f"- {t}: `{f}`" for t, f in fails]
    (Path(out) / "report.md").write_text("\n".join(md) + "\n")
    return report


def run_one(path, settings, device, dtype, samples=None):
    run = Run(settings)
    if samples is not None:
        run.samples, run.sample_prompts, run.sample_refs = samples
    else:
        run.model, run.tokenizer = load(path, device, dtype, settings.data_dir)
    results, rows = evaluate(run)
    del run
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--ckpt", help="training run dir, checkpoint dir or HF model dir")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, help="default: every task whose inputs are present")
    ap.add_argument("--n-samples", type=int, default=1, help="samples per problem for pass@k (1 = greedy)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --n-samples > 1")
    ap.add_argument("--out", default="out/validate", help="directory for report.json, report.md, samples.jsonl")
    ap.add_argument("--compare", help="a second checkpoint to put beside --ckpt, with deltas")
    ap.add_argument("--samples", help="score completions from this JSONL instead of generating")
    ap.add_argument("--limit", type=int, help="at most this many problems/prompts per task (quick runs)")
    ap.add_argument("--data-dir", help="prepared data (meta.json + val_*.bin); default: the checkpoint's")
    ap.add_argument("--js-problems", default=str(execute.JS_PROBLEMS), help="our JS benchmark or a MultiPL-E humaneval-js file")
    ap.add_argument("--mbpp", help="MBPP JSONL (text, code, test_list)")
    ap.add_argument("--mmlu", help="MMLU CSV release dir (test/, dev/), a CSV file, or parquet")
    ap.add_argument("--mmlu-shots", type=int, default=5, help="examples from dev/ before each question")
    ap.add_argument("--n-prompts", type=int, default=50, help="held-out document prompts per language")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel sandboxes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, else float32")
    args = ap.parse_args(argv)
    try:
        if not args.ckpt and not args.samples:
            raise ValidateError("nothing to validate: pass --ckpt PATH, or --samples FILE.jsonl to score completions")
        if args.samples and args.compare:
            raise ValidateError("--compare needs generation; run it without --samples")
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        data_dir = args.data_dir or (ckpt_data_dir(args.ckpt) if args.ckpt else None)
        s = Settings(tasks=[], data_dir=data_dir, n_samples=args.n_samples, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                     n_prompts=args.n_prompts, workers=args.workers, seed=args.seed, js_problems=args.js_problems,
                     mbpp=args.mbpp, mmlu=args.mmlu, mmlu_shots=args.mmlu_shots)
        samples = read_samples(args.samples, args.js_problems) if args.samples else None
        why = unavailable(s, has_model=samples is None)
        if args.tasks:
            bad = [f"{t} ({why[t]})" for t in args.tasks if t in why]
            if bad:
                raise ValidateError("cannot run " + "; ".join(bad))
            s.tasks = list(dict.fromkeys(args.tasks))
        else:
            s.tasks = [t for t in TASKS if t not in why and (samples is None or t in samples[0])]
            for t, reason in why.items():
                print(f"skipping {t}: {reason}", file=sys.stderr)
        if not s.tasks:
            raise ValidateError("no task can run: pass --tasks with their inputs (see --help)")
        runs = []
        for path, out_name in [(args.ckpt or args.samples, "samples.jsonl"), (args.compare, "samples-compare.jsonl")]:
            if path is None:
                continue
            results, rows = run_one(path, s, args.device, dtype, samples if path == args.samples else None)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with open(Path(args.out) / out_name, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            runs.append((path, results))
        write_reports(args.out, runs, s, from_samples=samples is not None)
    except (ValidateError, execute.ProblemFileError, CheckpointError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/report.json and {args.out}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
