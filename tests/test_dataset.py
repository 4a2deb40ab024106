"""Tests for nanochat/dataset.py: shard listing, train/val split, rank striding, and the download's
retry / atomic-rename logic (with a fake fetch: no network)."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import (default_data_dir, download_shard, index_to_filename, list_parquet_files,
                              parquets_iter_batched)


@pytest.fixture
def tiny_shards(tmp_path):
    """3 shards of 5 documents each, 2 rows per row group (3 row groups per shard), plus files to ignore."""
    texts = {}
    for s in range(3):
        docs = [f"shard {s} doc {d}" for d in range(5)]
        texts[s] = docs
        pq.write_table(pa.table({"text": docs}), tmp_path / index_to_filename(s), row_group_size=2)
    (tmp_path / ".shard_00003.parquet.tmp").write_bytes(b"partial")  # an unfinished download
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path, texts


def test_list_parquet_files_sorted_and_filtered(tiny_shards):
    path, _ = tiny_shards
    files = list_parquet_files(str(path))
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert all(os.path.isabs(f) or f.startswith(str(path)) for f in files)


def test_split_selection(tiny_shards):
    path, texts = tiny_shards
    train = [t for batch in parquets_iter_batched("train", data_dir=str(path)) for t in batch]
    val = [t for batch in parquets_iter_batched("val", data_dir=str(path)) for t in batch]
    assert train == texts[0] + texts[1]
    assert val == texts[2]  # the last shard is validation
    batches = list(parquets_iter_batched("val", data_dir=str(path)))
    assert [len(b) for b in batches] == [2, 2, 1]  # one batch per row group


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_striding_disjoint_and_complete(tiny_shards, world_size):
    path, texts = tiny_shards
    per_rank = [[t for b in parquets_iter_batched("train", start=r, step=world_size, data_dir=str(path)) for t in b]
                for r in range(world_size)]
    seen = [t for docs in per_rank for t in docs]
    assert len(seen) == len(set(seen))  # disjoint
    assert sorted(seen) == sorted(texts[0] + texts[1])  # complete
    # rank 1 reads row groups 1, 1+step, ... of each shard: its first document is row 2 of shard 0
    assert per_rank[1][0] == "shard 0 doc 2"


def test_bad_arguments(tiny_shards, tmp_path_factory):
    path, _ = tiny_shards
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        next(parquets_iter_batched("test", data_dir=str(path)))
    with pytest.raises(ValueError, match="0 <= start < step"):
        next(parquets_iter_batched("train", start=2, step=2, data_dir=str(path)))
    missing = tmp_path_factory.mktemp("empty") / "nope"
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        list_parquet_files(str(missing))
    single = tmp_path_factory.mktemp("single")
    pq.write_table(pa.table({"text": ["a"]}), single / "shard_00000.parquet")
    with pytest.raises(ValueError, match="at least 2 parquet shards"):
        next(parquets_iter_batched("train", data_dir=str(single)))


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "mirror"))
    assert default_data_dir() == str(tmp_path / "mirror" / "pretrain")
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    assert default_data_dir() == str(tmp_path / "base" / "base_data")


def test_mirror_shards(data_dir):
    pretrain = os.path.join(data_dir, "pretrain")
    files = list_parquet_files(pretrain)
    assert [os.path.basename(f) for f in files] == [index_to_filename(i) for i in range(6)]
    val = [t for b in parquets_iter_batched("val", data_dir=pretrain) for t in b]
    train = [t for b in parquets_iter_batched("train", data_dir=pretrain) for t in b]
    assert len(val) == pq.ParquetFile(files[-1]).metadata.num_rows
    assert len(train) + len(val) == 1142  # the mirror README's document count
    assert all(isinstance(t, str) and t for t in val[:10])
    # two ranks cover the train split between them without overlap
    r0 = [t for b in parquets_iter_batched("train", start=0, step=2, data_dir=pretrain) for t in b]
    r1 = [t for b in parquets_iter_batched("train", start=1, step=2, data_dir=pretrain) for t in b]
    assert len(r0) + len(r1) == len(train) and sorted(r0 + r1) == sorted(train)


# ---------------------------------------------------------------------------------------------------------
# download logic with a fake fetch


def test_download_success_atomic(tmp_path):
    urls = []

    def fetch(url, f):
        urls.append(url)
        f.write(b"PAR1 data")

    path = download_shard(7, str(tmp_path), fetch=fetch)
    assert path == str(tmp_path / "shard_00007.parquet")
    assert open(path, "rb").read() == b"PAR1 data"
    assert urls == ["https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/"
                    "shard_00007.parquet"]
    assert os.listdir(tmp_path) == ["shard_00007.parquet"]  # no temp file left behind
    # an existing shard is not fetched again
    download_shard(7, str(tmp_path), fetch=lambda url, f: pytest.fail("fetched an existing shard"))


def test_download_retries_then_succeeds(tmp_path):
    calls, sleeps = [], []

    def flaky(url, f):
        calls.append(url)
        f.write(b"partial bytes")
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        f.write(b" rest")

    path = download_shard(0, str(tmp_path), fetch=flaky, max_attempts=5, base_delay=1.0, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [1.0, 2.0]  # exponential backoff
    assert open(path, "rb").read() == b"partial bytes rest"  # the failed attempts' bytes were discarded
    assert os.listdir(tmp_path) == ["shard_00000.parquet"]


def test_download_gives_up_without_partial_file(tmp_path):
    def broken(url, f):
        f.write(b"half a shard")
        raise OSError("network is unreachable")

    with pytest.raises(RuntimeError, match="after 3 attempts: network is unreachable.*NANOCHAT_DATA_DIR"):
        download_shard(1, str(tmp_path), fetch=broken, max_attempts=3, sleep=lambda s: None)
    assert os.listdir(tmp_path) == []
