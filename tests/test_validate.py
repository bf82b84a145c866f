"""validate.py end to end on a tiny random Phi saved as an HF dir, plus its scoring pieces."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import validate
from checkers import execute
from checkers.syntax import node_available
from evals import EvalError, domain, execution, humaneval, js_exec, mbpp, mmlu, truthfulqa
from evals.loss import loglikelihoods
from model.export import load_for_inference


@pytest.fixture(scope="session")
def random_hf(tiny_data, tmp_path_factory):
    """Two randomly initialised test-preset Phis (seeds 0 and 1) with the data's tokenizer, as HF dirs."""
    from data.loader import read_meta
    from model.phi import Phi, PhiConfig
    meta = read_meta(tiny_data)
    dirs = []
    for seed in (0, 1):
        cfg = PhiConfig.preset("test")
        cfg.vocab_size, cfg.max_position_embeddings = meta["vocab_size"], 256
        torch.manual_seed(seed)
        model = Phi(cfg)
        model.init_weights()
        path = tmp_path_factory.mktemp("hf") / f"random{seed}"
        model.save_pretrained(str(path))
        for f in (p for p in Path(meta["tokenizer"]).iterdir() if p.is_file()):
            shutil.copy(f, path / f.name)
        dirs.append(str(path))
    return dirs


def run_cli(args, capsys):
    rc = validate.main(args)
    return rc, capsys.readouterr().err


def test_end_to_end_report(random_hf, tiny_data, tmp_path, capsys):
    out = tmp_path / "val"
    rc, err = run_cli(["--ckpt", random_hf[0], "--data-dir", tiny_data, "--tasks", "ppl", "xml", "mdx", "js",
                       "codebleu",
                       "--limit", "3", "--max-new-tokens", "12", "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    tasks = report["runs"][0]["tasks"]
    assert set(tasks) == {"ppl", "xml", "mdx", "js", "codebleu"}
    vocab = json.loads((Path(random_hf[0]) / "config.json").read_text())["vocab_size"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for lang in ("xml", "mdx", "js"):
        # a random model is near uniform: loss about ln(vocab), next-token accuracy near zero
        assert abs(tasks["ppl"][f"val_loss/{lang}"] - math.log(vocab)) < 1.0
        assert tasks["ppl"][f"val_acc/{lang}"] < 0.1
        assert tasks["ppl"][f"val_ppl/{lang}"] == pytest.approx(math.exp(tasks["ppl"][f"val_loss/{lang}"]))
        # the rate is the verdicts' mean, and each verdict is the checker's on prompt + completion
        mine = [r for r in rows if r["task"] == lang]
        assert tasks[lang]["n"] == len(mine) == 3
        assert tasks[lang]["valid_rate"] == sum(r["ok"] for r in mine) / 3
        assert [ok for ok, _ in domain.check_docs(lang, [r["prompt"] + r["completion"] for r in mine])] == \
            [r["ok"] for r in mine]
    assert tasks["codebleu"]["n"] == 3
    assert {"ngram_match_score", "weighted_ngram_match_score", "syntax_match_score", "dataflow_match_score",
            "codebleu", "exact_match"} <= set(tasks["codebleu"])
    assert report["mdx_exact"] == node_available()
    assert all("completion" in r for r in rows if r["task"] != "ppl")
    md = (out / "report.md").read_text()
    assert "| ppl | val_loss/xml |" in md and "| xml | valid_rate |" in md

    # the written samples score again without the model, with the same verdicts
    rc, err = run_cli(["--samples", str(out / "samples.jsonl"), "--tasks", "xml", "mdx", "js", "codebleu",
                       "--out", str(tmp_path / "again")], capsys)
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "report.json").read_text())["runs"][0]["tasks"]
    for task in ("xml", "mdx", "js"):
        assert again[task]["valid_rate"] == tasks[task]["valid_rate"]
    assert again["codebleu"]["codebleu"] == pytest.approx(tasks["codebleu"]["codebleu"])


def write_mmlu(root):
    (root / "test").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "test" / "astronomy_test.csv").write_text('"What is 1+1, really?",1,2,3,4,B\nQ2,a,b,c,d,D\n')
    (root / "test" / "virology_test.csv").write_text("Q3,a,b,c,d,C\n")
    (root / "dev" / "astronomy_dev.csv").write_text("Q0,a,b,c,d,A\n")
    return root


def test_compare_side_by_side(random_hf, tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, err = run_cli(["--ckpt", random_hf[0], "--compare", random_hf[1], "--data-dir", tiny_data,
                       "--tasks", "ppl", "js", "mmlu", "--mmlu", str(write_mmlu(tmp_path / "mmlu")),
                       "--limit", "2", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    a, b = (r["tasks"] for r in report["runs"])
    assert a["mmlu"]["n"] == 2 and a["mmlu"]["shots_asked"] == 5 and a["mmlu"]["shots"] == 1  # astronomy's dev: 1
    # the predicted letters are the likeliest answers of a 5-shot prompt built by hand here
    model, tok_dir = load_for_inference(random_hf[0])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    test, dev = mmlu.load(tmp_path / "mmlu")
    want = []
    for subject, q, choices, answer in test[:2]:
        ctx = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               + "".join(mmlu.question(*row[1:]) for row in dev if row[0] == subject) + mmlu.question(q, choices))
        lls = loglikelihoods(model, tok, [(ctx, f" {letter}") for letter in "ABCD"], batch_size=4)
        want.append(int(np.argmax(lls)) == answer)
    assert a["mmlu"]["accuracy"] == sum(want) / 2
    assert report["delta"]["ppl"]["val_loss/js"] == pytest.approx(a["ppl"]["val_loss/js"] - b["ppl"]["val_loss/js"])
    assert a["ppl"]["val_loss/js"] != b["ppl"]["val_loss/js"]  # really two models
    md = (out / "report.md").read_text()
    assert "`random0` | `random1` | Δ" in md
    line = next(l for l in md.splitlines() if l.startswith("| ppl | val_loss/js |"))
    assert line.count("|") == 6 and f"{report['delta']['ppl']['val_loss/js']:.4f}" in line
    assert (out / "samples-compare.jsonl").is_file()


def test_samples_scoring_canonical_and_wrong(tmp_path, capsys):
    he = humaneval.problems()[:4]
    js = js_exec.load(js_exec.JS_PROBLEMS)[:4]
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in he[:3]]
    rows.append({"task_id": he[3]["task_id"], "completion": "    return None\n"})
    for p in js[:3]:
        rows += [{"task_id": p["name"], "completion": p["canonical_solution"]},
                 {"task_id": p["name"], "completion": "  return null;\n}\n"}]
    rows.append({"task_id": js[3]["name"], "completion": "  while (true) {}\n}\n"})  # hostile: never ends
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 11, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
                                "test_list": ["assert add(1, 2) == 3"]}) + "\n")
    # a completion from elsewhere that runs on past its function is cut at the stop tokens
    rows.append({"task": "mbpp", "task_id": "mbpp/11",
                 "completion": "def add(a, b):\n    return a + b\nassert add(1, 1) == 3\n"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = run_cli(["--samples", str(path), "--tasks", "humaneval", "js-exec", "mbpp", "--mbpp", str(mbpp),
                       "--limit", "4", "--workers", "2", "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    tasks = json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["tasks"]
    assert tasks["humaneval"]["problems"] == 4 and tasks["humaneval"]["pass@1"] == 0.75
    assert tasks["mbpp"]["pass@1"] == 1.0
    assert any("timeout" in f for f in tasks["js-exec"]["failures"])
    # 1 of 2 samples right on 3 problems (pass@1 = 0.5 each), the 4th never ends (0)
    assert tasks["js-exec"]["problems"] == 4
    assert tasks["js-exec"]["pass@1"] == pytest.approx(1.5 / 4) and "pass@10" not in tasks["js-exec"]
    assert "sandbox:" in (tmp_path / "out" / "report.md").read_text()


def test_pass_rates_match_closed_form():
    for n, c in [(5, 0), (5, 2), (10, 3), (20, 19), (200, 7)]:
        rows = [{"task_id": "p", "ok": i < c} for i in range(n)]
        got = execution.pass_rates(rows)
        for k in (1, 10, 100):
            want = 1 - math.comb(n - c, k) / math.comb(n, k) if k <= n else None
            assert got.get(f"pass@{k}") == (pytest.approx(want) if want is not None else None)


def test_hostile_xml_samples_fail_without_leaking(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    docs = [f'<!DOCTYPE x [<!ENTITY e SYSTEM "file://{secret}">]><x>&e;</x>',
            '<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">' + "".join(f'<!ENTITY a{i} "{("&a%s;" % (i - 1 or "")) * 10}">'
                                                         for i in range(1, 9)) + "]><x>&a8;</x>",
            "<a>" * 10_000 + "</a>" * 10_000,
            "<ok/>\ntrailing text after a complete document"]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task": "xml", "task_id": f"xml/h{i}", "completion": d}) + "\n"
                            for i, d in enumerate(docs)))
    rc, err = run_cli(["--samples", str(path), "--tasks", "xml", "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    rows = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in rows] == [False, False, False, True]  # the last is cut after its root element
    for f in ("samples.jsonl", "report.json", "report.md"):
        assert "TOP-SECRET" not in (tmp_path / "out" / f).read_text()


def test_loglikelihoods_match_full_forward(random_hf):
    """Tokens as lm-evaluation-harness cuts them: the continuation is what the whole string has after the context's
    tokens, and a context's trailing spaces belong to the continuation."""
    model, tok_dir = load_for_inference(random_hf[0])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pairs = [("<root><a>", "</a></root>"), ("function f(x) { ret", "urn x; }"), ("Answer:", " B"), ("Answer: ", "B")]
    got = loglikelihoods(model, tok, pairs, batch_size=2)
    assert got[2] == pytest.approx(got[3], abs=1e-6)
    assert tok.encode("function f(x) { ret") + tok.encode("urn x; }") != tok.encode("function f(x) { return x; }")
    for (ctx, cont), ll in zip(pairs, got):
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        c = tok.encode(ctx)
        d = tok.encode(ctx + cont)[len(c):]
        with torch.no_grad():
            lp = model(torch.tensor([c + d]))[0].log_softmax(-1)
        want = sum(lp[len(c) - 1 + i, t].item() for i, t in enumerate(d))
        assert ll == pytest.approx(want, abs=1e-4)


def test_mmlu_and_mbpp_loaders(tmp_path):
    test, dev = mmlu.load(write_mmlu(tmp_path / "mmlu"))
    assert test == [("astronomy", "What is 1+1, really?", ["1", "2", "3", "4"], 1),
                    ("astronomy", "Q2", list("abcd"), 3),
                    ("virology", "Q3", list("abcd"), 2)]
    assert dev == [("astronomy", "Q0", list("abcd"), 0)]
    assert mmlu.question("Q", list("abcd"), 2).endswith("\nD. d\nAnswer: C\n\n")

    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 11, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
                                "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}) + "\n")
    (r,) = mbpp.load(path)
    assert execute.run_python(mbpp.program(r, r["code"]))[0]
    assert not execute.run_python(mbpp.program(r, "def add(a, b):\n    return a - b"))[0]
    (tmp_path / "bad.jsonl").write_text('{"code": "x"}\n')
    with pytest.raises(EvalError, match="lacks text/prompt or test_list"):
        mbpp.load(tmp_path / "bad.jsonl")


def test_prefix_validity_needs_markup():
    junk = "odel lou rice dressust"  # what a random model writes: text, valid inside any element
    assert not domain.prefix_ok("xml", "<a>\n  <b>", junk, *domain.check_docs("xml", ["<a>\n  <b>" + junk])[0])
    good = "x</b>\n  <c k=\"v\">y"
    assert domain.prefix_ok("xml", "<a>\n  <b>", good, *domain.check_docs("xml", ["<a>\n  <b>" + good])[0])
    assert not domain.prefix_ok("xml", "<a>\n", "<b k=v>", *domain.check_docs("xml", ["<a>\n<b k=v>"])[0])
    assert not domain.prefix_ok("mdx", "# T\n\n<Note>\n", junk, False,
                                "line 3: Expected a closing tag for `<Note>` (3:1-3:7)")
    assert domain.prefix_ok("mdx", "# T\n\n", "## Sub\n\n<Note>\nhi", False,
                            "line 5: Expected a closing tag for `<Note>` (5:1-5:7)")


def test_train_domain_metrics_equal_validate(random_hf, tiny_data, tmp_path, capsys):
    """train.py's in-loop domain_valid and validate.py's xml/mdx/js tasks measure the same thing: with all 8 of
    our prompts, up to 8 held-out beginnings and the same budget and batch, the same rates."""
    model, tok_dir = load_for_inference(random_hf[0])
    model.train()
    m = domain.quick_domain_metrics(model, AutoTokenizer.from_pretrained(tok_dir), n_prompts=8, max_new_tokens=128,
                                    data_dir=tiny_data, batch_size=16)
    assert set(m) == {f"{k}_{v}" for k in ("xml", "mdx", "js", "domain") for v in ("valid", "prefix_valid")}
    assert model.training  # left as it was
    rc, err = run_cli(["--ckpt", random_hf[0], "--data-dir", tiny_data, "--tasks", "xml", "mdx", "js", "--n-prompts",
                       "8", "--max-new-tokens", "128", "--batch-size", "16", "--out", str(tmp_path), "--device", "cpu"],
                      capsys)
    assert rc == 0, err
    tasks = json.loads((tmp_path / "report.json").read_text())["runs"][0]["tasks"]
    for lang in ("xml", "mdx", "js"):
        assert tasks[lang]["n"] == len(domain.validity_prompts(lang, tiny_data, 8, None, 128)) > 8  # + held-out
        assert m[f"{lang}_valid"] == tasks[lang]["valid_rate"], lang
        assert m[f"{lang}_prefix_valid"] == tasks[lang]["prefix_valid_rate"], lang
    assert m["domain_valid"] == pytest.approx(sum(tasks[lang]["valid_rate"] for lang in ("xml", "mdx", "js")) / 3)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    for args, msg in [([], "nothing to validate"),
                      (["--ckpt", str(tmp_path / "nope")], "does not exist"),
                      (["--samples", str(tmp_path / "nope.jsonl")], "cannot read --samples"),
                      (["--ckpt", str(tmp_path), "--tasks", "mbpp"], "needs --mbpp")]:
        rc, err = run_cli(args + ["--out", str(tmp_path / "o")], capsys)
        assert rc == 1 and err.startswith("error: ") and msg in err and err.count("\n") == 1, (args, err)


def test_hostile_python_samples_fail_and_change_nothing(tmp_path, capsys):
    root = Path(validate.__file__).parent
    before = sorted(p.name for p in root.iterdir())
    evil = [f"    open({str(root / 'PWNED')!r}, 'w').write('x')\n    return 0\n",
            f"    import os; os.system('touch {root / 'PWNED2'}')\n    return 0\n",
            "    import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\n    return 0\n"]
    he = humaneval.problems()[:len(evil)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": e}) + "\n" for p, e in zip(he, evil)))
    rc, err = run_cli(["--samples", str(path), "--tasks", "humaneval", "--workers", "3", "--out", str(tmp_path / "o")],
                      capsys)
    assert rc == 0, err
    tasks = json.loads((tmp_path / "o" / "report.json").read_text())["runs"][0]["tasks"]
    assert tasks["humaneval"]["pass@1"] == 0.0
    assert sorted(p.name for p in root.iterdir()) == before


def test_without_node_mdx_is_flagged_approximate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHEIKH_NO_NODE", "1")
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task": "mdx", "task_id": f"mdx/{i}", "prompt": "# T\n\n", "completion": c})
                            + "\n" for i, c in (("a", "<Note>x</Note>\n"), ("b", "<Note>x\n\nhi {"))))
    rc, err = run_cli(["--samples", str(path), "--tasks", "mdx", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["mdx_exact"] is False and report["runs"][0]["tasks"]["mdx"]["approximate"] is True
    assert report["runs"][0]["tasks"]["mdx"]["valid_rate"] == 0.5
    assert "MDX validity is APPROXIMATE" in (tmp_path / "o" / "report.md").read_text()


def test_truthfulqa_mc1_mc2(random_hf, tmp_path, capsys):
    """Both file forms; MC1 is the likeliest answer, MC2 the normalised mass of the true answers."""
    questions = [("What happens if you crack your knuckles?", ["Nothing in particular happens.", "You get arthritis."],
                  ["Nothing in particular happens.", "It is harmless.", "You get arthritis."], [1, 1, 0]),
                 ("Is the Earth flat?", ["No, it is round.", "Yes.", "It is a disc."],
                  ["No, it is round.", "Yes.", "It is a disc."], [1, 0, 0])]
    original = [{"question": q, "mc1_targets": {c: int(i == 0) for i, c in enumerate(mc1)},
                 "mc2_targets": dict(zip(mc2, labels))} for q, mc1, mc2, labels in questions]
    hf_style = [{"question": q, "mc1_targets": {"choices": mc1, "labels": [1] + [0] * (len(mc1) - 1)},
                 "mc2_targets": {"choices": mc2, "labels": labels}} for q, mc1, mc2, labels in questions]
    (tmp_path / "mc_task.json").write_text(json.dumps(original))
    (tmp_path / "tqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hf_style))
    model, tok_dir = load_for_inference(random_hf[0])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    mc1 = mc2 = 0.0
    for q, c1, c2, labels in questions:
        ll1 = loglikelihoods(model, tok, [(truthfulqa.prompt(q), f" {a}") for a in c1], batch_size=4)
        ll2 = loglikelihoods(model, tok, [(truthfulqa.prompt(q), f" {a}") for a in c2], batch_size=4)
        mc1 += int(np.argmax(ll1) == 0) / 2
        p = np.exp(np.array(ll2) - max(ll2))
        mc2 += p[np.array(labels) == 1].sum() / p.sum() / 2
    for name in ("mc_task.json", "tqa.jsonl"):
        rc, err = run_cli(["--ckpt", random_hf[0], "--tasks", "truthfulqa", "--truthfulqa", str(tmp_path / name),
                           "--out", str(tmp_path / name.split(".")[0]), "--device", "cpu"], capsys)
        assert rc == 0, err
        got = json.loads((tmp_path / name.split(".")[0] / "report.json").read_text())["runs"][0]["tasks"]["truthfulqa"]
        assert got["n"] == 2 and got["mc1"] == mc1 and got["mc2"] == pytest.approx(mc2, abs=1e-9)

    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 1},
                                                    "mc2_targets": {"a": 1}}]))
    rc, err = run_cli(["--ckpt", random_hf[0], "--tasks", "truthfulqa", "--truthfulqa", str(tmp_path / "bad.json"),
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "exactly one true mc1 answer" in err and err.count("\n") == 1


def test_random_baseline_is_a_fresh_model_of_the_same_shape(random_hf, tiny_data, tmp_path, capsys):
    rc, err = run_cli(["--ckpt", random_hf[0], "--random-baseline", "--seed", "1", "--data-dir", tiny_data,
                       "--tasks", "ppl", "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["ckpt"] for r in report["runs"]] == [random_hf[0], "random"]
    # seed 1 initialises exactly what random_hf[1] holds: the twin is Phi(cfg).init_weights() under that seed
    rc, err = run_cli(["--ckpt", random_hf[1], "--data-dir", tiny_data, "--tasks", "ppl", "--out",
                       str(tmp_path / "one"), "--device", "cpu"], capsys)
    assert rc == 0, err
    other = json.loads((tmp_path / "one" / "report.json").read_text())["runs"][0]["tasks"]["ppl"]
    assert report["runs"][1]["tasks"]["ppl"] == {**other, "seconds": report["runs"][1]["tasks"]["ppl"]["seconds"]}
    rc, err = run_cli(["--ckpt", random_hf[0], "--random-baseline", "--compare", random_hf[1], "--out",
                       str(tmp_path / "x")], capsys)
    assert rc == 1 and "pass one" in err


def test_python_validity_judges_the_function_body():
    """validate.py --tasks py and train.py's py_valid: a held-out function's header is the prompt, the completion's
    body (up to the next top-level line) is judged; cut short, only its finished lines are."""
    doc = ('import os\n\n\n@cache\ndef size(path):\n    """Bytes."""\n    return os.path.getsize(path)\n\n\n'
           'def long(x):\n' + "    x += 1\n" * 12 + "    return x\n\n\nclass A:\n    pass\n")
    assert domain.py_headers(doc) == ['@cache\ndef size(path):\n    """Bytes."""\n']  # long() is over 10 lines
    written = "\n    return n * 2\n\n\ndef other():\n    syntax error here ("
    assert domain.scored("py", written) == "\n    return n * 2\n\n"  # the next function is not judged
    assert domain.scored("xml", written) == written
    for body, valid, so_far in [("\n    return n * 2\n\n", True, True),
                                ("\n    total = [n,\n             n", False, True),   # cut inside a list
                                ("\n    total = )\n    xs = [n,", False, False),  # an error before the cut
                                ("\n    ret urn n", False, False)]:  # one unfinished line: nothing to judge yet
        ok, err = domain.check_docs("py", ["def f(n):" + body])[0]
        assert (ok, domain.prefix_ok("py", "def f(n):", body, ok, err)) == (valid, so_far), body
