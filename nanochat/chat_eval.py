"""
Task metrics for chat models: `run_chat_eval(task_name, model, tokenizer, engine, ...) -> accuracy`.

- Categorical tasks (ARC-Easy, ARC-Challenge, MMLU): prompts from `render_for_completion`, right-padded into
  batches; the logits at each row's own last prompt position, restricted to that question's letter tokens,
  give the answer (argmax). Every letter must be a single token.
- Generative tasks (GSM8K, HumanEval, SpellingBee): `engine.generate_batch` with `num_samples`; a problem is solved if
  any sample passes (pass@k).
- Distributed: rank r takes problems r, r + world_size, ...; the counts are all-reduced (SUM), so the result
  equals the single-process one.
- `chatcore(results)`: mean over the five tasks of nanochat's ChatCORE (CHATCORE_TASKS) of (acc - baseline) / (1 - baseline).
- chat_sft's in-training task metrics (`run_task_metrics`) and its report's greedy samples (`sample_conversations`).

Used by scripts/chat_eval.py and scripts/chat_sft.py. Tests: tests/test_chat_eval.py.
"""


import torch

from nanochat.common import all_reduce_values, dist_rank_world
from nanochat.loss_eval import LoopProgress
from tasks.mixture import EVAL_TASKS, load_eval_task as load_task  # noqa: F401  (load_task: patched in tests)

TASK_NAMES = tuple(EVAL_TASKS)  # ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")  # nanochat's ChatCORE: these five
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}  # chance


def chatcore(results):
    """ChatCORE: the mean over the five tasks of the accuracy above chance, (acc - b) / (1 - b)."""
    missing = [name for name in CHATCORE_TASKS if name not in results]
    if missing:
        raise ValueError(f"ChatCORE needs all of {', '.join(CHATCORE_TASKS)}; missing {', '.join(missing)}")
    return sum((results[n] - BASELINES[n]) / (1.0 - BASELINES[n]) for n in CHATCORE_TASKS) / len(CHATCORE_TASKS)


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


def rank_problem_indices(num_problems, rank, world_size):
    """The problems this rank evaluates: i with i % world_size == rank."""
    return list(range(rank, num_problems, world_size))


def letter_token_ids(tokenizer, letters):
    """The token id of each answer letter; every letter must encode to exactly one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(encoded)} tokens {encoded}; categorical "
                             "evaluation needs every letter to be a single token")
        ids.append(encoded[0])
    return ids


def collate_prompts(prompts, pad_id):
    """Right-pad token lists into a (B, T) long tensor; also return each row's last prompt position."""
    max_len = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), max_len), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    return ids, [len(p) - 1 for p in prompts]


def pick_letters(logits, last_positions, letter_ids_per_row, letters_per_row):
    """logits (B, T, V): for each row, argmax over its letter tokens at its own last prompt position."""
    picked = []
    for b, (pos, ids, letters) in enumerate(zip(last_positions, letter_ids_per_row, letters_per_row)):
        focus = logits[b, pos, ids]
        picked.append(letters[int(torch.argmax(focus))])
    return picked


# ----------------------------------------------------------------------------------------------------------
# The two evaluation loops, over any Task-like object (len(task), task[i], task.evaluate)


def _device_of(model):
    if hasattr(model, "get_device"):
        return model.get_device()
    return next(model.parameters()).device


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size=1, max_problems=None, rank=None, world_size=None,
                         task_name="categorical"):
    """Returns (num_passed, num_total) summed over ranks."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    device = _device_of(model)
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any valid id: padded positions are never read
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    indices = rank_problem_indices(num_problems, rank, world_size)
    progress = LoopProgress(task_name, len(indices), rank)
    passed = done = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        letters_per_row = [c["letters"] for c in conversations]
        letter_ids_per_row = [letter_token_ids(tokenizer, letters) for letters in letters_per_row]
        ids, last_positions = collate_prompts(prompts, pad_id)
        logits = model(ids.to(device))  # (B, T, V)
        picked = pick_letters(logits, last_positions, letter_ids_per_row, letters_per_row)
        passed += sum(bool(task.evaluate(c, p)) for c, p in zip(conversations, picked))
        done += len(conversations)
        progress.update(done, f"accuracy {passed / done:.2%}", len(conversations))
    progress.close()
    passed, total = all_reduce_values([passed, done], "sum", device, world_size)
    return int(passed), int(total)


@torch.no_grad()
def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        max_problems=None, rank=None, world_size=None, task_name="generative", device=None):
    """pass@num_samples: returns (num_passed, num_total) summed over ranks."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    if device is None:  # where the counts are all-reduced (nccl needs the GPU)
        device = _device_of(engine.model) if hasattr(engine, "model") else "cpu"
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    indices = rank_problem_indices(num_problems, rank, world_size)
    progress = LoopProgress(task_name, len(indices), rank)
    passed = done = 0
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        passed += int(any(bool(task.evaluate(conversation, c)) for c in completions))
        done += 1
        progress.update(done, f"accuracy {passed / done:.2%}")
    progress.close()
    passed, total = all_reduce_values([passed, done], "sum", device, world_size)
    return int(passed), int(total)


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None):
    """Accuracy of the model on one task (test split), over all ranks."""
    task = load_task(task_name)
    rank, world_size = dist_rank_world()
    if task_name in CATEGORICAL_TASKS:
        passed, total = run_categorical_eval(task, tokenizer, model, batch_size=batch_size,
                                             max_problems=max_problems, rank=rank, world_size=world_size,
                                             task_name=task_name)
    else:
        passed, total = run_generative_eval(task, tokenizer, engine, num_samples=num_samples,
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                            max_problems=max_problems, rank=rank, world_size=world_size,
                                            task_name=task_name, device=_device_of(model))
    accuracy = passed / total if total > 0 else 0.0
    if rank == 0:
        print(f"{task_name}: {passed}/{total} = {accuracy:.2%}", flush=True)
    return accuracy


def run_task_metrics(eval_specs, model, tokenizer, engine, batch_size, max_new_tokens):
    """chat_sft's task metrics: {"<task>_acc": accuracy} (the guide's names, e.g. arc_easy_acc) for eval_specs
    [(task name, max_problems or None)]; categorical tasks batched by batch_size, generative ones greedy."""
    metrics = {}
    for task_name, max_problems in eval_specs:
        kwargs = {"batch_size": batch_size} if task_name in CATEGORICAL_TASKS else {"max_new_tokens": max_new_tokens}
        key = task_name.lower().replace("-", "_") + "_acc"
        metrics[key] = run_chat_eval(task_name, model, tokenizer, engine, max_problems=max_problems, **kwargs)
    return metrics


def sample_conversations(engine, tokenizer, conversations, context, max_tokens=64, num=2):
    """chat_sft's report samples: a heading, then the first `num` conversations whose prompt leaves room for
    max_tokens new tokens in the model's context (longer ones are skipped, not cut), as prompt + greedy answer."""
    samples = []
    for conversation in conversations:
        if len(samples) == num:
            break
        prompt = tokenizer.render_for_completion(conversation)
        if len(prompt) + max_tokens > context:
            continue
        results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        samples.append(f"```\n{tokenizer.decode(prompt)}{tokenizer.decode(results[0][len(prompt):])}\n```")
    return [f"Sample conversations (final model, greedy; validation prompts of at most {context - max_tokens} "
            f"tokens, so that {max_tokens} new ones fit the model's {context} positions):", *samples]
