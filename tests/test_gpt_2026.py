"""Tests of nanochat's 2026 architecture parts in nanochat/gpt.py (GPTConfig options, ARCH_PRESETS), each against
a hand-written reference forward (`reference_logits`, plain tensor maths over a state dict with nanochat's key
names): sliding windows, value embeddings and their gate, smear, backout, resid/x0 lambdas, the q/k scale, the
rotary base and the padded vocabulary; windowed KV-cache decoding against the no-cache forward; packed rows with
windows against separate documents; optimizer groups; compile against eager.

Run: .venv/bin/python -m pytest tests/test_gpt_2026.py
"""

import dataclasses
import math

import pytest
import torch

from nanochat.engine import Engine, KVCache
from nanochat.gpt import (ARCH_PRESETS, GPT, GPTConfig, attend, config_from_depth, config_problem,
                          flex_segment_block_mask, random_model, segment_mask, window_sizes)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 250  # not a multiple of 64: the 2026 preset pads it to 256
PRESET_2026 = ARCH_PRESETS["nanochat-2026"]


def tiny_config(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, sequence_len=64, **parts):
    return GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                     n_embd=n_embd, **parts)


def config_2026(**overrides):
    parts = dict(PRESET_2026, short_window=5)  # a window shorter than the test sequences
    parts.update(overrides)
    return tiny_config(**parts)


# ---------------------------------------------------------------------------------------------------------
# the reference: nanochat's 2026 forward restated as plain maths, reading nanochat's key names


def _rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def _rotate(x, pos, base):
    """x (B, T, H, D); pos (B, T). nanochat's convention: halves (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin)."""
    D = x.size(-1)
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = (pos.double()[..., None] * inv_freq).float()[:, :, None, :]  # (B, T, 1, D/2)
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * angle.cos() + x2 * angle.sin(), x2 * angle.cos() - x1 * angle.sin()], dim=-1)


def reference_logits(sd, cfg, idx, segment_ids=None):
    """Logits of nanochat's 2026 model (as its gpt.py describes it) from the state dict `sd`, every part
    following the flags of `cfg`; segment_ids: documents packed in a row (each sees only itself)."""
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    seg = torch.zeros_like(idx) if segment_ids is None else segment_ids
    t = torch.arange(T)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(1).values
    pos = t - first  # position within the document
    short = cfg.short_window or -(-cfg.sequence_len // 4 // 128) * 128
    x = _rms(sd["transformer.wte.weight"][idx].float())
    if cfg.smear:
        gate = sd["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ sd["smear_gate.weight"].T)  # (B, T-1, 1)
        gate = gate * (seg[:, 1:] == seg[:, :-1])[..., None]
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_mid = x, None
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        if cfg.lambdas:
            x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        h = _rms(x)
        q = (h @ sd[p + "attn.c_q.weight"].T).view(B, T, H, D)
        k = (h @ sd[p + "attn.c_k.weight"].T).view(B, T, Hkv, D)
        v = (h @ sd[p + "attn.c_v.weight"].T).view(B, T, Hkv, D)
        if cfg.value_embeds and (cfg.n_layer - 1 - i) % 2 == 0:  # alternating, the last layer included
            gate = 3 * torch.sigmoid(h[..., :12] @ sd[p + "attn.ve_gate.weight"].T)  # (B, T, Hkv)
            v = v + gate[..., None] * sd[f"value_embeds.{i}.weight"][idx].float().view(B, T, Hkv, D)
        q, k = _rms(_rotate(q, pos, cfg.rotary_base)), _rms(_rotate(k, pos, cfg.rotary_base))
        q, k = q * cfg.qk_scale, k * cfg.qk_scale
        k, v = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        pattern = cfg.window_pattern.upper()
        window = None if i == cfg.n_layer - 1 or pattern[i % len(pattern)] == "L" else short
        allowed = (t[None, :] <= t[:, None]) & (seg[:, :, None] == seg[:, None, :])[:, None]  # (B, 1, T, S)
        if window is not None:
            allowed = allowed & (t[:, None] - t[None, :] <= window)
        y = torch.einsum("bhts,bshd->bthd", scores.masked_fill(~allowed, -math.inf).softmax(-1), v)
        x = x + y.reshape(B, T, -1) @ sd[p + "attn.c_proj.weight"].T
        x = x + torch.relu(_rms(x) @ sd[p + "mlp.c_fc.weight"].T).square() @ sd[p + "mlp.c_proj.weight"].T
        if i == cfg.n_layer // 2:
            x_mid = x
    if cfg.backout:
        x = x - sd["backout_lambda"] * x_mid
    logits = (_rms(x) @ sd["lm_head.weight"].T)[..., :cfg.vocab_size]
    return 15 * torch.tanh(logits / 15)


def assert_close_rel(got, want, rtol=1e-5):
    err = float((got - want).abs().max().detach()) / float(want.abs().max().detach())
    assert err <= rtol, err


# ---------------------------------------------------------------------------------------------------------
# each part against the reference


PARTS = {
    "window": dict(window_pattern="SL", short_window=3),
    "window_sssl": dict(window_pattern="SSSL", short_window=6),
    "value_embeds": dict(value_embeds=True),
    "lambdas": dict(lambdas=True),
    "smear": dict(smear=True),
    "backout": dict(backout=True),
    "qk_scale_rotary_base": dict(qk_scale=1.2, rotary_base=100000),
    "pad_vocab": dict(pad_vocab_to=64),
    "all_2026": dict(PRESET_2026, short_window=5),
    "october": {},
}


@pytest.mark.parametrize("part", PARTS)
def test_each_part_matches_reference(part):
    cfg = tiny_config(**PARTS[part])
    model = random_model(cfg, seed=1, output_std=0.05)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0))
    sd = model.state_dict()
    assert_close_rel(model(idx), reference_logits(sd, cfg, idx))
    # the part matters: the reference with it switched off differs (so the comparison above can fail)
    if part not in ("october", "pad_vocab"):
        off = tiny_config()
        assert (reference_logits(sd, off, idx) - model(idx)).abs().max() > 1e-3
    if part == "pad_vocab":
        assert sd["lm_head.weight"].shape[0] == sd["transformer.wte.weight"].shape[0] == 256
        assert model(idx).shape[-1] == V


def test_preset_shapes_and_names_are_nanochats():
    cfg = config_from_depth(4, V, 2048, head_dim=64, arch="nanochat-2026")
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.wte.weight"] == (256, 256) and shapes["lm_head.weight"] == (256, 256)  # padded
    assert sorted(k for k in shapes if k.startswith("value_embeds")) == ["value_embeds.1.weight",
                                                                         "value_embeds.3.weight"]
    assert shapes["value_embeds.3.weight"] == (256, 256)
    assert shapes["transformer.h.3.attn.ve_gate.weight"] == (4, 12)
    assert "transformer.h.2.attn.ve_gate.weight" not in shapes
    assert shapes["resid_lambdas"] == shapes["x0_lambdas"] == (4,)
    assert shapes["smear_gate.weight"] == (1, 24) and shapes["smear_lambda"] == shapes["backout_lambda"] == (1,)
    assert model.window_sizes == [512, 512, 512, None]  # SSSL: a quarter of 2048; the last layer long
    assert window_sizes(dataclasses.replace(cfg, sequence_len=1000, n_layer=6)) == [256, 256, 256, None, 256, None]
    assert window_sizes(dataclasses.replace(cfg, window_pattern="L")) == [None] * 4
    october = config_from_depth(4, V, 2048, head_dim=64)  # the default architecture: every part off
    assert october == GPTConfig(sequence_len=2048, vocab_size=V, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)


def test_config_problem_names_the_bad_field():
    assert config_problem(tiny_config(**PRESET_2026)) is None
    assert "window_pattern" in config_problem(tiny_config(window_pattern="SXL"))
    assert "qk_scale" in config_problem(tiny_config(qk_scale=0))
    assert "value_embeds" in config_problem(tiny_config(value_embeds="yes"))
    assert "short_window" in config_problem(tiny_config(short_window=-1))


def test_windowed_attention_equals_sdpa_with_band_mask():
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 40, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for window in (0, 3, 17, 39, None):
        s, t = torch.arange(T)[None, :], torch.arange(T)[:, None]
        band = (s <= t) & ((t - s <= window) if window is not None else True)
        scores = (q @ kr.transpose(-1, -2) / math.sqrt(D)).masked_fill(~band, -math.inf)
        want = scores.softmax(-1) @ vr
        assert torch.allclose(attend(q, k, v, window, None, gqa=True), want, atol=1e-5), window
        # queries after a cache (the last 7 of T positions), and one query alone
        assert torch.allclose(attend(q[:, :, -7:], k, v, window, None, gqa=True), want[:, :, -7:], atol=1e-5)
        assert torch.allclose(attend(q[:, :, -1:], k, v, window, None, gqa=True), want[:, :, -1:], atol=1e-5)


def test_windowed_flex_block_mask_matches_sdpa_mask():
    # the CUDA path (flex_attention with window + segments) against the CPU path's boolean mask
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    B, T, D = 2, 256, 16
    q, k, v = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    seg = torch.cat([torch.full((B, 100), 1), torch.full((B, 130), 2), torch.zeros(B, 26, dtype=torch.long)], 1)
    seg[1, :50] = 5
    y_flex = flex_attention(q, k, v, block_mask=flex_segment_block_mask(seg, 37), enable_gqa=True)
    mask = segment_mask(seg, 37)
    assert mask[0, 0, 120].nonzero().flatten().tolist() == list(range(100, 121))  # its document only
    assert mask[0, 0, 220].nonzero().flatten().tolist() == list(range(183, 221))  # the last 37 + itself
    y_sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(y_flex, y_sdpa, atol=1e-5)


def test_value_embedding_gate():
    """One token, c_v at zero: the attention output is v itself, i.e. per kv head 3 * sigmoid(W x[:12]) * ve,
    repeated over the query heads of the group."""
    cfg = tiny_config(n_layer=1, value_embeds=True)
    model = random_model(cfg, seed=2, output_std=0.05)
    attn = model.transformer.h[0].attn
    seen = {}
    attn.c_q.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    attn.c_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("y", i[0]))
    with torch.no_grad():
        attn.c_v.weight.zero_()
        attn.ve_gate.weight.normal_(0.0, 1.0)
        model(torch.tensor([[7]]))
    x = seen["x"][0, 0]  # the block's (normed) input
    gate = 3 * torch.sigmoid(attn.ve_gate.weight @ x[:12])  # (n_kv_head,)
    assert 0 < gate.min() and gate.max() < 3 and (gate.max() - gate.min()) > 0.05  # not a constant gate
    D = cfg.n_embd // cfg.n_head
    ve = model.value_embeds["0"].weight[7].view(cfg.n_kv_head, D)
    want = (gate[:, None] * ve).repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=0).flatten()
    assert torch.allclose(seen["y"][0, 0], want, atol=1e-6)


def test_smear_backout_lambdas_by_hand():
    """Zero blocks (every projection 0): the residual stream is the input embedding e = norm(wte[idx]) with smear,
    scaled per layer by the lambdas, minus the backout of the middle layer: checked against that arithmetic."""
    cfg = tiny_config(n_layer=3, lambdas=True, smear=True, backout=True)
    model = random_model(cfg, seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.smear_gate.weight.normal_(0.0, 1.0)
        model.lm_head.weight.copy_(torch.eye(V, 64) * 3)  # logits 0..63 = 3 * the final normed stream
    idx = torch.randint(0, V, (2, 6))
    e = torch.nn.functional.rms_norm(model.transformer.wte.weight[idx], (64,))
    g = model.smear_lambda * torch.sigmoid(e[:, 1:, :24] @ model.smear_gate.weight.T)  # (B, T-1, 1)
    e = torch.cat([e[:, :1], e[:, 1:] + g * e[:, :-1]], dim=1)
    r, a = model.resid_lambdas, model.x0_lambdas
    x1 = r[0] * e + a[0] * e
    x2 = r[1] * x1 + a[1] * e  # the output of layer 1 = n_layer // 2: kept for backout
    x3 = r[2] * x2 + a[2] * e
    final = torch.nn.functional.rms_norm(x3 - model.backout_lambda * x2, (64,))
    want = 15 * torch.tanh(3 * final / 15)
    with torch.no_grad():
        assert torch.allclose(model(idx)[..., :64], want, atol=1e-5)


def test_windowed_kv_cache_decoding_equals_full_forward():
    cfg = config_2026(short_window=4)
    model = random_model(cfg, seed=4, output_std=0.05)
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(batch_size=2, num_heads=cfg.n_kv_head, seq_len=8, head_dim=16, num_layers=cfg.n_layer)
        parts = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:15], kv_cache=cache)]  # prefill, a chunk
        parts += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(15, 30)]  # then one token at a time
    assert cache.get_pos() == 30
    assert_close_rel(torch.cat(parts, dim=1), full)
    # the engine's batch-1 prefill copied into several rows (the smear's last embedding travels with it)
    model.config = dataclasses.replace(cfg, sequence_len=64)

    class Tok:  # the engine asks only for special ids (none of which the random model will produce here)
        def encode_special(self, s):
            return 10_000 + len(s)

        def get_bos_token_id(self):
            return 10_000

    engine = Engine(model, Tok())
    prompt = idx[0, :12].tolist()
    rows, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=10, temperature=0.0)
    greedy = list(model.generate(prompt, max_tokens=10, temperature=0.0))  # no cache: full forward each step
    assert rows[0][len(prompt):] == greedy and rows[1][len(prompt):] == greedy


def test_packed_rows_with_windows_never_attend_across_documents():
    cfg = config_2026(short_window=3)
    model = random_model(cfg, seed=5, output_std=0.05)
    gen = torch.Generator().manual_seed(2)
    A, B = torch.randint(0, V, (1, 11), generator=gen), torch.randint(0, V, (1, 20), generator=gen)
    packed = torch.cat([A, B, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    seg = torch.tensor([[1] * 11 + [2] * 20 + [0] * 5])
    with torch.no_grad():
        out = model(packed, segment_ids=seg)
        assert_close_rel(out[:, :11], model(A))
        assert_close_rel(out[:, 11:31], model(B))
        assert_close_rel(out, reference_logits(model.state_dict(), cfg, packed, seg))
        assert not torch.allclose(model(packed)[:, 11:31], model(B), atol=1e-3)  # without segments B sees A
    # gradients: the loss of B's tokens does not reach A's embeddings
    targets = torch.full_like(packed, -1)
    targets[:, 11:30] = packed[:, 12:31]
    model(packed, targets, segment_ids=seg).backward()
    wte_grad = model.transformer.wte.weight.grad
    assert wte_grad[A[0]].abs().sum() == 0 or set(A[0].tolist()) & set(B[0].tolist())
    assert wte_grad[B[0]].abs().sum() > 0


def test_optimizer_groups_follow_nanochat():
    cfg = config_2026()
    model = random_model(cfg)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5)
    group_of = {id(p): g for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(list(model.parameters()))  # each parameter in exactly one group
    scale = (64 / 768) ** -0.5
    assert group_of[id(model.value_embeds["0"].weight)]["lr"] == pytest.approx(0.2 * scale * 0.5)
    assert group_of[id(model.resid_lambdas)]["lr"] == pytest.approx(0.005)
    assert group_of[id(model.x0_lambdas)]["lr"] == 0.5 and group_of[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    assert group_of[id(model.smear_gate.weight)] is group_of[id(model.backout_lambda)]
    assert group_of[id(model.smear_lambda)]["lr"] == 0.2
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.transformer.h[0].attn.ve_gate.weight) in muon_params  # a matrix in the blocks, as nanochat
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    # a few steps train every part
    idx = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        model(idx[:, :-1], idx[:, 1:]).backward()
        for opt in (adamw, muon):
            opt.step()
        model.zero_grad(set_to_none=True)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), \
        [n for n, p in model.named_parameters() if torch.equal(before[n], p)]


def test_compiled_loss_and_grads_equal_eager():
    """Dynamo + AOT autograd trace the windows, segments, smear and value embeddings (inductor's code generation
    is the same for every model and takes minutes on a busy CPU: tests/test_gpu_path.py covers it)."""
    cfg = config_2026(short_window=6)
    model = random_model(cfg, seed=6, output_std=0.05)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(4))
    seg = torch.tensor([[1] * 10 + [2] * 14, [3] * 24])
    results = []
    for fn in (model, torch.compile(model, dynamic=False, backend="aot_eager", fullgraph=False)):
        model.zero_grad(set_to_none=True)
        loss = fn(idx[:, :-1], idx[:, 1:], segment_ids=seg[:, :-1])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-4, atol=1e-5)


def test_loss_over_the_cropped_vocabulary_chunked_or_not():
    """The loss uses only the real vocabulary's rows of the padded lm_head: equal to the cross-entropy of the
    (cropped) logits, chunked or not."""
    cfg = config_2026()
    model = random_model(cfg, seed=7, output_std=0.05)
    assert model.lm_head.weight.shape[0] == 256 > V
    gen = torch.Generator().manual_seed(5)
    idx, targets = torch.randint(0, V, (2, 20), generator=gen), torch.randint(0, V, (2, 20), generator=gen)
    targets[0, :3] = -1
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
        for chunk in (0, 7):
            model.loss_chunk_size = chunk
            torch.testing.assert_close(model(idx, targets), want, rtol=1e-6, atol=1e-6)
