"""
Learning-rate and momentum schedules: pure arithmetic, one function shared by base_train, mid_train and
chat_sft (nanochat had three copies of get_lr_multiplier).

    SFT:        lr_multiplier(step, num_steps)                       == 1 - step / num_steps
    base, mid:  lr_multiplier(step, num_steps, warmdown_frac=0.2)    constant, then linear to 0

Tests: tests/test_schedules.py.
"""


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
