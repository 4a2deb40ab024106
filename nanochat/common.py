"""
Common utilities shared by every script: device and process-group set-up, rank-0 printing, the base
directory, wandb stand-in, autocast choice, and atomic file writes.

Importing this module has no side effects (no device probing, no process group, no logging set-up).
Tests: tests/test_common.py (compute_init under `torchrun --nproc_per_node=2` with gloo is covered there).
"""

import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake the user can fix: a bad option value, a missing or corrupt file, a resume that does not
    match. The message says what is wrong, where (key, file:line, path) and how to fix it; scripts that
    call install_error_handler() print it as one line `error: <message>` and exit with code 2."""


EXIT_USER_ERROR = 2


def format_user_error(exc):
    """The one line printed for a UserError: `error: <message>` (newlines folded, so it stays one line)."""
    return "error: " + " ".join(str(exc).split("\n")).strip()


EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
_interrupt_notes = []  # note(step) -> line, registered at run time (runs.prepare_run), never at import
_exit_cleanups = []  # fn(), registered at run time (folder_lock): run before the handler's os._exit skips atexit


def on_error_exit(cleanup):
    """Register cleanup(), run when install_error_handler's hook ends the process (a UserError or Ctrl-C), which
    exits with os._exit and so skips atexit; for releasing what the process holds (its output folder's lock)."""
    _exit_cleanups.append(cleanup)


def _run_exit_cleanups():
    for cleanup in reversed(_exit_cleanups):  # last registered first, as atexit does
        try:
            cleanup()
        except Exception:  # noqa: BLE001  (a failed cleanup must not hide the error being reported)
            pass


def on_interrupt(note):
    """Register note(step) -> str, the line printed when Ctrl-C stops the script (instead of a traceback); step is
    the script's loop variable `step` at that moment, or None. The latest registered note is used."""
    _interrupt_notes.append(note)


def _script_step(tb):
    """The script's global `step` (its training loop's variable) when the traceback was made, or None."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
            step = frame.f_globals.get("step")
            return step if isinstance(step, int) else None
        tb = tb.tb_next
    return None


def _interrupted(tb):
    """Ctrl-C: one line on rank 0 saying where the run stopped and what was saved, exit code 130."""
    line = "stopped (Ctrl-C)"
    if _interrupt_notes:
        try:
            line = _interrupt_notes[-1](_script_step(tb))
        except Exception:  # noqa: BLE001  (the note is a courtesy: a failure in it must not hide the interrupt)
            pass
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)
    _run_exit_cleanups()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _user_error_hook(exc_type, exc, tb):
    if issubclass(exc_type, KeyboardInterrupt) and os.environ.get("NANOCHAT_DEBUG") != "1":
        return _interrupted(tb)
    if not issubclass(exc_type, UserError):
        return sys.__excepthook__(exc_type, exc, tb)
    if os.environ.get("NANOCHAT_DEBUG") == "1":
        traceback.print_exception(exc_type, exc, tb)
    print(format_user_error(exc), file=sys.stderr)
    _run_exit_cleanups()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_USER_ERROR)  # sys.excepthook cannot choose the exit code; nothing is left to clean up


def install_error_handler():
    """Call first thing in a script: an uncaught UserError becomes one line on stderr and exit code 2 (no
    traceback unless NANOCHAT_DEBUG=1), Ctrl-C one line (on_interrupt) and exit code 130; any other exception
    keeps Python's traceback and exit code 1.
    A hook rather than a try/except around the script, so scripts keep reading top to bottom."""
    sys.excepthook = _user_error_hook


def print0(*args, **kwargs):
    """print() on rank 0 only (rank read from the environment torchrun sets)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def get_base_dir():
    """Where tokenizer, checkpoints and report live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat (created)."""
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def get_data_dir():
    """The local dataset mirror ($NANOCHAT_DATA_DIR), or None to use the Hugging Face hub."""
    return os.environ.get("NANOCHAT_DATA_DIR") or None


def autodetect_device_type():
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the environment torchrun sets."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def dist_rank_world():
    """(rank, world_size) of the initialised process group, or (0, 1) without one.
    Library functions take rank/world_size arguments and fall back to this."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def all_reduce_values(values, op="sum", device="cpu", world_size=1):
    """Reduce a list of numbers over ranks in one collective (op: sum | min | max), as float64; a no-op list
    copy with one process. Under gloo the tensor lives on the CPU."""
    if world_size > 1 and dist.get_backend() == "gloo":
        device = "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=_REDUCE_OPS[op])
    return t.tolist()


def compute_init(device_type="cuda"):
    """Seed, set precision, and (under torchrun) initialise the process group: nccl on CUDA, gloo on CPU.
    Returns (ddp, ddp_rank, ddp_local_rank, ddp_world_size, device)."""
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"device_type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("device_type='cuda' but CUDA is not available; use device_type=cpu (or leave it empty)")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device_type='mps' but MPS is not available; use device_type=cpu (or leave it empty)")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 matmuls for any fp32 left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    ddp, ddp_rank, ddp_local_rank, ddp_world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", ddp_local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")  # CPU (and MPS) multi-process runs: gloo
        dist.barrier()
    else:
        device = torch.device(device_type)
    if ddp_rank == 0:
        print(f"compute_init: device={device} world_size={ddp_world_size} ddp={ddp}")
    return ddp, ddp_rank, ddp_local_rank, ddp_world_size, device


def compute_cleanup():
    """Tear the process group down together and free it while the interpreter is still whole. Under CPU load
    a 2-rank gloo run sometimes aborted after its own cleanup, during interpreter shutdown ("terminate called
    without an active exception", about 1 in 10 runs of tests/sft_step_worker.py beside 3 busy processes);
    collecting the group's last references right after destroying it gave 0 aborts in 30 such runs."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # drop the last references to the group's C++ objects now, not during interpreter shutdown


class DummyWandb:
    """Stands in for a wandb run when logging is disabled (run == 'dummy', or rank != 0)."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def wandb_api_key_present(environ=os.environ, netrc_path=None):
    """Whether wandb has a key: $WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc (what `wandb login` writes)."""
    if environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc(netrc_path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(run, project, config, rank=0, run_dir=None):
    """A wandb run on rank 0 unless run == 'dummy'. WANDB_MODE (online/offline/disabled) is honoured; without
    it and without an API key the run logs offline into <run_dir>/wandb and says so in one line. wandb never
    stops a run: if it fails to start, the run goes on without it (one line says why)."""
    if run == "dummy" or rank != 0:
        return DummyWandb()
    kwargs = {"project": project, "name": run, "config": config}
    if not os.environ.get("WANDB_MODE") and not wandb_api_key_present():
        kwargs["mode"] = "offline"
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            kwargs["dir"] = run_dir
        where = os.path.join(run_dir or ".", "wandb")
        print0(f"wandb: no API key (run `wandb login`) and no WANDB_MODE: logging offline to {where} "
               f"(upload later with `wandb sync {where}/offline-run-*`)")
    try:
        import wandb  # imported lazily: it is slow to import and most runs don't need it

        return wandb.init(**kwargs)
    except Exception as e:  # noqa: BLE001  (any wandb failure: the training run matters more than its logging)
        print0(f"wandb: could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
               f"continuing without wandb")
        return DummyWandb()


_autocast_announced = set()


def autocast_ctx(device_type, dtype="bfloat16", cpu_bf16=False):
    """The autocast context for forward passes: bf16 on CUDA when dtype == 'bfloat16'; on CPU bf16 only
    when asked (cpu_bf16=True), otherwise plain fp32. The choice is printed once per configuration."""
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    use_bf16 = dtype == "bfloat16" and (device_type == "cuda" or (device_type == "cpu" and cpu_bf16))
    key = (device_type, use_bf16)
    if key not in _autocast_announced:
        _autocast_announced.add(key)
        print0(f"autocast: {'bfloat16' if use_bf16 else 'float32 (no autocast)'} on {device_type}")
    if use_bf16:
        return torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def get_git_commit(short=False):
    """The current git commit of the repo this file lives in, or 'unknown'."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


# Dense bf16 peak FLOPS of common accelerators (vendor datasheets), for MFU.
_PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),   # SXM; the PCIe part is 756e12, matched below first
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
    ("4090", 165e12),
]


def get_peak_flops(device):
    """Peak dense bf16 FLOPS of the device, for MFU; None on CPU/MPS or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, flops in _PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def atomic_write_bytes(path, data):
    """Write bytes so that `path` is either the old file or the complete new one, never a partial file:
    a temp file in the same directory, fsync, then os.replace (atomic on POSIX)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; checkpoints and reports are ordinary readable files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))
