"""
Runs: who owns an output folder, what a run resumes, its per-rank run state, the tokenizer it was trained with,
and the optimizer warm start of a fine-tune. Built on the checkpoint file format of nanochat/checkpoint_manager.py.

A run writes into one output folder (<base_dir>/<phase dir>/<output_tag>). Its meta files record `run_id`
(unique per run, kept across resumes) and `run_name`. prepare_run() is called by every training script BEFORE
any model or data is loaded: it creates the folder, proves it writable with a probe file, refuses to write into a
folder holding another run's checkpoints (unless overwrite = 1, which removes them) and finds the checkpoint to
resume. Each rank saves its own run state next to the checkpoint (state_<step>_rank<r>.pt: data position, step,
RNG, counters, loss series) BEFORE save_checkpoint writes the meta, so a meta file still marks a complete (and,
with a state file, resumable) step. tokenizer_sha256 / check_tokenizer tie a checkpoint to its tokenizer.

Safety of a run's folder: one live run owns it (nanochat/folder_lock.py), temp files of a killed save are removed at
the next start, keep_last prunes old resumable checkpoints, a resume refuses options that change the model, the
data order or the batch (check_resume_config), and Ctrl-C ends in one line naming the last checkpoint.

About 550 lines, over the ~450 of the house rule: a run's folder, resume plan and state files are one design read
from prepare_run to load_resume; the generic folder lock already lives apart.

Tests: .venv/bin/python -m pytest tests/test_runs.py
"""

import atexit
import dataclasses
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (SOURCE_DIRS, check_tag, checkpoint_steps, describe_checkpoint,
                                         disk_full_error, load_checkpoint, meta_file, model_file, optim_file, read_meta,
                                         resolve_checkpoint, save_checkpoint, torch_error_summary, torch_load_file,
                                         torch_save_atomic)
from nanochat.common import UserError, get_base_dir, get_git_commit, on_error_exit, on_interrupt, print0
from nanochat.folder_lock import lock_output_folder, release_output_folder

CHECKPOINT_FILE_RE = re.compile(r"(model|meta|optim|state|sft_state)_\d{6}[._].*")  # what overwrite removes
RUN_STATE_VERSION = 1


def run_state_path(checkpoint_dir, step, rank):
    """Per-rank run state of a resumable checkpoint."""
    return os.path.join(checkpoint_dir, f"state_{step:06d}_rank{rank}.pt")



def find_resumable_step(checkpoint_dir):
    """The largest step of checkpoint_dir that is complete (meta written last) and has a run state (rank 0's;
    the meta records the world size, and each rank checks its own file on load), or None."""
    for step in reversed(checkpoint_steps(checkpoint_dir)):
        if os.path.exists(run_state_path(checkpoint_dir, step, 0)):
            return step
    return None



def default_output_tag(output_tag, model_config):
    """The output folder name: output_tag if given (a plain folder name: check_tag), else nanochat's d<depth>."""
    if output_tag is None:
        return f"d{model_config['n_layer']}"
    return check_tag(output_tag)


def new_run_id():
    """Unique per run: start time plus random bits, e.g. '20261124-083012-5f3a9c'."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def probe_writable(directory, rank=0):
    """Create `directory` and write + remove a probe file in it, so a read-only folder fails in seconds,
    not at the first save after hours of training."""
    probe = os.path.join(directory, f".write_probe_rank{rank}_{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise UserError(f"output folder {directory} is not writable ({e.strerror}): fix its permissions, or "
                        f"write elsewhere with another output_tag or NANOCHAT_BASE_DIR") from None


TEMP_FILE_RE = re.compile(r"\.tmp-(model|meta|optim|state|sft_state)_\d{6}[._].*")  # atomic_write's, of a killed save


def remove_temp_files(directory):
    """Remove the temp files a killed save left in a checkpoint folder (call while owning it) -> how many."""
    removed = 0
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if TEMP_FILE_RE.fullmatch(name):
            os.remove(os.path.join(directory, name))
            removed += 1
    return removed


def _run_summary(checkpoint_dir, steps):
    """'run NAME (id ID), newest step N saved at TIME' of the newest checkpoint in a folder."""
    step = steps[-1]
    path = meta_file(checkpoint_dir, step)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    try:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    except OSError:
        saved = "at an unknown time"
    return meta, (f"run {meta.get('run_name', 'unknown')!r} (id {meta.get('run_id', 'unknown')}), newest step "
                  f"{step} saved {saved}")


def remove_checkpoint_files(checkpoint_dir):
    """Remove the checkpoint files (model, meta, optimizer, run state) of a folder; other files stay.
    Returns how many were removed."""
    removed = 0
    for name in sorted(os.listdir(checkpoint_dir)):
        if CHECKPOINT_FILE_RE.fullmatch(name):
            os.remove(os.path.join(checkpoint_dir, name))
            removed += 1
    return removed


SET_ASIDE_DIR = ".replaced"  # overwrite = 1: the replaced run's files wait here until the new run's first save


def set_aside_checkpoint_files(checkpoint_dir):
    """overwrite = 1: move the checkpoint files of a folder into <folder>/.replaced/ (renames: instant, no copy)
    -> how many. They are removed at the new run's first save (discard_set_aside) and put back if it stops before
    one (restore_set_aside), so a run that fails its start-up checks (a dataset missing, a bad option) replaces
    nothing."""
    aside = os.path.join(checkpoint_dir, SET_ASIDE_DIR)
    os.makedirs(aside, exist_ok=True)
    moved = 0
    for name in sorted(os.listdir(checkpoint_dir)):
        if CHECKPOINT_FILE_RE.fullmatch(name):
            os.replace(os.path.join(checkpoint_dir, name), os.path.join(aside, name))
            moved += 1
    return moved


def restore_set_aside(checkpoint_dir):
    """Put the files of set_aside_checkpoint_files back, unless the new run has saved a checkpoint of its own."""
    aside = os.path.join(checkpoint_dir, SET_ASIDE_DIR)
    if not os.path.isdir(aside) or checkpoint_steps(checkpoint_dir):
        return
    for name in sorted(os.listdir(aside)):
        os.replace(os.path.join(aside, name), os.path.join(checkpoint_dir, name))
    os.rmdir(aside)


def discard_set_aside(checkpoint_dir):
    """Remove the replaced run's set-aside files: the new run has saved its first checkpoint."""
    shutil.rmtree(os.path.join(checkpoint_dir, SET_ASIDE_DIR), ignore_errors=True)


@dataclasses.dataclass
class RunPlan:
    output_dir: str  # where this run writes
    run_id: str  # recorded in every meta it writes
    resume_dir: str = None  # the checkpoint folder to resume from (None: fresh start)
    resume_step: int = None
    resume_meta: dict = None


def parse_resume(resume):
    """The `resume` option: '0' / '' (fresh), '1' (the output folder's last resumable checkpoint), or a path."""
    resume = str(resume).strip()
    if resume in ("", "0", "False", "false"):
        return None
    if resume in ("1", "True", "true"):
        return "1"
    if not os.path.isdir(resume):
        raise UserError(f"resume = {resume!r}: expected 0 (fresh), 1 (continue the run in the output folder) or "
                        f"an existing checkpoint folder")
    return resume


def prepare_run(output_dir, resume="0", overwrite=False, rank=0, world_size=1):
    """Decide, before any model or data is loaded, where this run writes and what it resumes -> RunPlan.

    - The output folder is created and proven writable (probe_writable), and owned by this run (rank 0 takes
      its lock: lock_output_folder; another live run there is refused); temp files of a killed save are removed.
    - resume '1': continue the run whose checkpoints are in output_dir (its last resumable step; a folder
      without any checkpoint starts fresh). resume PATH: continue from that folder's last resumable step,
      writing into output_dir (which must hold no other run's checkpoints). The run id is kept.
    - A fresh run into a folder holding checkpoints stops with a UserError naming the folder, that run,
      its newest step and time, and the ways out; with overwrite = 1 the old checkpoint files are set aside
      (by rank 0; every rank waits for it) and removed at this run's first save (set_aside_checkpoint_files).
    - The resumed checkpoint's world size must match this run's."""
    resume = parse_resume(resume)
    if resume is not None and overwrite:
        raise UserError(f"resume = {resume} and overwrite = 1 contradict each other: resume continues the run in "
                        f"{output_dir}, overwrite replaces it; pass only one")
    probe_writable(output_dir, rank)
    on_interrupt(lambda step: interrupt_note(output_dir, step))  # Ctrl-C: one line saying what was saved
    lock = lock_output_folder(output_dir) if rank == 0 else None  # one lock per run: rank 0's, for every rank
    try:
        return _plan_run(output_dir, resume, overwrite, rank, world_size)
    except BaseException:
        if lock is not None:  # a refused run leaves the folder as it found it
            release_output_folder(lock)
        raise


def _plan_run(output_dir, resume, overwrite, rank, world_size):
    """prepare_run's decision, in the folder it owns."""
    if rank == 0:
        restore_set_aside(output_dir)  # files a killed overwrite = 1 run set aside before its first save
        removed = remove_temp_files(output_dir)
        if removed:
            print0(f"removed {removed} temp files of an interrupted save from {output_dir}")
    steps = checkpoint_steps(output_dir)
    plan = RunPlan(output_dir=output_dir, run_id=new_run_id())
    ways_out = ("pass resume = 1 to continue it, output_tag = <another name> to write elsewhere, or "
                "overwrite = 1 to replace it (its checkpoint files are then removed)")

    if resume is not None:
        resume_dir = output_dir if resume == "1" else resume
        step = find_resumable_step(resume_dir)
        if step is None:
            if resume == "1" and not steps:
                print0(f"resume = 1: no checkpoint in {output_dir} yet, starting a fresh run")
            elif resume == "1":
                _, who = _run_summary(output_dir, steps)
                raise UserError(f"resume = 1: {output_dir} holds checkpoints of {who} but none is resumable (saved "
                                f"without a run state, e.g. before save_every existed): use output_tag = <another "
                                f"name>, or overwrite = 1 to replace it")
            else:
                raise UserError(f"resume = {resume}: no resumable checkpoint there (a meta_<step>.json with "
                                f"state_<step>_rank0.pt, written with save_every); pick a folder of a run that "
                                f"saved with save_every, or resume = 0")
        else:
            meta = read_meta(resume_dir, step)
            plan.resume_dir, plan.resume_step, plan.resume_meta = resume_dir, step, meta
            plan.run_id = meta.get("run_id") or plan.run_id
            saved_world = meta.get("world_size")
            if saved_world is not None and saved_world != world_size:
                raise UserError(f"cannot resume {describe_checkpoint(resume_dir, step, meta)}: it was saved with world "
                                f"size {saved_world}, this run has {world_size}; resume with "
                                f"--nproc_per_node={saved_world} (the data order depends on it), or start a new run")
            if os.path.realpath(resume_dir) != os.path.realpath(output_dir) and steps:
                other, who = _run_summary(output_dir, steps)
                if other.get("run_id") != plan.run_id:
                    raise UserError(f"output folder {output_dir} already holds checkpoints of {who}: resume into "
                                    f"another output_tag (or into {resume_dir} itself with resume = 1)")
        return plan

    if steps:
        if not overwrite:
            _, who = _run_summary(output_dir, steps)
            raise UserError(f"output folder {output_dir} already holds checkpoints of {who}: {ways_out}")
        if rank == 0:  # the other ranks only wait: they must not read files that rank 0 is moving
            _, who = _run_summary(output_dir, steps)
            moved = set_aside_checkpoint_files(output_dir)
            atexit.register(restore_set_aside, output_dir)  # a run that stops before its first save replaces
            on_error_exit(lambda: restore_set_aside(output_dir))  # nothing (the one-line error exit skips atexit)
            print0(f"overwrite = 1: set aside {moved} checkpoint files of {who} in {output_dir}/{SET_ASIDE_DIR}: "
                   f"removed at this run's first save, put back if it stops before one")
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody writes before rank 0 has cleared the folder
    return plan


# Options a resumed run may change: where it writes, how it logs and evaluates, the device and kernels, and the
# source of a fine-tune (the weights come from the resumed checkpoint). Every other option of the saved run (batch
# sizes, lengths, seeds, mixtures, packing, model shape, schedule, learning rates, ...) must be the same, or the
# resumed run would silently train on other data or batches than the run it continues.
RESUME_MAY_DIFFER = frozenset({
    "run", "output_tag", "overwrite", "resume", "save_every", "keep_last", "dry_run",
    "device_type", "dtype", "compile", "pad_bucket",
    "eval_every", "eval_tokens", "eval_steps", "eval_metrics_every", "eval_metrics_tasks", "eval_max_new_tokens",
    "core_metric_every", "core_metric_max_per_task", "sample_every",
    "source", "model_tag", "step", "load_optimizer",
})


def resume_config_differences(saved_config, config):
    """[(key, saved value, this run's value)] of the options outside RESUME_MAY_DIFFER that differ between the
    resumed run's user_config and this run's config (keys missing on either side, e.g. an option added since,
    are not compared)."""
    return [(key, saved_config[key], config[key]) for key in sorted(set(saved_config) & set(config))
            if key not in RESUME_MAY_DIFFER and saved_config[key] != config[key]]


def check_resume_config(plan, config):
    """On a resume, a UserError naming every option (outside RESUME_MAY_DIFFER) whose value differs from the
    resumed run's (its meta's user_config; checkpoints without one are not checked). A no-op on a fresh start."""
    saved = (plan.resume_meta or {}).get("user_config")
    if plan.resume_dir is None or not isinstance(saved, dict):
        return
    diffs = resume_config_differences(saved, config)
    if diffs:
        listed = "; ".join(f"{key} = {now!r} (the run had {was!r})" for key, was, now in diffs)
        raise UserError(f"cannot resume {describe_checkpoint(plan.resume_dir, plan.resume_step, plan.resume_meta)}: "
                        f"options that change the model, the data order or the batch differ from that run's: "
                        f"{listed}; resume with the run's values, or start a new run (resume = 0, another "
                        f"output_tag)")


def prepare_finetune(source, model_tag, step, checkpoints_dir_name, output_tag, resume="0", overwrite=False, rank=0,
                     world_size=1, check_optimizer=False, base_dir=None):
    """The output folder and resume decision of a run that starts from another stage's checkpoint (mid_train,
    chat_sft), before any model or data is loaded: resolve the source checkpoint, check its tokenizer (and, with
    check_optimizer on a fresh start, its optimizer state for a warm start: check_warm_start), then prepare_run
    into <base_dir>/<checkpoints_dir_name>/<output_tag or d<depth>> (default tag <source tag>-ft when d<depth>
    would be the source folder itself: continued fine-tuning of an SFT checkpoint). Returns (source_dir, source_step,
    source_meta, plan); the output folder is plan.output_dir."""
    source_dir, source_step = resolve_checkpoint(source, model_tag, step, base_dir)
    source_meta = read_meta(source_dir, source_step)
    check_tokenizer(source_dir, source_step, source_meta)
    if check_optimizer and parse_resume(resume) is None:  # a warm start needs the source's optimizer state
        check_warm_start(source_dir, source_step, rank, world_size)
    tag = default_output_tag(output_tag, source_meta["model_config"])
    output_dir = os.path.join(base_dir or get_base_dir(), checkpoints_dir_name, tag)
    if not output_tag and os.path.realpath(output_dir) == os.path.realpath(source_dir):
        # continued fine-tuning (source = sft): never write into the folder being fine-tuned
        output_dir = os.path.join(os.path.dirname(output_dir), f"{os.path.basename(source_dir)}-ft")
    return source_dir, source_step, source_meta, prepare_run(output_dir, resume, overwrite, rank, world_size)


def get_rng_state(device):
    """torch (CPU and, on CUDA, the device's), python and numpy RNG states, for a bit-exact resume. Only
    tensors, ints, floats and strings, so torch.load(weights_only=True) reads it back (no pickled code)."""
    import numpy as np

    device = torch.device(device)
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    import numpy as np

    device = torch.device(device)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_run_state(checkpoint_dir, step, rank, world_size, num_iterations, data_state, counters, loss_series,
                   device):
    """Write this rank's run state for `step` (atomically): call it BEFORE save_checkpoint, whose meta (written
    last, after a barrier) then marks the step complete and resumable. data_state: the loader position of
    the next batch (JSON-like); counters: running totals (dict of numbers); loss_series: dict of lists."""
    state = {"version": RUN_STATE_VERSION, "step": step, "world_size": world_size, "num_iterations": num_iterations,
             "data_state": data_state, "rng": get_rng_state(device), "counters": counters,
             "loss_series": loss_series}
    torch_save_atomic(state, run_state_path(checkpoint_dir, step, rank))


def load_run_state(checkpoint_dir, step, rank, world_size, num_iterations, device):
    """Read this rank's run state, check that this run matches it (world size, schedule), restore the RNG
    states and return the state dict (step, data_state, counters, loss_series)."""
    path = run_state_path(checkpoint_dir, step, rank)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain data: loading runs no code
    except FileNotFoundError:
        raise UserError(f"cannot resume {checkpoint_dir} step {step}: {path} is missing (saved with another "
                        f"number of ranks?)") from None
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: say which one)
        raise UserError(f"cannot resume from {path}: not a readable run state ({torch_error_summary(e)})") from None
    if not isinstance(state, dict) or state.get("version") != RUN_STATE_VERSION:
        raise UserError(f"cannot resume from {path}: unknown run state format")
    if state["world_size"] != world_size:
        raise UserError(f"cannot resume {checkpoint_dir} step {step}: saved with world size {state['world_size']}, "
                        f"this run has {world_size}; resume with --nproc_per_node={state['world_size']}")
    if state["num_iterations"] != num_iterations:
        raise UserError(f"cannot resume {checkpoint_dir} step {step}: it belongs to a schedule of "
                        f"{state['num_iterations']} steps, this run's options give {num_iterations}; resume with "
                        f"the options of that run (num_iterations, batch sizes, data), or start a new run")
    if state["step"] >= num_iterations:
        raise UserError(f"the run in {checkpoint_dir} already finished (step {state['step']} of {num_iterations}): "
                        f"nothing to resume; use its checkpoint as is, or start a new run (resume = 0 with another "
                        f"output_tag, or overwrite = 1)")
    set_rng_state(state["rng"], device)
    return state


def load_resume(checkpoint_dir, step, optimizers, rank, world_size, num_iterations, device):
    """Resume a run from checkpoint `step`: this rank's run state (load_run_state: checks, RNG states) and every
    optimizer's state (the model's weights come with build_model). Returns the run state."""
    run_state = load_run_state(checkpoint_dir, step, rank, world_size, num_iterations, device)
    _, optimizer_data, _ = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    for opt, opt_state in zip(optimizers, optimizer_data):
        opt.load_state_dict(opt_state)
    return run_state


def save_training_checkpoint(checkpoint_dir, step, model, optimizers, run_state, meta, rank=0, world_size=1,
                             device="cpu"):
    """One resumable checkpoint of a training script (base_train, mid_train, chat_sft), in crash-safe order:
    this rank's run state (run_state: the keyword arguments num_iterations, data_state, counters, loss_series of
    save_run_state), then save_checkpoint: the model (rank 0), this rank's optimizer states and, last, the meta:
    step, model_config, git_commit, world_size and num_iterations, then the script's fields (run_id,
    user_config, ...; they cannot replace the first four)."""
    try:
        save_run_state(checkpoint_dir, step, rank, world_size, device=device, **run_state)
    except OSError as e:
        raise disk_full_error(e, checkpoint_dir, step) or e
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), "git_commit": get_git_commit(),
            "world_size": world_size, "num_iterations": run_state["num_iterations"],
            **{k: v for k, v in meta.items() if k not in ("step", "model_config", "world_size", "num_iterations")}}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers], meta, rank=rank)
    if rank == 0:
        discard_set_aside(checkpoint_dir)  # overwrite = 1: the replaced run's files go once this run has saved


def interrupt_note(output_dir, step):
    """The line printed when Ctrl-C stops a run writing into output_dir at `step` (None: before its loop)."""
    where = "stopped (Ctrl-C)" if step is None else f"stopped at step {step} (Ctrl-C)"
    steps = [s for s in checkpoint_steps(output_dir) if os.path.exists(run_state_path(output_dir, s, 0))]
    if steps:
        return f"{where}; the last checkpoint is step {steps[-1]} in {output_dir}; resume with resume = 1"
    return f"{where}; no checkpoint saved in {output_dir} (save_every = N saves resumable ones)"


def prune_checkpoints(checkpoint_dir, keep_last, rank=0):
    """keep_last >= 1: remove this rank's files of the resumable checkpoints older than the newest keep_last (each
    rank its run state and optimizer state; rank 0 first the meta, so a half-removed step never looks complete,
    then the model). Checkpoints without a run state (not resumable) stay. -1 keeps all. -> the removed steps."""
    if keep_last < 1:
        return []
    steps = sorted(int(m.group(1)) for name in os.listdir(checkpoint_dir)
                   if (m := re.fullmatch(rf"state_(\d{{6}})_rank{rank}\.pt", name)))
    removed = steps[:-keep_last]
    for step in removed:
        paths = [meta_file(checkpoint_dir, step), model_file(checkpoint_dir, step)] if rank == 0 else []
        for path in paths + [optim_file(checkpoint_dir, step, rank), run_state_path(checkpoint_dir, step, rank)]:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
    return removed


# ----------------------------------------------------------------------------------------------------------
# Tokenizer identity: checkpoints record the sha256 of the tokenizer they were trained with


def tokenizer_sha256(tokenizer_dir=None):
    """sha256 (hex) of the tokenizer's saved files (its ranks and its metadata; token_bytes is derived from
    them), or None when there is no tokenizer there."""
    from nanochat.tokenizer import META_FILE, RANKS_FILE

    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    h = hashlib.sha256()
    for name in (META_FILE, RANKS_FILE):
        path = os.path.join(tokenizer_dir, name)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def check_tokenizer(checkpoint_dir, step, meta, tokenizer_dir=None):
    """UserError if the checkpoint records a tokenizer sha256 that differs from the tokenizer on disk
    (checkpoints from before the hash was recorded are not checked)."""
    want = meta.get("tokenizer_sha256")
    if not want:
        return
    tokenizer_dir = tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    have = tokenizer_sha256(tokenizer_dir)
    if have != want:
        raise UserError(f"checkpoint {checkpoint_dir} step {step} was trained with tokenizer sha256 {want[:16]}..., "
                        f"but {tokenizer_dir} is {'missing' if have is None else f'sha256 {have[:16]}...'}: the "
                        f"tokenizer was replaced (tok_train?); restore the original tokenizer or retrain the model "
                        f"with this one")


def checkpoints_trained_with(tokenizer_sha, base_dir=None):
    """Checkpoint folders under the base dir whose newest meta records this tokenizer (or records none, i.e.
    saved before the hash existed: they were trained with whatever tokenizer was there)."""
    base_dir = base_dir or get_base_dir()
    found = []
    for source_dir in SOURCE_DIRS.values():
        root = os.path.join(base_dir, source_dir)
        if not os.path.isdir(root):
            continue
        for tag in sorted(os.listdir(root)):
            steps = checkpoint_steps(os.path.join(root, tag))
            if not steps:
                continue
            try:
                with open(meta_file(os.path.join(root, tag), steps[-1]), encoding="utf-8") as f:
                    recorded = json.load(f).get("tokenizer_sha256")
            except (OSError, ValueError):
                recorded = None
            if recorded in (None, tokenizer_sha):
                found.append(os.path.join(source_dir, tag))
    return found


_WARM_START_FIX = "set load_optimizer = 0 to start the optimizers cold, or pick a source saved with its optimizer state"


def check_warm_start(checkpoint_dir, step, rank=0, world_size=1):
    """The optimizer-state file of this rank that chat_sft's load_optimizer = 1 would read from the source
    checkpoint, checked before anything is loaded: a UserError when it is missing or was saved by a different
    number of ranks (the distributed optimizers shard their state). Returns its path."""
    path = optim_file(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        raise UserError(f"load_optimizer = 1: the checkpoint {checkpoint_dir} step {step} has no optimizer state for "
                        f"rank {rank} ({path} is missing); {_WARM_START_FIX}")
    saved_world_size = read_meta(checkpoint_dir, step).get("world_size")
    if saved_world_size is None and os.path.exists(optim_file(checkpoint_dir, step, world_size)):
        saved_world_size = f"more than {world_size}"
    if saved_world_size is not None and saved_world_size != world_size:
        raise UserError(f"load_optimizer = 1: the optimizer state in {checkpoint_dir} step {step} was saved by "
                        f"{saved_world_size} ranks, this run has {world_size} (the state is sharded per rank); "
                        f"run with {saved_world_size} ranks or {_WARM_START_FIX}")
    return path


def load_optimizer_warm_start(optimizers, checkpoint_dir, step, device, rank=0, world_size=1):
    """Warm start (chat_sft's load_optimizer = 1): copy the per-parameter state (AdamW moments and step
    count, Muon momentum buffers) of checkpoint `step` in checkpoint_dir (the source the model was loaded from,
    as resolve_checkpoint / prepare_finetune found it) into `optimizers`, keeping their own hyperparameters
    (learning rates, betas, ...). Checked by check_warm_start; a file holding other parameters is a UserError too.
    Returns the path the state was read from."""
    path = check_warm_start(checkpoint_dir, step, rank, world_size)
    saved = torch_load_file(path, device, "optimizer")
    if not isinstance(saved, (list, tuple)) or len(saved) != len(optimizers):
        raise UserError(f"load_optimizer = 1: {path} does not hold the state of {len(optimizers)} optimizers; "
                        f"{_WARM_START_FIX}")
    for opt, saved_state in zip(optimizers, saved):
        current = opt.state_dict()
        counts = [len(g["params"]) for g in current["param_groups"]]
        saved_counts = [len(g["params"]) for g in saved_state.get("param_groups", [])]
        if counts != saved_counts:
            raise UserError(f"load_optimizer = 1: {path} holds parameter groups of sizes {saved_counts}, the model "
                            f"has {counts}; {_WARM_START_FIX}")
        current["state"] = saved_state["state"]  # moments only: the param_groups (lrs) stay this run's
        opt.load_state_dict(current)
    return path
