"""
Compression of the trained tokenizer (<base_dir>/tokenizer): bytes per token on small built-in samples (prose,
code, math, chat, non-English) and on text from the train and val shards, printed as a table.
Higher bytes/token = better compression.

Launch:
    python -m scripts.tok_eval
    python -m scripts.tok_eval --shard_chars=100000        # quicker

Writes the "Tokenizer evaluation" report section. Tests: tests/test_tokenizer.py (end to end, subprocess).
"""

import re

from nanochat.common import print0, install_error_handler
from nanochat.config import Option, load_config
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("shard_chars", int, 1_000_000, "characters of train / val shard text to evaluate on", min=0),
    Option("data_dir", str, "", "parquet folder (empty: $NANOCHAT_DATA_DIR/pretrain, else <base_dir>/base_data)"),
]
config = load_config(OPTIONS, description=__doc__)
data_dir = config["data_dir"] or None

# -----------------------------------------------------------------------------
# Tokenizer

tokenizer = get_tokenizer()
print0(f"tokenizer: vocab size {tokenizer.get_vocab_size()}")

# -----------------------------------------------------------------------------
# Data: built-in samples, plus shard text

PROSE = """The history of the printing press is, in many ways, the history of modern Europe. Before Gutenberg's
movable type, books were copied by hand, a slow and expensive process that kept literacy the privilege of a
few. Within fifty years of the first printed Bible, millions of volumes circulated across the continent, and
ideas that once took decades to spread could travel in months."""

CODE = '''def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    sequence = [0, 1]
    while len(sequence) < n:
        sequence.append(sequence[-1] + sequence[-2])
    return sequence[:n]


if __name__ == "__main__":
    for i, value in enumerate(fibonacci(10)):
        print(f"F({i}) = {value}")
'''

MATH = r"""Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which is zero at x = 2, and f(2) = 12 - 24 + 7 = -5.
The integral \int_0^1 x^2 \, dx = 1/3 \approx 0.3333. Solve 2x + 5 = 17: 2x = 12, so x = 6.
Natalia sold 48 clips in April and half as many in May: 48 + 48 / 2 = 48 + 24 = 72. #### 72"""

CHAT = """<|user_start|>Hi! Can you help me plan a three-day trip to Lisbon?<|user_end|><|assistant_start|>Of course!
Day 1: explore Alfama and the castle. Day 2: take the tram to Belém for the tower and pastries. Day 3: a day
trip to Sintra. Would you like restaurant suggestions too?<|assistant_end|><|user_start|>Yes please, something
cheap.<|user_end|><|assistant_start|>Try a tasca in Bairro Alto: grilled sardines, bread and wine for a few
euros.<|assistant_end|>"""

NON_ENGLISH = """Der schnelle braune Fuchs springt über den faulen Hund. Le vif renard brun saute par-dessus le chien
paresseux. Быстрая коричневая лиса перепрыгивает через ленивую собаку. 敏捷的棕色狐狸跳过了懒狗。
素早い茶色の狐がのろまな犬を飛び越える。 빠른 갈색 여우가 게으른 개를 뛰어넘는다. الثعلب البني السريع يقفز فوق الكلب الكسول."""


def shard_text(split, max_chars):
    parts, n = [], 0
    for batch in parquets_iter_batched(split, data_dir=data_dir):
        for doc in batch:
            parts.append(doc)
            n += len(doc)
            if n >= max_chars:
                return "\n".join(parts)[:max_chars]
    return "\n".join(parts)[:max_chars]


samples = {"prose": PROSE, "code": CODE, "math": MATH, "chat": CHAT, "non-English": NON_ENGLISH}
samples["train shards"] = shard_text("train", config["shard_chars"])
samples["val shard"] = shard_text("val", config["shard_chars"])

# -----------------------------------------------------------------------------
# Evaluate

rows = []
for name, text in samples.items():
    ids = tokenizer.encode(text)
    if tokenizer.decode(ids) != text:  # a tokenizer bug, not user input
        raise RuntimeError(f"round trip failed on {name}")
    n_bytes = len(text.encode("utf-8"))
    rows.append({"sample": name, "bytes": n_bytes, "tokens": len(ids), "bytes_per_token": n_bytes / max(len(ids), 1)})

print0(f"{'sample':<14} {'bytes':>10} {'tokens':>10} {'bytes/token':>12}")
print0("-" * 49)
for r in rows:
    print0(f"{r['sample']:<14} {r['bytes']:>10} {r['tokens']:>10} {r['bytes_per_token']:>12.3f}")

# -----------------------------------------------------------------------------
# Report

get_report().log(section="Tokenizer evaluation", data=[
    {"vocab_size": tokenizer.get_vocab_size(), "shard_chars": config["shard_chars"]},
    {"bytes_per_token_" + re.sub(r"\W", "_", r["sample"]): round(r["bytes_per_token"], 3) for r in rows},
])
