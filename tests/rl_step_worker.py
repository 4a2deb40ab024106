"""Worker for tests/test_rl.py: nanochat.rl.pg_accumulate_step on a tiny GPT under
`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/rl_step_worker.py OUT` (gloo).
A fixed set of 4 groups of rollouts (prompt + completion, mask, advantage) is split as chat_rl splits questions
(rank_example_indices); each rank trains on its groups in micro-batches of 2 rows; rank 0 saves to OUT
(torch.save): the rank-averaged gradient, the gradient of all the rollouts in one process, the losses and totals,
and which ranks skipped (and kept any gradient) when rank 1's loss is NaN or rank 1 runs out of memory."""

import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPTConfig, random_model
from nanochat.rl import group_advantages, pg_accumulate_step, rank_example_indices, rollout_micro_batches

VOCAB = 64


class Faulty(torch.nn.Module):
    """The model, but its loss is NaN or it raises a CUDA out-of-memory error (a simulated fault)."""

    def __init__(self, model, fault):
        super().__init__()
        self.model, self.fault = model, fault

    def forward(self, *args, **kwargs):
        if self.fault == "oom":
            raise torch.cuda.OutOfMemoryError("simulated CUDA out of memory")
        loss = self.model(*args, **kwargs)
        return loss * float("nan") if self.fault == "nan" else loss


def groups(num_groups=4, num_samples=3, seed=1):
    """Per group: rows (prompt + completion), masks (0 on the prompt and a forced token), advantages."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_groups):
        prompt = torch.randint(0, VOCAB, (3 + i,), generator=g).tolist()
        rows, masks, rewards = [], [], []
        for j in range(num_samples):
            completion = torch.randint(0, VOCAB, (2 + (i + 2 * j) % 5,), generator=g).tolist()
            rows.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
            masks[-1][len(prompt)] = 0 if j == 1 else 1  # a tool-forced token: never a target
            rewards.append(float((i + j) % 2))
        out.append((rows, masks, group_advantages(rewards, "zscore")))
    return out


def flatten(selected):
    rows = [r for rows, _, _ in selected for r in rows]
    masks = [m for _, masks, _ in selected for m in masks]
    advantages = [a for _, _, advs in selected for a in advs]
    return rollout_micro_batches(rows, masks, advantages, 2, pad_id=0)


def grads_of(model):
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def main(out_path):
    _, rank, _, world_size, device = compute_init("cpu")
    data = groups()
    model = random_model(GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    mine = flatten([data[i] for i in rank_example_indices(0, 2, len(data), rank, world_size)])
    result = pg_accumulate_step(model, mine, "token", device, world_size, rank)
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world_size  # what the optimizers do with the gradients
    model.zero_grad(set_to_none=True)
    reference = pg_accumulate_step(model, flatten(data), "token", device)  # one process, every rollout
    reference_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    skipped = {}
    for fault in ("nan", "oom"):
        faulty = Faulty(model, fault if rank == 1 else None)
        faulty_result = pg_accumulate_step(faulty, mine, "token", device, world_size, rank)
        left = [n for n, p in model.named_parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (faulty_result.skip, left))
        skipped[fault] = gathered
    if rank == 0:
        torch.save({"grads": grads, "reference": reference_grads, "loss": result.loss, "reference_loss": reference.loss,
                    "totals": result.totals, "reference_totals": reference.totals, "skipped": skipped}, out_path)
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
