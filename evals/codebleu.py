"""CodeBLEU (Ren et al., 2020) on held-out JavaScript: complete a document from its first half and compare
the next lines with the reference."""
from evals.domain import heldout_docs
from evals.sampling import samples_for


def split_doc(doc, frac):
    """(first lines, rest) with about frac of the lines in the first part, at least one line."""
    lines = doc.splitlines(keepends=True)
    k = max(1, int(len(lines) * frac))
    return "".join(lines[:k]), "".join(lines[k:])


def evaluate(run):
    """Complete held-out JS from its first half; compare the next lines with CodeBLEU and exact match."""
    from codebleu import calc_codebleu
    if run.samples is not None:
        refs = run.sample_refs
        items = [(tid, run.sample_prompts.get(tid, "")) for tid in run.samples.get("codebleu", {})]
    else:
        items, refs = [], {}
        docs = heldout_docs(run.settings.data_dir, "js", run.settings.limit or run.settings.n_prompts)
        for i, doc in enumerate(docs):
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
    exact = sum(r["ok"] for r in rows) / len(rows)
    return {"n": len(rows), "exact_match": exact, **scores, "codebleu_strict": strict}, rows
