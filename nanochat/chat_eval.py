"""
Task metrics for chat models: `run_chat_eval(task_name, model, tokenizer, engine, ...) -> accuracy`.

- Categorical tasks (ARC-Easy, ARC-Challenge, MMLU): prompts from `render_for_completion`, right-padded into
  batches; the logits at each row's own last prompt position, restricted to that question's letter tokens,
  give the answer (argmax). Every letter must be a single token.
- Generative tasks (GSM8K, HumanEval): `engine.generate_batch` with `num_samples`; a problem is solved if
  any sample passes (pass@k).
- Distributed: rank r takes problems r, r + world_size, ...; the counts are all-reduced (SUM), so the result
  equals the single-process one.
- `chatcore(results)`: mean over the five tasks of (acc - baseline) / (1 - baseline).

Used by scripts/chat_eval.py and scripts/chat_sft.py. Tests: tests/test_chat_eval.py.
"""

import sys
import time

import torch
import torch.distributed as dist

from nanochat.common import dist_rank_world

TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}  # chance


def load_task(task_name):
    """The test split of each evaluation task (as nanochat)."""
    if task_name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC

        return ARC(subset=task_name, split="test")
    if task_name == "MMLU":
        from tasks.mmlu import MMLU

        return MMLU(subset="all", split="test")
    if task_name == "GSM8K":
        from tasks.gsm8k import GSM8K

        return GSM8K(subset="main", split="test")
    if task_name == "HumanEval":
        from tasks.humaneval import HumanEval

        return HumanEval()
    raise ValueError(f"unknown task {task_name!r}; expected one of {', '.join(TASK_NAMES)}")


def chatcore(results):
    """ChatCORE: the mean over the five tasks of the accuracy above chance, (acc - b) / (1 - b)."""
    missing = [name for name in TASK_NAMES if name not in results]
    if missing:
        raise ValueError(f"ChatCORE needs all of {', '.join(TASK_NAMES)}; missing {', '.join(missing)}")
    return sum((results[n] - BASELINES[n]) / (1.0 - BASELINES[n]) for n in TASK_NAMES) / len(TASK_NAMES)


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


def all_reduce_counts(counts, device, world_size):
    """SUM integer counts over ranks (a CPU tensor under gloo)."""
    if world_size <= 1:
        return counts
    if dist.get_backend() == "gloo":
        device = "cpu"
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


class Progress:
    """Running accuracy on rank 0: a tqdm bar on a terminal; otherwise (logs) a line at each new tenth of the
    problems, at most every `min_interval` seconds. The final count is printed by run_chat_eval."""

    def __init__(self, task_name, total, rank, min_interval=5.0):
        self.task_name, self.total, self.enabled = task_name, total, rank == 0
        self.min_interval = min_interval
        self.bar = None
        self.t0 = self.last_print = time.time()
        self.last_tenth = 0
        if self.enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=task_name, leave=False)

    def update(self, done, passed, n=1):
        if not self.enabled:
            return
        acc = passed / max(done, 1)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(acc=f"{acc:.2%}")
            return
        tenth, now = done * 10 // max(self.total, 1), time.time()
        if tenth > self.last_tenth and now - self.last_print >= self.min_interval:
            self.last_tenth, self.last_print = tenth, now
            print(f"{self.task_name}: {done}/{self.total} (rank 0) | accuracy {acc:.2%} | {now - self.t0:.1f}s",
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


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
    progress = Progress(task_name, len(indices), rank)
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
        progress.update(done, passed, len(conversations))
    progress.close()
    passed, total = all_reduce_counts([passed, done], device, world_size)
    return passed, total


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
    progress = Progress(task_name, len(indices), rank)
    passed = done = 0
    for i in indices:
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        passed += int(any(bool(task.evaluate(conversation, c)) for c in completions))
        done += 1
        progress.update(done, passed)
    progress.close()
    passed, total = all_reduce_counts([passed, done], device, world_size)
    return passed, total


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
