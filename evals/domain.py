"""Validity of completions: does the model finish a document so that it parses? XML, MDX and JavaScript (what
Sheikh-2.5-Coder learns) and Python (what its base model knew: retention).

Prompts are our set below plus beginnings of held-out documents short enough to be finished in the token
budget, each cut after a line that opens something (element, JSX, block) the completion must close. Python's
held-out prompts are the header and docstring of a short top-level function; the completion is its body, up to
the next top-level line. valid_rate: the whole document parses (Python: ast.parse of prompt + body).
prefix_valid_rate: no error before the end, and for XML/MDX some markup written (what a model whose documents
outgrow the budget or its context can still get right).
train.py's `domain_valid` early-stopping metric and validate.py's xml/mdx/js/py tasks both come from here.
"""
import ast
import itertools
import re
from contextlib import nullcontext

import numpy as np
import torch

from checkers.syntax import check_js, check_mdx, check_py, check_xml, mdx_exact, valid_prefix
from data.format import data_tokenizer
from data.loader import open_tokens, read_meta
from evals.sampling import complete, gen_budget, samples_for

LANGS = ("xml", "mdx", "js")  # domain_valid is their mean; "py" is scored where the data has Python

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
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<manifest xmlns:android="http://schemas.android.com/apk/res/android">\n',
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
    "py": [  # each a function header the completion must give a body
        'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
        "def is_palindrome(text: str) -> bool:\n",
        'def read_lines(path):\n    """The lines of a text file, without their newlines."""\n',
        "class Point:\n    def __init__(self, x, y):\n",
        'def flatten(items):\n    """One list of the items of a list of lists."""\n',
        "def word_count(text):\n    counts = {}\n",
        "def clamp(value, low, high):\n",
        "async def fetch_all(session, urls):\n",
    ],
}


def heldout_docs(data_dir, lang, n, max_tokens=None):
    """Up to n decoded val documents of a language (of at most max_tokens), evenly spread over val_{lang}.bin."""
    meta = read_meta(data_dir)
    if lang not in meta["langs"]:
        return []
    tokens = np.asarray(open_tokens(data_dir, meta, "val", lang))
    ends = np.flatnonzero(tokens == meta["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    spans = [(a, b) for a, b in zip(starts, ends) if b > a and (max_tokens is None or b - a <= max_tokens)]
    pick = [spans[i] for i in np.linspace(0, len(spans) - 1, min(n, len(spans))).astype(int)] if spans else []
    tok = data_tokenizer(meta)
    return [tok.decode(tokens[a:b].tolist()) for a, b in pick]


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


def py_headers(doc, max_lines=10):
    """The headers (decorators, signature, docstring) of a Python file's top-level functions whose bodies are at
    most max_lines lines, so a budget of ~128 tokens can write them."""
    try:
        tree = ast.parse(doc)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines, out = doc.splitlines(keepends=True), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno <= max_lines:
            body = node.body[1:] if ast.get_docstring(node, clean=False) is not None else node.body
            if body and body[0].lineno > node.lineno:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                out.append("".join(lines[start - 1:body[0].lineno - 1]))
    return out


def validity_prompts(lang, data_dir, n_prompts, limit, max_tokens=None):
    """Our prompt set, then beginnings of held-out documents short enough (max_tokens) to be completed
    (Python: function headers, the first of each held-out file, then the second, ...). Trailing whitespace is cut: BPE
    merges a newline with the indent after it, so a prompt ending in a bare newline ends on a token seen
    mostly at the end of documents."""
    items = [(f"{lang}/set-{i}", p) for i, p in enumerate(PROMPTS[lang])]
    if data_dir and lang == "py":
        per_doc = map(py_headers, heldout_docs(data_dir, lang, n_prompts))
        heads = [h for row in itertools.zip_longest(*per_doc) for h in row if h][:n_prompts]
        items += [(f"py/val-{i}", h) for i, h in enumerate(heads)]
    elif data_dir:
        docs = heldout_docs(data_dir, lang, n_prompts, max_tokens)
        items += [(f"{lang}/val-{i}", doc_prompt(lang, d)) for i, d in enumerate(docs)]
    items = [(tid, p.rstrip()) for tid, p in items]
    return items[:limit] if limit else items


def scored(lang, completion):
    """What is judged of a completion. Python: the function's body, up to the next top-level line (HumanEval's
    stop sequences, generalised), so a model that goes on to write more of the file is not judged on it."""
    return re.split(r"\n(?=\S)", completion, maxsplit=1)[0] if lang == "py" else completion


def check_docs(lang, docs):
    """[(ok, err)] for whole documents. XML is cut after the root element closes, where a model that
    does not stop would otherwise fail on the text that follows a complete document."""
    if lang == "mdx":
        return check_mdx(docs)
    if lang in ("js", "py"):
        return [(check_js if lang == "js" else check_py)(d) for d in docs]
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
    """Valid or only cut short (no error before the end), with some markup written. Python: the body's finished
    lines hold code and parse so far; the line being written when the tokens ran out is not judged."""
    if lang == "py":
        done = completion[:completion.rfind("\n") + 1]
        return ok or (bool(done.strip()) and valid_prefix("py", prompt + done, err))
    markup = lang not in MARKUP or bool(MARKUP[lang].search(completion))
    return markup and (ok or valid_prefix(lang, prompt + completion, err))


def evaluate(run, lang):
    """validate.py's xml / mdx / js / py task."""
    s = run.settings
    budget = gen_budget(run.model, s.max_new_tokens) if run.model is not None else s.max_new_tokens
    items = validity_prompts(lang, s.data_dir, s.n_prompts, s.limit, max_tokens=budget)
    if run.samples is not None:  # prompts come with the samples
        items = [(tid, run.sample_prompts.get(tid, "")) for tid in run.samples.get(lang, {})]
    got = samples_for(run, lang, items, stop=())
    prompts = dict(items)
    rows = [{"task": lang, "task_id": tid, "prompt": prompts[tid], "completion": scored(lang, c), "truncated": t}
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


@torch.no_grad()
def quick_domain_metrics(model, tokenizer, n_prompts=4, max_new_tokens=128, data_dir=None, batch_size=8,
                         ctx=nullcontext()):
    """XML/MDX/JS validity of greedy completions of a few prompts: cheap enough for train.py's eval (in eval mode
    under ctx, then back to the model's mode). -> {"xml_valid", "mdx_valid", "js_valid", "domain_valid" (their
    mean), and the same with _prefix_valid: no error before the end, which is what a small context can reach};
    "py_valid" and "py_prefix_valid" too when data_dir has Python (what a base model may be forgetting).
    Call it on every rank: FSDP needs every rank to generate the same greedy tokens."""
    out, training = {}, model.training
    model.eval()
    for lang in LANGS + ("py",) * bool(data_dir and "py" in read_meta(data_dir)["langs"]):
        items = validity_prompts(lang, None, 0, n_prompts)
        if data_dir:
            budget = gen_budget(model, max_new_tokens)
            items += validity_prompts(lang, data_dir, n_prompts, None, budget)[len(PROMPTS[lang]):]
        with ctx:
            texts, _ = complete(model, tokenizer, [p for _, p in items], max_new_tokens, batch_size=batch_size,
                                desc=lang)
        texts = [scored(lang, t) for t in texts]
        checks = check_docs(lang, [p + t for (_, p), t in zip(items, texts)])
        out[f"{lang}_valid"] = sum(ok for ok, _ in checks) / len(checks)
        out[f"{lang}_prefix_valid"] = sum(prefix_ok(lang, p, t, ok, e)
                                          for (_, p), t, (ok, e) in zip(items, texts, checks)) / len(checks)
    out["domain_valid"] = sum(out[f"{lang}_valid"] for lang in LANGS) / 3
    out["domain_prefix_valid"] = sum(out[f"{lang}_prefix_valid"] for lang in LANGS) / 3
    model.train(training)
    return out

