"""
Benchmark one training step of the GPT (forward + backward + optimizer step) at a given size.

    python -m bench.model_step --depth=4 --device=cpu                       # CPU, < 1 minute
    python -m bench.model_step --depth=4 --device=cpu --arch=nanochat-2026  # nanochat's 2026 architecture
    python -m bench.model_step --depth=20 --seq_len=2048 --batch_size=32 --compile   # one GPU, bf16

Prints the median step time over --steps timed steps (after --warmup), tokens/s, and on CUDA the MFU against
the device's peak bf16 FLOPS (nanochat.common.get_peak_flops).
"""

import argparse
import statistics
import time

import torch

from nanochat.common import autocast_ctx, get_peak_flops
from nanochat.gpt import ARCH_PRESETS, GPT, config_from_depth
from nanochat.perf import batch_flops, compile_model, mfu


def main(argv=None):
    parser = argparse.ArgumentParser(description="GPT train-step benchmark")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=None, help="default: 65536 on CUDA, 8192 on CPU")
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--arch", choices=list(ARCH_PRESETS), default="nanochat-2025")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 autocast on CUDA, float32 on CPU (CPU bf16 matmuls are slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.vocab_size is None:
        args.vocab_size = 65536 if device.type == "cuda" else 8192
    if args.dtype is None:
        args.dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    config = config_from_depth(args.depth, args.vocab_size, args.seq_len, head_dim=args.head_dim, arch=args.arch)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    orig_model = model
    if args.compile:
        model = compile_model(orig_model)
    optimizers = orig_model.setup_optimizers()
    ctx = autocast_ctx(device.type, args.dtype, cpu_bf16=True)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        with ctx:
            loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)

    dt = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    print(f"model: depth={args.depth} n_embd={config.n_embd} n_head={config.n_head} params={orig_model.num_params():,} "
          f"seq_len={args.seq_len} batch_size={args.batch_size} dtype={args.dtype} device={device} compile={args.compile} "
          f"arch={args.arch} windows={orig_model.window_sizes}")
    print(f"step time (median of {args.steps}): {dt * 1000:.1f} ms")
    print(f"tokens/s: {tokens / dt:,.0f}")
    peak = get_peak_flops(device)
    step_mfu = mfu(batch_flops(orig_model, inputs, 0)[0], dt, peak)  # a fraction, printed as a percentage
    if step_mfu is not None:
        print(f"MFU: {100 * step_mfu:.2f}% (peak {peak / 1e12:.0f} TFLOPS bf16)")
    else:
        print("MFU: n/a (no known peak FLOPS for this device)")
    print(f"final loss: {loss.item():.4f}")


if __name__ == "__main__":
    main()
