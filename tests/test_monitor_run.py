"""Monitoring as a user sees it after real train.py runs: TensorBoard read back, W&B offline resume, summary."""
import glob
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ckpt
from helpers import QUICK, assert_picture, read_jsonl, run_train
from train import load_config

pytestmark = pytest.mark.slow  # train.py subprocesses and the ~4.5 min tiny_run
TINY = load_config(["config/tiny.py"])  # the schedule tiny_run trained with


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_run):
    records = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in train] == [1] + list(range(TINY.log_interval, TINY.max_iters + 1, TINY.log_interval))
    assert [r["step"] for r in evals] == list(range(0, TINY.max_iters + 1, TINY.eval_interval))
    acc = EventAccumulator(os.path.join(tiny_run, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "lr", "grad_norm", "tok_per_s", "val_loss", "val_loss/xml", "val_acc/js", "val_ppl/mdx"):
        assert tag in tags, tag
    for tag, rows in (("loss", train), ("lr", train), ("val_loss", evals), ("val_loss/xml", evals)):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in rows]
        for e, r in zip(events, rows):
            assert abs(e.value - r[tag]) <= 1e-6 * max(1.0, abs(r[tag]))


def test_summary_names_stop_reason_and_best_step(tiny_run):
    with open(os.path.join(tiny_run, "summary.json")) as f:
        s = json.load(f)
    evals = [r for r in read_jsonl(os.path.join(tiny_run, "metrics.jsonl")) if r.get("kind") == "eval"]
    best = min(evals, key=lambda r: r["val_loss"])
    assert s["stop_reason"] == f"reached max_iters={TINY.max_iters}"
    assert (s["best_metric"], s["best_step"]) == (best["val_loss"], best["step"])
    assert s["final_eval"]["val_loss"] == evals[-1]["val_loss"]
    assert s["export_path"] == os.path.join(tiny_run, "best")
    md = open(os.path.join(tiny_run, "summary.md")).read()
    assert f"reached max_iters={TINY.max_iters}" in md
    assert f"{best['val_loss']:.6g} at step {best['step']}" in md
    # the tiny default learns: val loss falls by far more than 40%
    assert evals[-1]["val_loss"] < 0.6 * evals[0]["val_loss"]
    assert "![train and val loss, LR and events](loss.png)" in md
    assert_picture(os.path.join(tiny_run, "loss.png"))


def test_export_carries_a_model_card_that_matches_the_run(tiny_run):
    from huggingface_hub import ModelCard
    card = ModelCard.load(os.path.join(tiny_run, "best", "README.md"))  # the Hub's own parser
    with open(os.path.join(tiny_run, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(s["config"]["data_dir"], "meta.json")) as f:
        meta = json.load(f)
    exported = ckpt.train_state(ckpt.best_checkpoint(tiny_run, False))  # the saved checkpoint with the best val loss
    d = card.data.to_dict()
    assert d["pipeline_tag"] == "text-generation" and "base_model" not in d and "license" not in d  # from scratch
    assert {"sheikh-coder", "xml", "mdx", "javascript"} <= set(d["tags"]) and "fill-in-the-middle" not in d["tags"]
    assert f"| checkpoint | step {exported['step']:,} of run `{s['run_id']}` |" in card.text
    assert f"| tokens seen | {exported['tokens']:,} |" in card.text
    assert f"| stop reason | {s['stop_reason']} |" in card.text
    assert f"| context | {TINY.block_size} tokens" in card.text
    assert "js " + f"{meta['stats']['js']['train']['tokens']:,}" in card.text
    assert f"`<fim_prefix>` (id {meta['fim']['prefix']})" in card.text and "so these prompts are untrained" in card.text
    assert "Not validated yet" in card.text  # train.py exports before any validate.py run
    assert "![train and val loss](loss.png)" in card.text
    assert_picture(os.path.join(tiny_run, "best", "loss.png"))


def test_wandb_offline_run_id_survives_resume(tmp_path, tiny_data):
    out = str(tmp_path / "wandb")
    common = [*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--eval_interval=100", "--ckpt_interval=3",
              "--wandb_mode=offline"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_train([*common, "--max_iters=3"], env=env)
    first = json.load(open(os.path.join(out, "summary.json")))["run_id"]
    run_train([*common, "--max_iters=6"], env=env)
    second = json.load(open(os.path.join(out, "summary.json")))["run_id"]
    assert first == second
    runs = glob.glob(os.path.join(out, "wandb", f"offline-run-*-{first}"))
    assert len(runs) == 2  # one directory per session, both of the same run


def test_bad_wandb_setup_warns_once_and_trains(tmp_path, tiny_data):
    out = str(tmp_path / "nowandb")
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "online", "WANDB_DIR": str(tmp_path)}
    r = run_train([*QUICK, f"--out_dir={out}", f"--data_dir={tiny_data}", "--max_iters=3", "--eval_interval=100",
                   "--ckpt_interval=100", "--wandb_mode=online"], env=env)
    warnings = [line for line in r.stderr.splitlines() if "W&B" in line or "wandb" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B off"), warnings
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 3
