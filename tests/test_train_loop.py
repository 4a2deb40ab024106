"""nanochat.train_loop: the algorithm pieces of the base_train / mid_train loops, and the one compile rule."""

import pytest
import torch

from nanochat.perf import compile_enabled, mfu
from nanochat.schedules import muon_momentum, set_momentum
from nanochat.train_loop import (clip_gradients, counts_toward_time, every, format_train_step, fresh_loop_state,
                                 smooth_loss)


def test_every_fires_at_multiples_and_the_last_step_never_when_disabled():
    assert [s for s in range(11) if every(s, 4, s == 10)] == [0, 4, 8, 10]
    assert not any(every(s, -1, s == 10) for s in range(11))


def test_smooth_loss_is_the_debiased_ema_and_resume_continues_it():
    losses = [4.0, 3.0, 2.5, 2.0]
    ema, debiased = 0.0, []
    for step, loss in enumerate(losses):
        ema, d = smooth_loss(ema, loss, step)
        debiased.append(d)
    assert debiased[0] == pytest.approx(4.0)  # the first value is the loss itself: the bias is corrected
    weights = [0.9 ** (3 - i) for i in range(4)]  # the EMA's weights on the four losses, normalised
    assert debiased[3] == pytest.approx(sum(w * x for w, x in zip(weights, losses)) / sum(weights))
    # a resumed run carries the stored EMA in and gets the same numbers as the uninterrupted one
    ema2 = 0.0
    for step, loss in enumerate(losses[:2]):
        ema2, _ = smooth_loss(ema2, loss, step)
    for step, loss in enumerate(losses[2:], start=2):
        ema2, d = smooth_loss(ema2, loss, step)
    assert d == debiased[3] and ema2 == ema


def test_counts_toward_time_leaves_out_the_compile_steps():
    assert [s for s in range(100) if not counts_toward_time(s, 0, 100)] == list(range(11))
    assert [s for s in range(50, 100) if not counts_toward_time(s, 50, 100)] == list(range(50, 61))  # resume
    assert all(counts_toward_time(s, 0, 20) for s in range(20))  # a short run counts every step


def test_clip_gradients_clips_to_the_norm_and_returns_the_norm_before():
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    assert clip_gradients([w], 0.0) is None and w.grad.norm().item() == pytest.approx(5.0)  # off
    assert clip_gradients([w], 1.0).item() == pytest.approx(5.0)
    assert w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-5)


def test_fresh_loop_state_is_a_new_copy_each_time():
    (a, sa), (b, sb) = fresh_loop_state(), fresh_loop_state()
    sa["train_loss"].append(1.0)
    a["total_training_time"] = 5.0
    assert sb["train_loss"] == [] and b["total_training_time"] == 0.0 and a["min_val_bpb"] == float("inf")


def test_set_momentum_sets_every_group():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q]}], lr=0.1, momentum=0.5)
    set_momentum(opt, muon_momentum(150))
    assert [g["momentum"] for g in opt.param_groups] == [pytest.approx(0.9)] * 2


def test_one_compile_rule():
    assert compile_enabled(None, "cuda") and not compile_enabled(None, "cpu") and not compile_enabled(None, "mps")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")


def test_step_line_prints_mfu_as_a_percentage_and_logs_the_fraction():
    step_mfu = mfu(3e12, 0.5, 1e13, world_size=2)  # 3e12 FLOPs in 0.5 s on 2 devices of 1e13: 30%
    line, log = format_train_step(5, 100, 2.5, 0.75, 0.5, 4096, step_mfu, 120.0)
    assert line == ("step 00005/00100 (5.00%) | loss: 2.500000 | lrm: 0.75 | dt: 500.00ms | tok/sec: 8,192 | "
                    "mfu: 30.00% | total time: 2.00m")
    assert log["train/mfu"] == pytest.approx(0.3) and log["train/tok_per_sec"] == 8192 and log["step"] == 5
    line, log = format_train_step(5, 100, 2.5, 0.75, 0.5, 4096, None, 120.0)  # CPU: no known peak
    assert "mfu" not in line and "train/mfu" not in log
