"""
Tests of scripts/export_hf.py and nanochat/hf_export.py against transformers itself (transformers is part of the
`dev` extra: this module fails, never skips, when it is missing):
- the script writes a folder AutoModelForCausalLM loads as NanoChatForCausalLM; refuses a non-empty --out;
  names the `hf` extra when transformers is absent;
- fp32 logits agree with the project's model to 1e-4 (MHA, GQA, MQA); greedy generate of 20 tokens equals
  the project's Engine; AutoTokenizer encodes a varied corpus exactly as the project's tokenizer;
  apply_chat_template(..., add_generation_prompt=True) equals render_for_completion.

    .venv/bin/python -m pytest tests/test_export_hf.py
"""

import json
import os
import random
import subprocess
import sys

import pytest
import safetensors
import torch
import transformers  # a plain import: CI installs it through the dev extra, and a missing one must fail

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat.gpt import GPTConfig, random_model
from nanochat.hf_export import write_hf_folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab_size, n_kv_head, n_head=4, n_embd=64, n_layer=2, seed=0):
    """Random weights large enough that logits differ clearly between tokens (not nanochat's zero init)."""
    config = GPTConfig(sequence_len=128, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                       n_embd=n_embd)
    return random_model(config, seed=seed, output_std=0.1).eval()


def meta_of(model):
    return {"step": 5, "model_config": vars(model.config).copy(), "user_config": {"depth": model.config.n_layer},
            "metrics": {"val_loss": 1.5, "arc_easy_acc": 0.25}, "git_commit": "abc123"}


def export(tmp_path, model, tokenizer, dtype="float32"):
    folder = tmp_path / f"hf_{model.config.n_kv_head}_{dtype}"
    write_hf_folder(str(folder), model, tokenizer, meta_of(model), "sft", "d2", 5, dtype)
    return folder


def load_hf(folder):
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                        output_loading_info=True)
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf_model.eval()


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory, tokenizer):
    model = tiny_model(tokenizer.get_vocab_size(), n_kv_head=2)
    folder = export(tmp_path_factory.mktemp("export"), model, tokenizer)
    return model, folder, load_hf(folder), transformers.AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------
# the script


def run_export(base_dir, *args, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.export_hf", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def export_in_process(monkeypatch, base_dir, *args):
    import runpy

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setattr(sys, "argv", ["export_hf", *map(str, args)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its handler; put it back after
    runpy.run_module("scripts.export_hf", run_name="__main__")


@pytest.mark.slow
def test_export_script_writes_a_folder_transformers_loads(tmp_path, tokenizer, monkeypatch):
    base = tmp_path / "base"
    model = tiny_model(tokenizer.get_vocab_size(), n_kv_head=2)
    tokenizer.save(str(base / "tokenizer"))
    save_checkpoint(str(base / "chatsft_checkpoints" / "d2"), 5, model.state_dict(), None, meta_of(model))
    out_dir = tmp_path / "hf"
    res = run_export(base, "-i", "sft", "--out", out_dir)  # default dtype: bfloat16
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "loaded as NanoChatForCausalLM" in res.stdout and "max |logit difference|" in res.stdout
    assert sorted(os.listdir(out_dir)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                           "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (2, 64, 4, 2, 256)
    assert config["final_logit_softcapping"] == 15.0 and config["rms_norm_eps"] == torch.finfo(torch.float32).eps
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["dtype"] == "bfloat16"
    assert config["bos_token_id"] == tokenizer.get_bos_token_id()
    assert config["eos_token_id"] == tokenizer.encode_special("<|assistant_end|>")
    gen = json.loads((out_dir / "generation_config.json").read_text())
    assert tokenizer.encode_special("<|assistant_end|>") in gen["eos_token_id"]
    with safetensors.safe_open(str(out_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "model.layers.1.self_attn.k_proj.weight" in f.keys()
    card = (out_dir / "README.md").read_text()
    assert "| layers | 2 |" in card and "| arc_easy_acc | 0.2500 |" in card and "step 5" in card
    # the bf16 export computes what the project's model computes on bf16-rounded weights
    hf_model = load_hf(out_dir)
    model.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max().item() <= 1e-4

    # a non-empty --out is refused, and replaced when asked
    (out_dir / "README.md").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        export_in_process(monkeypatch, base, "--out", out_dir)
    assert (out_dir / "README.md").read_text() == "mine"
    export_in_process(monkeypatch, base, "--out", out_dir, "--overwrite", "--dtype", "float32", "--verify", "0")
    assert json.loads((out_dir / "config.json").read_text())["dtype"] == "float32"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_nanochat_checkpoint_imported_then_exported(tmp_path, tokenizer, monkeypatch):
    """The whole user path: nanochat's files -> import_nanochat -> export_hf -> transformers computes the
    logits of the original nanochat weights."""
    import importlib

    import_test = importlib.import_module("test_import_nanochat")
    src = tmp_path / "nanochat-d2"
    sd = import_test.write_nanochat_folder(str(src), tokenizer)
    base = tmp_path / "base"
    import_test.import_in_process(monkeypatch, base, src, "--phase", "sft")
    out_dir = tmp_path / "hf"
    export_in_process(monkeypatch, base, "--out", out_dir, "--dtype", "float32", "--verify", "0")
    hf_model = load_hf(out_dir)
    reference = import_test.reference_model(sd)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf_model(ids).logits - reference(ids)).abs().max().item() <= 1e-4
    card = (out_dir / "README.md").read_text()
    assert "imported from nanochat" in card and "| val_bpb | 1.2345 |" in card


def test_missing_transformers_names_the_extra(tmp_path):
    code = (
        "import sys, runpy\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'transformers':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['export_hf', '--out', {str(tmp_path / 'hf')!r}]\n"
        "runpy.run_module('scripts.export_hf', run_name='__main__')\n"
    )
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "error: export_hf needs the optional `hf` extra (transformers is not installed)" in res.stderr
    assert 'pip install -e ".[hf]"' in res.stderr


def test_pyproject_has_the_hf_extra_in_dev():
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(d.startswith("transformers>=5") for d in extras["hf"])
    assert any(d.startswith("transformers>=5") for d in extras["dev"])


# ---------------------------------------------------------------------------------------------------------
# parity with the project's model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_fp32_logits_match_the_project_model(tmp_path, tokenizer, n_kv_head):
    model = tiny_model(tokenizer.get_vocab_size(), n_kv_head=n_kv_head, seed=n_kv_head)
    hf_model = load_hf(export(tmp_path, model, tokenizer))
    ids = torch.randint(0, tokenizer.get_vocab_size(), (3, 64), generator=torch.Generator().manual_seed(n_kv_head))
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    assert ours.std() > 0.1  # the logits are not degenerate
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-4, diff


def test_greedy_generate_matches_the_engine(gqa_export, tokenizer):
    model, _, hf_model, _ = gqa_export
    conversation = {"messages": [{"role": "user", "content": "Tell me about the quick brown fox."}]}
    prompt = tokenizer.render_for_completion(conversation)
    ours = [column[0] for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=20, temperature=0.0)]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=20, do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    assert len(ours) == 20  # no stop token in this run: all 20 tokens are compared
    assert theirs == ours


CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass  # tabs\r\n",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }  // C++ code",
    "Unicode: café, naïve, 日本語, Привет, مرحبا, emoji 🙂🚀👩‍👩‍👧, combining é",
    "Numbers 1234567890 3.14159 -42 1e-10 0xDEADBEEF 2025-11-24",
    "I'm sure they'll say we've done it, DON'T YOU THINK? it's 'quoted'",
    "   leading spaces and trailing   \n\n\n   multiple\nnew lines   ",
    "\x00\x01\x7f control \u200b zero width \ufeff bom",
    "",
    " ",
    "a" * 300,
]
SPECIAL_STRINGS = [
    "<|bos|>",
    "text with <|user_start|>inside<|user_end|> and <|assistant_end|> strings",
    "<|python_start|>print(1)<|python_end|><|output_start|>1<|output_end|>",
]


def random_texts(n, seed=0):
    """Random strings over ASCII, Latin-1, CJK, Cyrillic, emoji and whitespace, to exercise the split regex."""
    rng = random.Random(seed)
    ranges = [(32, 126), (160, 255), (0x4E00, 0x4E80), (0x400, 0x44F), (0x1F600, 0x1F64F), (9, 13)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 60)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def test_autotokenizer_encodes_like_the_project_tokenizer(gqa_export, tokenizer):
    _, _, _, hf_tok = gqa_export
    bos = tokenizer.get_bos_token_id()
    for text in CORPUS + random_texts(300):
        ids = tokenizer.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf_tok(text)["input_ids"] == [bos] + ids  # <|bos|> first, as nanochat's documents
        assert hf_tok.decode(ids) == tokenizer.decode(ids)
    for text in SPECIAL_STRINGS:
        # nanochat encodes special-token strings in text as plain text; transformers does so when asked to
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode(text)
    # by default transformers maps them to the special ids (what chat templates rely on)
    assert hf_tok("<|bos|>", add_special_tokens=False)["input_ids"] == [bos]
    for name in tokenizer.get_special_tokens():
        assert hf_tok.convert_tokens_to_ids(name) == tokenizer.encode_special(name)


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hello there!"}]},
    {"messages": [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi! How can I help?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3*3? 日本語 🙂"}]},
    {"messages": [{"role": "user", "content": "What is 12*34?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute. "},
                      {"type": "python", "text": "12*34"},
                      {"type": "python_output", "text": "408"},
                      {"type": "text", "text": " It is 408."}]},
                  {"role": "user", "content": "def f(x):\n    return x\n"}]},
]


def _ids(encoded):
    return encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded


def test_chat_template_equals_render_for_completion(gqa_export, tokenizer):
    _, _, _, hf_tok = gqa_export
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        ids = _ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        assert ids == tokenizer.render_for_completion(conversation), messages
        full = _ids(hf_tok.apply_chat_template(messages, tokenize=True))
        assert full == tokenizer.render_conversation(conversation, max_tokens=None)[0], messages
    # OpenAI-style content parts (what servers may pass for user/system messages) render as the joined text
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]}]
    ids = _ids(hf_tok.apply_chat_template(parts, add_generation_prompt=True, tokenize=True))
    assert ids == tokenizer.render_for_completion({"messages": [{"role": "system", "content": "You are terse."},
                                                                {"role": "user", "content": "2+2?"}]})
    # decoding a reply without its special tokens
    reply = tokenizer.render_conversation(CONVERSATIONS[3])[0]
    assert "<|" not in hf_tok.decode(reply, skip_special_tokens=True)


def test_assistant_tokens_mask_equals_render_conversation(gqa_export, tokenizer):
    """The template's {% generation %} marks: transformers' assistant mask (what TRL's assistant_only_loss trains
    on) equals render_conversation's supervision mask, ids included, for every conversation shape."""
    _, _, _, hf_tok = gqa_export
    conversations = CONVERSATIONS + [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d e f"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 1 2"},
                      {"role": "assistant", "content": [{"type": "python", "text": "len('ab')"},
                                                        {"type": "python_output", "text": "2"},
                                                        {"type": "text", "text": "Two."}]}]},
    ]
    supervised = 0
    for conversation in conversations:
        out = hf_tok.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=None)
        assert list(out["input_ids"]) == ids, conversation
        assert list(out["assistant_masks"]) == mask, conversation
        supervised += sum(mask)
    assert supervised > 20  # the masks are not all zero


def test_fast_tokenizer_matches_on_real_text_with_a_larger_vocab(data_dir):
    """A 4096-token vocabulary trained on the mirror's pretraining text: the fast tokenizer's merges must follow
    tiktoken's rank order on held-out documents (the shared 1024-token tokenizer has few long merges)."""
    import pyarrow.parquet as pq

    from nanochat.hf_export import build_hf_tokenizer
    from nanochat.tokenizer import RustBPETokenizer

    def texts(shard, n):
        path = os.path.join(data_dir, "pretrain", f"shard_0000{shard}.parquet")
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()[:n]

    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts(0, 150)), 4096)
    hf = build_hf_tokenizer(tokenizer)
    held_out = texts(5, 40)
    assert sum(len(t) for t in held_out) > 100_000
    for text in held_out:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)


# ---------------------------------------------------------------------------------------------------------
# nanochat 2026: the folder carries its own modeling file


def test_2026_export_loads_with_remote_code_and_matches(tmp_path, tokenizer):
    from nanochat.gpt import ARCH_PRESETS

    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size() + 6, n_layer=3, n_head=4,
                       n_kv_head=2, n_embd=64, **dict(ARCH_PRESETS["nanochat-2026"], short_window=9))
    model = random_model(config, seed=3, output_std=0.1).eval()
    folder = tmp_path / "hf2026"
    write_hf_folder(str(folder), model, tokenizer, meta_of(model), "sft", "d3", 5, "float32")
    assert (folder / "modeling_nanochat_gpt.py").exists()
    code = (folder / "modeling_nanochat_gpt.py").read_text()
    assert "import nanochat" not in code and "from nanochat" not in code  # self-contained
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["window_sizes"] == [9, 9, None] and cfg["value_embed_layers"] == [0, 2]
    assert cfg["padded_vocab_size"] == 1088
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=True, output_loading_info=True)
    assert type(hf_model).__name__ == "NanoChatGPTForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf_model.eval()
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = hf_model(ids).logits, model(ids)
    assert got.shape == want.shape == (2, 40, config.vocab_size)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
    # greedy generate (no cache in the modeling file: the whole sequence each step) equals the project's Engine
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello there!"}]})
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.0)
    n = len(rows[0]) - len(prompt)  # the engine may stop early at <|assistant_end|> / <|bos|>
    assert n >= 1 and out[0, len(prompt):len(prompt) + n].tolist() == rows[0][len(prompt):]
    # the model card says how to load it
    assert "trust_remote_code=True" in (folder / "README.md").read_text()


def test_export_refuses_a_model_config_it_does_not_know(tmp_path, tokenizer):
    from nanochat.hf_export import export_problem

    model = tiny_model(tokenizer.get_vocab_size(), n_kv_head=2)
    meta = meta_of(model)
    meta["model_config"]["attention_sinks"] = 4
    assert "attention_sinks" in export_problem(meta["model_config"])
    with pytest.raises(ValueError, match="attention_sinks"):
        write_hf_folder(str(tmp_path / "x"), model, tokenizer, meta, "sft", "d2", 5, "float32")
    assert not (tmp_path / "x").exists()
