"""Validate a checkpoint: is it good at XML, MDX and JavaScript, and can it still code?

Usage:
  python validate.py --ckpt out/tiny                        # training run dir, checkpoint dir or HF dir
  python validate.py --ckpt out/tiny --random-baseline --tasks xml mdx js   # beside random weights of its shape
  python validate.py --ckpt out/export --compare ~/phi-2 --tasks xml mdx js js-exec humaneval
  python validate.py --ckpt ~/phi-2 --tasks mbpp mmlu truthfulqa --mbpp mbpp.jsonl --mmlu mmlu/data \
      --truthfulqa mc_task.json --limit 50
  python validate.py --samples out/validate/samples.jsonl --tasks js-exec humaneval   # no model needed

Tasks: ppl xml mdx js py fim js-exec humaneval mbpp mmlu truthfulqa codebleu (default: all whose inputs are present).
Each is one file in evals/, shared with train.py's in-loop eval: ppl is the val loss, perplexity and
accuracy per language that train.py logs, on the same batches when the checkpoint says how it was trained;
xml/mdx/js report valid_rate (the whole document parses) and prefix_valid_rate (no error before the end); py
the same for function bodies written after a header (ast.parse; retention of a base model's Python);
fim cuts a line and a block out of val documents and scores the infilled middle (exact match, validity)
beside what the model writes left to right after the prefix alone.
A run dir means its newest checkpoint that verifies, as resume=auto picks it.
Writes {out}/report.json, {out}/report.md and {out}/samples.jsonl: every prompt, completion and
verdict, which --samples scores again, e.g. on a safer machine than the one that generated it.
Generated code only ever runs in checkers/execute.py's sandbox, probed before the first sample: when the
sandbox itself cannot run, validate stops with an error instead of scoring the model. XML, MDX and JS are
parsed, never run. Validity and CodeBLEU decode greedily; js-exec, humaneval and mbpp draw --n-samples per
problem (greedy when 1, else --temperature with top_p 0.95) and report unbiased pass@k.
"""
import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

import ckpt
from checkers import execute
from checkers.syntax import mdx_exact, node_available
from data.loader import DataError
from evals import EvalError, codebleu, domain, fim, fmt, humaneval, js_exec, loss, mbpp, mmlu, truthfulqa
from evals.sampling import Run, Settings
from model.export import VALIDATIONS, run_dir
from model.phi import ModelLoadError, Phi
from monitor import save_png

TASKS = {"ppl": loss.evaluate, "xml": lambda r: domain.evaluate(r, "xml"), "mdx": lambda r: domain.evaluate(r, "mdx"),
         "js": lambda r: domain.evaluate(r, "js"), "py": lambda r: domain.evaluate(r, "py"), "fim": fim.evaluate,
         "js-exec": js_exec.evaluate, "humaneval": humaneval.evaluate, "mbpp": mbpp.evaluate, "mmlu": mmlu.evaluate,
         "truthfulqa": truthfulqa.evaluate, "codebleu": codebleu.evaluate}
NEED_MODEL = ("ppl", "fim", "mmlu", "truthfulqa")  # likelihoods, or prompts cut from val data: no --samples


# -----------------------------------------------------------------------------
# loading


def load(path, device, dtype, data_dir=None):
    """(model, tokenizer, train_state or None) from a checkpoint dir or an HF dir (ckpt.resolve gives one); the
    tokenizer comes with the checkpoint, else from the data dir's meta.json."""
    from data.loader import read_meta
    from model.export import load_for_inference
    from transformers import AutoTokenizer
    model, tok_dir = load_for_inference(path, dtype=dtype, device=device)
    if tok_dir is None and data_dir:
        tok_dir = read_meta(data_dir)["tokenizer"]
    if tok_dir is None:
        raise EvalError(f"{path} has no tokenizer: copy tokenizer.json (+ tokenizer_config.json) into it, "
                        f"or pass --data-dir of the data it was trained on")
    return model, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True), ckpt.train_state(path)


def load_run(path, settings, device, dtype):
    """A Run of the model at `path`; ppl reads its val batches as the checkpoint's training did."""
    model, tokenizer, state = load(path, device, dtype, settings.data_dir)
    return Run(settings, model, tokenizer, train_config=(state or {}).get("config") or {},
               train_world_size=(state or {}).get("world_size", 1))


def random_twin(run, seed):
    """The same Run with freshly initialised weights of the same shape: what training added is the difference."""
    torch.manual_seed(seed)
    twin = Phi(run.model.cfg)
    twin.init_weights()
    w = run.model.lm_head.weight
    return dataclasses.replace(run, model=twin.to(device=w.device, dtype=w.dtype).eval())


def unavailable(s, has_model):
    """{task: why it cannot run} for the tasks whose inputs are missing."""
    why = {}
    for task, flag in (("mbpp", "--mbpp FILE.jsonl"), ("mmlu", "--mmlu PATH (CSV release dir or parquet)"),
                       ("truthfulqa", "--truthfulqa FILE (mc_task.json, JSONL or parquet)")):
        if not getattr(s, task):
            why[task] = f"needs {flag}"
    if not s.data_dir:
        why["ppl"] = why["fim"] = "needs held-out data: pass --data-dir or a training checkpoint"
        if has_model:  # from --samples, codebleu has its references
            why["codebleu"] = why["ppl"]
    if not has_model:
        why.update({task: "needs a model (--ckpt)" for task in NEED_MODEL})
    return why


def evaluate(run):
    """{task: metrics} for run.settings.tasks, and every sample row."""
    results, rows = {}, []
    for task in run.settings.tasks:
        t0 = time.time()
        metrics, task_rows = TASKS[task](run)
        metrics["seconds"] = round(time.time() - t0, 1)
        results[task] = metrics
        rows += task_rows
        print(f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                      if isinstance(v, (int, float)) and k != "seconds"), file=sys.stderr)
    return results, rows


# -----------------------------------------------------------------------------
# reports


def read_samples(path, js_problems):
    """--samples JSONL (task_id, completion, optional task/prompt/reference) -> Run fields."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read --samples {path} ({e}); expected JSON lines with task_id and completion")
    js_names = {p["name"] for p in js_exec.load(js_problems)} if Path(js_problems).is_file() else set()
    samples, prompts, refs = {}, {}, {}
    for i, r in enumerate(rows):
        if "task_id" not in r or "completion" not in r:
            raise EvalError(f"{path}: line {i + 1} lacks task_id or completion")
        tid = str(r["task_id"])
        task = r.get("task") or ("humaneval" if tid.startswith("HumanEval/") else "js-exec" if tid in js_names
                                 else tid.split("/")[0])
        if task not in TASKS or task in NEED_MODEL:
            raise EvalError(f"{path}: line {i + 1}: cannot tell the task of {tid!r}; add a \"task\" field")
        samples.setdefault(task, {}).setdefault(tid, []).append(r["completion"])
        prompts[tid] = r.get("prompt", prompts.get(tid, ""))
        if "reference" in r:
            refs[tid] = r["reference"]
    return samples, prompts, refs


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
        sampling = f" at temperature {settings.temperature}, top_p 0.95" if settings.n_samples > 1 else ", greedy"
        md += [f"- validity and CodeBLEU: greedy, up to {settings.max_new_tokens} new tokens; pass@k: "
               f"{settings.n_samples} sample(s) per problem" + sampling,
               "- valid_rate: whole documents that parse; prefix_valid_rate: also counts documents that only "
               "stop too early (no error before their end) and, for XML and MDX, write some markup, since plain text "
               "is valid inside any element or paragraph", ""]
    head = "| task | metric | " + " | ".join(f"`{Path(n).name or n}`" for n in names)
    md += [head + (" | Δ (first − second) |" if len(runs) == 2 else " |"),
           "|" + "---|" * (2 + len(runs) + (len(runs) == 2))]
    for task, metrics in runs[0][1].items():
        for k, v in metrics.items():
            if k == "seconds" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            cells = [fmt(tasks.get(task, {}).get(k, "")) for _, tasks in runs]
            if len(runs) == 2:
                cells.append(fmt(report["delta"].get(task, {}).get(k, "")))
            md.append(f"| {task} | {k} | " + " | ".join(cells) + " |")
    notes = [f"{name}: {task} skipped: {m['skipped']}" for name, tasks in runs for task, m in tasks.items()
             if "skipped" in m]
    if "mdx" in settings.tasks and not mdx_exact():
        notes.append("MDX validity is APPROXIMATE: Node or @mdx-js/mdx is missing (run `npm ci --prefix checkers`)")
    if {"humaneval", "mbpp", "js-exec"} & set(settings.tasks):
        notes.append("sandbox: " + ", ".join(f"{k}={v}" for k, v in info.items())
                     + ("" if info.get("network_isolated")
                        else " (NO network isolation: `unshare -n` is not available here)"))
    if plot_rates(runs, Path(out) / "report.png"):
        md += ["", "![rates of each task](report.png)"]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    for name, tasks in runs:
        fails = [(t, "".join(c if c.isprintable() and c != "`" else "?" for c in f[:200]))
                 for t, m in tasks.items() for f in m.get("failures", [])]
        if fails:
            md += ["", f"## Example failures: `{name}`", ""] + [f"- {t}: `{f}`" for t, f in fails]
    (Path(out) / "report.md").write_text("\n".join(md) + "\n")
    return report


def plot_rates(runs, path):
    """report.png: each task's rates (values in [0, 1]: validity, pass@k, exact match, accuracy) as bars, the
    compared checkpoint's or random twin's beside them. Returns path, or None when no task gives a rate."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    keys = [(t, k) for t, m in runs[0][1].items() for k, v in m.items() if "/" not in k and isinstance(v, float)
            and 0 <= v <= 1 and k != "seconds"]
    if not keys:
        return None
    fig = Figure(figsize=(7, 0.9 + 0.28 * len(keys) * len(runs)), dpi=90)
    ax = fig.subplots()
    height = 0.8 / len(runs)
    for i, (name, tasks) in enumerate(runs):
        ax.barh([j + i * height for j in range(len(keys))], [tasks.get(t, {}).get(k, 0) for t, k in keys],
                height=height, label=Path(name).name or name)
    ax.set_yticks([j + height * (len(runs) - 1) / 2 for j in range(len(keys))], [f"{t} {k}" for t, k in keys],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def record_report(ckpt_path, out):
    """Append the report to its run's validations.jsonl, where model.export finds the newest one for the card."""
    index = Path(run_dir(ckpt_path)) / VALIDATIONS
    line = json.dumps({"ckpt": Path(ckpt_path).resolve().name, "report": str((Path(out) / "report.json").resolve())})
    try:
        with open(index, "a") as f:
            f.write(line + "\n")
    except OSError as e:  # a read-only run dir: the report stands on its own
        print(f"warning: not recorded in {index} ({e}); the model card will not show it", file=sys.stderr)


def score(name, run, out, samples_file):
    """(name, {task: metrics}) of one run; its sample rows go to out/samples_file."""
    results, rows = evaluate(run)
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / samples_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return name, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="training run dir, checkpoint dir or HF model dir")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), help="default: every task whose inputs are present")
    ap.add_argument("--n-samples", type=int, default=1, help="samples per problem for pass@k (1 = greedy)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --n-samples > 1")
    ap.add_argument("--out", default="out/validate", help="directory for report.json, report.md, samples.jsonl")
    ap.add_argument("--compare", help="a second checkpoint to put beside --ckpt, with deltas")
    ap.add_argument("--random-baseline", action="store_true",
                    help="put randomly initialised weights of --ckpt's shape beside it (same tokenizer and prompts)")
    ap.add_argument("--samples", help="score completions from this JSONL instead of generating")
    ap.add_argument("--limit", type=int, help="at most this many problems/prompts per task (quick runs)")
    ap.add_argument("--data-dir", help="prepared data (meta.json + val_*.bin); default: the checkpoint's")
    ap.add_argument("--js-problems", default=js_exec.JS_PROBLEMS,
                    help="our JS benchmark (the default) or a MultiPL-E humaneval-js file")
    ap.add_argument("--mbpp", help="MBPP JSONL (text, code, test_list)")
    ap.add_argument("--mmlu", help="MMLU CSV release dir (test/, dev/), a CSV file, or parquet")
    ap.add_argument("--mmlu-shots", type=int, default=5, help="examples from dev/ before each question")
    ap.add_argument("--truthfulqa", help="TruthfulQA multiple choice: mc_task.json, JSONL or parquet")
    ap.add_argument("--n-prompts", type=int, default=50, help="held-out document prompts per language")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel sandboxes")
    ap.add_argument("--seed", type=int, default=0, help="sampling, and the random baseline's weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPU, else float32")
    args = ap.parse_args(argv)
    try:
        if not args.ckpt and not args.samples:
            raise EvalError("nothing to validate: pass --ckpt PATH, or --samples FILE.jsonl to score completions")
        if args.samples and (args.compare or args.random_baseline):
            raise EvalError("--compare and --random-baseline need generation; run them without --samples")
        if args.compare and args.random_baseline:
            raise EvalError("--compare and --random-baseline both name the second column; pass one")
        dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
        path = ckpt.resolve(args.ckpt) if args.ckpt else None  # a run dir: its newest checkpoint that verifies
        state = ckpt.train_state(path) if path else None
        trained = (state or {}).get("config") or {}  # the training run's settings, for its data dir
        s = Settings(tasks=[], data_dir=args.data_dir or trained.get("data_dir"), n_samples=args.n_samples,
                     temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     limit=args.limit, n_prompts=args.n_prompts, workers=args.workers, seed=args.seed,
                     js_problems=args.js_problems, mbpp=args.mbpp, mmlu=args.mmlu, mmlu_shots=args.mmlu_shots,
                     truthfulqa=args.truthfulqa)
        samples = read_samples(args.samples, args.js_problems) if args.samples else None
        why = unavailable(s, has_model=samples is None)
        if args.tasks:
            bad = [f"{t} ({why[t]})" for t in args.tasks if t in why]
            if bad:
                raise EvalError("cannot run " + "; ".join(bad))
            s.tasks = list(dict.fromkeys(args.tasks))
        else:
            s.tasks = [t for t in TASKS if t not in why and (samples is None or t in samples[0])]
            for t, reason in why.items():
                print(f"skipping {t}: {reason}", file=sys.stderr)
        if not s.tasks:
            raise EvalError("no task can run: pass --tasks with their inputs (see --help)")
        if samples is not None:
            first = Run(s, samples=samples[0], sample_prompts=samples[1], sample_refs=samples[2])
        else:
            first = load_run(path, s, args.device, dtype)
        runs = [score(args.ckpt or args.samples, first, args.out, "samples.jsonl")]
        if args.random_baseline:
            runs.append(score("random", random_twin(first, args.seed), args.out, "samples-compare.jsonl"))
        elif args.compare:
            first.model = None  # two large models never share the memory
            runs.append(score(args.compare, load_run(ckpt.resolve(args.compare), s, args.device, dtype), args.out,
                              "samples-compare.jsonl"))
        write_reports(args.out, runs, s, from_samples=samples is not None)
        if state is not None:  # a training checkpoint
            record_report(path, args.out)
    except (EvalError, execute.SandboxError, ckpt.CheckpointError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}/report.json and {args.out}/report.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
