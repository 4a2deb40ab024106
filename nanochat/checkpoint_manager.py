"""
The checkpoint file format: saving and loading model weights, per-rank optimizer state and JSON metadata, and
building a model from a checkpoint (nanochat's API: save_checkpoint, load_checkpoint, build_model, load_model,
find_largest_model, find_last_step).

Layout of a checkpoint directory (e.g. <base_dir>/base_checkpoints/d20/):
    model_{step:06d}.safetensors     model state_dict (rank 0), the model config in the file's metadata
                                     (nanochat's model_{step:06d}.pt is still accepted on load)
    optim_{step:06d}_rank{r}.pt      optimizer state of rank r (the distributed optimizers shard their state)
    state_{step:06d}_rank{r}.pt      run state of rank r (resumable checkpoints; written by nanochat/runs.py)
    meta_{step:06d}.json             metadata: step, model_config, user_config, git_commit, run_id, run_name,
                                     tokenizer_sha256, world_size, ... (written LAST)

Every file is written atomically (temp file + fsync + os.replace), and the meta file is written last (after a
barrier when a process group is up), so a step counts as complete only once its meta exists: a crash during a
save leaves the previous step as the latest complete one (`find_last_step`). Loading never executes code:
safetensors for weights, torch.load(weights_only=True) for optimizer state, json for metadata. A missing,
empty, truncated or garbage file, or weights whose stored model config disagrees with the meta JSON, is a
one-line UserError naming the path; weights with a NaN/inf are never saved.

Runs (output folders, resume, run state, tokenizer identity, warm start) live in nanochat/runs.py.
Tests: .venv/bin/python -m pytest tests/test_checkpoint.py
"""

import errno
import io
import json
import os
import re
import warnings

import torch
import torch.distributed as dist

from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from nanochat.checks import NonFiniteWeightsError, first_nonfinite
from nanochat.common import UserError, atomic_write_bytes, atomic_write_text, get_base_dir, print0
from nanochat.gpt import GPT, GPTConfig, config_problem

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints", "dpo": "chatdpo_checkpoints"}
COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key with this


class CheckpointError(UserError):
    """A checkpoint file that is missing pieces, corrupt, truncated, or does not match its meta file."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """No checkpoint (directory, step, or file) where one was asked for."""


def model_file(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.safetensors")


def legacy_model_file(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")  # nanochat's format, still accepted on load


def optim_file(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def meta_file(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def torch_save_atomic(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


_TORCH_ADVICE = re.compile(r"In PyTorch 2\.6.*?trusted source\.|Please file an issue.*?use case:|"
                           r"Check the documentation of torch\.load.*?\.html\.?")


def torch_error_summary(exc):
    """torch.load's error as one short phrase, without torch's advice to retry with weights_only=False (i.e. run
    the file's code: never advice for a user) or to file an issue."""
    text = " ".join(_TORCH_ADVICE.sub(" ", " ".join(str(exc).split())).split())
    text = text.split("weights_only")[0].strip()  # any other sentence about it goes too
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def torch_load_file(path, device, what):
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
        raise CheckpointError(f"{what} file {path} is corrupt or truncated ({torch_error_summary(e)}); "
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


def disk_full_error(exc, checkpoint_dir, step):
    """For an OSError raised while saving `step`: a one-line UserError when the disk (or quota) is full, saying that
    the step was not saved and which one is the last complete checkpoint; None for any other error."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    steps = [s for s in checkpoint_steps(checkpoint_dir) if s != step]
    last = f"step {steps[-1]}" if steps else "none"
    return UserError(f"disk full ({exc.strerror}) while saving step {step} to {checkpoint_dir}: step {step} was not "
                     f"saved (its temp files are removed); the last complete checkpoint there is {last}. Free some "
                     f"space (or keep fewer checkpoints with keep_last), then run again (training: resume = 1)")


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
    try:
        os.makedirs(checkpoint_dir, exist_ok=True)
        if rank == 0 and model_data is not None:
            tensors = {k: v.detach().contiguous().cpu() for k, v in model_data.items()}
            metadata = _model_config_metadata(meta_data["model_config"]) if "model_config" in meta_data else None
            atomic_write_bytes(model_file(checkpoint_dir, step), safetensors_save(tensors, metadata=metadata))
        if optimizer_data is not None:
            torch_save_atomic(optimizer_data, optim_file(checkpoint_dir, step, rank))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's optimizer file is in place before the meta marks the step complete
        if rank == 0:
            atomic_write_text(meta_file(checkpoint_dir, step), json.dumps(meta_data, indent=2))
            print0(f"Saved checkpoint step {step} to {checkpoint_dir}")
    except OSError as e:
        raise disk_full_error(e, checkpoint_dir, step) or e


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_data, optimizer_data or None, meta_data). Tensors are mapped onto `device`. The weights are
    model_<step>.safetensors (their model config must agree with the meta's) or, from older runs,
    model_<step>.pt (loaded with weights_only=True). Every problem is a one-line UserError naming the file."""
    meta_path = meta_file(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        raise MissingCheckpointError(f"no complete checkpoint for step {step} in {checkpoint_dir} "
                                     f"({meta_path} missing)")
    meta_data = _read_meta(meta_path)
    model_path = model_file(checkpoint_dir, step)
    if os.path.isfile(model_path):
        model_data, stored_config = _load_safetensors(model_path, device)
        _check_config_agrees(model_path, stored_config, meta_path, meta_data.get("model_config"))
    elif os.path.isfile(legacy_model_file(checkpoint_dir, step)):
        model_data = torch_load_file(legacy_model_file(checkpoint_dir, step), device, "model")
        if not isinstance(model_data, dict):
            raise CheckpointError(f"model file {legacy_model_file(checkpoint_dir, step)} holds a "
                                  f"{type(model_data).__name__}, expected a state_dict")
    else:
        raise MissingCheckpointError(f"model file {model_path} is missing (neither .safetensors nor .pt); the "
                                     f"checkpoint of step {step} is incomplete")
    optimizer_data = None
    if load_optimizer:
        optim_path = optim_file(checkpoint_dir, step, rank)
        nanochat_optim_path = os.path.join(checkpoint_dir, f"optim_{step:06d}.pt")  # nanochat's single rank-0 file
        if rank == 0 and not os.path.exists(optim_path) and os.path.exists(nanochat_optim_path):
            optim_path = nanochat_optim_path
        optimizer_data = torch_load_file(optim_path, device, "optimizer")
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
    problem = config_problem(config)
    if problem:
        raise CheckpointError(f"meta file {meta_path}: invalid model_config {cfg} ({problem})")
    return config


def build_model(checkpoint_dir, step, device, phase):
    """-> (model, tokenizer, meta_data): the GPT of the checkpoint's model_config, built on the meta device,
    allocated on `device` and loaded; model.eval() for phase 'eval', model.train() for 'train'."""
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    from nanochat.nanochat_import import missing_tokenizer_hint
    from nanochat.runs import check_tokenizer  # imported here: runs builds on this module
    from nanochat.tokenizer import get_tokenizer  # imported here: the tokenizer module pulls in rustbpe/tiktoken

    hint = missing_tokenizer_hint(get_base_dir(), checkpoint_dir)  # a nanochat folder: name the import command
    if hint:
        raise UserError(hint)
    tokenizer = get_tokenizer()  # first: a corrupt tokenizer file is reported as such, not as a replaced one
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device)
    check_tokenizer(checkpoint_dir, step, meta_data)  # a replaced tokenizer would make the model print garbage
    model_data = strip_compiled_prefix(model_data)
    config = _model_config_from_meta(meta_data, meta_file(checkpoint_dir, step))
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
    tags = [t for t in os.listdir(checkpoints_dir)  # hidden folders are an import's staging, not models
            if os.path.isdir(os.path.join(checkpoints_dir, t)) and not t.startswith(".")]
    if not tags:
        raise MissingCheckpointError(f"no model tags in {checkpoints_dir}: train or import a model first")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    """The largest step with a meta file (i.e. a completely written checkpoint)."""
    steps = checkpoint_steps(checkpoint_dir)
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


def checkpoint_steps(checkpoint_dir):
    """The steps of checkpoint_dir with a meta file (complete checkpoints), ascending."""
    steps = []
    if os.path.isdir(checkpoint_dir):
        for name in os.listdir(checkpoint_dir):
            m = re.fullmatch(r"meta_(\d+)\.json", name)
            if m:
                steps.append(int(m.group(1)))
    return sorted(steps)


def read_meta(checkpoint_dir, step):
    """The meta JSON of a checkpoint (cheap: no tensors), or a UserError naming the file."""
    path = meta_file(checkpoint_dir, step)
    if not os.path.exists(path):
        raise MissingCheckpointError(f"no checkpoint meta file {path}: pick an existing step (or leave `step` unset "
                                     f"for the last one)")
    return _read_meta(path)


def check_tag(tag, key="output_tag"):
    """A checkpoint folder name (output_tag, model_tag) is a plain name under its phase's checkpoints folder, never
    a path: '/', '\\', '.', '..', empty, absolute or control characters are a UserError naming `key`. -> tag."""
    if not isinstance(tag, str) or not tag.strip() or tag in (".", "..") or "/" in tag or "\\" in tag \
            or os.path.isabs(tag) or any(ord(c) < 32 for c in tag) or len(tag) > 200:
        raise UserError(f"{key} = {tag!r}: expected a plain folder name such as 'quokka-sft' (no '/', not '.' or "
                        f"'..', not empty); it names a folder under the phase's checkpoints folder, never a path")
    return tag


def find_latest_model(checkpoints_dir):
    """The model tag whose newest complete checkpoint (meta_<step>.json) was written last: the run just trained
    or imported. Folders without a complete checkpoint are not candidates (MissingCheckpointError if none is)."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingCheckpointError(f"no checkpoints directory {checkpoints_dir}: train or import a model first")
    written = {}
    for tag in os.listdir(checkpoints_dir):
        folder = os.path.join(checkpoints_dir, tag)
        steps = checkpoint_steps(folder) if os.path.isdir(folder) else []
        if steps:
            written[tag] = max(os.path.getmtime(meta_file(folder, step)) for step in steps)
    if not written:
        raise MissingCheckpointError(f"no complete checkpoints under {checkpoints_dir}: train or import a model first")
    return max(written, key=lambda tag: (written[tag], tag))


def resolve_checkpoint(source, model_tag=None, step=None, base_dir=None):
    """(checkpoint_dir, step) of <base_dir>/<source dir>/<model_tag>/ (defaults: the most recently written model
    folder, find_latest_model, said on stdout; model_tag "largest": nanochat's largest d<depth>,
    find_largest_model; the last complete step), with a UserError saying what is missing and how to make it."""
    if source not in SOURCE_DIRS:
        raise UserError(f"source must be one of {', '.join(sorted(SOURCE_DIRS))}, got {source!r}")
    checkpoints_dir = os.path.join(base_dir or get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None or model_tag == "largest":
        largest = model_tag == "largest"
        try:
            model_tag = find_largest_model(checkpoints_dir) if largest else find_latest_model(checkpoints_dir)
        except FileNotFoundError:
            raise UserError(f"no {source} checkpoints in {checkpoints_dir}: train that stage first") from None
        rule = "the largest depth" if largest else "the most recently written; 'largest' picks the largest depth"
        print0(f"Model tag: {SOURCE_DIRS[source]}/{model_tag} ({rule})")
    checkpoint_dir = os.path.join(checkpoints_dir, check_tag(model_tag, "model_tag"))
    if step is None:
        steps = checkpoint_steps(checkpoint_dir)
        if not steps:
            tags = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
            raise UserError(f"no complete checkpoints in {checkpoint_dir} (model_tag {model_tag!r}); tags there: "
                            f"{', '.join(tags) or 'none'}")
        step = steps[-1]
    return checkpoint_dir, step


def describe_checkpoint(checkpoint_dir, step, meta):
    """One line: which checkpoint this is (folder, step, run name and id) - printed whenever one is loaded."""
    run = f"run {meta.get('run_name', 'unknown')!r}, id {meta.get('run_id', 'unknown')}"
    return f"{checkpoint_dir} step {step} ({run})"
