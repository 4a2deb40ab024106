"""Worker for tests/test_optim.py: 3 training steps of a tiny GPT with setup_optimizers() on a fixed global
batch, split across ranks. Run alone (1 process: Muon + torch AdamW) or under
`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT` (gloo:
DistMuon + DistAdamW). A third argument names an architecture preset (gpt.ARCH_PRESETS; default the October
one). Rank 0 saves the final parameters and per-step losses to OUT (torch.save)."""

import sys

import torch
import torch.distributed

from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import ARCH_PRESETS, GPT, GPTConfig


def main(out_path, num_steps=int(sys.argv[2]) if len(sys.argv) > 2 else 3,
         arch=sys.argv[3] if len(sys.argv) > 3 else "nanochat-2025"):
    ddp, rank, _, world_size, device = compute_init("cpu")
    parts = dict(ARCH_PRESETS[arch], short_window=8) if arch != "nanochat-2025" else {}  # windows < sequence_len
    # 3 layers with backout: with 2, its layer (n_layer // 2) is the last, and norm((1 - b) x) has no gradient in b
    n_layer = 3 if parts.get("backout") else 2
    config = GPTConfig(sequence_len=32, vocab_size=128, n_layer=n_layer, n_head=2, n_kv_head=1, n_embd=64, **parts)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # small random output projections: at the zero init the first steps see (near-)zero
        for name, p in model.named_parameters():  # gradients, which normalised updates turn into rounding noise
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, 0.02)
            elif name == "smear_lambda":  # 0 at init: its gate would get no gradient
                p.fill_(0.5)
    init_params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizers = model.setup_optimizers()
    kinds = [type(opt).__name__ for opt in optimizers]
    g = torch.Generator().manual_seed(1)
    global_batch = 4
    data = torch.randint(0, config.vocab_size, (num_steps, global_batch, config.sequence_len + 1), generator=g)
    per_rank = global_batch // world_size
    losses = []
    for step in range(num_steps):
        rows = data[step, rank * per_rank:(rank + 1) * per_rank]
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()  # the optimizers average gradients across ranks inside step()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world_size > 1:  # the loss of the global batch, for comparison with one process
            torch.distributed.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    if rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "init": init_params, "kinds": kinds, "world_size": world_size, "losses": losses}, out_path)
    compute_cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
