"""
Reinforcement learning building blocks of scripts/chat_rl.py: REINFORCE with a group baseline, as nanochat's
chat_rl (on-policy: no KL penalty, no PPO ratio or clipping). Each prompt gets `num_samples` completions from the
Engine; each completion's reward comes from its task; its advantage is the reward minus the group's mean
("mean", nanochat) or that divided by the group's standard deviation ("zscore", GRPO: Shao et al. 2024,
DeepSeekMath); the loss is sum over the sampled tokens of advantage * (-log p(token)), normalised as SFT's
loss (micro_batch_loss_scale: "token" = by the sampled tokens of the whole step, all micro-batches and ranks).
Its gradient is the REINFORCE estimator -sum A * grad log p.

Small functions with explicit arguments (rank / world_size / device passed in, no globals); tests:
tests/test_rl.py (`python -m pytest tests/test_rl.py`).

- group_advantages: the baseline ("mean" | "zscore")
- rollout_batch_sizes / rollout_seed / sample_completions: a prompt's completions, device_batch_size rows at a
  time through the Engine's KV cache, each batch seeded from (seed, step, example, batch): a resumed run draws
  the very same rollouts
- completion_text / score_completions: rewards from the task (code tasks: the sandbox's verdict)
- rollout_micro_batches / pg_loss_sum / pg_accumulate_step: the step's forward/backward, NaN / out-of-memory
  steps skipped on every rank together (as nanochat.sft.accumulate_step)
- rank_example_indices: which examples a rank trains on at a step (the step is the data position)
- pass_at_k / evaluate_pass_at_k: the unbiased pass@k of Chen et al. 2021 on the evaluation task
"""

import contextlib
import hashlib
import math
from typing import NamedTuple

import torch

from nanochat.chat_eval import rank_problem_indices
from nanochat.common import all_reduce_values
from nanochat.sft import StepResult, backward_micro_batches, collate_sft, micro_batch_loss_scale

ADVANTAGES = ("mean", "zscore")
ZSCORE_EPS = 1e-4  # added to the group's std: a group of equal rewards gets advantage 0, not 0/0 (as TRL's GRPO)

# ----------------------------------------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, kind="mean"):
    """The advantages of one group (the completions of one prompt): reward - the group's mean ("mean",
    nanochat), or that divided by the group's population standard deviation + ZSCORE_EPS ("zscore", GRPO).
    A group whose rewards are all equal teaches nothing: all its advantages are 0."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {kind!r}")
    assert len(rewards) > 0, "an empty group"
    mean = sum(rewards) / len(rewards)
    centred = [float(r) - mean for r in rewards]
    if kind == "mean":
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + ZSCORE_EPS) for c in centred]


# ----------------------------------------------------------------------------------------------------------
# Rollouts


class Sampling(NamedTuple):
    num_samples: int  # completions per prompt (the group)
    device_batch_size: int  # rows generated (and trained) at a time
    max_new_tokens: int
    temperature: float
    top_k: int | None


def rollout_batch_sizes(num_samples, device_batch_size):
    """A prompt's num_samples completions, generated device_batch_size rows at a time: the batch sizes, e.g.
    (10, 4) -> [4, 4, 2]."""
    assert num_samples > 0 and device_batch_size > 0
    full, rest = divmod(num_samples, device_batch_size)
    return [device_batch_size] * full + ([rest] if rest else [])


def rollout_seed(seed, step, example_index, batch_index):
    """The sampling seed of one generation batch: a hash of (run seed, step, example, batch), so every batch
    gets its own stream and a resumed run regenerates exactly the rollouts of the uninterrupted one."""
    digest = hashlib.blake2b(f"{seed}:{step}:{example_index}:{batch_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def sample_completions(engine, prompt, sampling, seeds):
    """The group of one prompt: sampling.num_samples completions, in batches of rollout_batch_sizes, batch b
    sampled with seeds[b]. Returns (sequences, masks): prompt + completion token lists, the completion's
    terminal <|assistant_end|> included (it is an action too: the model learns when to stop), with mask 1 on
    sampled tokens and 0 on the prompt and on the tool's forced output."""
    sizes = rollout_batch_sizes(sampling.num_samples, sampling.device_batch_size)
    assert len(seeds) == len(sizes), f"{len(sizes)} generation batches need {len(sizes)} seeds, got {len(seeds)}"
    sequences, masks = [], []
    for size, seed in zip(sizes, seeds):
        seqs, ms = engine.generate_batch(prompt, num_samples=size, keep_end=True, max_tokens=sampling.max_new_tokens,
                                         temperature=sampling.temperature, top_k=sampling.top_k, seed=seed)
        sequences += seqs
        masks += ms
    return sequences, masks


def completion_text(tokenizer, sequence, prompt_len, end_ids):
    """The text of a completion: its tokens after the prompt, without a terminal token in end_ids."""
    tokens = sequence[prompt_len:]
    if tokens and tokens[-1] in end_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens)


def score_completions(task, conversation, texts):
    """task.reward(conversation, text) of each completion (a code task's reward is its sandbox verdict:
    judge_function runs the tests in a process the program cannot write to)."""
    return [float(task.reward(conversation, text)) for text in texts]


# ----------------------------------------------------------------------------------------------------------
# The policy-gradient step


class RolloutBatch(NamedTuple):
    """One micro-batch of rollouts of one rank, on the CPU: inputs / targets (B, T) as collate_sft makes them
    (targets -1 except on sampled tokens), each row's advantage (B,), and stats: completions, sampled (tokens
    with a target), positions (inputs.numel())."""
    inputs: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    stats: dict


def rollout_micro_batches(sequences, masks, advantages, device_batch_size, pad_id):
    """Rows (prompt + completion, mask, advantage) -> RolloutBatches of device_batch_size rows (the last may be
    smaller), each padded to its longest row with pad_id (collate_sft: padding and mask-0 positions get no
    target)."""
    assert len(sequences) == len(masks) == len(advantages) > 0
    batches = []
    for start in range(0, len(sequences), device_batch_size):
        stop = start + device_batch_size
        inputs, targets = collate_sft(list(zip(sequences[start:stop], masks[start:stop])), pad_id)
        adv = torch.tensor(advantages[start:stop], dtype=torch.float32)
        stats = {"completions": inputs.size(0), "sampled": int((targets != -1).sum()), "positions": inputs.numel()}
        batches.append(RolloutBatch(inputs, targets, adv, stats))
    return batches


def pg_loss_sum(token_nll, advantages):
    """The REINFORCE surrogate of a micro-batch, summed over its tokens: sum_b sum_t advantages[b] *
    token_nll[b, t], where token_nll (B, T) = -log p(target) and 0 where there is no target (the model's
    loss_reduction="none"). Its gradient is -sum_b advantages[b] * sum_t grad log p(token_bt)."""
    return (token_nll * advantages.to(token_nll.dtype)[:, None]).sum()


PG_TOTAL_KEYS = ("sampled", "positions", "completions")  # StepResult.totals of pg_accumulate_step


def pg_accumulate_step(model, micro_batches, loss_normalization, device, world_size=1, rank=0,
                       autocast=contextlib.nullcontext):
    """Forward and backward of one optimizer step's rollout micro-batches (RolloutBatch list) on this rank,
    leaving the gradients in .grad for the optimizer: the sampled-token count of the step is all-reduced first,
    each micro-batch's pg_loss_sum is scaled by micro_batch_loss_scale (as SFT's loss). Out of memory or a
    non-finite loss on any rank skips the step on every rank, leaving no gradient (sft.backward_micro_batches).
    Returns sft.StepResult (loss: the step's surrogate loss as the optimizer sees it; totals: PG_TOTAL_KEYS
    summed over ranks)."""
    device = torch.device(device)
    local = [sum(b.stats[k] for b in micro_batches) for k in PG_TOTAL_KEYS]
    totals = dict(zip(PG_TOTAL_KEYS, all_reduce_values(local, "sum", device, world_size)))

    def loss_fn(batch):
        inputs, targets = (t.to(device, non_blocking=device.type == "cuda") for t in batch[:2])
        advantages = batch.advantages.to(device)
        with autocast():
            token_nll = model(inputs, targets, loss_reduction="none")
        loss = pg_loss_sum(token_nll, advantages) * micro_batch_loss_scale(
            loss_normalization, batch.stats["sampled"], totals["sampled"], world_size, len(micro_batches))
        return loss, [loss.detach()]

    (objective,), reason = backward_micro_batches(model, micro_batches, loss_fn, 1, device, world_size, rank)
    return StepResult(objective / world_size, reason, totals)


def rank_example_indices(step, examples_per_rank, num_examples, rank=0, world_size=1):
    """The training examples of this rank at `step`: rank reads examples rank, rank + world_size, ... of the
    task, examples_per_rank per step, cycling into the next epoch (the step is the whole data position)."""
    per_rank = len(range(rank, num_examples, world_size))
    assert per_rank > 0, f"rank {rank} of {world_size} gets no examples from a task of {num_examples}"
    return [rank + world_size * ((step * examples_per_rank + j) % per_rank) for j in range(examples_per_rank)]


# ----------------------------------------------------------------------------------------------------------
# Evaluation: pass@k


def pass_at_k(n, c, k):
    """The unbiased pass@k of Chen et al. 2021 (HumanEval): the chance that at least one of k completions drawn
    without replacement from n, of which c are correct, is correct: 1 - C(n - c, k) / C(n, k)."""
    assert 0 <= c <= n and 1 <= k <= n
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_pass_at_k(task, engine, sampling, num_problems, seed, device, rank=0, world_size=1):
    """pass@k for k = 1..sampling.num_samples on the first num_problems problems of `task` (a Task, or a
    TaskMixture: each problem is evaluated by the task it comes from), rank r taking problems r, r + world_size,
    ...; the sampling seeds depend on (seed, problem, batch) only, so every evaluation of a run sees the same
    random numbers. Returns {"pass@k": value}, the same on every rank (all-reduced)."""
    tokenizer = engine.tokenizer
    end_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    n = sampling.num_samples
    sums = [0.0] * n
    indices = rank_problem_indices(min(num_problems, len(task)), rank, world_size)
    for i in indices:
        conversation = task[i]
        judge = task.task_of(i) if hasattr(task, "task_of") else task
        prompt = tokenizer.render_for_completion(conversation)
        seeds = [rollout_seed(seed, -1, i, b) for b in range(len(rollout_batch_sizes(n, sampling.device_batch_size)))]
        sequences, _ = sample_completions(engine, prompt, sampling, seeds)
        correct = sum(bool(judge.evaluate(conversation, completion_text(tokenizer, s, len(prompt), end_ids)))
                      for s in sequences)
        for k in range(1, n + 1):
            sums[k - 1] += pass_at_k(n, correct, k)
    *sums, count = all_reduce_values([*sums, len(indices)], "sum", device, world_size)
    return {f"pass@{k}": sums[k - 1] / max(count, 1) for k in range(1, n + 1)}


# ----------------------------------------------------------------------------------------------------------
# Report


def report_section(config, num_questions, num_iterations, totals, series, metrics, rollouts):
    """The data of chat_rl's "Chat RL" report section: the key options, the run's counts and rollout throughput
    (totals summed over the run and the ranks; train_time / rollout_time in seconds), the reward at the first and
    last steps
    (series["train_reward"]: [step, mean reward] points), the final pass@k (metrics) and rank 0's sampled
    rollouts of the last step (rollouts: (prompt, completion, reward))."""
    rewards = [value for _, value in series.get("train_reward", [])]
    train_time, rollout_time = totals["train_time"], totals["rollout_time"]
    figures = {"Training questions": num_questions, "Number of iterations": num_iterations,
               "Completions sampled": totals["completions"], "Generated tokens": totals["generated_tokens"],
               "Skipped steps (non-finite)": totals["skipped_nonfinite"],
               "Skipped steps (out of memory)": totals["skipped_oom"], "Training time (s)": round(train_time, 1),
               "Rollout time (s)": round(rollout_time, 1),
               "Completions per second": round(totals["completions"] / max(rollout_time, 1e-9), 2),
               "Generated tokens per second": round(totals["generated_tokens"] / max(rollout_time, 1e-9))}
    if rewards:
        figures["Mean reward, first step"] = rewards[0]
        figures["Mean reward, last step"] = rewards[-1]
    samples = [f"```\n{prompt}{completion}\n```\nreward: {reward:.2f}" for prompt, completion, reward in rollouts]
    return [
        {k: config[k] for k in ("source", "train_task", "eval_task", "examples_per_step", "num_samples",
                                "device_batch_size", "max_new_tokens", "temperature", "top_k", "init_lr_frac",
                                "advantage", "loss_normalization")},
        figures,
        {f"Final {k}": v for k, v in metrics.items()},
        "Curves: train_reward (the mean reward of each step's rollouts) and pass@k on eval_task (report plots).",
        "Sampled rollouts of the last step (temperature as configured):", *samples,
    ]
