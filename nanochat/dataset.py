"""
The pretraining corpus: a folder of parquet shards with a `text` column (one row = one document).

- `list_parquet_files(data_dir=None)`: the sorted shards; default folder $NANOCHAT_DATA_DIR/pretrain (the local
  mirror) if set, else <base_dir>/base_data (where the download below puts them).
- `parquets_iter_batched(split, start, step, data_dir)`: lists of texts, one per parquet row group; "val" is the
  last shard, "train" all the others; row groups are strided by start/step (rank/world_size).
- CLI: `python -m nanochat.dataset -n 8` downloads the first 8 shards of nanochat's FineWeb-Edu re-shard
  (karpathy/fineweb-edu-100b-shuffle, ~100MB each, shard_00000.parquet ... shard_01822.parquet) into
  <base_dir>/base_data, with retries; each file appears only when complete (temp file + atomic rename).

Tests: tests/test_dataset.py.
"""

import argparse
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from nanochat.common import UserError, get_base_dir, get_data_dir


class DataError(UserError, ValueError):
    """Pretraining shards that are missing, too few, or not parquet (the message names the path)."""


class DataMissing(UserError, FileNotFoundError):
    """No parquet folder where one is expected."""

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the last shard index of fineweb-edu-100b-shuffle


def index_to_filename(index):
    return f"shard_{index:05d}.parquet"


def default_data_dir():
    """$NANOCHAT_DATA_DIR/pretrain if the mirror is configured, else <base_dir>/base_data."""
    mirror = get_data_dir()
    if mirror:
        return os.path.join(mirror, "pretrain")
    return os.path.join(get_base_dir(), "base_data")


def list_parquet_files(data_dir=None):
    """Sorted full paths of the *.parquet files in data_dir (temp files of unfinished downloads excluded)."""
    data_dir = data_dir or default_data_dir()
    if not os.path.isdir(data_dir):
        raise DataMissing(f"parquet folder {data_dir} does not exist: set NANOCHAT_DATA_DIR to the local "
                                "mirror or download shards with `python -m nanochat.dataset -n 8`")
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".parquet") and not n.startswith("."))
    return [os.path.join(data_dir, n) for n in names]


def open_parquet(path):
    """pyarrow's ParquetFile, with a one-line DataError naming the path for an empty, truncated or non-parquet
    file (pyarrow raises ArrowInvalid / OSError)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow's errors for a bad file vary by version)
        raise DataError(f"parquet shard {path} cannot be read ({' '.join(str(e).split())[:200]}); it is corrupt "
                        f"or truncated: delete it and download it again") from e


def split_paths(paths, split):
    """'val' = the last shard, 'train' = the others (needs at least 2 shards)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if len(paths) < 2:
        raise DataError(f"need at least 2 parquet shards (train + val), found {len(paths)}")
    return paths[:-1] if split == "train" else paths[-1:]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield lists of texts, one per row group of the split's shards, taking row groups start, start+step, ...
    of each shard (pass start=rank, step=world_size so ranks read disjoint row groups that cover the split)."""
    import pyarrow.parquet as pq

    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start} step={step}")
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        raise DataError(f"need at least 2 parquet shards (train + val) in {data_dir or default_data_dir()}, "
                         f"found {len(paths)}")
    for path in split_paths(paths, split):
        pf = open_parquet(path)
        for rg_idx in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------------------
# download

def _http_fetch(url, dest_file):
    with urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            dest_file.write(chunk)


def download_shard(index, out_dir, fetch=_http_fetch, max_attempts=5, base_delay=2.0, sleep=time.sleep):
    """Download one shard into out_dir; returns its path. Skips a file that already exists. Writes to a temp
    file and renames it into place only when complete, so a crash never leaves a partial shard behind.
    `fetch(url, file)` writes the body into an open binary file (injectable for tests)."""
    filename = index_to_filename(index)
    path = os.path.join(out_dir, filename)
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    url = f"{BASE_URL}/{filename}"
    tmp = os.path.join(out_dir, f".{filename}.tmp")
    for attempt in range(1, max_attempts + 1):
        try:
            with open(tmp, "wb") as f:
                fetch(url, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return path
        except Exception as e:  # network errors of any kind: retry with exponential backoff
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt == max_attempts:
                raise RuntimeError(f"failed to download {url} after {max_attempts} attempts: {e}. "
                                   "Without network access, point NANOCHAT_DATA_DIR at a local mirror "
                                   "whose pretrain/ folder holds the parquet shards.") from e
            delay = base_delay * 2 ** (attempt - 1)
            print(f"download {filename}: attempt {attempt}/{max_attempts} failed ({e}); retrying in {delay:.0f}s")
            sleep(delay)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards")
    parser.add_argument("-n", "--num_files", type=int, default=-1, help="number of shards (-1 = all)")
    parser.add_argument("-w", "--num_workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--out_dir", default=None, help="default: <base_dir>/base_data")
    args = parser.parse_args(argv)
    num = MAX_SHARD + 1 if args.num_files == -1 else min(args.num_files, MAX_SHARD + 1)
    out_dir = args.out_dir or os.path.join(get_base_dir(), "base_data")
    print(f"downloading {num} shards to {out_dir} with {args.num_workers} workers")
    try:
        with ThreadPoolExecutor(max_workers=args.num_workers) as pool:
            paths = list(pool.map(lambda i: download_shard(i, out_dir), range(num)))
    except RuntimeError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"done: {len(paths)} shards in {out_dir}")


if __name__ == "__main__":
    main()
