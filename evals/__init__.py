"""What a checkpoint is measured on, shared by train.py's in-loop eval and validate.py's CLI.

  loss.py       per-language val loss, perplexity and token accuracy; log-likelihood scoring
  sampling.py   completions from a model or from a samples file (Settings, Run, complete)
  domain.py     XML / MDX / JS validity of completions: prompts, held-out documents, checkers
  execution.py  sandboxed execution of completions, pass@k
  humaneval.py, mbpp.py, js_exec.py, mmlu.py, truthfulqa.py, codebleu.py: one benchmark each
  harness.py    lm-evaluation-harness task files for the same MMLU and TruthfulQA files (python -m evals.harness)

Each task is `evaluate(run) -> (metrics, sample rows)`.
"""


class EvalError(ValueError):
    """Bad input to an evaluation (a missing or malformed file); the message is one line with the fix."""


def fmt(v):
    """A number as reports and model cards print it: floats to 4 decimals."""
    return f"{v:.4f}" if isinstance(v, float) else str(v)
