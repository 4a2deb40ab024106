"""
Bits per byte: a validation loss that does not depend on the tokenizer's vocabulary size.

    bpb = sum of cross-entropy (nats) over counted targets / (ln 2 * sum of their UTF-8 byte lengths)

A target counts when it is not -1 (ignore index) and its token_bytes entry is > 0 (special tokens such as
<|bos|> have 0 bytes and are left out, as in nanochat). Across ranks both sums are all-reduced (SUM) before
dividing, so the result is the bpb of all the ranks' tokens together.

Tests: tests/test_loss_eval.py.
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import dist_rank_world


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
    if world_size > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
