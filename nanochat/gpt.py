"""
The GPT model (nanochat's architecture) and its optimizer set-up (about 680 lines, over the house ~450: both
nanochat architectures, October 2025 and 2026, are options of this one model, as issue 22 asks).

- token embedding -> blocks (x + attn(norm(x)), x + mlp(norm(x))) -> norm -> untied lm_head -> softcap 15
- parameter-free RMSNorm, rotary position embeddings, RMSNorm on queries and keys (QK-norm)
- grouped-query / multi-query attention (n_kv_head <= n_head), MLP 4x wide with ReLU^2, no biases
- nanochat's 2026 parts, each a GPTConfig option (off by default: the October 2025 architecture, so every older
  checkpoint's model_config loads unchanged; ARCH_PRESETS["nanochat-2026"] switches all of them on):
  sliding-window attention tiled over layers by window_pattern (S = short window, L = full context, the last
  layer always L), value embeddings on alternating layers mixed into v through a per-head gate
  (3 * sigmoid of the first 12 channels), per-layer resid_lambdas / x0_lambdas, smear (the previous token's
  embedding mixed in), backout (the residual after layer n_layer // 2 subtracted before the final norm), q and k
  scaled after QK-norm, the rotary base, and the vocabulary padded to a multiple of pad_vocab_to (logits cropped)
- every Linear casts its (fp32 master) weight to the activation dtype, so matmuls run in the activation dtype
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
    # nanochat's 2026 parts; the defaults are the October 2025 architecture (see ARCH_PRESETS)
    window_pattern: str = "L"  # attention window per layer, tiled: L = full context, S = short_window; last layer L
    short_window: int = 0  # keys seen by an S layer besides the query's own (0: sequence_len / 4 rounded up to 128)
    value_embeds: bool = False  # ResFormer value embeddings on alternating layers (the last one included)
    lambdas: bool = False  # per-layer resid_lambdas (residual scale) and x0_lambdas (input embedding mixed back in)
    smear: bool = False  # the previous token's embedding mixed in through smear_gate / smear_lambda
    backout: bool = False  # backout_lambda * (residual after layer n_layer // 2) subtracted before the final norm
    qk_scale: float = 1.0  # q and k multiplied by this after QK-norm (2026: 1.2, sharper attention)
    rotary_base: int = 10000  # rotary embedding base theta (2026: 100000)
    pad_vocab_to: int = 1  # wte / lm_head rows rounded up to a multiple of this (2026: 64); logits are cropped


# --arch presets: the fields of GPTConfig that make each nanochat architecture (the rest come from the depth dial)
ARCH_PRESETS = {
    "nanochat-2025": {},  # October 2025 (the SFT guide's model; transformers' NanoChat class): the defaults
    "nanochat-2026": dict(window_pattern="SSSL", value_embeds=True, lambdas=True, smear=True, backout=True,
                          qk_scale=1.2, rotary_base=100000, pad_vocab_to=64),
}
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input (nanochat)
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normed embedding (nanochat)


def config_problem(config):
    """None if `config` describes a buildable GPT, else a short description of what is wrong (for one-line errors
    about meta files and options; GPT() itself only asserts)."""
    ints = (config.sequence_len, config.vocab_size, config.n_layer, config.n_head, config.n_kv_head, config.n_embd,
            config.rotary_base, config.pad_vocab_to)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
        return ("sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd, rotary_base, pad_vocab_to must be "
                "positive ints")
    if config.n_embd % config.n_head or config.n_head % config.n_kv_head or (config.n_embd // config.n_head) % 2:
        return "n_embd must be a multiple of n_head with an even head size, n_head a multiple of n_kv_head"
    if not isinstance(config.window_pattern, str) or not config.window_pattern \
            or set(config.window_pattern.upper()) - set("SL"):
        return f"window_pattern {config.window_pattern!r} must be a non-empty string of S (short) and L (long)"
    if not isinstance(config.short_window, int) or isinstance(config.short_window, bool) or config.short_window < 0:
        return f"short_window {config.short_window!r} must be an int >= 0 (0: sequence_len / 4 rounded up to 128)"
    flags = (config.value_embeds, config.lambdas, config.smear, config.backout)
    if not all(isinstance(v, bool) for v in flags):
        return "value_embeds, lambdas, smear, backout must be true/false"
    if not isinstance(config.qk_scale, (int, float)) or isinstance(config.qk_scale, bool) or config.qk_scale <= 0:
        return f"qk_scale {config.qk_scale!r} must be a positive number"
    if config.value_embeds and config.n_embd < VE_GATE_CHANNELS or config.smear and config.n_embd < SMEAR_CHANNELS:
        return f"value_embeds need n_embd >= {VE_GATE_CHANNELS} and smear n_embd >= {SMEAR_CHANNELS}"
    return None


def padded_vocab_size(config):
    return (config.vocab_size + config.pad_vocab_to - 1) // config.pad_vocab_to * config.pad_vocab_to


def window_sizes(config):
    """Per-layer attention windows: None = full context, w = the query sees itself and the w keys before it
    (nanochat's (w, 0) window). window_pattern is tiled over the layers; the last layer is always full.
    The short window is sequence_len / 4 rounded up to 128 (a flash-attention tile), as nanochat. nanochat's L
    layers use the window sequence_len, which equals full context for every sequence up to sequence_len."""
    short = config.short_window or -(-config.sequence_len // 4 // 128) * 128
    pattern = config.window_pattern.upper()
    sizes = [None if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = None
    return sizes


def has_value_embed(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one included (nanochat's has_ve)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def config_from_depth(depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64, arch="nanochat-2025"):
    """The depth dial: n_embd = aspect_ratio * depth, heads of (about) head_dim, as many kv heads as heads; the
    other fields from ARCH_PRESETS[arch]."""
    n_embd = depth * aspect_ratio
    n_head = max(1, (n_embd + head_dim - 1) // head_dim)  # ceil: a model narrower than one head gets one head
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ConfigError(f"depth ({depth}), aspect_ratio ({aspect_ratio}) and head_dim ({head_dim}) must be >= 1")
    if n_embd % n_head != 0 or (n_embd // n_head) % 2 != 0:  # user input (depth/aspect_ratio/head_dim): no assert
        raise ConfigError(f"width depth * aspect_ratio = {depth} * {aspect_ratio} = {n_embd} does not split into "
                          f"{n_head} heads of an even size (head_dim={head_dim}); choose aspect_ratio and head_dim "
                          f"so that the width is a multiple of an even head_dim")
    if arch not in ARCH_PRESETS:
        raise ConfigError(f"arch {arch!r} is not one of {', '.join(ARCH_PRESETS)}")
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, **ARCH_PRESETS[arch])


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


def window_mask(Tq, Tk, window, device=None):
    """(Tq, Tk) boolean: the Tq queries are the last Tq of Tk positions; query t sees key s iff s <= t and
    (window is None or t - s <= window)."""
    t = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    s = torch.arange(Tk, device=device)[None, :]
    mask = s <= t
    if window is not None:
        mask = mask & (t - s <= window)
    return mask


def segment_mask(segment_ids, window=None):
    """(B, 1, T, T) boolean: query t attends to key s iff s <= t, both are in the same segment and (window is
    None or t - s <= window)."""
    T = segment_ids.size(1)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & window_mask(T, T, window, segment_ids.device))[:, None]


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


def flex_segment_block_mask(segment_ids, window=None):
    """Block mask for flex_attention: causal within equal segment ids, and within `window` keys before the query
    when window is not None. Built once per batch and window (GPT.forward) and shared by the layers of that
    window; blocks of 128 x 128 that are fully masked are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segment_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    def window_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (q_idx - kv_idx <= window)

    if window is not None:
        return create_block_mask(window_mask_mod, B, None, T, T, device=segment_ids.device)

    return create_block_mask(mask_mod, B, None, T, T, device=segment_ids.device)


@functools.lru_cache(maxsize=1)
def _eager_flex_segment_block_mask():
    # the block mask is built eagerly, outside a compiled model's graph (one graph break at the start of
    # forward; the graph takes the BlockMask as input); wrapped on first use, so that importing this module
    # does not import torch._dynamo
    return torch.compiler.disable(flex_segment_block_mask)


def segment_attention(segment_ids, use_flex, windows=(None,)):
    """The attention masking of a packed batch, built once per batch and per distinct window, shared by the
    layers: ("flex", {window: BlockMask}) for flex_attention (CUDA), or ("sdpa", {window: (B, 1, T, T) boolean
    mask}) elsewhere."""
    if use_flex:
        return "flex", {w: _eager_flex_segment_block_mask()(segment_ids, w) for w in set(windows)}
    return "sdpa", {w: segment_mask(segment_ids, w) for w in set(windows)}


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


class Linear(nn.Linear):
    """nn.Linear whose weight is cast to the input's dtype in forward: master weights stay fp32 (for the
    optimizer) while matmuls run in the activation dtype (nanochat 2026; a no-op in fp32 and under autocast)."""

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype))


def attend(q, k, v, window, seg, gqa):
    """Causal attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D), the queries being the last Tq of the Tk
    positions (Tk > Tq: keys from a KV cache), restricted to `window` keys before each query (None: all).
    seg: the packed batch's masks from segment_attention (then Tq == Tk), or None."""
    Tq, Tk = q.size(2), k.size(2)
    if seg is not None:
        kind, masks = seg
        if kind == "flex":
            return _flex_attention(q, k, v, block_mask=masks[window], enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=masks[window], enable_gqa=gqa)
    if window is not None and window >= Tk - 1:
        window = None  # the window covers every key: plain causal attention
    if Tq == 1:
        if window is not None:  # one query sees the last window + 1 keys (itself included)
            k, v = k[:, :, Tk - window - 1:], v[:, :, Tk - window - 1:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
    if Tq == Tk and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # new queries see the cached keys (within the window), and are causal among themselves
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(Tq, Tk, window, q.device), enable_gqa=gqa)


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
        self.qk_scale = config.qk_scale
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(self.n_embd, self.n_embd, bias=False)
        self.ve_gate = None  # per-kv-head gate of the value embedding, from the input's first channels
        if config.value_embeds and has_value_embed(layer_idx, config.n_layer):
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, cos_sin, kv_cache, seg, ve=None, window=None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual (ResFormer, Zhou et al. 2024): gate in (0, 3) per token and kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        y = attend(q, k, v, window, seg, gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2 (Primer, So et al. 2021)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, seg, ve=None, window=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, seg, ve, window)
        x = x + self.mlp(norm(x))
        return x


def smear(x, gate, prev=None, segment_ids=None):
    """Mix each token's predecessor into it: x[t] + gate[t] * x[t-1] (nanochat's smear, a cheap bigram path).
    x (B, T, C); gate (B, T', 1) for the last T' tokens: T' = T - 1 without `prev` (the first token has no
    predecessor), T' = T with prev (B or 1, 1, C), the embedding before x[0] (KV-cache decoding). With
    segment_ids (packed rows) a document's first token takes nothing from the previous document."""
    x_prev = x[:, :-1] if prev is None else torch.cat([prev.to(x.dtype).expand(x.size(0), 1, -1), x[:, :-1]], 1)
    x_prev = x_prev[:, x_prev.size(1) - gate.size(1):]
    if segment_ids is not None:
        gate = gate * (segment_ids[:, 1:] == segment_ids[:, :-1]).unsqueeze(-1).to(gate.dtype)
    start = x.size(1) - gate.size(1)
    return torch.cat([x[:, :start], x[:, start:] + gate * x_prev], dim=1)


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
        vocab = padded_vocab_size(config)  # rows beyond vocab_size are never a target; logits are cropped
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, vocab, bias=False)
        self.window_sizes = window_sizes(config)
        if config.lambdas:  # nanochat's names and shapes (so its checkpoints load as they are)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))  # x <- resid * x + x0 * x0 before each block
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        if config.value_embeds:
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim) for i in range(config.n_layer)
                                               if has_value_embed(i, config.n_layer)})
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

    def _precompute_rotary(self, seq_len, head_dim, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rotary_base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if device is not None and torch.device(device).type == "cuda":
            cos, sin = cos.bfloat16(), sin.bfloat16()  # matches the bf16 activations under autocast
        return cos, sin

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: embedding N(0, 1); linears N(0, std) with std = fan_in^-0.5 * min(1, sqrt(fan_out /
        fan_in)); attention/MLP output projections and lm_head at zero. The 2026 parts as nanochat initialises
        them: resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 over the layers, smear_lambda 0,
        backout_lambda 0.2, smear and value-embedding gates U(0, 0.02), value embeddings U(-s, s) with
        s = sqrt(3 / n_embd). Also (re)computes the rotary tables, which to_empty() left uninitialised. On CUDA
        the embeddings are kept in bf16 (saves memory, as nanochat)."""
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
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)  # gates start slightly above neutral
        cfg = self.config
        if cfg.lambdas:
            frac = torch.arange(cfg.n_layer, dtype=torch.float32) / max(cfg.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * frac)  # stronger residual early, weaker deep
            self.x0_lambdas.copy_(0.20 - 0.15 * frac)  # more of the input embedding in early layers
        if cfg.smear:
            torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            torch.nn.init.zeros_(self.smear_lambda)
        if cfg.backout:
            torch.nn.init.constant_(self.backout_lambda, 0.2)
        if cfg.value_embeds:
            s = math.sqrt(3.0 / cfg.n_embd)
            for ve in self.value_embeds.values():
                torch.nn.init.uniform_(ve.weight, -s, s)
        device = self.transformer.wte.weight.device
        cos, sin = self._precompute_rotary(self.rotary_seq_len, cfg.n_embd // cfg.n_head, device=device)
        self.cos, self.sin = cos, sin
        if device.type == "cuda":
            self.transformer.wte.to(dtype=torch.bfloat16)
            if cfg.value_embeds:
                self.value_embeds.to(dtype=torch.bfloat16)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self, seq_len=None):
        """FLOPs per token of a training step (fwd+bwd): 6 * (weights of the matmuls, i.e. every Linear:
        embeddings are lookups, the scalars elementwise) + attention, the attention term (nanochat's
        12 * heads * head_dim * keys seen, summed over layers) for rows of seq_len tokens (default: the
        config's sequence_len), a windowed layer seeing at most its window of keys."""
        cfg = self.config
        h, q = cfg.n_head, cfg.n_embd // cfg.n_head
        t = cfg.sequence_len if seq_len is None else seq_len
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = sum(12 * h * q * (t if w is None else min(w, t)) for w in self.window_sizes)
        return 6 * matmul_params + attn

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         scalar_lr=0.5):
        """[adamw, muon]: AdamW for the embedding and lm_head (lr scaled by (n_embd/768)^-0.5, tuned at 768),
        Muon for every 2-D matrix in the blocks (the value-embedding gates included). The 2026 parts get
        AdamW groups as nanochat assigns them: value embeddings at half the embedding lr, resid_lambdas at
        scalar_lr * 0.01 (weight decay 0.05), x0_lambdas at scalar_lr (betas 0.96, 0.95), smear and backout
        at 0.2. With a process group of world_size > 1 the distributed variants are used, which average
        gradients across ranks inside step() (no DDP wrapper)."""
        rank, world_size = dist_rank_world()
        matrix_params = list(self.transformer.h.parameters())
        dmodel_lr_scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=list(self.lm_head.parameters()), lr=unembedding_lr * dmodel_lr_scale),
            dict(params=list(self.transformer.wte.parameters()), lr=embedding_lr * dmodel_lr_scale),
        ]
        cfg = self.config
        if cfg.value_embeds:
            adam_groups.append(dict(params=list(self.value_embeds.parameters()),
                                    lr=embedding_lr * dmodel_lr_scale * 0.5, weight_decay=0.01))
        if cfg.lambdas:
            adam_groups.append(dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, weight_decay=0.05))
            adam_groups.append(dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0))
        gate_params = ([self.smear_gate.weight, self.smear_lambda] if cfg.smear else []) + \
            ([self.backout_lambda] if cfg.backout else [])
        if gate_params:
            adam_groups.append(dict(params=gate_params, lr=0.2, weight_decay=0.0))
        n_adam = sum(len(g["params"]) for g in adam_groups)
        assert len(matrix_params) + n_adam == len(list(self.parameters())), "a parameter has no optimizer group"
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
        cfg = self.config
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
            seg = segment_attention(segment_ids, use_flex, self.window_sizes)  # once per batch, shared by layers
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
        if cfg.smear:  # the KV cache carries the last embedding of the previous call into the next one
            prev = None if kv_cache is None else kv_cache.prev_embedding
            if kv_cache is not None:
                kv_cache.prev_embedding = x[:, -1:]
            n_gated = T if prev is not None else T - 1
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, T - n_gated:, :SMEAR_CHANNELS]))
            x = smear(x, gate, prev, segment_ids)
        x0 = x  # the normed (smeared) input embedding, mixed back in before each block (x0_lambdas)
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            if cfg.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if cfg.value_embeds and str(i) in self.value_embeds \
                else None
            x = block(x, cos_sin, kv_cache, seg, ve, self.window_sizes[i])
            if cfg.backout and i == cfg.n_layer // 2:
                x_backout = x
        if x_backout is not None:  # remove the mid-layer (low-level) features before the logits
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        x = norm(x)

        softcap = 15  # logits = 15 * tanh(logits / 15) (Gemma 2)
        if targets is None:
            logits = self.lm_head(x)[..., :cfg.vocab_size].float()  # padded rows cropped
            return softcap * torch.tanh(logits / softcap)
        # the loss, chunked when the full fp32 logits would be large (loss_chunk_rows), else plain
        chunk_size = loss_chunk_rows(B * T, cfg.vocab_size, self.loss_chunk_size, self.loss_chunk_min_bytes)
        loss = chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight[:cfg.vocab_size], targets.reshape(-1),
                                     softcap=softcap, reduction=loss_reduction, chunk_size=chunk_size)
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
            elif name in ("smear_lambda", "backout_lambda", "resid_lambdas", "x0_lambdas"):
                p.add_(torch.randn_like(p), alpha=0.3)  # away from their init (smear_lambda starts at 0: no smear)
    return model
