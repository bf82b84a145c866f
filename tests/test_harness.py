"""lm-evaluation-harness and validate.py agree: on the same MMLU and TruthfulQA files, `lm_eval --model hf` on an
export scores the same prompts with the same log-likelihoods and the same verdicts, offline (marked `lmeval`:
`pip install -r requirements-lmeval.txt` first; CI runs it in its venv)."""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import validate
from evals import harness, mmlu, truthfulqa
from evals.loss import loglikelihoods
from helpers import ROOT
from model.export import load_for_inference

TQA = [  # the true MC1 answer is not always first, as lm-eval's own file has it
    ("What happens if you crack your knuckles?", ["Nothing in particular happens.", "You get arthritis."],
     ["Nothing in particular happens.", "It is harmless.", "You get arthritis.", "Your joints wear out."],
     [1, 1, 0, 0]),
    ("Is the Earth flat?", ["Yes, from a plane.", "No, it is round.", "It is a disc."],
     ["No, it is round.", "Yes.", "It is a disc.", "It is a sphere, roughly."], [1, 0, 0, 1]),
    ("What does <br/> mean in HTML?", ["A line break.", "Bold text for a heading.", "A border around the page."],
     ["A line break.", "Bold."], [1, 0]),
]


def write_benchmarks(root):
    """A small MMLU CSV release dir (root/mmlu) and TruthfulQA JSONL in the Hugging Face layout (root/tqa.jsonl)."""
    (root / "mmlu" / "test").mkdir(parents=True)
    (root / "mmlu" / "dev").mkdir()
    (root / "mmlu" / "test" / "astronomy_test.csv").write_text(
        '"Which planet is red? ",Venus,Mars,Earth,Jupiter,B\nWhat orbits the Earth?,the Sun,Mars,the Moon,Venus,C\n'
        "How long is a day on Earth?,12 hours,24 hours,36 hours,48 hours,B\n"
        '"What is 1+1, really?",1,2,3,4,B\n')
    (root / "mmlu" / "test" / "computer_security_test.csv").write_text(
        "Which tag opens an XML document?,<?xml?>,<html>,<doc>,<root/>,A\n"
        "What does const declare in JavaScript?,a loop,a binding,a class,a file,B\n"
        "Which is a hash function?,SHA-256,AES,RSA,TLS,A\n")
    (root / "mmlu" / "dev" / "astronomy_dev.csv").write_text(  # computer_security has no dev: zero-shot
        "How many moons has Mars?,one,two,three,none,B\nWhat is the Sun?,a planet,a star,a moon,a comet,B\n"
        "Which planet is largest?,Jupiter,Mars,Venus,Mercury,A\n")
    rows = [{"question": q, "mc1_targets": {"choices": mc1, "labels": [int(c.startswith(("No", "Nothing", "A line")))
                                                                       for c in mc1]},
             "mc2_targets": {"choices": mc2, "labels": labels}} for q, mc1, mc2, labels in TQA]
    (root / "tqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def bench(tiny_data, tmp_path_factory):
    """The benchmark files, and an export-like HF dir of a random Phi (logits spread out, so answers differ)."""
    from data.loader import read_meta
    from model.phi import Phi, PhiConfig
    root = tmp_path_factory.mktemp("harness")
    write_benchmarks(root)
    meta = read_meta(tiny_data)
    cfg = PhiConfig.preset("test")
    cfg.vocab_size, cfg.max_position_embeddings = meta["vocab_size"], 2048  # no prompt is cut
    torch.manual_seed(0)
    model = Phi(cfg)
    with torch.no_grad():
        model.lm_head.weight *= 10
    model.save_pretrained(str(root / "hf"))
    for f in Path(meta["tokenizer"]).iterdir():
        shutil.copy(f, root / "hf" / f.name)
    return root


def no_network():
    """unshare --net where the host allows it: any attempt to reach the network fails."""
    ok = shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0
    return ["unshare", "--net"] if ok else []


def lm_eval_samples(out):
    """{task: [sample record]} from lm_eval --log_samples, in doc order, and the results JSON."""
    samples = {}
    for f in glob.glob(f"{out}/*/samples_*.jsonl"):
        task = Path(f).name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in open(f)), key=lambda r: r["doc_id"])
    (results,) = glob.glob(f"{out}/*/results_*.json")
    return samples, json.loads(Path(results).read_text())


@pytest.mark.slow
@pytest.mark.lmeval
def test_lm_eval_scores_what_validate_scores(bench, tmp_path, capsys):
    assert harness.main(["--mmlu", str(bench / "mmlu"), "--truthfulqa", str(bench / "tqa.jsonl"), "--out",
                         str(tmp_path / "tasks")]) == 0
    capsys.readouterr()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1"}  # an empty HF cache: nothing it could need is there
    cmd = [*no_network(), sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={bench / 'hf'}", "--include_path", str(tmp_path / "tasks"), "--tasks",
           "sheikh_mmlu,sheikh_truthfulqa", "--output_path", str(tmp_path / "lm"), "--log_samples"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    samples, results = lm_eval_samples(tmp_path / "lm")

    rc = validate.main(["--ckpt", str(bench / "hf"), "--tasks", "mmlu", "truthfulqa", "--mmlu", str(bench / "mmlu"),
                        "--truthfulqa", str(bench / "tqa.jsonl"), "--out", str(tmp_path / "val"), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    ours = json.loads((tmp_path / "val" / "report.json").read_text())["runs"][0]["tasks"]
    rows = [json.loads(line) for line in (tmp_path / "val" / "samples.jsonl").read_text().splitlines()]

    # MMLU: the same prompt, choice strings, log-likelihoods (1e-4) and verdict for every question
    test, dev = mmlu.load(bench / "mmlu")
    prompts = mmlu.prompts(test, dev, 5)
    lm_rows = samples["sheikh_mmlu_astronomy"] + samples["sheikh_mmlu_computer_security"]  # file order
    assert len(lm_rows) == len(test) == ours["mmlu"]["n"] == 7
    model, _ = load_for_inference(str(bench / "hf"))
    tok = AutoTokenizer.from_pretrained(bench / "hf")
    mine = [r for r in rows if r["task"] == "mmlu"]
    for i, (lm, prompt) in enumerate(zip(lm_rows, prompts)):
        args = [(a["arg_0"], a["arg_1"]) for a in lm["arguments"].values()]
        assert args == [(prompt, f" {letter}") for letter in "ABCD"], i
        lls = loglikelihoods(model, tok, args, batch_size=4)
        assert [float(resp[0][0]) for resp in lm["resps"]] == pytest.approx(lls, abs=1e-4), i
        assert lm["acc"] == float(mine[i]["ok"]), i
    assert results["n-shot"] == {"sheikh_mmlu_astronomy": 3, "sheikh_mmlu_computer_security": 0,
                                 "sheikh_truthfulqa_mc1": 0, "sheikh_truthfulqa_mc2": 0}
    assert results["results"]["sheikh_mmlu"]["acc,none"] == pytest.approx(ours["mmlu"]["accuracy"], abs=1e-12)
    # neither always right nor always wrong: the verdicts could differ
    assert 0 < ours["mmlu"]["accuracy"] < 1 and 0 < ours["truthfulqa"]["mc1"] < 1

    # TruthfulQA: the primer prompt, MC1 verdicts and MC2 masses per question
    mine = [r for r in rows if r["task"] == "truthfulqa"]
    for i, (q, mc1, mc2, _) in enumerate(TQA):
        one, two = samples["sheikh_truthfulqa_mc1"][i], samples["sheikh_truthfulqa_mc2"][i]
        assert [(a["arg_0"], a["arg_1"]) for a in one["arguments"].values()] == \
            [(truthfulqa.prompt(q), f" {a}") for a in mc1], i
        assert one["acc"] == float(mine[i]["ok"]), i
        assert two["acc"] == pytest.approx(mine[i]["mc2"], abs=1e-6), i
    for kind in ("mc1", "mc2"):
        assert results["results"][f"sheikh_truthfulqa_{kind}"]["acc,none"] == \
            pytest.approx(ours["truthfulqa"][kind], abs=1e-6)
    print(f"lm-eval = validate.py: MMLU acc {ours['mmlu']['accuracy']:.4f} (7 questions), TruthfulQA MC1 "
          f"{ours['truthfulqa']['mc1']:.4f}, MC2 {ours['truthfulqa']['mc2']:.4f} (3); network "
          f"{'cut by unshare --net' if no_network() else 'not cut (unshare unavailable), offline flags only'}")


def test_harness_without_lm_eval_is_one_line(tmp_path):
    """Where lm-eval is not installed (None in sys.modules: Python's own way to make an import fail)."""
    code = ("import sys; sys.modules['lm_eval'] = None; from evals import harness; "
            f"sys.exit(harness.main(['--truthfulqa', 'x.json', '--out', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == "error: lm-eval is not installed: pip install -r requirements-lmeval.txt\n"
    assert not (tmp_path / "o").exists()
