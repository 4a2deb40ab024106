"""nanochat.execution.execute_code and judge_function: normal runs and the accidents the guard must contain
(hangs, memory and fork bombs, shelling out, destructive file calls, secrets, writes outside its directory), at
both isolation levels ("bwrap" needs bubblewrap installed: without it those cases fail). The hostile cases that
only bwrap contains are in tests/test_sandbox.py."""

import os
import time

import pytest

from nanochat import execution
from nanochat.execution import ExecutionResult, execute_code, judge_function


@pytest.fixture(params=["bwrap", "guard"])
def isolation(request):
    return request.param


def test_success_captures_stdout_and_stderr(isolation):
    r = execute_code("import sys\nprint('hello', 6 * 7)\nprint('oops', file=sys.stderr)", isolation=isolation)
    assert r.success and not r.timeout and not r.memory_exceeded and r.error is None
    assert r.isolation == isolation
    assert r.stdout == "hello 42\n" and r.stderr == "oops\n"


def test_exception_and_syntax_error_fail_with_a_message(isolation):
    r = execute_code("def check():\n    assert 1 + 1 == 3, 'bad sum'\ncheck()", isolation=isolation)
    assert not r.success and r.error == "AssertionError: bad sum" and "AssertionError" in r.stderr
    r = execute_code("def f(:\n  pass", isolation=isolation)
    assert not r.success and r.error.startswith("SyntaxError")


def test_early_exit_is_not_success(isolation):
    # a completion must not skip the tests that follow it by exiting with status 0
    for code in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"):
        r = execute_code(code, isolation=isolation)
        assert not r.success and not r.timeout, code


def test_infinite_loop_times_out(isolation):
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.0, isolation=isolation)
    elapsed = time.time() - t0
    assert r.timeout and not r.success and "timed out" in r.error
    assert elapsed < 4.0, elapsed


def test_memory_bomb_is_contained(isolation):
    for code in ("x = bytearray(8 * 1024 ** 3)", "chunks = []\nwhile True:\n    chunks.append(' ' * 10 ** 6)"):
        t0 = time.time()
        r = execute_code(code, timeout=10.0, maximum_memory_bytes=256 * 1024 * 1024, isolation=isolation)
        assert r.memory_exceeded and not r.success and not r.timeout, (code, r)
        assert time.time() - t0 < 5.0


def test_fork_bomb_and_subprocesses_are_refused(isolation):
    cases = [
        "import os\nwhile True:\n    os.fork()",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import subprocess\nsubprocess.run(['echo', 'hi'])",
        "import os\nos.system('echo hacked')",
        "import os\nos.popen('echo hacked').read()",
        "import os\nos.kill(os.getppid(), 9)",
    ]
    for code in cases:
        t0 = time.time()
        r = execute_code(code, timeout=5.0, isolation=isolation)
        assert not r.success and not r.timeout and "PermissionError" in r.error, (code, r)
        assert "hacked" not in r.stdout
        assert time.time() - t0 < 3.0


def test_destructive_file_calls_are_refused(tmp_path, isolation):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    cases = [
        f"import shutil\nshutil.rmtree({str(victim)!r})",
        f"import os\nos.remove({str(victim / 'keep.txt')!r})",
        f"import os\nos.unlink({str(victim / 'keep.txt')!r})",
        f"import os\nos.rename({str(victim / 'keep.txt')!r}, 'x')",
        f"import pathlib\npathlib.Path({str(victim / 'keep.txt')!r}).unlink()",
    ]
    for code in cases:
        r = execute_code(code, isolation=isolation)
        assert not r.success and "PermissionError" in r.error, (code, r)
    assert (victim / "keep.txt").read_text() == "precious"


def test_writes_outside_its_directory_are_refused(tmp_path, isolation):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')"):
        r = execute_code(code, isolation=isolation)
        assert not r.success and "PermissionError" in r.error, (code, r)
        assert not target.exists()
    # relative writes land in its own temporary directory, which is removed afterwards
    r = execute_code("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())", isolation=isolation)
    assert r.success, r
    sandbox_dir = r.stdout.strip()
    assert sandbox_dir != os.getcwd() and not os.path.exists(sandbox_dir)
    assert not os.path.exists("scratch.txt")


def test_environment_secrets_do_not_leak(monkeypatch, isolation):
    monkeypatch.setenv("NANOCHAT_FAKE_API_KEY", "s3cr3t-token-value")
    r = execute_code("import os\nprint(sorted(os.environ.items()))", isolation=isolation)
    assert r.success and "s3cr3t" not in r.stdout and "NANOCHAT_FAKE_API_KEY" not in r.stdout
    # the parent's environment is not readable through /proc either
    r = execute_code("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", isolation=isolation)
    assert not r.success and "PermissionError" in r.error and "s3cr3t" not in r.stdout


def test_stdin_is_closed_and_output_is_capped(isolation):
    r = execute_code("input()", isolation=isolation)
    assert not r.success and r.error.startswith("EOFError")
    r = execute_code("print('x' * (8 * 1024 * 1024))", max_output_bytes=4096, isolation=isolation)
    assert r.success and len(r.stdout) == 4096


def test_children_left_behind_are_killed_at_timeout():
    # guard level: escape the Python-level fork guard (documented as possible: it is not a security boundary)
    # and check that the process-group kill still takes the grandchild down (bwrap: tests/test_sandbox.py)
    isolation = "guard"
    code = ("import sys, time\ndel sys.modules['posix']\nimport posix\npid = posix.fork()\n"
            "if pid == 0:\n    time.sleep(60)\n    posix._exit(0)\nprint(pid, flush=True)\ntime.sleep(60)")
    r = execute_code(code, timeout=1.0, isolation=isolation)
    assert r.timeout
    pid = int(r.stdout.split()[0])
    deadline = time.time() + 5.0
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break  # reaped
        if state == "Z":  # dead, waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"grandchild {pid} still running after the timeout")


# ----------------------------------------------------------------------------------------------------------
# judge_function: the tests run in their own process and call the candidate's function through a pipe

CONTEXT = 'import math\n\ndef stats(xs):\n    """(min, max) of xs, the set of its values, and counts by value."""\n'
TESTS = ("def check(candidate):\n"
         "    assert candidate([3, 1, 3]) == ((1, 3), {1, 3}, {3: 2, 1: 1})\n"
         "    assert type(candidate([2])[0]) is tuple and math.isclose(candidate([0.5])[0][0], 0.5)\n"
         "check(stats)\n")
RIGHT = ("def stats(xs):\n    print('called', flush=True)\n"
         "    return (min(xs), max(xs)), set(xs), {x: xs.count(x) for x in xs}\n")


def test_judge_passes_a_right_function_and_keeps_types(isolation):
    r = judge_function(RIGHT, "stats", TESTS, CONTEXT, isolation=isolation)
    assert r.success and r.error is None and r.isolation == isolation, r
    assert r.stdout.count("called") == 3


@pytest.mark.parametrize("candidate, error", [
    ("def stats(xs):\n    return [min(xs), max(xs)], set(xs), {}\n", "AssertionError"),  # a list is not a tuple
    ("def stats(xs):\n    raise ValueError('nope')\n", "CandidateError: ValueError: nope"),
    ("def stats(xs:\n", "candidate: SyntaxError"),
    ("def other(xs):\n    return 1\n", "KeyError"),
    ("class Eq:\n    def __eq__(self, other):\n        return True\n\ndef stats(xs):\n    return Eq()\n",
     "cannot cross the sandbox boundary"),  # the "always equal" object is not data
])
def test_judge_fails_wrong_functions(candidate, error, isolation):
    r = judge_function(candidate, "stats", TESTS, CONTEXT, isolation=isolation)
    assert isinstance(r, ExecutionResult) and not r.success and not r.timeout, r
    assert error in r.error, r.error


def test_judge_times_out_on_a_hanging_candidate(isolation):
    t0 = time.time()
    r = judge_function("def stats(xs):\n    while True:\n        pass\n", "stats", TESTS, CONTEXT, timeout=1.0,
                       isolation=isolation)
    assert r.timeout and not r.success and time.time() - t0 < 4.0, r


# ----------------------------------------------------------------------------------------------------------
# Where bwrap cannot create its namespaces: the guard, said loudly once; isolation="bwrap" refuses to run


@pytest.fixture
def fresh_probe():
    execution.bwrap_status.cache_clear()
    execution._warn_guard_only.cache_clear()
    yield
    execution.bwrap_status.cache_clear()  # the next tests probe the real bwrap again
    execution._warn_guard_only.cache_clear()


def test_unusable_bwrap_falls_back_to_the_guard_loudly_once(tmp_path, monkeypatch, capsys, fresh_probe):
    fake = tmp_path / "bwrap"  # what bwrap says in a container that forbids namespaces
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for _ in range(2):
        r = execute_code("print(6 * 7)")
        assert r.success and r.stdout == "42\n" and r.isolation == "guard", r
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "Creating new namespace failed" in err and "guard ONLY" in err, err
    with pytest.raises(RuntimeError, match="Creating new namespace failed"):
        execute_code("print(1)", isolation="bwrap")
    assert execution.describe_isolation().startswith("guard (in-process guard only")


def test_missing_bwrap_is_named(monkeypatch, fresh_probe):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="bwrap is not installed .*apt-get install bubblewrap"):
        execute_code("print(1)", isolation="bwrap")


# ----------------------------------------------------------------------------------------------------------
# The seccomp program, run by a small classic-BPF interpreter (the opcodes nanochat/seccomp.py emits)


def _run_bpf(program, nr, arch, arg0=0):
    import struct
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ins = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = struct.unpack("<I", data[k:k + 4])[0]
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_seccomp_program_refuses_the_denied_calls_only(machine):
    import errno
    from nanochat import seccomp
    program = seccomp.bwrap_seccomp_filter(machine)
    column, arch = seccomp.ARCHES[machine]
    eperm, allow = seccomp.RET_ERRNO | errno.EPERM, seccomp.RET_ALLOW
    for numbers in seccomp.DENIED.values():
        assert _run_bpf(program, numbers[column], arch) == eperm
    for nr in (0, 1, 2, 3, 9, 60, 231):  # read/write/open/close/mmap/exit...: allowed (aarch64: other calls, same)
        if nr not in [n[column] for n in seccomp.DENIED.values()] + [seccomp.CLONE[column], seccomp.CLONE3[column]]:
            assert _run_bpf(program, nr, arch) == allow
    clone = seccomp.CLONE[column]
    assert _run_bpf(program, clone, arch, arg0=0x01200011) == allow  # fork()'s flags (SIGCHLD|CHILD_*TID)
    assert _run_bpf(program, clone, arch, arg0=0x003D0F00) == allow  # a thread's flags
    assert _run_bpf(program, clone, arch, arg0=0x10000000 | 0x11) == eperm  # CLONE_NEWUSER
    assert _run_bpf(program, seccomp.CLONE3[column], arch) == seccomp.RET_ERRNO | errno.ENOSYS
    assert _run_bpf(program, 0, 0x40000003) == seccomp.RET_KILL_PROCESS  # another architecture (i386)
    if machine == "x86_64":
        assert _run_bpf(program, 0x40000000 + 1, arch) == eperm  # the x32 ABI
    assert seccomp.bwrap_seccomp_filter("riscv64") is None
