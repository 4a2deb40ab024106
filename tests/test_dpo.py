"""
Unit tests for nanochat/dpo.py (and the minimal nanochat/data_files.py): the DPO loss and its gradient on a
hand-computed two-pair example, the preference rows (rendering, file:line errors), collation and per-sequence
log-probs against a fresh forward, the step plan, gradient accumulation == one big batch, 2 gloo ranks == 1
process, NaN / out-of-memory skips and the reference cache. Fast, CPU only, no data mirror needed.

    .venv/bin/python -m pytest tests/test_dpo.py
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dpo_step_worker import random_pairs, random_reference, step_batches
from nanochat.common import UserError
from nanochat.dpo import (METRIC_KEYS, PreferencePair, batch_logps, collate_pairs, dpo_accumulate_step, dpo_loss,
                          evaluate_dpo, fits, load_preferences, load_reference, parse_preference_row,
                          rank_batch_indices, reference_fingerprint, reference_logps, render_pair, save_reference,
                          sequence_logps, step_pair_indices)
from sft_step_worker import Faulty, tiny_gpt

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------------------------------------------------
# the loss


def test_dpo_loss_and_gradient_two_pairs_by_hand():
    """beta 0.5; pair 1: policy (c, r) = (-1, -2), reference (-1.5, -1.5): z = 0.5 * (0.5 - (-0.5)) = 0.5;
    pair 2: policy (-3, -1), reference (-2, -2): z = 0.5 * (-1 - 1) = -1. loss_i = log(1 + exp(-z_i));
    d mean / d policy_c_i = -beta * sigmoid(-z_i) / 2 and the opposite for policy_r_i; the reference gets none."""
    chosen = torch.tensor([-1.0, -3.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref_c, ref_r = torch.tensor([-1.5, -2.0], dtype=torch.float64), torch.tensor([-1.5, -2.0], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_c, ref_r, 0.5)
    want = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))]  # 0.474077, 1.313262
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.25, -0.5]) and rejected_rewards.tolist() == pytest.approx(
        [-0.25, 0.5])
    losses.mean().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    grad_c = [-0.5 * sig(-0.5) / 2, -0.5 * sig(1.0) / 2]  # -0.094385, -0.182765
    assert chosen.grad.tolist() == pytest.approx(grad_c, rel=1e-12)
    assert rejected.grad.tolist() == pytest.approx([-g for g in grad_c], rel=1e-12)
    assert not chosen_rewards.requires_grad


def test_sequence_logps_sums_each_sequence():
    token_losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    seq_index = torch.tensor([[0, 0, 1], [-1, 2, 2]])
    assert sequence_logps(token_losses, seq_index, 4).tolist() == [-3.0, -3.0, -11.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# preference rows


def test_render_pair_equals_render_conversation(tokenizer):
    """The prompt rendered once plus each answer rendered on its own is exactly render_conversation of the
    whole conversation: the same ids, the same mask on the answer and 0 on the prompt (even on its earlier
    assistant turns), for a string prompt, a TRL message list with a system message, and a
    multi-turn "messages" row with python parts in the answer."""
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "4. Also, the sky is blue."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
         "chosen": [{"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "assistant", "content": "Hello, how are you today? I am fine."}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "add 1 and 2"}],
         "chosen": [{"role": "assistant", "content": [{"type": "python", "text": "1+2"},
                                                      {"type": "python_output", "text": "3"},
                                                      {"type": "text", "text": "3"}]}],
         "rejected": "4"},
    ]
    for i, row in enumerate(rows):
        prompt, chosen, rejected = parse_preference_row(row, f"x.jsonl:{i + 1}")
        pair = render_pair(tokenizer, prompt, chosen, rejected)
        for which, answer in ((0, chosen), (1, rejected)):
            ids, mask = tokenizer.render_conversation({"messages": prompt + answer}, max_tokens=None)
            n = len(pair.prompt)
            assert pair.sequence(which) == (ids, [0] * n + mask[n:])  # the prompt's turns are never supervised
        assert sum(pair.chosen[1]) > 0


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "needs exactly one of 'prompt' or 'messages' (got neither)"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
     "(got prompt and messages)"),
    ({"prompt": "q", "rejected": "b"}, "missing 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string or a list of messages, got int"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "'chosen' must be a string or a list of ONE assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "'prompt' must end with a user message"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"},
     "prompt + chosen: message 0: user content must be a string"),
]


def test_bad_rows_name_file_and_line(tokenizer, tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    for row, message in BAD_ROWS:
        path = tmp_path / "prefs.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(UserError) as e:
            load_preferences([str(path)], tokenizer)
        assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=rf"^{path}:3: invalid JSON"):
        load_preferences([str(path)], tokenizer)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(BAD_ROWS[-1][0]) + "\n")  # blank lines are skipped
    with pytest.raises(UserError, match=rf"^{path}:3: "):  # ... and the line numbers still count them
        load_preferences([str(path)], tokenizer)


def test_parquet_rows_and_their_errors(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "prefs.parquet")
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "chosen": ["a", "b"], "rejected": ["aa", "b"]}), path)
    with pytest.raises(UserError, match=r"prefs\.parquet:2: 'chosen' and 'rejected' are the same answer"):
        load_preferences([path], tokenizer)
    pq.write_table(pa.table({"prompt": ["q1", "q2"], "chosen": ["a", "b"], "rejected": ["aa", "bb"]}), path)
    pairs = load_preferences([path], tokenizer)
    assert len(pairs) == 2 and pairs[1].chosen[0] == render_pair(tokenizer, *parse_preference_row(
        {"prompt": "q2", "chosen": "b", "rejected": "bb"}, "-")).chosen[0]


def test_fits_drops_pairs_longer_than_a_row():
    pair = PreferencePair([1, 2, 3], ([4, 5], [0, 1]), ([4, 5, 6, 7], [0, 1, 1, 1]))
    assert fits(pair, 7) and not fits(pair, 6)


# ---------------------------------------------------------------------------------------------------------
# collation and log-probs against a fresh forward


@torch.no_grad()
def _fresh_logps(model, pair):
    """[chosen, rejected] log-probs of the pair from an unbatched forward: log_softmax of the logits, summed
    over the supervised targets."""
    out = []
    for which in (0, 1):
        ids, mask = pair.sequence(which)
        logits = model(torch.tensor([ids[:-1]]))[0]
        logprobs = F.log_softmax(logits.double(), dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out.append(float((logprobs * torch.tensor(mask[1:], dtype=torch.float64)).sum()))
    return out


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_reference_logps_equal_a_fresh_forward_of_the_frozen_model(packing):
    model = tiny_gpt("cpu").eval()
    pairs = random_pairs(5)
    collate = lambda p: collate_pairs(p, packing, 64, 0)  # noqa: E731
    table = reference_logps(model, pairs, 2, collate, "cpu")
    want = torch.tensor([_fresh_logps(model, pair) for pair in pairs], dtype=torch.float64)
    torch.testing.assert_close(table, want, rtol=1e-5, atol=1e-4)
    batch = collate_pairs(pairs, packing, 64, 0)
    if packing == "bestfit":  # packed: fewer rows than sequences, each sequence in its own segment
        assert batch.inputs.size(0) < 10 and batch.segment_ids.max() > 1
    # the model's weights did not change, and the policy at the start has the reference's log-probs: loss log 2
    metrics = evaluate_dpo(model, [collate_pairs(pairs, packing, 64, 0, table)], 0.1, "cpu")
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["reward_accuracy"] == 0.0


def test_collate_pairs_keeps_both_answers_of_a_pair_and_masks():
    pair = PreferencePair([1, 2], ([3, 4, 5], [0, 1, 1]), ([6, 7], [0, 1]))
    batch = collate_pairs([pair], "pad", 16, 0)
    assert batch.inputs.tolist() == [[1, 2, 3, 4], [1, 2, 6, 0]]
    assert batch.targets.tolist() == [[-1, -1, 4, 5], [-1, -1, 7, -1]]
    assert batch.seq_index.tolist() == [[-1, -1, 0, 0], [-1, -1, 1, -1]]
    packed = collate_pairs([pair], "bestfit", 10, 0)
    assert packed.inputs.tolist() == [[1, 2, 3, 4, 5, 1, 2, 6, 7]]
    assert packed.seq_index.tolist() == [[-1, -1, 0, 0, -1, -1, -1, 1, -1]]


# ---------------------------------------------------------------------------------------------------------
# the step plan and the optimizer step


def test_step_pair_indices_same_pairs_for_any_split():
    def step_pairs(step, world_size, dbs, accum):
        return sorted(i for r in range(world_size) for m in range(accum)
                      for i in step_pair_indices(step, m, r, world_size, dbs, accum, 10))
    assert step_pairs(0, 1, 4, 1) == step_pairs(0, 2, 1, 2) == step_pairs(0, 4, 1, 1) == [0, 1, 2, 3]
    assert step_pairs(2, 2, 1, 2) == [0, 1, 8, 9]  # epochs follow each other
    assert step_pair_indices(1, 1, 1, 2, 2, 2, 100) == [14, 15]


def test_rank_batch_indices_cover_the_held_out_pairs_once():
    assert rank_batch_indices(5, 2, 0, 2) == [[0, 1], [4]] and rank_batch_indices(5, 2, 1, 2) == [[2, 3]]
    assert rank_batch_indices(5, 2) == [[0, 1], [2, 3], [4]] and rank_batch_indices(1, 2, 1, 2) == []


@pytest.mark.parametrize("packing", ["pad", "bestfit"])
def test_accumulation_equals_one_big_batch(packing):
    """4 micro-batches of 1 pair == 1 micro-batch of 4 pairs: the same loss (mean per pair), metrics and
    gradient."""
    model = tiny_gpt("cpu")
    pairs = random_pairs(4)
    # a reference near the model's own log-probs, so that some pairs count as won and some as lost
    reference = reference_logps(model, pairs, 4, lambda p: collate_pairs(p, "pad", 64, 0), "cpu") + \
        torch.tensor([[0.5, -0.5], [-0.5, 0.5], [0.2, 0.1], [-1.0, 1.0]], dtype=torch.float64)
    big = dpo_accumulate_step(model, step_batches(pairs, reference, packing, 0, 1, 4, 1), 0.5, "cpu")
    big_grads = _grads(model)
    four = dpo_accumulate_step(model, step_batches(pairs, reference, packing, 0, 1, 1, 4), 0.5, "cpu")
    four_grads = _grads(model)
    assert big.skip is None and four.skip is None and four.metrics["pairs"] == 4
    for key in METRIC_KEYS:
        assert four.metrics[key] == pytest.approx(big.metrics[key], rel=1e-5, abs=1e-6), key
    assert big.metrics["reward_accuracy"] == 0.5  # pairs 1 and 3 won (margin > 0), 0 and 2 lost
    assert len(big_grads) == len(list(model.parameters()))
    for name in big_grads:
        torch.testing.assert_close(four_grads[name], big_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # the loss and its gradient are those of the mean per pair (the sum over pairs would be 4x)
    logps = batch_logps(model, step_batches(pairs, reference, packing, 0, 1, 4, 1)[0], "cpu")
    ref = reference.float()
    losses, _, _ = dpo_loss(logps[0::2], logps[1::2], ref[:, 0], ref[:, 1], 0.5)
    losses.mean().backward()
    mean_grads = _grads(model)
    assert big.loss == pytest.approx(float(losses.detach().mean()), rel=1e-5)
    for name in big_grads:
        torch.testing.assert_close(big_grads[name], mean_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_skips_nan_and_out_of_memory_without_gradients():
    model = tiny_gpt("cpu")
    batches = step_batches(random_pairs(4), random_reference(4), "pad", 0, 1, 2, 2)
    for fault, reason in (("nan", "non-finite loss"), ("oom", "out of memory")):
        result = dpo_accumulate_step(Faulty(model, fault), batches, 0.5, "cpu")
        assert result.skip.startswith(reason)
        assert all(p.grad is None for p in model.parameters())
    result = dpo_accumulate_step(Faulty(model, None), batches, 0.5, "cpu")
    assert result.skip is None and all(p.grad is not None for p in model.parameters())


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """2 gloo ranks x 2 micro-batches of 1 pair == one process with the step's 4 pairs as one batch (pad and
    bestfit); a NaN or an out-of-memory error on rank 1 alone makes both ranks skip, with no gradient left. The
    reference log-probs and the held-out metrics, split over the 2 ranks, equal those of one process."""
    out = tmp_path / "worker.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.path.join(REPO_ROOT, 'tests')}")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "dpo_step_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    shared = results.pop("reference_and_eval")  # the reference split over ranks, the held-out metrics too
    torch.testing.assert_close(shared["reference"], shared["reference_alone"], rtol=1e-5, atol=1e-5)
    assert shared["eval"] == pytest.approx(shared["eval_alone"], rel=1e-5, abs=1e-6)
    for packing, got in results.items():
        for key in METRIC_KEYS:
            assert got["metrics"][key] == pytest.approx(got["single_metrics"][key], rel=1e-5, abs=1e-6), (packing, key)
        assert got["metrics"]["pairs"] == 4
        for name, want in got["single_grads"].items():
            torch.testing.assert_close(got["grads"][name], want, rtol=1e-4, atol=1e-7, msg=f"{packing} {name}")
        assert got["skipped"]["nan"] == [("non-finite loss (nan)", []), ("non-finite loss (nan)", [])]
        assert got["skipped"]["oom"] == [("out of memory", []), ("out of memory", [])]


# ---------------------------------------------------------------------------------------------------------
# the reference cache


def test_reference_cache_round_trip_and_fingerprint(tmp_path):
    pairs = random_pairs(3)
    tables = {"train": random_reference(2) + 1e-9, "val": random_reference(1)}
    fingerprint = reference_fingerprint(pairs, "src step 1")
    path = str(tmp_path / "reference_logps.json")
    save_reference(path, fingerprint, tables)
    loaded = load_reference(path, fingerprint)
    assert all(torch.equal(loaded[k], tables[k]) for k in tables)  # bit-exact
    assert reference_fingerprint(pairs[:2], "src step 1") != fingerprint != reference_fingerprint(pairs, "src step 2")
    with pytest.raises(UserError, match="other data or another source checkpoint"):
        load_reference(path, reference_fingerprint(pairs, "src step 2"))
    with pytest.raises(UserError, match="are missing"):
        load_reference(str(tmp_path / "none.json"), fingerprint)
