"""
Benchmark one training step of the GPT (forward + backward + optimizer step) at a given size.

    python -m bench.model_step --depth=4 --device=cpu                       # CPU, < 1 minute
    python -m bench.model_step --depth=4 --device=cpu --arch=nanochat-2026  # nanochat's 2026 architecture
    python -m bench.model_step --depth=20 --seq_len=2048 --batch_size=32 --compile   # one GPU, bf16

Prints the median step time over --steps timed steps (after --warmup), tokens/s, and on CUDA the MFU against
the device's peak bf16 FLOPS (nanochat.common.get_peak_flops). --profile adds torch.profiler's table of one
more step (forward, backward and each optimizer labelled).

Against another checkout of nanochat's API (e.g. nanochat itself, or this repository at an older commit), on CPU,
interleaved: each side runs in its own process (bench/step_worker.py) and they take turns, --rounds times,
--steps steps a turn, so that a busy machine slows both alike; prints tokens/s per round and the ratio:

    python -m bench.model_step --compare=/tmp/nanochat-ref --depth=4 --seq_len=512 --batch_size=8 --threads=1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
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
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one more step")
    parser.add_argument("--compare", default="", help="path of another checkout with nanochat's API: time both "
                                                      "steps, interleaved, on CPU (float32; vocab 8192 by default)")
    parser.add_argument("--rounds", type=int, default=4, help="--compare: turns per side")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.compare:
        if not os.path.isfile(os.path.join(args.compare, "nanochat", "gpt.py")):
            parser.error(f"--compare={args.compare}: no nanochat/gpt.py there; give the root of a checkout of nanochat")
        return compare(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

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

    def step():
        with torch.profiler.record_function("forward"), ctx:
            loss = model(inputs, targets)
        with torch.profiler.record_function("backward"):
            loss.backward()
        for opt in optimizers:
            with torch.profiler.record_function(f"step {type(opt).__name__}"):
                opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
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
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if
                                                               device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
            sync()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def compare(args):
    """This checkout's step against args.compare's, in two worker processes that take turns."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_worker.py")
    this_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vocab_size = args.vocab_size or 8192
    flags = [f"--depth={args.depth}", f"--seq_len={args.seq_len}", f"--batch_size={args.batch_size}",
             f"--vocab_size={vocab_size}", f"--head_dim={args.head_dim}", f"--threads={args.threads}",
             f"--warmup={args.warmup}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # each side imports its own nanochat
    sides = {"this": this_root, "other": os.path.abspath(args.compare)}
    procs = {name: subprocess.Popen([sys.executable, worker, root] + flags, cwd=root, env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE) for name, root in sides.items()}

    def ask(name, line):
        proc = procs[name]
        if line is not None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        for out in proc.stdout:  # skip the model's own printing
            if out.startswith("times "):
                return json.loads(out[len("times "):])
        raise RuntimeError(f"the {name} worker ({sides[name]}) exited; run bench/step_worker.py {sides[name]} "
                           f"by hand to see why")

    tokens = args.batch_size * args.seq_len
    print(f"depth {args.depth}, {args.batch_size} x {args.seq_len} tokens, vocab {vocab_size}, float32 on CPU, "
          f"threads {args.threads or torch.get_num_threads()}; {args.rounds} rounds of {args.steps} steps a side")
    print(f"  this:  {sides['this']}\n  other: {sides['other']}")
    try:
        for name in procs:  # both built and warmed up before any timing
            ask(name, None)
        rates = {name: [] for name in procs}  # per round: (tokens/s of wall time, tokens/s of CPU time)
        for r in range(args.rounds):
            order = list(procs) if r % 2 == 0 else list(procs)[::-1]  # alternate who goes first
            for name in order:
                times = ask(name, str(args.steps))
                rates[name].append(tuple(tokens / statistics.median(t[i] for t in times) for i in (0, 1)))
            (this, this_cpu), (other, other_cpu) = rates["this"][-1], rates["other"][-1]
            print(f"round {r + 1}: this {this:,.0f} tokens/s ({this_cpu:,.0f} per CPU second), other {other:,.0f} "
                  f"({other_cpu:,.0f}), ratio {this / other:.2f} (CPU time {this_cpu / other_cpu:.2f})", flush=True)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in procs.values():
            proc.wait(timeout=60)
    ratio = statistics.median(a[0] / b[0] for a, b in zip(rates["this"], rates["other"]))
    cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(rates["this"], rates["other"]))
    print(f"median tokens/s: this {statistics.median(a[0] for a in rates['this']):,.0f}, other "
          f"{statistics.median(b[0] for b in rates['other']):,.0f}; median ratio this/other {ratio:.2f} "
          f"(per CPU second: {cpu_ratio:.2f})")
    return ratio


if __name__ == "__main__":
    main()
