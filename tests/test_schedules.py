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
