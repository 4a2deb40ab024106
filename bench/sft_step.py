"""
Benchmark of one chat SFT step (forward, backward, optimizer step) for every combination of
{pad, bestfit} x {eager, compiled} x {chunked, full loss}, at one model size:

    python -m bench.sft_step                                      # CPU: depth 2, 128 positions, < 2 minutes
    python -m bench.sft_step --depth=20                           # one GPU: max_seq_len 2048, bf16 autocast
    python -m bench.sft_step --depth=12 --device_batch_size=16    # one GPU

Per combination it prints: tokens/s (every position the model computes), supervised tokens/s, MFU
counting only the non-padding positions ("useful") and all positions ("total") against the device's bf16
peak (CUDA only), the peak memory (CUDA only), and for compiled rows the compile time (the steps that built
a graph, minus a normal step each) and the number of graphs built. The data is synthetic: conversations
with log-normal lengths (median --median_len tokens) whose last 60% is supervised, batched by the real SFT
pipeline (nanochat.sft.sft_batches: "pad" pads each batch to its longest conversation, rounded up to
--pad_bucket when compiled; "bestfit" packs whole conversations into rows of max_seq_len + 1 tokens).
"full" is the unchunked loss (GPT.loss_chunk_size = 0), "chunked" the chunked cross-entropy at any size of the
logits (the model's default chunks only logits over GPT.loss_chunk_min_bytes_default).
Throughput barely depends on the token values, so no tokenizer is needed.
"""

import argparse
import gc
import math
import random
import time

import torch
import torch._inductor.config

from nanochat.common import autocast_ctx, get_peak_flops
from nanochat.gpt import GPT, config_from_depth
from nanochat.perf import batch_flops, compile_model, compiled_graphs, mfu, peak_memory_mib, reset_peak_memory
from nanochat.sft import BatchSettings, plan_epoch, render_share, sft_batches


def synthetic_conversations(num, vocab_size, median_len, max_len, seed=0):
    """(ids, mask) pairs: log-normal lengths (sigma 0.8, a long tail like chat data) in [8, max_len]; the first
    ~40% of each conversation is unsupervised (the user), the rest supervised (the assistant)."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(num):
        n = int(min(max_len, max(8, round(rng.lognormvariate(math.log(median_len), 0.8)))))
        ids = [rng.randrange(vocab_size) for _ in range(n)]
        user = int(0.4 * n)
        conversations.append((ids, [0] * user + [1] * (n - user)))
    return conversations


def run_one(model_config, device, dtype, conversations, packing, compiled, chunked, batch_size, pad_bucket,
            max_seq_len, steps, warmup, loss_chunk_size):
    torch.manual_seed(0)
    with torch.device("meta"):
        orig_model = GPT(model_config)
    orig_model.to_empty(device=device)
    orig_model.init_weights()
    orig_model.loss_chunk_size = loss_chunk_size if chunked else 0
    orig_model.loss_chunk_min_bytes = 0  # "chunked" rows chunk whatever the size of the logits
    model = compile_model(orig_model, num_shapes=-(-max_seq_len // pad_bucket)) if compiled else orig_model
    optimizers = orig_model.setup_optimizers()
    row_capacity = max_seq_len + 1
    bucket = pad_bucket if compiled and packing == "pad" else 1  # lengths rounded up: a handful of shapes
    settings = BatchSettings(packing, batch_size, row_capacity, bucket=bucket)
    share = render_share(conversations, lambda c: c, settings)
    stream = sft_batches(conversations, lambda c: c, share, plan_epoch(share.lengths, settings), settings)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    totals = dict(time=0.0, computed=0, supervised=0, flops=0, useful_flops=0)
    # a step that built a new graph (the first one; in pad mode each new bucket length) counts as compile
    # time, not throughput; timed steps are the first `steps` steps after warmup that built nothing
    graphs_before = compiled_graphs()
    compile_time, compile_steps, timed, iteration, graphs_seen = 0.0, 0, 0, 0, graphs_before
    while timed < steps and iteration < warmup + 4 * steps:
        inputs, targets, segment_ids, stats, _ = next(stream)
        sync()
        t0 = time.perf_counter()
        inputs, targets = inputs.to(device), targets.to(device)
        segment_ids = None if segment_ids is None else segment_ids.to(device)
        with autocast_ctx(device.type, dtype):
            loss = model(inputs, targets, loss_reduction="sum", segment_ids=segment_ids)
        (loss / max(stats["supervised"], 1)).backward()
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        graphs_now = compiled_graphs()
        if compiled and graphs_now != graphs_seen:
            compile_time, compile_steps = compile_time + dt, compile_steps + 1
        elif iteration >= warmup:
            totals["time"] += dt
            totals["computed"] += inputs.numel()
            flops, useful_flops = batch_flops(orig_model, inputs, stats["pad_positions"])
            totals["flops"], totals["useful_flops"] = totals["flops"] + flops, totals["useful_flops"] + useful_flops
            totals["supervised"] += stats["supervised"]
            timed += 1
        graphs_seen = graphs_now
        iteration += 1
    if timed == 0:
        raise RuntimeError(f"no step without a (re)compilation in {iteration} steps: raise --pad_bucket")
    step_time = totals["time"] / timed
    peak = get_peak_flops(device)
    return {
        "tok/s": totals["computed"] / totals["time"],
        "sup tok/s": totals["supervised"] / totals["time"],
        "MFU useful": mfu(totals["useful_flops"], totals["time"], peak),
        "MFU total": mfu(totals["flops"], totals["time"], peak),
        "peak MiB": peak_memory_mib(device),
        "compile s": max(0.0, compile_time - compile_steps * step_time) if compiled else None,
        "graphs": compiled_graphs() - graphs_before if compiled else None,
        "step ms": 1000 * step_time,
    }


def main(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description="chat SFT step benchmark")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--depth", type=int, default=None, help="default: 20 on CUDA, 2 on CPU")
    parser.add_argument("--max_seq_len", type=int, default=None, help="default: 2048 on CUDA, 128 on CPU")
    parser.add_argument("--device_batch_size", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    parser.add_argument("--vocab_size", type=int, default=None, help="default: 65536 on CUDA, 4096 on CPU")
    parser.add_argument("--head_dim", type=int, default=None, help="default: 128 on CUDA, 32 on CPU")
    parser.add_argument("--median_len", type=int, default=None, help="median conversation length (max_seq_len / 6)")
    parser.add_argument("--pad_bucket", type=int, default=None, help="compiled pad mode rounding (CUDA 128, CPU: "
                                                                    "max_seq_len, one shape: compiling is slow)")
    parser.add_argument("--loss_chunk_size", type=int, default=None, help="rows per loss chunk (default: the "
                                                                          "model's, 2048, on CUDA; 128 on CPU)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: a tiny model gains "
                                                                   "nothing from more, and a busy CPU punishes it)")
    parser.add_argument("--only", default="", help="comma-separated rows to run, in this order, e.g. "
                                                   "bestfit/compiled/chunked,pad/eager/full")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    depth = args.depth or (20 if on_cuda else 2)
    max_seq_len = args.max_seq_len or (2048 if on_cuda else 128)
    batch_size = args.device_batch_size or (8 if on_cuda else 4)
    vocab_size = args.vocab_size or (65536 if on_cuda else 4096)
    head_dim = args.head_dim or (128 if on_cuda else 32)
    median_len = args.median_len or max(8, max_seq_len // 6)
    pad_bucket = args.pad_bucket or (128 if on_cuda else max_seq_len)
    steps = args.steps or (10 if on_cuda else 2)
    warmup = args.warmup or (3 if on_cuda else 1)
    loss_chunk_size = args.loss_chunk_size or (GPT.loss_chunk_size_default if on_cuda else 128)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads or 1)
        # compile in this process: a pool of compile workers costs more than it saves on a small, busy CPU
        # (measured: 1m06s instead of 2m01s for the whole CPU table)
        torch._inductor.config.compile_threads = 1
    model_config = config_from_depth(depth, vocab_size, max_seq_len, head_dim=head_dim)
    conversations = synthetic_conversations(4000, vocab_size, median_len, max_seq_len + 1)
    print(f"device {device} | depth {depth} (n_embd {model_config.n_embd}, {model_config.n_head} heads) | vocab "
          f"{vocab_size} | max_seq_len {max_seq_len} | device_batch_size {batch_size} | median conversation "
          f"{median_len} tokens | pad_bucket {pad_bucket} | loss chunk {loss_chunk_size} rows | {warmup} warmup + "
          f"{steps} timed steps")

    def fmt(key, value):
        if value is None:
            return "n/a"
        if key.startswith("MFU"):
            return f"{100 * value:.1f}%"
        if key in ("compile s", "step ms"):
            return f"{value:,.1f}"
        return f"{value:,.0f}"

    names = [f"{packing}/{compiled}/{loss}" for packing in ("pad", "bestfit") for compiled in ("eager", "compiled")
             for loss in ("chunked", "full")]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [name for name in only if name not in names]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; rows are {', '.join(names)}")
    rows = []
    for name in only or names:  # in --only's order: the rows that matter most first, under a time limit
        packing, compiled, loss = name.split("/")
        result = run_one(model_config, device, args.dtype, conversations, packing, compiled == "compiled",
                         loss == "chunked", batch_size, pad_bucket, max_seq_len, steps, warmup, loss_chunk_size)
        rows.append((name, result))
        torch._dynamo.reset()  # drop the compiled graphs (and the model they hold) before the next row
        gc.collect()
        print(f"  done {name}: " + ", ".join(f"{k} {fmt(k, v)}" for k, v in result.items()), flush=True)

    keys = list(rows[0][1]) if rows else []
    width = max(len(name) for name, _ in rows) if rows else 0
    print(f"\n| {'configuration':<{width}} | " + " | ".join(f"{k:>10}" for k in keys) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 12 for _ in keys) + "|")
    for name, result in rows:
        print(f"| {name:<{width}} | " + " | ".join(f"{fmt(k, result[k]):>10}" for k in keys) + " |")


if __name__ == "__main__":
    main()
