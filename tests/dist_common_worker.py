"""Run under torchrun (2 CPU processes): compute_init with gloo, an all-reduce, results to a JSON file."""

import json
import os
import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init, dist_rank_world

out_dir = sys.argv[1]
ddp, rank, local_rank, world_size, device = compute_init("cpu")
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
result = dict(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, device=str(device),
              backend=dist.get_backend(), allreduce=t.item(), dist_rank_world=list(dist_rank_world()))
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
compute_cleanup()
