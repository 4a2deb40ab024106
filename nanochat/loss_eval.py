"""
Validation losses.

evaluate_sft_loss: chat SFT's validation loss, in the unit of its training loss (loss_normalization, see the
README's "Loss normalisation"): "token" = summed token loss / supervised tokens over all batches and ranks;
"micro_batch_mean" = the guide's mean of batch means; and each source's (mixture part's) summed token loss and
supervised tokens (nanochat.sft.source_sums, as the training step's), for chat_sft's per-source validation loss.

evaluate_bpb: bits per byte, a validation loss that does not depend on the tokenizer's vocabulary size.

    bpb = sum of cross-entropy (nats) over counted targets / (ln 2 * sum of their UTF-8 byte lengths)

A target counts when it is not -1 (ignore index) and its token_bytes entry is > 0 (special tokens such as
<|bos|> have 0 bytes and are left out, as in nanochat). Across ranks both sums are all-reduced (SUM) before
dividing, so the result is the bpb of all the ranks' tokens together.

Tests: tests/test_loss_eval.py.
"""

import contextlib
import math
import sys
import time
from typing import NamedTuple

import torch

from nanochat.common import all_reduce_values, dist_rank_world
from nanochat.collate import collate_sft
from nanochat.sft import source_sums


class LoopProgress:
    """Progress of an evaluation loop on rank 0: a tqdm bar on a terminal; in logs a line at each new tenth,
    at most every `min_interval` seconds."""

    def __init__(self, name, total, rank=0, min_interval=5.0):
        self.name, self.total, self.enabled, self.min_interval = name, total, rank == 0, min_interval
        self.bar, self.last_tenth = None, 0
        self.t0 = self.last_print = time.time()
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, leave=False)

    def update(self, done, note="", n=1):
        """`done` items of `total` are finished; `note` (e.g. "accuracy 41%") is shown with the count."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
            return
        tenth, now = done * 10 // max(self.total, 1), time.time()
        if tenth > self.last_tenth and now - self.last_print >= self.min_interval:
            self.last_tenth, self.last_print = tenth, now
            print(f"{self.name}: {done}/{self.total} (rank 0){' | ' + note if note else ''} | {now - self.t0:.1f}s",
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class SFTLoss(NamedTuple):
    loss: float  # in the unit of loss_normalization, all batches and ranks
    source_loss: list  # per source (SFTBatch.sources): summed token loss, all batches and ranks
    source_tokens: list  # per source: supervised tokens ("token": loss = sum(source_loss) / sum(source_tokens))


@torch.no_grad()
def evaluate_sft_loss(model, batches, steps, loss_normalization, device, world_size=1, rank=0,
                      autocast=contextlib.nullcontext, num_sources=1):
    """SFT validation loss over `steps` batches per rank from `batches` (nanochat.sft.SFTBatch, on the CPU),
    averaged over ranks as the training loss is, with each source's sums as accumulate_step's -> SFTLoss."""
    device = torch.device(device)
    sums, mean_sum = torch.zeros(2, num_sources, dtype=torch.float64), 0.0  # per source: loss, tokens
    progress = LoopProgress("validation", steps, rank)
    for i in range(steps):
        batch = next(batches)
        inputs, targets, segment_ids = (None if t is None else t.to(device) for t in batch[:3])
        with autocast():
            token_loss = model(inputs, targets, loss_reduction="none", segment_ids=segment_ids)
        batch_sums = torch.stack(source_sums(token_loss, batch.sources, num_sources))
        sums += batch_sums
        mean_sum += float(batch_sums[0].sum() / max(batch_sums[1].sum(), 1))
        progress.update(i + 1)
    progress.close()
    mean_sum, *sums = all_reduce_values([mean_sum, *sums.flatten().tolist()], "sum", device, world_size)
    source_loss, source_tokens = sums[:num_sources], sums[num_sources:]
    if loss_normalization == "token":  # per supervised token, all batches and ranks
        return SFTLoss(sum(source_loss) / max(sum(source_tokens), 1), source_loss, source_tokens)
    return SFTLoss(mean_sum / (steps * world_size), source_loss, source_tokens)  # the guide: mean of batch means


def bpb_sums(loss, targets, token_bytes):
    """(nats, bytes) summed over the counted targets. loss: per-target CE in nats, any shape matching targets."""
    loss, targets = loss.reshape(-1).float(), targets.reshape(-1)
    valid = targets >= 0
    num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets, dtype=token_bytes.dtype))
    counted = num_bytes > 0
    nats = torch.where(counted, loss, torch.zeros_like(loss)).sum(dtype=torch.float64)
    return nats, num_bytes.sum(dtype=torch.int64)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, rank=None, world_size=None):
    """Bits per byte of `model` over `steps` batches from `batches` (an iterator of (inputs, targets, ...)).
    token_bytes: int tensor (vocab_size,) of UTF-8 byte lengths, 0 for special tokens. The model is called
    as model(inputs, targets, loss_reduction="none") and must return per-target losses in nats."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        inputs, targets = next(batches)[:2]
        loss = model(inputs, targets, loss_reduction="none")
        nats, num_bytes = bpb_sums(loss.to(device), targets.to(device), token_bytes)
        total_nats += nats
        total_bytes += num_bytes
    total_nats, total_bytes = all_reduce_values([total_nats.item(), total_bytes.item()], "sum", device, world_size)
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)


@torch.no_grad()
def conversation_loss(model, conversations, render_fn, pad_id, token_bytes, batch_size=8, rank=0, world_size=1,
                      autocast=contextlib.nullcontext):
    """Assistant-token loss and bits per byte of `model` on conversations (chat_eval on your own data): each rank
    takes conversations[rank::world_size], rendered by render_fn (-> ids, mask, already cut to the model's
    length) and padded into batches (nanochat.collate.collate_sft); the targets are the supervised tokens. Returns
    {"loss": nats per supervised token, "bpb": bits per UTF-8 byte of those tokens (specials left out, as
    evaluate_bpb), "tokens": supervised tokens, "conversations": how many}, summed over ranks before dividing."""
    device = token_bytes.device
    mine = conversations[rank::world_size]
    loss_sum = tokens = nats = num_bytes = 0.0
    for i in range(0, len(mine), batch_size):
        inputs, targets = collate_sft([render_fn(c) for c in mine[i:i + batch_size]], pad_id)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            loss = model(inputs, targets, loss_reduction="none").reshape(-1).float()
        flat = targets.reshape(-1)
        loss_sum += float(loss[flat != -1].sum())
        tokens += int((flat != -1).sum())
        batch_nats, batch_bytes = bpb_sums(loss, flat, token_bytes)
        nats, num_bytes = nats + float(batch_nats), num_bytes + int(batch_bytes)
    loss_sum, tokens, nats, num_bytes, count = all_reduce_values([loss_sum, tokens, nats, num_bytes, len(mine)], "sum",
                                                                 device, world_size)
    return {"loss": loss_sum / tokens if tokens else float("nan"),
            "bpb": nats / (math.log(2) * num_bytes) if num_bytes else float("nan"),
            "tokens": int(tokens), "conversations": int(count)}
