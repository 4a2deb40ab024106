"""
Supervised fine-tuning (SFT) building blocks, shared by scripts/chat_sft.py and bench/sft_throughput.py.
Everything here is a small function with explicit arguments (rank / world_size / device passed in, no
globals), so each off-by-one risk has a unit test: tests/test_sft.py (`python -m pytest tests/test_sft.py`).

- collate_sft: the SFT guide's padded batch (pad with <|assistant_end|>, targets -1 off the assistant mask)
- pack_best_fit / collate_packed: whole conversations best-fit into rows, with segment ids
- fit_conversation: the one truncate / drop filter, used by the batches and by the step count alike
- sft_batches: the per-rank stream of CPU batches (SFTBatch, pad or bestfit), resumable from a small state
- grad_accum_steps_for / num_sft_iterations / count_steps_bestfit / num_sft_steps: step arithmetic
- micro_batch_loss_scale: "token" vs the guide's "micro_batch_mean" (README, "Loss normalisation")
- accumulate_step: one optimizer step's forward/backward over its micro-batches, and the rank-agreed decision
  to skip it (skip_reason: NaN / out of memory)
(the per-rank resume state lives in nanochat/runs.py: save_run_state / load_run_state)

Mixture specs (train_mixture / val_mixture) are parsed and built by tasks/mixture.py; what chat_sft prints
about its data and steps (the --dry_run preview, the step line, the report's figures) is nanochat/sft_report.py.
"""

import contextlib
import math
from typing import NamedTuple

import torch

from nanochat.common import UserError, all_reduce_values
from nanochat.config import ConfigError
from nanochat.perf import batch_flops, pad_to_bucket
from nanochat.schedules import num_grad_accum_steps

# ----------------------------------------------------------------------------------------------------------
# Collation


def collate_sft(batch, pad_id, ignore_index=-1):
    """The guide's SFT batch. `batch` is a list of (ids, mask) rendered conversations (lists of ints; mask 1
    on tokens the assistant must produce). Rows are padded to the longest with `pad_id`
    (<|assistant_end|>); inputs = ids[:-1], targets = ids[1:] with ignore_index wherever the mask of the
    target token is 0 and on padding. Returns (inputs, targets): int64 CPU tensors of shape (B, max_len - 1)."""
    assert len(batch) > 0, "empty batch"
    max_len = max(len(ids) for ids, _ in batch)
    assert max_len >= 2, "every batch needs a conversation of at least 2 tokens"
    inputs = torch.full((len(batch), max_len - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), max_len - 1), ignore_index, dtype=torch.long)
    for i, (ids, mask) in enumerate(batch):
        assert len(ids) == len(mask), f"row {i}: ids and mask lengths differ ({len(ids)} vs {len(mask)})"
        n = len(ids)
        if n < 2:
            continue  # a single token has no target: the row stays padding
        row = torch.tensor(ids, dtype=torch.long)
        row_mask = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[i, : n - 1] = row[:-1]
        targets[i, : n - 1] = torch.where(row_mask, row[1:], torch.full_like(row[1:], ignore_index))
    return inputs, targets


def pack_best_fit(lengths, row_capacity, num_rows=None):
    """Best-fit bin packing of items (conversation lengths, in tokens) into rows of `row_capacity` tokens.
    Items are taken in the given order; each goes to the open row with the least room that still fits it,
    or opens a new row (while fewer than `num_rows` rows are open; unlimited if None). Items that fit
    nowhere are returned as leftovers, in order. Every item must fit an empty row.
    Returns (rows, leftover): rows = list of lists of item indices, leftover = list of item indices."""
    rows, room, leftover = [], [], []
    for i, n in enumerate(lengths):
        assert 0 < n <= row_capacity, f"item {i} has length {n}, outside (0, {row_capacity}]"
        best = -1
        for r, free in enumerate(room):
            if n <= free and (best < 0 or free < room[best]):
                best = r
        if best < 0 and (num_rows is None or len(rows) < num_rows):
            rows.append([])
            room.append(row_capacity)
            best = len(rows) - 1
        if best < 0:
            leftover.append(i)
            continue
        rows[best].append(i)
        room[best] -= n
    return rows, leftover


def collate_packed(rows, row_capacity, pad_id, ignore_index=-1, num_rows=None):
    """Rows of whole conversations -> (inputs, targets, segment_ids), int64 CPU tensors of shape
    (num_rows, row_capacity - 1). `rows` is a list of rows, each a list of (ids, mask) whose total length is
    at most row_capacity. In a row, conversation j (0-based) has segment id j + 1 and the padding after the
    last conversation has segment id 0; the model attends only within a segment and restarts positions
    there, so packed conversations never see each other. targets[t] = ids[t + 1] only where positions t and
    t + 1 belong to the same conversation and the mask of t + 1 is 1, else ignore_index. Rows beyond
    len(rows) (up to num_rows) are all padding."""
    num_rows = len(rows) if num_rows is None else num_rows
    assert len(rows) <= num_rows, f"{len(rows)} rows do not fit a batch of {num_rows}"
    T = row_capacity - 1
    inputs = torch.full((num_rows, T), pad_id, dtype=torch.long)
    targets = torch.full((num_rows, T), ignore_index, dtype=torch.long)
    segment_ids = torch.zeros((num_rows, T), dtype=torch.long)
    for r, row in enumerate(rows):
        ids = [t for conv_ids, _ in row for t in conv_ids]
        mask = [m for _, conv_mask in row for m in conv_mask]
        seg = [j + 1 for j, (conv_ids, _) in enumerate(row) for _ in conv_ids]
        n = len(ids)
        assert n <= row_capacity, f"row {r} holds {n} tokens > row_capacity {row_capacity}"
        ids_t, seg_t = torch.tensor(ids, dtype=torch.long), torch.tensor(seg, dtype=torch.long)
        mask_t = torch.tensor(mask, dtype=torch.bool)
        m = min(n, T)  # input positions holding real tokens (the row's very last token is only a target)
        inputs[r, :m] = ids_t[:m]
        segment_ids[r, :m] = seg_t[:m]
        if n >= 2:
            valid = mask_t[1:] & (seg_t[1:] == seg_t[:-1])  # same conversation and a supervised target
            targets[r, : n - 1] = torch.where(valid, ids_t[1:], torch.full_like(ids_t[1:], ignore_index))
    return inputs, targets, segment_ids


def padding_fraction(num_pad_positions, num_positions):
    """Fraction of the batch's input positions that hold padding (0 for an empty batch)."""
    return num_pad_positions / num_positions if num_positions > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------
# The per-rank data stream (resumable)


class SFTBatch(NamedTuple):
    """One micro-batch of one rank, on the CPU. segment_ids is None under packing "pad"; stats counts examples,
    truncated, dropped, positions, pad_positions, supervised, epoch; state is the stream position after it."""
    inputs: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor | None
    stats: dict
    state: dict


def fit_conversation(ids, mask, row_capacity, drop_long):
    """The one filter of rendered conversations, for the batches and for the step count alike:
    -> (ids, mask, "kept" | "truncated" | "dropped"); ids and mask are None when dropped (longer than
    row_capacity with drop_long, or shorter than 2 tokens: nothing to learn from, nothing to pack)."""
    ids, mask = list(ids), list(mask)
    outcome = "kept"
    if len(ids) > row_capacity:
        if drop_long:
            return None, None, "dropped"
        ids, mask, outcome = ids[:row_capacity], mask[:row_capacity], "truncated"
    if len(ids) < 2:
        return None, None, "dropped"
    return ids, mask, outcome


def initial_data_state():
    """Where a rank's stream starts: epoch 0, first conversation, nothing pending (JSON-serialisable)."""
    return {"epoch": 0, "cursor": 0, "pending": []}


def sft_batches(dataset, render_fn, batch_size, pad_id, packing="pad", row_capacity=2049, drop_long=False,
                rank=0, world_size=1, state=None, lookahead=2.0, ignore_index=-1, bucket=1):
    """Yield SFTBatch(inputs, targets, segment_ids, stats, state) forever: CPU batches for one rank.

    The rank reads conversations rank, rank + world_size, rank + 2 * world_size, ... of `dataset` (a Task,
    a list: anything with len() and [i]); epochs repeat. `render_fn(conversation)` returns
    (ids, mask); fit_conversation truncates a conversation longer than `row_capacity` tokens (counted in
    stats["truncated"]) or, with drop_long, skips it (stats["dropped"]).
    - packing "pad": batch_size conversations per batch, padded to the longest (collate_sft); segment_ids None.
    - packing "bestfit": conversations buffered until about lookahead * batch_size * row_capacity tokens are
      at hand, then best-fit into batch_size rows of row_capacity tokens (collate_packed); the leftovers go
      first into the next batch. Every conversation appears exactly once per epoch.
    `state` (from initial_data_state() or a previous yield) is the position AFTER the yielded batch, so a
    run that saves the state of the last batch it used resumes exactly there.
    bucket > 1 (compiled pad mode): a padded batch's length is rounded up to a multiple of it (pad_to_bucket,
    at most row_capacity - 1), so a compiled model sees a handful of shapes; the extra positions count as padding.
    stats: examples, truncated, dropped, positions (inputs.numel()), pad_positions, supervised, epoch."""
    assert packing in PACKINGS, f"packing must be one of {PACKINGS}, got {packing!r}"
    assert batch_size > 0 and row_capacity >= 2
    num_examples = len(dataset)
    per_rank = len(range(rank, num_examples, world_size))
    if per_rank <= 0:
        raise UserError(f"rank {rank} of {world_size} gets no conversations from a dataset of {num_examples}: "
                        f"use more data or fewer processes")
    state = dict(initial_data_state() if state is None else state)
    epoch, cursor = state["epoch"], state["cursor"]
    counts = {"truncated": 0, "dropped": 0}
    skipped = {"run": 0}  # consecutive skipped conversations, to fail instead of looping forever

    def render(index):
        ids, mask, outcome = fit_conversation(*render_fn(dataset[index]), row_capacity, drop_long)
        if outcome != "kept":
            counts[outcome] += 1
        return None if ids is None else (index, ids, mask)

    def next_index():
        nonlocal epoch, cursor
        if cursor >= per_rank:
            epoch, cursor = epoch + 1, 0
        index = rank + cursor * world_size
        cursor += 1
        return index

    def next_item():
        item = render(next_index())
        skipped["run"] = 0 if item is not None else skipped["run"] + 1
        if skipped["run"] > per_rank:
            raise ConfigError(f"every conversation of rank {rank} is dropped (longer than row_capacity="
                              f"{row_capacity} with drop_long, or shorter than 2 tokens): raise max_seq_len or set "
                              f"drop_long = false")
        return item

    def emit(inputs, targets, segment_ids, examples, pad_positions, pending_indices):
        stats = dict(examples=examples, truncated=counts["truncated"], dropped=counts["dropped"],
                     positions=inputs.numel(), pad_positions=pad_positions,
                     supervised=int((targets != ignore_index).sum()), epoch=epoch)
        counts["truncated"] = counts["dropped"] = 0
        return SFTBatch(inputs, targets, segment_ids, stats, {"epoch": epoch, "cursor": cursor, "pending": pending_indices})

    pending = [item for item in (render(i) for i in state["pending"]) if item is not None]
    if packing == "pad":
        while True:
            batch = pending
            pending = []
            while len(batch) < batch_size:
                item = next_item()
                if item is not None:
                    batch.append(item)
            inputs, targets = pad_to_bucket(*collate_sft([(ids, mask) for _, ids, mask in batch], pad_id, ignore_index),
                                            bucket, pad_id, max_len=row_capacity - 1, ignore_index=ignore_index)
            pad_positions = sum(inputs.size(1) - (len(ids) - 1) for _, ids, _ in batch)
            yield emit(inputs, targets, None, len(batch), pad_positions, [])
    else:
        T = row_capacity - 1
        for rows, pending in best_fit_batches(next_item, lambda item: len(item[1]), pending, batch_size,
                                              row_capacity, lookahead):
            row_items = [[(ids, mask) for _, ids, mask in row] for row in rows]
            inputs, targets, segment_ids = collate_packed(row_items, row_capacity, pad_id, ignore_index,
                                                          num_rows=batch_size)
            pad_positions = batch_size * T - sum(min(sum(len(ids) for ids, _ in row), T) for row in row_items)
            yield emit(inputs, targets, segment_ids, sum(len(r) for r in rows), pad_positions,
                       [index for index, _, _ in pending])


def best_fit_batches(next_item, length_of, pending, batch_size, row_capacity, lookahead=2.0):
    """The bestfit stream on abstract items: pull items with next_item() (None = skipped; StopIteration = no
    more: the rest is packed, then the stream ends) until about
    lookahead * batch_size * row_capacity tokens are buffered, best-fit them into batch_size rows, yield
    (rows of items, leftover items); leftovers go first into the next batch (oldest first, so none waits
    long), new items longest first (best-fit decreasing packs tighter)."""
    budget = lookahead * batch_size * row_capacity
    pending, exhausted = list(pending), False
    while True:
        fresh, buffered = [], sum(length_of(item) for item in pending)
        while buffered < budget and not exhausted:
            try:
                item = next_item()
            except StopIteration:  # a finite source (the data preview): pack what is left, then stop
                exhausted = True
                break
            if item is not None:
                fresh.append(item)
                buffered += length_of(item)
        buffer = pending + sorted(fresh, key=lambda item: -length_of(item))
        if not buffer:
            return
        rows, leftover = pack_best_fit([length_of(item) for item in buffer], row_capacity, num_rows=batch_size)
        pending = [buffer[i] for i in leftover]
        yield [[buffer[i] for i in row] for row in rows], pending


def count_steps_bestfit(lengths, batch_size, row_capacity, num_batches_per_step, num_epochs, lookahead=2.0):
    """How many optimizer steps a bestfit stream over conversations of these `lengths` (one rank's, in its
    reading order, after truncation/dropping) needs to cover num_epochs epochs: the packing of sft_batches
    replayed on lengths only (no rendering, no tensors). At least 1."""
    assert len(lengths) > 0 and all(0 < n <= row_capacity for n in lengths)
    position = {"epoch": 0, "cursor": 0}

    def next_item():
        if position["cursor"] >= len(lengths):
            position["epoch"] += 1
            position["cursor"] = 0
        position["cursor"] += 1
        return lengths[position["cursor"] - 1]

    num_batches = 0
    for _ in best_fit_batches(next_item, lambda n: n, [], batch_size, row_capacity, lookahead):
        if position["epoch"] >= num_epochs:
            break
        num_batches += 1
    return max(1, num_batches // num_batches_per_step)


def rank_lengths(dataset, render_fn, row_capacity, drop_long, rank=0, world_size=1):
    """The lengths, after fit_conversation, of the conversations this rank reads (in its reading order)."""
    lengths = []
    for index in range(rank, len(dataset), world_size):
        ids, _, _ = fit_conversation(*render_fn(dataset[index]), row_capacity, drop_long)
        if ids is not None:
            lengths.append(len(ids))
    return lengths


# ----------------------------------------------------------------------------------------------------------
# Step arithmetic and loss normalisation

LOSS_NORMALIZATIONS = ("token", "micro_batch_mean")  # see README, "Loss normalisation"
PACKINGS = ("pad", "bestfit")


def grad_accum_steps_for(target_examples_per_step, device_batch_size, world_size):
    """Micro-steps per optimizer step: target_examples_per_step / (device_batch_size * world_size)."""
    return num_grad_accum_steps(target_examples_per_step, device_batch_size * world_size, "target_examples_per_step",
                            f"device_batch_size * world_size = {device_batch_size} * {world_size}")


def num_sft_iterations(num_examples, target_examples_per_step, num_epochs, max_iterations=-1):
    """The guide's step count: len(train) // target_examples_per_step * num_epochs, capped by max_iterations
    (-1: no cap)."""
    num_iterations = (num_examples // target_examples_per_step) * num_epochs
    if max_iterations >= 0:
        num_iterations = min(num_iterations, max_iterations)
    return num_iterations


def micro_batch_loss_scale(loss_normalization, micro_tokens, step_tokens, world_size, grad_accum_steps):
    """The factor that turns a micro-batch's SUMMED token loss into the loss to backpropagate, assuming the
    optimizer averages gradients across ranks.
    - "token": world_size / step_tokens, where step_tokens = supervised tokens of the whole step, all
      micro-batches, all ranks. Averaged over ranks and summed over micro-batches this is the mean token
      loss of the step.
    - "micro_batch_mean": 1 / (micro_tokens * grad_accum_steps), the guide's mean per micro-batch divided
      by the number of micro-steps.
    A count of zero gives a zero scale (nothing to learn from) instead of a NaN."""
    if loss_normalization == "token":
        return world_size / step_tokens if step_tokens > 0 else 0.0
    if loss_normalization == "micro_batch_mean":
        return 1.0 / (micro_tokens * grad_accum_steps) if micro_tokens > 0 else 0.0
    raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}")


def skip_reason(step_loss, oom_count):
    """Why an optimizer step must be skipped, or None. Called with values already reduced over ranks (the
    summed loss, where any rank's NaN/inf propagates, and the number of ranks that ran out of memory), so
    every rank takes the same decision and none waits forever in the optimizer's collectives."""
    if oom_count > 0:
        return "out of memory"
    if not math.isfinite(step_loss):
        return f"non-finite loss ({step_loss})"
    return None


def num_sft_steps(dataset, render_fn, packing, target_examples_per_step, device_batch_size, grad_accum,
                  row_capacity, drop_long, num_epochs, max_iterations=-1, rank=0, world_size=1, device="cpu"):
    """Optimizer steps of the run. pad: the guide's count (num_sft_iterations). bestfit: a step holds as many
    conversations as fit, so the packing of sft_batches is replayed on this rank's lengths (rank_lengths: the
    same filter the batches use) and every rank runs the smallest count. Capped by max_iterations (-1: none)."""
    if packing == "pad":
        return num_sft_iterations(len(dataset), target_examples_per_step, num_epochs, max_iterations)
    lengths = rank_lengths(dataset, render_fn, row_capacity, drop_long, rank, world_size)
    steps = count_steps_bestfit(lengths, device_batch_size, row_capacity, grad_accum, num_epochs) if lengths else 0
    steps = int(all_reduce_values([steps], "min", device, world_size)[0])
    return min(steps, max_iterations) if max_iterations >= 0 else steps


STAT_KEYS = ("supervised", "positions", "pad_positions", "examples", "truncated", "dropped")  # of SFTBatch.stats
TOTAL_KEYS = (*STAT_KEYS, "flops", "useful_flops")  # StepResult.totals: the stats and perf.batch_flops


class StepResult(NamedTuple):
    loss: float  # the step's loss, as the optimizer sees it (mean over ranks of the scaled sums)
    skip: str | None  # why the optimizer step must not be taken (the same on every rank), or None
    totals: dict  # TOTAL_KEYS summed over the step's micro-batches and all ranks


def accumulate_step(model, micro_batches, loss_normalization, device, world_size=1, rank=0,
                    autocast=contextlib.nullcontext):
    """Forward and backward of one optimizer step's micro-batches (SFTBatch list) on this rank, leaving the
    gradients in .grad for the optimizer. The step's supervised-token count is all-reduced first (the "token"
    normalisation needs it up front); each micro-batch's summed loss is scaled by micro_batch_loss_scale.
    A CUDA out-of-memory error in any micro-batch, or a non-finite loss on any rank, makes every rank skip the
    step (one all-reduce carries the loss and the out-of-memory count, so no rank waits alone in the
    optimizer's collectives); a skipped step leaves no gradient behind. The caller takes the optimizer step
    when result.skip is None."""
    device = torch.device(device)
    flops = [batch_flops(model, b.inputs, b.stats["pad_positions"]) for b in micro_batches]
    local = [sum(b.stats[k] for b in micro_batches) for k in STAT_KEYS] + [sum(f) for f in zip(*flops)]
    totals = dict(zip(TOTAL_KEYS, all_reduce_values(local, "sum", device, world_size)))
    objective, oom = 0.0, 0.0
    try:
        for batch in micro_batches:
            inputs, targets, segment_ids = (None if t is None else t.to(device, non_blocking=device.type == "cuda")
                                            for t in batch[:3])
            with autocast():
                loss_sum = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids)
            loss = loss_sum * micro_batch_loss_scale(loss_normalization, batch.stats["supervised"],
                                                     totals["supervised"], world_size, len(micro_batches))
            loss.backward()
            objective += loss.item()
    except torch.cuda.OutOfMemoryError as e:
        print(f"[rank {rank}] out of memory: {str(e).splitlines()[0] if str(e) else ''}")
        oom = 1.0
    if oom:  # outside the except block: its traceback would keep the forward's activations alive
        inputs = targets = segment_ids = loss_sum = loss = None
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    objective, oom = all_reduce_values([0.0 if oom else objective, oom], "sum", device, world_size)
    step_loss = objective / world_size
    reason = skip_reason(step_loss, oom)
    if reason is not None:
        model.zero_grad(set_to_none=True)  # no gradient of a skipped step survives into the next
    return StepResult(step_loss, reason, totals)


# ----------------------------------------------------------------------------------------------------------
