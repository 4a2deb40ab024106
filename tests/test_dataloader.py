"""
Tests for nanochat/dataloader.py with a byte-level fake tokenizer and small hand-made parquet shards:
shapes and dtypes, <|bos|> placement, rank-disjointness (and that the ranks together cover every
document), exact resume from a saved state, and the train/val split.
Run: .venv/bin/python -m pytest tests/test_dataloader.py
"""

import itertools
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import (conversation_data_loader, count_conversation_tokens, iter_documents,
                                 tokenizing_distributed_data_loader)
from nanochat.dataset import split_paths

BOS = 256


class ByteTokenizer:
    """Bytes as tokens (0..255) and <|bos|> = 256."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        assert isinstance(texts, list)
        return [list(t.encode("utf-8")) for t in texts]


def _doc_text(shard, i):
    # distinct documents of varied length; the marker makes every document identifiable in the stream
    return f"<s{shard}d{i}>" + "abcdefghij"[i % 10] * (3 + (7 * i + shard) % 23)


@pytest.fixture()
def shards(tmp_path):
    """3 train shards (2 of them with several row groups) + 1 val shard."""
    files = []
    for shard, (n_docs, rg_size) in enumerate([(25, 10), (7, 7), (30, 4), (12, 5)]):
        path = tmp_path / f"shard_{shard:05d}.parquet"
        table = pa.table({"text": [_doc_text(shard, i) for i in range(n_docs)]})
        pq.write_table(table, path, row_group_size=rg_size)
        files.append(str(path))
    return files


def test_shapes_dtypes_and_bos(shards):
    B, T = 3, 16
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), B, T, "train", files=shards, rank=0, world_size=1)
    stream = []
    for inputs, targets, state in itertools.islice(loader, 6):
        assert inputs.shape == (B, T) and targets.shape == (B, T)
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
        # targets are the inputs shifted by one inside each row of T+1 tokens
        assert torch.equal(inputs[:, 1:].long(), targets[:, :-1])
        for row_in, row_tg in zip(inputs.tolist(), targets.tolist()):
            stream.extend(row_in + row_tg[-1:])
        assert set(state) == {"epoch", "shard", "row_group", "doc", "token"}
    # the concatenated rows are exactly the documents in order, each prefixed with <|bos|>
    expected = []
    for text in [_doc_text(0, i) for i in range(25)] + [_doc_text(1, i) for i in range(7)]:
        expected += [BOS] + list(text.encode())
    assert stream == expected[: len(stream)]
    assert stream[0] == BOS and stream.count(BOS) > 3


def _docs_seen(loader, n_batches):
    """The document markers (e.g. '<s0d3>') whose start appears in the first n batches."""
    seen = []
    for inputs, targets, _ in itertools.islice(loader, n_batches):
        stream = []
        for row_in, row_tg in zip(inputs.tolist(), targets.tolist()):
            stream.extend(row_in + row_tg[-1:])
        text = bytes(t if t != BOS else ord("|") for t in stream).decode()
        seen += [piece.split(">")[0] + ">" for piece in text.split("|")[1:] if ">" in piece]
    return seen


def test_ranks_disjoint_and_cover(shards):
    B, T = 2, 8
    world = 3
    per_rank = []
    for rank in range(world):
        docs = [pos for pos, _ in itertools.islice(iter_documents(split_paths(shards, "train"), rank, world), 20)]
        assert all(doc % world == rank for (_, _, _, doc) in docs)
        per_rank.append(set(docs))
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])
    # one epoch over all ranks covers every training document exactly once
    n_train_docs = 25 + 7 + 30
    covered = []
    for rank in range(world):
        for (epoch, shard, rg, doc), _ in iter_documents(split_paths(shards, "train"), rank, world):
            if epoch > 0:
                break
            covered.append((shard, rg, doc))
    assert len(covered) == len(set(covered)) == n_train_docs
    # and the loaders' batches carry disjoint documents
    seen = [set(_docs_seen(tokenizing_distributed_data_loader(ByteTokenizer(), B, T, "train", files=shards,
                                                              rank=r, world_size=world), 5)) for r in range(world)]
    assert seen[0] and seen[1] and seen[2]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


@pytest.mark.parametrize("B,T,stop", [(2, 8, 3), (1, 5, 7), (4, 16, 2), (2, 8, 40)])
def test_resume_continues_exactly(shards, B, T, stop):
    def loader(state=None):
        return tokenizing_distributed_data_loader(ByteTokenizer(), B, T, "train", files=shards, rank=1,
                                                  world_size=2, resume_state=state, encode_batch_size=3)

    reference = list(itertools.islice(loader(), stop + 5))
    state = reference[stop - 1][2]
    resumed = list(itertools.islice(loader(state), 5))
    for (ri, rt, rs), (xi, xt, xs) in zip(reference[stop:], resumed):
        assert torch.equal(ri, xi) and torch.equal(rt, xt)
        assert rs == xs


def test_epochs_wrap_and_val_split(shards):
    # the val split is only the last shard; tiny val data still gives an endless stream
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), 4, 32, "val", files=shards, rank=0, world_size=1)
    states = [state for _, _, state in itertools.islice(loader, 30)]
    assert {s["shard"] for s in states} == {0}
    assert states[-1]["epoch"] >= 1


class ChatByteTokenizer(ByteTokenizer):
    """render_conversation: <|bos|> + the bytes of each message (truncated to max_tokens), mask unused."""

    def render_conversation(self, conversation, max_tokens=2048):
        ids = [BOS] + [b for m in conversation["messages"] for b in m["content"].encode()]
        ids = ids[:max_tokens]
        return ids, [1] * len(ids)


def _conversations(n):
    return [{"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "a" * (i % 7)}]}
            for i in range(n)]


def test_conversation_loader_stream_ranks_and_resume():
    data = _conversations(11)
    tok = ChatByteTokenizer()
    B, T = 2, 6
    batches = list(itertools.islice(conversation_data_loader(data, tok, B, T, rank=1, world_size=2), 8))
    stream = []
    for inputs, targets, _ in batches:
        assert inputs.dtype == torch.int32 and targets.dtype == torch.int64 and inputs.shape == (B, T)
        for row_in, row_tg in zip(inputs.tolist(), targets.tolist()):
            stream.extend(row_in + row_tg[-1:])
    expected = []
    for epoch in range(5):
        for i in range(1, 11, 2):  # rank 1 of 2: odd conversations, epoch after epoch
            expected += tok.render_conversation(data[i])[0]
    assert stream == expected[: len(stream)]
    # resume from the state of batch 3 reproduces batches 4.. exactly (including across the epoch wrap)
    resumed = conversation_data_loader(data, tok, B, T, rank=1, world_size=2, resume_state=batches[2][2])
    for (ri, rt, rs), (xi, xt, xs) in zip(batches[3:], resumed):
        assert torch.equal(ri, xi) and torch.equal(rt, xt) and rs == xs
    assert count_conversation_tokens(data, tok, rank=1, world_size=2) == len(expected) // 5


def test_mirror_with_real_tokenizer(data_dir, tokenizer):
    """On the mirror's shards with the BPE tokenizer: the first row is <|bos|> + the first train document."""
    B, T = 2, 64
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", data_dir=os.path.join(data_dir, "pretrain"),
                                                rank=0, world_size=1)
    inputs, targets, state = next(loader)
    assert inputs.shape == (B, T) and int(inputs[0, 0]) == tokenizer.get_bos_token_id()
    first_doc = pq.read_table(os.path.join(data_dir, "pretrain", "shard_00000.parquet")).column("text")[0].as_py()
    row = inputs[0].tolist() + targets[0, -1:].tolist()
    assert first_doc.startswith(tokenizer.decode(row[1:])[:100])
    assert state["shard"] == 0 and state["doc"] == 0 and state["token"] == B * (T + 1)  # first doc is long
