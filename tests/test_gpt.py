"""Tests for nanochat/gpt.py: shapes, init loss, causality, overfitting, packed segments, KV cache, config.
Run: .venv/bin/python -m pytest tests/test_gpt.py"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import (GPT, GPTConfig, config_from_depth, flex_segment_block_mask, segment_mask,
                          segment_positions)

V = 256


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_model(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, sequence_len=64, random_out=False, seed=0):
    config = GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=n_embd)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    if random_out:  # the zero-init output projections make every position's logits identical at init
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_proj.weight") or name == "lm_head.weight":
                    p.normal_(0.0, 0.05)
    return model


def test_forward_shapes_and_init_loss():
    model = make_model()
    idx = torch.randint(0, V, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, V) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 1e-3  # zero lm_head: uniform prediction
    targets = idx.clone()
    targets[0, :5] = -1  # ignored
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 17)
    assert (per_token[0, :5] == 0).all()
    total = model(idx, targets, loss_reduction="sum")
    mean = model(idx, targets)
    assert torch.allclose(total, per_token.sum())
    assert torch.allclose(mean, total / (targets != -1).sum())


def test_logits_softcapped():
    model = make_model(random_out=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits = model(torch.randint(0, V, (1, 8)))
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 10.0


def test_causality():
    model = make_model(random_out=True)
    idx = torch.randint(0, V, (2, 32))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % V
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :20], b[:, :20])  # the future does not leak into the past
    assert not torch.allclose(a[:, 20:], b[:, 20:])  # but the changed token matters from there on


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = make_model()
    idx = torch.randint(0, V, (4, 32))
    optimizers = model.setup_optimizers()
    start = model(idx[:, :-1], idx[:, 1:]).item()
    for _ in range(25):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.1 * start, (start, loss.item())


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_packed_segments_match_separate_runs(n_kv_head):
    model = make_model(n_head=2, n_kv_head=n_kv_head, random_out=True)
    A = torch.randint(0, V, (1, 11))
    B = torch.randint(0, V, (1, 20))
    pad = torch.zeros(1, 5, dtype=torch.long)
    packed = torch.cat([A, B, pad], dim=1)
    seg = torch.tensor([[1] * 11 + [2] * 20 + [0] * 5])
    out = model(packed, segment_ids=seg)
    assert torch.allclose(out[:, :11], model(A), atol=1e-5)
    assert torch.allclose(out[:, 11:31], model(B), atol=1e-5)
    # without segment ids, B would see A: the results must differ (the test can fail)
    assert not torch.allclose(model(packed)[:, 11:31], model(B), atol=1e-3)
    # losses: per-token losses of the packed row equal the separate ones
    tgt = torch.cat([A[:, 1:], torch.full((1, 1), -1), B[:, 1:], torch.full((1, 6), -1)], dim=1)
    per_token = model(packed, tgt, loss_reduction="none", segment_ids=seg)
    alone = model(A[:, :-1], A[:, 1:], loss_reduction="none")
    assert torch.allclose(per_token[:, :10], alone, atol=1e-5)


def test_segment_positions_and_mask():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    mask = segment_mask(seg)
    assert mask.shape == (2, 1, 7, 7)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False]
    assert torch.equal(mask[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_flex_block_mask_matches_sdpa_mask():
    # the CUDA path (flex_attention + block mask) against the CPU path, with eager flex_attention on CPU
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    B, T, D = 2, 256, 16
    q, k, v = torch.randn(B, 4, T, D), torch.randn(B, 2, T, D), torch.randn(B, 2, T, D)
    seg = torch.cat([torch.full((B, 100), 1), torch.full((B, 130), 2), torch.zeros(B, 26, dtype=torch.long)], 1)
    seg[1, :50] = 5
    y_flex = flex_attention(q, k, v, block_mask=flex_segment_block_mask(seg), enable_gqa=True)
    y_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=segment_mask(seg), enable_gqa=True)
    assert torch.allclose(y_flex, y_sdpa, atol=1e-5)


def test_kv_cache_matches_full_forward():
    from nanochat.engine import KVCache

    model = make_model(n_head=4, n_kv_head=2, random_out=True)
    idx = torch.randint(0, V, (2, 30))
    full = model(idx)
    cache = KVCache(batch_size=2, num_heads=2, seq_len=64, head_dim=16, num_layers=2)
    prefill = model(idx[:, :20], kv_cache=cache)  # T_new == T_full: causal
    chunk = model(idx[:, 20:25], kv_cache=cache)  # several new tokens after a cache
    single = model(idx[:, 25:26], kv_cache=cache)  # one token attends to everything
    assert cache.get_pos() == 26
    assert torch.allclose(prefill, full[:, :20], atol=1e-5)
    assert torch.allclose(chunk, full[:, 20:25], atol=1e-5)
    assert torch.allclose(single, full[:, 25:26], atol=1e-5)


def test_rotary_covers_ten_times_sequence_len():
    model = make_model(sequence_len=16)
    assert model.cos.shape[0] == 160
    logits = model(torch.randint(0, V, (1, 100)))  # longer than sequence_len: still works
    assert logits.shape == (1, 100, V)


def test_config_from_depth():
    c = config_from_depth(20, 65536, 2048)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == (20, 1280, 10, 10)
    c = config_from_depth(4, 1024, 256, head_dim=64)
    assert (c.n_embd, c.n_head) == (256, 4)
    c = config_from_depth(1, 1024, 256)  # narrower than one head: one head
    assert (c.n_embd, c.n_head) == (64, 1)


def test_setup_optimizers_groups_and_lrs():
    model = make_model(n_embd=192, n_head=3, n_kv_head=3)
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    scale = (192 / 768) ** -0.5
    lrs = sorted(g["lr"] for g in adamw.param_groups)
    assert lrs == pytest.approx(sorted([0.004 * scale, 0.2 * scale]))
    assert all(g["lr"] == 0.02 for g in muon.param_groups)
    for opt in (adamw, muon):
        assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["eps"] == 1e-10
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_params == {id(p) for p in model.transformer.h.parameters()}
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])


def test_estimate_flops_and_params():
    model = make_model()
    cfg = model.config
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters())
    expected = 6 * (n - V * 64) + 12 * cfg.n_layer * cfg.n_head * 32 * cfg.sequence_len
    assert model.estimate_flops() == expected
    assert model.get_device().type == "cpu"


def test_generate_greedy_is_deterministic():
    model = make_model(random_out=True)
    a = list(model.generate([1, 2, 3], max_tokens=6, temperature=0.0))
    b = list(model.generate([1, 2, 3], max_tokens=6, temperature=0.0))
    assert a == b and len(a) == 6
    logits = model(torch.tensor([[1, 2, 3]]))
    assert a[0] == logits[0, -1].argmax().item()


def test_bf16_embedding_without_autocast_runs_in_fp32():
    """On CUDA init_weights keeps the embedding in bf16 (nanochat) and relies on autocast; with dtype = float32
    there is no autocast, and the forward must then run in fp32 instead of failing in the first matmul."""
    model = make_model(random_out=True)
    reference = make_model(random_out=True)
    with torch.no_grad():
        model.transformer.wte.to(dtype=torch.bfloat16)  # what init_weights does on CUDA
        reference.transformer.wte.weight.copy_(model.transformer.wte.weight.float())
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == torch.float32
    assert torch.equal(loss, reference(idx[:, :-1], idx[:, 1:]))
    loss.backward()  # and it trains
    assert model.transformer.wte.weight.grad.dtype == torch.bfloat16


@pytest.mark.slow
def test_model_step_compare_times_two_checkouts_in_turn():
    # bench.model_step --compare against this same checkout: both workers answer every round, the ratio is printed
    import os
    import re
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "bench.model_step", f"--compare={repo}", "--depth=1", "--seq_len=16",
                          "--batch_size=2", "--vocab_size=256", "--head_dim=32", "--threads=1", "--rounds=2",
                          "--steps=1", "--warmup=1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rounds = re.findall(r"^round (\d): this ([\d,]+) tokens/s .* other ([\d,]+) .* ratio ([\d.]+)", out.stdout, re.M)
    assert [r[0] for r in rounds] == ["1", "2"]
    assert all(float(r[1].replace(",", "")) > 0 and float(r[2].replace(",", "")) > 0 for r in rounds)
    assert re.search(r"median ratio this/other \d+\.\d\d", out.stdout)
