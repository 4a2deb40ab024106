"""
Supervised fine-tuning (SFT) building blocks, shared by scripts/chat_sft.py and bench/sft_throughput.py.
Everything here is a small function with explicit arguments (no devices, no process group, no globals),
so each off-by-one risk has a unit test: tests/test_sft.py (`python -m pytest tests/test_sft.py`).

- collate_sft: the SFT guide's padded batch (pad with <|assistant_end|>, targets -1 off the assistant mask)
- pack_best_fit / collate_packed: whole conversations best-fit into rows, with segment ids
- sft_batches: the per-rank stream of CPU batches (pad or bestfit), resumable from a small JSON state
- parse_task_spec / build_mixture: the config-file syntax for training/validation mixtures (see below)
- micro_batch_loss_scale: per-token vs per-micro-batch loss normalisation (see below)
- grad_accum_steps_for / num_sft_iterations / count_steps_bestfit: step arithmetic with clear errors
- skip_reason: the (rank-agreed) decision to skip a NaN / out-of-memory step

Mixture specs (config keys train_mixture / val_mixture, lists of strings):

    "Name[:arg...][:start[:stop[:step]]][*repeats][@weight]"

    "ARC:ARC-Easy:train"            ARC("ARC-Easy", "train")
    "GSM8K:main:train*2"            GSM8K("main", "train") listed twice (two passes per epoch)
    "SmolTalk:train:0:10000"        SmolTalk("train", start=0, stop=10000)
    "SmolTalk:train::10000"         same (an empty field keeps the default)
    "ChitChat:train@0.5"            ChitChat("train") with mixture weight 0.5: half of it per epoch
    "CustomJSON:data/mine.jsonl"    CustomJSON("data/mine.jsonl") (a path must not contain ':')

Every task takes a fixed number of string arguments (TASK_ARGS: ARC/MMLU/GSM8K: subset, split; SmolTalk,
ChitChat: split; CustomJSON: filepath; HumanEval: none); up to three integer fields after them slice the
task. `*N` lists a task N times in the mixture (nanochat's way to oversample); `@w` gives it a weight, which
TaskMixture reads as a repetition multiplier (the task contributes round(w * len) entries: 0.5 = a random
half, 2.0 = two passes; tasks without one weigh 1.0; weights are passed only when some spec has one).
Bad specs raise MixtureSpecError naming the spec and what is wrong.

Loss normalisation (config key loss_normalization):
- "token" (default): the step loss is the sum of the token losses of all micro-batches on all ranks divided
  by the number of supervised tokens in the whole step. Every supervised token weighs the same, so
  (device_batch_size 4, 1 micro-step), (device_batch_size 1, 4 micro-steps) and 2 ranks give the same
  gradient as one big batch. The step's token count is all-reduced before the backward passes; since the
  optimizers AVERAGE gradients across ranks, each rank scales its summed loss by world_size / global_tokens.
- "micro_batch_mean": the guide's formula, mean loss per micro-batch divided by grad_accum_steps. A short
  conversation's tokens then weigh more than a long one's, and the gradient depends on how the step is cut
  into micro-batches and ranks (a micro-batch with 10 supervised tokens counts as much as one with 1000).
"""

import dataclasses
import difflib
import importlib
import math

import torch

from nanochat.common import UserError
from nanochat.config import ConfigError

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


def initial_data_state():
    """Where a rank's stream starts: epoch 0, first conversation, nothing pending (JSON-serialisable)."""
    return {"epoch": 0, "cursor": 0, "pending": []}


def sft_batches(dataset, render_fn, batch_size, pad_id, packing="pad", row_capacity=2049, drop_long=False,
                rank=0, world_size=1, state=None, lookahead=2.0, ignore_index=-1):
    """Yield (inputs, targets, segment_ids, stats, state) forever: CPU batches for one rank.

    The rank reads conversations rank, rank + world_size, rank + 2 * world_size, ... of `dataset` (a Task,
    a list: anything with len() and [i]); epochs repeat. `render_fn(conversation)` returns
    (ids, mask); a conversation longer than `row_capacity` tokens is truncated to it (counted in
    stats["truncated"]) or, with drop_long, skipped (stats["dropped"]).
    - packing "pad": batch_size conversations per batch, padded to the longest (collate_sft); segment_ids None.
    - packing "bestfit": conversations buffered until about lookahead * batch_size * row_capacity tokens are
      at hand, then best-fit into batch_size rows of row_capacity tokens (collate_packed); the leftovers go
      first into the next batch. Every conversation appears exactly once per epoch.
    `state` (from initial_data_state() or a previous yield) is the position AFTER the yielded batch, so a
    run that saves the state of the last batch it used resumes exactly there.
    stats: examples, truncated, dropped, positions (inputs.numel()), pad_positions, supervised, epoch."""
    assert packing in ("pad", "bestfit"), f"packing must be 'pad' or 'bestfit', got {packing!r}"
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
        ids, mask = render_fn(dataset[index])
        ids, mask = list(ids), list(mask)
        if len(ids) > row_capacity:
            if drop_long:
                counts["dropped"] += 1
                return None
            counts["truncated"] += 1
            ids, mask = ids[:row_capacity], mask[:row_capacity]
        if len(ids) < 2:
            counts["dropped"] += 1  # nothing to learn from (and nothing to pack)
            return None
        return index, ids, mask

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
                             f"{row_capacity} with drop_long, or shorter than 2 tokens)")
        return item

    def emit(inputs, targets, segment_ids, examples, pad_positions, pending_indices):
        stats = dict(examples=examples, truncated=counts["truncated"], dropped=counts["dropped"],
                     positions=inputs.numel(), pad_positions=pad_positions,
                     supervised=int((targets != ignore_index).sum()), epoch=epoch)
        counts["truncated"] = counts["dropped"] = 0
        return inputs, targets, segment_ids, stats, {"epoch": epoch, "cursor": cursor, "pending": pending_indices}

    pending = [item for item in (render(i) for i in state["pending"]) if item is not None]
    if packing == "pad":
        while True:
            batch = pending
            pending = []
            while len(batch) < batch_size:
                item = next_item()
                if item is not None:
                    batch.append(item)
            inputs, targets = collate_sft([(ids, mask) for _, ids, mask in batch], pad_id, ignore_index)
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
    """The bestfit stream on abstract items: pull items with next_item() (None = skipped) until about
    lookahead * batch_size * row_capacity tokens are buffered, best-fit them into batch_size rows, yield
    (rows of items, leftover items); leftovers go first into the next batch (oldest first, so none waits
    long), new items longest first (best-fit decreasing packs tighter)."""
    budget = lookahead * batch_size * row_capacity
    pending = list(pending)
    while True:
        fresh, buffered = [], sum(length_of(item) for item in pending)
        while buffered < budget:
            item = next_item()
            if item is not None:
                fresh.append(item)
                buffered += length_of(item)
        buffer = pending + sorted(fresh, key=lambda item: -length_of(item))
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


# ----------------------------------------------------------------------------------------------------------
# Step arithmetic and loss normalisation

LOSS_NORMALIZATIONS = ("token", "micro_batch_mean")


def grad_accum_steps_for(target_examples_per_step, device_batch_size, world_size):
    """target_examples_per_step // (device_batch_size * world_size), refusing settings that do not divide."""
    examples_per_micro_step = device_batch_size * world_size
    if target_examples_per_step <= 0 or target_examples_per_step % examples_per_micro_step != 0:
        raise ConfigError(
            f"target_examples_per_step={target_examples_per_step} must be a positive multiple of "
            f"device_batch_size * world_size = {device_batch_size} * {world_size} = {examples_per_micro_step}; "
            f"change target_examples_per_step or device_batch_size")
    return target_examples_per_step // examples_per_micro_step


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


# ----------------------------------------------------------------------------------------------------------
# Mixture specs

# task name -> (module, class name, names of its positional string arguments)
TASK_ARGS = {
    "ARC": ("tasks.arc", "ARC", ("subset", "split")),
    "MMLU": ("tasks.mmlu", "MMLU", ("subset", "split")),
    "GSM8K": ("tasks.gsm8k", "GSM8K", ("subset", "split")),
    "HumanEval": ("tasks.humaneval", "HumanEval", ()),
    "SmolTalk": ("tasks.smoltalk", "SmolTalk", ("split",)),
    "ChitChat": ("tasks.chitchat", "ChitChat", ("split",)),
    "CustomJSON": ("tasks.customjson", "CustomJSON", ("filepath",)),
}


class MixtureSpecError(UserError, ValueError):
    """A train_mixture / val_mixture entry that does not follow the spec syntax."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    args: tuple
    start: int = 0
    stop: int | None = None
    step: int = 1
    repeats: int = 1
    weight: float | None = None


def parse_task_spec(spec, task_args=None):
    """Parse one mixture entry "Name[:arg...][:start[:stop[:step]]][*repeats][@weight]" into a TaskSpec.
    `task_args` maps task name -> names of its positional arguments (default: from TASK_ARGS)."""
    task_args = {k: v[2] for k, v in TASK_ARGS.items()} if task_args is None else task_args

    def fail(msg):
        return MixtureSpecError(f"mixture spec {spec!r}: {msg}. Syntax: "
                                f"\"Name[:arg...][:start[:stop[:step]]][*repeats][@weight]\", "
                                f"e.g. \"SmolTalk:train:0:10000\", \"GSM8K:main:train*2\", \"ChitChat:train@0.5\"")

    if not isinstance(spec, str) or not spec.strip():
        raise fail("expected a non-empty string")
    text = spec.strip()
    weight = None
    if "@" in text:
        text, _, w = text.rpartition("@")
        try:
            weight = float(w)
        except ValueError:
            raise fail(f"weight {w.strip()!r} is not a number") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise fail(f"weight must be a positive number, got {weight}")
    repeats = 1
    if "*" in text:
        text, _, r = text.rpartition("*")
        if not r.strip().isdigit() or int(r) < 1:
            raise fail(f"repeats {r.strip()!r} must be a positive integer")
        repeats = int(r)
    fields = [f.strip() for f in text.strip().split(":")]
    name = fields[0]
    if name not in task_args:
        close = difflib.get_close_matches(name, list(task_args), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(task_args)}"
        raise fail(f"unknown task {name!r} ({hint})")
    arg_names = task_args[name]
    args, rest = fields[1 : 1 + len(arg_names)], fields[1 + len(arg_names) :]
    if len(args) < len(arg_names):
        raise fail(f"{name} needs {len(arg_names)} argument(s) ({', '.join(arg_names)}), got {len(args)}")
    for arg_name, arg in zip(arg_names, args):
        if not arg:
            raise fail(f"{name}: argument '{arg_name}' is empty")
    if len(rest) > 3:
        raise fail(f"too many fields: after {name}'s argument(s) ({', '.join(arg_names) or 'none'}) "
                   f"only start:stop:step may follow")
    slice_values = []
    for slice_name, value in zip(("start", "stop", "step"), rest):
        if value == "":
            slice_values.append(None)
            continue
        try:
            slice_values.append(int(value))
        except ValueError:
            raise fail(f"{slice_name} {value!r} is not an integer") from None
        if slice_values[-1] < 0:
            raise fail(f"{slice_name} must be >= 0, got {value}")
    slice_values += [None] * (3 - len(slice_values))
    start, stop, step = slice_values
    start = 0 if start is None else start
    step = 1 if step is None else step
    if step < 1:
        raise fail("step must be >= 1")
    if stop is not None and stop <= start:
        raise fail(f"stop ({stop}) must be greater than start ({start})")
    return TaskSpec(name=name, args=tuple(args), start=start, stop=stop, step=step, repeats=repeats, weight=weight)


def build_task(task_spec, registry=None):
    """Instantiate a TaskSpec: registry maps name -> task class (default: imported lazily from TASK_ARGS)."""
    if registry is not None:
        cls = registry[task_spec.name]
    else:
        module, class_name, _ = TASK_ARGS[task_spec.name]
        cls = getattr(importlib.import_module(module), class_name)
    kwargs = {"start": task_spec.start, "step": task_spec.step}
    if task_spec.stop is not None:
        kwargs["stop"] = task_spec.stop
    return cls(*task_spec.args, **kwargs)


def build_mixture(specs, registry=None, task_args=None, mixture_cls=None):
    """A list of spec strings -> one TaskMixture. Each spec's task is listed `repeats` times; weights (1.0
    where not given) are passed only when some spec has one. registry/task_args/mixture_cls are for tests;
    by default the classes come from tasks/."""
    if not isinstance(specs, (list, tuple)) or len(specs) == 0:
        raise MixtureSpecError(f"a mixture must be a non-empty list of spec strings, got {specs!r}")
    if task_args is None and registry is not None:
        raise ValueError("pass task_args together with registry")
    parsed = [parse_task_spec(s, task_args) for s in specs]
    tasks, weights = [], []
    for p in parsed:
        task = build_task(p, registry)
        tasks.extend([task] * p.repeats)
        weights.extend([1.0 if p.weight is None else p.weight] * p.repeats)
    if mixture_cls is None:
        from tasks.common import TaskMixture

        mixture_cls = TaskMixture
    if any(p.weight is not None for p in parsed):
        return mixture_cls(tasks, weights=weights)
    return mixture_cls(tasks)


# ----------------------------------------------------------------------------------------------------------
# Task metrics (run_chat_eval) specs

def parse_eval_spec(spec):
    """"Name[:max_problems]" -> (name, max_problems or None), e.g. "MMLU:1024", "GSM8K:64", "HumanEval"."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixtureSpecError(f"eval task spec {spec!r}: expected \"Name[:max_problems]\"")
    name, _, limit = spec.strip().partition(":")
    if not limit:
        return name, None
    if not limit.isdigit() or int(limit) < 1:
        raise MixtureSpecError(f"eval task spec {spec!r}: max_problems {limit!r} must be a positive integer")
    return name, int(limit)


def metric_key(task_name):
    """"ARC-Easy" -> "arc_easy_acc" (the guide's metric names)."""
    return task_name.lower().replace("-", "_") + "_acc"
