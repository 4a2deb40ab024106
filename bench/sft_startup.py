"""
SFT start-up time: seconds from launching scripts.chat_sft to its first training step, on CPU, from a tiny random
base checkpoint (depth 2, width 64: the model's own cost is small, what is measured is the data work). Per run it
prints when three lines appear: "Number of iterations" (tokenizer, mixture loaded, the epoch planned), "Model:" (the
preview figures computed and the model built) and the first "Step 00000 | Training loss" (one training step later),
then the CPU seconds of the whole run (one step, its checkpoint and report included).

    NANOCHAT_DATA_DIR=/work/shared/data python -m bench.sft_startup                   # this checkout
    NANOCHAT_DATA_DIR=/work/shared/data python -m bench.sft_startup --repo=/tmp/old   # another checkout, same runs

Runs: configs/sft_cpu.txt (900 conversations) and a 20,726-conversation mixture of the mirror (ChitChat x2,
ARC-Easy x2, ARC-Challenge, GSM8K) under packing pad and bestfit. The tokenizer is <base_dir>/tokenizer if present,
otherwise a small one trained on the mirror (bench.sft_throughput.get_bench_tokenizer). Timings on a shared machine
are noisy: run it twice.
"""

import os
import resource
import subprocess
import sys
import tempfile
import time

from bench.sft_throughput import get_bench_tokenizer
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.runs import tokenizer_sha256
from nanochat.config import Option, load_config
from nanochat.gpt import GPTConfig, random_model

OPTIONS = [
    Option("repo", str, ".", "checkout whose scripts.chat_sft is launched"),
    Option("runs", list, ["cpu", "20k-pad", "20k-bestfit"], "which runs (cpu, 20k-pad, 20k-bestfit)"),
]
MIXTURE_20K = ("--train_mixture=['ChitChat:train*2', 'ARC:ARC-Easy:train*2', 'ARC:ARC-Challenge:train', "
               "'GSM8K:main:train']")
COMMON = ["--config", "configs/sft_cpu.txt", "--max_iterations=1", "--eval_every=-1", "--eval_metrics_every=-1"]
RUNS = {"cpu": COMMON, "20k-pad": [*COMMON, MIXTURE_20K, "--packing=pad"],
        "20k-bestfit": [*COMMON, MIXTURE_20K, "--packing=bestfit"]}
MARKS = {"plan": "Number of iterations", "model": "Model:", "first step": "Step 00000 | Training loss"}


def write_base_dir(base_dir, tokenizer):
    """The tokenizer and a tiny random base checkpoint, where chat_sft (source = base) looks for them."""
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=1, n_kv_head=1,
                       n_embd=64)
    meta = {"step": 0, "model_config": vars(config).copy(), "user_config": {"depth": 2}, "git_commit": "unknown",
            "run_id": "bench-startup", "tokenizer_sha256": tokenizer_sha256(os.path.join(base_dir, "tokenizer"))}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d2"), 0, random_model(config).state_dict(), None, meta)


def time_run(repo, base_dir, args):
    """Seconds from launch to the first line starting with each of MARKS (absent: not seen), the CPU seconds of the
    whole run (user + system: less sensitive to a loaded machine than wall time) and the exit code."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, WANDB_MODE="disabled", PYTHONPATH=os.path.abspath(repo),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0, seen, tail, cpu0 = time.time(), {}, [], resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_sft", *args, "--overwrite=1"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        for name, prefix in MARKS.items():
            if name not in seen and line.startswith(prefix):
                seen[name] = time.time() - t0
    if proc.wait() != 0:
        print("".join(tail))
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seen, cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime, proc.returncode


def main():
    config = load_config(OPTIONS, description=__doc__)
    tokenizer = get_bench_tokenizer()
    with tempfile.TemporaryDirectory() as base_dir:
        write_base_dir(base_dir, tokenizer)
        print(f"repo {os.path.abspath(config['repo'])} | seconds from launch to the line:")
        for name in config["runs"]:
            seen, cpu, code = time_run(config["repo"], base_dir, RUNS[name])
            figures = " | ".join(f"{mark} {seen[mark]:6.1f}" if mark in seen else f"{mark}   -" for mark in MARKS)
            print(f"{name:<12} | {figures} | CPU s (whole run) {cpu:6.1f}" + (f" | exit code {code}" if code else ""))


if __name__ == "__main__":
    main()
