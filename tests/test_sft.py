"""
Unit tests for nanochat/sft.py: collation, best-fit packing, the resumable per-rank stream, loss
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
from nanochat.sft_report import (data_preview, data_summary, format_run_summary, format_skip, format_step, padding_fractions,
                                 report_mixture_table, report_section)
from nanochat.sft import (
    accumulate_step,
    fit_conversation,
    num_sft_steps,
    rank_lengths,
    collate_packed,
    collate_sft,
    count_steps_bestfit,
    grad_accum_steps_for,
    initial_data_state,
    micro_batch_loss_scale,
    num_sft_iterations,
    pack_best_fit,
    padding_fraction,
    sft_batches,
    skip_reason,
)

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


def test_pack_best_fit_small_example():
    rows, leftover = pack_best_fit([5, 4, 3, 2], row_capacity=7)
    assert rows == [[0, 3], [1, 2]] and leftover == []
    rows, leftover = pack_best_fit([5, 4, 3, 2], row_capacity=7, num_rows=1)
    assert rows == [[0, 3]] and leftover == [1, 2]
    # best fit (tightest room), not first fit: 3 goes to the row with room 3, not the one with room 5
    rows, _ = pack_best_fit([5, 7, 3], row_capacity=10)
    assert rows == [[0], [1, 2]]
    with pytest.raises(AssertionError):
        pack_best_fit([11], row_capacity=10)


@pytest.mark.parametrize("seed", range(5))
def test_pack_best_fit_random(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows, leftover = pack_best_fit(lengths, row_capacity=64)
    assert leftover == []
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every item exactly once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # best fit never opens a new row for an item that fit an open one: rows beat the trivial bound
    assert len(rows) <= len(lengths) and len(rows) >= sum(lengths) / 64
    rows, leftover = pack_best_fit(lengths, row_capacity=64, num_rows=4)
    assert len(rows) <= 4 and sorted([i for r in rows for i in r] + leftover) == list(range(len(lengths)))


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


def test_padding_fraction():
    assert padding_fraction(25, 100) == 0.25
    assert padding_fraction(0, 0) == 0.0


# ---------------------------------------------------------------------------------------------------------
# the per-rank stream


def _toy_dataset(n, seed=0, max_len=20):
    """Conversation i renders as [1000 + i] * length with mask 1 after the first token: the ids say which
    conversation a token came from."""
    rng = random.Random(seed)
    return [{"i": i, "n": rng.randint(2, max_len)} for i in range(n)]


def _toy_render(conv):
    return [1000 + conv["i"]] * conv["n"], [0] + [1] * (conv["n"] - 1)


def _conversations_in(inputs, targets):
    """Which conversations appear in a batch (a conversation of length >= 2 has >= 1 supervised target)."""
    return [t - 1000 for t in targets[targets != -1].tolist()]


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_stream_ranks_cover_every_conversation_once_per_epoch(packing):
    data = _toy_dataset(37)
    world_size, batch_size, capacity = 2, 3, 24
    for rank in range(world_size):
        expected = list(range(rank, 37, world_size))
        stream = sft_batches(data, _toy_render, batch_size, PAD, packing, capacity, rank=rank, world_size=world_size)
        seen = []  # whole conversations, in the order they appear
        while len(seen) < 3 * len(expected):
            inputs, targets, seg, stats, state = next(stream)
            assert inputs.shape[0] == batch_size
            assert (seg is None) == (packing == "pad")
            if packing == "bestfit":
                assert inputs.shape[1] == capacity - 1
            batch_seen = []
            for r in range(batch_size):
                row = [t - 1000 for t in targets[r][targets[r] != -1].tolist()]
                while row:  # whole conversations only: n - 1 consecutive targets each
                    c = row[0]
                    assert row[: data[c]["n"] - 1] == [c] * (data[c]["n"] - 1)
                    batch_seen.append(c)
                    row = row[data[c]["n"] - 1:]
            assert stats["examples"] == len(batch_seen)
            assert stats["supervised"] == int((targets != -1).sum())
            assert 0 <= stats["pad_positions"] <= stats["positions"] == inputs.numel()
            seen.extend(batch_seen)
        assert all(c % world_size == rank for c in seen)
        if packing == "pad":
            assert seen[: 2 * len(expected)] == expected * 2  # in order, epoch after epoch
        else:
            counts = [seen.count(c) for c in expected]
            assert min(counts) >= 2 and max(counts) - min(counts) <= 1  # nothing skipped or duplicated


def test_stream_bestfit_exactly_once_over_an_epoch():
    data = _toy_dataset(101, seed=3, max_len=30)
    stream = sft_batches(data, _toy_render, 4, PAD, "bestfit", row_capacity=40)
    seen = []
    for _ in range(60):
        inputs, targets, seg, stats, state = next(stream)
        for r in range(inputs.shape[0]):
            # segment ids: one id per conversation, padding 0, contiguous
            ids = [c for c in _conversations_in(inputs[r:r + 1], targets[r:r + 1])]
            segs = seg[r].tolist()
            assert segs == sorted(segs, key=lambda s: (s == 0, s))  # 1,1,..,2,2,..,0,0
            for c in sorted(set(ids), key=ids.index):
                seen.append(c)
        assert stats["examples"] >= 1
    # the stream reads conversations in order, epoch after epoch: count occurrences over complete epochs
    counts = [seen.count(i) for i in range(len(data))]
    assert max(counts) - min(counts) <= 1  # no conversation skipped or duplicated within an epoch


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_stream_resumes_exactly(packing):
    data = _toy_dataset(23, seed=1)
    kwargs = dict(batch_size=2, pad_id=PAD, packing=packing, row_capacity=32, rank=1, world_size=2)
    straight = sft_batches(data, _toy_render, **kwargs)
    batches = [next(straight) for _ in range(12)]
    state = batches[4][4]
    assert state == {k: v for k, v in state.items()}  # a plain dict
    resumed = sft_batches(data, _toy_render, state=state, **kwargs)
    for want in batches[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[4] == want[4]
    assert batches[0][4] != initial_data_state()


def test_stream_truncates_or_drops_long_conversations():
    data = [{"i": 0, "n": 10}, {"i": 1, "n": 3}, {"i": 2, "n": 4}]
    stream = sft_batches(data, _toy_render, 3, PAD, "pad", row_capacity=5)
    inputs, targets, _, stats, _ = next(stream)
    assert stats["truncated"] == 1 and stats["dropped"] == 0
    assert inputs.shape[1] == 4  # truncated to 5 tokens -> 4 positions
    stream = sft_batches(data, _toy_render, 2, PAD, "bestfit", row_capacity=5, drop_long=True)
    inputs, targets, _, stats, _ = next(stream)
    assert stats["dropped"] >= 1 and 1000 not in targets.tolist()[0] + targets.tolist()[1]
    with pytest.raises(ValueError, match="dropped"):
        next(sft_batches([{"i": 0, "n": 10}], _toy_render, 1, PAD, "pad", row_capacity=5, drop_long=True))


def test_stream_rounds_pad_batches_up_to_the_bucket():
    data = [{"i": 0, "n": 6}, {"i": 1, "n": 3}, {"i": 2, "n": 30}, {"i": 3, "n": 2}]
    plain = sft_batches(data, _toy_render, 2, PAD, "pad", row_capacity=20)
    bucketed = sft_batches(data, _toy_render, 2, PAD, "pad", row_capacity=20, bucket=8)
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
        stream = sft_batches(data, _toy_render, 4, PAD, packing, row_capacity=128)
        pad = total = 0
        for _ in range(20):
            *_, stats, _ = next(stream)
            pad, total = pad + stats["pad_positions"], total + stats["positions"]
        fractions[packing] = pad / total
    assert fractions["bestfit"] < fractions["pad"]
    assert fractions["bestfit"] < 0.1


def test_count_steps_bestfit_matches_stream():
    data = _toy_dataset(400, seed=4, max_len=40)
    lengths = [c["n"] for c in data]
    steps = count_steps_bestfit(lengths, batch_size=2, row_capacity=64, num_batches_per_step=3, num_epochs=2)
    stream = sft_batches(data, _toy_render, 2, PAD, "bestfit", row_capacity=64)
    per_step = [sum(next(stream)[3]["examples"] for _ in range(3)) for _ in range(steps)]
    # the steps cover two epochs, give or take one step's worth of conversations
    assert abs(sum(per_step) - 2 * len(data)) <= 2 * max(per_step)
    assert count_steps_bestfit(lengths, 2, 64, 3, 4) in range(2 * steps - 2, 2 * steps + 3)


# ---------------------------------------------------------------------------------------------------------
# step arithmetic, lr, loss normalisation


def test_grad_accum_steps_and_iterations():
    assert grad_accum_steps_for(32, 4, 8) == 1
    assert grad_accum_steps_for(32, 4, 1) == 8
    with pytest.raises(UserError, match="multiple of"):
        grad_accum_steps_for(32, 3, 1)
    with pytest.raises(UserError, match="device_batch_size"):
        grad_accum_steps_for(8, 4, 4)
    assert num_sft_iterations(1000, 32, 1) == 31
    assert num_sft_iterations(1000, 32, 2) == 62
    assert num_sft_iterations(1000, 32, 2, max_iterations=10) == 10
    assert num_sft_iterations(1000, 32, 2, max_iterations=-1) == 62


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


def test_accumulate_step_gives_one_big_batch_gradient():
    """(device_batch_size 4, 1 micro-step) == (device_batch_size 1, 4 micro-steps) under "token"; the guide's
    micro_batch_mean weighs conversations unequally and differs."""
    model, data = _tiny_gpt_and_data()
    one = accumulate_step(model, [next(sft_batches(data, lambda c: c, 4, 0, "pad", 64))], "token", "cpu")
    big = _grads(model)
    stream = sft_batches(data, lambda c: c, 1, 0, "pad", 64)
    four = accumulate_step(model, [next(stream) for _ in range(4)], "token", "cpu")
    accumulated = _grads(model)
    assert one.skip is None and four.skip is None
    assert four.loss == pytest.approx(one.loss, rel=1e-5)
    assert four.totals["supervised"] == one.totals["supervised"] == sum(sum(m[1:]) for _, m in data)
    assert four.totals["examples"] == 4 and len(big) == len(list(model.parameters()))
    batch = next(sft_batches(data, lambda c: c, 4, 0, "pad", 64))  # the step's FLOPs, at the batch's own length
    assert (one.totals["flops"], one.totals["useful_flops"]) == batch_flops(model, batch.inputs,
                                                                            batch.stats["pad_positions"])
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    stream = sft_batches(data, lambda c: c, 1, 0, "pad", 64)
    accumulate_step(model, [next(stream) for _ in range(4)], "micro_batch_mean", "cpu")
    guide = _grads(model)
    assert any(not torch.allclose(guide[n], big[n], rtol=1e-2, atol=1e-6) for n in big)


def test_accumulate_step_skips_nan_and_out_of_memory_without_gradients():
    from sft_step_worker import Faulty

    model, data = _tiny_gpt_and_data()
    stream = sft_batches(data, lambda c: c, 2, 0, "pad", 64)
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
    rank 1 alone makes both ranks skip, with no gradient left on either."""
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


# ---------------------------------------------------------------------------------------------------------
# the one filter, the step count from it, the data preview figures


def test_fit_conversation():
    assert fit_conversation([1, 2, 3], [0, 1, 1], 4, False) == ([1, 2, 3], [0, 1, 1], "kept")
    assert fit_conversation([1, 2, 3, 4, 5], [0, 1, 1, 1, 1], 4, False) == ([1, 2, 3, 4], [0, 1, 1, 1], "truncated")
    assert fit_conversation([1, 2, 3, 4, 5], [0, 1, 1, 1, 1], 4, True) == (None, None, "dropped")
    assert fit_conversation([1], [0], 4, False) == (None, None, "dropped")


@pytest.mark.parametrize("drop_long", [False, True])
def test_bestfit_step_count_uses_the_batches_filter(drop_long):
    """num_sft_steps replays exactly the conversations sft_batches trains on: with drop_long, the long ones
    are left out of both; the steps then cover the epochs as the stream delivers them."""
    data = _toy_dataset(60, seed=5, max_len=40)
    capacity, batch_size, per_step = 24, 2, 2
    lengths = rank_lengths(data, _toy_render, capacity, drop_long, rank=1, world_size=2)
    kept = [c for c in data[1::2] if c["n"] <= capacity or not drop_long]
    assert lengths == [min(c["n"], capacity) for c in kept]
    rank_data = data[1::2]  # rank 1's conversations, as one process (the cross-rank minimum: gloo tests)
    steps = num_sft_steps(rank_data, _toy_render, "bestfit", 4, batch_size, per_step, capacity, drop_long, 1, -1)
    assert steps == count_steps_bestfit(lengths, batch_size, capacity, per_step, 1)
    stream = sft_batches(rank_data, _toy_render, batch_size, PAD, "bestfit", capacity, drop_long)
    examples = sum(next(stream).stats["examples"] for _ in range(steps * per_step))
    assert abs(examples - len(kept)) <= per_step * batch_size * 3  # one epoch, give or take the last step
    assert num_sft_steps(data, _toy_render, "bestfit", 4, batch_size, per_step, capacity, drop_long, 1, 3) == 3
    assert num_sft_steps(data, _toy_render, "pad", 4, batch_size, per_step, capacity, drop_long, 2, -1) == 30


def test_data_summary_and_padding_fractions():
    data = [{"i": i, "n": n} for i, n in enumerate([5, 9, 3, 30, 1])]
    row = data_summary(data, _toy_render, 12, False, 2)
    assert row["conversations"] == 5 and row["tokens_max"] == 30 and row["tokens_p50"] == 5
    assert row["truncated"] == 1 and row["dropped"] == 1  # 30 > 12 is cut; a 1-token conversation is dropped
    assert row["supervised_ratio"] == 1.0  # every target after the first token is supervised in the toy render
    # fitted lengths 5, 9, 3, 12 in batches of 2: pad positions (8 + 8) + (11 + 11) = 38, real 4 + 8 + 2 + 11 = 25
    pad, bestfit = padding_fractions([5, 9, 3, 12], 2, 12)
    assert pad == pytest.approx(13 / 38)
    assert bestfit == pytest.approx(1 - (11 + 11 + 5) / (2 * 2 * 11))  # rows [12], [9, 3] then [5]
    assert padding_fractions([], 2, 12) == (0.0, 0.0)


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
    row = {"supervised_ratio": 0.5, "padding_pad": 0.25, "padding_bestfit": 0.05}
    table = report_mixture_table([("ChitChat:train", 12, row)]).splitlines()
    assert table[0] == table[-1] == "```" and not any(line.startswith("|") for line in table)
    assert table[2].split() == ["ChitChat:train", "12", "50.0%", "25.0%", "5.0%"]


def test_report_section_and_closing_line():
    totals = {"supervised": 300, "positions": 1000, "pad_positions": 250, "examples": 8, "truncated": 1,
              "dropped": 2, "skipped_nonfinite": 1, "skipped_oom": 0, "flops": 4e9, "useful_flops": 1.5e9}
    config = {"source": "mid", "device_batch_size": 4, "target_examples_per_step": 8, "num_epochs": 1,
              "init_lr_frac": 0.02, "loss_normalization": "token", "packing": "pad", "max_seq_len": 64, "seed": 1}
    row = {"supervised_ratio": 0.5, "padding_pad": 0.25, "padding_bestfit": 0.05}
    data = report_section(config, [("ChitChat:train", 12, row)], 12, 3, totals, 2.0, {"val_loss": 1.5, "MMLU": None},
                          ["hello"])
    assert data[0] == {k: v for k, v in config.items() if k != "seed"}
    assert data[1] == report_mixture_table([("ChitChat:train", 12, row)])
    assert data[2]["Supervised ratio"] == 0.3 and data[2]["Padding fraction"] == 0.25
    assert data[2]["Tokens per second"] == 500 and "MFU" not in data[2] and data[2]["Dropped conversations"] == 2
    assert data[3] == {"val_loss": 1.5} and data[-1] == "```\nhello\n```" and "token" in data[4]
    data = report_section(config, [], 12, 3, totals, 2.0, {}, [], peak_flops=3e9)
    assert data[2]["MFU"] == pytest.approx(0.25) and data[-1] == "Sample conversations (final model, greedy):"
    assert format_run_summary(2.04, totals) == ("Training time: 2.0s | skipped steps: 1 non-finite, 0 out of "
                                                "memory | truncated: 1 | dropped: 2")
    line = format_run_summary(2.0, totals, peak_memory=512.4, compiled=5, graphs_after_first_step=3)
    assert line.endswith("| peak memory: 512 MiB | torch.compile: 5 graphs, 2 recompilations after the first step")


def test_data_preview_lines():
    class Tok:
        def visualize_tokenization(self, ids, mask, color):
            return f"{list(ids)} {list(mask)} {color}"

    data = [{"i": i, "n": n} for i, n in enumerate([5, 9, 3])]
    summarize = lambda ds: data_summary(ds, _toy_render, 4, False, 2)  # noqa: E731
    rows = [("Toy:train", 3, summarize(data))]
    lines = data_preview(rows, data, data[:1], summarize, {"pad": 2, "bestfit": 1}, Tok(), _toy_render, 4, False)
    assert lines[0].startswith("Toy:train x3") and lines[1].startswith("training mixture")
    assert lines[2].startswith("validation mixture") and "|       1 conv |" in lines[2]
    assert lines[3] == "Optimizer steps: 2 with packing=pad, 1 with packing=bestfit"
    assert lines[4] == "One training conversation ([supervised] tokens):"
    ids, mask = _toy_render(data[0])
    assert lines[5] == f"{list(ids[:4])} {list(mask[:4])} False"  # the first row_capacity tokens only
