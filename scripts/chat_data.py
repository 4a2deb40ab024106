"""
Check chat training data before training on it: per source the detected row shape, conversations, turns, token
lengths, supervised share (warned outside the usual range), truncated / dropped at max_seq_len, empty replies,
duplicates within and across sources, and contamination with the evaluation test sets (13-word n-grams, the
GPT-3 rule; nanochat/data_check.py). chat_sft runs the same check before training (option decontaminate).

    python -m scripts.chat_data data/chats.parquet data/more.jsonl          # your files (any format, shape)
    python -m scripts.chat_data --sft_config configs/sft_cpu.txt            # an SFT config's train_mixture
    python -m scripts.chat_data data/chats.jsonl -a 'GSM8K|MMLU|ChitChat:test' --max_seq_len 1024

Token figures need the tokenizer (<base_dir>/tokenizer); without one they are left out. The evaluation sets'
n-gram indexes are cached in <base_dir>/data_check/. Exit code 1 when any training conversation is contaminated
(so a CI step can stop on it). Tests: tests/test_data_check.py.
"""

import sys
import time

from nanochat.common import get_base_dir, install_error_handler
from nanochat.config import ConfigError, Option, load_config, parse_config_text
from nanochat.data_check import DEFAULT_EVAL_TASKS, cache_dir_default, check_sources, format_data_check
from nanochat.sft import BatchSettings, render_share
from nanochat.sft_report import data_summary
from nanochat.tokenizer import TokenizerFileMissing, get_tokenizer
from tasks.mixture import build_mixtures

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

OPTIONS = [
    Option("data", list, [], "files, folders, hub datasets or mixture specs to check (may also come first, "
                             "without a key)"),
    Option("sft_config", str, None, "an SFT config file: check its train_mixture (with its max_seq_len)"),
    Option("eval_tasks", str, "|".join(DEFAULT_EVAL_TASKS), "'|'-separated evaluation sets (chat_eval names or "
                                                            "mixture specs); '' for none", short="a"),
    Option("max_seq_len", int, None, "truncation length (default: the config's max_seq_len, else 2048)", min=1),
    Option("examples", int, 3, "contaminated examples shown per cell", min=0),
]


def main(argv=None):
    # ------------------------------------------------------------------------------------------------------
    # Config (files may come first without a key: `chat_data a.jsonl b.parquet -a GSM8K`)

    t0 = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    files = []
    while argv and not argv[0].startswith("-"):
        files.append(argv.pop(0))
    config = load_config(OPTIONS, argv=argv, description=__doc__, verbose=False)
    specs, max_seq_len, drop_long = files + list(config["data"]), 2048, False
    if config["sft_config"]:
        try:
            with open(config["sft_config"], encoding="utf-8") as f:
                values = {k: v for k, (v, _) in parse_config_text(f.read(), config["sft_config"]).items()}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {config['sft_config']}: {e}") from None
        specs += list(values.get("train_mixture", []))
        max_seq_len, drop_long = values.get("max_seq_len", max_seq_len), bool(values.get("drop_long", False))
    if not specs:
        raise ConfigError("command line: give files or mixture specs to check, or --sft_config with a train_mixture")
    max_seq_len = config["max_seq_len"] or max_seq_len
    eval_names = [name.strip() for name in config["eval_tasks"].split("|") if name.strip()]

    # ------------------------------------------------------------------------------------------------------
    # Tokenizer (optional) and data

    try:
        tokenizer = get_tokenizer()
    except TokenizerFileMissing:
        tokenizer = None
        print("No tokenizer in <base_dir>/tokenizer: token figures are left out")
    summarize = None
    if tokenizer is not None:  # the figures chat_sft's preview shows, one conversation per row (no packing)
        render = lambda c: tokenizer.render_conversation(c, max_tokens=None)  # noqa: E731
        settings = BatchSettings("pad", 1, max_seq_len + 1, tokenizer.encode_special("<|assistant_end|>"), drop_long)
        summarize = lambda convs: data_summary(render_share(convs, render, settings), settings)  # noqa: E731
    _, parts, notes = build_mixtures({"training data": specs})
    for note in notes:
        print(note)

    # ------------------------------------------------------------------------------------------------------
    # Check and print

    rows, found, skipped = check_sources(parts["training data"], eval_names, summarize,
                                         cache_dir_default(get_base_dir()), config["examples"])
    print("\n".join(format_data_check(rows, found, skipped)))
    total = sum(r["conversations"] for r in rows)
    flagged = sum(v["count"] for per_source in (found or {}).values() for v in per_source.values())
    print(f"\nChecked {total:,} conversations in {len(rows)} source(s) against {len(eval_names)} evaluation set(s) "
          f"in {time.time() - t0:.1f}s (max_seq_len {max_seq_len})")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
