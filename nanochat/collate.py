"""
Token rows into batches, shared by SFT (nanochat.sft), DPO (nanochat.dpo), RL (nanochat.rl) and chat_eval's
conversation loss (nanochat.loss_eval): collate_sft pads (ids, mask) rows to the longest, pack_best_fit plans
packed rows (indices in, indices out), collate_packed builds packed rows with segment ids. Pure, CPU tensors.
Tests: tests/test_sft.py.
"""

import bisect
from collections import defaultdict

import torch


def collate_sft(batch, pad_id, ignore_index=-1):
    """The guide's SFT batch: (ids, mask) pairs (mask 1 on tokens the assistant must produce) padded to the longest
    with pad_id -> (inputs, targets), int64 CPU tensors (B, max_len - 1): inputs = ids[:-1], targets = ids[1:] with
    ignore_index where the target's mask is 0 and on padding."""
    assert len(batch) > 0, "empty batch"
    max_len = max(len(ids) for ids, _ in batch)
    assert max_len >= 2, "every batch needs a conversation of at least 2 tokens"
    inputs = torch.full((len(batch), max_len - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), max_len - 1), ignore_index, dtype=torch.long)
    for i, (ids, mask) in enumerate(batch):
        assert len(ids) == len(mask), f"row {i}: ids and mask lengths differ ({len(ids)} vs {len(mask)})"
        n, row = len(ids), torch.tensor(ids, dtype=torch.long)
        if n < 2:
            continue  # a single token has no target: the row stays padding
        inputs[i, : n - 1] = row[:-1]
        targets[i, : n - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), row[1:], ignore_index)
    return inputs, targets


def pack_best_fit(lengths, row_capacity):
    """Best fit of items (lengths) in the given order into rows of row_capacity tokens: each goes to the open row with
    the least room that fits it (a bisection over the distinct rooms), else opens one. -> rows of item indices."""
    rows, rooms, rows_with_room = [], [], defaultdict(list)  # rooms: the sorted distinct rooms of open rows
    for i, n in enumerate(lengths):
        assert 0 < n <= row_capacity, f"item {i} has length {n}, outside (0, {row_capacity}]"
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):  # the tightest room that fits
            room, r = rooms[k], rows_with_room[rooms[k]].pop()
            if not rows_with_room[room]:
                del rooms[k]
        else:
            room, r = row_capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            if not rows_with_room[room - n]:
                bisect.insort(rooms, room - n)
            rows_with_room[room - n].append(r)
    return rows


def collate_packed(rows, row_capacity, pad_id, ignore_index=-1, num_rows=None):
    """Rows (lists of (ids, mask), at most row_capacity tokens) -> (inputs, targets, segment_ids), int64 CPU tensors
    (num_rows, row_capacity - 1). Conversation j of a row has segment id j + 1, padding 0 (the model attends within a
    segment only); a target is kept inside one conversation where its mask is 1. Rows beyond len(rows): padding."""
    num_rows = len(rows) if num_rows is None else num_rows
    assert len(rows) <= num_rows, f"{len(rows)} rows do not fit a batch of {num_rows}"
    T = row_capacity - 1
    inputs = torch.full((num_rows, T), pad_id, dtype=torch.long)
    targets = torch.full((num_rows, T), ignore_index, dtype=torch.long)
    segment_ids = torch.zeros((num_rows, T), dtype=torch.long)
    for r, row in enumerate(rows):
        ids_t = torch.tensor([t for conv_ids, _ in row for t in conv_ids], dtype=torch.long)
        mask_t = torch.tensor([m for _, conv_mask in row for m in conv_mask], dtype=torch.bool)
        seg_t = torch.tensor([j + 1 for j, (conv_ids, _) in enumerate(row) for _ in conv_ids], dtype=torch.long)
        n = len(ids_t)
        assert n <= row_capacity, f"row {r} holds {n} tokens > row_capacity {row_capacity}"
        m = min(n, T)  # input positions holding real tokens (the row's very last token is only a target)
        inputs[r, :m] = ids_t[:m]
        segment_ids[r, :m] = seg_t[:m]
        if n >= 2:
            valid = mask_t[1:] & (seg_t[1:] == seg_t[:-1])  # same conversation and a supervised target
            targets[r, : n - 1] = torch.where(valid, ids_t[1:], ignore_index)
    return inputs, targets, segment_ids
