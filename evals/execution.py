"""Scoring completions by running them: every sample in checkers/execute.py's sandbox, then unbiased pass@k.

The sandbox is probed once before the first sample with the exact command samples use; when it cannot
run a trivial program, execute.SandboxError stops the evaluation instead of scoring every sample as failed.
"""
import math

from checkers import execute


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_rates(rows):
    """Mean unbiased pass@k over problems, for k in 1, 10, 100 up to the samples per problem."""
    by_task = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(r["ok"])
    n_min = min((len(v) for v in by_task.values()), default=0)
    out = {"problems": len(by_task), "samples": len(rows)}
    for k in (1, 10, 100):
        if 1 <= k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in by_task.values()) / len(by_task)
    return out


def score(run, task, problems, runner, timeout):
    """problems: [(task_id, prompt, stop, program(completion) -> str)]; runs every sample in a sandbox."""
    from evals.sampling import samples_for  # torch: imported here, so data/decontam.py reads problems without it
    execute.check_sandbox(runner)  # runner does too, but only after generation: fail before spending it
    by_stop = {}
    for tid, prompt, stop, _ in problems:  # one generate() call per distinct stop list
        by_stop.setdefault(tuple(stop), []).append((tid, prompt))
    got = {}
    for stop, group in by_stop.items():
        got.update(samples_for(run, task, group, stop, n=run.settings.n_samples))
    program = {tid: fn for tid, _, _, fn in problems}
    prompts = {tid: prompt for tid, prompt, _, _ in problems}
    rows = [{"task": task, "task_id": tid, "prompt": prompts[tid], "completion": c, "truncated": t}
            for tid, cs in got.items() for c, t in cs]
    results = execute.run_many([program[r["task_id"]](r["completion"]) for r in rows],
                               lambda p: runner(p, timeout=timeout), run.settings.workers, desc=f"{task}: execute")
    for r, (ok, detail) in zip(rows, results):
        r.update(ok=ok, detail=detail)
    metrics = pass_rates(rows)
    metrics["failures"] = [f'{r["task_id"]}: {r["detail"]}' for r in rows if not r["ok"]][:5]
    return metrics, rows
