"""
Train the BPE tokenizer on the pretraining parquet shards (the train split: every shard but the last) and save
it to <base_dir>/tokenizer (mergeable ranks, metadata, token byte lengths).

Launch:
    python -m scripts.tok_train                                        # speedrun: 2B chars, vocab 65536
    python -m scripts.tok_train --max_chars=100000000 --vocab_size=4096
    python -m scripts.tok_train --max_chars=200000 --vocab_size=512    # tiny, seconds on CPU

The tokenizer is CPU-only (rustbpe uses all cores); no process group is involved. Checkpoints record the
sha256 of the tokenizer they were trained with, so replacing a tokenizer that checkpoints under the base dir
use is refused (before training) unless overwrite = 1.
Writes the "Tokenizer training" report section. Tests: tests/test_tokenizer.py (end to end, subprocess).
"""

import os
import time

from nanochat.common import UserError, get_base_dir, install_error_handler, print0
from nanochat.config import Option, load_config
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.report import get_report
from nanochat.runs import checkpoints_trained_with, probe_writable, tokenizer_sha256
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_token_bytes

install_error_handler()  # a UserError prints one line `error: ...` and exits with code 2

# -----------------------------------------------------------------------------
# Config

OPTIONS = [
    Option("max_chars", int, 2_000_000_000, "characters of training text (nanochat's speedrun uses 2B)", min=1),
    Option("doc_cap", int, 10_000, "characters kept per document, so a few huge documents don't dominate",
           min=1),
    Option("vocab_size", int, 65536, "vocabulary size including the 9 special tokens (2**16)",
           min=256 + len(SPECIAL_TOKENS)),
    Option("data_dir", str, "", "parquet folder (empty: $NANOCHAT_DATA_DIR/pretrain, else <base_dir>/base_data)"),
    Option("overwrite", bool, False, "replace a tokenizer that existing checkpoints were trained with"),
]
script_start = time.time()  # the stage's wall-clock time goes into its report section
config = load_config(OPTIONS, description=__doc__)
data_dir = config["data_dir"] or None

# -----------------------------------------------------------------------------
# Output: refuse to replace the tokenizer of existing checkpoints (before spending time on training)

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
old_sha = tokenizer_sha256(tokenizer_dir)
users = checkpoints_trained_with(old_sha) if old_sha else []
if users and not config["overwrite"]:
    raise UserError(f"{tokenizer_dir} holds the tokenizer (sha256 {old_sha[:16]}...) that {len(users)} checkpoint "
                    f"folder(s) were trained with ({', '.join(users)}); a new one would make them print garbage: "
                    f"pass overwrite = 1 to replace it anyway (those checkpoints then refuse to load), or train into "
                    f"another NANOCHAT_BASE_DIR")
if users:
    print0(f"overwrite = 1: replacing the tokenizer of {', '.join(users)} (sha256 {old_sha[:16]}...)")
probe_writable(tokenizer_dir)

# -----------------------------------------------------------------------------
# Data: documents from the train split, each capped, until max_chars


seen = {"docs": 0, "chars": 0}  # what the trainer consumed, for the log


def text_iterator():
    for batch in parquets_iter_batched("train", data_dir=data_dir):
        for doc in batch:
            doc = doc[: config["doc_cap"]]
            seen["docs"] += 1
            seen["chars"] += len(doc)
            yield doc
            if seen["chars"] >= config["max_chars"]:
                return


shards = list_parquet_files(data_dir)
print0(f"training on {len(shards) - 1} train shards in {os.path.dirname(shards[0]) if shards else data_dir}")

# -----------------------------------------------------------------------------
# Train

t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), config["vocab_size"])
train_time = time.time() - t0
print0(f"training time: {train_time:.2f}s on {seen['docs']:,} documents, {seen['chars']:,} characters")

# -----------------------------------------------------------------------------
# Save, round-trip check, report

tokenizer.save(tokenizer_dir)
print0(f"saved tokenizer to {tokenizer_dir} (sha256 {tokenizer_sha256(tokenizer_dir)})")

reloaded = RustBPETokenizer.from_directory(tokenizer_dir)
test_text = ("Hello world! This is a test.\nNumbers: 123, 4567, 89.\nContractions: I'm, you're, it's.\n"
             "Special chars: @#$%^&*()\nUnicode: café, 日本語, Привет, 🙂🚀\n"
             "Plain <|bos|> is ordinary text.")
ids = reloaded.encode(test_text)
round_trip_ok = reloaded.decode(ids) == test_text and ids == tokenizer.encode(test_text)
if not round_trip_ok:  # a self-check of the saved files, not user input: a bug, so a traceback
    raise RuntimeError("round trip failed: the reloaded tokenizer does not reproduce the test text")
if reloaded.get_bos_token_id() in ids:
    raise RuntimeError("plain '<|bos|>' text produced the special id")
print0(f"round trip: OK ({len(test_text.encode('utf-8'))} bytes -> {len(ids)} tokens)")

token_bytes = get_token_bytes()
regular = token_bytes[token_bytes > 0].float()
print0(f"token bytes: {len(token_bytes)} tokens, {int((token_bytes == 0).sum())} special, "
       f"mean {regular.mean():.2f} / max {int(regular.max())} bytes per regular token")

get_report().log(section="Tokenizer training", data=[
    dict(config),
    {"train_time_s": round(train_time, 2), "train_docs": seen["docs"], "train_chars": seen["chars"]},
    {
        "vocab_size": tokenizer.get_vocab_size(),
        "num_special_tokens": int((token_bytes == 0).sum()),
        "token_bytes_min": int(regular.min()),
        "token_bytes_max": int(regular.max()),
        "token_bytes_mean": round(float(regular.mean()), 3),
    },
], duration_s=time.time() - script_start)
