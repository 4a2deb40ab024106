"""
Run a snippet of model-written Python in a separate process and report what happened: used by the HumanEval
task (tasks/humaneval.py) to run a completion against its tests. Tests: tests/test_execution.py.

    result = execute_code("print(1 + 1)")        # ExecutionResult(success=True, stdout="2\\n", ...)

What it protects against (accidents by buggy or over-eager generated code):
- hangs: the wall-clock `timeout` kills the process and its whole process group (the child starts its own
  session); RLIMIT_CPU also stops a CPU-bound child if the parent itself dies.
- memory blow-ups: RLIMIT_AS / RLIMIT_DATA = `maximum_memory_bytes` turn them into MemoryError
  (`memory_exceeded=True`); RLIMIT_FSIZE caps the size of any file it writes; no core dumps.
- fork bombs and shelling out: os.fork/forkpty, os.system/popen, os.exec*/spawn*/posix_spawn, subprocess,
  os.kill/killpg are replaced by functions raising PermissionError (multiprocessing and pty use these too);
  when not running as root RLIMIT_NPROC is set to 0 as well, so the kernel refuses new processes (and threads).
- destructive file calls: os.remove/unlink/rmdir/rename/replace/truncate/chmod/chown/chdir/link/symlink and
  shutil.rmtree/move/chown raise PermissionError; open()/os.open()/os.mkdir for writing outside the fresh
  temporary directory it runs in (its cwd, HOME and TMPDIR; deleted afterwards) raise PermissionError.
- leaking secrets: the environment is scrubbed (a fixed minimal env, no variable of the parent's), and
  reading another process's /proc/<pid>/ files (e.g. the parent's environ) through open() is refused.
- stdin is /dev/null (input() raises EOFError); stdout/stderr are captured, each capped at `max_output_bytes`.
- a snippet that ends early (sys.exit(0), os._exit(0)) does not count as success: success means the code ran
  to its end without an exception.

What it does NOT protect against: hostile code. The guards are plain Python monkey-patching in the child and
can be undone from Python (ctypes is blocked, but e.g. re-importing the `posix` module gives back the real
functions); the child runs as the same user as the caller, so it can read any file that user can read and
write any file that user can write through such an escape; there is no network isolation, no seccomp, no
namespace or container. RLIMIT_NPROC is ineffective for root. Run untrusted code in a real sandbox
(container / VM / gVisor) instead; this is for evaluating our own model's completions.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

# ----------------------------------------------------------------------------------------------------------
# The harness: runs in the child (`python -I -B -X utf8 -c HARNESS ...`), reads the code from stdin, sets the
# limits and guards, executes the code, and writes one status line to the status pipe.

HARNESS = r'''
import os, sys
status_fd, max_mem, max_cpu, max_fsize = (int(a) for a in sys.argv[1:5])
workdir = sys.argv[5]
code = sys.stdin.read()
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdin = open(0, "r", closefd=False)

import builtins, io, json, linecache, posix, re, resource, shutil, signal, subprocess, traceback

def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):  # e.g. RLIMIT_AS is not supported on macOS
        pass
if max_mem > 0:
    _limit(resource.RLIMIT_AS, max_mem)
    _limit(resource.RLIMIT_DATA, max_mem)
try:
    resource.setrlimit(resource.RLIMIT_CPU, (max_cpu, max_cpu + 1))  # SIGXCPU, then SIGKILL
except (ValueError, OSError):
    pass
_limit(resource.RLIMIT_FSIZE, max_fsize)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead of killing us
_limit(resource.RLIMIT_CORE, 0)
if os.geteuid() != 0:
    _limit(resource.RLIMIT_NPROC, 0)  # no new processes/threads for this user from here on (root ignores it)

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

_workdir = os.path.realpath(workdir)
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

def _finish(payload):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os.write(status_fd, payload)
    os._exit(0)

linecache.cache["<sandbox>"] = (len(code), None, code.splitlines(True), "<sandbox>")  # source in tracebacks
try:  # running the submitted program is this child's whole job (not a config being executed)
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError:
    _finish(_MEMORY_STATUS)
except BaseException as e:  # SystemExit too: the code must run to its end
    try:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # without the harness's own frame
    except MemoryError:
        _finish(_MEMORY_STATUS)
    _finish(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}).encode())
_finish(json.dumps({"status": "ok"}).encode())
'''


@dataclasses.dataclass
class ExecutionResult:
    success: bool  # ran to the end without an exception, within the limits
    stdout: str
    stderr: str
    error: str | None = None  # short description of the failure ("AssertionError: ...", "timed out after 5s")
    timeout: bool = False
    memory_exceeded: bool = False


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


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=1024 * 1024):
    """Run `code` (a Python program as a string) in a fresh interpreter in a fresh temporary directory.
    timeout: wall-clock seconds; maximum_memory_bytes: address-space limit (None or 0 disables it).
    Returns an ExecutionResult; never raises for anything the code does. Thread-safe (no preexec_fn)."""
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    status_r, status_w = os.pipe()
    cpu_seconds = int(math.ceil(timeout)) + 1
    fsize = 64 * 1024 * 1024
    cmd = [sys.executable, "-I", "-B", "-X", "utf8", "-c", HARNESS, str(status_w), str(maximum_memory_bytes or 0),
           str(cpu_seconds), str(fsize), workdir]
    try:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=_scrubbed_env(workdir), pass_fds=(status_w,),
                                    start_new_session=True)
        finally:
            os.close(status_w)
        with os.fdopen(status_r, "rb") as status_pipe:
            status_r = None
            out, err, status = [], [], []
            readers = [threading.Thread(target=_drain, args=(s, c, n), daemon=True)
                       for s, c, n in ((proc.stdout, out, max_output_bytes), (proc.stderr, err, max_output_bytes),
                                       (status_pipe, status, 65536))]
            for t in readers:
                t.start()
            try:
                proc.stdin.write(code.encode("utf-8", errors="surrogatepass"))
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # the child and anything it left behind in its session
            proc.wait()
            for t in readers:
                t.join(timeout=5.0)
    finally:
        if status_r is not None:
            os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
    stdout = b"".join(out).decode("utf-8", errors="replace")
    stderr = b"".join(err).decode("utf-8", errors="replace")
    return _interpret(proc.returncode, b"".join(status), stdout, stderr, timed_out, timeout)


def _interpret(returncode, status_bytes, stdout, stderr, timed_out, timeout):
    if timed_out:
        return ExecutionResult(False, stdout, stderr, f"timed out after {timeout}s", timeout=True)
    try:
        status = json.loads(status_bytes.decode("utf-8")) if status_bytes else None
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("status") == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if isinstance(status, dict) and status.get("status") == "memory":
        return ExecutionResult(False, stdout, stderr, status.get("error"), memory_exceeded=True)
    if isinstance(status, dict) and status.get("status") == "error":
        return ExecutionResult(False, stdout, stderr, status.get("error"))
    if returncode is not None and returncode < 0:
        signame = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if -returncode == signal.SIGXCPU:
            return ExecutionResult(False, stdout, stderr, "CPU time limit exceeded", timeout=True)
        return ExecutionResult(False, stdout, stderr, f"killed by signal {signame}")
    return ExecutionResult(False, stdout, stderr, f"exited early with code {returncode} before the end of the code")
