"""
Unit tests for nanochat/sft.py: collation, best-fit packing, the epoch plan and its batches, loss
normalisation, step arithmetic, the optimizer step (accumulate_step) and the data preview. Fast, CPU only, no data mirror needed.

    .venv/bin/python -m pytest tests/test_sft.py
"""

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.perf import batch_flops
from nanochat.schedules import lr_multiplier
from nanochat.config import ConfigError
from nanochat.sft import (BatchSettings, Share, accumulate_step, collate_packed, collate_sft, fit_conversation,
                          gather_share, micro_batch_loss_scale, num_sft_steps, pack_best_fit, plan_epoch,
                          plan_positions, render_share, sft_batches, skip_reason)
from nanochat.sft_report import data_summary, format_skip, format_sources, format_step, summary_lines

PAD = 99
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# collation


def test_collate_sft_shift_mask_and_padding():
    batch = [
        ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]),
        ([6, 7, 8], [0, 1, 0]),
    ]
    inputs, targets = collate_sft(batch, pad_id=PAD)
    assert inputs.dtype == torch.long and targets.dtype == torch.long
    assert inputs.shape == targets.shape == (2, 4)
    assert inputs.tolist() == [[1, 2, 3, 4], [6, 7, PAD, PAD]]
    # target t = ids[t+1], kept only where mask[t+1] == 1; padding -> -1
    assert targets.tolist() == [[-1, 3, 4, 5], [7, -1, -1, -1]]
    _, targets_ignore = collate_sft(batch, pad_id=PAD, ignore_index=-100)
    assert targets_ignore.tolist()[1] == [7, -100, -100, -100]


def test_collate_sft_with_real_tokenizer(tokenizer):
    conversation = {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]}
    ids, mask = tokenizer.render_conversation(conversation)
    short_ids, short_mask = tokenizer.render_conversation({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you today?"}]})
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    user_start = tokenizer.encode_special("<|user_start|>")
    inputs, targets = collate_sft([(ids, mask), (short_ids, short_mask)], pad_id=assistant_end)
    n = len(ids)
    assert inputs[0, : n - 1].tolist() == ids[:-1]
    row = targets[0, : n - 1].tolist()
    # the final <|assistant_end|> is a supervised target; no user token is
    assert row[-1] == assistant_end == ids[-1]
    for t, (tok, m) in enumerate(zip(ids[1:], mask[1:])):
        assert row[t] == (tok if m else -1)
        if tok == user_start:
            assert row[t] == -1
    assert sum(1 for t in row if t != -1) == sum(mask[1:])
    # padding (if any) uses <|assistant_end|> in inputs and -1 in targets
    m = len(short_ids)
    if m < n:
        assert set(inputs[1, m - 1 :].tolist()) == {assistant_end}
        assert set(targets[1, m - 1 :].tolist()) == {-1}


# ---------------------------------------------------------------------------------------------------------
# packing


def _naive_best_fit_rooms(lengths, row_capacity):
    """The rooms left in the rows of a plain quadratic best fit (the reference for pack_best_fit)."""
    rooms = []
    for n in lengths:
        fits = [r for r, room in enumerate(rooms) if room >= n]
        if fits:
            rooms[min(fits, key=lambda r: rooms[r])] -= n
        else:
            rooms.append(row_capacity - n)
    return rooms


def test_pack_best_fit_small_example():
    assert pack_best_fit([5, 4, 3, 2], row_capacity=7) == [[0, 3], [1, 2]]
    # best fit (tightest room), not first fit: 3 goes to the row with room 3, not the one with room 5
    assert pack_best_fit([5, 7, 3], row_capacity=10) == [[0], [1, 2]]
    assert pack_best_fit([4, 4, 2, 2, 2], row_capacity=4) == [[0], [1], [2, 3], [4]]  # a full row takes nothing
    with pytest.raises(AssertionError):
        pack_best_fit([11], row_capacity=10)


@pytest.mark.parametrize("seed", range(5))
def test_pack_best_fit_random(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = pack_best_fit(lengths, row_capacity=64)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every item exactly once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best fit never opens a new row for an item that fit an open one: rows beat the trivial bound
    assert len(rows) <= len(lengths) and len(rows) >= sum(lengths) / 64
    # the same rooms as the plain quadratic best fit (rows with equal rooms are interchangeable)
    assert sorted(64 - sum(lengths[i] for i in row) for row in rows) == sorted(_naive_best_fit_rooms(lengths, 64))


def test_collate_packed_segments_and_targets():
    row0 = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    row1 = [([6, 7, 8, 9, 10, 11], [0, 0, 1, 1, 1, 1])]  # fills the row: its last token is only a target
    inputs, targets, seg = collate_packed([row0, row1], row_capacity=6, pad_id=PAD, num_rows=3)
    assert inputs.shape == targets.shape == seg.shape == (3, 5)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [PAD] * 5]
    assert seg.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1], [0] * 5]
    # 3 -> 4 crosses conversations: -1; 4 -> 5 supervised; a padding row has no targets
    assert targets.tolist() == [[2, 3, -1, 5, -1], [-1, 8, 9, 10, 11], [-1] * 5]
    # a row with room left: padding has segment 0
    inputs, targets, seg = collate_packed([[([1, 2], [0, 1])]], row_capacity=5, pad_id=PAD)
    assert inputs.tolist() == [[1, 2, PAD, PAD]] and seg.tolist() == [[1, 1, 0, 0]]
    assert targets.tolist() == [[2, -1, -1, -1]]


# ---------------------------------------------------------------------------------------------------------
# the epoch plan and its batches


def _toy_dataset(n, seed=0, max_len=20):
    """Conversation i renders as [1000 + i] * length with mask 1 after the first token: the ids say which
    conversation a token came from."""
    rng = random.Random(seed)
    return [{"i": i, "n": rng.randint(2, max_len)} for i in range(n)]


def _toy_render(conv):
    return [1000 + conv["i"]] * conv["n"], [0] + [1] * (conv["n"] - 1)


def _planned(data, settings, rank=0, world_size=1, seed=0):
    share = render_share(data, _toy_render, settings, rank, world_size, locate=lambda i: (i % 3, i))
    plan = plan_epoch(share.lengths, settings, seed)
    return share, plan, sft_batches(data, _toy_render, share, plan, settings)


def _whole_conversations(targets, data):
    """The conversations of a batch, row by row, checking each is whole (n - 1 consecutive targets)."""
    seen = []
    for r in range(targets.shape[0]):
        row = [t - 1000 for t in targets[r][targets[r] != -1].tolist()]
        while row:
            c = row[0]
            assert row[: data[c]["n"] - 1] == [c] * (data[c]["n"] - 1)
            seen.append(c)
            row = row[data[c]["n"] - 1:]
    return seen


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_plan_covers_every_conversation_once_per_epoch_and_repeats(packing):
    data = _toy_dataset(37)
    settings = BatchSettings(packing, batch_size=3, row_capacity=24, pad_id=PAD)
    for rank in range(2):
        share, plan, stream = _planned(data, settings, rank, 2)
        assert share.indices == list(range(rank, 37, 2)) and share.sources == [i % 3 for i in share.indices]
        epochs = []
        for _ in range(2):
            seen, positions = [], [0, 0]
            for _ in range(len(plan)):
                inputs, targets, seg, stats, sources = next(stream)
                assert inputs.shape[0] == (3 if packing == "bestfit" else stats["examples"])
                supervised = targets != -1  # each target's source is its conversation's (locate: i % 3), else -1
                assert (sources[supervised] == (targets[supervised] - 1000) % 3).all()
                assert (sources[~supervised] == -1).all()
                assert (seg is None) == (packing == "pad")
                batch_seen = _whole_conversations(targets, data)
                assert stats["examples"] == len(batch_seen) and stats["supervised"] == int((targets != -1).sum())
                assert 0 <= stats["pad_positions"] <= stats["positions"] == inputs.numel()
                positions = [positions[0] + stats["positions"], positions[1] + stats["pad_positions"]]
                seen.extend(batch_seen)
            assert sorted(seen) == share.indices  # every conversation exactly once per epoch
            assert tuple(positions) == plan_positions(plan, share.lengths, settings)  # the preview counts the batches
            epochs.append(seen)
        assert epochs[0] == epochs[1]  # the second epoch repeats the first one's plan
        if packing == "pad":
            assert epochs[0] == share.indices  # the guide's order: consecutive groups in reading order
            assert [len(mb) for mb in plan] == [3] * 6 + [1] * (len(share.indices) % 3 == 1)


def test_plan_bestfit_is_decreasing_best_fit_with_shuffled_rows():
    data = _toy_dataset(101, seed=3, max_len=30)
    settings = BatchSettings("bestfit", batch_size=4, row_capacity=40, pad_id=PAD)
    share, plan, stream = _planned(data, settings, seed=7)
    rows = [row for mb in plan for row in mb]
    by_length = sorted(range(len(data)), key=lambda j: -share.lengths[j])
    want = [[by_length[i] for i in row] for row in pack_best_fit([share.lengths[j] for j in by_length], 40)]
    assert sorted(rows) == sorted(want) and rows != want  # the same rows, shuffled with the seed
    assert plan == plan_epoch(share.lengths, settings, seed=7) != plan_epoch(share.lengths, settings, seed=8)
    inputs, targets, seg, stats, _ = next(stream)
    for r in range(inputs.shape[0]):  # segment ids: one per conversation, in row order, then padding 0
        segs = seg[r].tolist()
        assert segs == sorted(segs, key=lambda s: (s == 0, s)) and max(segs) == len(plan[0][r])


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_batches_resume_from_the_micro_batch_number(packing):
    data = _toy_dataset(23, seed=1)
    settings = BatchSettings(packing, batch_size=2, row_capacity=32, pad_id=PAD)
    share, plan, straight = _planned(data, settings, rank=1, world_size=2)
    batches = [next(straight) for _ in range(3 * len(plan))]  # three epochs
    resumed = sft_batches(data, _toy_render, share, plan, settings, start=5)
    for want in batches[5:]:
        got = next(resumed)
        assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
        assert got.stats == want.stats


def test_plan_truncates_or_drops_long_conversations():
    data = [{"i": 0, "n": 10}, {"i": 1, "n": 3}, {"i": 2, "n": 4}]
    share, _, stream = _planned(data, BatchSettings("pad", 3, row_capacity=5, pad_id=PAD))
    assert share.tokens == [10, 3, 4] and share.lengths == [5, 3, 4]  # the first is truncated
    inputs, targets, _, stats, _ = next(stream)
    assert stats["truncated"] == 1 and stats["dropped"] == 0
    assert inputs.shape[1] == 4  # truncated to 5 tokens -> 4 positions
    settings = BatchSettings("bestfit", 2, row_capacity=5, pad_id=PAD, drop_long=True)
    share, plan, stream = _planned(data, settings)
    assert share.lengths == [0, 3, 4] and share.tokens == [10, 3, 4]  # the first is dropped
    stats = [next(stream).stats for _ in range(2 * len(plan))]
    assert [s["dropped"] for s in stats] == [1] + [0] * (len(plan) - 1) + [1] + [0] * (len(plan) - 1)  # per epoch
    assert all(1000 not in next(stream).targets.tolist()[0] for _ in range(3))
    # a conversation a mixture repeats (the same source and key) is rendered once, recorded at each entry
    rendered = []
    render = lambda c: rendered.append(c) or _toy_render(c)  # noqa: E731
    share = render_share(data * 2, render, settings, locate=lambda i: (0, i % 3))
    assert rendered == data and share.indices == list(range(6)) and share.lengths == [0, 3, 4] * 2
    with pytest.raises(ConfigError, match="dropped"):
        render_share([{"i": 0, "n": 10}], _toy_render, settings)
    with pytest.raises(UserError, match="no conversations"):
        render_share(data, _toy_render, settings, rank=3, world_size=4)


def test_batches_round_pad_lengths_up_to_the_bucket():
    data = [{"i": 0, "n": 6}, {"i": 1, "n": 3}, {"i": 2, "n": 30}, {"i": 3, "n": 2}]
    _, _, plain = _planned(data, BatchSettings("pad", 2, row_capacity=20, pad_id=PAD))
    _, _, bucketed = _planned(data, BatchSettings("pad", 2, row_capacity=20, pad_id=PAD, bucket=8))
    for expected_T in (8, 19):  # 5 positions -> 8; 19 (truncated to 20 tokens) stays 19, the cap
        (i1, t1, _, s1, _), (i2, t2, _, s2, _) = next(plain), next(bucketed)
        T = i1.size(1)
        assert i2.size(1) == expected_T and torch.equal(i2[:, :T], i1) and torch.equal(t2[:, :T], t1)
        assert (i2[:, T:] == PAD).all() and (t2[:, T:] == -1).all()
        assert s2["supervised"] == s1["supervised"] and s2["positions"] == 2 * expected_T
        assert s2["positions"] - s2["pad_positions"] == s1["positions"] - s1["pad_positions"]


def test_bestfit_pads_less_than_pad():
    data = _toy_dataset(200, seed=2, max_len=60)
    fractions = {}
    for packing in ("pad", "bestfit"):
        settings = BatchSettings(packing, 4, row_capacity=128, pad_id=PAD)
        share = render_share(data, _toy_render, settings)
        positions, pad = plan_positions(plan_epoch(share.lengths, settings), share.lengths, settings)
        fractions[packing] = pad / positions
    assert fractions["bestfit"] < fractions["pad"]
    assert fractions["bestfit"] < 0.1  # mostly the empty rows of the last micro-batch


def test_num_sft_steps_from_the_plan():
    assert num_sft_steps(10, 4, 1) == 2
    assert num_sft_steps(10, 4, 3) == 7  # 30 micro-batches: the epochs follow each other without a gap
    assert num_sft_steps(10, 4, 3, max_iterations=5) == 5 and num_sft_steps(10, 4, 3, max_iterations=-1) == 7
    assert num_sft_steps(3, 4, 1) == 0


# ---------------------------------------------------------------------------------------------------------
# step arithmetic, lr, loss normalisation


def test_sft_lr_multiplier_is_linear_decay():
    n = 50
    for step in range(n + 1):
        assert lr_multiplier(step, n) == pytest.approx(1 - step / n)


def test_token_normalisation_equals_global_mean():
    rng = random.Random(0)
    world_size, grad_accum = 3, 4
    # per-rank, per-micro-batch lists of token losses (different sizes)
    losses = [[[rng.random() for _ in range(rng.randint(0, 30))] for _ in range(grad_accum)]
              for _ in range(world_size)]
    losses[0][0] = []  # a micro-batch without supervised tokens
    step_tokens = sum(len(m) for r in losses for m in r)
    global_mean = sum(x for r in losses for m in r for x in m) / step_tokens
    per_rank = [sum(sum(m) * micro_batch_loss_scale("token", len(m), step_tokens, world_size, grad_accum)
                    for m in r) for r in losses]
    assert sum(per_rank) / world_size == pytest.approx(global_mean)  # optimizers average over ranks
    # the guide's formula: mean of micro-batch means (empty micro-batches contribute 0, not NaN)
    guide = [sum(sum(m) * micro_batch_loss_scale("micro_batch_mean", len(m), step_tokens, world_size, grad_accum)
                 for m in r) for r in losses]
    want = [sum(sum(m) / len(m) for m in r if m) / grad_accum for r in losses]
    assert guide == pytest.approx(want)
    assert micro_batch_loss_scale("token", 0, 0, 1, 1) == 0.0
    with pytest.raises(ValueError, match="loss_normalization"):
        micro_batch_loss_scale("sum", 1, 1, 1, 1)


def test_token_normalisation_gradient_matches_one_big_batch():
    """On a toy model: the gradient of one padded batch (mean over tokens) equals the accumulated gradient
    of its rows as separate micro-batches with per-token normalisation; the guide's formula differs."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50)
    params = list(emb.parameters()) + list(head.parameters())
    batch = [([1, 2, 3, 4, 5, 6, 7], [0, 1, 1, 1, 1, 1, 1]), ([8, 9, 10], [0, 0, 1]),
             ([11, 12, 13, 14], [0, 1, 0, 1]), ([15, 16], [0, 1])]

    def loss_sum(inputs, targets):
        logits = head(emb(inputs))
        return F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=-1, reduction="sum")

    def grads():
        g = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return g

    inputs, targets = collate_sft(batch, PAD % 50)
    (loss_sum(inputs, targets) / (targets != -1).sum()).backward()
    big = grads()
    micro = [collate_sft([b], PAD % 50) for b in batch]
    step_tokens = sum(int((t != -1).sum()) for _, t in micro)
    for mode in ("token", "micro_batch_mean"):
        for x, y in micro:
            scale = micro_batch_loss_scale(mode, int((y != -1).sum()), step_tokens, 1, len(micro))
            (loss_sum(x, y) * scale).backward()
        g = grads()
        same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, g))
        assert same == (mode == "token")


def test_skip_reason():
    assert skip_reason(2.5, 0) is None
    assert skip_reason(float("nan"), 0).startswith("non-finite")
    assert skip_reason(float("inf"), 0).startswith("non-finite")
    assert skip_reason(1.0, 1) == "out of memory"
    assert skip_reason(float("nan"), 2) == "out of memory"


# ---------------------------------------------------------------------------------------------------------
# one optimizer step: accumulation and the NaN / out-of-memory decision


def _tiny_gpt_and_data():
    from sft_step_worker import conversations, tiny_gpt

    return tiny_gpt("cpu"), conversations(4)


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def batches(data, batch_size):
    from sft_step_worker import batches

    return batches(data, batch_size)


def test_accumulate_step_gives_one_big_batch_gradient():
    """(device_batch_size 4, 1 micro-step) == (device_batch_size 1, 4 micro-steps) under "token"; the guide's
    micro_batch_mean weighs conversations unequally and differs."""
    model, data = _tiny_gpt_and_data()
    one = accumulate_step(model, [next(batches(data, 4))], "token", "cpu")
    big = _grads(model)
    stream = batches(data, 1)
    four = accumulate_step(model, [next(stream) for _ in range(4)], "token", "cpu")
    accumulated = _grads(model)
    assert one.skip is None and four.skip is None
    assert four.loss == pytest.approx(one.loss, rel=1e-5)
    assert four.totals["supervised"] == one.totals["supervised"] == sum(sum(m[1:]) for _, m in data)
    assert four.totals["examples"] == 4 and len(big) == len(list(model.parameters()))
    batch = next(batches(data, 4))  # the step's FLOPs, at the batch's own length
    assert (one.totals["flops"], one.totals["useful_flops"]) == batch_flops(model, batch.inputs,
                                                                            batch.stats["pad_positions"])
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    stream = batches(data, 1)
    accumulate_step(model, [next(stream) for _ in range(4)], "micro_batch_mean", "cpu")
    guide = _grads(model)
    assert any(not torch.allclose(guide[n], big[n], rtol=1e-2, atol=1e-6) for n in big)


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_accumulate_step_loss_by_source(packing):
    """Each source's (training spec's) summed token loss and supervised tokens: weighted by the tokens, the per-source
    losses average to the step's loss under "token" normalisation, and the tokens add up to the step's."""
    from sft_step_worker import conversations, tiny_gpt

    model, data = tiny_gpt("cpu"), conversations(6)
    settings = BatchSettings(packing, 2, row_capacity=64)
    share = render_share(data, lambda c: c, settings, locate=lambda i: (i % 3, i))
    stream = sft_batches(data, lambda c: c, share, plan_epoch(share.lengths, settings), settings)
    result = accumulate_step(model, [next(stream) for _ in range(2)], "token", "cpu", num_sources=3)
    assert sum(result.source_tokens) == result.totals["supervised"] and min(result.source_tokens) > 0
    line, log = format_sources(7, ["a", "b", "c"], result)
    weighted = sum(log[f"train_loss/{n}"] * log[f"num_tokens/{n}"] for n in "abc") / result.totals["supervised"]
    assert weighted == pytest.approx(result.loss, rel=1e-5)
    assert line.startswith("Step 00007 | by source: a ") and f"({log['num_tokens/c']:,} tok)" in line


def test_accumulate_step_skips_nan_and_out_of_memory_without_gradients():
    from sft_step_worker import Faulty

    model, data = _tiny_gpt_and_data()
    stream = batches(data, 2)
    micro_batches = [next(stream) for _ in range(2)]
    for fault, reason in (("nan", "non-finite loss"), ("oom", "out of memory")):
        result = accumulate_step(Faulty(model, fault), micro_batches, "token", "cpu")
        assert result.skip.startswith(reason)
        assert all(p.grad is None for p in model.parameters())  # nothing left for the next step
    result = accumulate_step(Faulty(model, None), micro_batches, "token", "cpu")
    assert result.skip is None and math.isfinite(result.loss)
    assert all(p.grad is not None for p in model.parameters())


def test_accumulate_step_two_gloo_ranks(tmp_path):
    """2 gloo ranks x 2 micro-batches == one process with the whole batch; a NaN or an out-of-memory error on
    rank 1 alone makes both ranks skip, with no gradient left on either; the validation loss and its per-source
    sums (each rank holding one source) reduced over the 2 ranks equal one process's."""
    out = tmp_path / "worker.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "sft_step_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["loss"] == pytest.approx(got["reference_loss"], rel=1e-5)
    assert got["totals"]["examples"] == 4
    for name, ref in got["reference"].items():
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)
    assert got["skipped"]["nan"] == [("non-finite loss (nan)", []), ("non-finite loss (nan)", [])]
    assert got["skipped"]["oom"] == [("out of memory", []), ("out of memory", [])]
    (loss, source_loss, source_tokens), (ref_loss, ref_source_loss, ref_source_tokens) = got["val"], \
        got["val_reference"]
    assert loss == pytest.approx(ref_loss, rel=1e-6) and source_tokens == ref_source_tokens
    assert source_loss == pytest.approx(ref_source_loss, rel=1e-6) and min(source_tokens) > 0


# ---------------------------------------------------------------------------------------------------------
# the one filter, the step count from it, the data preview figures


def test_fit_conversation():
    assert fit_conversation([1, 2, 3], [0, 1, 1], 4, False) == ([1, 2, 3], [0, 1, 1])
    assert fit_conversation([1, 2, 3, 4, 5], [0, 1, 1, 1, 1], 4, False) == ([1, 2, 3, 4], [0, 1, 1, 1])  # truncated
    assert fit_conversation([1, 2, 3, 4, 5], [0, 1, 1, 1, 1], 4, True) == (None, None)  # dropped
    assert fit_conversation([1], [0], 4, False) == (None, None)


def test_data_summary_from_the_recorded_numbers():
    data = [{"i": i, "n": n} for i, n in enumerate([5, 9, 3, 30, 1])]
    settings = BatchSettings("pad", 2, row_capacity=12, pad_id=PAD)
    share = render_share(data, _toy_render, settings, locate=lambda i: (int(i >= 3), i))
    row = data_summary(share, settings)
    assert row["conversations"] == 5 and row["tokens_max"] == 30 and row["tokens_p50"] == 5
    assert row["truncated"] == 1 and row["dropped"] == 1  # 30 > 12 is cut; a 1-token conversation is dropped
    assert row["supervised_ratio"] == 1.0  # every target after the first token is supervised in the toy render
    # fitted lengths 5, 9, 3, 12 in micro-batches of 2: pad positions (8 + 8) + (11 + 11) = 38, real 4 + 8 + 2 + 11
    assert row["padding_pad"] == pytest.approx(13 / 38)
    assert row["padding_bestfit"] == pytest.approx(1 - (11 + 11 + 5) / (2 * 2 * 11))  # rows [12], [9, 3], [5]
    part = data_summary(share, settings, source=1)  # conversations 3 and 4: one truncated, one dropped
    assert (part["conversations"], part["truncated"], part["dropped"], part["tokens_max"]) == (2, 1, 1, 30)
    empty = data_summary(share, settings, source=2)
    assert empty["conversations"] == 0 and empty["padding_pad"] == empty["padding_bestfit"] == 0.0


def test_gather_share_joins_two_gloo_ranks(tmp_path):
    """render_share on each of 2 gloo ranks, gathered, is the one-process Share (in rank order)."""
    script = tmp_path / "gather.py"
    script.write_text(
        "import sys, torch\n"
        "from nanochat.common import compute_cleanup, compute_init\n"
        "from nanochat.sft import BatchSettings, gather_share, render_share\n"
        "_, rank, _, world_size, _ = compute_init('cpu')\n"
        "data = [[7] * n for n in (3, 5, 2, 9, 4)]\n"
        "share = render_share(data, lambda c: (c, [1] * len(c)), BatchSettings(row_capacity=6), rank, world_size)\n"
        "whole = gather_share(share, world_size)\n"
        "if rank == 0:\n"
        "    torch.save(tuple(whole), sys.argv[1])\n"
        "compute_cleanup()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path / "out.pt")]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = Share(*torch.load(tmp_path / "out.pt", weights_only=False))
    assert got.indices == [0, 2, 4, 1, 3] and got.tokens == [3, 2, 4, 5, 9] and got.lengths == [3, 2, 4, 5, 6]
    assert got.supervised == [2, 1, 3, 4, 5]
    assert gather_share(got) is got


def test_summary_lines():
    row = {"conversations": 12, "tokens_mean": 20.0, "tokens_p50": 18, "tokens_p95": 40, "tokens_max": 51,
           "supervised_ratio": 0.5, "truncated": 0, "dropped": 1, "padding_pad": 0.25, "padding_bestfit": 0.05}
    assert summary_lines([("ChitChat:train x12", row), ("all", row)]) == [
        "ChitChat:train x12 |      12 conv | tokens mean   20.0 p50    18 p95    40 max     51 | supervised 50.0% | "
        "truncated 0 dropped 1 | padding pad 25.0% bestfit  5.0%",
        "all                |      12 conv | tokens mean   20.0 p50    18 p95    40 max     51 | supervised 50.0% | "
        "truncated 0 dropped 1 | padding pad 25.0% bestfit  5.0%"]


def test_step_line_and_report_table():
    totals = {"supervised": 300, "positions": 1000, "pad_positions": 250, "examples": 8, "truncated": 0, "dropped": 0,
              "flops": 4e9, "useful_flops": 3e9}
    line, log = format_step(3, 2.5, 0.75, totals, 0.5)
    assert line == ("Step 00003 | Training loss: 2.500000 | lrm: 0.750000 | num_tokens: 300 | supervised: 30.0% | "
                    "padding: 25.0% | tok/s: 2,000 | sup_tok/s: 600")
    assert log["padding_fraction"] == 0.25 and "mfu" not in log
    line, log = format_step(3, 2.5, 0.75, {**totals, "truncated": 2}, 0.5, peak_flops=32e9)
    assert line.endswith("| mfu: 18.75% useful, 25.00% total | truncated: 2 | dropped: 0")  # 3e9 / 0.5 s / 32e9
    assert log["mfu"] == pytest.approx(0.1875) and log["mfu_total"] == pytest.approx(0.25)
    line, log = format_step(3, 2.5, 0.75, totals, 0.5, peak_memory=1234.4, graphs=2)
    assert line.endswith("| sup_tok/s: 600 | peak mem: 1,234 MiB | compiled graphs: 2")
    assert log["peak_memory_mib"] == 1234.4 and log["compiled_graphs"] == 2
    line, log = format_skip(4, "out of memory", {"skipped_nonfinite": 1, "skipped_oom": 2})
    assert line == ("Step 00004 | skipped: out of memory | optimizer step not taken (skipped so far: 1 non-finite, "
                    "2 out of memory)")
    assert log == {"step": 4, "skipped_nonfinite": 1, "skipped_oom": 2}
