"""Worker for tests/test_sft.py: nanochat.sft.accumulate_step on a tiny GPT under
`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sft_step_worker.py OUT` (gloo).
Each rank takes its share of a fixed global batch of 4 conversations as 2 micro-batches of 1; rank 0 saves to
OUT (torch.save): the rank-averaged gradient of that step, the gradient of the whole batch computed in one
process, which ranks skipped when one rank's loss is NaN or one rank runs out of memory, and the validation loss
by source (loss_eval.evaluate_sft_loss) on 2 ranks and in one process."""

import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_sft_loss
from nanochat.sft import BatchSettings, accumulate_step, plan_epoch, render_share, sft_batches

VOCAB = 128


def tiny_gpt(device):
    config = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # small random output projections (not zeros), so every parameter gets a gradient
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, 0.02)
    return model


def conversations(n, seed=1):
    """(ids, mask) pairs of different lengths and supervised shares."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + 5 * i
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        mask = [0] * (length // 2) + [1] * (length - length // 2)
        out.append((ids, mask))
    return out


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

    def estimate_flops(self, seq_len=None):  # the model's, as torch.compile's wrapper forwards it too
        return self.model.estimate_flops(seq_len)


def batches(data, batch_size, rank=0, world_size=1, locate=None):
    """The pad-mode micro-batches of (ids, mask) pairs for one rank: planned, then materialised (nanochat.sft)."""
    settings = BatchSettings("pad", batch_size, row_capacity=64)
    share = render_share(data, lambda c: c, settings, rank, world_size, locate)
    return sft_batches(data, lambda c: c, share, plan_epoch(share.lengths, settings), settings)


def grads_of(model):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def main(out_path):
    _, rank, _, world_size, device = compute_init("cpu")
    data = conversations(4)
    model = tiny_gpt(device)
    stream = batches(data, 1, rank, world_size)
    micro_batches = [next(stream) for _ in range(2)]
    result = accumulate_step(model, micro_batches, "token", device, world_size, rank)
    grads = grads_of(model)
    for g in grads.values():
        dist.all_reduce(g)
        g /= world_size  # what the optimizers do with the gradients
    model.zero_grad(set_to_none=True)
    whole = next(batches(data, 4))
    reference = accumulate_step(model, [whole], "token", device)  # one process, one big batch
    reference_grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    skipped = {}
    for fault in ("nan", "oom"):
        faulty = Faulty(model, fault if rank == 1 else None)
        faulty_result = accumulate_step(faulty, micro_batches, "token", device, world_size, rank)
        left = [n for n, p in model.named_parameters() if p.grad is not None]
        skipped[fault] = (faulty_result.skip, left)
        model.zero_grad(set_to_none=True)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, skipped[fault])
        skipped[fault] = gathered
    by_parity = lambda i: (i % 2, i)  # noqa: E731  (rank 0 holds source 0 only, rank 1 source 1)
    val = evaluate_sft_loss(model, batches(data, 2, rank, world_size, by_parity), 1, "token", device, world_size,
                            rank, num_sources=2)
    val_reference = evaluate_sft_loss(model, batches(data, 4, locate=by_parity), 1, "token", device, num_sources=2)
    if rank == 0:
        torch.save({"val": tuple(val), "val_reference": tuple(val_reference),
                    "grads": grads, "reference": reference_grads, "loss": result.loss,
                    "reference_loss": reference.loss, "totals": result.totals, "skipped": skipped}, out_path)
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
