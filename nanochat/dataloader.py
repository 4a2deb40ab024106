"""
The pretraining data loader: parquet documents -> <|bos|>-prefixed token streams -> (B, T+1) rows.

    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device=device)
    for inputs, targets, state in loader:   # inputs (B, T) int32, targets (B, T) int64, state: dict
        ...
    # later: tokenizing_distributed_data_loader(tokenizer, B, T, "train", resume_state=state) continues with
    # exactly the batch that would have come next.

How data is read (one "unit" = one row group of one shard; the split's shards are nanochat's: the last
parquet file is "val", the others are "train"):
- Every rank walks the same row groups in the same order and keeps documents `doc_index % world_size ==
  rank` of each, so ranks are disjoint and balanced even when there are fewer row groups than ranks (the
  local mirror has one row group per shard). Reading a row group is cheap next to tokenizing it, and
  each rank tokenizes only its own documents.
- Each document becomes [<|bos|>] + tokens; documents are concatenated into one stream that is cut into
  rows of T+1 tokens (inputs = row[:-1], targets = row[1:]); a batch takes B*(T+1) tokens. Documents
  cross row and batch boundaries, as in nanochat.
- The stream never ends: after the last row group it starts over (epoch + 1).

The state yielded with each batch is the position of the first token not yet used:
{"epoch", "shard", "row_group", "doc", "token"} (shard = index in the split's file list, doc = index of the
document inside the row group, token = offset inside that document's tokens, <|bos|> included). Resuming
re-reads that document, drops `token` tokens and goes on, so the batches are the same as without the
interruption. Each rank saves and resumes its own state.

This module reads the parquet files itself (nanochat.dataset.list_parquet_files / split_paths give the
shard list) rather than through parquets_iter_batched, because the resume state needs the shard / row-group position.

Tests: tests/test_dataloader.py.
"""

from collections import deque

import torch

from nanochat.common import UserError, dist_rank_world
from nanochat.dataset import list_parquet_files, open_parquet, split_paths


def iter_documents(files, rank=0, world_size=1, start=None):
    """Yield (position, text) for this rank's documents, forever. position = (epoch, shard, row_group, doc).
    `start` (same tuple) skips everything before that document."""
    epoch, shard0, rg0, doc0 = start if start is not None else (0, 0, 0, 0)
    while True:
        for shard in range(shard0, len(files)):
            pf = open_parquet(files[shard])
            for rg in range(rg0 if shard == shard0 else 0, pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                first = doc0 if (shard == shard0 and rg == rg0) else 0
                for doc in range(first, len(texts)):
                    if doc % world_size == rank:
                        yield (epoch, shard, rg, doc), texts[doc]
        epoch, shard0, rg0, doc0 = epoch + 1, 0, 0, 0


def state_to_position(state):
    return (state["epoch"], state["shard"], state["row_group"], state["doc"]), state["token"]


def position_to_state(position, token):
    epoch, shard, rg, doc = position
    return {"epoch": epoch, "shard": shard, "row_group": rg, "doc": doc, "token": token}


def token_batches(documents, encode, bos_id, B, T, start_token=0, encode_batch_size=32):
    """The pure core of both loaders: turn (position, document) pairs into lists of B*(T+1) token ids.
    Yields (tokens, (position, offset)): the position of the document holding the first unused token and
    that token's offset in the document's tokens (see module docstring). `encode(list_of_documents)` gives
    token lists; bos_id (or None for none) is put in front of each; `start_token` drops that many tokens of
    the first document (resume)."""
    needed = B * (T + 1)
    buffer = deque()  # entries [position, tokens, offset of the first unused token]
    buffered = 0
    docs_iter = iter(documents)
    skip = start_token
    while True:
        while buffered <= needed:  # keep at least one token back, so the state always names a document
            chunk = []
            for _ in range(encode_batch_size):
                item = next(docs_iter, None)
                if item is None:
                    break
                chunk.append(item)
            if not chunk:
                raise UserError("the document stream ended before a full batch could be made: the data holds fewer "
                                "tokens than one batch (device_batch_size * max_seq_len); use more data or smaller "
                                "batches")
            for (position, _), ids in zip(chunk, encode([doc for _, doc in chunk])):
                tokens = ([bos_id] if bos_id is not None else []) + list(ids)
                offset = min(skip, len(tokens))
                skip = 0
                if offset < len(tokens):
                    buffer.append([position, tokens, offset])
                    buffered += len(tokens) - offset
        out = []
        while len(out) < needed:
            entry = buffer[0]
            take = min(needed - len(out), len(entry[1]) - entry[2])
            out.extend(entry[1][entry[2]: entry[2] + take])
            entry[2] += take
            buffered -= take
            if entry[2] == len(entry[1]):
                buffer.popleft()
        yield out, (buffer[0][0], buffer[0][2])


def rows_to_batch(tokens, B, T, device):
    """B*(T+1) token ids -> inputs (B, T) int32 and targets (B, T) int64 on `device`."""
    rows = torch.tensor(tokens, dtype=torch.long).view(B, T + 1)
    if device.type == "cuda":
        rows = rows.pin_memory()
    inputs = rows[:, :-1].to(device=device, dtype=torch.int32, non_blocking=True)
    targets = rows[:, 1:].to(device=device, dtype=torch.int64, non_blocking=True)
    return inputs, targets


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", resume_state=None, rank=None,
                                       world_size=None, data_dir=None, files=None, tokenizer_threads=4,
                                       encode_batch_size=32):
    """Infinite generator of (inputs int32 (B, T), targets int64 (B, T), state) on `device`.
    files: explicit list of parquet files (default: nanochat.dataset.list_parquet_files(data_dir)), split
    into train/val by nanochat.dataset.split_paths. rank/world_size default to the process group's."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    files = split_paths(list(files) if files is not None else list_parquet_files(data_dir), split)
    bos_id = tokenizer.get_bos_token_id()
    device = torch.device(device)

    def encode(texts):
        return tokenizer.encode(texts, num_threads=tokenizer_threads)

    # Resume: restart at the saved document and drop the tokens already used.
    start, start_token = (None, 0) if resume_state is None else state_to_position(resume_state)
    documents = iter_documents(files, rank, world_size, start=start)
    for tokens, (position, offset) in token_batches(documents, encode, bos_id, B, T, start_token, encode_batch_size):
        inputs, targets = rows_to_batch(tokens, B, T, device)
        yield inputs, targets, position_to_state(position, offset)


# -----------------------------------------------------------------------------
# Conversations as a token stream (midtraining)


def iter_conversations(dataset, rank=0, world_size=1, start=None):
    """Yield ((epoch, index), conversation) for this rank (indices rank, rank + world_size, ...), forever.
    dataset: anything with len() and [i] (a Task / TaskMixture, or a list)."""
    n = len(dataset)
    if n <= rank:
        raise UserError(f"rank {rank} gets no conversations from a dataset of {n}: use more data or fewer processes")
    epoch, index = start if start is not None else (0, rank)
    while True:
        for i in range(index, n, world_size):
            yield (epoch, i), dataset[i]  # logical index (a Task's get_example takes physical ones)
        epoch, index = epoch + 1, rank


def conversation_data_loader(dataset, tokenizer, B, T, device="cpu", resume_state=None, rank=None, world_size=None,
                             max_tokens=2048):
    """Infinite generator of (inputs int32 (B, T), targets int64 (B, T), state) for midtraining: each
    conversation rendered with tokenizer.render_conversation (which starts with <|bos|>; truncated to
    max_tokens), all tokens streamed into rows of T+1 as in the pretraining loader, every token a target.
    state = {"epoch", "index", "token"} (index into the dataset); resume as with the pretraining loader."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    device = torch.device(device)

    def encode(conversations):
        return [tokenizer.render_conversation(c, max_tokens=max_tokens)[0] for c in conversations]

    start, start_token = None, 0
    if resume_state is not None:
        start, start_token = (resume_state["epoch"], resume_state["index"]), resume_state["token"]
    documents = iter_conversations(dataset, rank, world_size, start=start)
    for tokens, ((epoch, index), offset) in token_batches(documents, encode, None, B, T, start_token, 32):
        inputs, targets = rows_to_batch(tokens, B, T, device)
        yield inputs, targets, {"epoch": epoch, "index": index, "token": offset}


def count_conversation_tokens(dataset, tokenizer, rank=0, world_size=1, max_tokens=2048):
    """Tokens in this rank's share of one epoch of `dataset` (to size a one-epoch run)."""
    total = 0
    for (epoch, _), conversation in iter_conversations(dataset, rank, world_size):
        if epoch > 0:
            break
        total += len(tokenizer.render_conversation(conversation, max_tokens=max_tokens)[0])
    return total
