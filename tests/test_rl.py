"""
Tests of nanochat/rl.py (chat_rl's building blocks): advantages and the token-normalised policy-gradient loss
against hand-computed values, the loss gradient against the REINFORCE estimator written out with log_softmax,
2 gloo ranks against 1 process on the same rollouts, rollout batching / seeding / data positions, pass@k, and
that a rigged program earns no reward on a code task.

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_rl.py
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, random_model
from nanochat.rl import (Sampling, completion_text, group_advantages, pass_at_k, pg_accumulate_step, pg_loss_sum,
                         rank_example_indices, rollout_batch_sizes, rollout_micro_batches, rollout_seed,
                         sample_completions, score_completions)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# Advantages and the loss, by hand


def test_group_advantages_mean_and_zscore_by_hand():
    assert group_advantages([1.0, 0.0, 0.0, 1.0], "mean") == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1.0, 0.0, 0.0, 0.0], "mean") == [0.75, -0.25, -0.25, -0.25]
    # zscore: mean 0.25, population std sqrt(3/16) = 0.4330..., so 0.75 / (0.4330 + 1e-4) = 1.7317...
    z = group_advantages([1.0, 0.0, 0.0, 0.0], "zscore")
    std = math.sqrt(3 / 16)
    assert z == pytest.approx([0.75 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4), -0.25 / (std + 1e-4)])
    assert z[0] == pytest.approx(1.7317, abs=1e-3)
    # a group of equal rewards teaches nothing, under both baselines (no 0/0)
    assert group_advantages([1.0, 1.0, 1.0], "mean") == [0.0, 0.0, 0.0]
    assert group_advantages([0.0, 0.0], "zscore") == [0.0, 0.0]
    with pytest.raises(ValueError):
        group_advantages([1.0], "ppo")


class FixedNLL(torch.nn.Module):
    """A 'model' whose per-token -log p is scale * table[inputs] where there is a target, 0 elsewhere."""

    def __init__(self, fault=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.fault = fault

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        if self.fault == "oom":
            raise torch.cuda.OutOfMemoryError("simulated CUDA out of memory")
        nll = self.scale * (inputs.float() + 1.0) * (targets != -1)
        return nll * float("nan") if self.fault == "nan" else nll


def test_token_normalised_loss_by_hand():
    # two groups' rows, device_batch_size 2 -> two micro-batches; masks: prompt 0, sampled 1, forced (tool) 0
    sequences = [[0, 1, 2, 3], [0, 1, 4], [0, 2, 2, 2, 2], [0, 3]]
    masks = [[0, 1, 1, 1], [0, 1, 1], [0, 0, 1, 0, 1], [0, 1]]
    advantages = [0.5, -0.5, 1.0, -1.0]
    batches = rollout_micro_batches(sequences, masks, advantages, 2, pad_id=9)
    assert [b.stats["completions"] for b in batches] == [2, 2]
    assert [b.stats["sampled"] for b in batches] == [5, 3]  # targets where the NEXT token is sampled
    assert batches[0].targets.tolist() == [[1, 2, 3], [1, 4, -1]]
    assert batches[1].targets.tolist() == [[-1, 2, -1, 2], [3, -1, -1, -1]]
    # nll = input + 1 at each target: row 0 inputs 0,1,2 -> 1+2+3 = 6; row 1 inputs 0,1 -> 1+2 = 3;
    # row 2 targets at inputs 2 (pos 1) and 2 (pos 3) -> 3+3 = 6; row 3 input 0 -> 1
    # loss = sum A * nll / sampled tokens of the step = (0.5*6 - 0.5*3 + 1.0*6 - 1.0*1) / 8 = 6.5 / 8
    model = FixedNLL()
    result = pg_accumulate_step(model, batches, "token", "cpu")
    assert result.skip is None and result.totals == {"sampled": 8.0, "positions": 14.0, "completions": 4.0}
    assert result.loss == pytest.approx(6.5 / 8)
    assert model.scale.grad.item() == pytest.approx(6.5 / 8)  # d loss / d scale = loss (nll is linear in it)
    # nanochat's normalisation: each micro-batch by its own tokens, divided by the number of micro-batches
    model.zero_grad()
    result = pg_accumulate_step(model, batches, "micro_batch_mean", "cpu")
    assert result.loss == pytest.approx((0.5 * 6 - 0.5 * 3) / 5 / 2 + (1.0 * 6 - 1.0 * 1) / 3 / 2)
    assert pg_loss_sum(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([2.0, -1.0])).item() == 2 * 3 - 3


@pytest.mark.parametrize("fault", ["nan", "oom"])
def test_faulty_step_is_skipped_and_leaves_no_gradient(fault):
    batches = rollout_micro_batches([[0, 1, 2], [0, 2, 1]], [[0, 1, 1], [0, 1, 1]], [1.0, -1.0], 1, pad_id=9)
    model = FixedNLL(fault)
    result = pg_accumulate_step(model, batches, "token", "cpu")
    assert result.skip == ("out of memory" if fault == "oom" else "non-finite loss (nan)")
    assert model.scale.grad is None


def tiny_gpt(vocab=64, seed=0):
    config = GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    return random_model(config, seed=seed)


def test_loss_gradient_is_the_reinforce_estimator_two_samples():
    """Two completions of one prompt, rewards 1 and 0: the gradient of the token-normalised loss equals
    -(1 / tokens) * sum_i A_i * grad sum_t log p(token_it), with log p from log_softmax of the logits."""
    torch.manual_seed(0)
    model = tiny_gpt()
    prompt = [1, 5, 7]
    completions = [[9, 11, 13, 2], [4, 2]]  # different lengths: padding must count for nothing
    sequences = [prompt + c for c in completions]
    masks = [[0] * len(prompt) + [1] * len(c) for c in completions]
    advantages = group_advantages([1.0, 0.0], "mean")  # [0.5, -0.5]
    batches = rollout_micro_batches(sequences, masks, advantages, 2, pad_id=0)
    pg_accumulate_step(model, batches, "token", "cpu")
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    surrogate = 0.0
    tokens = sum(len(c) for c in completions)
    for seq, completion, adv in zip(sequences, completions, advantages):
        ids = torch.tensor([seq[:-1]])
        logp = F.log_softmax(model(ids)[0].double(), dim=-1)  # the model's (softcapped) logits
        positions = range(len(prompt) - 1, len(seq) - 1)
        log_prob = sum(logp[t, seq[t + 1]] for t in positions)
        surrogate = surrogate + adv * log_prob
    (-surrogate / tokens).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad.float(), atol=1e-6, rtol=1e-4), name
    assert any(p.grad.abs().max() > 0 for p in model.parameters())


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rl_step.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "rl_step_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-5)
    assert result["totals"] == result["reference_totals"]
    for name, g in result["grads"].items():
        assert torch.allclose(g, result["reference"][name], atol=1e-6, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in result["grads"].values())
    # a fault on rank 1 makes both ranks skip, with no gradient left
    for fault, reason in (("nan", "non-finite loss (nan)"), ("oom", "out of memory")):
        assert result["skipped"][fault] == [(reason, []), (reason, [])], result["skipped"]


# ----------------------------------------------------------------------------------------------------------
# Rollouts, data positions, pass@k


def test_rollout_batches_seeds_and_positions():
    assert rollout_batch_sizes(16, 8) == [8, 8]
    assert rollout_batch_sizes(10, 4) == [4, 4, 2]
    assert rollout_batch_sizes(3, 8) == [3]
    assert rollout_seed(42, 3, 17, 0) == rollout_seed(42, 3, 17, 0)
    seeds = {rollout_seed(42, s, i, b) for s in range(3) for i in range(5) for b in range(2)}
    assert len(seeds) == 30 and all(0 <= x < 2 ** 31 for x in seeds)
    # one process reads examples 0..3, then 4..7; two ranks split the same examples between them
    assert rank_example_indices(0, 4, 10) == [0, 1, 2, 3]
    assert rank_example_indices(2, 4, 10) == [8, 9, 0, 1]  # the next epoch starts where the data ends
    for step in range(3):
        both = rank_example_indices(step, 2, 10, 0, 2) + rank_example_indices(step, 2, 10, 1, 2)
        assert sorted(both) == sorted(rank_example_indices(step, 4, 10))


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2) / C(4,2)
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than 3 wrong: any 3 include a right one


def test_sample_completions_batches_and_seeds(tokenizer):
    model = tiny_gpt(vocab=tokenizer.get_vocab_size())
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello"}]})
    sampling = Sampling(num_samples=5, device_batch_size=2, max_new_tokens=6, temperature=1.0, top_k=50)
    seqs, masks = sample_completions(engine, prompt, sampling, [11, 12, 13])
    assert len(seqs) == 5 and all(s[:len(prompt)] == prompt for s in seqs)
    assert all(len(s) == len(m) and m[:len(prompt)] == [0] * len(prompt) for s, m in zip(seqs, masks))
    again, _ = sample_completions(engine, prompt, sampling, [11, 12, 13])
    assert again == seqs  # the seeds decide the rollouts
    other, _ = sample_completions(engine, prompt, sampling, [11, 12, 99])
    assert other[:4] == seqs[:4] and other[4] != seqs[4]  # batch b is sampled with seeds[b] only
    # the first rows equal what one generate_batch of 2 rows gives with that seed (device_batch_size at a time)
    first, _ = engine.generate_batch(prompt, num_samples=2, keep_end=True, max_tokens=6, temperature=1.0, top_k=50,
                                     seed=11)
    assert first == seqs[:2]
    end_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    text = completion_text(tokenizer, prompt + tokenizer.encode("#### 3") + [min(end_ids)], len(prompt), end_ids)
    assert text == "#### 3"


# ----------------------------------------------------------------------------------------------------------
# Rewards of a code task: the sandbox's verdict, never the program's own output


RIGGED = {
    "prints-passed": "print('All tests passed!')\nimport sys\nsys.exit(0)",
    "exit-early": "import os\nos._exit(0)",
    "status-fd-from-argv": "import json, os, sys\n"
                           "os.write(json.loads(sys.argv[1])['status_fd'], b'{\"status\": \"ok\"}')",
    "harness-finish": "import sys\nsys._getframe(1).f_globals['_finish'](b'{\"status\": \"ok\"}')",
}


def test_rigged_program_earns_no_reward_on_a_code_task(data_dir):
    from tasks.humaneval import HumanEval

    task = HumanEval(stop=1)
    conversation = task[0]
    right = "```python\n" + conversation["messages"][1]["content"] + "\n```"
    wrong_body = f"def {conversation['entry_point']}(*args, **kwargs):\n    return None\n"
    rigged = [f"```python\n{code}\n\n{wrong_body}```" for code in RIGGED.values()]
    rewards = score_completions(task, conversation, [right, *rigged])
    assert rewards == [1.0] + [0.0] * len(RIGGED), dict(zip(["right", *RIGGED], rewards))
