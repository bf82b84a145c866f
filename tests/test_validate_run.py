"""End to end: validate.py on the tiny run's checkpoint against a random model of the same shape.

The trained model must write far more valid XML, MDX and JS than random weights given the same prompts
(our prompt set plus beginnings of held-out documents), the same greedy decoding and the same checkers.
"""
import json
import os
import subprocess
import sys

import pytest

import ckpt
from helpers import ROOT, assert_picture, read_jsonl
from train import load_config

pytestmark = pytest.mark.slow
TASKS = ("xml", "mdx", "js")


def validate(*args):
    r = subprocess.run([sys.executable, "validate.py", *args, "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def compared(tiny_run, tmp_path_factory):
    """The README's validate.py run: the tiny run's checkpoint beside a random model of its shape, same prompts."""
    out = tmp_path_factory.mktemp("validate") / "report"
    validate("--ckpt", tiny_run, "--random-baseline", "--tasks", *TASKS, "--out", str(out), "--n-prompts", "30")
    return out, json.loads((out / "report.json").read_text())


def test_compare_reports_trained_beside_random(compared):
    out, report = compared
    md = (out / "report.md").read_text()
    (_, ours), (random_name, theirs) = [(x["ckpt"], x["tasks"]) for x in report["runs"]]
    assert random_name == "random"
    for lang in TASKS:
        a, b = ours[lang], theirs[lang]
        assert a["n"] == b["n"] >= 10, lang  # the same prompts: 8 of ours + held-out beginnings
        assert a["valid_rate"] >= b["valid_rate"], (lang, a, b)
        assert abs(report["delta"][lang]["valid_rate"] - (a["valid_rate"] - b["valid_rate"])) < 1e-9
        assert f"| {lang} | valid_rate | {a['valid_rate']:.4f} | {b['valid_rate']:.4f} |" in md
    assert sum(ours[lang]["valid_rate"] for lang in TASKS) > sum(theirs[lang]["valid_rate"] for lang in TASKS)
    assert "Δ (first − second)" in md
    assert not report["mdx_exact"] or not ours["mdx"]["approximate"]
    rows = [json.loads(line) for line in (out / "samples-compare.jsonl").read_text().splitlines()]
    assert {row["task"] for row in rows} == set(TASKS)


@pytest.mark.parametrize("lang", TASKS)
def test_trained_far_above_random(compared, lang):
    # at least 0.25 valid and 0.2 above random: five trainings gave 0.33-0.67 against random's 0-0.04 (README)
    (_, ours), (_, theirs) = [(x["ckpt"], x["tasks"]) for x in compared[1]["runs"]]
    a, b = ours[lang]["valid_rate"], theirs[lang]["valid_rate"]
    assert a >= 0.25 and a >= b + 0.2, (lang, a, b)


def test_report_picture_and_the_model_card_shows_the_newest_report(compared, tiny_run, tmp_path):
    from huggingface_hub import ModelCard
    out, report = compared
    assert "![rates of each task](report.png)" in (out / "report.md").read_text()
    assert_picture(out / "report.png")
    rec = read_jsonl(f"{tiny_run}/validations.jsonl")[-1]  # validate.py told the run where its report is
    assert rec == {"ckpt": os.path.basename(os.path.realpath(ckpt.resolve(tiny_run))),
                   "report": str((out / "report.json").resolve())}
    r = subprocess.run([sys.executable, "-m", "model.export", tiny_run, str(tmp_path / "hf")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    (_, ours), (_, theirs) = [(x["ckpt"], x["tasks"]) for x in report["runs"]]
    assert f"report on this checkpoint ({report['created']}), beside `random`" in card.text
    for lang in TASKS:
        assert f"| {lang} | valid_rate | {ours[lang]['valid_rate']:.4f} | {theirs[lang]['valid_rate']:.4f} |" \
            in card.text


def test_ppl_equals_the_training_eval(tiny_run, tmp_path):
    """validate.py's ppl task on the final checkpoint gives train.py's final eval metrics, to 1e-6: the same
    function (evals/loss.py) on the same val batches, read from the checkpoint's config."""
    validate("--ckpt", tiny_run, "--tasks", "ppl", "--out", str(tmp_path))
    got = json.loads((tmp_path / "report.json").read_text())["runs"][0]["tasks"]["ppl"]
    final = [r for r in read_jsonl(f"{tiny_run}/metrics.jsonl") if r["kind"] == "eval"][-1]
    keys = [k for k in final if k.startswith(("val_loss/", "val_ppl/", "val_acc/"))]
    assert len(keys) == 9 and final["step"] == load_config(["config/tiny.py"]).max_iters
    for k in keys + ["val_loss", "val_ppl"]:
        assert abs(got[k] - final[k]) <= 1e-6 * max(1.0, abs(final[k])), (k, got[k], final[k])
