"""
Your own data, first run in one attempt: scripts/chat_data.py on a planted file, and chat_sft end to end on a
ShareGPT file given with --data (offline: the default validation set is unavailable, so a held-out share
validates; decontaminate = drop removes the planted test question, fail stops before training), then
source = sft continues fine-tuning that chat model into a new folder, which loaders then pick by default.

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_chat_data.py
"""

import json
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the hub refuses at once: SmolTalk (the default val) is unavailable
OFFLINE_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def gsm8k_test_question(data_dir):
    with open(os.path.join(data_dir, "openai", "gsm8k", "main", "test.jsonl"), encoding="utf-8") as f:
        return json.loads(f.readline())["question"]


def sharegpt_file(path, planted):
    rows = [{"conversations": [{"from": "human", "value": f"What is {a} plus {b}?"},
                               {"from": "gpt", "value": f"{a} plus {b} is {a + b}."}]} for a in range(8) for b in range(5)]
    rows[7] = {"conversations": [{"from": "system", "value": "Be exact."}, {"from": "human", "value": planted},
                                 {"from": "gpt", "value": "18"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_data_script_flags_planted_question(data_dir, tmp_path, capsys):
    from scripts.chat_data import main

    path = sharegpt_file(tmp_path / "chats.jsonl", gsm8k_test_question(data_dir).upper())
    assert main([path, "-a", "GSM8K|HumanEval"]) == 1  # contaminated: exit code 1
    out = capsys.readouterr().out
    assert "| sharegpt" in out and "40 conv" in out
    assert f"{path} #7 ~ GSM8K" in out
    assert main([str(tmp_path / "chats.jsonl"), "-a", ""]) == 0  # no eval sets: nothing to flag


def run_sft(base_dir, args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1", **NO_HUB)
    for key in OFFLINE_KEYS:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "scripts.chat_sft", "--max_seq_len=128", "--eval_metrics_every=-1",
                           "--device_batch_size=4", "--target_examples_per_step=4", "--max_iterations=2",
                           "--eval_steps=1", "--decontaminate_tasks=['GSM8K']", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_data_shortcut_held_out_drop_and_source_sft(data_dir, tmp_path, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    from nanochat.checkpoint_manager import read_meta, resolve_checkpoint

    base_dir = tmp_path / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="base", depth=2, n_embd=64)
    data = sharegpt_file(tmp_path / "chats.jsonl", gsm8k_test_question(data_dir))

    out = run_sft(base_dir, ["--source=base", f"--data={data}", "--decontaminate=fail", "--dry_run=1"])
    assert out.returncode == 2 and out.stderr.startswith("error: decontaminate = fail: 1 training conversations"), \
        out.stdout[-2000:] + out.stderr[-2000:]

    out = run_sft(base_dir, ["--source=base", f"--data={data}", "--decontaminate=drop"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Skipping val_mixture entry 'SmolTalk:test'" in out.stdout
    assert "val_mixture: its data is not available, so " in out.stdout
    assert "decontaminate = drop: 1 contaminated training conversations removed" in out.stdout
    assert "| sharegpt" in out.stdout
    assert "Validation loss" in out.stdout
    report = (base_dir / "report" / "chat-sft.md").read_text()
    assert "- Contaminated conversations dropped: 1" in report and "- checkpoint: chatsft_checkpoints/d2 step 2" in report

    # continued fine-tuning of the chat model just trained: a new folder, and the loaders' default
    out = run_sft(base_dir, ["--source=sft", f"--data={data}", "--decontaminate=off"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Model tag: chatsft_checkpoints/d2 (the most recently written" in out.stdout
    new_dir = base_dir / "chatsft_checkpoints" / "d2-ft"
    meta = read_meta(str(new_dir), 2)
    assert meta["source"] == "sft" and meta["source_dir"] == str(base_dir / "chatsft_checkpoints" / "d2")
    assert resolve_checkpoint("sft", base_dir=str(base_dir)) == (str(new_dir), 2)

    # chat_eval on your own data: loss and bpb per source (the training file only on its held-out share)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", f"{data}|ChitChat:test:0:8",
                          "-x", "8", "-d", "float32"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Model tag: chatsft_checkpoints/d2-ft" in out.stdout
    assert re.search(rf"^{re.escape(data)}: loss [0-9.]+ \| bpb [0-9.]+ \| \d conversations, \d+ supervised tokens "
                     r"\(its held-out share\)$", out.stdout, re.M), out.stdout
    assert re.search(r"^ChitChat:test:0:8: loss [0-9.]+ \| bpb [0-9.]+ \| 8 conversations", out.stdout, re.M)
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert f"- {data} bpb: " in section and "- ChitChat:test:0:8 loss: " in section
    assert "- checkpoint: chatsft_checkpoints/d2-ft step 2" in section


def test_conversation_loss_matches_the_model_loss(tokenizer):
    import torch

    from nanochat.gpt import GPTConfig, random_model
    from nanochat.loss_eval import conversation_loss
    from nanochat.collate import collate_sft
    from nanochat.tokenizer import compute_token_bytes

    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    model = random_model(config, seed=0, output_std=0.02)
    chats = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!" * k}]}
             for k, w in enumerate(["hello", "world", "again"], 1)]
    render = lambda c: tokenizer.render_conversation(c, max_tokens=65)  # noqa: E731
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    token_bytes = torch.as_tensor(compute_token_bytes(tokenizer))
    scores = conversation_loss(model, chats, render, pad_id, token_bytes, batch_size=2)
    inputs, targets = collate_sft([render(c) for c in chats], pad_id)
    with torch.no_grad():
        reference = model(inputs, targets).item()  # mean over the supervised targets of one batch
    assert abs(scores["loss"] - reference) < 1e-5
    assert scores["tokens"] == int((targets != -1).sum()) and scores["conversations"] == 3
    assert 0 < scores["bpb"] < 100
