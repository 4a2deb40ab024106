"""
SFT building blocks for scripts/chat_sft.py and the benches (tests: tests/test_sft.py). The epoch is planned once, as
TRL's pack_dataset(strategy="bfd") plans its packing: render_share keeps each rank's lengths, plan_epoch packs them,
sft_batches renders the planned conversations again (keeping the ids would hold a large mixture in memory) and
collates them (nanochat.collate). Epochs repeat the plan, so the step number is the whole resume state.
accumulate_step: one step.
"""

import contextlib
import itertools
import math
import random
from typing import NamedTuple

import torch
import torch.distributed as dist

from nanochat.collate import collate_packed, collate_sft, pack_best_fit
from nanochat.common import UserError, all_reduce_values
from nanochat.config import ConfigError
from nanochat.perf import batch_flops, bucketed_length, pad_to_bucket

LOSS_NORMALIZATIONS = ("token", "micro_batch_mean")  # see README, "Loss normalisation"
PACKINGS = ("pad", "bestfit")

# ----------------------------------------------------------------------------------------------------------
# The plan: one rank's share rendered once, packed once, then materialised


def fit_conversation(ids, mask, row_capacity, drop_long):
    """The one filter of rendered conversations, for the plan and the batches alike: -> (ids, mask) cut to
    row_capacity, or (None, None) when dropped (longer than row_capacity with drop_long, or under 2 tokens)."""
    if len(ids) < 2 or (drop_long and len(ids) > row_capacity):
        return None, None
    return list(ids[:row_capacity]), list(mask[:row_capacity])


class BatchSettings(NamedTuple):
    packing: str = "pad"  # PACKINGS
    batch_size: int = 4  # conversations (pad) or rows (bestfit) per micro-batch
    row_capacity: int = 2049  # tokens per row: max_seq_len input positions + the last target
    pad_id: int = 0  # <|assistant_end|> in chat_sft: padding has no target anyway
    drop_long: bool = False  # drop conversations longer than row_capacity instead of truncating them
    bucket: int = 1  # pad mode, compiled: batch lengths rounded up to a multiple of this (pad_to_bucket)


class Share(NamedTuple):
    """One rank's share of a dataset, rendered once: per conversation in reading order,"""
    indices: list  # its dataset index
    tokens: list  # rendered length
    lengths: list  # length after fit_conversation: 0 if dropped, < tokens if truncated
    supervised: list  # supervised targets after fitting
    sources: list  # the mixture part it came from


def render_share(dataset, render_fn, settings, rank=0, world_size=1, locate=None):
    """Conversations rank, rank + world_size, ... rendered (render_fn -> ids, mask) and fitted -> Share. locate(index)
    -> (source, key), so that a conversation a mixture repeats is rendered once (default: source 0, no repeats)."""
    share, seen = Share([], [], [], [], []), {}
    for index in range(rank, len(dataset), world_size):
        where = (0, index) if locate is None else locate(index)
        if where not in seen:
            ids, mask = render_fn(dataset[index])
            fitted, fitted_mask = fit_conversation(ids, mask, settings.row_capacity, settings.drop_long)
            seen[where] = (len(ids), len(fitted or ()), sum(fitted_mask[1:]) if fitted else 0)
        for column, value in zip(share, (index, *seen[where], where[0])):
            column.append(value)
    if not share.indices:
        raise UserError(f"rank {rank} of {world_size} gets no conversations from a dataset of {len(dataset)}: use "
                        f"more data or fewer processes")
    if not any(share.lengths):
        raise ConfigError(f"every conversation of rank {rank} is dropped (longer than row_capacity="
                          f"{settings.row_capacity} with drop_long, or shorter than 2 tokens): raise max_seq_len or "
                          f"set drop_long = false")
    return share


def gather_share(share, world_size=1):
    """Every rank's Share joined into one, rank after rank: the whole dataset's figures (a collective)."""
    if world_size == 1:
        return share
    shares = [None] * world_size
    dist.all_gather_object(shares, tuple(share))
    return Share(*(sum(map(list, columns), []) for columns in zip(*shares)))


def plan_epoch(lengths, settings, seed=0):
    """The epoch's micro-batches (lists of rows of Share positions): "pad" = batch_size consecutive conversations;
    "bestfit" = pack_best_fit by decreasing length, rows shuffled (else the first steps would hold only the longest)."""
    kept = [j for j, n in enumerate(lengths) if n > 0]
    if settings.packing == "pad":
        rows = [[j] for j in kept]
    else:
        kept.sort(key=lambda j: -lengths[j])  # stable: ties keep the reading order
        rows = [[kept[i] for i in row] for row in pack_best_fit([lengths[j] for j in kept], settings.row_capacity)]
        random.Random(seed).shuffle(rows)
    return [rows[i:i + settings.batch_size] for i in range(0, len(rows), settings.batch_size)]


def plan_positions(plan, lengths, settings):
    """(positions, pad_positions) of a plan's micro-batches as collated (for the batches and the preview alike)."""
    positions = pad_positions = 0
    for rows in plan:
        row_lengths = [sum(lengths[j] for j in row) for row in rows]
        if settings.packing == "pad":  # a row per conversation, padded to the longest (bucketed): n - 1 real inputs
            T = bucketed_length(max(row_lengths) - 1, settings.bucket, settings.row_capacity - 1)
            num_rows, real = len(rows), sum(n - 1 for n in row_lengths)
        else:  # batch_size full rows: a row of n tokens has min(n, T) real inputs
            T = settings.row_capacity - 1
            num_rows, real = settings.batch_size, sum(min(n, T) for n in row_lengths)
        positions, pad_positions = positions + num_rows * T, pad_positions + num_rows * T - real
    return positions, pad_positions


class SFTBatch(NamedTuple):
    """One micro-batch of one rank, on the CPU."""
    inputs: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor | None  # None under packing "pad"
    stats: dict  # STAT_KEYS
    sources: torch.Tensor  # the Share source (mixture part) of each target, -1 where there is none


def sft_batches(dataset, render_fn, share, plan, settings, start=0):
    """SFTBatch of micro-batch start, start + 1, ... of the run, forever: micro-batch k is plan[k % len(plan)].
    stats["dropped"] counts the share's dropped conversations on the first micro-batch of each epoch."""
    s = settings
    for k in itertools.count(start):
        rows = plan[k % len(plan)]
        items = [[fit_conversation(*render_fn(dataset[share.indices[j]]), s.row_capacity, s.drop_long)
                  for j in row] for row in rows]
        assert [len(ids) for row in items for ids, _ in row] == [share.lengths[j] for row in rows for j in row], \
            "render_fn gave other lengths than when the epoch was planned"
        if s.packing == "pad":
            inputs, targets = pad_to_bucket(*collate_sft([row[0] for row in items], s.pad_id), s.bucket, s.pad_id,
                                            s.row_capacity - 1)
            segment_ids = None
        else:
            inputs, targets, segment_ids = collate_packed(items, s.row_capacity, s.pad_id, num_rows=s.batch_size)
        table = torch.full((inputs.size(0), 1 + max(map(len, rows))), -1, dtype=torch.long)  # row, segment -> source
        for r, row in enumerate(rows):
            table[r, 1:1 + len(row)] = torch.tensor([share.sources[j] for j in row])
        sources = table.gather(1, torch.ones_like(inputs) if segment_ids is None else segment_ids)
        sources[targets == -1] = -1
        positions, pad_positions = plan_positions([rows], share.lengths, s)
        assert positions == inputs.numel(), "the plan counts other positions than the batch has"
        stats = dict(examples=sum(map(len, rows)), positions=positions, pad_positions=pad_positions,
                     truncated=sum(share.lengths[j] < share.tokens[j] for row in rows for j in row),
                     dropped=share.lengths.count(0) if k % len(plan) == 0 else 0,
                     supervised=int((targets != -1).sum()))
        yield SFTBatch(inputs, targets, segment_ids, stats, sources)


# ----------------------------------------------------------------------------------------------------------
# Step arithmetic and loss normalisation


def micro_batch_loss_scale(loss_normalization, micro_tokens, step_tokens, world_size, grad_accum_steps):
    """The factor that turns a micro-batch's SUMMED token loss into the loss to backpropagate (gradients are averaged
    over ranks): "token" = the step's mean token loss; "micro_batch_mean" = the guide's. A zero count gives 0."""
    if loss_normalization == "token":
        return world_size / step_tokens if step_tokens > 0 else 0.0
    if loss_normalization == "micro_batch_mean":
        return 1.0 / (micro_tokens * grad_accum_steps) if micro_tokens > 0 else 0.0
    raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {loss_normalization!r}")


def skip_reason(step_loss, oom_count):
    """Why an optimizer step must be skipped, or None, from values reduced over ranks (the summed loss: any NaN/inf
    propagates; the ranks out of memory), so every rank decides the same and none waits in a collective."""
    if oom_count > 0:
        return "out of memory"
    return None if math.isfinite(step_loss) else f"non-finite loss ({step_loss})"


def backward_micro_batches(model, micro_batches, loss_fn, num_values, device, world_size=1, rank=0):
    """Backward of one optimizer step's micro-batches on this rank, leaving the gradients in .grad. loss_fn(batch)
    returns (the loss to backpropagate, num_values numbers: floats or one-element tensors, read after the backward),
    the first being the loss whose sum decides skip_reason. A CUDA out-of-memory error on any rank, or a non-finite
    summed loss, makes every rank skip the step: one all-reduce carries the values and the out-of-memory count, so
    all ranks decide the same; a skipped step leaves no gradient. Returns (the values summed over micro-batches and
    ranks, a rank out of memory adding zeros; the skip reason or None)."""
    device = torch.device(device)
    sums, oom, loss, values = [0.0] * num_values, 0.0, None, None
    try:
        for batch in micro_batches:
            loss, values = loss_fn(batch)
            loss.backward()
            sums = [a + float(b) for a, b in zip(sums, values)]
    except torch.cuda.OutOfMemoryError as e:
        print(f"[rank {rank}] out of memory: {str(e).splitlines()[0] if str(e) else ''}")
        oom = 1.0
    if oom:  # outside the except block: its traceback would keep the forward's activations alive
        sums, loss, values = [0.0] * num_values, None, None
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    *sums, oom = all_reduce_values([*sums, oom], "sum", device, world_size)
    reason = skip_reason(sums[0], oom)
    if reason is not None:
        model.zero_grad(set_to_none=True)  # no gradient of a skipped step survives into the next
    return sums, reason


def num_sft_steps(num_micro_batches, grad_accum, num_epochs, max_iterations=-1, device="cpu", world_size=1):
    """Optimizer steps of num_epochs passes over a plan: the fewest over ranks (a rank with more would wait forever
    in a collective), capped by max_iterations (-1: none)."""
    steps = int(all_reduce_values([num_epochs * num_micro_batches // grad_accum], "min", device, world_size)[0])
    return min(steps, max_iterations) if max_iterations >= 0 else steps


STAT_KEYS = ("supervised", "positions", "pad_positions", "examples", "truncated", "dropped")  # of SFTBatch.stats
TOTAL_KEYS = (*STAT_KEYS, "flops", "useful_flops")  # StepResult.totals: the stats and perf.batch_flops


class StepResult(NamedTuple):
    loss: float  # the step's loss, as the optimizer sees it (mean over ranks of the scaled sums)
    skip: str | None  # why the optimizer step must not be taken (the same on every rank), or None
    totals: dict  # TOTAL_KEYS summed over the step's micro-batches and all ranks
    source_loss: list = ()  # per source (SFTBatch.sources): summed token loss, all micro-batches and ranks
    source_tokens: list = ()  # per source: supervised tokens (empty where there are no sources: chat_rl)


def source_sums(token_loss, sources, num_sources):
    """A batch's summed token loss and supervised tokens per source -> two float64 CPU tensors (num_sources,).
    token_loss: the model's loss_reduction="none" output; sources: SFTBatch.sources (-1: no target, not counted)."""
    valid = sources >= 0
    weights = token_loss.detach().double().cpu().reshape(sources.shape)[valid]
    return (torch.bincount(sources[valid], weights=weights, minlength=num_sources),
            torch.bincount(sources[valid], minlength=num_sources).double())


def accumulate_step(model, micro_batches, loss_normalization, device, world_size=1, rank=0,
                    autocast=contextlib.nullcontext, num_sources=1):
    """Forward and backward of one optimizer step's micro-batches (SFTBatch list), leaving the gradients in .grad,
    normalised by micro_batch_loss_scale; the step's counts are all-reduced first, then backward_micro_batches
    sums the loss and each source's loss and tokens over ranks and decides whether every rank skips the step."""
    device = torch.device(device)
    flops = [batch_flops(model, b.inputs, b.stats["pad_positions"]) for b in micro_batches]
    local = [sum(b.stats[k] for b in micro_batches) for k in STAT_KEYS] + [sum(f) for f in zip(*flops)]
    totals = dict(zip(TOTAL_KEYS, all_reduce_values(local, "sum", device, world_size)))

    def loss_fn(batch):
        inputs, targets, segment_ids = (None if t is None else t.to(device, non_blocking=device.type == "cuda")
                                        for t in batch[:3])
        with autocast():
            token_loss = model(inputs, targets, loss_reduction="none", segment_ids=segment_ids)
        source_loss, source_tokens = source_sums(token_loss, batch.sources, num_sources)
        loss = token_loss.sum() * micro_batch_loss_scale(loss_normalization, batch.stats["supervised"],
                                                         totals["supervised"], world_size, len(micro_batches))
        return loss, [loss.detach(), *source_loss.tolist(), *source_tokens.tolist()]

    (objective, *by_source), reason = backward_micro_batches(model, micro_batches, loss_fn, 1 + 2 * num_sources,
                                                             device, world_size, rank)
    return StepResult(objective / world_size, reason, totals, by_source[:num_sources], by_source[num_sources:])
