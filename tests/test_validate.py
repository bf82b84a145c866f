"""validate.py end to end on a tiny random Phi saved as an HF dir, plus its scoring pieces."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import validate
from checkers import execute
from checkers.syntax import node_available


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
    rc, err = run_cli(["--ckpt", random_hf[0], "--data-dir", tiny_data, "--tasks", "ppl", "xml", "mdx", "js", "codebleu",
                       "--limit", "3", "--max-new-tokens", "12", "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    tasks = report["runs"][0]["tasks"]
    assert set(tasks) == {"ppl", "xml", "mdx", "js", "codebleu"}
    vocab = json.loads((Path(random_hf[0]) / "config.json").read_text())["vocab_size"]
    for lang in ("xml", "mdx", "js"):
        # a random model is near uniform: loss about ln(vocab), next-token accuracy near zero
        assert abs(tasks["ppl"][f"loss/{lang}"] - math.log(vocab)) < 1.0
        assert tasks["ppl"][f"acc/{lang}"] < 0.1
        assert tasks[lang]["n"] == 3 and 0 <= tasks[lang]["valid_rate"] <= 1
    assert tasks["codebleu"]["n"] == 3
    assert {"ngram_match_score", "weighted_ngram_match_score", "syntax_match_score", "dataflow_match_score",
            "codebleu", "exact_match"} <= set(tasks["codebleu"])
    assert report["mdx_exact"] == node_available()
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sum(r["task"] == "xml" for r in rows) == 3 and all("completion" in r for r in rows)
    md = (out / "report.md").read_text()
    assert "| ppl | loss/xml |" in md and "| xml | valid_rate |" in md

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
    assert a["mmlu"]["n"] == 2 and a["mmlu"]["shots"] == 5 and a["mmlu"]["accuracy"] in (0, 0.5, 1)
    assert report["delta"]["ppl"]["loss/js"] == pytest.approx(a["ppl"]["loss/js"] - b["ppl"]["loss/js"])
    assert a["ppl"]["loss/js"] != b["ppl"]["loss/js"]  # really two models
    md = (out / "report.md").read_text()
    assert "`random0` | `random1` | Δ" in md
    line = next(l for l in md.splitlines() if l.startswith("| ppl | loss/js |"))
    assert line.count("|") == 6 and f"{report['delta']['ppl']['loss/js']:.4f}" in line
    assert (out / "samples-compare.jsonl").is_file()


def test_samples_scoring_canonical_and_wrong(tmp_path, capsys):
    he = execute.humaneval_problems()[:4]
    js = execute.load_js_problems()[:4]
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
    rows.append({"task": "mbpp", "task_id": "mbpp/11", "completion": "def add(a, b):\n    return a + b\nassert add(1, 1) == 3\n"})
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
        got = validate.pass_rates(rows)
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
    from ckpt import load_for_inference
    from transformers import AutoTokenizer
    model, tok_dir = load_for_inference(random_hf[0])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    pairs = [("<root><a>", "</a></root>"), ("function f(x) {", " return x; }"), ("Answer:", " B")]
    got = validate.loglikelihoods(model, tok, pairs, batch_size=2)
    for (ctx, cont), ll in zip(pairs, got):
        c, d = tok.encode(ctx), tok.encode(cont)
        with torch.no_grad():
            lp = model(torch.tensor([c + d]))[0].log_softmax(-1)
        want = sum(lp[len(c) - 1 + i, t].item() for i, t in enumerate(d))
        assert ll == pytest.approx(want, abs=1e-4)


def test_mmlu_and_mbpp_loaders(tmp_path):
    test, dev = validate.load_mmlu(write_mmlu(tmp_path / "mmlu"))
    assert test == [("astronomy", "What is 1+1, really?", ["1", "2", "3", "4"], 1), ("astronomy", "Q2", list("abcd"), 3),
                    ("virology", "Q3", list("abcd"), 2)]
    assert dev == [("astronomy", "Q0", list("abcd"), 0)]
    assert validate.mmlu_question("Q", list("abcd"), 2).endswith("\nD. d\nAnswer: C\n\n")

    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text(json.dumps({"task_id": 11, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b",
                                "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}) + "\n")
    (r,) = validate.load_mbpp(mbpp)
    assert execute.run_python(validate.mbpp_program(r, r["code"]))[0]
    assert not execute.run_python(validate.mbpp_program(r, "def add(a, b):\n    return a - b"))[0]
    with pytest.raises(validate.ValidateError, match="lacks text/prompt or test_list"):
        (tmp_path / "bad.jsonl").write_text('{"code": "x"}\n')
        validate.load_mbpp(tmp_path / "bad.jsonl")


def test_prefix_validity_needs_markup():
    junk = "odel lou rice dressust"  # what a random model writes: text, valid inside any element
    assert not validate.prefix_ok("xml", "<a>\n  <b>", junk, *validate.check_docs("xml", ["<a>\n  <b>" + junk])[0])
    assert validate.prefix_ok("xml", "<a>\n  <b>", "x</b>\n  <c k=\"v\">y", *validate.check_docs("xml", ["<a>\n  <b>x</b>\n  <c k=\"v\">y"])[0])
    assert not validate.prefix_ok("xml", "<a>\n", "<b k=v>", *validate.check_docs("xml", ["<a>\n<b k=v>"])[0])
    assert not validate.prefix_ok("mdx", "# T\n\n<Note>\n", junk, False, "line 3: Expected a closing tag for `<Note>` (3:1-3:7)")
    assert validate.prefix_ok("mdx", "# T\n\n", "## Sub\n\n<Note>\nhi", False, "line 5: Expected a closing tag for `<Note>` (5:1-5:7)")


def test_quick_domain_metrics(random_hf, tiny_data):
    from ckpt import load_for_inference
    from transformers import AutoTokenizer
    model, tok_dir = load_for_inference(random_hf[0])
    model.train()
    m = validate.quick_domain_metrics(model, AutoTokenizer.from_pretrained(tok_dir), n_prompts=2,
                                      max_new_tokens=8, data_dir=tiny_data)
    assert set(m) == {f"{k}_{v}" for k in ("xml", "mdx", "js", "domain") for v in ("valid", "prefix_valid")}
    assert all(0 <= v <= 1 for v in m.values())
    assert m["domain_valid"] == pytest.approx((m["xml_valid"] + m["mdx_valid"] + m["js_valid"]) / 3)

    assert model.training  # left as it was


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
    he = execute.humaneval_problems()[:len(evil)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": e}) + "\n" for p, e in zip(he, evil)))
    rc, err = run_cli(["--samples", str(path), "--tasks", "humaneval", "--workers", "3", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    tasks = json.loads((tmp_path / "o" / "report.json").read_text())["runs"][0]["tasks"]
    assert tasks["humaneval"]["pass@1"] == 0.0
    assert sorted(p.name for p in root.iterdir()) == before


def test_without_node_mdx_is_flagged_approximate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHEIKH_NO_NODE", "1")
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"task": "mdx", "task_id": "mdx/a", "prompt": "# T\n\n", "completion": "<Note>x</Note>\n"}) + "\n"
                    + json.dumps({"task": "mdx", "task_id": "mdx/b", "prompt": "# T\n\n", "completion": "<Note>x\n\nhi {"}) + "\n")
    rc, err = run_cli(["--samples", str(path), "--tasks", "mdx", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["mdx_exact"] is False and report["runs"][0]["tasks"]["mdx"]["approximate"] is True
    assert report["runs"][0]["tasks"]["mdx"]["valid_rate"] == 0.5
    assert "MDX validity is APPROXIMATE" in (tmp_path / "o" / "report.md").read_text()
