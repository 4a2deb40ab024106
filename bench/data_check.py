"""
Data check speed: the guide's ~21.4K-conversation SFT mixture, here the mirror's ARC-Easy + ARC-Challenge train,
GSM8K train and ChitChat train listed until 21,425 conversations, checked (nanochat/data_check.py: per-source
figures with token lengths, duplicates, contamination against ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval)
with a cold index cache, then again with the cache warm. Target: <= 60 s on a 2-core machine.

    NANOCHAT_DATA_DIR=/work/shared/data python -m bench.data_check

The tokenizer is <base_dir>/tokenizer if present, otherwise a small one trained here (not timed).
"""

import os
import tempfile
import time

from bench.sft_throughput import get_bench_tokenizer
from nanochat.config import Option, load_config
from nanochat.data_check import DEFAULT_EVAL_TASKS, check_sources, format_data_check
from nanochat.sft_report import data_summary
from tasks.mixture import build_mixtures

OPTIONS = [
    Option("mixture", list, ["ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "GSM8K:main:train", "ChitChat:train",
                             "ChitChat:train", "ChitChat:train:0:2950"], "training specs, each checked as a source"),
    Option("eval_tasks", list, list(DEFAULT_EVAL_TASKS), "evaluation sets to check against"),
    Option("max_seq_len", int, 2048, "truncation length of the token figures"),
]


def main():
    config = load_config(OPTIONS, description=__doc__)
    tokenizer = get_bench_tokenizer()
    row_capacity = config["max_seq_len"] + 1
    render = lambda c: tokenizer.render_conversation(c, max_tokens=None)  # noqa: E731
    summarize = lambda convs: data_summary(convs, render, row_capacity, False, 4)  # noqa: E731
    t0 = time.time()
    _, parts, _ = build_mixtures({"train_mixture": config["mixture"]})
    total = sum(len(task) for _, task, _ in parts["train_mixture"])
    t_load = time.time() - t0
    print(f"{total:,} training conversations in {len(parts['train_mixture'])} sources, loaded in {t_load:.1f}s")
    with tempfile.TemporaryDirectory() as cache_dir:
        times = []
        for label in ("cold index cache", "warm index cache"):
            t0 = time.time()
            rows, found, _ = check_sources(parts["train_mixture"], config["eval_tasks"], summarize, cache_dir)
            times.append(time.time() - t0)
            print(f"data check ({label}): {times[-1]:.1f}s")
        t0 = time.time()
        check_sources(parts["train_mixture"], config["eval_tasks"], None, cache_dir)
        t_no_tokens = time.time() - t0
    print("\n".join(format_data_check(rows, found)))
    print(f"\nSummary: {total:,} conversations x {len(config['eval_tasks'])} eval sets | loading {t_load:.1f}s | check "
          f"{times[0]:.1f}s cold, {times[1]:.1f}s warm ({t_no_tokens:.1f}s without token figures) | "
          f"{os.cpu_count()} CPUs (shared machine: timings are noisy)")


if __name__ == "__main__":
    main()
