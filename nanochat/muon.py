"""
Muon: momentum + Newton-Schulz orthogonalisation of the update, for the 2-D matrices of the transformer blocks
(Keller Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024; as used in nanochat).

- `zeropower_via_newtonschulz5(G, steps=5)`: quintic Newton-Schulz iteration, coefficients
  (3.4445, -4.7750, 2.0315), run in bf16; maps G to (approximately) U V^T of its SVD.
- `Muon`: single process. Nesterov momentum 0.95, update scaled by sqrt(max(1, rows / cols)). The matrices of
  one shape are orthogonalised as one batch (batched matmuls; foreach momentum and parameter updates).
- `DistMuon`: several processes, same math. Gradient synchronisation lives HERE, inside step(), not in a
  DDP wrapper (as nanochat): gradients of each block of world_size same-shape matrices are reduce-scattered
  (averaged), each rank orthogonalises the one matrix it owns, and the updated matrices are all-gathered.
  Doing it in the optimizer lets each rank run Newton-Schulz on 1/world_size of the matrices instead of all
  of them, and needs no second copy of the gradients that DDP's buckets would hold. On NCCL this uses
  reduce_scatter(op=AVG); gloo (CPU tests) has no AVG/reduce_scatter, so there the gradients are
  all_reduce(SUM)-ed, divided by world_size and each rank takes its own slice: same numbers, more traffic.

Tests: .venv/bin/python -m pytest tests/test_optim.py
"""

import torch
import torch.distributed as dist

from nanochat.common import dist_rank_world

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic, tuned for fast convergence of singular values near 1 (K. Jordan)


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalise G (..., rows, cols) in bf16 with a quintic Newton-Schulz iteration; leading
    dimensions are a batch of same-shape matrices, orthogonalised together (one batched matmul per product
    instead of one per matrix). The result has singular values in roughly [0.7, 1.2] rather than exactly 1,
    which works as well in practice."""
    assert G.ndim >= 2
    a, b, c = NS_COEFFS
    # bf16 on GPUs (fast there); fp32 elsewhere: CPUs without bf16 matmul units run bf16 ~50x slower than fp32
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X^T is the smaller Gram matrix
        X = X.mT
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # (batch, rows, cols): baddbmm below wants 3-D
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b * A + c * A @ A, the scaling fused into the matmul
        X = torch.baddbmm(X, B, X, beta=a)  # a * X + B @ X
    X = X.reshape(*batch_shape, *X.shape[-2:])
    if transposed:
        X = X.mT
    return X


def muon_updates(grads, momentum_buffers, momentum, nesterov=True, ns_steps=5):
    """The Muon directions of same-shape matrices, stacked (n, rows, cols); updates the momentum buffers in
    place. Each matrix is orthogonalised on its own, as a batch of one Newton-Schulz iteration."""
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
    g = torch._foreach_lerp(grads, momentum_buffers, momentum) if nesterov else momentum_buffers
    g = zeropower_via_newtonschulz5(torch.stack(g), steps=ns_steps)
    scale = max(1.0, g.size(-2) / g.size(-1)) ** 0.5  # tall matrices: keep the per-element RMS comparable
    return g * scale


def muon_update(grad, momentum_buffer, momentum, nesterov=True, ns_steps=5):
    """The Muon direction for one matrix (updates momentum_buffer in place)."""
    return muon_updates([grad], [momentum_buffer], momentum, nesterov, ns_steps)[0]


def _shape_groups(params, defaults):
    """One param group per matrix shape (DistMuon stacks same-shape matrices); dict groups pass through."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    shapes = []
    for p in params:
        assert p.ndim == 2, f"Muon is for 2-D matrices, got shape {tuple(p.shape)}"
        if p.shape not in shapes:
            shapes.append(p.shape)
    return [dict(params=[p for p in params if p.shape == s]) for s in shapes]


class Muon(torch.optim.Optimizer):
    """Single-process Muon. lr is the step size of the orthogonalised update (0.02 in nanochat)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(_shape_groups(params, defaults), defaults)

    def _apply(self, p, grad, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        update = muon_update(grad, state["momentum_buffer"], group["momentum"], group["nesterov"], group["ns_steps"])
        if group["weight_decay"] > 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])

    @torch.no_grad()
    def step(self):
        # the matrices of one shape go through Newton-Schulz as one batch, and their momentum and parameter
        # updates are foreach ops: on CPU, one Python-level op per matrix cost more than the arithmetic
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for params in by_shape.values():
                bufs = []
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                    bufs.append(self.state[p]["momentum_buffer"])
                updates = muon_updates([p.grad for p in params], bufs, group["momentum"], group["nesterov"],
                                       group["ns_steps"])
                if group["weight_decay"] > 0:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(updates.to(params[0].dtype).unbind(0)), alpha=-group["lr"])


class DistMuon(Muon):
    """Muon over world_size processes; averages gradients across ranks inside step() (see module docstring).
    Must be stepped on every rank; every rank ends with identical parameters."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 rank=None, world_size=None):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                         weight_decay=weight_decay)
        if rank is None or world_size is None:
            rank, world_size = dist_rank_world()
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def step(self):
        rank, ws = self.rank, self.world_size
        if ws == 1:
            return super().step()
        nccl = dist.get_backend() == "nccl"
        # 1) launch the gradient reductions: one per block of ws same-shape matrices; rank r owns block[r]
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), ws):
                block = params[base:base + ws]
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block]
                grads += [torch.zeros_like(grads[0])] * (ws - len(grads))  # pad the last block
                if nccl:
                    out = torch.empty_like(grads[0])
                    work = dist.reduce_scatter(out, grads, op=dist.ReduceOp.AVG, async_op=True)
                else:  # gloo: all_reduce(SUM) the stacked block, divide, take our slice
                    out = torch.stack(grads)
                    work = dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True)
                pending.append((group, block, out, work))
        # 2) update the owned matrix of each block, then all-gather the block's matrices
        gathers = []
        for group, block, out, work in pending:
            work.wait()
            grad = out if nccl else out[rank].div_(ws)
            if rank < len(block):
                p = block[rank]
                self._apply(p, grad, group)
                src = p.data
            else:
                src = torch.empty_like(block[0])  # padding slot: nobody owns it
            dst = [p.data for p in block] + [torch.empty_like(block[0]) for _ in range(ws - len(block))]
            if not nccl:
                src = src.clone()  # gloo: don't alias the input with one of the outputs
            gathers.append(dist.all_gather(dst, src, async_op=True))
        for work in gathers:
            work.wait()
