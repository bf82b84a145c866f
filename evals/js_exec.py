"""JavaScript execution: our problems with hidden tests (data/js_problems.jsonl) or a MultiPL-E humaneval-js
file, run in a fresh V8 isolate, pass@k."""
import json
import os

from checkers import execute
from evals import EvalError
from evals.execution import score

JS_PROBLEMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "js_problems.jsonl")


def load(path):
    """Records with name, prompt, tests and stop_tokens (MultiPL-E ships JSON lines or one JSON list)."""
    if not os.path.isfile(path):
        raise EvalError(f"JS problem file {path} not found; pass a MultiPL-E humaneval-js .jsonl/.json file")
    with open(path) as f:
        text = f.read()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines()
                                                                        if l.strip()]
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON/JSONL ({e}); expected MultiPL-E humaneval-js records") from None
    for i, p in enumerate(rows):
        missing = [k for k in ("name", "prompt", "tests", "stop_tokens") if k not in p]
        if missing:
            raise EvalError(f"{path}: record {i} lacks {', '.join(missing)}; expected MultiPL-E humaneval-js fields")
    return rows


def program(problem, completion):
    """Prompt + completion (already cut at the stop tokens) + the hidden tests."""
    return f"{problem['prompt']}{completion}\n\n{problem['tests']}\n"


def evaluate(run):
    problems = load(run.settings.js_problems or JS_PROBLEMS)[:run.settings.limit]
    return score(run, "js-exec", [(p["name"], p["prompt"], p["stop_tokens"], lambda c, p=p: program(p, c))
                                  for p in problems], execute.run_js, timeout=5.0)
