"""
The DCLM CORE metric (https://arxiv.org/abs/2406.11794): in-context-learning tasks scored by comparing the
model's losses on candidate continuations; each task's accuracy is centred against its random baseline,
(acc - baseline) / (1 - baseline), and CORE is the mean over tasks.

Bundle layout (<base_dir>/eval_bundle, as nanochat downloads it):
    core.yaml               icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                         continuation_delimiter (optional, default " ")}, ...]
    eval_meta_data.csv      columns "Eval Task" and "Random baseline" (percent)
    eval_data/<dataset_uri> JSONL rows:
        multiple_choice     {"query", "choices": [...], "gold": i}      same context, different continuations
        schema              {"context_options": [...], "continuation", "gold": i}   different contexts
        language_modeling   {"context", "continuation"}                 correct if greedy decoding matches

Scoring: multiple_choice and schema pick the option whose continuation tokens have the lowest mean loss;
language_modeling is right when every continuation token is the argmax prediction. Few-shot examples are
drawn from the other rows with random.Random(1234 + index) and joined with blank lines. Rows are split
over ranks (index % world_size) and the counts all-reduced.

Tests: tests/test_core_eval.py (a hand-made bundle and a fake model).
"""

import csv
import json
import os
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import UserError, dist_rank_world

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def find_eval_bundle(base_dir):
    """<base_dir>/eval_bundle if it holds core.yaml, else None."""
    path = os.path.join(base_dir, "eval_bundle")
    return path if os.path.isfile(os.path.join(path, "core.yaml")) else None


def load_bundle(bundle_dir):
    """[(task dict, rows, random baseline in [0, 1])] for every task of core.yaml."""
    import yaml  # a dependency of `datasets`; imported here so the rest of the library does not need it

    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        tasks = yaml.safe_load(f)["icl_tasks"]
    baselines = {}
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    out = []
    for task in tasks:
        if task.get("icl_task_type") not in TASK_TYPES:
            raise UserError(f"{os.path.join(bundle_dir, 'core.yaml')}: task {task.get('label')!r} has unknown "
                            f"icl_task_type {task.get('icl_task_type')!r}, expected one of {', '.join(TASK_TYPES)}")
        with open(os.path.join(bundle_dir, "eval_data", task["dataset_uri"]), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out.append((task, rows, baselines.get(task["label"], 0.0)))
    return out


def centered_accuracy(accuracy, baseline):
    return (accuracy - baseline) / (1.0 - baseline)


def render_prompts(task_type, row, fewshot_rows, delimiter):
    """The full texts of every option of `row` (few-shot examples first). For language_modeling also the
    text without the continuation. Returns (texts, context_only or None)."""
    if task_type == "multiple_choice":
        shots = [f"{r['query']}{delimiter}{r['choices'][r['gold']]}" for r in fewshot_rows]
        prefix = "".join(s + "\n\n" for s in shots)
        return [f"{prefix}{row['query']}{delimiter}{choice}" for choice in row["choices"]], None
    if task_type == "schema":
        shots = [f"{r['context_options'][r['gold']]}{delimiter}{r['continuation']}" for r in fewshot_rows]
        prefix = "".join(s + "\n\n" for s in shots)
        return [f"{prefix}{ctx}{delimiter}{row['continuation']}" for ctx in row["context_options"]], None
    shots = [f"{r['context'].strip()}{delimiter}{r['continuation']}" for r in fewshot_rows]
    prefix = "".join(s + "\n\n" for s in shots)
    context = f"{prefix}{row['context'].strip()}{delimiter}"
    return [context + row["continuation"]], context


def continuation_spans(task_type, token_lists, context_ids=None):
    """[(start, end)] token span of the continuation in each option: after the options' common prefix
    (multiple_choice), the common suffix (schema), or after the context's tokens (language_modeling)."""
    if task_type == "multiple_choice":
        n = min(len(t) for t in token_lists)
        prefix = 0
        while prefix < n and all(t[prefix] == token_lists[0][prefix] for t in token_lists):
            prefix += 1
        return [(prefix, len(t)) for t in token_lists]
    if task_type == "schema":
        n = min(len(t) for t in token_lists)
        suffix = 0
        while suffix < n and all(t[-1 - suffix] == token_lists[0][-1 - suffix] for t in token_lists):
            suffix += 1
        return [(len(t) - suffix, len(t)) for t in token_lists]
    return [(len(context_ids), len(token_lists[0]))]


@torch.no_grad()
def score_example(model, token_lists, spans, task_type, device, pad_id):
    """Is the example right? Runs all options as one right-padded batch (causal: padding changes nothing)."""
    max_len = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), max_len), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()  # (N, T, V)
    # position p predicts token p + 1
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (N, T-1)
    predictions = logits[:, :-1].argmax(dim=-1)
    if task_type == "language_modeling":
        start, end = spans[0]
        return bool((predictions[0, start - 1: end - 1] == ids[0, start:end]).all())
    mean_losses = [losses[i, start - 1: end - 1].mean().item() for i, (start, end) in enumerate(spans)]
    return min(range(len(mean_losses)), key=mean_losses.__getitem__)


def truncate_left(token_lists, spans, max_len):
    """Crop each option to its last max_len tokens, shifting the spans; the continuation must fit."""
    out_tokens, out_spans = [], []
    for t, (start, end) in zip(token_lists, spans):
        cut = max(0, len(t) - max_len)
        if not (end - cut > 1 and start - cut >= 1):
            raise UserError(f"a CORE example's continuation ({end - start} tokens) does not fit the model's context "
                            f"of {max_len} tokens")
        out_tokens.append(t[cut:])
        out_spans.append((start - cut, end - cut))
    return out_tokens, out_spans


def evaluate_task(model, tokenizer, task, rows, device, max_seq_len=None, max_examples=-1, rank=None, world_size=None):
    """Accuracy of `model` on one task (all ranks together)."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    task_type = task["icl_task_type"]
    delimiter = task.get("continuation_delimiter", " ")
    num_fewshot = task["num_fewshot"][0] if isinstance(task["num_fewshot"], list) else task["num_fewshot"]
    n = len(rows) if max_examples is None or max_examples < 0 else min(len(rows), max_examples)
    bos = tokenizer.get_bos_token_id()
    correct = torch.zeros(2, dtype=torch.float64, device=device)  # [right, seen]
    for idx in range(rank, n, world_size):
        row = rows[idx]
        others = [i for i in range(len(rows)) if i != idx]
        shot_ids = random.Random(1234 + idx).sample(others, min(num_fewshot, len(others)))
        texts, context = render_prompts(task_type, row, [rows[i] for i in shot_ids], delimiter)
        token_lists = [tokenizer.encode(t, prepend=bos) for t in texts]
        context_ids = tokenizer.encode(context, prepend=bos) if context is not None else None
        spans = continuation_spans(task_type, token_lists, context_ids)
        if max_seq_len is not None:
            token_lists, spans = truncate_left(token_lists, spans, max_seq_len)
        result = score_example(model, token_lists, spans, task_type, device, pad_id=bos)
        is_right = result if task_type == "language_modeling" else result == row["gold"]
        correct[0] += float(is_right)
        correct[1] += 1
    if world_size > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return (correct[0] / correct[1].clamp(min=1)).item()


def evaluate_core(model, tokenizer, device, bundle_dir, max_per_task=-1, max_seq_len=None):
    """{"results": {label: accuracy}, "centered_results": {label: centred}, "core_metric": mean centred}."""
    if max_seq_len is None and hasattr(model, "config"):
        max_seq_len = model.config.sequence_len
    results, centered = {}, {}
    for task, rows, baseline in load_bundle(bundle_dir):
        accuracy = evaluate_task(model, tokenizer, task, rows, device, max_seq_len=max_seq_len, max_examples=max_per_task)
        results[task["label"]] = accuracy
        centered[task["label"]] = centered_accuracy(accuracy, baseline)
    core = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": results, "centered_results": centered, "core_metric": core}
