"""
DistAdamW: AdamW over several processes, ZeRO-2 style (as nanochat), for the embedding and lm_head.

Gradient synchronisation lives HERE, inside step(), not in a DDP wrapper: each parameter's gradient is
reduce-scattered (averaged) along dim 0, each rank keeps Adam moments only for its 1/world_size slice and
updates that slice, then the slices are all-gathered back into the full parameter. Sharding the moments
cuts optimizer memory by world_size (the embedding and lm_head are the largest matrices), and keeping all
sync in the optimizers lets a training loop call loss.backward() per micro-step with no DDP no_sync dance.
On NCCL: reduce_scatter_tensor(op=AVG) + all_gather_into_tensor. gloo (CPU tests) lacks AVG/reduce-scatter,
so there: all_reduce(SUM) / world_size, take the local slice, all_gather a list: same math, more traffic.
A parameter whose dim 0 is not divisible by world_size is not sharded (averaged gradient, full update on
every rank). With world_size == 1 this is plain AdamW (tested against torch.optim.AdamW).

Tests: .venv/bin/python -m pytest tests/test_optim.py
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import dist_rank_world


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, rank=None, world_size=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if rank is None or world_size is None:
            rank, world_size = dist_rank_world()
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def _adamw_(p, grad, group, state):
        """One AdamW step on tensor p (a parameter or a slice view of one), same math as torch.optim.AdamW."""
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    @torch.no_grad()
    def step(self):
        rank, ws = self.rank, self.world_size
        nccl = ws > 1 and dist.get_backend() == "nccl"
        # 1) launch the gradient reductions
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                sharded = ws > 1 and p.size(0) % ws == 0
                work = None
                if ws == 1:
                    out = grad
                elif sharded and nccl:
                    out = torch.empty_like(grad.chunk(ws)[0])
                    work = dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.AVG, async_op=True)
                else:
                    out = grad
                    work = dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True)
                pending.append((group, p, sharded, out, work))
        # 2) update this rank's slice, then all-gather the slices
        gathers = []
        for group, p, sharded, out, work in pending:
            if work is not None:
                work.wait()
                if not (sharded and nccl):  # reduce_scatter averaged (AVG); all_reduce summed (SUM, any backend)
                    out.div_(ws)
            if not sharded:
                self._adamw_(p, out, group, self.state[p])
                continue
            rows = p.size(0) // ws
            grad = out if nccl else out[rank * rows:(rank + 1) * rows]
            p_slice = p.data[rank * rows:(rank + 1) * rows]
            self._adamw_(p_slice, grad, group, self.state[p])  # moments of this rank's slice only (ZeRO-2)
            if nccl:
                gathers.append(dist.all_gather_into_tensor(p.data, p_slice, async_op=True))
            else:
                gathers.append(dist.all_gather(list(p.data.chunk(ws)), p_slice.clone(), async_op=True))
        for work in gathers:
            work.wait()
