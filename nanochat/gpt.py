"""
The GPT model (nanochat's architecture) and its optimizer set-up.

- token embedding -> blocks (x + attn(norm(x)), x + mlp(norm(x))) -> norm -> untied lm_head -> softcap 15
- parameter-free RMSNorm, rotary position embeddings, RMSNorm on queries and keys (QK-norm)
- grouped-query / multi-query attention (n_kv_head <= n_head), MLP 4x wide with ReLU^2, no biases
- output projections and lm_head start at zero (loss at init is exactly ln(vocab_size))
- packed sequences: `segment_ids` (B, T) make attention block-diagonal causal and restart rotary positions
  per segment (flex_attention with a block mask on CUDA, SDPA with an explicit boolean mask elsewhere); the
  mask is built once per batch and shared by every layer
- the loss (forward with targets) is the cross-entropy of the softcapped logits, chunked where the step's fp32
  (B * T, vocab) logits would be large (over loss_chunk_min_bytes: then they are never held whole;
  chunked_cross_entropy), plain where they are small (loss_chunk_rows; loss_chunk_size = 0: always plain)

Build on the meta device, then allocate and initialise:
    with torch.device("meta"): model = GPT(config)
    model.to_empty(device=device); model.init_weights()

Tests: .venv/bin/python -m pytest tests/test_gpt.py
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanochat.adamw import DistAdamW
from nanochat.common import UserError, dist_rank_world
from nanochat.config import ConfigError
from nanochat.muon import DistMuon, Muon


class ContextLengthError(UserError, ValueError):
    """A sequence longer than the model's rotary table (a prompt or conversation too long for the model)."""


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768


def config_from_depth(depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64):
    """The depth dial: n_embd = aspect_ratio * depth, heads of (about) head_dim, as many kv heads as heads."""
    n_embd = depth * aspect_ratio
    n_head = max(1, (n_embd + head_dim - 1) // head_dim)  # ceil: a model narrower than one head gets one head
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ConfigError(f"depth ({depth}), aspect_ratio ({aspect_ratio}) and head_dim ({head_dim}) must be >= 1")
    if n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:  # user input (depth/aspect_ratio/head_dim): no assert
        raise ConfigError(f"width depth * aspect_ratio = {depth} * {aspect_ratio} = {n_embd} does not split into "
                          f"{n_head} heads of an even size (head_dim={head_dim}); choose aspect_ratio and head_dim "
                          f"so that the width is a multiple of an even head_dim")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd)


def norm(x):
    """Parameter-free RMSNorm over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """x (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Rotates the two halves of the head dim."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def segment_positions(segment_ids):
    """Position of each token within its (contiguous) segment: index - index of the segment's first token."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


def segment_mask(segment_ids):
    """(B, 1, T, T) boolean: query t attends to key s iff s <= t and both are in the same segment."""
    T = segment_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # flex_attention is only fast when compiled; compiled lazily, on first CUDA use (no import-time work)
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, block_mask, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention  # imported on use: it pulls in torch._dynamo

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)  # part of the model's graph
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)  # eager model
    # CPU, eager: forward only (torch has no flex backward on CPU); the tests check the CUDA path's masking
    # against the SDPA boolean mask with it
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def flex_segment_block_mask(segment_ids):
    """Block mask for flex_attention: causal within equal segment ids. Built once per batch (GPT.forward)
    and shared by every layer; blocks of 128 x 128 that are fully masked are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segment_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=segment_ids.device)


@functools.lru_cache(maxsize=1)
def _eager_flex_segment_block_mask():
    # the block mask is built eagerly, outside a compiled model's graph (one graph break at the start of
    # forward; the graph takes the BlockMask as input); wrapped on first use, so that importing this module
    # does not import torch._dynamo
    return torch.compiler.disable(flex_segment_block_mask)


def segment_attention(segment_ids, use_flex):
    """The attention masking of a packed batch, built once per batch and shared by all layers:
    ("flex", BlockMask) for flex_attention (CUDA), or ("sdpa", (B, 1, T, T) boolean mask) elsewhere."""
    if use_flex:
        return "flex", _eager_flex_segment_block_mask()(segment_ids)
    return "sdpa", segment_mask(segment_ids)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of softcap * tanh(z / softcap) (z: (N, V) fp32 logits, targets: (N,)), 0 where the
    target is ignore_index; the same numbers as F.cross_entropy(softcap * torch.tanh(z / softcap), targets,
    reduction="none"), with a hand-written backward: dz = (softmax - onehot) * (1 - tanh^2) per row's gradient.
    Why: autograd's version makes about eight (N, V) temporaries and as many passes over them (the division, the
    tanh, the product, log_softmax, the one-hot gather and each of their backwards); here the forward keeps two,
    tanh and the softmax, made in place. Measured on CPU, one thread, N = 4096, V = 8192 (bench.model_step's
    shape): forward + backward of the loss after the lm_head matmul took 0.77 s of CPU time with autograd's
    version, 0.45 s with this one (best of 5, a busy machine). The capped logits lie in [-softcap, softcap], so
    exp(logit - softcap) needs no max-subtraction to stay finite."""

    @staticmethod
    def forward(ctx, z, targets, softcap, ignore_index):
        t = torch.div(z, softcap).tanh_()  # the capped logits are softcap * t
        probs = torch.mul(t, softcap).sub_(softcap).exp_()  # exp(logit - softcap): in (e^(-2 softcap), 1]
        sums = probs.sum(dim=1, keepdim=True)
        probs.div_(sums)  # softmax
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        target_logit = softcap * t.gather(1, safe_targets[:, None]).squeeze(1)
        loss = (sums.squeeze(1).log() + softcap - target_logit) * valid  # logsumexp - target logit
        ctx.save_for_backward(t, probs, safe_targets, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # in place only on tensors it made: the saved ones stay intact
        t, probs, safe_targets, valid = ctx.saved_tensors
        row_grad = (grad_loss * valid)[:, None]  # (N, 1): 0 at ignored targets
        dz = torch.mul(probs, row_grad)  # d loss / d logit = (softmax - onehot) * row gradient
        dz.scatter_add_(1, safe_targets[:, None], -row_grad)
        dz.mul_(t.square().neg_().add_(1))  # through softcap * tanh(z / softcap): 1 - tanh^2
        return dz, None, None, None


def chunked_cross_entropy(x, weight, targets, softcap=15.0, reduction="mean", chunk_size=2048, ignore_index=-1):
    """Cross-entropy of the softcapped logits softcap * tanh((x @ weight.T).float() / softcap) against
    `targets`, computed `chunk_size` rows (tokens) at a time so that the full (N, vocab) fp32 logits never
    exist: in the forward pass one chunk's logits are alive at a time, and each chunk is a non-reentrant
    activation checkpoint, so backward recomputes one chunk's logits at a time instead of saving them all.
    The cost is one extra lm_head matmul in the forward of the backward (about 2 * N * n_embd * vocab FLOPs).
    x: (N, C) hidden states after the final norm; weight: (V, C) lm_head weight; targets: (N,) with
    ignore_index where there is no target. reduction: "sum" | "mean" (over non-ignored targets; NaN when
    there are none, as F.cross_entropy) | "none" ((N,), 0 at ignored targets). chunk_size <= 0: one chunk."""
    assert reduction in ("sum", "mean", "none"), f"unknown reduction {reduction!r}"
    N = x.size(0)
    chunk_size = N if chunk_size <= 0 else chunk_size

    def chunk_loss(x_chunk, weight, targets_chunk):
        logits = F.linear(x_chunk, weight).float()
        return SoftcapCrossEntropy.apply(logits, targets_chunk, softcap, ignore_index)

    checkpointed = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and chunk_size < N
    losses = []
    for start in range(0, N, chunk_size):
        args = (x[start:start + chunk_size], weight, targets[start:start + chunk_size])
        if checkpointed:
            losses.append(torch.utils.checkpoint.checkpoint(chunk_loss, *args, use_reentrant=False))
        else:
            losses.append(chunk_loss(*args))
    loss = torch.cat(losses) if len(losses) > 1 else losses[0]  # (N,) fp32: 4 bytes per token, not per logit
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()


def loss_chunk_rows(num_rows, vocab_size, chunk_size, min_bytes):
    """Rows per chunk of the loss for a step of `num_rows` tokens: `chunk_size` when the step's fp32 logits
    (num_rows * vocab_size * 4 bytes) exceed `min_bytes`, else 0 (the plain loss). Chunking saves the memory of
    the logits and their gradient, but recomputes each chunk's logits in backward (one more lm_head matmul and
    softcap): measured on CPU at depth 4, 8 x 512 tokens, vocab 8192 (128 MiB of logits), one thread, forward +
    backward took 3.21 s of CPU time chunked (2048 rows) against 2.64 s plain, so small logits are not worth
    chunking (a busy machine: noisy)."""
    return chunk_size if num_rows * vocab_size * 4 > min_bytes else 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache, seg):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if seg is not None:
            kind, mask = seg
            if kind == "flex":
                y = _flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)  # sees the whole cache
        else:
            # new queries see every cached key, and are causal among themselves
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2 (Primer, So et al. 2021)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, seg):
        x = x + self.attn(norm(x), cos_sin, kv_cache, seg)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    # rows (tokens) per chunk of the loss: 2048 x vocab 65,536 fp32 logits are 0.5 GiB, against 4.3 GiB for the
    # full logits of 8 rows of 2048; each chunk's matmul (2048 x n_embd x vocab) is still large enough to run
    # at full speed
    loss_chunk_size_default = 2048
    # the loss is chunked only when the step's fp32 logits exceed this many bytes (loss_chunk_rows): 256 MiB is
    # 8 x 512 tokens at vocab 16,384 or one row of 1,024 at 65,536; d20's 8 x 2048 x 65,536 (4 GiB) is chunked
    loss_chunk_min_bytes_default = 256 * 2**20

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 10x the training length, so KV-cache generation can run past sequence_len
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)  # (rotary_seq_len, head_dim/2)
        self.register_buffer("sin", sin, persistent=False)
        # Where the loss is computed (forward with targets) and the fp32 logits would take more than
        # loss_chunk_min_bytes, loss_chunk_size rows at a time so that they are never held whole
        # (chunked_cross_entropy); loss_chunk_size = 0: always all at once (the plain loss).
        self.loss_chunk_size = self.loss_chunk_size_default
        self.loss_chunk_min_bytes = self.loss_chunk_min_bytes_default
        self.use_flex = None  # packed rows: flex_attention (True) or SDPA + boolean mask (False); None: on CUDA

    def _precompute_rotary(self, seq_len, head_dim, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if device is not None and torch.device(device).type == "cuda":
            cos, sin = cos.bfloat16(), sin.bfloat16()  # matches the bf16 activations under autocast
        return cos, sin

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: embedding N(0, 1); linears N(0, std) with std = fan_in^-0.5 * min(1, sqrt(fan_out /
        fan_in)); attention/MLP output projections and lm_head at zero. Also (re)computes the rotary tables,
        which to_empty() left uninitialised. On CUDA the embedding is kept in bf16 (saves memory, as nanochat)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)
        torch.nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        device = self.transformer.wte.weight.device
        cos, sin = self._precompute_rotary(self.rotary_seq_len, self.config.n_embd // self.config.n_head,
                                           device=device)
        self.cos, self.sin = cos, sin
        if device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, seq_len=None):
        """FLOPs per token of a training step (fwd+bwd): 6 * (params outside the embedding) + attention, the
        attention term (nanochat's 12 * layers * heads * head_dim * length) for rows of seq_len tokens
        (default: the config's sequence_len)."""
        nparams_embedding = self.transformer.wte.weight.numel()
        cfg = self.config
        l, h, q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        t = cfg.sequence_len if seq_len is None else seq_len
        return 6 * (self.num_params() - nparams_embedding) + 12 * l * h * q * t

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0):
        """[adamw, muon]: AdamW for the embedding and lm_head (lr scaled by (n_embd/768)^-0.5, tuned at 768),
        Muon for every 2-D matrix in the blocks. With a process group of world_size > 1 the distributed
        variants are used, which average gradients across ranks inside step() (no DDP wrapper)."""
        rank, world_size = dist_rank_world()
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(self.parameters()))
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
        ]
        adamw_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)  # nanochat's values
        if world_size > 1:
            adamw = DistAdamW(adam_groups, rank=rank, world_size=world_size, **adamw_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95, rank=rank, world_size=world_size)
        else:
            fused = self.get_device().type == "cuda"
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adamw_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", segment_ids=None):
        B, T = idx.size()
        seg = None
        if segment_ids is not None:
            assert kv_cache is None, "segment_ids are for training/eval on packed rows, not KV-cache decoding"
            assert segment_ids.shape == idx.shape, f"segment_ids {tuple(segment_ids.shape)} vs idx {tuple(idx.shape)}"
            if T > self.cos.size(0):
                raise ContextLengthError(f"sequence of {T} tokens exceeds the model's rotary table of "
                                         f"{self.cos.size(0)} positions")
            pos = segment_positions(segment_ids)
            cos_sin = self.cos[pos][:, :, None, :], self.sin[pos][:, :, None, :]  # (B, T, 1, D/2)
            use_flex = idx.device.type == "cuda" if self.use_flex is None else self.use_flex
            seg = segment_attention(segment_ids, use_flex)  # once per batch, shared by every layer
        else:
            T0 = 0 if kv_cache is None else kv_cache.get_pos()
            if T0 + T > self.cos.size(0):
                raise ContextLengthError(f"sequence of {T0 + T} tokens exceeds the model's rotary table of "
                                         f"{self.cos.size(0)} positions; shorten the prompt or max_tokens")
            cos_sin = self.cos[None, T0:T0 + T, None, :], self.sin[None, T0:T0 + T, None, :]  # (1, T, 1, D/2)

        x = self.transformer.wte(idx)
        if x.dtype != self.lm_head.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # nanochat keeps the embedding in bf16 on CUDA and relies on autocast; without it (dtype = float32)
            # the bf16 activations would meet fp32 weights in the first matmul and fail: run in fp32 instead
            x = x.to(self.lm_head.weight.dtype)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, seg)
        x = norm(x)

        softcap = 15  # logits = 15 * tanh(logits / 15) (Gemma 2)
        if targets is None:
            logits = self.lm_head(x).float()
            return softcap * torch.tanh(logits / softcap)
        # the loss, chunked when the full fp32 logits would be large (loss_chunk_rows), else plain
        chunk_size = loss_chunk_rows(B * T, self.config.vocab_size, self.loss_chunk_size, self.loss_chunk_min_bytes)
        loss = chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), softcap=softcap,
                                     reduction=loss_reduction, chunk_size=chunk_size)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive autoregressive sampling without a KV cache (batch 1). Yields token ids."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.rotary_seq_len:])[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()


def random_model(config, seed=0, output_std=0.02, device="cpu"):
    """A GPT of `config` with random weights everywhere, for tests and benchmarks. nanochat's init_weights
    zero-inits the output projections (each block's c_proj and the lm_head), so an untrained model's logits
    would not depend on its input; here they get N(0, output_std) weights instead."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or name == "lm_head.weight":
                p.normal_(0.0, output_std)
    return model
