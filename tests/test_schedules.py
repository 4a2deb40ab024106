"""nanochat.schedules: the LR multiplier used by every training script, and Muon momentum warm-up."""

import pytest

from nanochat.schedules import lr_multiplier, muon_momentum


def test_sft_linear_decay_is_one_minus_progress():
    for n in (1, 7, 100):
        for step in range(n + 1):
            assert lr_multiplier(step, n) == pytest.approx(1 - step / n)


def test_warmdown_only_last_fraction():
    n = 100
    assert [lr_multiplier(s, n, warmdown_frac=0.2) for s in (0, 50, 80)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, n, warmdown_frac=0.2) == pytest.approx(0.5)
    assert lr_multiplier(100, n, warmdown_frac=0.2) == pytest.approx(0.0)
    assert lr_multiplier(100, n, warmdown_frac=0.2, final_frac=0.1) == pytest.approx(0.1)
    assert lr_multiplier(90, n, warmdown_frac=0.2, final_frac=0.1) == pytest.approx(0.55)


def test_warmup_then_constant():
    n = 100
    assert lr_multiplier(0, n, warmup_frac=0.1, warmdown_frac=0.0) == pytest.approx(0.1)
    assert lr_multiplier(9, n, warmup_frac=0.1, warmdown_frac=0.0) == pytest.approx(1.0)
    assert lr_multiplier(99, n, warmup_frac=0.1, warmdown_frac=0.0) == 1.0


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_grad_accum_steps_and_lr_helpers():
    from nanochat.common import UserError
    from nanochat.schedules import num_grad_accum_steps, scale_initial_lr, set_lr_multiplier

    assert num_grad_accum_steps(524288, 32 * 2048 * 8, "total_batch_size", "x") == 1
    assert num_grad_accum_steps(32, 4, "target_examples_per_step", "y") == 8
    with pytest.raises(UserError, match="total_batch_size=100 must be a positive multiple of x = 64"):
        num_grad_accum_steps(100, 64, "total_batch_size", "x")
    with pytest.raises(UserError):
        num_grad_accum_steps(0, 4, "a", "b")

    class Opt:
        def __init__(self, *lrs):
            self.param_groups = [{"lr": lr, "initial_lr": lr} for lr in lrs]

    optimizers = [Opt(0.2, 0.004), Opt(0.02)]
    scale_initial_lr(optimizers, 0.02)  # once: lr and initial_lr both scaled
    assert [g["initial_lr"] for o in optimizers for g in o.param_groups] == pytest.approx([0.004, 0.00008, 0.0004])
    set_lr_multiplier(optimizers, 0.5)
    assert [g["lr"] for o in optimizers for g in o.param_groups] == pytest.approx([0.002, 0.00004, 0.0002])
    set_lr_multiplier(optimizers, 1.0)  # relative to initial_lr, never compounding
    assert [g["lr"] for o in optimizers for g in o.param_groups] == pytest.approx([0.004, 0.00008, 0.0004])
