"""
The offline inputs of bench/gpu_proof.sh, made from nothing (the GPU machine has no dataset mirror and no network):

    python -m bench.gpu_proof_setup WORK [--depth=12] [--vocab_size=8192] [--chars=3000000]

writes, under WORK:
- data/   a dataset mirror in NANOCHAT_DATA_DIR's layout: pretrain/shard_0000{0..3}.parquet of synthetic text
          (random words and sums; the last shard is the validation shard), ARC-Easy and GSM8K splits of
          synthetic problems (for chat_sft's task metrics; a random model scores what it scores)
- conversations.jsonl   synthetic chat conversations for chat_sft's CustomJSON training and validation mixtures
- base/   NANOCHAT_BASE_DIR: a tokenizer trained on that text (rustbpe) and a random-init base checkpoint
          base_checkpoints/d<depth>/ (nanochat's init, so its loss starts at ln(vocab_size))
Tested through bench/gpu_proof.sh --cpu-dry-run (tests/test_gpu_proof.py).
"""

import argparse
import json
import os
import random

WORDS = ("the a of to and in is that it for on with as was by at from this be are or an have not which one "
         "model data train token loss step learn chat user answer question number sum small large fast slow "
         "red blue green cat dog house tree river stone light night day water fire earth sky").split()


def synthetic_documents(total_chars, seed=0):
    """Documents of random-word sentences and written-out sums, about total_chars characters in all."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < total_chars:
        sentences = []
        for _ in range(rng.randint(5, 40)):
            if rng.random() < 0.2:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                sentences.append(f"{a} plus {b} is {a + b}.")
            else:
                words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
                sentences.append(" ".join(words).capitalize() + ".")
        doc = " ".join(sentences)
        docs.append(doc)
        size += len(doc)
    return docs


def write_pretrain(data_dir, docs, num_shards=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(data_dir, "pretrain")
    os.makedirs(folder, exist_ok=True)
    for i in range(num_shards):
        pq.write_table(pa.table({"text": docs[i::num_shards]}), os.path.join(folder, f"shard_{i:05d}.parquet"))


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_eval_sets(data_dir, num=64, seed=0):
    """ARC-Easy and GSM8K splits in the mirror's row format (tasks/arc.py, tasks/gsm8k.py), synthetic sums."""
    rng = random.Random(seed)
    arc, gsm = [], []
    for i in range(num):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        options = [a + b, a + b + 1, abs(a - b), a * 2]
        rng.shuffle(options)
        arc.append({"id": f"synthetic-{i}", "question": f"What is {a} plus {b}?",
                    "choices": {"text": [str(o) for o in options], "label": ["A", "B", "C", "D"]},
                    "answerKey": "ABCD"[options.index(a + b)]})
        gsm.append({"question": f"Sam has {a} apples and buys {b} more. How many apples does Sam have?",
                    "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    for split in ("train", "validation", "test"):
        _write_jsonl(os.path.join(data_dir, "allenai", "ai2_arc", "ARC-Easy", f"{split}.jsonl"), arc)
    for split in ("train", "test"):
        _write_jsonl(os.path.join(data_dir, "openai", "gsm8k", "main", f"{split}.jsonl"), gsm)


def write_conversations(path, num, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        messages = []
        for _ in range(rng.randint(1, 4)):  # varied lengths: something for bestfit packing to do
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 60)))
            messages.append({"role": "user", "content": f"{filler} What is {a} plus {b}?".strip()})
            messages.append({"role": "assistant", "content": f"{a} plus {b} is {a + b}."})
        rows.append({"messages": messages})
    _write_jsonl(path, rows)


def write_base_checkpoint(base_dir, tokenizer, depth, sequence_len, head_dim):
    """A random-init (nanochat's init_weights) GPT of `depth` as base_checkpoints/d<depth>/ step 0."""
    import torch

    from nanochat.checkpoint_manager import SOURCE_DIRS, save_checkpoint
    from nanochat.runs import tokenizer_sha256
    from nanochat.gpt import GPT, config_from_depth

    config = config_from_depth(depth, tokenizer.get_vocab_size(), sequence_len, head_dim=head_dim)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    meta = {"step": 0, "model_config": vars(config).copy(), "user_config": {"depth": depth},
            "git_commit": "unknown", "run_id": f"gpu-proof-d{depth}", "run_name": "gpu_proof",
            "tokenizer_sha256": tokenizer_sha256(os.path.join(base_dir, "tokenizer"))}
    checkpoint_dir = os.path.join(base_dir, SOURCE_DIRS["base"], f"d{depth}")
    save_checkpoint(checkpoint_dir, 0, model.state_dict(), None, meta)
    return checkpoint_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="offline inputs of bench/gpu_proof.sh")
    parser.add_argument("work_dir")
    parser.add_argument("--depth", type=int, default=12, help="depth of the random-init base checkpoint")
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--sequence_len", type=int, default=2048)
    parser.add_argument("--vocab_size", type=int, default=8192, help="tokenizer vocabulary (9 special tokens in)")
    parser.add_argument("--chars", type=int, default=3_000_000, help="characters of synthetic pretraining text")
    parser.add_argument("--conversations", type=int, default=2000)
    args = parser.parse_args(argv)

    from nanochat.tokenizer import RustBPETokenizer

    data_dir, base_dir = os.path.join(args.work_dir, "data"), os.path.join(args.work_dir, "base")
    docs = synthetic_documents(args.chars)
    write_pretrain(data_dir, docs)
    write_eval_sets(data_dir)
    write_conversations(os.path.join(args.work_dir, "conversations.jsonl"), args.conversations)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(docs), args.vocab_size)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    checkpoint_dir = write_base_checkpoint(base_dir, tokenizer, args.depth, args.sequence_len, args.head_dim)
    print(f"data {data_dir} ({len(docs)} documents, {sum(map(len, docs)):,} chars), tokenizer vocab "
          f"{tokenizer.get_vocab_size()}, random-init checkpoint {checkpoint_dir}")


if __name__ == "__main__":
    main()
