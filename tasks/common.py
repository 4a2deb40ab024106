"""
Base classes and helpers shared by every task: `Task` (a sliced view over a dataset of conversations),
`TaskMixture` (shuffled union, optionally weighted), `TaskSequence` (concatenation), `render_mc` (the
multiple-choice prompt), `load_rows` (one loader for the Hugging Face hub and the local mirror) and
`validate_conversation` (the conversation format check used by CustomJSON and SmolTalk).

A conversation is `{"messages": [{"role": "system"|"user"|"assistant", "content": str | list[part]}], ...}`
with part = `{"type": "text"|"python"|"python_output", "text": str}` (assistant messages only).
Tests: tests/test_tasks.py.
"""

import bisect
import hashlib
import json
import math
import operator
import os
import random
import socket
from urllib.parse import urlparse

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Task, TaskMixture, TaskSequence


class Task:
    """A view over a dataset of conversations: logical index i maps to physical example start + i * step
    (stop clamped to num_examples()). Subclasses define eval_type ('categorical' | 'generative'),
    num_examples(), get_example(physical_index) and evaluate(conversation, completion)."""

    def __init__(self, start=0, stop=None, step=1):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        raise NotImplementedError

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        raise NotImplementedError

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, -(-(stop - self.start) // self.step))  # ceil(span / step)

    def __getitem__(self, index):
        index = operator.index(index)  # ints (numpy ints too); slices and floats raise TypeError
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a task of length {len(self)}")
        return self.get_example(self.start + index * self.step)


class TaskMixture(Task):
    """The union of several tasks, shuffled once with random.Random(42): identical order on every run and
    every rank. Without weights every (task, index) pair appears exactly once (as nanochat); listing a task
    twice oversamples it.

    weights (optional, one float >= 0 per task) are repetition multipliers: task i contributes
    n_i = floor(w_i * len_i + 0.5) entries: floor(n_i / len_i) full passes over it plus its first
    n_i mod len_i examples (tasks are already shuffled, so "first" is a random subset); len(mixture) =
    sum(n_i). Weight 1.0 everywhere gives exactly the unweighted mixture. Only the index table (one int64
    per entry) is built, never copies of the tasks' data."""

    def __init__(self, tasks, weights=None, **kwargs):
        super().__init__(**kwargs)
        if len(tasks) == 0:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.lengths = [len(t) for t in self.tasks]
        if self.weights is None:
            counts = self.lengths
        else:
            if len(self.weights) != len(self.tasks):
                raise ValueError(f"got {len(self.weights)} weights for {len(self.tasks)} tasks")
            if any(not (w >= 0 and math.isfinite(w)) for w in self.weights):
                raise ValueError(f"weights must be finite and >= 0, got {self.weights}")
            counts = [int(math.floor(w * n + 0.5)) if n > 0 else 0 for w, n in zip(self.weights, self.lengths)]
        self.counts = counts
        # entry v in [offsets[i], offsets[i+1]) belongs to task i, local index (v - offsets[i]) % len_i
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        order = list(range(self.offsets[-1]))
        random.Random(42).shuffle(order)  # the permutation depends only on the length: same as nanochat's
        self.order = np.asarray(order, dtype=np.int64)

    @property
    def eval_type(self):
        types = {t.eval_type for t in self.tasks}
        if len(types) != 1:
            raise AttributeError(f"a mixture of {sorted(types)} tasks has no single eval_type")
        return types.pop()

    def num_examples(self):
        return self.offsets[-1]

    def locate(self, index):
        """Physical index -> (task index, index inside that task)."""
        v = int(self.order[index])
        i = bisect.bisect_right(self.offsets, v) - 1
        return i, (v - self.offsets[i]) % self.lengths[i]

    def get_example(self, index):
        i, j = self.locate(index)
        return self.tasks[i][j]

    def task_of(self, index):
        """The task that entry `index` (as in mixture[index]) comes from: the one to evaluate / reward it."""
        return self.tasks[self.locate(self.start + index * self.step)[0]]

    def evaluate(self, conversation, completion):
        raise NotImplementedError("evaluate each task on its own (task_of): a mixture cannot tell where a "
                                  "conversation is from")


class TaskSequence(Task):
    """Plain concatenation of tasks, in order (for curricula)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.offsets = [0]
        for t in self.tasks:
            self.offsets.append(self.offsets[-1] + len(t))

    @property
    def eval_type(self):
        types = {t.eval_type for t in self.tasks}
        if len(types) != 1:
            raise AttributeError(f"a sequence of {sorted(types)} tasks has no single eval_type")
        return types.pop()

    def num_examples(self):
        return self.offsets[-1]

    def get_example(self, index):
        i = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[i][index - self.offsets[i]]

    def evaluate(self, conversation, completion):
        raise NotImplementedError("evaluate each task on its own")


class TaskSubset(Task):
    """The examples of `task` at `indices` (in that order): a held-out share, or what is left after it."""

    def __init__(self, task, indices, **kwargs):
        super().__init__(**kwargs)
        self.task, self.indices = task, list(indices)

    @property
    def eval_type(self):
        return self.task.eval_type

    def num_examples(self):
        return len(self.indices)

    def get_example(self, index):
        return self.task[self.indices[index]]

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)


def conversation_text(conversation):
    """A conversation's messages as "role: text" lines, whitespace runs collapsed (assistant parts joined): the
    normalised form that duplicates and the held-out split are decided on."""
    lines = []
    for message in conversation["messages"]:
        content = message["content"]
        if not isinstance(content, str):
            content = "\n".join(part["text"] for part in content)
        lines.append(f"{message['role']}: {' '.join(content.split())}")
    return "\n".join(lines)


def conversation_hash(conversation):
    """16-byte digest of conversation_text: equal for conversations that differ only in whitespace."""
    return hashlib.blake2b(conversation_text(conversation).encode("utf-8"), digest_size=16).digest()


def split_held_out(tasks, share=0.05):
    """Hold out a deterministic share of the conversations of `tasks` for validation: those whose
    conversation_hash, read as a number in [0, 1), is below `share` - a rule of each conversation alone, so
    the same conversations are held out whatever they are mixed with (chat_eval finds a training spec's share
    again) and every copy of a held-out conversation (in any task) is held out, never also trained on. When
    none falls below `share`, the one with the smallest hash is held out. Returns (kept, held): one TaskSubset
    per task each. Raises ValueError with fewer than 2 distinct conversations."""
    hashes = [[conversation_hash(task[i]) for i in range(len(task))] for task in tasks]
    distinct = {h for task_hashes in hashes for h in task_hashes}
    if len(distinct) < 2:
        raise ValueError(f"cannot hold out a validation share from {len(distinct)} distinct conversation(s)")
    threshold = int(share * 2 ** 64)
    held_hashes = {h for h in distinct if int.from_bytes(h[:8], "big") < threshold} or {min(distinct)}
    kept, held = [], []
    for task, task_hashes in zip(tasks, hashes):
        kept.append(TaskSubset(task, [i for i, h in enumerate(task_hashes) if h not in held_hashes]))
        held.append(TaskSubset(task, [i for i, h in enumerate(task_hashes) if h in held_hashes]))
    return kept, held


# ----------------------------------------------------------------------------------------------------------
# Prompt rendering and conversation validation


def render_mc(question, letters, choices):
    """nanochat's multiple-choice prompt: the answer letter comes after each choice ("- choice=letter"), which
    helps small models tie the letter to its choice."""
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def validate_conversation(conversation):
    """Raise ValueError saying what is wrong unless `conversation` is a trainable chat. The format rules are the
    tokenizer's (nanochat.tokenizer.normalize_messages: a "messages" list, optional leading system message,
    user/assistant strictly alternating from user, string contents, assistant content may be a list of
    text/python/python_output parts); on top of them a training conversation needs at least one user and one
    assistant message and must end with the assistant."""
    from nanochat.tokenizer import normalize_messages  # imported here: the tokenizer module imports torch

    messages = normalize_messages(conversation)
    if len(messages) < 2:
        raise ValueError(f"need at least one user and one assistant message, got {len(messages)} message(s)")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"message {len(conversation['messages']) - 1}: the last message must be from the assistant")


# ----------------------------------------------------------------------------------------------------------
# Loading rows from the local mirror or the Hugging Face hub


class DatasetNotFoundError(FileNotFoundError):
    """Neither the local mirror nor the Hugging Face hub could provide a dataset split."""


def mirror_path(data_dir, repo_id, subset, split):
    """$NANOCHAT_DATA_DIR/<repo_id>/<subset>/<split>.jsonl (subset None -> "default", as the hub names it)."""
    return os.path.join(data_dir, *repo_id.split("/"), subset or "default", f"{split}.jsonl")


def read_jsonl(path):
    """A JSONL file -> list of dicts (blank lines skipped)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from None
    return rows


def _hub_unreachable_reason():
    """Why `datasets.load_dataset` would only stall (None if it may work): no TCP connection to the hub within
    3 s. Without this check `datasets` retries for ~25 s before failing offline. With HF_HUB_OFFLINE set (it
    then reads only its local cache, and fails fast) or a proxy configured, no check is made."""
    offline_vars = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in offline_vars):
        return None
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy may reach what a direct connection cannot: let `datasets` try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3.0).close()
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e}); set HF_HUB_OFFLINE=1 to use the Hugging Face cache offline"
    return None


def load_rows(repo_id, subset, split, hub=True, offline_hint=""):
    """Rows of one dataset split as a `datasets.Dataset`, shuffled with seed 42.

    With $NANOCHAT_DATA_DIR set and $NANOCHAT_DATA_DIR/<repo_id>/<subset>/<split>.jsonl present, the rows come
    from that file (read with json.loads: fast, no cache directory); otherwise from
    `datasets.load_dataset(repo_id, subset, split=split)` (skipped when hub=False). If neither works a
    DatasetNotFoundError names the file looked for and the fix; `offline_hint` is appended to it."""
    import datasets

    data_dir = os.environ.get("NANOCHAT_DATA_DIR") or None
    path = mirror_path(data_dir, repo_id, subset, split) if data_dir else None
    if path is not None and os.path.isfile(path):
        return datasets.Dataset.from_list(read_jsonl(path)).shuffle(seed=42)
    name = f"{repo_id} ({subset or 'default'}, {split})"
    where = f"local mirror file {path} does not exist" if path else "NANOCHAT_DATA_DIR is not set"
    layout = f"<NANOCHAT_DATA_DIR>/{repo_id}/{subset or 'default'}/{split}.jsonl"
    hint = f" {offline_hint}" if offline_hint else ""
    if not hub:
        raise DatasetNotFoundError(f"{name} is only available from the local mirror, and "
                                   f"{where}. Set NANOCHAT_DATA_DIR to the mirror (the file is {layout}).{hint}")
    reason = _hub_unreachable_reason()
    if reason is None:
        try:
            return datasets.load_dataset(repo_id, subset, split=split).shuffle(seed=42)
        except (OSError, ValueError) as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            reason = f"{type(e).__name__}: {e}"
    raise DatasetNotFoundError(f"cannot load {name}: {where}, and the Hugging Face hub "
                               f"failed ({reason}). Fix: set NANOCHAT_DATA_DIR to a local mirror that has "
                               f"{layout}, or check the network / HF_HUB_OFFLINE and the Hugging Face cache.{hint}")
