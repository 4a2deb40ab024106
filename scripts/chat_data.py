"""
Check chat training data before training on it: per source the detected row shape, conversations, turns, token
lengths, supervised share (warned outside the usual range), truncated / dropped at max_seq_len, empty replies,
duplicates within and across sources, and contamination with the evaluation test sets (13-word n-grams, the
GPT-3 rule; nanochat/data_check.py). chat_sft runs the same check before training (option decontaminate).

    python -m scripts.chat_data data/chats.parquet data/more.jsonl          # your files (any format, shape)
    python -m scripts.chat_data --config configs/sft_cpu.txt                # an SFT config's train_mixture
    python -m scripts.chat_data data/chats.jsonl -a 'GSM8K|MMLU|ChitChat:test' --max-seq-len 1024

Token figures need the tokenizer (<base_dir>/tokenizer); without one they are left out. The evaluation sets'
n-gram indexes are cached in <base_dir>/data_check/. Exit code 1 when any training conversation is contaminated
(so a CI step can stop on it). Tests: tests/test_data_check.py.
"""

import sys
import time

from nanochat.common import get_base_dir, install_error_handler
from nanochat.config import ArgumentParser, ConfigError, bounded, parse_config_text
from nanochat.data_check import DEFAULT_EVAL_TASKS, cache_dir_default, check_sources, format_data_check
from nanochat.sft_report import data_summary
from nanochat.tokenizer import TokenizerFileMissing, get_tokenizer
from tasks.mixture import build_mixtures

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config

    t0 = time.time()
    parser = ArgumentParser(description="Check chat training data (figures, duplicates, eval contamination)")
    parser.add_argument("specs", nargs="*", help="files, folders, hub datasets or mixture specs to check")
    parser.add_argument("--config", type=str, default=None, help="an SFT config: check its train_mixture")
    parser.add_argument("-a", "--eval-tasks", type=str, default="|".join(DEFAULT_EVAL_TASKS),
                        help="'|'-separated evaluation sets (chat_eval names or mixture specs); '' for none")
    parser.add_argument("--max-seq-len", type=bounded(int, min=1), default=None,
                        help="truncation length (default: the config's max_seq_len, else 2048)")
    parser.add_argument("--examples", type=bounded(int, min=0), default=3, help="contaminated examples shown per cell")
    args = parser.parse_args(argv)
    specs, max_seq_len, drop_long = list(args.specs), 2048, False
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                values = {k: v for k, (v, _) in parse_config_text(f.read(), args.config).items()}
        except OSError as e:
            raise ConfigError(f"cannot read config file {args.config}: {e.strerror}") from None
        specs += list(values.get("train_mixture", []))
        max_seq_len, drop_long = values.get("max_seq_len", max_seq_len), bool(values.get("drop_long", False))
    if not specs:
        parser.error("give files or mixture specs to check, or --config with a train_mixture")
    max_seq_len = args.max_seq_len or max_seq_len
    eval_names = [name.strip() for name in args.eval_tasks.split("|") if name.strip()]

    # ------------------------------------------------------------------------------------------------------
    # Tokenizer (optional) and data

    try:
        tokenizer = get_tokenizer()
    except TokenizerFileMissing:
        tokenizer = None
        print("No tokenizer in <base_dir>/tokenizer: token figures are left out")
    summarize = None
    if tokenizer is not None:
        render = lambda c: tokenizer.render_conversation(c, max_tokens=None)  # noqa: E731
        summarize = lambda convs: data_summary(convs, render, max_seq_len + 1, drop_long, 1)  # noqa: E731
    _, parts, notes = build_mixtures({"training data": specs})
    for note in notes:
        print(note)

    # ------------------------------------------------------------------------------------------------------
    # Check and print

    rows, found, skipped = check_sources(parts["training data"], eval_names, summarize,
                                         cache_dir_default(get_base_dir()), args.examples)
    print("\n".join(format_data_check(rows, found, skipped)))
    total = sum(r["conversations"] for r in rows)
    flagged = sum(v["count"] for per_source in (found or {}).values() for v in per_source.values())
    print(f"\nChecked {total:,} conversations in {len(rows)} source(s) against {len(eval_names)} evaluation set(s) "
          f"in {time.time() - t0:.1f}s (max_seq_len {max_seq_len})")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
