"""
End-to-end test of nanochat's 2026 architecture through the scripts (each a subprocess in a temporary
NANOCHAT_BASE_DIR): base_train --arch=nanochat-2026 (rows of 512 tokens, so that the short window of 128 slides)
-> chat_sft from base with packed rows and the optimizer warm start -> chat_eval -> export_hf -> transformers
loads the folder through its modeling file. The architecture travels in the checkpoint meta: no stage after
base_train is told about it. Marked slow (about a minute on 2 cores); it still runs in CI.

Run: NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_pipeline_2026.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(env, *args):
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{args[0]}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_2026_architecture_base_sft_eval_export(tmp_path, tokenizer, data_dir):
    import transformers

    base = tmp_path / "base"
    tokenizer.save(str(base / "tokenizer"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=data_dir, WANDB_MODE="disabled",
               OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    run(env, "scripts.base_train", "--arch=nanochat-2026", "--depth=2", "--aspect_ratio=32", "--head_dim=32",
        "--max_seq_len=512", "--device_batch_size=1", "--total_batch_size=512", "--num_iterations=4",
        "--eval_every=-1", "--eval_tokens=1024", "--sample_every=-1", "--core_metric_every=-1")
    from nanochat.checkpoint_manager import find_last_step, read_meta

    base_meta = read_meta(str(base / "base_checkpoints" / "d2"), 4)
    cfg = base_meta["model_config"]
    assert (cfg["window_pattern"], cfg["value_embeds"], cfg["smear"], cfg["pad_vocab_to"]) == ("SSSL", True, True, 64)

    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for a in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus 1?"},
                                             {"role": "assistant", "content": f"{a} plus 1 is {a + 1}."}]}) + "\n")
    run(env, "scripts.chat_sft", "--source=base", "--max_iterations=2", "--device_batch_size=2",
        "--target_examples_per_step=4", "--max_seq_len=64", "--packing=bestfit", "--load_optimizer=1",
        "--eval_every=-1", "--eval_metrics_every=-1", f"--train_mixture=['CustomJSON:{data}']",
        f"--val_mixture=['CustomJSON:{data}:0:8']")
    sft_dir = str(base / "chatsft_checkpoints" / "d2")
    sft_meta = read_meta(sft_dir, find_last_step(sft_dir))
    assert sft_meta["model_config"] == cfg  # inherited from the base checkpoint, no flag given

    out = run(env, "scripts.chat_eval", "-i", "sft", "-a", "GSM8K", "-x", "2", "-m", "8")
    assert "GSM8K accuracy:" in out

    hf = tmp_path / "hf"
    out = run(env, "scripts.export_hf", "-i", "sft", "--out", str(hf), "--dtype", "float32")
    assert "loaded as NanoChatGPTForCausalLM" in out and "run the custom code?" not in out
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, trust_remote_code=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    conversation = {"messages": [{"role": "user", "content": "What is 3 plus 1?"},
                                 {"role": "assistant", "content": "3 plus 1 is 4."}]}
    enc = hf_tok.apply_chat_template(conversation["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert (list(enc["input_ids"]), list(enc["assistant_masks"])) == tokenizer.render_conversation(conversation)
    with torch.no_grad():
        logits = model(torch.tensor([enc["input_ids"]])).logits
    assert logits.shape == (1, len(enc["input_ids"]), tokenizer.get_vocab_size()) and torch.isfinite(logits).all()
