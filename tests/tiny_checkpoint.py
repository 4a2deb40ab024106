"""Test helper: a tokenizer and a random-init tiny GPT checkpoint under a base dir, laid out as
checkpoint_manager.load_model expects. Not a test module (no test_ prefix)."""

import os


from nanochat.checkpoint_manager import SOURCE_DIRS, save_checkpoint
from nanochat.runs import tokenizer_sha256
from nanochat.gpt import GPTConfig, random_model


def make_tiny_checkpoint(base_dir, tokenizer, source="base", depth=2, n_embd=64, n_head=2, sequence_len=256,
                         step=0, model_tag=None, seed=0):
    """Save `tokenizer` into <base_dir>/tokenizer (with its token bytes) and a random-init GPT
    (depth layers, width n_embd) as <base_dir>/<source dir>/<model_tag or d<depth>>/ step `step`.
    The output projections are given small random weights (not nanochat's zeros) so the model's outputs
    depend on its input. Returns the checkpoint directory."""
    tokenizer.save(os.path.join(base_dir, "tokenizer"))  # also writes token_bytes.npy
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=depth,
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    model = random_model(config, seed=seed, output_std=0.02)
    checkpoint_dir = os.path.join(base_dir, SOURCE_DIRS[source], model_tag or f"d{depth}")
    meta = {"step": step, "model_config": vars(config).copy(), "user_config": {"depth": depth},
            "git_commit": "unknown", "run_id": f"tiny-{source}-{seed}", "run_name": "tiny_checkpoint",
            "tokenizer_sha256": tokenizer_sha256(os.path.join(base_dir, "tokenizer"))}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), None, meta)
    return checkpoint_dir
