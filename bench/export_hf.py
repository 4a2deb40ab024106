"""
Benchmark the Hugging Face export: size and time of scripts/export_hf.py on a random model of a given depth.

    python -m bench.export_hf --depth=4                                  # trains a tokenizer on the data mirror
    python -m bench.export_hf --depth=4 --tokenizer_dir=~/.cache/nanochat/tokenizer --dtype=float32

Writes a tokenizer and a random-weight checkpoint of `depth` (nanochat's depth dial: width 64 * depth, heads of
128) into a temporary NANOCHAT_BASE_DIR, runs the export script there as a user would (a subprocess, so the
time includes interpreter start-up, writing and the transformers check), then prints the wall time, the size
of every file and the largest |logit difference| the script reported. Needs the `hf` extra.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time


from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import get_data_dir
from nanochat.gpt import config_from_depth, random_model
from nanochat.tokenizer import RustBPETokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mirror_texts(max_chars):
    import pyarrow.parquet as pq

    data_dir = get_data_dir()
    paths = sorted(glob.glob(os.path.join(data_dir or "", "pretrain", "*.parquet")))[:-1]  # last shard: validation
    if not paths:
        sys.exit("set NANOCHAT_DATA_DIR to the data mirror, or pass --tokenizer_dir")
    texts, total = [], 0
    for path in paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                return texts
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(description="export_hf size/time benchmark")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=65536, help="tokenizer vocab when one is trained here")
    parser.add_argument("--sequence_len", type=int, default=2048)
    parser.add_argument("--tokenizer_dir", type=str, default=None, help="use this saved tokenizer instead")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--train_chars", type=int, default=20_000_000, help="text to train the tokenizer on")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        if args.tokenizer_dir:
            tokenizer = RustBPETokenizer.from_directory(os.path.expanduser(args.tokenizer_dir))
        else:
            t0 = time.time()
            tokenizer = RustBPETokenizer.train_from_iterator(iter(mirror_texts(args.train_chars)), args.vocab_size)
            print(f"tokenizer: trained vocab {tokenizer.get_vocab_size()} in {time.time() - t0:.1f}s")
        tokenizer.save(os.path.join(base, "tokenizer"))
        config = config_from_depth(args.depth, tokenizer.get_vocab_size(), args.sequence_len)
        model = random_model(config, seed=0, output_std=0.02)  # not zeros: the logit check compares something
        meta = {"step": 0, "model_config": vars(config).copy(), "user_config": {"depth": args.depth}}
        save_checkpoint(os.path.join(base, "base_checkpoints", f"d{args.depth}"), 0, model.state_dict(), None, meta)
        print(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, vocab "
              f"{config.vocab_size}, parameters {model.num_params():,}")

        out_dir = os.path.join(tmp, "hf")
        env = dict(os.environ, NANOCHAT_BASE_DIR=base)
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "scripts.export_hf", "-i", "base", "--out", out_dir,
                              "--dtype", args.dtype], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if res.returncode != 0:
            sys.exit(f"export failed:\n{res.stdout}\n{res.stderr}")
        diff = re.search(r"max \|logit difference\|.*: (\S+)", res.stdout)
        print(f"export ({args.dtype}, with the transformers check): {wall:.1f}s wall")
        total = 0
        for name in sorted(os.listdir(out_dir)):
            size = os.path.getsize(os.path.join(out_dir, name))
            total += size
            print(f"  {name:<24} {size / 1e6:10.2f} MB")
        print(f"  {'total':<24} {total / 1e6:10.2f} MB")
        print(f"max |logit difference| (fp32, CPU, vs the project's model on the exported weights): "
              f"{diff.group(1) if diff else 'not reported'}")


if __name__ == "__main__":
    main()
