"""
Pieces of the base_train / mid_train loops that carry an algorithm (the loop itself stays written out in each
script, as nanochat keeps it):

- every: the "once in a while" test of the *_every options (-1 disables; always at the last step)
- fresh_loop_state: the counters and loss series of a new run (what a resumable checkpoint stores)
- smooth_loss: the debiased exponential moving average of the training loss that the step line prints
- counts_toward_time: whether a step's time counts in total_training_time (the first steps compile)
- clip_gradients: clip the gradient norm of one rank (0: off)
- format_train_step: the step line both print and the wandb record of the step (MFU as a fraction)

Tests: tests/test_train_loop.py.
"""

import torch

LOSS_EMA_BETA = 0.9  # nanochat's smoothing of the printed training loss
WARMUP_STEPS_UNTIMED = 10  # steps after the start (or a resume) left out of total_training_time: compilation


def every(step, period, last_step):
    """True at multiples of `period` and at the last step; never when period is -1 (disabled)."""
    return period > 0 and (last_step or step % period == 0)


def fresh_loop_state():
    """(counters, loss_series) of a run that starts at step 0; a resume restores both from the run state."""
    counters = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
    loss_series = {"train_steps": [], "train_loss": [], "val_steps": [], "val_bpb": []}
    return counters, loss_series


def smooth_loss(ema, loss, step, beta=LOSS_EMA_BETA):
    """One update of the loss EMA at `step` (0-based, counted from the run's first step, so a resumed run
    continues the same average): returns (the new EMA, the EMA debiased by 1 - beta^(step + 1), Adam's
    correction for starting the average at 0)."""
    ema = beta * ema + (1 - beta) * loss
    return ema, ema / (1 - beta ** (step + 1))


def counts_toward_time(step, start_step, num_iterations, untimed=WARMUP_STEPS_UNTIMED):
    """Whether step `step`'s time goes into total_training_time: not the first `untimed` steps after the start
    or a resume (they include torch.compile's compilation), unless the run is too short to leave any out
    (at most 2 * untimed steps: then every step counts)."""
    return step > start_step + untimed or num_iterations - start_step <= 2 * untimed


def clip_gradients(parameters, max_norm):
    """Clip the gradients of `parameters` to a total norm of max_norm and return the norm before clipping
    (a 0-d tensor: no device sync until the caller logs it); None when max_norm <= 0 (clipping off). Called
    per rank before the optimizers average the gradients over ranks: an average of vectors of norm <= max_norm
    keeps norm <= max_norm."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def format_train_step(step, num_iterations, loss, lrm, dt, tokens, mfu, total_time):
    """(the printed step line, the wandb record) of one optimizer step: the debiased smoothed loss, the LR
    multiplier, the step's seconds, `tokens` trained in it (all ranks), its MFU (a fraction, from
    nanochat.perf.mfu, printed as a percentage; None: unknown peak, left out) and the training time so far."""
    tok_per_sec = int(tokens / dt)
    line = (f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | loss: {loss:.6f} | "
            f"lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | tok/sec: {tok_per_sec:,}"
            + (f" | mfu: {100 * mfu:.2f}%" if mfu is not None else "") + f" | total time: {total_time / 60:.2f}m")
    log = {"step": step, "train/loss": loss, "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tok_per_sec}
    if mfu is not None:
        log["train/mfu"] = mfu
    return line, log
