"""
Benchmark chat_rl's rollouts: num_samples completions of one prompt sampled through the Engine's KV cache,
device_batch_size rows at a time (nanochat.rl.sample_completions), for several device_batch_size values.

    python -m bench.rl_rollout                                              # CPU, depth 4: a minute on 2 idle cores
    python -m bench.rl_rollout --depth=12 --num_samples=16 --batch_sizes=1,4,8,16 --max_new_tokens=256  # GPU

A random-weight GPT (nanochat.gpt.random_model) and a small BPE tokenizer trained on the spot; every completion
runs the full max_new_tokens unless the model happens to end it. Prints, per device_batch_size, the median time
over --repeats of generating the whole group and the completions/s and generated tokens/s, as chat_rl's step line
counts them (generated tokens = completion tokens, the tool's forced tokens included).
"""

import argparse
import statistics
import time

import torch

from nanochat.common import autocast_ctx
from nanochat.engine import Engine
from nanochat.gpt import config_from_depth, random_model
from nanochat.rl import Sampling, rollout_batch_sizes, rollout_seed, sample_completions
from nanochat.tokenizer import RustBPETokenizer

TEXT = ("How many 'r' are in 'strawberry'? Let me count with the tool. The answer is 3. #### 3\n"
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n") * 50


def main(argv=None):
    parser = argparse.ArgumentParser(description="chat_rl rollout benchmark")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--batch_sizes", type=str, default="1,4,16", help="device_batch_size values, comma-separated")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 autocast on CUDA, float32 on CPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    tokenizer = RustBPETokenizer.train_from_iterator(iter([TEXT]), 512)
    config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.prompt_tokens + args.max_new_tokens,
                               head_dim=64)
    model = random_model(config, device=device)
    model.eval()
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.get_bos_token_id()] + (tokenizer.encode(TEXT) * 2)[:args.prompt_tokens - 1]
    print(f"depth {args.depth} ({model.num_params():,} parameters) | {device.type} {dtype} | prompt {len(prompt)} "
          f"tokens | {args.num_samples} completions of up to {args.max_new_tokens} tokens")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        sampling = Sampling(args.num_samples, batch_size, args.max_new_tokens, temperature=1.0, top_k=50)
        times, generated = [], 0
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            num_batches = len(rollout_batch_sizes(args.num_samples, batch_size))
            seeds = [rollout_seed(0, repeat, 0, b) for b in range(num_batches)]
            sync()
            t0 = time.perf_counter()
            with autocast_ctx(device.type, dtype):
                sequences, _ = sample_completions(engine, prompt, sampling, seeds)
            sync()
            if repeat > 0:
                times.append(time.perf_counter() - t0)
                generated = sum(len(s) - len(prompt) for s in sequences)
        dt = statistics.median(times)
        print(f"device_batch_size {batch_size:3d}: {dt:.3f}s per group | completions/s {args.num_samples / dt:8.1f} | "
              f"generated tok/s {generated / dt:10,.0f}")


if __name__ == "__main__":
    main()
