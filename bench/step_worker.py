"""
One side of `python -m bench.model_step --compare PATH`: a process that imports `nanochat.gpt` from the checkout
ROOT (this repository or another one with nanochat's API: GPTConfig, GPT(config).init_weights(),
setup_optimizers(), forward(idx, targets) -> loss), builds the model of bench.model_step's shape and times
training steps on request, so that two checkouts can be timed in turn, interleaved, by one parent process.

    python bench/step_worker.py ROOT --depth=4 --seq_len=512 --batch_size=8 --vocab_size=8192 --threads=1

Run as a file (not with -m) so that nothing of this repository is imported unless ROOT is this repository: only
torch and the standard library are imported before ROOT is put first on sys.path. Protocol: stdin lines "N"
(time N steps) or "quit"; each answer is one stdout line "times [[wall s, CPU s], ...]" (other lines are the
model's own printing, ignored by the parent). The CPU time of the process is the steadier figure on a busy machine
(with --threads=1 it is the step's compute, whoever else runs). Tested by tests/test_gpt.py's --compare test.
"""

import argparse
import json
import sys
import time


def main():
    parser = argparse.ArgumentParser(description="bench.model_step --compare worker")
    parser.add_argument("root", help="the checkout whose nanochat.gpt is timed")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, args.root)
    import torch

    from nanochat.gpt import GPT, GPTConfig  # ROOT's

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_embd = 64 * args.depth  # bench.model_step's shape: nanochat's depth dial, aspect ratio 64
    n_head = max(1, -(-n_embd // args.head_dim))
    config = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizers = model.setup_optimizers()
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():  # -> [wall seconds, CPU seconds of this process]
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return [time.perf_counter() - t0, time.process_time() - c0]

    for _ in range(args.warmup):
        step()
    print("times []", flush=True)  # ready
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        times = [step() for _ in range(int(line))]
        print("times " + json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
