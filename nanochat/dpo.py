"""
Direct Preference Optimization (DPO, Rafailov et al. 2023) building blocks for scripts/chat_dpo.py. Small
functions with explicit arguments, each tested in tests/test_dpo.py (`python -m pytest tests/test_dpo.py`).

- parse_preference_row / render_pair / load_preferences: `{"prompt" | "messages", "chosen", "rejected"}` rows
  (chosen / rejected: a string or a list of one assistant message, TRL's format) -> rendered pairs, the prompt
  rendered once; a bad row is a one-line UserError naming `file:line`
- step_pair_indices: which pairs a rank's micro-batch of a step holds (the plan is the step: exact resume);
  rank_batch_indices: a rank's batches of the held-out pairs
- collate_pairs: a micro-batch of pairs -> the tensors of the forward (padded, or best-fit packed into rows
  with per-sequence segments) plus, per target position, the sequence it belongs to
- sequence_logps / batch_logps: per-sequence sums of the assistant tokens' log-probabilities
- dpo_loss: -log sigmoid(beta * ((log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)))) per pair
- dpo_accumulate_step / evaluate_dpo / reference_logps: one optimizer step (loss averaged per pair over
  micro-batches and ranks, NaN / out-of-memory skipped on every rank together), the held-out metrics, and the
  frozen starting model's log-probabilities computed once (cached with save_reference / load_reference)
"""

import contextlib
import hashlib
import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanochat.common import UserError, all_reduce_values, atomic_write_text
from nanochat.data_files import read_rows
from nanochat.sft import backward_micro_batches, collate_packed, collate_sft, micro_batch_loss_scale, pack_best_fit

PACKINGS = ("pad", "bestfit")
METRIC_KEYS = ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")  # means over pairs

# ----------------------------------------------------------------------------------------------------------
# Preference data


class PreferencePair(NamedTuple):
    """One rendered pair: the prompt's tokens (rendered once, never supervised) and each answer's tokens and
    mask (1 on the tokens the assistant produces, as render_conversation marks them)."""
    prompt: list
    chosen: tuple  # (ids, mask)
    rejected: tuple  # (ids, mask)

    def sequence(self, which):
        """(ids, mask) of the whole conversation: prompt + chosen (which = 0) or prompt + rejected (1)."""
        ids, mask = self.chosen if which == 0 else self.rejected
        return self.prompt + ids, [0] * len(self.prompt) + mask


def _as_messages(value, key, where):
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    raise UserError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}")


def parse_preference_row(row, where):
    """-> (prompt messages, chosen messages, rejected messages) of one data row, checked: exactly one of
    "prompt" (a string: one user message; or a message list) and "messages" (the conversation before the answer,
    ending with a user message); "chosen" and "rejected" each a string or a list of one assistant message, not
    equal. `where` ("file:line") starts every error message."""
    from nanochat.tokenizer import normalize_messages  # here: the tokenizer module pulls in rustbpe/tiktoken

    if not isinstance(row, dict):
        raise UserError(f"{where}: a {type(row).__name__}, expected an object with prompt, chosen and rejected")
    keys = [k for k in ("prompt", "messages") if row.get(k) is not None]
    if len(keys) != 1:
        raise UserError(f"{where}: needs exactly one of 'prompt' or 'messages' (got "
                        f"{' and '.join(keys) or 'neither'}); keys present: {', '.join(sorted(row)) or 'none'}")
    prompt = _as_messages(row[keys[0]], keys[0], where)
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f"{where}: '{keys[0]}' must end with a user message (the answers follow it)")
    answers = []
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise UserError(f"{where}: missing '{key}' (a string, or a list of one assistant message)")
        answer = _as_messages(row[key], key, where)
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            raise UserError(f"{where}: '{key}' must be a string or a list of ONE assistant message, got "
                            f"{len(answer)} message(s) with roles {[m['role'] for m in answer]}")
        try:
            normalize_messages({"messages": prompt + answer})
        except ValueError as e:
            raise UserError(f"{where}: prompt + {key}: {e}") from None
        answers.append(answer)
    if answers[0] == answers[1]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different answers")
    return prompt, answers[0], answers[1]


def render_pair(tokenizer, prompt, chosen, rejected):
    """A PreferencePair from messages: the prompt is rendered once (render_conversation), each answer on its own.
    render_conversation encodes every message separately, so an answer's tokens do not depend on what precedes
    it: the answer is rendered after an empty user turn, whose tokens are then cut off. prompt + answer has the ids
    of render_conversation(prompt + answer) and its mask on the answer; the prompt (earlier assistant turns
    included) is never supervised: only the answers differ between chosen and rejected (tests/test_dpo.py)."""
    prompt_ids, _ = tokenizer.render_conversation({"messages": prompt}, max_tokens=None)
    empty_user = [{"role": "user", "content": ""}]
    cut = len(tokenizer.render_conversation({"messages": empty_user}, max_tokens=None)[0])
    answers = []
    for answer in (chosen, rejected):
        ids, mask = tokenizer.render_conversation({"messages": empty_user + answer}, max_tokens=None)
        answers.append((ids[cut:], mask[cut:]))
    return PreferencePair(prompt_ids, *answers)


def load_preferences(paths, tokenizer):
    """Every row of the preference files (nanochat.data_files.read_rows: JSONL, JSON, Parquet, CSV, Arrow,
    save_to_disk folders, hub names), parsed and rendered -> list of PreferencePair, in file order. A bad row is a
    UserError naming `file:line` (the JSON Lines line; the row number where the format has no lines)."""
    pairs = []
    for path in paths:
        rows, lines = read_rows(path, line_numbers=True)
        if not rows:
            raise UserError(f"{path}: no rows; a preference file needs prompt/chosen/rejected rows")
        for i, row in enumerate(rows):
            where = f"{path}:{lines[i] if lines else i + 1}"
            pairs.append(render_pair(tokenizer, *parse_preference_row(row, where)))
    return pairs


def fits(pair, row_capacity):
    """Both conversations of the pair have at least 2 and at most row_capacity tokens (DPO compares whole
    answers, so a pair too long is dropped rather than truncated)."""
    return all(2 <= len(pair.sequence(w)[0]) <= row_capacity for w in (0, 1))


# ----------------------------------------------------------------------------------------------------------
# The plan of the run's data (the step is the state) and collation


def step_pair_indices(step, micro_step, rank, world_size, device_batch_size, grad_accum_steps, num_pairs):
    """Indices of the pairs in micro-batch `micro_step` of `rank` at optimizer `step`. Step s covers pairs
    s * P ... s * P + P - 1 (modulo num_pairs: epochs follow each other), P = device_batch_size * world_size *
    grad_accum_steps; micro-step m of rank r takes the slice (m * world_size + r) * device_batch_size, so the
    pairs of a step are the same for any split into ranks and micro-steps."""
    pairs_per_step = device_batch_size * world_size * grad_accum_steps
    start = step * pairs_per_step + (micro_step * world_size + rank) * device_batch_size
    return [(start + j) % num_pairs for j in range(device_batch_size)]


def rank_batch_indices(num_pairs, batch_size, rank=0, world_size=1):
    """This rank's share of num_pairs pairs (the held-out set), in batches of at most batch_size: batch k of the
    whole set (pairs k * batch_size ...) goes to rank k % world_size, so ranks may hold different numbers."""
    return [list(range(start, min(start + batch_size, num_pairs)))
            for start in range(rank * batch_size, num_pairs, batch_size * world_size)]


class DPOBatch(NamedTuple):
    """One micro-batch of pairs on the CPU. Sequence 2j is pair j's chosen conversation, 2j + 1 its rejected;
    seq_index[b, t] is the sequence whose token targets[b, t] is (-1 where there is no target); ref holds the
    reference log-probs of the 2 * num_pairs sequences (zeros when not known yet)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor | None
    seq_index: torch.Tensor
    ref: torch.Tensor
    num_pairs: int


def collate_pairs(pairs, packing, row_capacity, pad_id, ref=None):
    """A DPOBatch of `pairs` (PreferencePair list; every sequence at most row_capacity tokens, see fits):
    packing "pad": 2 * len(pairs) rows padded to the longest (collate_sft); "bestfit": the sequences best-fit
    into as few rows of row_capacity tokens as hold them (pack_best_fit / collate_packed, per-sequence
    segments). ref: (len(pairs), 2) reference log-probs [chosen, rejected] or None."""
    assert packing in PACKINGS, f"packing must be one of {PACKINGS}, got {packing!r}"
    sequences = [pair.sequence(w) for pair in pairs for w in (0, 1)]
    if packing == "pad":
        inputs, targets = collate_sft(sequences, pad_id)
        segment_ids = None
        seq_index = torch.arange(len(sequences)).unsqueeze(1).expand_as(targets).clone()
    else:
        rows = pack_best_fit([len(ids) for ids, _ in sequences], row_capacity)  # asserts every sequence fits
        inputs, targets, segment_ids = collate_packed([[sequences[i] for i in row] for row in rows], row_capacity,
                                                      pad_id)
        row_seqs = torch.tensor([[-1] + row + [-1] * (len(sequences) - len(row)) for row in rows])
        seq_index = torch.gather(row_seqs, 1, segment_ids)  # segment j + 1 of row r is sequence rows[r][j]
    seq_index = torch.where(targets == -1, torch.full_like(seq_index, -1), seq_index)
    ref = torch.zeros(len(pairs), 2, dtype=torch.float64) if ref is None else torch.as_tensor(ref, dtype=torch.float64)
    return DPOBatch(inputs, targets, segment_ids, seq_index, ref.reshape(-1), len(pairs))


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities and the loss


def sequence_logps(token_losses, seq_index, num_sequences):
    """Per-sequence sums of log-probabilities: -token_losses (per-target cross-entropy, (B, T)) summed over the
    positions where seq_index (B, T) names the sequence (-1: none). -> float32 (num_sequences,), differentiable."""
    valid = seq_index >= 0
    out = torch.zeros(num_sequences, dtype=torch.float32, device=token_losses.device)
    return out.index_add(0, seq_index[valid], -token_losses[valid].float())


def batch_logps(model, batch, device):
    """The model's per-sequence log-probs (2 * num_pairs,) of a DPOBatch: one forward, per-token losses."""
    inputs, targets, seq_index = (t.to(device) for t in (batch.inputs, batch.targets, batch.seq_index))
    segment_ids = None if batch.segment_ids is None else batch.segment_ids.to(device)
    token_losses = model(inputs, targets, loss_reduction="none", segment_ids=segment_ids)
    return sequence_logps(token_losses, seq_index, 2 * batch.num_pairs)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))). -> (losses, chosen_rewards,
    rejected_rewards), each (num_pairs,); the implicit rewards are beta * (pi - ref), detached."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metric_sums(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """Sums over pairs of METRIC_KEYS (accuracy: the chosen answer's reward strictly higher), as floats."""
    margins = chosen_rewards - rejected_rewards
    values = (losses.detach(), (margins > 0).float(), margins, chosen_logps.detach(), rejected_logps.detach())
    return [float(v.sum()) for v in values]


def _pair_forward(model, batch, beta, device):
    """(losses, metric sums) of one micro-batch."""
    logps = batch_logps(model, batch, device)
    ref = batch.ref.to(device=device, dtype=logps.dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta)
    return losses, pair_metric_sums(losses, chosen_rewards, rejected_rewards, logps[0::2], logps[1::2])


class DPOStepResult(NamedTuple):
    loss: float  # mean DPO loss per pair of the step (all micro-batches, all ranks)
    skip: str | None  # why the optimizer step must not be taken (the same on every rank), or None
    metrics: dict  # METRIC_KEYS, means over the step's pairs; "pairs": their number


def dpo_accumulate_step(model, micro_batches, beta, device, world_size=1, rank=0, autocast=contextlib.nullcontext):
    """Forward and backward of one optimizer step's micro-batches (DPOBatch list) on this rank. The loss is the
    mean per pair over the whole step: each micro-batch's summed pair losses are scaled by
    micro_batch_loss_scale's per-unit rule with pairs as the unit (world_size / pairs of the step; the
    optimizer averages gradients over ranks). Out of memory or a non-finite loss on any rank skips the step on
    every rank, leaving no gradient (sft.backward_micro_batches)."""
    device = torch.device(device)
    step_pairs = all_reduce_values([sum(b.num_pairs for b in micro_batches)], "sum", device, world_size)[0]

    def loss_fn(batch):
        with autocast():
            losses, batch_sums = _pair_forward(model, batch, beta, device)
        return losses.sum() * micro_batch_loss_scale("token", batch.num_pairs, step_pairs, world_size,
                                                     len(micro_batches)), batch_sums

    sums, reason = backward_micro_batches(model, micro_batches, loss_fn, len(METRIC_KEYS), device, world_size, rank)
    metrics = {k: v / step_pairs for k, v in zip(METRIC_KEYS, sums)}
    return DPOStepResult(metrics["loss"], reason, {**metrics, "pairs": int(step_pairs)})


@torch.no_grad()
def evaluate_dpo(model, batches, beta, device, world_size=1, autocast=contextlib.nullcontext):
    """METRIC_KEYS as means over every pair of `batches` (this rank's DPOBatch list) and all ranks (one
    all-reduce at the end; ranks may hold different numbers of batches)."""
    sums, count = [0.0] * len(METRIC_KEYS), 0
    for batch in batches:
        with autocast():
            _, batch_sums = _pair_forward(model, batch, beta, device)
        sums = [a + b for a, b in zip(sums, batch_sums)]
        count += batch.num_pairs
    *sums, count = all_reduce_values([*sums, count], "sum", device, world_size)
    return {k: v / count for k, v in zip(METRIC_KEYS, sums)} if count else {}


@torch.no_grad()
def reference_logps(model, pairs, batch_size, collate, device, rank=0, world_size=1,
                    autocast=contextlib.nullcontext):
    """The frozen model's log-probs of every pair: (len(pairs), 2) float64 [chosen, rejected]. Rank r computes
    pairs r, r + world_size, ... in batches of batch_size (collate(pairs) -> DPOBatch) and one all-reduce
    gives every rank the whole table."""
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    mine = list(range(rank, len(pairs), world_size))
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        with autocast():
            logps = batch_logps(model, collate([pairs[i] for i in indices]), device)
        table[indices] = logps.double().cpu().view(-1, 2)
    if world_size > 1:
        table = torch.tensor(all_reduce_values(table.view(-1).tolist(), "sum", device, world_size),
                             dtype=torch.float64).view(-1, 2)
    return table


# ----------------------------------------------------------------------------------------------------------
# The reference cache beside the run


def reference_fingerprint(pairs, source):
    """sha256 of what the reference log-probs depend on: the pairs' tokens (in order) and the source
    checkpoint (a description string: folder, step, dtype, packing)."""
    h = hashlib.sha256(source.encode())
    for pair in pairs:
        h.update(json.dumps([pair.prompt, pair.chosen, pair.rejected]).encode())
    return h.hexdigest()


def save_reference(path, fingerprint, tables):
    """Write the reference log-probs ({split: (N, 2) tensor}) and their fingerprint as JSON, atomically
    (floats written by repr read back bit-exact)."""
    data = {"fingerprint": fingerprint, **{k: v.tolist() for k, v in tables.items()}}
    atomic_write_text(path, json.dumps(data))


def load_reference(path, fingerprint):
    """{split: (N, 2) float64 tensor} from save_reference's file; a UserError when it is missing or was made
    for other data or another source checkpoint."""
    if not os.path.isfile(path):
        raise UserError(f"cannot resume: the reference log-probs {path} are missing (they are written before the "
                        f"first step); start a new run (resume = 0)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume: {path} is not readable reference log-probs ({e}); start a new run") from None
    if data.get("fingerprint") != fingerprint:
        raise UserError(f"cannot resume: {path} holds reference log-probs of other data or another source "
                        f"checkpoint; resume with the options of that run, or start a new run (resume = 0)")
    return {k: torch.tensor(v, dtype=torch.float64).view(-1, 2) for k, v in data.items() if k != "fingerprint"}
