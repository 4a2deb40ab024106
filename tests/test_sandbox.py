"""The adversarial suite for nanochat.execution under bubblewrap: one test per escape class of issue 11 (those that
beat the in-process guard) plus those the guard already held. Every call asks for isolation="bwrap", so without a
working bubblewrap each test FAILS (RuntimeError), never skips. Each test checks that the attack had no effect
outside (marker files never appear, files outside survive, no listener is reached, no process outlives the run)
and that execute_code returns within its timeout plus a small margin, leaving this process alive.

Attack programs print what they managed (WROTE, UNLINKED, CONNECTED, ...) and what was refused, so a failure
message shows what the attack saw. A broken sandbox makes them refuse to attack (SAFETY) and the tests fail."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from nanochat.execution import execute_code, judge_function
from tasks.humaneval import run_completion

MARGIN = 3.0  # seconds allowed beyond the timeout: interpreter start, bwrap, teardown on a busy 2-core machine
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the escape that beats the guard: the real posix module, with fork/system/unlink/kill/setsid intact
POSIX = "import sys\ndel sys.modules['posix']\nimport posix\n"

# Every attack starts by checking that it IS sandboxed (it sees neither this repository nor more than a couple
# of processes) and refuses to run otherwise: a broken sandbox fails these tests without harming the machine.
NOT_SANDBOXED = "NOT SANDBOXED: attack not run"
SAFETY = f"""import os as _os, sys as _sys
if _os.path.exists({os.path.join(REPO, "README.md")!r}) or sum(p.isdigit() for p in _os.listdir('/proc')) > 3:
    print({NOT_SANDBOXED!r}, flush=True)
    _sys.exit(3)
"""


def run(code, timeout=5.0, **kwargs):
    """execute_code under bwrap (after SAFETY), asserting it came back in time and this process is fine."""
    t0 = time.monotonic()
    r = execute_code(SAFETY + code, timeout=timeout, isolation="bwrap", **kwargs)
    elapsed = time.monotonic() - t0
    assert r.isolation == "bwrap" and NOT_SANDBOXED not in r.stdout, r
    assert elapsed < timeout + MARGIN, f"execute_code took {elapsed:.1f}s for timeout={timeout}: {r}"
    return r


def processes_with(token):
    """Host pids whose command line contains token (a sandboxed process that survived would show up)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_no_survivors(token, wait=2.0):
    deadline = time.monotonic() + wait
    while processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(token) == [], f"sandboxed processes still running: {processes_with(token)}"


def sleeper(token, seconds=30):
    """Python source that replaces the current process by a long sleep carrying `token` in its command line."""
    return f"posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep({seconds})', {token!r}])"


# ----------------------------------------------------------------------------------------------------------
# Files: _io.open / io.FileIO / the harness's own unguarded open, writing outside and reading the user's files


@pytest.mark.parametrize("opener", [
    "import _io\nopen_ = lambda p: _io.open(p, 'w')",
    "import io\nopen_ = lambda p: io.FileIO(p, 'w')",
    "import sys\n_o = sys._getframe(1).f_globals['_open']\nopen_ = lambda p: _o(p, 'w')",  # the harness's io.open
])
def test_writes_outside_the_work_dir_never_land(tmp_path, opener):
    targets = [str(tmp_path / "marker"), os.path.join(sys.base_prefix, f"marker_{uuid.uuid4().hex}"), "/marker",
               "/usr/marker"]
    code = opener + f"\nfor p in {targets!r}:\n    try:\n        open_(p).write('x')\n        print('WROTE', p)\n" \
                    "    except OSError as e:\n        print('refused', p, e)\n"
    try:
        r = run(code)
        assert r.success, r
        assert "WROTE" not in r.stdout and r.stdout.count("refused") == len(targets), r.stdout
    finally:
        leaked = [p for p in targets if os.path.exists(p)]
        for p in leaked:
            os.remove(p)
    assert leaked == []


def test_the_users_files_are_invisible(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-file-content")
    paths = [str(secret), os.path.abspath(__file__), os.path.join(REPO, "README.md"), "/etc/passwd"]
    code = "import _io, os\n" + f"for p in {paths!r}:\n" + \
           "    try:\n        print('SAW', p, os.listdir(p) if os.path.isdir(p) else _io.open(p).read())\n" \
           "    except OSError as e:\n        print('hidden', p, type(e).__name__)\n"
    r = run(code)
    assert "SAW" not in r.stdout and "s3cr3t" not in r.stdout and r.stdout.count("hidden") == len(paths), r.stdout


SNOOP = """
import _io, json, os
pids = [p for p in os.listdir('/proc') if p.isdigit()]
environs = []
for pid in pids + [str(os.getppid())]:
    try:
        environs.append(_io.open('/proc/' + pid + '/environ', 'rb').read().decode(errors='replace'))
    except OSError as e:
        environs.append(type(e).__name__)
print(json.dumps({'env': dict(os.environ), 'pids': pids, 'environs': environs}))
"""
EVALUATOR = """
import json, os, sys
from nanochat.execution import execute_code
r = execute_code(sys.argv[1], isolation='bwrap')
print(json.dumps({'success': r.success, 'stdout': r.stdout, 'isolation': r.isolation, 'pid': os.getpid()}))
"""


def test_evaluator_environment_secrets_do_not_leak():
    # an evaluator process with a secret in its environment (where /proc/<pid>/environ shows it): it reaches
    # neither the sandbox's environment, nor /proc/<parent>/environ, nor any /proc entry the sandbox can see
    env = dict(os.environ, NANOCHAT_FAKE_API_KEY="s3cr3t-token-value", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", EVALUATOR, SAFETY + SNOOP], env=env, capture_output=True, text=True,
                          timeout=30, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["isolation"] == "bwrap" and out["success"], out
    assert "s3cr3t" not in out["stdout"] and "NANOCHAT_FAKE_API_KEY" not in out["stdout"]
    seen = json.loads(out["stdout"])
    assert "PYTHONPATH" not in seen["env"]  # nothing of the parent's environment, not only the secret
    assert str(out["pid"]) not in seen["pids"] and len(seen["pids"]) < 5, seen["pids"]  # only its own processes


# ----------------------------------------------------------------------------------------------------------
# The real posix module: fork, system, unlink, kill


def test_real_posix_system_and_unlink_touch_nothing_outside(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    marker = tmp_path / "system_marker"
    code = POSIX + f"""
rc = posix.system('echo hacked; touch {marker}; rm -f {victim}')
print('system rc', rc)
try:
    posix.unlink({str(victim)!r})
    print('UNLINKED')
except OSError as e:
    print('refused', e)
"""
    r = run(code)
    assert "UNLINKED" not in r.stdout and "refused" in r.stdout, r.stdout
    assert victim.read_text() == "precious" and not marker.exists()


def test_real_posix_kill_cannot_reach_the_evaluator():
    me = os.getpid()
    code = POSIX + f"""
import signal
for pid, sig in (({me}, signal.SIGKILL), (-1, 0)):  # kill(-1, 0): is any other process reachable at all?
    try:
        posix.kill(pid, sig)
        print('signalled', pid)
    except OSError as e:
        print('refused', pid, e.strerror)
"""
    r = run(code)
    # our pid does not exist in its PID namespace, and no process but its own init (never signalled) is there
    assert f"refused {me} No such process" in r.stdout and "refused -1 No such process" in r.stdout, r
    assert r.success, r


def test_real_posix_fork_bomb_is_bounded():
    token = f"forkbomb-{uuid.uuid4().hex}"
    code = POSIX + f"""
import os
n = 0
try:
    for _ in range(1000):
        pid = posix.fork()
        if pid == 0:
            {sleeper(token)}
        n += 1
except OSError as e:
    print('fork stopped after', n, e)
"""
    r = run(code, timeout=3.0)
    n = int(r.stdout.split("fork stopped after")[1].split()[0]) if "fork stopped after" in r.stdout else None
    assert n is not None and 1 <= n < 10, r  # RLIMIT_NPROC = BWRAP_MAX_PROCESSES, the harness included
    assert_no_survivors(token)


# ----------------------------------------------------------------------------------------------------------
# Processes outliving the run: setsid() children, children that never exit


@pytest.mark.parametrize("parent", ["time.sleep(30)", "time.sleep(0.7)"], ids=["parent-hangs", "parent-returns"])
def test_setsid_children_die_with_the_sandbox(parent):
    # a double-forked setsid() grandchild that would sleep for 1000 s: it must exist during the run (seen from
    # here) and be gone right after, whether the program hangs (timeout) or returns normally
    token = f"survivor-{uuid.uuid4().hex}"
    code = POSIX + f"""
import time
if posix.fork() == 0:
    posix.setsid()
    if posix.fork() == 0:
        {sleeper(token, 1000)}
    posix._exit(0)
{parent}
"""
    results = []
    worker = threading.Thread(target=lambda: results.append(run(code, timeout=1.5)))
    worker.start()
    seen = False
    while worker.is_alive():
        seen = seen or bool(processes_with(token))
        time.sleep(0.02)
    worker.join()
    assert seen, "the grandchild never ran: the test would prove nothing"
    r = results[0]
    assert r.timeout == (parent == "time.sleep(30)") and r.success == (not r.timeout), r
    assert_no_survivors(token)


def test_infinite_loop_times_out():
    r = run("while True:\n    pass", timeout=1.0)
    assert r.timeout and not r.success


# ----------------------------------------------------------------------------------------------------------
# Network


def test_no_network_not_even_the_hosts_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = f"""
import socket
for addr in (('127.0.0.1', {port}), ('10.0.0.1', 80), ('1.1.1.1', 53)):
    try:
        socket.create_connection(addr, timeout=1).sendall(b'leak')
        print('CONNECTED', addr)
    except OSError as e:
        print('refused', addr, type(e).__name__)
"""
        r = run(code, timeout=5.0)
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 3, r.stdout
        server.settimeout(0.3)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing reached the listener


# ----------------------------------------------------------------------------------------------------------
# The verdict: the status-fd forgery and its relatives against judge_function / HumanEval

FORGERIES = {
    "status-fd-from-argv": "import json, os, sys\n"
                           "os.write(json.loads(sys.argv[1])['status_fd'], b'{\"status\": \"ok\"}')",
    "every-fd": "import os\nfor fd in range(3, 256):\n    try:\n        os.write(fd, b'{\"status\": \"ok\"}\\n')\n"
                "    except OSError:\n        pass",
    "harness-finish": "import sys\nsys._getframe(1).f_globals['_finish'](b'{\"status\": \"ok\"}')",
    # look for the judge (its command line says so) and write into its file descriptors (append: a pipe)
    "judge-fds-via-proc": "import _io, os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                          "    if b'judge' not in _io.open(f'/proc/{pid}/cmdline', 'rb').read():\n"
                          "        continue\n"
                          "    for fd in range(3, 32):\n        try:\n"
                          "            _io.open(f'/proc/{pid}/fd/{fd}', 'ab').write(b'{\"status\": \"ok\"}')\n"
                          "        except OSError:\n            pass",
    "exit-early": "import os\nos._exit(0)",
}
PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_status_does_not_pass_humaneval(name):
    conversation = {"messages": [{"role": "user", "content": PROMPT}], "test": TESTS, "entry_point": "add"}
    wrong = f"```python\n{SAFETY}{FORGERIES[name]}\n\ndef add(a, b):\n    return a - b\n```"
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    assert run_completion(conversation, right, isolation="bwrap").success  # the same harness passes a right one
    t0 = time.monotonic()
    r = run_completion(conversation, wrong, isolation="bwrap")
    assert r.isolation == "bwrap" and NOT_SANDBOXED not in r.stdout and not r.success, r
    assert time.monotonic() - t0 < 5.0 + MARGIN


def test_the_judge_does_not_run_candidate_code():
    # the candidate's value is data: an object with a forged __eq__ cannot cross, and neither can a callable
    for ret in ("type('E', (), {'__eq__': lambda s, o: True})()", "lambda *a: 5", "iter([5])"):
        r = judge_function(f"def add(a, b):\n    return {ret}\n", "add", TESTS + "check(add)\n", PROMPT,
                           isolation="bwrap")
        assert not r.success and "cannot cross the sandbox boundary" in r.error, (ret, r)


# ----------------------------------------------------------------------------------------------------------
# What the guard already held, still held under bwrap: memory, output, rlimits, ctypes


def test_memory_bomb_is_contained():
    r = run("chunks = []\nwhile True:\n    chunks.append(' ' * 10 ** 6)", timeout=5.0)
    assert r.memory_exceeded and not r.success, r


def test_huge_output_is_capped():
    r = run("import sys\nfor _ in range(64):\n    sys.stdout.write('x' * 2 ** 20)\n    sys.stderr.write('y' * 2 ** 20)",
            max_output_bytes=4096)
    assert r.success and len(r.stdout) == 4096 and len(r.stderr) == 4096, (len(r.stdout), len(r.stderr))


def test_huge_files_are_capped():
    r = run("f = open('big', 'wb')\nfor _ in range(200):\n    f.write(b'x' * 2 ** 20)\n    f.flush()")
    assert not r.success and ("File too large" in r.error or "No space left" in r.error), r


def test_rlimits_cannot_be_raised():
    code = """import sys
del sys.modules['resource']
import resource
for which in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU):
    try:
        resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print('RAISED', which)
    except (ValueError, OSError) as e:
        print('refused', which, e)
x = bytearray(2 * 1024 ** 3)
"""
    r = run(code)
    assert "RAISED" not in r.stdout and r.stdout.count("refused") == 3, r.stdout
    assert r.memory_exceeded and not r.success, r


def test_ctypes_reaches_nothing_outside(tmp_path):
    marker = tmp_path / "ctypes_marker"
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    code = f"""import sys
for name in ('ctypes', '_ctypes'):
    del sys.modules[name]
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print('system', libc.system(b'touch {marker}'))
print('unlink', libc.unlink({str(victim).encode()!r}), ctypes.get_errno())
print('kill', libc.kill({os.getpid()}, 9), ctypes.get_errno())
"""
    r = run(code)
    assert "unlink -1" in r.stdout and "kill -1" in r.stdout, r
    assert not marker.exists() and victim.read_text() == "precious"


# ----------------------------------------------------------------------------------------------------------
# System calls the seccomp filter refuses (issue 24): the keyring, namespaces, memfd, io_uring, perf, bpf, ptrace

CTYPES = "import sys\nfor _m in ('ctypes', '_ctypes'):\n    sys.modules.pop(_m, None)\nimport ctypes\n" \
         "libc = ctypes.CDLL(None, use_errno=True)\n"
SYSCALL_X86_64 = {"keyctl": 250, "io_uring_setup": 425, "perf_event_open": 298, "bpf": 321, "ptrace": 101}


def _add_session_key(payload):
    """Add a 'user' key to this process's session keyring; returns its serial."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    serial = libc.syscall(248, b"user", b"nanochat-test-key", payload, len(payload), -3)  # add_key, @s
    assert serial > 0, f"add_key failed with errno {ctypes.get_errno()}"
    return serial


def test_the_evaluators_keyring_is_unreachable():
    # a secret in the evaluator's session keyring (put there by this test): readable here, not in the sandbox
    import platform
    assert platform.machine() == "x86_64", "the syscall numbers of this test are x86_64's"
    secret = b"s3cr3t-keyring-payload"
    serial = _add_session_key(secret)
    code = CTYPES + f"""
buf = ctypes.create_string_buffer(256)
n = libc.syscall(250, 11, {serial}, buf, 256)  # KEYCTL_READ
print('READ', buf.raw[:max(n, 0)]) if n >= 0 else print('refused read', ctypes.get_errno())
n = libc.syscall(250, 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
print('SESSION', n) if n >= 0 else print('refused session', ctypes.get_errno())
n = libc.syscall(248, b"user", b"shared", b"x", 1, -4)  # add_key to the user keyring, shared by every sandbox
print('ADDED', n) if n >= 0 else print('refused add', ctypes.get_errno())
"""
    r = run(code)
    assert "READ" not in r.stdout and "SESSION" not in r.stdout and "ADDED" not in r.stdout, r.stdout
    assert r.stdout.count("refused") == 3 and "s3cr3t" not in r.stdout, r.stdout
    import ctypes  # still readable out here: the test could fail
    buf = ctypes.create_string_buffer(256)
    assert ctypes.CDLL(None).syscall(250, 11, serial, buf, 256) == len(secret) and buf.raw[:len(secret)] == secret


def test_no_new_namespace_no_mount_no_memfd():
    code = CTYPES + """
import os
for name, flags in (('user+mount', 0x10000000 | 0x00020000), ('user', 0x10000000), ('mount', 0x00020000)):
    r = libc.unshare(flags)
    print('UNSHARED', name) if r == 0 else print('refused unshare', name, ctypes.get_errno())
r = libc.mount(b'none', b'.', b'tmpfs', 0, b'size=1g')
print('MOUNTED') if r == 0 else print('refused mount', ctypes.get_errno())
try:
    print('MEMFD', os.memfd_create('hold'))
except OSError as e:
    print('refused memfd', e.errno)
"""
    r = run(code)
    assert "UNSHARED" not in r.stdout and "MOUNTED" not in r.stdout and "MEMFD" not in r.stdout, r.stdout
    assert r.stdout.count("refused") == 5, r.stdout


@pytest.mark.parametrize("name", sorted(SYSCALL_X86_64))
def test_rarely_needed_syscalls_are_refused(name):
    import platform
    assert platform.machine() == "x86_64", "the syscall numbers of this test are x86_64's"
    code = CTYPES + f"""
buf = ctypes.create_string_buffer(256)
r = libc.syscall({SYSCALL_X86_64[name]}, 0, 0, buf, 0, 0)
print('result', r, 'errno', ctypes.get_errno())
"""
    r = run(code)
    assert "result -1 errno 1" in r.stdout, r.stdout  # EPERM from the filter, whatever the arguments
