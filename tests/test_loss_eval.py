"""
Tests for nanochat/loss_eval.py: evaluate_bpb on a hand-computed case (a fake bigram model with known
logits), the exclusion of special tokens and -1 targets, and 2 gloo processes against 1.
Run: .venv/bin/python -m pytest tests/test_loss_eval.py
"""

import math
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

# vocab: 0 = special (0 bytes), 1 = a 1-byte token, 2 = a 3-byte token
TOKEN_BYTES = torch.tensor([0, 1, 3], dtype=torch.int32)
LOGITS = torch.tensor([[0.0, 1.0, 2.0],    # next-token logits after token 0
                       [1.0, 0.0, 0.0],    # after token 1
                       [0.0, 0.0, 3.0]])   # after token 2


class BigramModel(torch.nn.Module):
    """logits[b, t] = LOGITS[idx[b, t]]; the loss follows the GPT contract (-1 ignored, 'none' reduction)."""

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = LOGITS[idx.long()]
        return F.cross_entropy(logits.view(-1, 3), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def _ce(prev, nxt):
    row = LOGITS[prev].tolist()
    return math.log(sum(math.exp(v) for v in row)) - row[nxt]


def test_hand_computed():
    inputs = torch.tensor([[0, 1, 2], [2, 2, 1]], dtype=torch.int32)
    targets = torch.tensor([[1, 2, 0], [2, -1, 1]])
    # counted (input -> target) pairs: 0->1 (1 byte), 1->2 (3 bytes), 2->2 (3 bytes), 1->1 (1 byte); the
    # special target 0 (after 2) and the -1 target are left out
    nats = _ce(0, 1) + _ce(1, 2) + _ce(2, 2) + _ce(1, 1)
    expected = nats / (math.log(2) * (1 + 3 + 3 + 1))
    batches = iter([(inputs, targets, {"state": 0})])
    bpb = evaluate_bpb(BigramModel(), batches, 1, TOKEN_BYTES, rank=0, world_size=1)
    assert bpb == pytest.approx(expected, rel=1e-6)


def test_steps_and_empty():
    inputs = torch.tensor([[0, 1]], dtype=torch.int32)
    targets = torch.tensor([[1, 1]])
    batches = iter([(inputs, targets)] * 3)
    one = evaluate_bpb(BigramModel(), batches, 1, TOKEN_BYTES, rank=0, world_size=1)
    two = evaluate_bpb(BigramModel(), batches, 2, TOKEN_BYTES, rank=0, world_size=1)
    assert one == pytest.approx(two)  # identical batches: the mean does not move
    assert next(batches, None) is None  # exactly `steps` batches were consumed
    only_special = iter([(inputs, torch.tensor([[0, -1]]))])
    assert evaluate_bpb(BigramModel(), only_special, 1, TOKEN_BYTES, rank=0, world_size=1) == float("inf")


def _random_batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inputs = torch.randint(0, 3, (2, 5), generator=g, dtype=torch.int32)
        targets = torch.randint(-1, 3, (2, 5), generator=g)
        out.append((inputs, targets))
    return out


def _worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    batches = _random_batches(0, 4)[rank::world_size]  # rank 0 gets batches 0, 2; rank 1 gets 1, 3
    bpb = evaluate_bpb(BigramModel(), iter(batches), len(batches), TOKEN_BYTES)
    if rank == 0:
        torch.save(bpb, result_file)
    dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    single = evaluate_bpb(BigramModel(), iter(_random_batches(0, 4)), 4, TOKEN_BYTES, rank=0, world_size=1)
    result_file = str(tmp_path / "bpb.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), result_file), nprocs=2, join=True)
    assert torch.load(result_file) == pytest.approx(single, rel=1e-9)


def test_sft_loss_in_the_training_loss_unit(capsys):
    """"token": summed token loss / supervised tokens over all batches; "micro_batch_mean": mean of batch means."""
    from nanochat.loss_eval import evaluate_sft_loss
    from nanochat.sft import SFTBatch

    class SumModel:  # loss_reduction="none": 1.0 per supervised target
        def __call__(self, inputs, targets, loss_reduction, segment_ids=None):
            assert loss_reduction == "none"
            return (targets != -1).float()

    def batch(n_supervised, width=8):
        targets = torch.full((1, width), -1)
        targets[0, :n_supervised] = 1
        return SFTBatch(torch.zeros((1, width), dtype=torch.long), targets, None, {}, torch.where(targets >= 0, 0, -1))

    class LossPerBatch:  # batch b has total loss 6 * (b + 1), spread over its supervised tokens
        def __init__(self):
            self.calls = 0

        def __call__(self, inputs, targets, loss_reduction, segment_ids=None):
            self.calls += 1
            return (targets != -1).float() * 6.0 * self.calls / (targets != -1).sum()

    batches = [batch(2), batch(6), batch(4)]
    assert evaluate_sft_loss(SumModel(), iter(batches), 3, "token", "cpu").loss == pytest.approx(1.0)
    # (6 + 12 + 18) / 12 tokens = 3.0; batch means 6/2, 12/6, 18/4 -> mean 3.1666
    assert evaluate_sft_loss(LossPerBatch(), iter(batches), 3, "token", "cpu").loss == pytest.approx(3.0)
    assert evaluate_sft_loss(LossPerBatch(), iter(batches), 3, "micro_batch_mean", "cpu").loss == pytest.approx(
        (3.0 + 2.0 + 4.5) / 3)
    two = evaluate_sft_loss(LossPerBatch(), iter(batches), 2, "token", "cpu")  # 2 steps only
    assert two.loss == pytest.approx(18 / 8) and two.source_tokens == [8] and two.source_loss == pytest.approx([18])


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_sft_loss_by_source(packing):
    """A two-part validation mixture on a tiny GPT: each source's tokens add up to the supervised targets, and the
    per-source losses weighted by their tokens give the overall "token" loss, which is the model's own summed loss
    over the same batches divided by their supervised tokens."""
    from sft_step_worker import conversations, tiny_gpt

    from nanochat.loss_eval import evaluate_sft_loss
    from nanochat.sft import BatchSettings, plan_epoch, render_share, sft_batches

    model, data = tiny_gpt("cpu"), conversations(6)
    settings = BatchSettings(packing, 2, row_capacity=64)
    share = render_share(data, lambda c: c, settings, locate=lambda i: (i % 2, i))  # sources 0, 1, 0, 1, ...
    plan = plan_epoch(share.lengths, settings)
    stream = sft_batches(data, lambda c: c, share, plan, settings)
    batches = [next(stream) for _ in plan]  # one pass
    result = evaluate_sft_loss(model, iter(batches), len(plan), "token", "cpu", num_sources=2)
    tokens = sum(int((b.targets != -1).sum()) for b in batches)
    with torch.no_grad():
        loss_sum = sum(float(model(b.inputs, b.targets, loss_reduction="sum", segment_ids=b.segment_ids))
                       for b in batches)
    assert sum(result.source_tokens) == tokens and min(result.source_tokens) > 0
    assert result.source_tokens[0] == sum(sum(m[1:]) for _, m in data[0::2])  # source 0: conversations 0, 2, 4
    weighted = sum(result.source_loss) / sum(result.source_tokens)
    assert weighted == pytest.approx(result.loss, rel=1e-9)
    assert result.loss == pytest.approx(loss_sum / tokens, rel=1e-5)
    means = [loss / k for loss, k in zip(result.source_loss, result.source_tokens)]
    assert means[0] != pytest.approx(means[1], rel=1e-6)  # two different figures, not one copied
