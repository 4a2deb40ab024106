"""Tests for nanochat/checkpoint_manager.py: bit-exact round trip, torch.compile prefix, interrupted saves,
per-rank optimizer files, model discovery, load_model via the tiny checkpoint helper.
Run: .venv/bin/python -m pytest tests/test_checkpoint.py"""

import os

import pytest
import torch

import nanochat.common
from nanochat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint,
                                         load_model, save_checkpoint, strip_compiled_prefix)
from nanochat.gpt import GPT, GPTConfig

CONFIG = GPTConfig(sequence_len=32, vocab_size=128, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def make_model(seed=0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def meta(step):
    return {"step": step, "model_config": vars(CONFIG).copy(), "user_config": {"lr": 0.1}, "git_commit": "abc"}


def test_round_trip_is_bit_exact(tmp_path, monkeypatch):
    model = make_model()
    adamw, muon = model.setup_optimizers()
    model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))).backward()
    adamw.step()
    muon.step()
    opt_data = [adamw.state_dict(), muon.state_dict()]
    save_checkpoint(str(tmp_path), 5, model.state_dict(), opt_data, meta(5))
    model_data, opt_loaded, meta_loaded = load_checkpoint(str(tmp_path), 5, "cpu", load_optimizer=True)
    assert meta_loaded == meta(5)
    for k, v in model.state_dict().items():
        assert torch.equal(model_data[k], v), k
    buf = opt_data[1]["state"][0]["momentum_buffer"]
    assert torch.equal(opt_loaded[1]["state"][0]["momentum_buffer"], buf)
    # build_model: same weights, eval mode (a stand-in tokenizer of the right vocab size)
    import nanochat.tokenizer

    monkeypatch.setattr(nanochat.tokenizer, "get_tokenizer",
                        lambda: type("T", (), {"get_vocab_size": lambda self: 128})())
    built, _, _ = build_model(str(tmp_path), 5, "cpu", "eval")
    assert not built.training
    for k, v in model.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    x = torch.randint(0, 128, (1, 8))
    assert torch.equal(built(x), model(x))


def test_strip_compiled_prefix_is_a_prefix_not_lstrip():
    sd = {"_orig_mod.mlp.w": 1, "_orig_mod.transformer.wte.weight": 2, "decoder.w": 3, "mod._orig_mod.x": 4}
    out = strip_compiled_prefix(sd)
    assert out == {"mlp.w": 1, "transformer.wte.weight": 2, "decoder.w": 3, "mod._orig_mod.x": 4}


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m1, m2 = make_model(1), make_model(2)
    save_checkpoint(str(tmp_path), 1, m1.state_dict(), None, meta(1))
    real_replace = os.replace
    calls = []

    def crash_on_meta(src, dst):  # the model file of step 2 lands, then the process "dies" before the meta
        calls.append(dst)
        if dst.endswith(".json"):
            raise KeyboardInterrupt("simulated crash between write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(nanochat.common.os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, m2.state_dict(), None, meta(2))
    monkeypatch.setattr(nanochat.common.os, "replace", real_replace)
    assert any(c.endswith("model_000002.safetensors") for c in calls)
    assert find_last_step(str(tmp_path)) == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # no temp file left behind
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path), 2, "cpu")
    data, _, m = load_checkpoint(str(tmp_path), find_last_step(str(tmp_path)), "cpu")
    assert m["step"] == 1
    assert torch.equal(data["lm_head.weight"], m1.state_dict()["lm_head.weight"])

    # a crash in the middle of writing the model file itself: the old model file stays intact
    def crash_on_model(src, dst):
        raise KeyboardInterrupt("crash before rename")

    monkeypatch.setattr(nanochat.common.os, "replace", crash_on_model)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 1, m2.state_dict(), None, meta(1))
    monkeypatch.setattr(nanochat.common.os, "replace", real_replace)
    data, _, _ = load_checkpoint(str(tmp_path), 1, "cpu")
    assert torch.equal(data["lm_head.weight"], m1.state_dict()["lm_head.weight"])


def test_optimizer_state_saved_per_rank(tmp_path):
    save_checkpoint(str(tmp_path), 3, None, {"shard": torch.tensor([1.0])}, meta(3), rank=1)
    assert os.path.exists(tmp_path / "optim_000003_rank1.pt")
    assert not os.path.exists(tmp_path / "model_000003.safetensors")


def test_find_largest_model_and_last_step(tmp_path):
    for tag in ["d2", "d10", "d4"]:
        os.makedirs(tmp_path / tag)
    assert find_largest_model(str(tmp_path)) == "d10"
    for step in [0, 7, 12]:
        (tmp_path / "d10" / f"meta_{step:06d}.json").write_text("{}")
    (tmp_path / "d10" / "model_000020.pt").write_bytes(b"")  # no meta: incomplete, ignored
    assert find_last_step(str(tmp_path / "d10")) == 12


def test_default_model_is_the_most_recently_written(tmp_path, capsys):
    from nanochat.checkpoint_manager import find_latest_model, resolve_checkpoint

    sft = tmp_path / "chatsft_checkpoints"
    for i, tag in enumerate(["d10", "mine", "d4"]):
        os.makedirs(sft / tag)
        (sft / tag / "meta_000005.json").write_text("{}")
        os.utime(sft / tag / "meta_000005.json", (1000 + i, 1000 + [3, 9, 1][i]))  # "mine" written last
    os.makedirs(sft / "empty")  # newest folder, but no complete checkpoint: not a candidate
    assert find_latest_model(str(sft)) == "mine"
    assert resolve_checkpoint("sft", base_dir=str(tmp_path)) == (str(sft / "mine"), 5)
    assert "chatsft_checkpoints/mine (the most recently written" in capsys.readouterr().out
    assert resolve_checkpoint("sft", "largest", base_dir=str(tmp_path)) == (str(sft / "d10"), 5)
    assert resolve_checkpoint("sft", "d4", base_dir=str(tmp_path)) == (str(sft / "d4"), 5)


def test_load_model_from_tiny_checkpoint(tmp_path, tokenizer, monkeypatch):
    from tiny_checkpoint import make_tiny_checkpoint

    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    ckpt = make_tiny_checkpoint(str(base), tokenizer, source="sft", depth=2, n_embd=64, step=3)
    assert ckpt.endswith(os.path.join("chatsft_checkpoints", "d2"))
    model, tok, meta_data = load_model("sft", "cpu", phase="eval")
    assert meta_data["step"] == 3 and not model.training
    assert model.config.vocab_size == tok.get_vocab_size() == tokenizer.get_vocab_size()
    ids = torch.tensor([tok.encode("hello world", prepend=tok.get_bos_token_id())])
    assert model(ids).shape == (1, ids.size(1), tok.get_vocab_size())
