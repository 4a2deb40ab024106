"""
Run model-written Python in a sandbox and report what happened: used by the HumanEval task (tasks/humaneval.py)
to run a completion against its tests. Tests: tests/test_execution.py (behaviour, both isolation levels) and
tests/test_sandbox.py (the adversarial suite; it needs bubblewrap and fails without it). Cost per call:
`python -m bench.sandbox`.
Its length (~590 lines, over the house ~450) is the harness that runs inside the child (a string, one piece by
necessity) plus the two isolation levels; the seccomp program lives apart in nanochat/seccomp.py.

    result = execute_code("print(1 + 1)")        # ExecutionResult(success=True, stdout="2\\n", isolation="bwrap")
    result = judge_function(candidate_code, "add", test_code="def check(f):\\n    assert f(1, 2) == 3",
                            context_code=prompt)  # the verdict comes from a process the candidate cannot touch

Two isolation levels (`ExecutionResult.isolation`; the `isolation` argument: "auto" picks "bwrap" when it works,
"bwrap" raises where it does not, "guard" forces the fallback):

- "bwrap" (used whenever bubblewrap works here): the interpreter runs under `bwrap` with a read-only root made of
  /usr, /bin, /lib*, the Python installation and its venv only (no /home, /root, the repository, /etc: the
  user's files are not even visible), /dev minimal, a fresh /proc of its own PID namespace (the evaluator and
  every other process are invisible), its own network namespace (only its own loopback: nothing outside is
  reachable, the host's 127.0.0.1 included), IPC, UTS and cgroup namespaces, and one writable place: a private
  tmpfs of `WORKDIR_BYTES` at its working directory. `--die-with-parent` and `--new-session`: killing bwrap at
  the timeout ends the PID namespace and with it every process the program started, setsid() or not. When the
  evaluator runs as root, the program runs as uid 65534 (nobody) with no capabilities, so RLIMIT_NPROC
  (`BWRAP_MAX_PROCESSES`, threads included) bounds fork bombs; otherwise bwrap's user namespace gives the same
  per-sandbox count. A seccomp filter (nanochat/seccomp.py, on x86_64 and aarch64) refuses the keyring, new
  namespaces, mounts, io_uring, perf, bpf, ptrace, memfd and module calls with EPERM.
  Memory: each process is bounded by RLIMIT_AS (`maximum_memory_bytes`; memfd_create, which would hold memory
  outside it, is refused), at most `BWRAP_MAX_PROCESSES` processes, the only writable filesystem is the
  `WORKDIR_BYTES` tmpfs (no new mount can add another), and RLIMIT_NOFILE (`MAX_OPEN_FILES`) bounds what pipes
  and sockets can queue. Not bounded beyond that: kernel memory such as page tables and the page cache of files
  the program reads.
- "guard" (bwrap missing, or unable to create namespaces, e.g. an unprivileged container without user
  namespaces): a child interpreter with only the in-process guard below. A loud warning is printed once. Hostile
  code escapes it (e.g. `del sys.modules['posix']; import posix` gives back fork/unlink/kill, `_io.open` writes
  anywhere the user can; run as root, RLIMIT_NPROC does not apply); it only protects against accidents.

Both levels add, inside the child: a scrubbed environment (a fixed minimal env, nothing of the parent's), stdin
/dev/null, stdout/stderr captured and capped at `max_output_bytes`, RLIMIT_AS/DATA (`maximum_memory_bytes` ->
MemoryError, `memory_exceeded=True`), RLIMIT_CPU, RLIMIT_FSIZE, no core dumps, and Python-level guards that turn
os.system/fork/kill/unlink/..., subprocess, ctypes, and writes outside the working directory into
PermissionError/ImportError (a clear error for code that does this by accident).

The verdict. `execute_code` reports success when the program ran to its end without an exception; that is the
program's own testimony (a status line written by the harness in the same interpreter), so a hostile program can
forge it: anything the harness does after the code runs, the code can do first (write the status, or call the
harness's own functions through `sys._getframe`). No design holds inside one interpreter. `judge_function` is
the verdict the program cannot forge: the candidate code runs in one sandbox and only serves calls to its
function; the trusted tests run in a second sandbox, call the candidate through a pipe (arguments and results
cross as data: None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset; anything else is a
failed call), and the verdict is the second process's. Under "bwrap" the candidate cannot see, signal or write
to the judge (separate PID namespaces and filesystems); under "guard" it can, so that verdict is forgeable too.
What it means for HumanEval: pass@k is measured with `judge_function`; a completion counts only if the values
its function returns satisfy the tests. It still can be "right for the wrong reason" (e.g. hard-coding the
tested inputs), as in every HumanEval harness; results that are not plain data (numpy arrays and integers,
custom classes, generators) fail, where the single-interpreter harness of nanochat/OpenAI would compare them directly.
"""

import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from nanochat.seccomp import bwrap_seccomp_filter

SANDBOX_UID = 65534  # "nobody": who the program runs as under bwrap when the evaluator is root
BWRAP_MAX_PROCESSES = 8  # RLIMIT_NPROC under bwrap (threads included): bounds fork bombs
WORKDIR_BYTES = 64 * 1024 * 1024  # size of the private tmpfs that is the only writable place under bwrap
MAX_REPLY_BYTES = 16 * 1024 * 1024  # the largest encoded call or result crossing between candidate and judge
MAX_OPEN_FILES = 256  # RLIMIT_NOFILE: open files, pipes and sockets per process
ISOLATION_LEVELS = ("bwrap", "guard")

# ----------------------------------------------------------------------------------------------------------
# The harness: runs in the child (`python -I -B -X utf8 -c HARNESS CONFIG_JSON`), reads its sources from stdin
# (JSON), sets the limits and guards, executes them, and writes one status line to the status pipe.
# mode "run": execute one program. "serve": execute the candidate program, then answer calls to its
# `entry_point` read from call_fd (one JSON line each) on reply_fd. "judge": execute the context (the prompt),
# bind `entry_point` to a proxy that calls the candidate over the pipes, execute the tests.

HARNESS = r'''
import os, sys, json
cfg = json.loads(sys.argv[1])
if cfg["uid"] >= 0:  # root under bwrap: become an unprivileged user (drops every capability) before anything else
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
status_fd, mode = cfg["status_fd"], cfg["mode"]
sources = json.loads(sys.stdin.read())
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdin = open(0, "r", closefd=False)
if mode == "serve":
    _calls, _replies = os.fdopen(cfg["call_fd"], "rb"), os.fdopen(cfg["reply_fd"], "wb")
elif mode == "judge":
    _calls, _replies = os.fdopen(cfg["call_fd"], "wb"), os.fdopen(cfg["reply_fd"], "rb")

import builtins, io, linecache, posix, re, resource, shutil, signal, subprocess, traceback

def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):  # e.g. RLIMIT_AS is not supported on macOS
        pass
if cfg["max_mem"] > 0:
    _limit(resource.RLIMIT_AS, cfg["max_mem"])
    _limit(resource.RLIMIT_DATA, cfg["max_mem"])
try:
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["max_cpu"], cfg["max_cpu"] + 1))  # SIGXCPU, then SIGKILL
except (ValueError, OSError):
    pass
_limit(resource.RLIMIT_FSIZE, cfg["max_fsize"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NOFILE, cfg["max_files"])  # bounds what pipes and sockets can hold in kernel buffers
if os.geteuid() != 0:
    _limit(resource.RLIMIT_NPROC, cfg["nproc"])  # root ignores it (bwrap makes us non-root first)

_MEMORY_STATUS = json.dumps({"status": "memory", "error": "MemoryError: memory limit exceeded"}).encode()

def _disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse

for _mod, _names in (
    (os, "system popen fork forkpty kill killpg remove unlink rmdir removedirs rename renames "
         "replace truncate chmod fchmod lchmod chown fchown lchown chroot chdir fchdir link symlink setuid "
         "setgid seteuid setegid setreuid setregid setsid setpgid execv execve execl execle execlp execlpe "
         "execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn "
         "posix_spawnp"),
    (posix, "system fork forkpty kill killpg remove unlink rmdir rename replace truncate "
            "chmod fchmod lchmod chown fchown lchown chroot chdir fchdir link symlink setuid setgid seteuid "
            "setegid setreuid setregid setsid setpgid execv execve spawnv spawnve posix_spawn posix_spawnp"),
    (shutil, "rmtree move chown"),
    (subprocess, "Popen run call check_call check_output getoutput getstatusoutput"),
):
    for _name in _names.split():
        if hasattr(_mod, _name):
            setattr(_mod, _name, _disabled(f"{_mod.__name__}.{_name}"))
for _name in ("ctypes", "_ctypes", "resource", "_posixsubprocess", "psutil", "ipdb", "joblib", "tkinter"):
    sys.modules[_name] = None  # import raises ImportError

_workdir = os.path.realpath(cfg["workdir"])
_proc_other = re.compile(r"^/proc/(\d+)(/|$)")

def _check_path(path, writing):
    if isinstance(path, int):
        return
    real = os.path.realpath(os.fsdecode(path))
    if writing and real not in (_workdir, os.devnull) and not real.startswith(_workdir + os.sep):
        raise PermissionError(f"writing outside the sandbox directory is disabled: {real}")
    m = _proc_other.match(real)
    if m and int(m.group(1)) != os.getpid():
        raise PermissionError(f"reading another process's /proc entry is disabled: {real}")

_open = io.open
def _guarded_open(file, mode="r", *args, **kwargs):
    _check_path(file, any(c in mode for c in "wax+"))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *args, **kwargs):
    _check_path(path, bool(flags & _WRITE_FLAGS))
    return _os_open(path, flags, *args, **kwargs)
os.open = posix.open = _guarded_os_open

_mkdir = os.mkdir
def _guarded_mkdir(path, *args, **kwargs):
    _check_path(path, True)
    return _mkdir(path, *args, **kwargs)
os.mkdir = posix.mkdir = _guarded_mkdir

# Values crossing between candidate and judge: plain data only, tagged so that list/tuple/set/dict survive.
_SEQS = {list: "l", tuple: "t", set: "s", frozenset: "fs"}
_UNSEQS = {"l": list, "t": tuple, "s": set, "fs": frozenset}

def _enc(x):
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str(x)
    if isinstance(x, complex):
        return ["c", x.real, x.imag]
    if isinstance(x, (bytes, bytearray)):
        return ["b", bytes(x).hex()]
    if isinstance(x, dict):
        return ["d", [[_enc(k), _enc(v)] for k, v in x.items()]]
    for t, tag in _SEQS.items():
        if isinstance(x, t):
            return [tag, [_enc(v) for v in x]]
    raise TypeError(f"a {type(x).__name__} cannot cross the sandbox boundary (plain data only)")

def _dec(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    tag = x[0]
    if tag == "c":
        return complex(float(x[1]), float(x[2]))
    if tag == "b":
        return bytes.fromhex(x[1])
    if tag == "d":
        return {_dec(k): _dec(v) for k, v in x[1]}
    return _UNSEQS[tag](_dec(v) for v in x[1])

class CandidateError(Exception):
    """The candidate function raised, or its program failed: the call fails in the tests."""

def _proxy(*args, **kwargs):
    _calls.write(json.dumps(_enc([list(args), kwargs])).encode() + b"\n")
    _calls.flush()
    line = _replies.readline(cfg["max_reply"] + 1)
    if not line.endswith(b"\n"):
        raise CandidateError("the candidate program ended, failed or sent an oversized reply")
    reply = json.loads(line)
    if "error" in reply:
        raise CandidateError(str(reply["error"])[:1000])
    return _dec(reply["value"])

def _serve(namespace):
    while True:
        line = _calls.readline(cfg["max_reply"] + 1)
        if not line.endswith(b"\n"):
            return
        try:
            args, kwargs = _dec(json.loads(line))
            reply = {"value": _enc(namespace[cfg["entry_point"]](*args, **kwargs))}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"[:1000]}
        _replies.write(json.dumps(reply).encode() + b"\n")
        _replies.flush()

def _finish(payload):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os.write(status_fd, payload)
    os._exit(0)

def _exec(source, filename, namespace):
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # source in tracebacks
    exec(compile(source, filename, "exec"), namespace)  # running the submitted program is this child's job

try:
    _namespace = {"__name__": "__main__", "__builtins__": builtins}
    if mode == "judge":
        _exec(sources[0], "<context>", _namespace)
        _namespace[cfg["entry_point"]] = _proxy
        _exec(sources[1], "<test>", _namespace)
    else:
        _exec(sources[0], "<sandbox>", _namespace)
        if mode == "serve":
            _serve(_namespace)
except MemoryError:
    _finish(_MEMORY_STATUS)
except BaseException as e:  # SystemExit too: the code must run to its end
    try:
        _tb = e.__traceback__.tb_next  # without the harness's own frames (the module, then _exec)
        _tb = _tb.tb_next if _tb is not None and _tb.tb_next is not None else _tb
        traceback.print_exception(type(e), e, _tb)
    except MemoryError:
        _finish(_MEMORY_STATUS)
    _finish(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}).encode())
_finish(json.dumps({"status": "ok"}).encode())
'''


@dataclasses.dataclass
class ExecutionResult:
    success: bool  # ran to the end without an exception, within the limits (judge_function: the tests passed)
    stdout: str
    stderr: str
    error: str | None = None  # short description of the failure ("AssertionError: ...", "timed out after 5s")
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: str = "guard"  # "bwrap" or "guard" (see the module docstring)


# ----------------------------------------------------------------------------------------------------------
# bubblewrap


def _interpreter():
    """The interpreter to run (this one: a venv's python keeps its packages) and the (source, path) directories
    the sandbox must show for it: the installation, and the venv at the path the interpreter knows it by."""
    exe = os.path.abspath(sys.executable)
    base = os.path.realpath(sys.base_prefix)
    binds = {base: base, os.path.dirname(os.path.dirname(os.path.realpath(exe))): None}
    binds[os.path.realpath(sys.prefix)] = os.path.abspath(sys.prefix)  # a venv (may itself be a symlink)
    return exe, sorted((src, dest or src) for src, dest in binds.items())


def bwrap_command(bwrap, workdir, python_binds, as_root, workdir_bytes=WORKDIR_BYTES, seccomp_fd=None):
    """The bwrap arguments that make the sandbox (pure; see the module docstring for what each part is for).
    seccomp_fd: a readable fd holding nanochat.seccomp's filter program (bwrap installs it before exec)."""
    cmd = [bwrap]
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    made = set()
    for src, path in python_binds:
        if src == path and (path + "/").startswith("/usr/"):  # already visible
            continue
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):  # traversable parents: bwrap would copy e.g. /root's mode 0700
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", src, path]
    cmd += ["--dev", "/dev", "--proc", "/proc",
            "--perms", "1777", "--size", str(workdir_bytes), "--tmpfs", workdir, "--chdir", workdir,
            "--die-with-parent", "--new-session"]
    if as_root:  # no user namespace (it would map us to root inside); we setuid to SANDBOX_UID in the harness
        cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-all"]  # user, ipc, pid, net, uts, cgroup
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd + ["--remount-ro", "/", "--"]


def seccomp_pipe():
    """A pipe's read end holding the sandbox's seccomp filter (nanochat/seccomp.py) for bwrap's --seccomp, or
    None on an architecture without one. The caller passes it to the child and closes it after the start."""
    program = bwrap_seccomp_filter()
    if program is None:
        return None
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, program)  # a few hundred bytes: far below a pipe's buffer, so this never blocks
    finally:
        os.close(write_fd)
    return read_fd


PROBE = ("import os, sys\nuid = int(sys.argv[1])\nif uid >= 0:\n    os.setgroups([])\n    os.setgid(uid)\n"
         "    os.setuid(uid)\nopen('probe', 'w').write('ok')\n"
         "print(open('probe').read(), len(os.listdir('/proc')) > 0)")


@functools.lru_cache(maxsize=None)
def bwrap_status():
    """(bwrap path or None, reason): whether bwrap can build the sandbox here, tried once per process with a
    tiny program (None: not installed, or it cannot create its namespaces; the reason says which)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    workdir = tempfile.mkdtemp(prefix="nanochat_probe_")
    exe, dirs = _interpreter()
    as_root = os.geteuid() == 0
    seccomp_fd = seccomp_pipe()
    cmd = bwrap_command(bwrap, workdir, dirs, as_root, seccomp_fd=seccomp_fd) + \
        [exe, "-I", "-c", PROBE, str(SANDBOX_UID if as_root else -1)]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=30, env=_scrubbed_env(workdir),
                              stdin=subprocess.DEVNULL, pass_fds=() if seccomp_fd is None else (seccomp_fd,))
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{bwrap} failed to start: {e}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if seccomp_fd is not None:
            os.close(seccomp_fd)
    if proc.returncode != 0 or proc.stdout.split() != [b"ok", b"True"]:
        why = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        return None, (f"{bwrap} cannot create its sandbox here (exit {proc.returncode}: {why}; in Docker allow "
                      "namespaces with --security-opt seccomp=unconfined --security-opt apparmor=unconfined, on "
                      "Ubuntu 24.04 allow unprivileged user namespaces for bwrap)")
    syscalls = "seccomp filter" if seccomp_fd is not None else f"NO seccomp filter on {platform.machine()}"
    return bwrap, f"{bwrap}: read-only system dirs, private tmpfs, no network, own PID/IPC/UTS namespaces, {syscalls}"


@functools.lru_cache(maxsize=None)
def _warn_guard_only(reason):
    who = ("ROOT: every file and process on this machine" if os.geteuid() == 0
           else "the files, processes and network of this user")
    print(f"WARNING: nanochat.execution: {reason}. Model-written code runs with the in-process guard ONLY, which "
          f"hostile code can escape, and then reaches {who}. Install bubblewrap (apt-get install bubblewrap) "
          "or run in a container/VM you can throw away.", file=sys.stderr, flush=True)


def resolve_isolation(isolation="auto"):
    """"auto" -> "bwrap" if usable, else "guard" with a loud warning (once); "bwrap" when unusable raises."""
    if isolation not in ("auto",) + ISOLATION_LEVELS:
        raise ValueError(f"isolation must be one of auto, {', '.join(ISOLATION_LEVELS)}; got {isolation!r}")
    if isolation == "guard":
        return "guard"
    bwrap, reason = bwrap_status()
    if bwrap is not None:
        return "bwrap"
    if isolation == "bwrap":
        raise RuntimeError(f"isolation='bwrap' requested but {reason}")
    _warn_guard_only(reason)
    return "guard"


def describe_isolation(isolation="auto"):
    """One line for logs: which sandbox executed code will get here."""
    level = resolve_isolation(isolation)
    return f"{level} ({bwrap_status()[1] if level == 'bwrap' else 'in-process guard only: ' + bwrap_status()[1]})"


# ----------------------------------------------------------------------------------------------------------
# Running children


def _scrubbed_env(workdir):
    """A fixed minimal environment: nothing from the parent's (API keys, tokens) reaches the child."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _drain(stream, chunks, max_bytes):
    """Read a pipe to EOF, keeping at most max_bytes (the rest is read and dropped so the child never blocks)."""
    kept = 0
    while True:
        data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not data:
            break
        if kept < max_bytes:
            chunks.append(data[:max_bytes - kept])
            kept += len(chunks[-1])


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Child:
    """One harness process (under bwrap or not) with its output and status being drained by threads."""

    def __init__(self, sources, mode, isolation, timeout, maximum_memory_bytes, max_output_bytes, entry_point=None,
                 call_fd=None, reply_fd=None):
        self.workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
        status_r, status_w = os.pipe()
        exe, dirs = _interpreter()
        as_root = os.geteuid() == 0
        cfg = {"status_fd": status_w, "mode": mode, "max_mem": maximum_memory_bytes or 0,
               "max_cpu": int(math.ceil(timeout)) + 1, "max_fsize": 64 * 1024 * 1024, "workdir": self.workdir,
               "nproc": BWRAP_MAX_PROCESSES if isolation == "bwrap" else 0,
               "uid": SANDBOX_UID if isolation == "bwrap" and as_root else -1,
               "entry_point": entry_point, "call_fd": call_fd, "reply_fd": reply_fd, "max_reply": MAX_REPLY_BYTES,
               "max_files": MAX_OPEN_FILES}
        cmd = [exe, "-I", "-B", "-X", "utf8", "-c", HARNESS, json.dumps(cfg)]
        seccomp_fd = seccomp_pipe() if isolation == "bwrap" else None
        if isolation == "bwrap":
            cmd = bwrap_command(bwrap_status()[0], self.workdir, dirs, as_root, seccomp_fd=seccomp_fd) + cmd
        fds = tuple(fd for fd in (status_w, call_fd, reply_fd, seccomp_fd) if fd is not None)
        try:
            # start_new_session: one killpg ends the child (under bwrap: bwrap, whose death ends the namespace)
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=self.workdir, env=_scrubbed_env(self.workdir), pass_fds=fds,
                                         start_new_session=True)
        except BaseException:
            os.close(status_r)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        finally:
            os.close(status_w)
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        self.out, self.err, self.status = [], [], []
        status_pipe = os.fdopen(status_r, "rb")
        self.readers = [threading.Thread(target=_drain, args=(s, c, n), daemon=True)
                        for s, c, n in ((self.proc.stdout, self.out, max_output_bytes),
                                        (self.proc.stderr, self.err, max_output_bytes),
                                        (status_pipe, self.status, 65536))]
        for t in self.readers:
            t.start()
        try:
            self.proc.stdin.write(json.dumps(sources).encode("utf-8", errors="surrogatepass"))
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def wait(self, deadline):
        """Wait until the child exits or the deadline passes; True if it exited in time."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            return False

    def finish(self):
        """Kill whatever is left, collect the output; returns (returncode, status bytes, stdout, stderr)."""
        _kill_group(self.proc.pid)
        self.proc.wait()
        # under "guard", a setsid() grandchild can survive the kill and hold our pipes open: stop waiting for
        # its output after a moment instead of hanging with it (under bwrap it is dead already)
        deadline = time.monotonic() + 2.0
        for t in self.readers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        shutil.rmtree(self.workdir, ignore_errors=True)
        stdout = b"".join(list(self.out)).decode("utf-8", errors="replace")
        stderr = b"".join(list(self.err)).decode("utf-8", errors="replace")
        return self.proc.returncode, b"".join(list(self.status)), stdout, stderr


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=1024 * 1024,
                 isolation="auto"):
    """Run `code` (a Python program as a string) in a fresh interpreter in a fresh private directory.
    timeout: wall-clock seconds; maximum_memory_bytes: address-space limit (None or 0 disables it);
    isolation: "auto" (bwrap if usable, else the guard with a warning), "bwrap" (raise if unusable) or "guard".
    Returns an ExecutionResult; never raises for anything the code does. Thread-safe (no preexec_fn), but under
    bwrap the calling thread must outlive the call (--die-with-parent follows the thread that started it).
    success is the program's own report: see judge_function for a verdict it cannot forge."""
    level = resolve_isolation(isolation)
    start = time.monotonic()
    child = _Child([code], "run", level, timeout, maximum_memory_bytes, max_output_bytes)
    timed_out = not child.wait(start + timeout)
    returncode, status, stdout, stderr = child.finish()
    return _interpret(returncode, status, stdout, stderr, timed_out, timeout, level)


def judge_function(candidate_code, entry_point, test_code, context_code="", timeout=5.0,
                   maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=1024 * 1024, isolation="auto"):
    """Test the function `entry_point` defined by `candidate_code` (untrusted) with `test_code` (trusted).
    The candidate runs in its own sandbox and only answers calls; `context_code` then `test_code` run in a
    second sandbox where `entry_point` names a proxy for the candidate's function. success is the verdict of
    that second process (the tests ran to their end), which the candidate cannot write (under bwrap).
    stdout/stderr: the candidate's, then the tests'. timeout: wall-clock seconds for both."""
    level = resolve_isolation(isolation)
    start = time.monotonic()
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    try:
        candidate = _Child([candidate_code], "serve", level, timeout, maximum_memory_bytes, max_output_bytes,
                           entry_point=entry_point, call_fd=call_r, reply_fd=reply_w)
        try:
            judge = _Child([context_code, test_code], "judge", level, timeout, maximum_memory_bytes,
                           max_output_bytes, entry_point=entry_point, call_fd=call_w, reply_fd=reply_r)
        except BaseException:
            candidate.finish()
            raise
    finally:
        for fd in (call_r, call_w, reply_r, reply_w):  # each child holds its own ends now
            os.close(fd)
    timed_out = not judge.wait(start + timeout)
    j_code, j_status, j_out, j_err = judge.finish()
    c_code, c_status, c_out, c_err = candidate.finish()
    result = _interpret(j_code, j_status, c_out + j_out, c_err + j_err, timed_out, timeout, level)
    cand = _interpret(c_code, c_status, "", "", False, timeout, level)
    if not result.success and cand.error and not timed_out:  # say why the candidate failed, if it did
        result.error = f"{result.error} (candidate: {cand.error})"
    result.memory_exceeded = result.memory_exceeded or cand.memory_exceeded
    return result


def _interpret(returncode, status_bytes, stdout, stderr, timed_out, timeout, isolation):
    def result(success, error=None, **flags):
        return ExecutionResult(success, stdout, stderr, error, isolation=isolation, **flags)
    if timed_out:
        return result(False, f"timed out after {timeout}s", timeout=True)
    try:
        status = json.loads(status_bytes.decode("utf-8")) if status_bytes else None
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("status") == "ok" and returncode == 0:
        return result(True)
    if isinstance(status, dict) and status.get("status") == "memory":
        return result(False, status.get("error"), memory_exceeded=True)
    if isinstance(status, dict) and status.get("status") == "error":
        return result(False, status.get("error"))
    if isolation == "bwrap" and returncode is not None and returncode > 128:  # bwrap reports 128 + signal
        returncode = 128 - returncode
    if returncode is not None and returncode < 0:
        signame = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if -returncode == signal.SIGXCPU:
            return result(False, "CPU time limit exceeded", timeout=True)
        return result(False, f"killed by signal {signame}")
    return result(False, f"exited early with code {returncode} before the end of the code")
