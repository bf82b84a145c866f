"""MMLU (Hendrycks et al., 2021) from the local CSV release or parquet: k-shot multiple choice, scored by
the log-likelihood of each answer letter.

The prompt is lm-evaluation-harness's (its mmlu/default task): the subject's description, the first k dev
questions of that subject with their answers, then the question; the choices are " A" ... " D". On the same file
`lm_eval` scores the same prompts (evals/harness.py writes the task files).
"""
import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np

from evals import EvalError
from evals.loss import loglikelihoods


def load(path):
    """(test, dev) lists of (subject, question, [4 choices], answer index) from the CSV release
    (data/{dev,test}/*_{split}.csv, no header) or parquet files (question, subject, choices, answer)."""
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
                raise EvalError(f"{f}: not an MMLU CSV (question,A,B,C,D,answer) ({e})")
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise EvalError(f"reading {f} needs pyarrow: `pip install pyarrow`, or pass the CSV release")
            t = pq.read_table(f).to_pylist()
            rows = [(r.get("subject", f.stem), r["question"], list(r["choices"]), int(r["answer"])) for r in t]
        else:
            raise EvalError(f"{f}: MMLU must be the CSV release (a dir or .csv) or .parquet")
        (dev if "dev" in f.name else test if "test" in f.name or not p.is_dir() else []).extend(rows)
    if not test:
        raise EvalError(f"no MMLU test questions under {path}; pass the CSV release dir (with test/) or a file")
    return test, dev


def question(q, choices, answer=None):
    text = q.strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", choices)) + "\nAnswer:"
    return text + (f" {'ABCD'[answer]}\n\n" if answer is not None else "")


def description(subject):
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def prompts(test, dev, k):
    """The k-shot prompt of each test question: its subject's first k dev questions (fewer if dev has fewer)."""
    shots = {}
    for row in dev:
        shots.setdefault(row[0], []).append(row)
    return [description(subject) + "".join(question(sq, sc, sa) for _, sq, sc, sa in shots.get(subject, [])[:k])
            + question(q, choices) for subject, q, choices, _ in test]


def evaluate(run):
    test, dev = load(run.settings.mmlu)
    test = test[:run.settings.limit]
    k = run.settings.mmlu_shots
    pairs = [(ctx, f" {l}") for ctx in prompts(test, dev, k) for l in "ABCD"]
    lls = loglikelihoods(run.model, run.tokenizer, pairs, run.settings.batch_size, desc="mmlu: score")
    per_subject, rows = {}, []
    for i, (subject, q, choices, answer) in enumerate(test):
        pred = int(np.argmax(lls[4 * i:4 * i + 4]))
        per_subject.setdefault(subject, []).append(pred == answer)
        rows.append({"task": "mmlu", "task_id": f"mmlu/{subject}/{i}", "ok": pred == answer, "detail": "ABCD"[pred]})
    n_dev = Counter(row[0] for row in dev)  # a subject with fewer dev questions than k gets fewer shots
    return {"n": len(test), "shots": min(min(k, n_dev[s]) for s, *_ in test), "shots_asked": k,
            "accuracy": sum(r["ok"] for r in rows) / len(rows),
            "macro_accuracy": sum(sum(v) / len(v) for v in per_subject.values()) / len(per_subject),
            "per_subject": {s: sum(v) / len(v) for s, v in sorted(per_subject.items())}}, rows
