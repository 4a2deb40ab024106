"""
Bits per byte of the base model on the train and val splits, and a few greedy samples.

Launch:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss                 # 8 GPUs (speedrun)
    python -m scripts.base_loss                                                   # 1 GPU
    python -m scripts.base_loss --device_batch_size=4 --split_tokens=16384        # tiny, CPU

Writes the "Base model loss" report section. Tests: tests/test_pipeline.py (end to end).
"""

import torch

from nanochat.checkpoint_manager import load_model
from nanochat.common import (autocast_ctx, autodetect_device_type, compute_cleanup, compute_init,
                             install_error_handler, print0)
from nanochat.config import Option, load_config
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)", choices=("", "cuda", "cpu", "mps")),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA: bfloat16|float32", choices=("bfloat16", "float32")),
    Option("device_batch_size", int, 32, "rows per device per forward pass", min=1),
    Option("split_tokens", int, 20 * 524288, "tokens evaluated per split (all ranks)", min=1),
    Option("model_tag", str, None, "base checkpoint tag (default: most recent; 'largest': largest d<depth>)"),
    Option("step", int, None, "checkpoint step (default: last)", min=0),
    Option("max_new_tokens", int, 16, "tokens per greedy sample", min=1),
]
config = load_config(OPTIONS, description=__doc__)

# -----------------------------------------------------------------------------
# Compute init, model and tokenizer

device_type = config["device_type"] or autodetect_device_type()
ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = compute_init(device_type)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=config["model_tag"], step=config["step"])
token_bytes = get_token_bytes(device=device)
sequence_len = model.config.sequence_len
print0(f"Loaded base model (step {meta.get('step')}) | sequence length {sequence_len}")

# -----------------------------------------------------------------------------
# Bits per byte on each split

tokens_per_step = config["device_batch_size"] * sequence_len * ddp_world_size
steps = max(config["split_tokens"] // tokens_per_step, 1)
bpb_results = {}
for split in ("train", "val"):
    loader = tokenizing_distributed_data_loader(tokenizer, config["device_batch_size"], sequence_len, split, device=device)
    with autocast_ctx(device_type, config["dtype"]):
        bpb_results[split] = evaluate_bpb(model, loader, steps, token_bytes)
    print0(f"{split} bpb: {bpb_results[split]:.4f} ({steps} steps of {tokens_per_step:,} tokens)")

# -----------------------------------------------------------------------------
# Greedy samples (rank 0)

prompts = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "def add(a, b):",
    "To be, or not to be,",
]
samples = []
if ddp_rank == 0:
    for prompt in prompts:
        tokens = tokenizer(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast_ctx(device_type, config["dtype"]), torch.no_grad():
            completion = list(model.generate(tokens, max_tokens=config["max_new_tokens"], temperature=0.0))
        samples.append(prompt + tokenizer.decode(completion))
        print0(repr(samples[-1]))

# -----------------------------------------------------------------------------
# Report and cleanup

get_report().log(section="Base model loss", data=[
    {"model_tag": config["model_tag"], "step": meta.get("step"), "split_tokens": config["split_tokens"]},
    {"train bpb": bpb_results["train"], "val bpb": bpb_results["val"]},
    "Samples:\n\n" + "\n".join(f"    {s!r}" for s in samples),
])
compute_cleanup()
