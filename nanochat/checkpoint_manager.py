"""
Saving and loading checkpoints: model weights, per-rank optimizer state and JSON metadata.

Layout of a checkpoint directory (e.g. <base_dir>/base_checkpoints/d20/):
    model_{step:06d}.pt              model state_dict (rank 0)
    optim_{step:06d}_rank{r}.pt      optimizer state of rank r (the distributed optimizers shard their state)
    meta_{step:06d}.json             metadata: step, model_config, user_config, git_commit, ... (written LAST)

Every file is written atomically (temp file + fsync + os.replace), and the meta file is written last (after a
barrier when a process group is up), so a step counts as complete only once its meta exists: a crash during a
save leaves the previous step as the latest complete one (`find_last_step`). Loading never executes code:
torch.load(weights_only=True) for tensors, json for metadata.

Tests: .venv/bin/python -m pytest tests/test_checkpoint.py
"""

import glob
import io
import json
import os
import re

import torch
import torch.distributed as dist

from nanochat.common import atomic_write_bytes, atomic_write_text, get_base_dir, print0
from nanochat.gpt import GPT, GPTConfig

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key with this


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _torch_save_atomic(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def strip_compiled_prefix(state_dict):
    """Remove torch.compile's '_orig_mod.' key prefix (as a prefix: str.lstrip would eat leading characters)."""
    return {k.removeprefix(COMPILED_PREFIX): v for k, v in state_dict.items()}


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Rank 0 writes the model and (last) the meta; every rank writes its own optimizer state (if given).
    optimizer_data: anything torch.save can store with plain tensors/containers (e.g. [opt.state_dict(), ...])."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and model_data is not None:
        _torch_save_atomic(model_data, _model_path(checkpoint_dir, step))
    if optimizer_data is not None:
        _torch_save_atomic(optimizer_data, _optim_path(checkpoint_dir, step, rank))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # every rank's optimizer file is in place before the meta marks the step complete
    if rank == 0:
        atomic_write_text(_meta_path(checkpoint_dir, step), json.dumps(meta_data, indent=2))
        print0(f"Saved checkpoint step {step} to {checkpoint_dir}")


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_data, optimizer_data or None, meta_data). Tensors are mapped onto `device`."""
    meta_path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {checkpoint_dir} ({meta_path} missing)")
    model_data = torch.load(_model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    optimizer_data = None
    if load_optimizer:
        optimizer_data = torch.load(_optim_path(checkpoint_dir, step, rank), map_location=device, weights_only=True)
    with open(meta_path, encoding="utf-8") as f:
        meta_data = json.load(f)
    return model_data, optimizer_data, meta_data


def build_model(checkpoint_dir, step, device, phase):
    """-> (model, tokenizer, meta_data): the GPT of the checkpoint's model_config, built on the meta device,
    allocated on `device` and loaded; model.eval() for phase 'eval', model.train() for 'train'."""
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval', got {phase!r}"
    from nanochat.tokenizer import get_tokenizer  # imported here: the tokenizer module pulls in rustbpe/tiktoken

    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device)
    model_data = strip_compiled_prefix(model_data)
    config = GPTConfig(**meta_data["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # computes the rotary tables (buffers aren't saved) and sets the embedding dtype
    model.load_state_dict(model_data, strict=True)  # copies into each parameter's dtype (bf16 <-> fp32)
    model.train() if phase == "train" else model.eval()
    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() <= config.vocab_size, \
        f"tokenizer vocab {tokenizer.get_vocab_size()} > model vocab {config.vocab_size}"
    return model, tokenizer, meta_data


def find_largest_model(checkpoints_dir):
    """The model tag with the largest depth (tags 'd<depth>'), else the most recently modified directory."""
    if not os.path.isdir(checkpoints_dir):
        raise FileNotFoundError(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise FileNotFoundError(f"no model tags in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    """The largest step with a meta file (i.e. a completely written checkpoint)."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.fullmatch(r"meta_(\d+)\.json", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    if not steps:
        raise FileNotFoundError(f"no complete checkpoints in {checkpoint_dir}")
    return max(steps)


def load_model(source, device, phase, model_tag=None, step=None):
    """-> (model, tokenizer, meta_data) from <base_dir>/<source dir>/<model_tag>/ at `step`
    (defaults: the largest model, its last complete step)."""
    assert source in SOURCE_DIRS, f"source must be one of {sorted(SOURCE_DIRS)}, got {source!r}"
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    print0(f"Loading model from {checkpoint_dir} step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_optimizer_warm_start(optimizers, source, device, rank=0, world_size=1, model_tag=None, step=None):
    """Warm start (chat_sft's load_optimizer = 1): copy the per-parameter state (AdamW moments and step
    count, Muon momentum buffers) of the source checkpoint's optimizers into `optimizers`, keeping their own
    hyperparameters (learning rates, betas, ...). The source is resolved as load_model does (largest model,
    last step). Raises UserError when the source has no optimizer state for this rank, was saved by a
    different number of ranks (the distributed optimizers shard their state), or holds other parameters.
    Returns the path the state was read from."""
    from nanochat.common import UserError

    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    model_tag = find_largest_model(checkpoints_dir) if model_tag is None else model_tag
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    step = find_last_step(checkpoint_dir) if step is None else step
    path = _optim_path(checkpoint_dir, step, rank)
    fix = "set load_optimizer = 0 to start the optimizers cold, or pick a source saved with its optimizer state"
    if not os.path.exists(path):
        raise UserError(f"load_optimizer = 1: the {source} checkpoint {checkpoint_dir} step {step} has no optimizer "
                        f"state for rank {rank} ({path} is missing); {fix}")
    with open(_meta_path(checkpoint_dir, step), encoding="utf-8") as f:
        meta = json.load(f)
    saved_world_size = meta.get("world_size", len(meta.get("loader_states") or []) or None)  # sft/mid; base
    if saved_world_size is None and os.path.exists(_optim_path(checkpoint_dir, step, world_size)):
        saved_world_size = f"more than {world_size}"
    if saved_world_size is not None and saved_world_size != world_size:
        raise UserError(f"load_optimizer = 1: the optimizer state in {checkpoint_dir} step {step} was saved by "
                        f"{saved_world_size} ranks, this run has {world_size} (the state is sharded per rank); "
                        f"run with {saved_world_size} ranks or {fix}")
    saved = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(saved, (list, tuple)) or len(saved) != len(optimizers):
        raise UserError(f"load_optimizer = 1: {path} does not hold the state of {len(optimizers)} optimizers; {fix}")
    for opt, saved_state in zip(optimizers, saved):
        current = opt.state_dict()
        counts = [len(g["params"]) for g in current["param_groups"]]
        saved_counts = [len(g["params"]) for g in saved_state.get("param_groups", [])]
        if counts != saved_counts:
            raise UserError(f"load_optimizer = 1: {path} holds parameter groups of sizes {saved_counts}, the model "
                            f"has {counts}; {fix}")
        current["state"] = saved_state["state"]  # moments only: the param_groups (lrs) stay this run's
        opt.load_state_dict(current)
    return path
