"""
Run-time checks that turn user mistakes into one-line errors instead of hangs, tracebacks or poisoned weights:
- the finite-weights guard called after every optimizer step (base_train, mid_train, chat_sft): a step that
  leaves a parameter NaN/inf stops the run, naming the step and the parameter, before it can be saved.

Tests: tests/test_bad_input.py (in-process and as subprocess runs of the scripts).
"""

import torch

from nanochat.common import UserError


class NonFiniteWeightsError(UserError):
    """A parameter became NaN or infinite: the run stops rather than train on (or save) poisoned weights."""


def first_nonfinite(named_tensors):
    """The name of the first floating-point tensor holding a NaN or inf, else None. One device sync for the
    common all-finite case (a single stacked reduction), then a per-tensor search only when something is off."""
    named = [(name, t) for name, t in named_tensors if torch.is_floating_point(t)]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if bool(flags.all()):
        return None
    return next(name for (name, _), ok in zip(named, flags.tolist()) if not ok)


def check_finite_parameters(model, step):
    """Raise NonFiniteWeightsError if the optimizer step `step` left any parameter of `model` non-finite."""
    name = first_nonfinite(model.named_parameters())
    if name is not None:
        raise NonFiniteWeightsError(
            f"step {step}: parameter '{name}' became non-finite (NaN/inf) after the optimizer step; "
            f"the run stops and nothing of this step is saved. Lower the learning rates (matrix_lr, embedding_lr, "
            f"unembedding_lr) or set grad_clip, and restart from the last checkpoint")
