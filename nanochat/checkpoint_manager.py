"""
Saving and loading checkpoints: model weights, per-rank optimizer state and JSON metadata.

Layout of a checkpoint directory (e.g. <base_dir>/base_checkpoints/d20/):
    model_{step:06d}.safetensors     model state_dict (rank 0), the model config in the file's metadata
                                     (nanochat's model_{step:06d}.pt is still accepted on load)
    optim_{step:06d}_rank{r}.pt      optimizer state of rank r (the distributed optimizers shard their state)
    state_{step:06d}_rank{r}.pt      run state of rank r (resumable checkpoints: data position, RNG, counters, ...)
    meta_{step:06d}.json             metadata: step, model_config, user_config, git_commit, run_id, run_name,
                                     tokenizer_sha256, world_size, ... (written LAST)

Every file is written atomically (temp file + fsync + os.replace), and the meta file is written last (after a
barrier when a process group is up), so a step counts as complete only once its meta exists: a crash during a
save leaves the previous step as the latest complete one (`find_last_step`). Loading never executes code:
safetensors for weights, torch.load(weights_only=True) for optimizer state, json for metadata. A missing,
empty, truncated or garbage file, or weights whose stored model config disagrees with the meta JSON, is a
one-line UserError naming the path; weights with a NaN/inf are never saved.

Runs (the second half of this file): prepare_run() gives every training script, before it loads any model
or data, its output folder (created, probed writable, refused if another run's checkpoints are there unless
overwrite) and what to resume; save_run_state / load_run_state / find_resumable_step are the one resume
design of base_train, mid_train and chat_sft; tokenizer_sha256 / check_tokenizer tie a checkpoint to its
tokenizer. Tests: tests/test_runs.py.

Tests: .venv/bin/python -m pytest tests/test_checkpoint.py
"""

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import secrets
import time
import warnings

import torch
import torch.distributed as dist

from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from nanochat.checks import NonFiniteWeightsError, first_nonfinite
from nanochat.common import UserError, atomic_write_bytes, atomic_write_text, get_base_dir, get_git_commit, print0
from nanochat.config import Option
from nanochat.gpt import GPT, GPTConfig

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key with this


class CheckpointError(UserError):
    """A checkpoint file that is missing pieces, corrupt, truncated, or does not match its meta file."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """No checkpoint (directory, step, or file) where one was asked for."""


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.safetensors")


def _legacy_model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")  # nanochat's format, still accepted on load


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _torch_save_atomic(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _torch_load(path, device, what):
    """torch.load(weights_only=True) of a file we wrote, with a one-line error naming the path when it is
    missing, empty, truncated or not a torch file (torch raises EOFError, UnpicklingError, RuntimeError, ...)."""
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"{what} file {path} is missing; the checkpoint is incomplete")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} file {path} is empty (0 bytes); the checkpoint is corrupt: re-save it or "
                              f"load another step")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of garbage before failing on it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  (any parse failure of the file means it is corrupt)
        # torch's own advice (retry with weights_only=False, i.e. run the file's code) is cut: never for a user
        problem = " ".join(str(e).split()).split(" In PyTorch 2.6")[0][:200] or type(e).__name__
        raise CheckpointError(f"{what} file {path} is corrupt or truncated ({type(e).__name__}: {problem}); "
                              f"re-save it or load another step") from e


def _model_config_metadata(model_config):
    """The safetensors metadata of a weights file: the model config as canonical JSON (values must be str)."""
    return {"model_config": json.dumps(model_config, sort_keys=True)}


def _load_safetensors(path, device):
    """-> (state_dict on `device`, model_config dict or None) of a weights file; CheckpointError naming the path
    when the file is empty, truncated, garbage, or its metadata is not ours."""
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"model file {path} is empty (0 bytes); the checkpoint is corrupt: re-save it or "
                              f"load another step")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (SafetensorError and friends: the file is not a whole safetensors file)
        raise CheckpointError(f"model file {path} is not a valid safetensors file ({' '.join(str(e).split())}); "
                              f"it is corrupt or truncated: re-save it or load another step") from e
    model_config = None
    if "model_config" in metadata:
        try:
            model_config = json.loads(metadata["model_config"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"model file {path}: its model_config metadata is not JSON ({e})") from e
    return {k: v.to(device) for k, v in state_dict.items()}, model_config


def _read_meta(meta_path):
    """The meta JSON as a dict; CheckpointError naming the path when it is empty, not UTF-8, not JSON, or not
    an object."""
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
        meta_data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"meta file {meta_path} is not UTF-8 text (byte {e.start}); it is corrupt") from e
    except json.JSONDecodeError as e:
        problem = "empty" if not raw.strip() else f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        raise CheckpointError(f"meta file {meta_path} is {problem}; it is corrupt or truncated") from e
    if not isinstance(meta_data, dict):
        raise CheckpointError(f"meta file {meta_path} holds a JSON {type(meta_data).__name__}, expected an object")
    return meta_data


def _check_config_agrees(model_path, stored, meta_path, meta_config):
    """The model config in the weights file must equal the meta JSON's (same shapes with, say, another n_head
    would load silently and compute something else)."""
    if stored is None or meta_config is None:
        return
    diffs = [f"{k} = {stored.get(k)!r} in the weights file but {meta_config.get(k)!r} in the meta file"
             for k in sorted(set(stored) | set(meta_config)) if stored.get(k) != meta_config.get(k)]
    if diffs:
        raise CheckpointError(f"{model_path} and {meta_path} disagree on the model config: {'; '.join(diffs)}. "
                              f"The meta file does not belong to these weights: restore it or re-save the checkpoint")


def strip_compiled_prefix(state_dict):
    """Remove torch.compile's '_orig_mod.' key prefix (as a prefix: str.lstrip would eat leading characters)."""
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state_dict.items()}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Rank 0 writes the model and (last) the meta; every rank writes its own optimizer state (if given).
    model_data: a state_dict, written as safetensors with meta_data["model_config"] in the file's metadata.
    optimizer_data: anything torch.save can store with plain tensors/containers (e.g. [opt.state_dict(), ...]).
    Weights with a NaN/inf are refused (NonFiniteWeightsError): a poisoned checkpoint is never written."""
    if model_data is not None:  # every rank that holds the weights checks, so no rank waits alone at the barrier
        bad = first_nonfinite(model_data.items())
        if bad is not None:
            raise NonFiniteWeightsError(f"refusing to save step {step} to {checkpoint_dir}: parameter '{bad}' is "
                                        f"non-finite (NaN/inf); lower the learning rates and restart from the last "
                                        f"good checkpoint")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and model_data is not None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_data.items()}
        metadata = _model_config_metadata(meta_data["model_config"]) if "model_config" in meta_data else None
        atomic_write_bytes(_model_path(checkpoint_dir, step), safetensors_save(tensors, metadata=metadata))
    if optimizer_data is not None:
        _torch_save_atomic(optimizer_data, _optim_path(checkpoint_dir, step, rank))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank's optimizer file is in place before the meta marks the step complete
    if rank == 0:
        atomic_write_text(_meta_path(checkpoint_dir, step), json.dumps(meta_data, indent=2))
        print0(f"Saved checkpoint step {step} to {checkpoint_dir}")


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_data, optimizer_data or None, meta_data). Tensors are mapped onto `device`. The weights are
    model_<step>.safetensors (their model config must agree with the meta's) or, from older runs,
    model_<step>.pt (loaded with weights_only=True). Every problem is a one-line UserError naming the file."""
    meta_path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        raise MissingCheckpointError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                                     f"({meta_path} missing)")
    meta_data = _read_meta(meta_path)
    model_path = _model_path(checkpoint_dir, step)
    if os.path.isfile(model_path):
        model_data, stored_config = _load_safetensors(model_path, device)
        _check_config_agrees(model_path, stored_config, meta_path, meta_data.get("model_config"))
    elif os.path.isfile(_legacy_model_path(checkpoint_dir, step)):
        model_data = _torch_load(_legacy_model_path(checkpoint_dir, step), device, "model")
        if not isinstance(model_data, dict):
            raise CheckpointError(f"model file {_legacy_model_path(checkpoint_dir, step)} holds a "
                                  f"{type(model_data).__name__}, expected a state_dict")
    else:
        raise MissingCheckpointError(f"model file {model_path} is missing (neither .safetensors nor .pt); the "
                                     f"checkpoint of step {step} is incomplete")
    optimizer_data = None
    if load_optimizer:
        optim_path = _optim_path(checkpoint_dir, step, rank)
        nanochat_optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")  # nanochat's single rank-0 file
        if rank == 0 and not os.path.exists(optim_path) and os.path.exists(nanochat_optim_path):
            optim_path = nanochat_optim_path
        optimizer_data = _torch_load(optim_path, device, "optimizer")
    return model_data, optimizer_data, meta_data


def _model_config_from_meta(meta_data, meta_path):
    """GPTConfig of a meta file, checked so that a bad one is a one-line error, not an assert in GPT()."""
    cfg = meta_data.get("model_config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"meta file {meta_path} has no model_config object")
    try:
        config = GPTConfig(**cfg)
    except TypeError as e:
        raise CheckpointError(f"meta file {meta_path}: model_config does not fit GPTConfig ({e})") from e
    fields = (config.sequence_len, config.vocab_size, config.n_layer, config.n_head, config.n_kv_head, config.n_embd)
    if not all(isinstance(v, int) and v > 0 for v in fields) or config.n_embd % config.n_head \
            or config.n_head % config.n_kv_head or (config.n_embd // config.n_head) % 2:
        raise CheckpointError(f"meta file {meta_path}: invalid model_config {cfg} (positive ints; n_embd a multiple "
                              f"of n_head with an even head size; n_head a multiple of n_kv_head)")
    return config


def build_model(checkpoint_dir, step, device, phase):
    """-> (model, tokenizer, meta_data): the GPT of the checkpoint's model_config, built on the meta device,
    allocated on `device` and loaded; model.eval() for phase 'eval', model.train() for 'train'."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    from nanochat.nanochat_import import missing_tokenizer_hint
    from nanochat.tokenizer import get_tokenizer  # imported here: the tokenizer module pulls in rustbpe/tiktoken

    hint = missing_tokenizer_hint(get_base_dir(), checkpoint_dir)  # a nanochat folder: name the import command
    if hint:
        raise UserError(hint)
    tokenizer = get_tokenizer()  # first: a corrupt tokenizer file is reported as such, not as a replaced one
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device)
    check_tokenizer(checkpoint_dir, step, meta_data)  # a replaced tokenizer would make the model print garbage
    model_data = strip_compiled_prefix(model_data)
    config = _model_config_from_meta(meta_data, _meta_path(checkpoint_dir, step))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # computes the rotary tables (buffers aren't saved) and sets the embedding dtype
    try:
        model.load_state_dict(model_data, strict=True)  # copies into each parameter's dtype (bf16 <-> fp32)
    except RuntimeError as e:
        problem = " ".join(str(e).split())[:300]
        raise CheckpointError(f"the weights of step {step} in {checkpoint_dir} do not fit the model_config of its "
                              f"meta file: {problem}") from e
    model.train() if phase == "train" else model.eval()
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model of "
                              f"{checkpoint_dir} "
                              f"only {config.vocab_size}: this tokenizer was not the one the model was trained with")
    return model, tokenizer, meta_data


def find_largest_model(checkpoints_dir):
    """The model tag with the largest depth (tags 'd<depth>'), else the most recently modified directory."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingCheckpointError(f"no checkpoints directory {checkpoints_dir}: train or import a model first")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise MissingCheckpointError(f"no model tags in {checkpoints_dir}: train or import a model first")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    """The largest step with a meta file (i.e. a completely written checkpoint)."""
    steps = _meta_steps(checkpoint_dir)
    if not steps:
        raise MissingCheckpointError(f"no complete checkpoints (meta_<step>.json) in {checkpoint_dir}")
    return steps[-1]


def load_model(source, device, phase, model_tag=None, step=None):
    """-> (model, tokenizer, meta_data) from <base_dir>/<source dir>/<model_tag>/ at `step`
    (defaults: the largest model, its last complete step)."""
    if source not in SOURCE_DIRS:
        raise UserError(f"source must be one of {', '.join(sorted(SOURCE_DIRS))}, got {source!r}")
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    model, tokenizer, meta_data = build_model(checkpoint_dir, step, device, phase)
    print0(f"Loaded checkpoint: {describe_checkpoint(checkpoint_dir, step, meta_data)}")
    return model, tokenizer, meta_data


# ----------------------------------------------------------------------------------------------------------
# Runs: who owns an output folder, the writable probe, one resume design for every training script
#
# A run writes into one output folder (<base_dir>/<phase dir>/<output_tag>). Its meta files record
# `run_id` (unique per run, kept across resumes) and `run_name`. prepare_run() is called by every training
# script BEFORE any model or data is loaded: it creates the folder, proves it writable with a probe file,
# refuses to write into a folder holding another run's checkpoints (unless overwrite = 1, which removes
# them) and finds the checkpoint to resume. Each rank saves its own run state next to the checkpoint
# (state_<step>_rank<r>.pt: data position, step, RNG, counters, loss series) BEFORE save_checkpoint writes
# the meta, so a meta file still marks a complete (and, with a state file, resumable) step.

def run_options(checkpoints_dir_name):
    """The options of every training script for where it writes and what it resumes (README: "Runs, output
    folders and resume"), declared once here; checkpoints_dir_name is e.g. "chatsft_checkpoints"."""
    return [
        Option("output_tag", str, None, f"output folder name under {checkpoints_dir_name}/ (default: d<depth>)"),
        Option("overwrite", int, 0, "1: replace the checkpoints of another run in the output folder", choices=(0, 1)),
        Option("save_every", int, -1, "resumable checkpoint every this many steps (-1 disables; the final one is "
                                      "always)", min=1, disabled=-1),
        Option("resume", str, "0", "0: fresh run; 1: continue the run in the output folder from its last resumable "
                                   "checkpoint (fresh if the folder is empty); or a checkpoint folder to continue from"),
    ]


CHECKPOINT_FILE_RE = re.compile(r"(model|meta|optim|state|sft_state)_\d{6}[._].*")  # what overwrite removes
RUN_STATE_VERSION = 1


def run_state_path(checkpoint_dir, step, rank):
    """Per-rank run state of a resumable checkpoint."""
    return os.path.join(checkpoint_dir, f"state_{step:06d}_rank{rank}.pt")


def _meta_steps(checkpoint_dir):
    steps = []
    if os.path.isdir(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            m = re.fullmatch(r"meta_(\d+)\.json", name)
            if m:
                steps.append(int(m.group(1)))
    return sorted(steps)


def read_meta(checkpoint_dir, step):
    """The meta JSON of a checkpoint (cheap: no tensors), or a UserError naming the file."""
    path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise MissingCheckpointError(f"no checkpoint meta file {path}: pick an existing step (or leave `step` unset "
                                     f"for the last one)")
    return _read_meta(path)


def find_resumable_step(checkpoint_dir):
    """The largest step of checkpoint_dir that is complete (meta written last) and has a run state (rank 0's;
    the meta records the world size, and each rank checks its own file on load), or None."""
    for step in reversed(_meta_steps(checkpoint_dir)):
        if os.path.exists(run_state_path(checkpoint_dir, step, 0)):
            return step
    return None


def resolve_checkpoint(source, model_tag=None, step=None, base_dir=None):
    """(checkpoint_dir, step) of <base_dir>/<source dir>/<model_tag>/ (defaults: the largest model, its last
    complete step), with a UserError saying what is missing and how to make it."""
    checkpoints_dir = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        try:
            model_tag = find_largest_model(checkpoints_dir)
        except FileNotFoundError:
            raise UserError(f"no {source} checkpoints in {checkpoints_dir}: train that stage first") from None
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        steps = _meta_steps(checkpoint_dir)
        if not steps:
            tags = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
            raise UserError(f"no complete checkpoints in {checkpoint_dir} (model_tag {model_tag!r}); tags there: "
                            f"{', '.join(tags) or 'none'}")
        step = steps[-1]
    return checkpoint_dir, step


def default_output_tag(output_tag, model_config):
    """The output folder name: output_tag if given (a plain folder name), else nanochat's d<depth>."""
    if not output_tag:
        return f"d{model_config['n_layer']}"
    if output_tag in (".", "..") or "/" in output_tag or os.sep in output_tag:
        raise UserError(f"output_tag = {output_tag!r}: expected a plain folder name such as 'quokka-sft' (the "
                        f"folder is created under the phase's checkpoints folder)")
    return output_tag


def describe_checkpoint(checkpoint_dir, step, meta):
    """One line: which checkpoint this is (folder, step, run name and id) - printed whenever one is loaded."""
    run = f"run {meta.get('run_name', 'unknown')!r}, id {meta.get('run_id', 'unknown')}"
    return f"{checkpoint_dir} step {step} ({run})"


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


def _run_summary(checkpoint_dir, steps):
    """'run NAME (id ID), newest step N saved at TIME' of the newest checkpoint in a folder."""
    step = steps[-1]
    path = _meta_path(checkpoint_dir, step)
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

    - The output folder is created and proven writable (probe_writable).
    - resume '1': continue the run whose checkpoints are in output_dir (its last resumable step; a folder
      without any checkpoint starts fresh). resume PATH: continue from that folder's last resumable step,
      writing into output_dir (which must hold no other run's checkpoints). The run id is kept.
    - A fresh run into a folder holding checkpoints stops with a UserError naming the folder, that run,
      its newest step and time, and the ways out; with overwrite = 1 the old checkpoint files are removed
      (by rank 0; every rank waits for it).
    - The resumed checkpoint's world size must match this run's."""
    resume = parse_resume(resume)
    if resume is not None and overwrite:
        raise UserError(f"resume = {resume} and overwrite = 1 contradict each other: resume continues the run in "
                        f"{output_dir}, overwrite replaces it; pass only one")
    probe_writable(output_dir, rank)
    steps = _meta_steps(output_dir)
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
        if rank == 0:  # the other ranks only wait: they must not read files that rank 0 is removing
            _, who = _run_summary(output_dir, steps)
            removed = remove_checkpoint_files(output_dir)
            print0(f"overwrite = 1: removed {removed} checkpoint files of {who} from {output_dir}")
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody writes before rank 0 has cleared the folder
    return plan


def prepare_finetune(source, model_tag, step, checkpoints_dir_name, output_tag, resume="0", overwrite=False, rank=0,
                     world_size=1, check_optimizer=False, base_dir=None):
    """The output folder and resume decision of a run that starts from another stage's checkpoint (mid_train,
    chat_sft), before any model or data is loaded: resolve the source checkpoint, check its tokenizer (and, with
    check_optimizer on a fresh start, its optimizer state for a warm start: check_warm_start), then prepare_run
    into <base_dir>/<checkpoints_dir_name>/<output_tag or d<depth>>. Returns (source_dir, source_step,
    source_meta, plan); the output folder is plan.output_dir."""
    source_dir, source_step = resolve_checkpoint(source, model_tag, step, base_dir)
    source_meta = read_meta(source_dir, source_step)
    check_tokenizer(source_dir, source_step, source_meta)
    if check_optimizer and parse_resume(resume) is None:  # a warm start needs the source's optimizer state
        check_warm_start(source_dir, source_step, rank, world_size)
    tag = default_output_tag(output_tag, source_meta["model_config"])
    output_dir = os.path.join(base_dir or get_base_dir(), checkpoints_dir_name, tag)
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
    _torch_save_atomic(state, run_state_path(checkpoint_dir, step, rank))


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
        raise UserError(f"cannot resume from {path}: not a readable run state ({type(e).__name__}: {e})") from None
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
    save_run_state(checkpoint_dir, step, rank, world_size, device=device, **run_state)
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), "git_commit": get_git_commit(),
            "world_size": world_size, "num_iterations": run_state["num_iterations"],
            **{k: v for k, v in meta.items() if k not in ("step", "model_config", "world_size", "num_iterations")}}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers], meta, rank=rank)


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
            steps = _meta_steps(os.path.join(root, tag))
            if not steps:
                continue
            try:
                with open(_meta_path(os.path.join(root, tag), steps[-1]), encoding="utf-8") as f:
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
    path = _optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(path):
        raise UserError(f"load_optimizer = 1: the checkpoint {checkpoint_dir} step {step} has no optimizer state for "
                        f"rank {rank} ({path} is missing); {_WARM_START_FIX}")
    saved_world_size = read_meta(checkpoint_dir, step).get("world_size")
    if saved_world_size is None and os.path.exists(_optim_path(checkpoint_dir, step, world_size)):
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
    saved = _torch_load(path, device, "optimizer")
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
