"""
Tests of scripts/import_nanochat.py and nanochat/nanochat_import.py on fixtures written here in nanochat's own
formats (October 2025): a pickled tiktoken Encoding (tokenizer.pkl), a torch.save'd state dict with nanochat's
key names (wte in bf16, as the published models), meta_<step>.json with nanochat's keys, nanochat's older
token_bytes.pt and a single-file optim_<step>.pt.
- import -> the imported model's logits equal the source weights' exactly; the tokenizer renders
  conversations exactly as the original tiktoken Encoding; chat_sft trains 2 steps from the import and saves;
- a malicious tokenizer.pkl is refused and its payload never runs; a checkpoint with parts no GPTConfig option
  makes is refused naming them; the overwrite rules; the loading hints in checkpoint_manager.
- nanochat 2026 (a state dict written here with nanochat's current key names and shapes, per-rank MuonAdamW
  optimizer files): the imported model's logits equal a hand-written reference of nanochat's maths
  (tests/test_gpt_2026.py), greedy decoding gives the same tokens, the optimizer state warm-starts chat_sft's
  optimizers with nanochat's moments.

    .venv/bin/python -m pytest tests/test_import_nanochat.py
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GPTConfig(sequence_len=128, vocab_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
NANOCHAT_CONFIG = {k: getattr(CONFIG, k) for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                                   "n_embd")}  # nanochat October's meta model_config
STEP = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def nanochat_state_dict(seed=0):
    """Random weights under nanochat's key names, embedding stored in bf16 as in the published checkpoints."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(CONFIG)
    sd = {k: torch.randn(v.shape) * 0.05 for k, v in model.state_dict().items()}
    sd["transformer.wte.weight"] = (torch.randn(CONFIG.vocab_size, CONFIG.n_embd)).bfloat16()
    return sd


def write_nanochat_folder(folder, tokenizer, state_dict=None, meta_extra=None, optimizer=True):
    """A flat folder as published on the hub: model/meta/optim of one step, tokenizer.pkl, token_bytes.pt."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)  # nanochat's RustBPETokenizer.save: pickle.dump(self.enc, f)
    # nanochat's older tok_train: len(decode([id]).encode("utf-8")), 0 for specials (bytes 128-255 count 3)
    specials = set(tokenizer.enc._special_tokens.values())
    old = [0 if i in specials else len(tokenizer.decode([i]).encode("utf-8")) for i in range(CONFIG.vocab_size)]
    torch.save(torch.tensor(old, dtype=torch.int32), os.path.join(folder, "token_bytes.pt"))
    sd = state_dict if state_dict is not None else nanochat_state_dict()
    torch.save(sd, os.path.join(folder, f"model_{STEP:06d}.pt"))
    meta = {"step": STEP, "val_bpb": 1.2345, "model_config": dict(NANOCHAT_CONFIG),
            "user_config": {"run": "d2", "depth": 2}, "device_batch_size": 4, "max_seq_len": 128}
    meta.update(meta_extra or {})
    with open(os.path.join(folder, f"meta_{STEP:06d}.json"), "w") as f:
        json.dump(meta, f)
    if optimizer:
        torch.save([{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}],
                   os.path.join(folder, f"optim_{STEP:06d}.pt"))
    return sd


def run_import(base_dir, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.import_nanochat", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def import_in_process(monkeypatch, base_dir, *args):
    """Run the script in this process (no interpreter start-up): -> its stdout; a refusal raises UserError."""
    import contextlib
    import io
    import runpy

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(sys, "argv", ["import_nanochat", *map(str, args)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its handler; put it back after
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        runpy.run_module("scripts.import_nanochat", run_name="__main__")
    return buf.getvalue()


def reference_model(state_dict):
    """The project's GPT with the source weights loaded directly (no import in between)."""
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(state_dict)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("import")
    src = root / "nanochat-d2"
    sd = write_nanochat_folder(str(src), tokenizer)
    out = run_import(root / "base", src, "--phase", "base")
    assert out.returncode == 0, out.stderr
    return {"root": root, "src": src, "base": root / "base", "sd": sd, "stdout": out.stdout}


def test_import_summary_and_logits_equal_exactly(imported, monkeypatch):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint, load_model

    out = imported["stdout"]
    assert "depth 2, width 64, heads 4 (kv heads 2), vocab 1024, parameters 221,184, step 100" in out
    assert "python -m scripts.chat_sft --source=base --model_tag=d2 --step=100" in out
    assert "token_bytes.pt differs at" in out
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(imported["base"]))
    model, tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["source"] == "nanochat import" and meta["step"] == STEP and meta["model_config"] == vars(CONFIG)
    assert meta["metrics"]["val_bpb"] == 1.2345
    from nanochat.runs import tokenizer_sha256  # the import owns its folder and is tied to its tokenizer
    assert meta["run_name"] == "nanochat import" and meta["run_id"]
    assert meta["tokenizer_sha256"] == tokenizer_sha256(os.path.join(imported["base"], "tokenizer"))
    ref = reference_model(imported["sd"])
    x = torch.randint(0, CONFIG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    # the weights are stored as they came (bf16 embedding included)
    checkpoint_dir = os.path.join(imported["base"], "base_checkpoints", "d2")
    data, optim, _ = load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu", load_optimizer=True)
    for k, v in imported["sd"].items():
        assert data[k].dtype == v.dtype and torch.equal(data[k], v), k
    assert torch.equal(optim[0]["state"][0]["exp_avg"], torch.ones(3))


def test_token_bytes_recomputed_from_raw_bytes(imported, monkeypatch):
    from nanochat.tokenizer import get_token_bytes

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(imported["base"]))
    new = get_token_bytes()
    old = torch.load(imported["src"] / "token_bytes.pt", weights_only=True)
    assert new[200].item() == 1 and old[200].item() == 3  # the single byte 0xC8: 1 byte, not U+FFFD's 3
    assert new[ord("a")].item() == old[ord("a")].item() == 1
    assert new[-1].item() == 0  # a special token


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi! How can I help?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3*3?"},
                  {"role": "assistant", "content": "9, obviously."}]},
    {"messages": [{"role": "user", "content": "What is 12*34? café 日本語 🙂"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute. "},
                      {"type": "python", "text": "12*34"},
                      {"type": "python_output", "text": "408"},
                      {"type": "text", "text": " It is 408."}]}]},
    {"messages": [{"role": "user", "content": "Print <|assistant_end|> and <|bos|> literally\n\tplease"},
                  {"role": "assistant", "content": "def f(x):\n    return x ** 2  # done\n"}]},
]


@pytest.mark.parametrize("max_tokens", [2048, 17, None])
def test_render_conversation_matches_the_original_encoding(imported, tokenizer, monkeypatch, max_tokens):
    from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(imported["base"]))
    imported_tok = get_tokenizer()
    with open(imported["src"] / "tokenizer.pkl", "rb") as f:
        original = RustBPETokenizer(pickle.load(f), "<|bos|>")  # trusted here: the test wrote it
    for conversation in CONVERSATIONS:
        got = imported_tok.render_conversation(conversation, max_tokens=max_tokens)
        assert got == original.render_conversation(conversation, max_tokens=max_tokens)
        assert got == tokenizer.render_conversation(conversation, max_tokens=max_tokens)
        assert imported_tok.render_for_completion(conversation) == original.render_for_completion(conversation)
    if max_tokens == 17:
        assert len(got[0]) == 17


@pytest.mark.slow
def test_chat_sft_runs_two_steps_from_the_import(imported, tmp_path):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    base = tmp_path / "base"
    shutil.copytree(imported["base"], base)
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for a in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                                             {"role": "assistant", "content": f"{a} plus 1 is {a + 1}."}]}) + "\n")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scripts.chat_sft", "--source=base", "--model_tag=d2", f"--step={STEP}",
           "--max_iterations=2", "--device_batch_size=2", "--target_examples_per_step=4", "--max_seq_len=64",
           "--eval_every=-1", "--eval_metrics_every=-1", f"--train_mixture=['CustomJSON:{data}']",
           f"--val_mixture=['CustomJSON:{data}:0:8']"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sft_dir = os.path.join(base, "chatsft_checkpoints", "d2")
    assert find_last_step(sft_dir) == 2
    weights, _, meta = load_checkpoint(sft_dir, 2, "cpu")
    assert meta["step"] == 2
    changed = [k for k, v in imported["sd"].items() if not torch.equal(weights[k].float(), v.float())]
    assert changed  # it trained
    assert all(torch.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------------------------------------------------
# refusals


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle does: call a global on load (here: create a file)
        return (open, (self.marker, "w"))


def test_malicious_tokenizer_pickle_is_refused(tmp_path, tokenizer):
    from nanochat.nanochat_import import load_tiktoken_pickle

    src = tmp_path / "evil"
    write_nanochat_folder(str(src), tokenizer)
    marker = tmp_path / "PWNED"
    with open(src / "tokenizer.pkl", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    out = run_import(tmp_path / "base", src, "--phase", "base")
    assert out.returncode == 2
    assert "refused to load this tokenizer pickle" in out.stderr and "not allowed" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not marker.exists()
    assert not (tmp_path / "base" / "tokenizer").exists() and not (tmp_path / "base" / "base_checkpoints").exists()

    # the payload hidden inside an otherwise genuine Encoding state is refused too
    state = dict(tokenizer.enc.__getstate__())
    state["special_tokens"] = dict(state["special_tokens"], evil=_Payload(str(marker)))

    class FakeEncoding:
        def __reduce__(self):
            return (type(tokenizer.enc), (), state)  # pickled as tiktoken.core.Encoding + a state dict

    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.dumps(FakeEncoding()))
    with pytest.raises(UserError, match="not allowed"):
        load_tiktoken_pickle(str(path))
    assert not marker.exists()
    # a registered-encoding reference (tiktoken would fetch it from the network) is refused as well
    path.write_bytes(pickle.dumps(tiktoken_reference("cl100k_base")))
    with pytest.raises(UserError, match="registered encoding"):
        load_tiktoken_pickle(str(path))


def tiktoken_reference(name):
    class Ref:
        def __reduce__(self):  # tiktoken.core.Encoding with the state tiktoken writes for a registered encoding
            import tiktoken.core

            return (tiktoken.core.Encoding, (), name)

    return Ref()


def test_genuine_pickle_is_read_without_tiktoken_code(tmp_path, tokenizer):
    from nanochat.nanochat_import import load_tiktoken_pickle

    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(tokenizer.enc))
    state = load_tiktoken_pickle(str(path))
    assert state["mergeable_ranks"] == tokenizer.enc._mergeable_ranks
    assert state["pat_str"] == tokenizer.enc._pat_str and state["special_tokens"] == tokenizer._special_ids


def test_unknown_parts_are_refused_naming_them(tmp_path, tokenizer, monkeypatch):
    sd = nanochat_state_dict()
    sd["mystery.weight"] = torch.zeros(3)
    src = tmp_path / "new"
    write_nanochat_folder(str(src), tokenizer, sd)
    out = run_import(tmp_path / "base", src, "--phase", "base")
    assert out.returncode == 2, out.stdout
    err = out.stderr
    assert "weights mystery.weight" in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "base" / "base_checkpoints").exists() and not (tmp_path / "base" / "tokenizer").exists()
    # a meta key no version of nanochat wrote is named too
    write_nanochat_folder(str(src), tokenizer, nanochat_state_dict(),
                          meta_extra={"model_config": dict(NANOCHAT_CONFIG, attention_sinks=4)})
    with pytest.raises(UserError, match="attention_sinks"):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base")


# ---------------------------------------------------------------------------------------------------------
# nanochat 2026

NC26 = dict(sequence_len=512, vocab_size=1030, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)  # short window 128
NC26_PADDED = 1088  # 1030 rounded up to a multiple of 64


def nanochat_2026_state_dict(seed=0):
    """nanochat's current key names and shapes, written out here (not taken from a model): value embeddings and
    their gates on layers 0 and 2 (alternating, the last included), embeddings in bf16 as nanochat saves them."""
    g = torch.Generator().manual_seed(seed)
    L, C, Hkv, D, Vp = NC26["n_layer"], NC26["n_embd"], NC26["n_kv_head"], NC26["n_embd"] // NC26["n_head"], NC26_PADDED

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.wte.weight": rnd(Vp, C, std=0.8).bfloat16(), "lm_head.weight": rnd(Vp, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        sd.update({p + "attn.c_q.weight": rnd(C, C, std=0.2), p + "attn.c_k.weight": rnd(Hkv * D, C, std=0.2),
                   p + "attn.c_v.weight": rnd(Hkv * D, C, std=0.2), p + "attn.c_proj.weight": rnd(C, C),
                   p + "mlp.c_fc.weight": rnd(4 * C, C, std=0.1), p + "mlp.c_proj.weight": rnd(C, 4 * C)})
        if i % 2 == 0:
            sd[p + "attn.ve_gate.weight"] = rnd(Hkv, 12, std=1.0)
            sd[f"value_embeds.{i}.weight"] = rnd(Vp, Hkv * D, std=0.3).bfloat16()
    sd.update(resid_lambdas=torch.tensor([1.15, 1.1, 1.05]), x0_lambdas=torch.tensor([0.2, 0.12, 0.05]),
              smear_gate=None, smear_lambda=torch.tensor([0.4]), backout_lambda=torch.tensor([0.2]))
    del sd["smear_gate"]
    sd["smear_gate.weight"] = rnd(1, 24, std=1.0)
    return sd


def nanochat_2026_optimizer(sd, world_size=2):
    """nanochat's MuonAdamW state dicts, one per rank: AdamW groups (lm_head, wte, value embeddings, resid, x0,
    smear/backout scalars; large tensors (>= 1024 elements) sharded along dim 0 over the ranks), then Muon groups
    of the block matrices by sorted shape, each group's stacked momentum buffers split over the ranks (state on
    the group's first parameter). Moments are recognisable: exp_avg[name] = full tensor of index + 1."""
    adam = [["lm_head.weight"], ["transformer.wte.weight"], ["value_embeds.0.weight", "value_embeds.2.weight"],
            ["resid_lambdas"], ["x0_lambdas"], ["smear_gate.weight", "smear_lambda", "backout_lambda"]]
    matrices = [k for k in sd if k.startswith("transformer.h.")]
    shapes = sorted({tuple(sd[k].shape) for k in matrices})
    muon = [[k for k in matrices if tuple(sd[k].shape) == s] for s in shapes]
    ranks = [{"state": {}, "param_groups": []} for _ in range(world_size)]
    index = 0
    full = {}  # what the import must produce: name -> (exp_avg, exp_avg_sq) or momentum buffer
    for kind, groups in (("adamw", adam), ("muon", muon)):
        for names in groups:
            ids = list(range(index, index + len(names)))
            index += len(names)
            for r in ranks:
                r["param_groups"].append({"kind": kind, "params": ids, "lr": 0.1})
            if kind == "adamw":
                for i, name in zip(ids, names):
                    m, v = torch.full(sd[name].shape, float(i + 1)), torch.full(sd[name].shape, float(i + 2))
                    m[0] = -1.0  # the first row differs: a wrong shard order shows
                    full[name] = (m, v)
                    sharded = sd[name].numel() >= 1024
                    for rank, r in enumerate(ranks):
                        rows = sd[name].shape[0] // world_size
                        sl = slice(rank * rows, (rank + 1) * rows) if sharded else slice(None)
                        r["state"][i] = {"step": 7, "exp_avg": m[sl].clone(), "exp_avg_sq": v[sl].clone()}
            else:
                chunk = -(-len(names) // world_size)
                stacked = torch.stack([torch.full(sd[n].shape, 100.0 + j) for j, n in enumerate(names)])
                stacked = torch.cat([stacked, torch.zeros(chunk * world_size - len(names), *stacked.shape[1:])])
                for j, n in enumerate(names):
                    full[n] = stacked[j]
                for rank, r in enumerate(ranks):
                    r["state"][ids[0]] = {"momentum_buffer": stacked[rank * chunk:(rank + 1) * chunk].clone(),
                                          "second_momentum_buffer": torch.ones(chunk, 1, stacked.shape[-1])}
    return ranks, full


@pytest.fixture(scope="module")
def imported_2026(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("import2026")
    src = root / "nanochat-2026"
    sd = nanochat_2026_state_dict()
    write_nanochat_folder(str(src), tokenizer, sd, meta_extra={"model_config": dict(NC26, window_pattern="SSL")},
                          optimizer=False)
    ranks, full = nanochat_2026_optimizer(sd)
    for r, state in enumerate(ranks):
        torch.save(state, src / f"optim_{STEP:06d}_rank{r}.pt")
    out = run_import(root / "base", src, "--phase", "base")
    assert out.returncode == 0, out.stderr
    return {"base": root / "base", "sd": sd, "optim": full, "stdout": out.stdout}


def test_2026_import_logits_equal_reference_and_greedy_tokens(imported_2026, monkeypatch):
    from test_gpt_2026 import reference_logits

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    assert "architecture: nanochat 2026 (window_pattern=SSL, short_window=0, value_embeds=True" \
        in imported_2026["stdout"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(imported_2026["base"]))
    model, tokenizer, meta = load_model("base", "cpu", "eval")
    cfg = model.config
    assert (cfg.value_embeds, cfg.lambdas, cfg.smear, cfg.backout) == (True, True, True, True)
    assert (cfg.window_pattern, cfg.qk_scale, cfg.rotary_base, cfg.pad_vocab_to) == ("SSL", 1.2, 100000, 64)
    assert model.window_sizes == [128, 128, None]
    assert meta["model_config"]["window_pattern"] == "SSL"
    sd = {k: v.float() for k, v in imported_2026["sd"].items()}
    x = torch.randint(0, 1024, (2, 200), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        got, want = model(x), reference_logits(sd, cfg, x)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-5, rel
    # greedy decoding with the KV cache (windows, smear) gives the reference's tokens
    prompt = x[0, :150].tolist()
    ids = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            ids.append(int(reference_logits(sd, cfg, torch.tensor([ids]))[0, -1].argmax()))
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=6, temperature=0.0)
    n = len(rows[0]) - len(prompt)  # the engine stops early at <|assistant_end|> / <|bos|>
    assert n >= 1 and rows[0][len(prompt):] == ids[len(prompt):len(prompt) + n]


def test_2026_optimizer_state_warm_starts_this_projects_optimizers(imported_2026, monkeypatch):
    from nanochat.checkpoint_manager import build_model
    from nanochat.runs import load_optimizer_warm_start

    checkpoint_dir = os.path.join(imported_2026["base"], "base_checkpoints", "d3")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(imported_2026["base"]))
    model, _, _ = build_model(checkpoint_dir, STEP, "cpu", "train")
    adamw, muon = model.setup_optimizers()
    load_optimizer_warm_start([adamw, muon], checkpoint_dir, STEP, "cpu")
    full = imported_2026["optim"]
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith("transformer.h."):
            assert torch.equal(muon.state[p]["momentum_buffer"], full[name]), name
        else:
            m, v = full[name]
            assert torch.equal(adamw.state[p]["exp_avg"], m) and torch.equal(adamw.state[p]["exp_avg_sq"], v), name
            assert float(adamw.state[p]["step"]) == 7
    assert len(muon.state) + len(adamw.state) == len(params)


def test_unsupported_parts_of_a_supported_checkpoint_is_empty():
    from nanochat.nanochat_import import unsupported_parts

    sd = nanochat_state_dict()
    assert unsupported_parts(sd, NANOCHAT_CONFIG) == []
    del sd["lm_head.weight"]
    sd["transformer.h.1.attn.c_q.weight"] = torch.zeros(3, 3)
    problems = unsupported_parts(sd, NANOCHAT_CONFIG)
    assert "missing weights lm_head.weight" in problems
    assert any("transformer.h.1.attn.c_q.weight has shape (3, 3)" in p for p in problems)


def test_overwrite_rules(tmp_path, tokenizer, monkeypatch):
    from nanochat.checkpoint_manager import load_checkpoint
    from nanochat.tokenizer import RustBPETokenizer

    base = tmp_path / "base"
    src = tmp_path / "a"
    write_nanochat_folder(str(src), tokenizer)
    import_in_process(monkeypatch, base, src, "--phase", "mid")
    again = import_in_process(monkeypatch, base, src, "--phase", "mid")  # the same import again: nothing to do
    assert "already holds this import" in again

    # different weights into the same folder: refused, then replaced with --overwrite 1
    other = tmp_path / "b"
    sd_b = write_nanochat_folder(str(other), tokenizer, nanochat_state_dict(seed=1))
    with pytest.raises(UserError, match=r"mid_checkpoints.*--overwrite 1"):
        import_in_process(monkeypatch, base, other, "--phase", "mid")
    import_in_process(monkeypatch, base, other, "--phase", "mid", "--output_tag", "other")
    import_in_process(monkeypatch, base, other, "--phase", "mid", "--overwrite", "1")
    data, _, _ = load_checkpoint(str(base / "mid_checkpoints" / "d2"), STEP, "cpu")
    assert torch.equal(data["lm_head.weight"], sd_b["lm_head.weight"])

    # a different tokenizer: refused (the base dir's checkpoints use the existing one)
    small = RustBPETokenizer.from_ranks({bytes([i]): i for i in range(256)} | {b"ab": 256})
    third = tmp_path / "c"
    write_nanochat_folder(str(third), tokenizer)
    with open(third / "tokenizer.pkl", "wb") as f:
        pickle.dump(small.enc, f)
    with pytest.raises(UserError, match="different tokenizer"):
        import_in_process(monkeypatch, base, third, "--phase", "base")
    assert RustBPETokenizer.from_directory(str(base / "tokenizer")).get_vocab_size() == tokenizer.get_vocab_size()
    assert not (base / "base_checkpoints").exists()


def test_nanochat_base_dir_layout_and_step_choice(tmp_path, tokenizer, monkeypatch):
    nano = tmp_path / "nanochat_base"
    ckpt = nano / "chatsft_checkpoints" / "d2"
    write_nanochat_folder(str(ckpt), tokenizer)
    (nano / "tokenizer").mkdir()
    shutil.move(str(ckpt / "tokenizer.pkl"), str(nano / "tokenizer" / "tokenizer.pkl"))
    shutil.move(str(ckpt / "token_bytes.pt"), str(nano / "tokenizer" / "token_bytes.pt"))
    with pytest.raises(UserError, match=r"--step 7: .*steps found: 100"):
        import_in_process(monkeypatch, tmp_path / "base", nano, "--phase", "sft", "--step", "7")
    out = import_in_process(monkeypatch, tmp_path / "base", nano, "--phase", "sft", "--output_tag", "mine")
    assert "python -m scripts.chat_cli -i sft -g mine -s 100" in out
    assert (tmp_path / "base" / "chatsft_checkpoints" / "mine").is_dir()
    with pytest.raises(UserError, match="no mid_checkpoints"):
        import_in_process(monkeypatch, tmp_path / "base", nano, "--phase", "mid")


# ---------------------------------------------------------------------------------------------------------
# loading hints in checkpoint_manager


def test_load_model_on_a_nanochat_folder_names_the_import_command(tmp_path, tokenizer, monkeypatch):
    from nanochat.checkpoint_manager import load_model

    base = tmp_path / "base"
    folder = base / "base_checkpoints" / "d2"
    write_nanochat_folder(str(folder), tokenizer)  # nanochat's files copied in as they are
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with pytest.raises(UserError, match=r"python -m scripts\.import_nanochat .*base_checkpoints/d2 --phase base"):
        load_model("base", "cpu", "eval")


def test_load_checkpoint_accepts_nanochat_single_optimizer_file(tmp_path):
    from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint

    save_checkpoint(str(tmp_path), STEP, nanochat_state_dict(), None, {"step": STEP, "model_config": vars(CONFIG)})
    torch.save([{"state": {0: {"exp_avg": torch.full((2,), 7.0)}}}], tmp_path / f"optim_{STEP:06d}.pt")
    _, optim, _ = load_checkpoint(str(tmp_path), STEP, "cpu", load_optimizer=True, rank=0)
    assert torch.equal(optim[0]["state"][0]["exp_avg"], torch.full((2,), 7.0))
    with pytest.raises((FileNotFoundError, UserError)):  # rank 1 has no state in nanochat's single file
        load_checkpoint(str(tmp_path), STEP, "cpu", load_optimizer=True, rank=1)


# ---------------------------------------------------------------------------------------------------------
# hostile or broken imports (issue 24): nothing of the user's is replaced unless every check passed


def test_output_tag_is_a_name_never_a_path(tmp_path, tokenizer, monkeypatch):
    src = tmp_path / "src"
    write_nanochat_folder(str(src), tokenizer)
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    base = tmp_path / "base"
    import_in_process(monkeypatch, base, src, "--phase", "base")  # a d2 checkpoint to protect
    before = sorted(os.listdir(base / "base_checkpoints"))
    for tag in (str(victim), ".", "..", "../tokenizer", ""):
        with pytest.raises(UserError, match="plain folder name"):
            import_in_process(monkeypatch, base, src, "--phase", "base", "--output_tag", tag, "--overwrite", "1")
    assert (victim / "thesis.txt").read_text() == "years of work"
    assert sorted(os.listdir(base / "base_checkpoints")) == before


def test_nan_weights_replace_nothing(tmp_path, tokenizer, monkeypatch):
    from nanochat.runs import tokenizer_sha256
    from nanochat.tokenizer import RustBPETokenizer

    base = tmp_path / "base"
    good = tmp_path / "good"
    write_nanochat_folder(str(good), tokenizer)
    import_in_process(monkeypatch, base, good, "--phase", "base")
    before = {p: open(p, "rb").read() for p in map(str, (base / "tokenizer").iterdir())}
    ckpt_before = sorted(os.listdir(base / "base_checkpoints" / "d2"))
    # another tokenizer and NaN weights, with --overwrite 1: refused before either is written
    small = RustBPETokenizer.from_ranks({bytes([i]): i for i in range(256)} | {b"ab": 256})
    bad = tmp_path / "bad"
    sd = nanochat_state_dict(seed=3)
    sd["lm_head.weight"][0, 0] = float("nan")
    write_nanochat_folder(str(bad), tokenizer, sd)
    with open(bad / "tokenizer.pkl", "wb") as f:
        pickle.dump(small.enc, f)
    with pytest.raises(UserError, match="lm_head.weight' holds NaN/inf"):
        import_in_process(monkeypatch, base, bad, "--phase", "base", "--overwrite", "1")
    assert {p: open(p, "rb").read() for p in before} == before
    assert sorted(os.listdir(base / "base_checkpoints" / "d2")) == ckpt_before
    assert tokenizer_sha256(str(base / "tokenizer")) is not None
    assert not [n for n in os.listdir(base) if n.startswith(".import-")]


@pytest.mark.parametrize("key, value, message", [
    ("sequence_len", 0, "sequence_len = 0 must be an integer from 1"),
    ("sequence_len", 10**9, "sequence_len = 1000000000 must be an integer from 1 to 1048576"),
    ("n_layer", 2.7, "n_layer = 2.7 must be an integer"),
    ("n_layer", 200000, "n_layer = 200000"),
    ("n_embd", -64, "n_embd = -64"),
    ("vocab_size", float("inf"), "vocab_size = inf"),
    ("n_head", "4", "n_head = '4'"),
    ("n_head", 3, "do not fit"),
])
def test_meta_numbers_are_checked(tmp_path, tokenizer, monkeypatch, key, value, message):
    src = tmp_path / "src"
    write_nanochat_folder(str(src), tokenizer, meta_extra={"model_config": dict(vars(CONFIG), **{key: value})})
    with pytest.raises(UserError, match=message):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base")
    assert not (tmp_path / "base" / "base_checkpoints").exists()


def test_meta_with_infinity_is_one_line(tmp_path, tokenizer):
    src = tmp_path / "src"
    write_nanochat_folder(str(src), tokenizer)
    meta = src / f"meta_{STEP:06d}.json"
    meta.write_text(meta.read_text().replace('"sequence_len": 128', '"sequence_len": Infinity'))
    out = run_import(tmp_path / "base", src, "--phase", "base")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "sequence_len = inf" in out.stderr


def test_files_are_regular_and_bounded(tmp_path, tokenizer, monkeypatch):
    src = tmp_path / "src"
    write_nanochat_folder(str(src), tokenizer)
    model = src / f"model_{STEP:06d}.pt"
    model.unlink()
    os.symlink("/dev/zero", model)
    with pytest.raises(UserError, match="not a regular file"):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base")
    model.unlink()
    with open(model, "wb") as f:  # a file far larger than a 2-layer model can be (sparse: no disk used)
        f.truncate(1 << 40)
    with pytest.raises(UserError, match="more than the"):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base")
    write_nanochat_folder(str(src), tokenizer)
    meta = src / f"meta_{STEP:06d}.json"
    meta.unlink()
    os.mkfifo(meta)  # opening a FIFO would block forever
    with pytest.raises(UserError, match="not a regular file"):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base")


def test_bad_tokenizer_state_is_one_line(tokenizer, monkeypatch):
    from nanochat.nanochat_import import _encoding_state_problem

    ranks = {bytes([i]): i for i in range(256)}
    assert "collide" in _encoding_state_problem({"name": "x", "pat_str": ".", "mergeable_ranks": ranks,
                                                 "special_tokens": {"<|bos|>": 300, "<|user_start|>": 300}})
    assert "collide" in _encoding_state_problem({"name": "x", "pat_str": ".", "mergeable_ranks": ranks,
                                                 "special_tokens": {"<|bos|>": 17}})
    enc = tokenizer.enc  # an Encoding whose pattern tiktoken cannot compile (it is only compiled on build)
    state = {"name": enc.name, "pat_str": "(unclosed", "mergeable_ranks": enc._mergeable_ranks,
             "special_tokens": enc._special_tokens}
    from nanochat import nanochat_import

    monkeypatch.setattr(nanochat_import, "load_tiktoken_pickle", lambda path: state)
    with pytest.raises(UserError, match="pat_str '\\(unclosed' is not a valid pattern"):
        nanochat_import.tokenizer_from_pickle("tokenizer.pkl")


def test_import_into_a_folder_a_live_run_owns_is_refused(tmp_path, tokenizer, monkeypatch):
    import socket

    from nanochat.folder_lock import LOCK_FILE

    src = tmp_path / "src"
    write_nanochat_folder(str(src), tokenizer)
    target = tmp_path / "base" / "base_checkpoints" / "d2"
    target.mkdir(parents=True)
    (target / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                "started": "now", "command": "base_train"}))
    with pytest.raises(UserError, match="in use by another run"):
        import_in_process(monkeypatch, tmp_path / "base", src, "--phase", "base", "--overwrite", "1")
    assert os.listdir(target) == [LOCK_FILE]
