"""Worker for tests/test_dpo.py: nanochat.dpo.dpo_accumulate_step on a tiny GPT under
`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dpo_step_worker.py OUT` (gloo). Under
each packing (pad, bestfit) each rank takes its micro-batches of a step of 4 pairs (step_pair_indices: 2
micro-steps of 1 pair); rank 0 saves to OUT (torch.save), per packing: the rank-averaged gradient and metrics of
that step, the same step computed in one process as one big batch, and which ranks skipped when rank 1 alone
gets a NaN or an out-of-memory error; and the reference log-probs and held-out metrics computed on 2 ranks and
on one (reference_and_eval)."""

import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init
from nanochat.dpo import (PreferencePair, collate_pairs, dpo_accumulate_step, evaluate_dpo, rank_batch_indices,
                          reference_logps, step_pair_indices)
from sft_step_worker import VOCAB, Faulty, grads_of, tiny_gpt


def random_pairs(n, seed=1):
    """Pairs of random tokens: prompts of different lengths, answers of different lengths, masks as rendered
    answers have them (the first token, <|assistant_start|>, unsupervised)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(0, VOCAB, (3 + i,), generator=g).tolist()
        answers = []
        for length in (4 + i % 3, 7 + 2 * i):
            ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
            answers.append((ids, [0] + [1] * (length - 1)))
        pairs.append(PreferencePair(prompt, *answers))
    return pairs


def random_reference(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return -20.0 - 10.0 * torch.rand(n, 2, generator=g, dtype=torch.float64)


def step_batches(pairs, reference, packing, rank, world_size, device_batch_size, grad_accum):
    out = []
    for m in range(grad_accum):
        idx = step_pair_indices(0, m, rank, world_size, device_batch_size, grad_accum, len(pairs))
        out.append(collate_pairs([pairs[i] for i in idx], packing, 64, 0, reference[idx]))
    return out


def step_results(model, packing, rank, world_size, device):
    """This step on 2 ranks (rank-averaged gradient), in one process as one big batch, and with a fault on
    rank 1 alone."""
    pairs, reference = random_pairs(4), random_reference(4)
    micro_batches = step_batches(pairs, reference, packing, rank, world_size, 1, 2)
    result = dpo_accumulate_step(model, micro_batches, 0.5, device, world_size, rank)
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world_size  # what the optimizers do with the gradients
    model.zero_grad(set_to_none=True)
    whole = step_batches(pairs, reference, packing, 0, 1, 4, 1)
    single = dpo_accumulate_step(model, whole, 0.5, device)  # one process, one big batch
    single_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    skipped = {}
    for fault in ("nan", "oom"):
        faulty = Faulty(model, fault if rank == 1 else None)
        faulty_result = dpo_accumulate_step(faulty, micro_batches, 0.5, device, world_size, rank)
        left = [n for n, p in model.named_parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (faulty_result.skip, left))
        skipped[fault] = gathered
    return {"grads": grads, "single_grads": single_grads, "metrics": result.metrics, "single_metrics": single.metrics,
            "skipped": skipped}


def reference_and_eval(model, rank, world_size, device):
    """reference_logps split over the ranks and on one, and evaluate_dpo on 5 pairs in batches of 2 split over
    the ranks (rank 0 gets 2 batches, rank 1 one) and on one."""
    pairs = random_pairs(5)
    collate = lambda p, ref=None: collate_pairs(p, "pad", 64, 0, ref)  # noqa: E731
    split = reference_logps(model, pairs, 2, collate, device, rank, world_size)
    alone = reference_logps(model, pairs, 2, collate, device)
    reference = random_reference(5)
    mine = [collate([pairs[i] for i in idx], reference[idx]) for idx in rank_batch_indices(5, 2, rank, world_size)]
    evaluated = evaluate_dpo(model, mine, 0.5, device, world_size)
    evaluated_alone = evaluate_dpo(model, [collate(pairs, reference)], 0.5, device)
    return {"reference": split, "reference_alone": alone, "eval": evaluated, "eval_alone": evaluated_alone}


def main(out_path):
    _, rank, _, world_size, device = compute_init("cpu")
    model = tiny_gpt(device)
    results = {packing: step_results(model, packing, rank, world_size, device) for packing in ("pad", "bestfit")}
    results["reference_and_eval"] = reference_and_eval(model, rank, world_size, device)
    if rank == 0:
        torch.save(results, out_path)
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
