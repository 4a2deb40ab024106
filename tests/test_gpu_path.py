"""
Tests of the fast (GPU) training path, run on CPU: chunked cross-entropy against the unchunked loss (values and
gradients), flex_attention's block mask against the SDPA boolean mask in the whole model, pad bucketing,
a compiled bestfit step against eager, and the optimizer warm start (load_optimizer = 1). The tests marked
`cuda` run the same comparisons on a GPU, in bf16 (flex_attention backward, the compiled step, the chunked loss's
memory); they are skipped without CUDA (tests/conftest.py) and run by bash bench/gpu_proof.sh.

    .venv/bin/python -m pytest tests/test_gpu_path.py --durations=5
"""

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.gpt import GPTConfig, chunked_cross_entropy, random_model
from nanochat.perf import batch_flops, bucketed_length, mfu, pad_to_bucket, round_up
from nanochat.collate import collate_packed

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

V = 320


@pytest.fixture
def single_process_compile():
    """Inductor compiles in this process: its pool of compile workers costs more than it saves on a small,
    busy CPU (the compiled tests take about half as long)."""
    import torch._inductor.config

    with torch._inductor.config.patch(compile_threads=1):
        yield


def make_model(seed=0, n_layer=2, n_embd=64, n_head=2, sequence_len=256):
    config = GPTConfig(sequence_len=sequence_len, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                       n_embd=n_embd)
    return random_model(config, seed=seed, output_std=0.05)


def reference_loss(x, weight, targets, reduction, softcap=15.0):
    logits = (x @ weight.T).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("chunk_size", [64, 97, 1000])
def test_chunked_cross_entropy_matches_full(reduction, chunk_size):
    torch.manual_seed(0)
    N, C = 300, 32
    x0, w0 = torch.randn(N, C), torch.randn(V, C) * 0.5
    targets = torch.randint(0, V, (N,))
    targets[::7] = -1
    targets[40:80] = -1  # a whole run of ignored targets
    upstream = torch.linspace(0.5, 1.5, N) if reduction == "none" else torch.tensor(1.0)
    results = []
    for fn in (reference_loss, lambda x, w, t, r: chunked_cross_entropy(x, w, t, reduction=r, chunk_size=chunk_size)):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(x, w, targets, reduction)
        (loss * upstream).sum().backward()
        results.append((loss.detach(), x.grad, w.grad))
    (ref_loss, ref_gx, ref_gw), (loss, gx, gw) = results
    assert loss.shape == ref_loss.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for got, want in ((gx, ref_gx), (gw, ref_gw)):
        assert float(want.abs().max()) > 0
        assert float((got - want).abs().max()) <= 1e-6 * max(1.0, float(want.abs().max()))
    if reduction == "none":
        assert torch.all(loss[targets == -1] == 0)


def test_chunked_cross_entropy_mean_of_nothing_is_nan_like_torch():
    x, w = torch.randn(10, 8), torch.randn(V, 8)
    targets = torch.full((10,), -1)
    assert math.isnan(float(chunked_cross_entropy(x, w, targets, reduction="mean", chunk_size=4)))
    assert math.isnan(float(reference_loss(x, w, targets, "mean")))
    assert float(chunked_cross_entropy(x, w, targets, reduction="sum", chunk_size=4)) == 0.0


def _largest_saved_tensor(fn):
    """The numel of the largest logits-shaped tensor (last dim = vocab) autograd saves for backward while fn()
    runs (0 when none)."""
    sizes = [0]

    def pack(t):
        if t.dim() >= 2 and t.size(-1) == V:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, max(sizes)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_model_loss_chunked_equals_unchunked_and_saves_no_full_logits(reduction):
    model = make_model()
    torch.manual_seed(1)
    B, T = 3, 100
    idx = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[:, :10] = -1
    targets[1, 50:] = -1
    results = {}
    model.loss_chunk_min_bytes = 0  # chunk even these small logits
    for chunk in (0, 64):
        model.zero_grad(set_to_none=True)
        model.loss_chunk_size = chunk
        loss, largest = _largest_saved_tensor(lambda: model(idx, targets, loss_reduction=reduction))
        loss.sum().backward()
        results[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, largest)
    (ref, ref_grads, full_largest), (loss, grads, chunk_largest) = results[0], results[64]
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for name in ref_grads:
        diff = float((grads[name] - ref_grads[name]).abs().max())
        assert diff <= 1e-6 * max(1.0, float(ref_grads[name].abs().max())), (name, diff)
    # the unchunked loss keeps (B*T, vocab) logits for backward; the chunked one keeps no logits at all
    # (each chunk is recomputed in backward)
    assert full_largest >= B * T * V
    assert chunk_largest == 0


def test_loss_is_chunked_only_above_the_byte_threshold():
    from nanochat.gpt import GPT, loss_chunk_rows

    assert loss_chunk_rows(8 * 512, 8192, 2048, GPT.loss_chunk_min_bytes_default) == 0  # bench.model_step: plain
    assert loss_chunk_rows(8 * 2048, 65536, 2048, GPT.loss_chunk_min_bytes_default) == 2048  # d20 SFT: chunked
    assert loss_chunk_rows(10, 100, 4, 10 * 100 * 4) == 0 and loss_chunk_rows(10, 100, 4, 10 * 100 * 4 - 1) == 4
    assert loss_chunk_rows(10, 100, 0, 0) == 0  # loss_chunk_size = 0: always plain
    # in the model: 2 x 50 tokens x V fp32 logits; chunked (nothing of logit size saved) only under the threshold
    model = make_model()
    idx, targets = torch.randint(0, V, (2, 50)), torch.randint(0, V, (2, 50))
    model.loss_chunk_size = 16
    largest = {}
    for min_bytes in (100 * V * 4, 100 * V * 4 - 1):
        model.loss_chunk_min_bytes = min_bytes
        loss, largest[min_bytes] = _largest_saved_tensor(lambda: model(idx, targets))
    assert largest[100 * V * 4] >= 100 * V and largest[100 * V * 4 - 1] == 0


def test_flex_block_mask_model_forward_equals_sdpa_mask_forward():
    # the CUDA path (flex_attention with one block mask per batch) against the CPU path (SDPA + boolean mask),
    # through the whole model; flex runs forward-only (eager) on CPU
    model = make_model(n_head=4)
    torch.manual_seed(2)
    B, T = 2, 256
    idx = torch.randint(0, V, (B, T))
    seg = torch.cat([torch.full((B, 100), 1), torch.full((B, 130), 2), torch.zeros(B, 26, dtype=torch.long)], 1)
    seg[1, :50] = 7  # a different split in the second row
    targets = torch.randint(0, V, (B, T))
    out = {}
    with torch.no_grad():
        for use_flex in (False, True):
            model.use_flex = use_flex
            logits = model(idx, segment_ids=seg)
            loss = model(idx, targets, loss_reduction="none", segment_ids=seg)
            out[use_flex] = (logits, loss)
    max_diff = float((out[True][0] - out[False][0]).abs().max())
    print(f"flex vs sdpa: max |logit diff| = {max_diff:.2e}")
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-5)
    # and the mask matters: without segments the second segment's outputs change
    with torch.no_grad():
        model.use_flex = None
        plain = model(idx)
    assert float((plain[:, 100:230] - out[False][0][:, 100:230]).abs().max()) > 1e-3


@pytest.mark.slow
def test_compiled_model_with_flex_block_mask_equals_sdpa_mask(single_process_compile):
    # the compiled CUDA path, forward-only on CPU: the block mask is built outside the graph (one graph break
    # at the start of forward, none per layer) and flex_attention is traced into the model's graph
    from nanochat.perf import compile_model, compiled_graphs

    model = make_model(n_layer=1, n_head=4)  # one layer: compiling on CPU is slow
    torch.manual_seed(2)
    B, T = 2, 256
    idx = torch.randint(0, V, (B, T))
    seg = torch.cat([torch.full((B, 100), 1), torch.full((B, 130), 2), torch.zeros(B, 26, dtype=torch.long)], 1)
    graphs_before = compiled_graphs()
    with torch.no_grad():
        model.use_flex = True
        compiled_flex = compile_model(model)(idx, segment_ids=seg)
        assert 1 <= compiled_graphs() - graphs_before <= 2
        model.use_flex = False
        eager_sdpa = model(idx, segment_ids=seg)
    torch.testing.assert_close(compiled_flex, eager_sdpa, rtol=0, atol=1e-5)


def test_pad_bucketing_shapes():
    assert [round_up(n, 128) for n in (1, 128, 129, 300)] == [128, 128, 256, 384]
    assert round_up(37, 1) == 37
    assert bucketed_length(300, 128, max_len=320) == 320 and bucketed_length(330, 128, max_len=320) == 330
    inputs, targets = torch.arange(6).view(2, 3), torch.tensor([[1, -1, 2], [3, 4, -1]])
    pi, pt = pad_to_bucket(inputs, targets, 4, pad_id=9)
    assert pi.tolist() == [[0, 1, 2, 9], [3, 4, 5, 9]] and pt.tolist() == [[1, -1, 2, -1], [3, 4, -1, -1]]
    same_i, same_t = pad_to_bucket(inputs, targets, 1, pad_id=9)
    assert same_i is inputs and same_t is targets
    # lengths 1..2048 with buckets of 128 give 16 shapes
    assert len({bucketed_length(t, 128, 2048) for t in range(1, 2049)}) == 16


def test_pad_bucketing_changes_no_loss_value():
    model = make_model()
    torch.manual_seed(3)
    inputs = torch.randint(0, V, (3, 37))
    targets = torch.randint(0, V, (3, 37))
    targets[0, 30:] = -1
    targets[2, :5] = -1
    padded_inputs, padded_targets = pad_to_bucket(inputs, targets, 16, pad_id=5)
    assert padded_inputs.shape == (3, 48)
    with torch.no_grad():
        for reduction in ("sum", "mean"):
            a = model(inputs, targets, loss_reduction=reduction)
            b = model(padded_inputs, padded_targets, loss_reduction=reduction)
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        per_token = model(padded_inputs, padded_targets, loss_reduction="none")
        torch.testing.assert_close(per_token[:, :37], model(inputs, targets, loss_reduction="none"), rtol=1e-6,
                                   atol=1e-6)
        assert torch.all(per_token[:, 37:] == 0)


def test_mfu_and_batch_flops_count_each_batch_at_its_own_length():
    assert mfu(6e12, 1.0, None) is None
    assert mfu(6e12, 2.0, 1e13, world_size=2) == pytest.approx(6e12 / 2 / 2e13)
    model = make_model(sequence_len=64)
    cfg = model.config
    dense = 6 * (model.num_params() - model.transformer.wte.weight.numel())
    attention = 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head)  # per token and per position of the row
    assert model.estimate_flops() == dense + attention * 64 and model.estimate_flops(16) == dense + attention * 16
    inputs = torch.zeros(3, 16, dtype=torch.long)  # a short padded batch: its attention term is at T = 16, not 64
    total, useful = batch_flops(model, inputs, pad_positions=12)
    assert total == (dense + attention * 16) * 48 and useful == (dense + attention * 16) * 36


def _bestfit_batches(num_batches, rows=2, row_capacity=65, seed=0):
    """Packed rows of random 'conversations' (collate_packed): the shape is the same for every batch."""
    import random

    rng = random.Random(seed)
    batches = []
    for _ in range(num_batches):
        row_items = []
        for _ in range(rows):
            items, room = [], row_capacity
            while room > 8:
                n = rng.randint(4, min(30, room))
                ids = [rng.randrange(V) for _ in range(n)]
                mask = [0] * (n // 2) + [1] * (n - n // 2)
                items.append((ids, mask))
                room -= n
            row_items.append(items)
        batches.append(collate_packed(row_items, row_capacity, pad_id=0))
    return batches


def _eager_and_compiled_losses(make, batches, autocast):
    """The losses of three optimizer steps on `batches`, eager and torch.compile(dynamic=False): {compiled: [loss]},
    each from a fresh make() (the same seed); asserts that the compiled run did compile."""
    from nanochat.perf import compile_model, compiled_graphs

    losses = {}
    for compiled in (False, True):
        orig_model = make()
        model = compile_model(orig_model) if compiled else orig_model
        optimizers = orig_model.setup_optimizers()
        graphs_before = compiled_graphs()
        losses[compiled] = []
        for inputs, targets, segment_ids in batches:
            with autocast():
                loss = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids)
            (loss / (targets != -1).sum()).backward()
            for opt in optimizers:
                opt.step()
            orig_model.zero_grad(set_to_none=True)
            losses[compiled].append(float(loss.detach()))
        if compiled:
            assert compiled_graphs() > graphs_before  # it did compile
    print(f"eager {losses[False]} compiled {losses[True]}")
    return losses


@pytest.mark.slow
def test_compiled_bestfit_step_matches_eager(single_process_compile):
    # three optimizer steps of a tiny model on packed rows (segment mask), eager vs torch.compile(dynamic=False)
    def tiny_model():
        model = make_model(n_layer=1, n_embd=32)
        model.loss_chunk_size, model.loss_chunk_min_bytes = 64, 0  # the chunked loss is in the graph
        return model

    losses = _eager_and_compiled_losses(tiny_model, _bestfit_batches(3), contextlib.nullcontext)
    assert losses[False][0] != losses[False][2]  # the steps changed the model
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (losses[False], losses[True])


# ---------------------------------------------------------------------------------------------------------
# load_optimizer = 1: warm start from the source checkpoint's optimizer state


def _save_source(base_dir, with_optimizer, steps=2):
    """A 'base' checkpoint of the tiny model after `steps` optimizer steps (so its moments are non-zero)."""
    from nanochat.checkpoint_manager import SOURCE_DIRS, save_checkpoint

    model = make_model(seed=4, sequence_len=64)
    optimizers = model.setup_optimizers()
    torch.manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, V, (2, 16))
        model(idx[:, :-1], idx[:, 1:]).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    checkpoint_dir = os.path.join(base_dir, SOURCE_DIRS["base"], "d2")
    meta = {"step": steps, "model_config": vars(model.config).copy(), "user_config": {}, "git_commit": "unknown"}
    save_checkpoint(checkpoint_dir, steps, model.state_dict(),
                    [opt.state_dict() for opt in optimizers] if with_optimizer else None, meta)
    return model, optimizers


def test_load_optimizer_warm_start_equals_hand_computed_step(tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import resolve_checkpoint
    from nanochat.runs import load_optimizer_warm_start
    from nanochat.muon import zeropower_via_newtonschulz5

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    source_model, source_opts = _save_source(str(tmp_path), with_optimizer=True)
    lr_frac = 0.02  # chat_sft's init_lr_frac: the warm-started optimizers keep THIS run's lrs

    def sft_setup():
        model = make_model(seed=4, sequence_len=64)
        model.load_state_dict(source_model.state_dict())
        optimizers = model.setup_optimizers()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] *= lr_frac
        return model, optimizers

    torch.manual_seed(6)
    idx = torch.randint(0, V, (2, 16))
    results = {}
    for warm in (False, True):
        model, optimizers = sft_setup()
        if warm:
            path = load_optimizer_warm_start(optimizers, *resolve_checkpoint("base"), "cpu")
            assert path.endswith("optim_000002_rank0.pt")
            assert [g["lr"] for g in optimizers[0].param_groups] == \
                   pytest.approx([g["lr"] * lr_frac for g in source_opts[0].param_groups])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(idx[:, :-1], idx[:, 1:]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for opt in optimizers:
            opt.step()
        results[warm] = (before, grads, {n: p.detach().clone() for n, p in model.named_parameters()}, optimizers)
    cold_after, warm_after = results[False][2], results[True][2]
    assert any(not torch.allclose(cold_after[n], warm_after[n]) for n in cold_after)  # differs from a cold start

    # the reference, by hand from the source's saved moments
    before, grads, _, optimizers = results[True]
    names = {id(p): n for n, p in source_model.named_parameters()}
    adamw_src, muon_src = source_opts
    for group in adamw_src.param_groups:  # AdamW (torch.optim.AdamW on one rank): lm_head and embedding
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"] * lr_frac, group["eps"]
        for p in group["params"]:
            name, state = names[id(p)], adamw_src.state[p]
            g = grads[name]
            step = float(state["step"]) + 1
            m = beta1 * state["exp_avg"] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
            m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
            want = before[name] - lr * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(warm_after[name], want, rtol=1e-5, atol=1e-7, msg=name)
    for group in muon_src.param_groups:  # Muon: nesterov momentum, orthogonalised
        momentum, lr = group["momentum"], group["lr"] * lr_frac
        for p in group["params"]:
            name = names[id(p)]
            g, buf = grads[name], muon_src.state[p]["momentum_buffer"]
            new_buf = momentum * buf + (1 - momentum) * g
            direction = zeropower_via_newtonschulz5(g + momentum * (new_buf - g), steps=group["ns_steps"])
            direction = direction * max(1.0, g.size(-2) / g.size(-1)) ** 0.5
            want = before[name] - lr * direction
            torch.testing.assert_close(warm_after[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_load_optimizer_without_source_state_is_a_user_error(tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import resolve_checkpoint
    from nanochat.runs import load_optimizer_warm_start

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model, _ = _save_source(str(tmp_path), with_optimizer=False, steps=1)
    with pytest.raises(UserError, match=r"no optimizer state for rank 0 .*optim_000001_rank0\.pt is missing.*"
                                        r"load_optimizer = 0"):
        load_optimizer_warm_start(model.setup_optimizers(), *resolve_checkpoint("base"), "cpu")


@pytest.mark.slow
def test_chat_sft_load_optimizer_refuses_a_source_without_optimizer_state(tmp_path, tokenizer):
    import json
    import subprocess
    import sys

    from tiny_checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(str(tmp_path), tokenizer, source="base", depth=2, n_embd=64)  # saved without optimizer
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--source=base", "--load_optimizer=1",
                          "--max_seq_len=64", "--eval_every=-1", "--eval_metrics_every=-1", "--max_iterations=1",
                          f"--train_mixture=['CustomJSON:{data}']", f"--val_mixture=['CustomJSON:{data}']"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: load_optimizer = 1:"), out.stderr
    assert "optim_000000_rank0.pt is missing" in lines[0] and "load_optimizer = 0" in lines[0]
    assert not os.path.exists(tmp_path / "chatsft_checkpoints")


@pytest.mark.slow
def test_chat_sft_load_optimizer_warm_starts_from_the_source(tmp_path, tokenizer, monkeypatch):
    # a source saved WITH optimizer state: chat_sft with load_optimizer = 1 takes a different first step than a
    # cold start (its moments are the source's), and says where the state came from
    import json
    import shutil
    import subprocess
    import sys

    from nanochat.checkpoint_manager import SOURCE_DIRS, build_model, load_checkpoint, save_checkpoint
    from tiny_checkpoint import make_tiny_checkpoint

    source = tmp_path / "source"
    checkpoint_dir = make_tiny_checkpoint(str(source), tokenizer, source="base", depth=2, n_embd=64)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(source))  # build_model reads the tokenizer from the base dir
    model, _, meta = build_model(checkpoint_dir, 0, "cpu", phase="train")
    optimizers = model.setup_optimizers()
    torch.manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (2, 17))
    model(idx[:, :-1], idx[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    save_checkpoint(checkpoint_dir, 1, model.state_dict(), [opt.state_dict() for opt in optimizers],
                    dict(meta, step=1))
    data = tmp_path / "chats.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    weights = {}
    for warm in (0, 1):
        base_dir = tmp_path / f"run{warm}"
        shutil.copytree(source, base_dir)
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--source=base", f"--load_optimizer={warm}",
                              "--max_seq_len=64", "--eval_every=-1", "--eval_metrics_every=-1", "--max_iterations=1",
                              "--device_batch_size=2", "--target_examples_per_step=2", "--init_lr_frac=1.0",
                              f"--train_mixture=['CustomJSON:{data}']", f"--val_mixture=['CustomJSON:{data}']"],
                             cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert ("Optimizer state warm-started from" in out.stdout) == bool(warm)
        if warm:
            assert "optim_000001_rank0.pt" in out.stdout
        weights[warm] = load_checkpoint(os.path.join(base_dir, SOURCE_DIRS["sft"], "d2"), 1, "cpu")[0]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ---------------------------------------------------------------------------------------------------------
# On a CUDA GPU (pytest -m cuda; skipped elsewhere): bf16 autocast, flex_attention forward and backward, the
# compiled step, the chunked loss's memory


def _cuda_model(n_layer=2, n_embd=256, n_head=2, vocab_size=V, sequence_len=1024):
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    return random_model(config, seed=0, output_std=0.05, device="cuda")


def _packed_segments(B, T):
    seg = torch.cat([torch.full((B, T // 3), 1), torch.full((B, T // 2), 2), torch.full((B, T - T // 3 - T // 2), 3)],
                    1)
    seg[1, : T // 5] = 7  # a different split in the second row
    return seg.cuda()


@pytest.mark.cuda
def test_cuda_flex_attention_forward_and_backward_equal_the_sdpa_mask():
    model = _cuda_model()
    torch.manual_seed(2)
    B, T = 2, 512
    idx, targets = torch.randint(0, V, (B, T), device="cuda"), torch.randint(0, V, (B, T), device="cuda")
    seg = _packed_segments(B, T)
    out = {}
    for use_flex in (False, True):
        model.use_flex = use_flex
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, targets, segment_ids=seg)
        loss.backward()
        out[use_flex] = (float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    assert abs(out[True][0] - out[False][0]) <= 2e-3 * abs(out[False][0])
    for name, ref in out[False][1].items():
        rel = float((out[True][1][name] - ref).norm() / ref.norm().clamp_min(1e-12))
        assert rel < 2e-2, (name, rel)  # bf16 attention kernels: not bitwise, but the same gradients


@pytest.mark.cuda
def test_cuda_compiled_bestfit_step_matches_eager():
    batches = [tuple(t.cuda() for t in batch) for batch in _bestfit_batches(3, rows=4, row_capacity=257)]
    losses = _eager_and_compiled_losses(_cuda_model, batches, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    assert losses[False][0] != losses[False][2]
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 1e-2 * max(1.0, abs(a)), (losses[False], losses[True])


@pytest.mark.cuda
def test_cuda_chunked_loss_equals_full_and_takes_less_memory():
    from nanochat.perf import peak_memory_mib, reset_peak_memory

    vocab = 32768
    model = _cuda_model(n_layer=1, n_embd=128, vocab_size=vocab)
    torch.manual_seed(3)
    B, T = 4, 1024  # fp32 logits of 512 MiB: the loss dominates the memory
    idx, targets = torch.randint(0, vocab, (B, T), device="cuda"), torch.randint(0, vocab, (B, T), device="cuda")
    result = {}
    for chunk in (0, 1024):
        model.loss_chunk_size, model.loss_chunk_min_bytes = chunk, 0
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        reset_peak_memory("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, targets)
        loss.backward()
        torch.cuda.synchronize()
        result[chunk] = (float(loss), model.lm_head.weight.grad.float().clone(), peak_memory_mib("cuda"))
    (full_loss, full_grad, full_peak), (loss, grad, peak) = result[0], result[1024]
    print(f"peak memory: full loss {full_peak:.0f} MiB, chunked {peak:.0f} MiB")
    assert abs(loss - full_loss) <= 1e-3 * abs(full_loss)
    assert float((grad - full_grad).norm() / full_grad.norm()) < 1e-2
    assert peak < 0.6 * full_peak
