"""
Learning-rate and momentum schedules: pure arithmetic, one function shared by base_train, mid_train and
chat_sft (nanochat had three copies of get_lr_multiplier).

    SFT:        lr_multiplier(step, num_steps)                       == 1 - step / num_steps
    base, mid:  lr_multiplier(step, num_steps, warmdown_frac=0.2)    constant, then linear to 0

Also the step arithmetic every training script shares: gradient-accumulation steps (num_grad_accum_steps) and
applying the learning rates and momentum to the optimizers (scale_initial_lr for init_lr_frac, set_lr_multiplier
and set_momentum per step).

Tests: tests/test_schedules.py.
"""

from nanochat.common import UserError


def lr_multiplier(step, num_steps, warmup_frac=0.0, warmdown_frac=1.0, final_frac=0.0):
    """Linear warm-up over the first warmup_frac * num_steps steps, constant 1.0, then a linear warm-down
    over the last warmdown_frac * num_steps steps reaching final_frac at step == num_steps."""
    assert num_steps > 0, "num_steps must be positive"
    assert 0.0 <= warmup_frac and 0.0 <= warmdown_frac and warmup_frac + warmdown_frac <= 1.0
    warmup_steps = round(warmup_frac * num_steps)
    warmdown_steps = round(warmdown_frac * num_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_steps - warmdown_steps or warmdown_steps == 0:
        return 1.0
    progress = (num_steps - step) / warmdown_steps  # 1 at the start of the warm-down, 0 at num_steps
    return progress + (1 - progress) * final_frac


def muon_momentum(step, warmup_steps=300, start=0.85, end=0.95):
    """Muon momentum warm-up (nanochat: 0.85 -> 0.95 over the first 300 steps), constant after."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def num_grad_accum_steps(total, per_micro_step, total_name, per_micro_step_name):
    """total / per_micro_step micro-steps per optimizer step (per_micro_step counts all ranks), refusing
    settings that do not divide, with the names of the keys to change."""
    if per_micro_step <= 0 or total <= 0 or total % per_micro_step != 0:
        raise UserError(f"{total_name}={total} must be a positive multiple of {per_micro_step_name} = "
                        f"{per_micro_step}; change {total_name} or the batch size")
    return total // per_micro_step


def scale_initial_lr(optimizers, init_lr_frac):
    """Multiply every group's learning rate by init_lr_frac and make it the group's initial_lr (the value the
    schedule multiplies), once, before training."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac


def set_lr_multiplier(optimizers, lrm):
    """Set every group's learning rate to initial_lr * lrm (the step's schedule value)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm


def set_momentum(optimizer, momentum):
    """Set the momentum of every group of `optimizer` (Muon's warm-up: set_momentum(muon, muon_momentum(step)))."""
    for group in optimizer.param_groups:
        group["momentum"] = momentum
