"""
SFT throughput: `pad` (the guide: pad each batch to its longest conversation) vs `bestfit` (whole
conversations best-fit into rows of max_seq_len + 1 tokens, attention masked per conversation), on the
mirror's mixture (GSM8K, ARC-Easy, ARC-Challenge, ChitChat) with a small randomly initialised model.
Prints, side by side: padding fraction, supervised tokens/s, examples (conversations)/s, and the step time.

    NANOCHAT_DATA_DIR=/work/shared/data python -m bench.sft_throughput                  # CPU defaults
    python -m bench.sft_throughput --depth=12 --max_seq_len=2048 --device_batch_size=8   # a GPU

The tokenizer is <base_dir>/tokenizer if present, otherwise a small one trained here on the mirror's
pretraining text (throughput barely depends on it). Same data, same model, same optimizer step for both modes.
"""

import os
import time

import torch

from nanochat.common import autocast_ctx, autodetect_device_type, get_base_dir, get_data_dir, print0
from nanochat.config import Option, load_config
from nanochat.sft import BatchSettings, plan_epoch, render_share, sft_batches
from tasks.mixture import build_mixture

OPTIONS = [
    Option("device_type", str, "", "cuda|cpu|mps (empty: autodetect)"),
    Option("depth", int, 2, "model depth (width = 64 * depth unless n_embd is set)"),
    Option("n_embd", int, 128, "model width (0: from depth via config_from_depth)"),
    Option("max_seq_len", int, 512, "row length for bestfit and truncation length for both"),
    Option("device_batch_size", int, 8, "rows per step"),
    Option("steps", int, 8, "timed steps per mode"),
    Option("warmup_steps", int, 2, "untimed steps per mode"),
    Option("dtype", str, "bfloat16", "autocast dtype on CUDA"),
    Option("mixture", list, ["GSM8K:main:train", "ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "ChitChat:train"],
           "the training mixture (tasks/mixture.py syntax)"),
]


def get_bench_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer

    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    if os.path.isdir(tokenizer_dir):
        return RustBPETokenizer.from_directory(tokenizer_dir)
    import pyarrow.parquet as pq

    data_dir = get_data_dir()
    assert data_dir, "no <base_dir>/tokenizer and no NANOCHAT_DATA_DIR to train a small one on"
    texts = pq.read_table(os.path.join(data_dir, "pretrain", "shard_00000.parquet"), columns=["text"])
    texts = [t[:20000] for t in texts.column("text").to_pylist()]
    print0(f"training a 4096-token tokenizer on {len(texts)} documents of the mirror")
    return RustBPETokenizer.train_from_iterator(iter(texts), 4096)


def main():
    config = load_config(OPTIONS, description=__doc__)
    from nanochat.gpt import GPT, GPTConfig, config_from_depth

    device_type = config["device_type"] or autodetect_device_type()
    device = torch.device(device_type)
    tokenizer = get_bench_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    if config["n_embd"] > 0:
        n_head = max(1, config["n_embd"] // 64)
        model_config = GPTConfig(sequence_len=config["max_seq_len"], vocab_size=vocab_size, n_layer=config["depth"],
                                 n_head=n_head, n_kv_head=n_head, n_embd=config["n_embd"])
    else:
        model_config = config_from_depth(config["depth"], vocab_size, config["max_seq_len"])
    dataset = build_mixture(config["mixture"])
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    row_capacity = config["max_seq_len"] + 1
    B = config["device_batch_size"]
    print0(f"{len(dataset):,} conversations | model {model_config} | {device}")

    def render(conversation):
        return tokenizer.render_conversation(conversation, max_tokens=row_capacity + 1)

    share = render_share(dataset, render, BatchSettings(batch_size=B, row_capacity=row_capacity))  # rendered once
    results = {}
    for packing in ("pad", "bestfit"):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(model_config)
        model.to_empty(device=device)
        model.init_weights()
        optimizers = model.setup_optimizers()
        settings = BatchSettings(packing, B, row_capacity, pad_id)
        stream = sft_batches(dataset, render, share, plan_epoch(share.lengths, settings), settings)
        totals = dict(positions=0, pad_positions=0, supervised=0, examples=0, time=0.0)
        for step in range(config["warmup_steps"] + config["steps"]):
            inputs, targets, segment_ids, stats, _ = next(stream)
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            inputs, targets = inputs.to(device), targets.to(device)
            segment_ids = None if segment_ids is None else segment_ids.to(device)
            with autocast_ctx(device_type, config["dtype"]):
                loss = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids)
            (loss / max(stats["supervised"], 1)).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if device_type == "cuda":
                torch.cuda.synchronize()
            if step >= config["warmup_steps"]:
                totals["time"] += time.time() - t0
                for k in ("positions", "pad_positions", "supervised", "examples"):
                    totals[k] += stats[k]
        results[packing] = {
            "padding fraction": f"{totals['pad_positions'] / totals['positions']:.1%}",
            "supervised tokens/s": f"{totals['supervised'] / totals['time']:,.0f}",
            "examples/s": f"{totals['examples'] / totals['time']:,.1f}",
            "tokens/s (all positions)": f"{totals['positions'] / totals['time']:,.0f}",
            "step time (ms)": f"{1000 * totals['time'] / config['steps']:,.1f}",
            "examples/step": f"{totals['examples'] / config['steps']:.1f}",
        }
        del model, optimizers

    width = max(len(k) for k in results["pad"])
    print0(f"\n{'':<{width}}  {'pad':>12}  {'bestfit':>12}")
    for key in results["pad"]:
        print0(f"{key:<{width}}  {results['pad'][key]:>12}  {results['bestfit'][key]:>12}")


if __name__ == "__main__":
    main()
