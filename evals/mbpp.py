"""MBPP (Austin et al., 2021) from a local JSONL file: Python problems with assert tests, pass@k."""
import json

from checkers import execute
from evals import EvalError
from evals.execution import score

STOP = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```"]  # as bigcode-evaluation-harness stops


def load(path):
    """MBPP JSONL records (text or prompt, code, test_list, optional test_setup_code / test_imports)."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise EvalError(f"cannot read MBPP file {path} ({e}); pass the JSONL release with --mbpp")
    for i, r in enumerate(rows):
        if "test_list" not in r or not ({"text", "prompt"} & r.keys()):
            raise EvalError(f"{path}: record {i} lacks text/prompt or test_list; expected MBPP JSONL")
    return rows


def prompt(r):
    return f'"""\n{r.get("text") or r["prompt"]}\n{r["test_list"][0]}\n"""\n'


def program(r, completion):
    setup = r.get("test_setup_code") or "\n".join(r.get("test_imports") or [])
    return f"{prompt(r)}{completion}\n\n{setup}\n" + "\n".join(r["test_list"]) + "\n"


def evaluate(run):
    rows = load(run.settings.mbpp)[:run.settings.limit]
    return score(run, "mbpp", [(f'mbpp/{r.get("task_id", i)}', prompt(r), STOP, lambda c, r=r: program(r, c))
                               for i, r in enumerate(rows)], execute.run_python, timeout=10.0)
