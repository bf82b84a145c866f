"""lm-evaluation-harness on our local benchmark files: task YAMLs that point lm-eval's own MMLU and TruthfulQA tasks
at the questions validate.py reads, so `lm_eval` and validate.py score the same prompts on the same file.

  python -m evals.harness --mmlu mmlu/data --truthfulqa mc_task.json --out lm_tasks [--mmlu-shots 5 --limit 50]
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=out/tiny/best \\
      --include_path lm_tasks --tasks sheikh_mmlu,sheikh_truthfulqa

Each YAML includes lm-eval's own task file from the installed package (`include:` its absolute path), so the
template, target delimiter, few-shot sampler and MC2's formula are lm-eval's; only the data source changes
(`dataset_path: json`, local files). The questions go through our loaders (evals/mmlu.py, evals/truthfulqa.py) and
are written as JSON lines in lm-eval's field names; --limit keeps the first N, as validate.py's --limit does.
MMLU is one task per subject with the first k dev questions of that subject as shots (fewer when dev has fewer,
as validate.py), in the group sheikh_mmlu whose acc is over all questions (validate.py's `accuracy`); TruthfulQA
is sheikh_truthfulqa_mc1 and _mc2, tagged sheikh_truthfulqa.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import yaml

from evals import EvalError, mmlu, truthfulqa

INSTALL = "pip install -r requirements-lmeval.txt"
INCLUDED = ("mmlu/default/_default_template_yaml", "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa/truthfulqa_mc2.yaml")


def lm_eval_tasks():
    """The installed lm-eval's tasks/ dir, whose YAMLs ours include."""
    try:
        import lm_eval
    except ImportError:
        raise EvalError(f"lm-eval is not installed: {INSTALL}") from None
    tasks = Path(lm_eval.__file__).parent / "tasks"
    for name in INCLUDED:
        if not (tasks / name).is_file():
            raise EvalError(f"lm-eval {lm_eval.__version__} has no tasks/{name}: install the pinned one, {INSTALL}")
    return tasks


def _write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path.resolve())


def _mmlu(out, path, shots, limit, tasks):
    test, dev = mmlu.load(path)
    test = test[:limit]
    names = []
    for subject in dict.fromkeys(s for s, *_ in test):  # in file order
        name = re.sub(r"\W", "_", subject)
        rows = [{"question": q, "subject": s, "choices": c, "answer": a} for s, q, c, a in test if s == subject]
        shot_rows = [{"question": q, "subject": s, "choices": c, "answer": a} for s, q, c, a in dev if s == subject]
        files = {"test": _write(out / f"mmlu_{name}_test.jsonl", rows)}
        task = {"include": str(tasks / INCLUDED[0]), "task": f"sheikh_mmlu_{name}",
                "dataset_path": "json", "description": mmlu.description(subject),
                "num_fewshot": min(shots, len(shot_rows))}
        if shot_rows:
            files["dev"] = _write(out / f"mmlu_{name}_dev.jsonl", shot_rows)
        else:
            task["fewshot_split"] = None
        task["dataset_kwargs"] = {"data_files": files}
        (out / f"sheikh_mmlu_{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(task["task"])
    group = {"group": "sheikh_mmlu", "task": names, "metadata": {"version": 1},
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}  # over questions, not subjects
    (out / "sheikh_mmlu.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return ["sheikh_mmlu"]


def _truthfulqa(out, path, limit, tasks):
    def targets(pairs):
        return {"choices": [a for a, _ in pairs], "labels": [int(t) for _, t in pairs]}
    rows = [{"question": q, "mc1_targets": targets(mc1), "mc2_targets": targets(mc2),
             "mc1_label": [t for _, t in mc1].index(True)} for q, mc1, mc2 in truthfulqa.load(path)[:limit]]
    data = _write(out / "truthfulqa_mc.jsonl", rows)
    names = []
    for kind in ("mc1", "mc2"):
        task = {"include": str(tasks / f"truthfulqa/truthfulqa_{kind}.yaml"), "task": f"sheikh_truthfulqa_{kind}",
                "tag": ["sheikh_truthfulqa"], "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"validation": data}}}
        if kind == "mc1":  # lm-eval's file has the true answer first; ours may have it anywhere
            task["doc_to_target"] = "mc1_label"
        (out / f"sheikh_truthfulqa_{kind}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(task["task"])
    return names


def write_tasks(out, mmlu_path=None, truthfulqa_path=None, shots=5, limit=None):
    """Write lm-eval task YAMLs and their data into dir `out`; returns the task and group names."""
    tasks = lm_eval_tasks()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    if mmlu_path:
        names += _mmlu(out, mmlu_path, shots, limit, tasks)
    if truthfulqa_path:
        names += _truthfulqa(out, truthfulqa_path, limit, tasks)
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmlu", help="MMLU CSV release dir (test/, dev/), a CSV file, or parquet (as validate.py)")
    ap.add_argument("--truthfulqa", help="TruthfulQA multiple choice: mc_task.json, JSONL or parquet (as validate.py)")
    ap.add_argument("--mmlu-shots", type=int, default=5, help="dev questions before each MMLU question")
    ap.add_argument("--limit", type=int, help="the first N questions of each benchmark")
    ap.add_argument("--out", required=True, help="directory for the YAMLs and data (lm_eval --include_path)")
    args = ap.parse_args(argv)
    try:
        if not args.mmlu and not args.truthfulqa:
            raise EvalError("nothing to write: pass --mmlu PATH and/or --truthfulqa FILE")
        names = write_tasks(args.out, args.mmlu, args.truthfulqa, args.mmlu_shots, args.limit)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL_DIR "
          f"--include_path {args.out} --tasks {','.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
