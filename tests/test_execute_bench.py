"""The benchmarks behind validate.py: HumanEval's and our JS problems' reference solutions pass, wrong ones fail."""

import json
import time

import pytest

from checkers.execute import run_js, run_many, run_python
from evals import EvalError
from evals.humaneval import problems as humaneval_problems, program as humaneval_program
from evals.js_exec import JS_PROBLEMS, load, program as js_program


def load_js_problems(path=JS_PROBLEMS):
    return load(path)


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass_and_return_none_all_fail():
    problems = humaneval_problems()
    assert len(problems) == 164
    t0 = time.time()
    good = run_many([humaneval_program(p, p["canonical_solution"]) for p in problems], run_python, workers=4)
    bad = run_many([humaneval_program(p, "    return None\n") for p in problems], run_python, workers=4)
    failed = [(p["task_id"], d) for p, (ok, d) in zip(problems, good) if not ok]
    assert failed == []
    assert sum(ok for ok, _ in bad) == 0
    assert time.time() - t0 < 60


def test_js_problems_file():
    problems = load_js_problems()
    assert len(problems) >= 40
    assert len({p["name"] for p in problems}) == len(problems)
    for p in problems:
        assert p["prompt"].startswith("/**") and p["prompt"].rstrip().endswith("{")
        assert "require('node:assert')" in p["tests"] and p["stop_tokens"]


@pytest.mark.slow
def test_js_reference_solutions_pass_and_wrong_ones_fail():
    problems = load_js_problems()
    good = run_many([js_program(p, p["canonical_solution"]) for p in problems], run_js, workers=4)
    assert [(p["name"], d) for p, (ok, d) in zip(problems, good) if not ok] == []
    some = problems[::4]  # enough to show the tests bite, at a quarter of the cost
    bad = run_many([js_program(p, "  return null;\n}\n") for p in some], run_js, workers=4)
    assert [p["name"] for p, (ok, _) in zip(some, bad) if ok] == []


def test_load_multipl_e_json_list(tmp_path):
    # MultiPL-E records have no canonical_solution; a JSON list is accepted as well as JSON lines
    record = {"name": "HumanEval_53_add", "language": "js",
              "prompt": "//Add two numbers x and y\nfunction add(x, y){\n",
              "tests": "const assert = require('node:assert');\n\n\nfunction test() {\n  let candidate = add;\n"
                       "  assert.deepEqual(candidate(0, 1),1);\n  assert.deepEqual(candidate(5, 7),12);\n}\n\ntest();",
              "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"]}
    path = tmp_path / "humaneval-js.json"
    path.write_text(json.dumps([record]))
    [p] = load_js_problems(path)
    assert run_js(js_program(p, "  return x + y;\n}\n")) == (True, "passed")
    assert not run_js(js_program(p, "  return x - y;\n}\n"))[0]


def test_load_js_problems_errors(tmp_path):
    with pytest.raises(EvalError, match="not found"):
        load_js_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "prompt": "function f() {\\n"}\n')
    with pytest.raises(EvalError, match="record 0 lacks tests, stop_tokens"):
        load_js_problems(bad)
    bad.write_text("{not json\n")
    with pytest.raises(EvalError, match="not valid JSON"):
        load_js_problems(bad)
    assert JS_PROBLEMS.endswith("data/js_problems.jsonl")
