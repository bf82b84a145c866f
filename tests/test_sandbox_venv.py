"""Python kept where users keep it: the sandbox runs samples from a venv under the temp dir and finds a
mini-racer that `python -I` would not, and an interpreter it cannot run stops validate.py with an error."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import py_mini_racer
import pytest

from checkers.execute import sandbox_info
from evals import humaneval, js_exec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_venv(base, python, *flags):
    """A venv under the system temp dir, where a private /tmp would hide it; others may read it, as in /tmp.
    With --system-site-packages it also sees this interpreter's packages: when this interpreter is itself a venv's,
    the new venv's "system" is the base interpreter's, which lacks them, so a .pth file names them."""
    d = Path(tempfile.mkdtemp(prefix="sheikh-venv-"))
    d.chmod(0o755)
    subprocess.run([python, "-m", "venv", "--without-pip", *flags, str(d / "venv")], check=True)
    base.append(d)
    if "--system-site-packages" in flags:
        site = subprocess.run([str(d / "venv" / "bin" / "python"), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
        ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (Path(site.stdout.strip()) / "sheikh-parent.pth").write_text("".join(f"{p}\n" for p in ours))
    return d / "venv" / "bin" / "python"


@pytest.fixture(scope="module")
def venvs():
    made = []
    yield lambda python, *flags: make_venv(made, python, *flags)
    for d in made:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def reference_samples(tmp_path_factory):
    """The first 20 HumanEval and JS problems, each with its reference solution as the completion."""
    path = tmp_path_factory.mktemp("samples") / "samples.jsonl"
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in humaneval.problems()[:20]]
    rows += [{"task_id": p["name"], "completion": p["canonical_solution"]}
             for p in js_exec.load(js_exec.JS_PROBLEMS)[:20]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def validate(python, samples, out, env=ENV):
    return subprocess.run([str(python), "validate.py", "--samples", str(samples), "--tasks", "humaneval", "js-exec",
                           "--limit", "20", "--workers", "2", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_in(python, code, env=ENV):
    r = subprocess.run([str(python), "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_validate_from_a_venv_in_the_temp_dir_passes_reference_solutions(venvs, reference_samples, tmp_path):
    python = venvs(sys.executable, "--system-site-packages")  # sees torch and mini-racer, also from inside a venv
    r = validate(python, reference_samples, tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["tasks"]
    assert tasks["humaneval"]["pass@1"] == 1.0, tasks["humaneval"]
    assert tasks["js-exec"]["pass@1"] == 1.0, tasks["js-exec"]


def test_python_samples_run_by_a_venv_in_the_temp_dir(venvs):
    # a venv of the interpreter the sandbox uid can run (ours, or /usr/bin/python3 as root under pyenv)
    python = venvs(sandbox_info()["python"])
    env = {**ENV, "SHEIKH_SANDBOX_PYTHON": str(python)}
    out = run_in(sys.executable, f"""
import json, sys
from checkers import execute
execute.check_sandbox(execute.run_python)
from evals import humaneval
problems = humaneval.problems()[:5]
good = [execute.run_python(humaneval.program(p, p["canonical_solution"])) for p in problems]
print(json.dumps({{"info": execute.sandbox_info(), "good": good,
                  "prefix": execute.run_python("import sys\\nassert sys.prefix == {str(python.parent.parent)!r}\\n"),
                  "write": execute.run_python("open({str(python.parent / 'x')!r}, 'w')\\n")}}))
""", env)
    got = json.loads(out)
    shared = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if str(python).startswith(os.path.realpath(d) + "/")]
    assert got["info"]["python"] == str(python) and got["info"]["readonly_dirs"]["python"] == shared
    assert got["good"] == [[True, "passed"]] * 5
    assert got["prefix"] == [True, "passed"]
    assert not got["write"][0] and "Read-only file system" in got["write"][1], got["write"]


def test_js_finds_mini_racer_outside_the_workers_isolated_path(venvs):
    # no system site packages: our packages come from PYTHONPATH, which the worker's `python -I` ignores,
    # as it ignores a `pip install --user` site
    python = venvs(sys.executable)
    site = str(Path(py_mini_racer.__file__).parent.parent)
    env = {**ENV, "PYTHONPATH": site}
    out = run_in(python, """
from checkers import execute
execute.check_sandbox(execute.run_js)
from evals import js_exec
p = js_exec.load(js_exec.JS_PROBLEMS)[0]
print(execute.run_js(js_exec.program(p, p["canonical_solution"])))
""", env)
    assert out.strip() == "(True, 'passed')"


@pytest.mark.skipif(not sandbox_info()["unprivileged_uid"], reason="needs root to drop privileges")
def test_validate_stops_with_one_line_error_when_the_sandbox_cannot_run(tmp_path, reference_samples):
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    python = private / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    r = validate(sys.executable, reference_samples, tmp_path / "out", {**ENV, "SHEIKH_SANDBOX_PYTHON": str(python)})
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f"error: sandbox cannot start: the interpreter {python} cannot run as the unprivileged")
    assert not (tmp_path / "out" / "report.json").exists()
