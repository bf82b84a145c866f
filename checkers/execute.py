"""Run model-generated programs in a sandbox (scoring them, pass@k, is evals/execution.py's).

    run_python(program, timeout=10.0, memory_mb=1024) -> (passed, detail)
    run_js(program, timeout=5.0, memory_mb=256)       -> (passed, detail)
    run_many(programs, run_python, workers=4)         -> [(passed, detail), ...]
    check_sandbox(run_python)                         -> None, or raises SandboxError

Every sample runs in a fresh process in its own session. Where the host allows it (root, or
unprivileged user namespaces) that process also gets fresh network, PID and mount namespaces:
no network, it sees only its own processes, and its work dir, /tmp, /var/tmp and /dev/shm are
private, size-capped tmpfs mounts that vanish with it. Where one of /tmp, /var/tmp, /dev/shm holds
the interpreter (a venv under /tmp), that one is bound read-only instead: visible, but not writable.
As root, Python programs additionally run under a fresh unprivileged uid, so the rest of the file
system is read-only to them and RLIMIT_NPROC contains fork bombs. `sandbox_info()` says what is active.
JavaScript runs in a fresh V8 isolate (mini-racer) that exposes no host functions at all.

A sandbox that cannot run programs is an error, never a run of failed samples: before its first sample,
each runner passes a trivial program through the exact chain its samples use (`check_sandbox`), and
raises SandboxError with a one-line message that names the failing part if it does not pass.

Environment:
    SHEIKH_SANDBOX_PYTHON  the interpreter Python samples run with; default: this one, or /usr/bin/python3
                           where the unprivileged uid cannot run this one. When set, it is used as is.
"""

import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm


class SandboxError(RuntimeError):
    """The sandbox itself cannot run programs: an error to report, never a sample's failure."""


# -----------------------------------------------------------------------------
# the process sandbox

_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: private in the sandbox, or read-only
_SETUP_FAILED = 97  # _ns_setup's exit code when a mount fails


def _ns_setup(readonly):
    """The script run inside the new mount namespace before the program.

    Private dirs become size-capped tmpfs mounts, so a program can neither fill the disk nor leave files
    behind; the `readonly` ones keep their files (the interpreter) but take no writes. The work dir is
    mounted last, as it may lie inside one of them.
    """
    steps = [f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" if d in readonly
             else f"mount -t tmpfs -o size=64m tmpfs {d}" for d in _SHARED_DIRS]
    steps.append('mkdir -p "$PWD" && mount -t tmpfs -o size=64m tmpfs "$PWD" && cd "$PWD"')
    return " && ".join(steps) + f' || exit {_SETUP_FAILED}; exec "$@"'


def _works(cmd, cwd=None):
    try:
        return subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Each run gets its own unused uid: no file outside its work dir is writable by it, and RLIMIT_NPROC
# (a per-uid count, ignored for root) stops a fork bomb without starving the samples running beside it.
_UID_BASE = 1_900_000_000  # far above any real account; runs use _UID_BASE + 1 ... _UID_BASE + 100000
_uids = itertools.count()


def _drop_to(uid):
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


@functools.cache
def _unshare():
    """unshare into fresh network, PID and mount namespaces, or () where the host does not allow it."""
    ns = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
    if os.geteuid() != 0:
        ns.append("--map-root-user")  # an unprivileged user namespace, where the kernel allows it
    with tempfile.TemporaryDirectory() as work:  # _ns_setup mounts over the cwd
        ok = shutil.which("unshare") and _works(ns + ["sh", "-c", _ns_setup(()), "sh", "true"], cwd=work)
    return tuple(ns) if ok else ()


def _interpreter_paths(python):
    """What python reads at startup: itself and its prefixes (a venv's and its base install's)."""
    code = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"
    try:
        r = subprocess.run([python, "-I", "-c", code], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        prefixes = json.loads(r.stdout) if r.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        prefixes = []  # then it does not run at all, and check_sandbox says so
    return [python, *prefixes]


@functools.cache
def _mini_racer_path():
    """The sys.path entry holding py_mini_racer, which the worker's `python -I` may not search (user site)."""
    spec = importlib.util.find_spec("py_mini_racer")
    return (str(Path(spec.origin).parent.parent),) if spec else ()


def _holding(paths):
    """Those of _SHARED_DIRS that hold one of paths (as named or resolved), so must stay visible."""
    forms = {Path(f(p)) for p in paths for f in (os.path.abspath, os.path.realpath)}
    return [d for d in _SHARED_DIRS if any(p.is_relative_to(os.path.realpath(d)) for p in forms)]


@functools.cache
def sandbox_info():
    """Probe once which isolation this host supports; validate.py puts this dict in its report."""
    python = os.environ.get("SHEIKH_SANDBOX_PYTHON")
    drop = os.geteuid() == 0 and bool(shutil.which("setpriv"))
    if python:  # the user's choice, used as is: check_sandbox says if the uid cannot run it
        python = shutil.which(python) or python
    else:
        python = sys.executable
        # our interpreter may live where others cannot read its stdlib (/root/.pyenv); then use the system one.
        # Compare prefixes: a binary that runs may still find another libpython and stdlib than ours.
        check = f"import sys; sys.exit((sys.prefix, sys.base_prefix) != {(sys.prefix, sys.base_prefix)!r})"
        if drop and not _works(_drop_to(_UID_BASE) + [python, "-I", "-c", check]):
            if _works(_drop_to(_UID_BASE) + ["/usr/bin/python3", "-I", "-c", "pass"]):
                python = "/usr/bin/python3"
            else:
                drop = False
    isolated = bool(_unshare())
    needs = {"python": _interpreter_paths(python), "js": _interpreter_paths(sys.executable) + list(_mini_racer_path())}
    return {"network_isolated": isolated, "pid_namespace": isolated, "private_tmp": isolated,
            "unprivileged_uid": drop, "rlimits": bool(shutil.which("prlimit")), "python": python,
            "readonly_dirs": {k: _holding(v) if isolated else [] for k, v in needs.items()}}


@dataclasses.dataclass(frozen=True)
class _Job:
    """One sandboxed run: an interpreter reading the program on stdin, and the layers around it."""
    argv: tuple
    stdin: str
    timeout: float
    rlimits: tuple
    readonly: tuple  # which of _SHARED_DIRS to bind read-only rather than mount private
    namespaces: bool = True
    drop_uid: bool = False


def _tail(f, n=300):
    f.seek(0)
    lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][-n:] if lines else ""


def _sandboxed(job):
    """Run job isolated; return (returncode or None on timeout, last stdout line, last stderr line)."""
    info = sandbox_info()
    uid = _UID_BASE + 1 + next(_uids) % 100_000 if job.drop_uid and info["unprivileged_uid"] else None
    cmd = ["prlimit", *job.rlimits, "--"] if job.rlimits and info["rlimits"] else []
    if job.namespaces and _unshare():
        cmd += [*_unshare(), "sh", "-c", _ns_setup(job.readonly), "sh"]
    cmd += (_drop_to(uid) if uid else []) + list(job.argv)
    with tempfile.TemporaryDirectory(prefix="sheikh-exec-") as work, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if uid:
            os.chown(work, uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        p = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                             start_new_session=True)
        try:
            p.communicate(job.stdin.encode(), timeout=job.timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # the whole group; with a PID namespace its init dies too, which kills everything inside
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        return rc, _tail(out), _tail(err)


def _describe(rc, timeout, err):
    if rc is None:
        return f"timeout after {timeout:g}s"
    if rc < 0:  # killed by a signal, e.g. SIGXCPU from the CPU rlimit
        return f"killed by {signal.Signals(-rc).name}" + (f": {err}" if err else "")
    return err or f"exit code {rc}"


def _why_not(job):
    """None if job exits 0 printing "passed" (what the probes print), else a one-line reason."""
    try:
        rc, out, err = _sandboxed(job)
    except OSError as e:
        return e.strerror or str(e)
    if rc == 0 and out == "passed":
        return None
    return (out if rc == 0 else _describe(rc, job.timeout, err)) or f"exit code {rc}"


@functools.cache  # success only: a failure raises, so the next call probes again
def check_sandbox(runner):
    """Pass a trivial program through runner's (run_python's or run_js's) exact sandbox chain.

    Returns None if it passes; else retries the chain a layer at a time (interpreter alone, + rlimits,
    + namespaces and mounts, + uid drop) and raises SandboxError naming the first layer that fails.
    """
    job, fix = _PROBES[runner]()
    why = _why_not(job)
    if why is None:
        return
    what = f"the interpreter {job.argv[0]}"
    layers = [(dataclasses.replace(job, rlimits=(), namespaces=False, drop_uid=False), "does not run", fix),
              (dataclasses.replace(job, namespaces=False, drop_uid=False),
               f"cannot start under the rlimits {' '.join(job.rlimits)}", "raise memory_mb"),
              (dataclasses.replace(job, drop_uid=False), "cannot run in the sandbox's namespaces and mounts",
               "keep it and its packages outside /tmp, /var/tmp and /dev/shm"),
              (job, "cannot run as the unprivileged sandbox uid",
               "make it readable by all users or set SHEIKH_SANDBOX_PYTHON")]
    for step, part, hint in layers:
        if (step_why := _why_not(step)) is not None:
            raise SandboxError(f"sandbox cannot start: {what} {part} ({step_why}); {hint}")
    raise SandboxError(f"sandbox cannot start: {what} failed the probe ({why}), then passed it layer by layer")


def _run(runner, job):
    """_sandboxed for a sample, after check_sandbox; failures of the sandbox itself raise SandboxError."""
    check_sandbox(runner)
    try:
        rc, out, err = _sandboxed(job)
    except OSError as e:  # nothing of the program ran
        raise SandboxError(f"sandbox cannot start: {e}") from e
    # the exits of a failed mount or exec, which a program may also choose: the probe tells them apart
    if rc in (_SETUP_FAILED, 126, 127):
        check_sandbox.cache_clear()
        check_sandbox(runner)
    return rc, out, err


# -----------------------------------------------------------------------------
# Python

# Not the security boundary (ctypes gets around it), but makes a program that reaches for processes
# fail loudly instead of passing; the OS sandbox above is what contains it.
_PY_GUARD = """\
import os as _os, subprocess as _sp
def _blocked(*a, **k): raise PermissionError("process creation is disabled in the sandbox")
for _n in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp", "execvp",
           "execvpe", "spawnl", "spawnv", "spawnve", "spawnvp", "posix_spawn", "posix_spawnp", "kill", "killpg"):
    if hasattr(_os, _n): setattr(_os, _n, _blocked)
_sp.Popen = _blocked
del _os, _sp, _n, _blocked
"""


def _python_job(program, timeout, memory_mb):
    rlimits = (f"--as={memory_mb << 20}", f"--cpu={math.ceil(timeout) + 1}", "--nproc=64", f"--fsize={16 << 20}")
    info = sandbox_info()
    argv = (info["python"], "-I", "-B", "-")  # program on stdin, nothing from the environment
    return _Job(argv, _PY_GUARD + program, timeout, rlimits, tuple(info["readonly_dirs"]["python"]), drop_uid=True)


def run_python(program, timeout=10.0, memory_mb=1024):
    """Run a Python program (e.g. prompt + completion + tests); it passes if it exits with status 0."""
    rc, _, err = _run(run_python, _python_job(program, timeout, memory_mb))
    return (True, "passed") if rc == 0 else (False, _describe(rc, timeout, err))


# -----------------------------------------------------------------------------
# JavaScript

# Enough of node:assert for MultiPL-E style tests. The isolate has no require, process or fs.
_ASSERT_SHIM = r"""
var require = (function () {
  class AssertionError extends Error { constructor(m) { super(m); this.name = "AssertionError"; } }
  const show = (v) => { try { return JSON.stringify(v); } catch (e) { return String(v); } };
  function deep(a, b, strict) {
    if (strict ? Object.is(a, b) : (a == b || (a !== a && b !== b))) return true;
    if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
    if (strict && Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
    if (Array.isArray(a) !== Array.isArray(b)) return false;
    if (a instanceof Date) return b instanceof Date && a.getTime() === b.getTime();
    if (a instanceof RegExp) return b instanceof RegExp && String(a) === String(b);
    if (a instanceof Map || a instanceof Set) {
      if (!(b instanceof a.constructor) || a.size !== b.size) return false;
      const bs = [...b];
      return [...a].every((x) => bs.some((y) => deep(x, y, strict)));
    }
    const ka = Object.keys(a), kb = Object.keys(b);
    return ka.length === kb.length &&
      ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deep(a[k], b[k], strict));
  }
  function check(cond, message, fallback) {
    if (cond) return;
    if (message instanceof Error) throw message;
    throw new AssertionError(message || fallback);
  }
  const assert = (v, m) => check(v, m, `${show(v)} == true`);
  Object.assign(assert, {
    AssertionError,
    ok: assert,
    equal: (a, b, m) => check(a == b || (a !== a && b !== b), m, `${show(a)} == ${show(b)}`),
    notEqual: (a, b, m) => check(a != b, m, `${show(a)} != ${show(b)}`),
    strictEqual: (a, b, m) => check(Object.is(a, b), m, `${show(a)} === ${show(b)}`),
    notStrictEqual: (a, b, m) => check(!Object.is(a, b), m, `${show(a)} !== ${show(b)}`),
    deepEqual: (a, b, m) => check(deep(a, b, false), m, `${show(a)} deepEqual ${show(b)}`),
    notDeepEqual: (a, b, m) => check(!deep(a, b, false), m, `${show(a)} notDeepEqual ${show(b)}`),
    deepStrictEqual: (a, b, m) => check(deep(a, b, true), m, `${show(a)} deepStrictEqual ${show(b)}`),
    notDeepStrictEqual: (a, b, m) => check(!deep(a, b, true), m, `${show(a)} notDeepStrictEqual ${show(b)}`),
    fail: (m) => check(false, m, "Failed"),
    throws(fn, expected, m) {
      try { fn(); } catch (e) {
        if (typeof expected === "function" && expected.prototype !== undefined)
          check(e instanceof expected, m, `wrong error: ${e}`);
        else if (expected instanceof RegExp) check(expected.test(String(e)), m, `wrong error: ${e}`);
        return;
      }
      check(false, typeof expected === "string" ? expected : m, "Missing expected exception.");
    },
    doesNotThrow(fn, m) { try { fn(); } catch (e) { check(false, m, `Got unwanted exception: ${e}`); } },
  });
  assert.strict = assert;
  const modules = { "assert": assert, "node:assert": assert, "assert/strict": assert, "node:assert/strict": assert };
  return (name) => {
    if (!(name in modules)) throw new Error(`require('${name}') is not available in the sandbox`);
    return modules[name];
  };
})();
"""

# Runs in the worker process: one fresh isolate, the program, one result line, and no teardown noise.
_JS_WORKER = """\
import os, sys
sys.path[:0] = sys.argv[4:]  # where we found mini-racer: -I skips the user site and PYTHONPATH
from py_mini_racer import MiniRacer
shim, timeout, memory = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:
    mr = MiniRacer()
    mr.eval(shim)
    mr.eval(sys.stdin.read(), timeout_sec=timeout, max_memory=memory)
    msg = "passed"
except Exception as e:
    msg = type(e).__name__ + ": " + (str(e).splitlines() or [""])[0]
sys.stdout.write(msg + "\\n"); sys.stdout.flush(); os._exit(0)
"""


def _js_job(program, timeout, memory_mb):
    rlimits = (f"--data={(memory_mb + 640) << 20}", f"--cpu={math.ceil(timeout) + 5}", f"--fsize={1 << 20}")
    argv = (sys.executable, "-I", "-c", _JS_WORKER, _ASSERT_SHIM, str(timeout), str(memory_mb << 20),
            *_mini_racer_path())
    # no uid drop: mini-racer lives in our site-packages, and the isolate has no host access anyway
    return _Job(argv, program, timeout + 10, rlimits, tuple(sandbox_info()["readonly_dirs"]["js"]))


def run_js(program, timeout=5.0, memory_mb=256):
    """Run a JavaScript program in a fresh V8 isolate; it passes if it finishes without throwing.

    memory_mb caps the V8 heap; array buffers live outside the heap, so the worker process also gets
    RLIMIT_DATA (V8 itself reserves about 512 MiB of writable address space up front).
    """
    rc, out, err = _run(run_js, _js_job(program, timeout, memory_mb))
    if rc == 0 and out == "passed":
        return True, "passed"
    if rc == 0 and out.startswith("JSTimeoutException"):
        return False, f"timeout after {timeout:g}s"
    if rc == 0 and out.startswith("JSOOMException"):
        return False, f"out of memory (V8 heap limit {memory_mb} MiB)"
    return False, out if rc == 0 else _describe(rc, timeout + 10, err)


# check_sandbox's trivial programs at each runner's defaults, and the fix when the interpreter alone fails
_PROBES = {
    run_python: lambda: (_python_job("print('passed')", *run_python.__defaults__),
                         "set SHEIKH_SANDBOX_PYTHON to a python that runs"),
    run_js: lambda: (_js_job("1 + 1", *run_js.__defaults__), "install mini-racer for it (pip install mini-racer)"),
}


# -----------------------------------------------------------------------------
# running many


def run_many(programs, runner=run_python, workers=4, desc="execute"):
    """Run programs in parallel sandboxes (threads only wait on subprocesses); results in input order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(runner, p) for p in programs]
        try:
            return [f.result() for f in tqdm(futures, desc=desc, leave=False)]
        except BaseException:  # e.g. SandboxError: start no more programs
            pool.shutdown(wait=False, cancel_futures=True)
            raise
