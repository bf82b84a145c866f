"""The sandboxes in checkers/execute.py: correct programs pass, hostile ones fail and change nothing."""

import math
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from checkers.execute import SandboxError, check_sandbox, run_js, run_python, sandbox_info
from evals.execution import pass_at_k

ROOT = Path(__file__).resolve().parent.parent
unprivileged = pytest.mark.skipif(not sandbox_info()["unprivileged_uid"], reason="needs root to drop privileges")
netns = pytest.mark.skipif(not sandbox_info()["network_isolated"], reason="no network namespace on this host")


# --- pass@k -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 2),
                                   (100, 7, 10), (200, 50, 100), (5, 5, 5)])
def test_pass_at_k_matches_closed_form(n, c, k):
    expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_1_is_fraction_correct_and_bad_input_is_rejected():
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)


# --- Python -------------------------------------------------------------------------------------

def test_python_pass_and_fail():
    assert run_python("assert sum(range(5)) == 10\n") == (True, "passed")
    ok, detail = run_python("def f():\n    return 1\nassert f() == 2, 'f is wrong'\n")
    assert not ok and detail == "AssertionError: f is wrong"


def test_python_workdir_is_writable_and_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_python("open('out.txt', 'w').write('x' * 1000)\nassert open('out.txt').read() == 'x' * 1000\n")[0]
    assert list(tmp_path.iterdir()) == []


def test_python_disk_writes_are_capped():
    if not sandbox_info()["private_tmp"]:
        pytest.skip("no mount namespace on this host")
    ok, detail = run_python("for i in range(20):\n    open(f'f{i}', 'wb').write(b'x' * (10 << 20))\n")
    assert not ok and "No space left on device" in detail


@unprivileged
def test_python_cannot_write_project_dir():
    target = ROOT / f"pwned-{uuid.uuid4().hex}"
    ok, detail = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    # a checkout under /tmp is hidden by the sandbox's private /tmp, or read-only where the interpreter is there too
    if not str(ROOT).startswith("/tmp/"):
        refusal = "PermissionError"
    else:
        readonly = "/tmp" in sandbox_info()["readonly_dirs"]["python"]
        refusal = "Read-only file system" if readonly else "FileNotFoundError"
    assert not ok and refusal in detail, detail
    assert not target.exists()


def test_python_writes_to_tmp_stay_private():
    if not sandbox_info()["private_tmp"]:
        pytest.skip("no mount namespace on this host")
    target = Path("/tmp") / f"pwned-{uuid.uuid4().hex}"
    ok, detail = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    if "/tmp" in sandbox_info()["readonly_dirs"]["python"]:  # our interpreter lives there: visible, not writable
        assert not ok and "Read-only file system" in detail, detail
    else:
        assert ok, detail
    assert not target.exists()


def test_python_os_system_is_a_failure_and_changes_nothing():
    target = ROOT / f"pwned-{uuid.uuid4().hex}"
    ok, detail = run_python(f"import os\nos.system('touch {target}')\n")
    assert not ok and "process creation is disabled" in detail
    assert not target.exists()


@unprivileged
def test_python_shell_via_ctypes_still_cannot_write():
    # gets around the os.system guard; the uid drop is what stops it
    target = ROOT / f"pwned-{uuid.uuid4().hex}"
    ok, _ = run_python(f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {target}') == 0\n")
    assert not ok
    assert not target.exists()


@netns
def test_python_cannot_reach_host_socket():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        ok, detail = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert not ok and ("unreachable" in detail or "refused" in detail), detail
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


def test_python_infinite_loop_times_out():
    t0 = time.time()
    ok, detail = run_python("while True:\n    pass\n", timeout=1.5)
    assert not ok and detail == "timeout after 1.5s"
    assert time.time() - t0 < 5


def test_python_10gb_allocation_fails_fast():
    t0 = time.time()
    ok, detail = run_python("x = bytearray(10 * 1024 ** 3)\n", memory_mb=512)
    assert not ok and "MemoryError" in detail
    assert time.time() - t0 < 5


def test_python_fork_bomb_is_contained():
    # ctypes fork gets past the guard; the pid limit / namespace and the group kill contain it
    name = f"bomb{uuid.uuid4().hex[:8]}"
    program = ("import ctypes\nlibc = ctypes.CDLL(None)\n"
               f"libc.prctl(15, {name.encode()!r}, 0, 0, 0)\n"  # PR_SET_NAME, so we can look for survivors
               "while True:\n    libc.fork()\n")
    t0 = time.time()
    ok, _ = run_python(program, timeout=2)
    assert not ok
    assert time.time() - t0 < 10
    alive = lambda: [p for p in psutil.process_iter(["name", "status"])
                     if p.info["name"] == name and p.info["status"] != psutil.STATUS_ZOMBIE]
    for _ in range(20):  # the kernel tears the namespace down asynchronously
        if not alive():
            break
        time.sleep(0.1)
    assert alive() == []


# --- the sandbox itself: its failures are errors, never failed samples ----------------------------

@pytest.fixture
def sandbox_python(monkeypatch):
    """use(path): Python samples run with path (SHEIKH_SANDBOX_PYTHON); the cached probes forget it afterwards."""
    def use(path):
        monkeypatch.setenv("SHEIKH_SANDBOX_PYTHON", str(path))
        sandbox_info.cache_clear()
        check_sandbox.cache_clear()
    yield use
    sandbox_info.cache_clear()
    check_sandbox.cache_clear()


def script(path, body, mode=0o755):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def test_probe_passes_for_both_runners():
    check_sandbox.cache_clear()
    assert check_sandbox(run_python) is None
    assert check_sandbox(run_js) is None


@unprivileged
def test_interpreter_the_sandbox_uid_cannot_run_is_an_error_naming_the_uid_drop(tmp_path, sandbox_python):
    # works for root, and in the namespaces (it is under /tmp), but the sandbox uid cannot read it
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    python = script(private / "python", f'exec {sys.executable} "$@"')
    sandbox_python(python)
    with pytest.raises(SandboxError) as e:
        check_sandbox(run_python)
    msg = str(e.value)
    assert msg.startswith(f"sandbox cannot start: the interpreter {python} cannot run as the unprivileged sandbox uid")
    assert "Permission denied" in msg and msg.endswith("make it readable by all users or set SHEIKH_SANDBOX_PYTHON")
    assert "\n" not in msg
    with pytest.raises(SandboxError, match="unprivileged sandbox uid"):
        run_python("pass\n")  # a sample is never scored on a sandbox that cannot run it


def test_interpreter_that_does_not_run_is_an_error_naming_it(tmp_path, sandbox_python):
    python = script(tmp_path / "python", "echo 'no stdlib here' >&2; exit 1")
    sandbox_python(python)
    with pytest.raises(SandboxError) as e:
        run_python("pass\n")
    assert str(e.value) == (f"sandbox cannot start: the interpreter {python} does not run (no stdlib here); "
                            "set SHEIKH_SANDBOX_PYTHON to a python that runs")


def test_interpreter_vanishing_mid_run_is_an_error(sandbox_python):
    # a world-readable link to the interpreter the sandbox uses: passes the probe, then disappears
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        python = Path(d) / "python"
        python.symlink_to(sandbox_info()["python"])
        sandbox_python(python)
        assert run_python(f"import sys\nassert sys.executable == {str(python)!r}\n") == (True, "passed")
        python.unlink()
        with pytest.raises(SandboxError, match=f"the interpreter {python} does not run"):
            run_python("pass\n")


@pytest.mark.parametrize("code", [97, 126, 127])
def test_program_choosing_the_sandbox_tools_exit_codes_is_its_own_failure(code):
    # the codes of a failed mount or exec; the probe still passes, so the sample failed, not the sandbox
    assert run_python(f"import sys\nsys.exit({code})\n") == (False, f"exit code {code}")


# --- JavaScript ---------------------------------------------------------------------------------

def test_js_assert_shim():
    program = """
const assert = require('node:assert');
const strict = require('assert');
assert.strictEqual(1 + 1, 2);
assert.notStrictEqual(1, '1');
assert.equal(1, '1');
assert.deepEqual([1, {a: '2'}], [1, {a: 2}]);
assert.deepStrictEqual({a: [1, 2], b: new Set([3])}, {a: [1, 2], b: new Set([3])});
assert.notDeepStrictEqual([1], ['1']);
assert.ok(true);
assert(NaN !== NaN);
assert.throws(() => { throw new TypeError('x'); }, TypeError);
assert.throws(() => strict.deepStrictEqual([1], ['1']), assert.AssertionError);
assert.throws(() => assert.strictEqual(1, 2), /1 === 2/);
"""
    assert run_js(program) == (True, "passed")
    ok, detail = run_js("require('node:assert').deepStrictEqual([1, 2], [1, 3]);")
    assert not ok and "AssertionError: [1,2] deepStrictEqual [1,3]" in detail


def test_js_no_host_access_and_fresh_isolate():
    program = """
for (const name of ['process', 'fetch', 'XMLHttpRequest', 'Deno', 'Bun', 'importScripts', 'leaked'])
  if (typeof globalThis[name] !== 'undefined') throw new Error('host object: ' + name);
globalThis.leaked = 1;
"""
    assert run_js(program) == (True, "passed")
    assert run_js(program) == (True, "passed")  # the global from the first run is gone
    ok, detail = run_js("require('fs').readFileSync('/etc/passwd')")
    assert not ok and "require('fs') is not available" in detail
    assert not run_js("function f( {")[0]


def test_js_infinite_loop_times_out():
    t0 = time.time()
    assert run_js("while (true) {}", timeout=1) == (False, "timeout after 1s")
    assert time.time() - t0 < 8


@pytest.mark.parametrize("program", [
    "const a = []; while (true) a.push(new Array(100000).fill(1.5));",       # V8 heap
    "const a = []; while (true) a.push(new Float64Array(1 << 21).fill(1));",  # off-heap buffers
])
def test_js_unbounded_allocation_fails(program):
    t0 = time.time()
    ok, detail = run_js(program, memory_mb=128)
    assert not ok and ("memory" in detail or "allocation failed" in detail), detail
    assert time.time() - t0 < 10
