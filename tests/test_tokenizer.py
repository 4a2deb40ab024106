"""Tests for nanochat/tokenizer.py (the supervision table of render_conversation above all) and, end to end,
scripts/tok_train.py and scripts/tok_eval.py. Uses the session `tokenizer` fixture (tests/conftest.py)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes,
                                get_token_bytes, get_tokenizer, supervision_stats)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def sp(tokenizer):
    """Short names for the special ids: sp['user_start'] etc."""
    return {s[2:-2]: tokenizer.encode_special(s) for s in SPECIAL_TOKENS}


# ---------------------------------------------------------------------------------------------------------
# basics


def test_special_tokens_order_and_last_ids(tokenizer):
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                              "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                              "<|output_end|>"]
    V = tokenizer.get_vocab_size()
    assert 256 + 9 < V <= 1024  # 1024 requested; fewer if the fixture's text runs out of pairs to merge
    assert [tokenizer.encode_special(s) for s in SPECIAL_TOKENS] == list(range(V - 9, V))
    assert tokenizer.get_bos_token_id() == V - 9
    assert tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    for s in SPECIAL_TOKENS:
        assert tokenizer.id_to_token(tokenizer.encode_special(s)) == s
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.encode_special("<|eos|>")


def test_split_pattern_numbers_in_pairs(tokenizer):
    assert r"\p{N}{1,2}" in SPLIT_PATTERN and r"\p{N}{1,3}" not in SPLIT_PATTERN
    ids = tokenizer.encode("1234567")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == "1234567" and all(len(p) <= 2 for p in pieces)


def test_specials_never_from_plain_text(tokenizer, sp):
    text = "<|bos|>hello<|user_start|>x<|assistant_end|><|python_start|>"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(sp.values())
    assert tokenizer.decode(ids) == text
    assert len(ids) > 5  # spelled out as ordinary tokens
    batch = tokenizer.encode([text, "<|output_end|>"])
    assert not set(batch[0] + batch[1]) & set(sp.values())


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "café naïve 日本語 Привет مرحبا",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "",
    "\x00 control \u2028 separators \ufeff",
])
def test_round_trip_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_prepend_append(tokenizer, sp):
    texts = ["first text", "second 🙂", ""]
    single = [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, num_threads=2) == single
    assert tokenizer(texts[0]) == single[0]
    with_bos = tokenizer.encode(texts, prepend="<|bos|>", append=sp["assistant_end"])
    assert with_bos == [[sp["bos"]] + s + [sp["assistant_end"]] for s in single]
    assert tokenizer.encode("hi", prepend=tokenizer.get_bos_token_id()) == [sp["bos"]] + tokenizer.encode("hi")
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.encode("hi", prepend="bos")
    with pytest.raises(ValueError, match="token id"):
        tokenizer.encode("hi", append=10**9)


def test_save_load_identical(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mergeable_ranks.tiktoken", "token_bytes.npy", "tokenizer.json"]
    meta = json.loads((tmp_path / "tokenizer.json").read_text())  # plain JSON, not a pickle
    assert meta["pattern"] == SPLIT_PATTERN
    assert meta["special_tokens"] == {s: tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    lines = (tmp_path / "mergeable_ranks.tiktoken").read_text().splitlines()
    assert len(lines) == tokenizer.get_vocab_size() - 9 and lines[97].split() == ["YQ==", "97"]  # b"a"
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    text = "The quick brown fox 🙂 <|bos|> 12345 def f(x): return x"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size()
    assert loaded.get_special_tokens() == tokenizer.get_special_tokens()
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert loaded.render_conversation(conv) == tokenizer.render_conversation(conv)
    np.load(tmp_path / "token_bytes.npy", allow_pickle=False)  # loads without pickle


def test_load_rejects_corrupt_ranks(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    with open(tmp_path / "mergeable_ranks.tiktoken", "a") as f:
        f.write("not-base64!! 5\n")
    with pytest.raises(ValueError, match=r"mergeable_ranks.tiktoken:\d+: expected '<base64 token> <rank>'"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_train_small_vocab_checks():
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["abc"]), 264)
    with pytest.warns(UserWarning, match="vocab size is 267, not 1000"):
        tok = RustBPETokenizer.train_from_iterator(iter(["ab ab ab"]), 1000)  # only 2 merges possible
    assert tok.get_vocab_size() == 267 and tok.encode_special("<|output_end|>") == 266


def test_get_tokenizer_and_token_bytes_from_base_dir(tokenizer):
    base = os.environ["NANOCHAT_BASE_DIR"]  # a fresh tmp dir (conftest)
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_tokenizer()
    tokenizer.save(os.path.join(base, "tokenizer"))
    assert get_tokenizer().encode("hello world") == tokenizer.encode("hello world")
    tb = get_token_bytes(device="cpu")
    assert tb.dtype == torch.int32 and torch.equal(tb, compute_token_bytes(tokenizer))


def test_token_bytes_values(tokenizer, sp):
    tb = compute_token_bytes(tokenizer)
    assert tb.dtype == torch.int32 and tb.shape == (tokenizer.get_vocab_size(),)
    assert tb[97].item() == 1  # byte token b"a"
    assert all(tb[i].item() == 0 for i in sp.values())
    # a partial UTF-8 byte: its str round trip is U+FFFD (3 bytes) but the token is 1 byte
    assert tokenizer.id_to_token(0xE6) == "\ufffd" and tb[0xE6].item() == 1
    # merged tokens: the raw byte length
    ids = tokenizer.encode(" the quick brown fox")
    assert any(tb[i].item() > 1 for i in ids)
    for i in ids:
        assert tb[i].item() == len(tokenizer.enc.decode_single_token_bytes(i))
    text = "unicode 日本語 🙂 text"
    assert sum(tb[i].item() for i in tokenizer.encode(text)) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# render_conversation: the supervision table


def test_render_single_turn(tokenizer, sp):
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}
    ids, mask = tokenizer.render_conversation(conv)
    u, a = tokenizer.encode("What is 2+2?"), tokenizer.encode("It is 4.")
    assert ids == [sp["bos"], sp["user_start"], *u, sp["user_end"], sp["assistant_start"], *a, sp["assistant_end"]]
    assert mask == [0, 0, *[0] * len(u), 0, 0, *[1] * len(a), 1]


def test_render_multi_turn(tokenizer, sp):
    turns = ["Hi!", "Hello, how can I help?", "Tell me a joke.", "Why did the chicken cross the road?",
             "Why?", "To get to the other side."]
    roles = ["user", "assistant"] * 3
    conv = {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}
    ids, mask = tokenizer.render_conversation(conv)
    exp_ids, exp_mask = [sp["bos"]], [0]
    for role, content in zip(roles, turns):
        body = tokenizer.encode(content)
        if role == "user":
            exp_ids += [sp["user_start"], *body, sp["user_end"]]
            exp_mask += [0] * (len(body) + 2)
        else:
            exp_ids += [sp["assistant_start"], *body, sp["assistant_end"]]
            exp_mask += [0] + [1] * len(body) + [1]
    assert ids == exp_ids and mask == exp_mask
    assert len(ids) == len(mask)


def test_render_system_merged_into_first_user(tokenizer, sp):
    conv = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": "Red."},
    ]}
    ids, mask = tokenizer.render_conversation(conv)
    merged = tokenizer.encode("You are terse.\n\nName a color.")
    u2, a1, a2 = tokenizer.encode("Another."), tokenizer.encode("Blue."), tokenizer.encode("Red.")
    assert ids == [sp["bos"], sp["user_start"], *merged, sp["user_end"],
                   sp["assistant_start"], *a1, sp["assistant_end"],
                   sp["user_start"], *u2, sp["user_end"],
                   sp["assistant_start"], *a2, sp["assistant_end"]]
    assert mask == [0, 0, *[0] * len(merged), 0, 0, *[1] * len(a1), 1, 0, *[0] * len(u2), 0, 0, *[1] * len(a2), 1]
    assert conv["messages"][1]["content"] == "Name a color."  # the input is not modified


def test_render_tool_use(tokenizer, sp):
    conv = {"messages": [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "The answer is 408."},
        ]},
    ]}
    ids, mask = tokenizer.render_conversation(conv)
    u = tokenizer.encode("What is 12*34?")
    t1, code, out, t2 = (tokenizer.encode(s) for s in ["Let me compute. ", "12*34", "408", "The answer is 408."])
    assert ids == [sp["bos"], sp["user_start"], *u, sp["user_end"], sp["assistant_start"],
                   *t1, sp["python_start"], *code, sp["python_end"],
                   sp["output_start"], *out, sp["output_end"], *t2, sp["assistant_end"]]
    assert mask == [0, 0, *[0] * len(u), 0, 0,
                    *[1] * len(t1), 1, *[1] * len(code), 1,
                    0, *[0] * len(out), 0, *[1] * len(t2), 1]
    # every row of the table, checked per special token
    by_token = {}
    for i, m in zip(ids, mask):
        by_token.setdefault(i, set()).add(m)
    for name, expected in [("bos", 0), ("user_start", 0), ("user_end", 0), ("assistant_start", 0),
                           ("assistant_end", 1), ("python_start", 1), ("python_end", 1),
                           ("output_start", 0), ("output_end", 0)]:
        assert by_token[sp[name]] == {expected}, name


def test_render_ending_with_user(tokenizer, sp):
    ids, mask = tokenizer.render_conversation({"messages": [{"role": "user", "content": "hi"}]})
    assert ids == [sp["bos"], sp["user_start"], *tokenizer.encode("hi"), sp["user_end"]] and not any(mask)


def test_truncation_cuts_and_keeps_masks(tokenizer, sp):
    conv = {"messages": [{"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "A fairly long reply with many many tokens in it."}]}
    full_ids, full_mask = tokenizer.render_conversation(conv, max_tokens=None)
    assert tokenizer.render_conversation(conv, max_tokens=10_000) == (full_ids, full_mask)
    n = len(full_ids)
    assert tokenizer.render_conversation(conv, max_tokens=n) == (full_ids, full_mask)  # exact fit: untouched
    cut = n - 4  # inside the assistant reply
    ids, mask = tokenizer.render_conversation(conv, max_tokens=cut)
    assert len(ids) == len(mask) == cut
    assert ids == full_ids[:cut] and mask == full_mask[:cut]
    assert sp["assistant_end"] not in ids  # no fake end of turn is appended
    assert mask[-1] == 1  # the kept prefix of the reply stays supervised
    # cut inside the user turn: nothing supervised
    ids, mask = tokenizer.render_conversation(conv, max_tokens=3)
    assert ids == full_ids[:3] and mask == [0, 0, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        tokenizer.render_conversation(conv, max_tokens=0)


def test_default_max_tokens_is_2048(tokenizer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 3000}]}
    ids, mask = tokenizer.render_conversation(conv)
    assert len(ids) == len(mask) == 2048


# ---------------------------------------------------------------------------------------------------------
# malformed conversations


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize("conv, message", [
    ({}, "must be a dict with a 'messages' key"),
    ([{"role": "user", "content": "hi"}], "must be a dict with a 'messages' key"),
    ({"messages": "hi"}, "must be a list"),
    ({"messages": []}, "empty message list"),
    (_msgs(("assistant", "hi")), r"message 0: expected role 'user' but got 'assistant'"),
    (_msgs(("user", "a"), ("user", "b")), r"message 1: expected role 'assistant' but got 'user'.*alternate"),
    (_msgs(("user", "a"), ("assistant", "b"), ("assistant", "c")), r"message 2: expected role 'user'"),
    (_msgs(("system", "s"), ("assistant", "b")), r"message 1: a system message must be followed by a user message"),
    (_msgs(("system", "s")), r"message 1: a system message must be followed by a user message, got nothing"),
    (_msgs(("user", "a"), ("system", "s")), r"message 1: a system message is only allowed as the first message"),
    (_msgs(("system", "s"), ("system", "t"), ("user", "u")), r"message 1: a system message must be followed"),
    (_msgs(("user", ["a"])), r"message 0: user content must be a string, got list"),
    (_msgs(("user", None)), r"message 0: user content must be a string, got NoneType"),
    (_msgs(("system", 3), ("user", "u")), r"message 0: system content must be a string"),
    (_msgs(("user", "a"), ("assistant", 5)), r"message 1: assistant content must be a string or a list of parts"),
    (_msgs(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])),
     r"message 1, part 0: unknown part type 'image'"),
    (_msgs(("user", "a"), ("assistant", [{"type": "text", "text": "x"}, {"text": "y"}])),
     r"message 1, part 1: missing key 'type'"),
    (_msgs(("user", "a"), ("assistant", [{"type": "python"}])), r"message 1, part 0: missing key 'text'"),
    (_msgs(("user", "a"), ("assistant", [{"type": "text", "text": 1}])),
     r"message 1, part 0: part text must be a string"),
    (_msgs(("user", "a"), ("assistant", ["x"])), r"message 1, part 0: expected a dict"),
    ({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}, r"message 1: missing key 'role'"),
    ({"messages": [{"role": "user"}]}, r"message 0: missing key 'content'"),
    ({"messages": [{"role": "robot", "content": "b"}]}, r"message 0: unknown role 'robot'"),
    ({"messages": ["hi"]}, r"message 0: expected a dict"),
])
def test_malformed_conversations(tokenizer, conv, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.render_conversation(conv)


# ---------------------------------------------------------------------------------------------------------
# render_for_completion, visualization, stats


def test_render_for_completion(tokenizer, sp):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    before = json.dumps(conv)
    ids = tokenizer.render_for_completion(conv)
    assert json.dumps(conv) == before  # deep-copied, not modified
    full, _ = tokenizer.render_conversation(conv)
    answer = tokenizer.encode("4")
    assert ids == full[: -(len(answer) + 1)]  # everything up to and including <|assistant_start|>
    assert ids[-1] == sp["assistant_start"]
    # ending with a user message: rendered whole, then <|assistant_start|>
    ids2 = tokenizer.render_for_completion({"messages": conv["messages"][:2]})
    assert ids2 == ids
    with pytest.raises(ValueError, match="message 0"):
        tokenizer.render_for_completion({"messages": [{"role": "assistant", "content": "x"}]})


def test_visualize_tokenization(tokenizer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ids, mask = tokenizer.render_conversation(conv)
    out = tokenizer.visualize_tokenization(ids, mask)
    green, red = "\033[92m", "\033[91m"
    assert out.count(green) == sum(mask) and out.count(red) == len(mask) - sum(mask)
    segments = re.findall(r"\033\[(9[12])m(.*?)\033\[0m", out, flags=re.S)
    assert [tokenizer.decode([i]) for i in ids] == [s for _, s in segments]
    assert [1 if c == "92" else 0 for c, _ in segments] == mask
    assert out.count("\033[0m|") == len(ids) - 1  # '|' between tokens


def test_supervision_stats(tokenizer):
    assert supervision_stats([0, 1, 1, 0]) == (2, 4, 0.5)
    assert supervision_stats([]) == (0, 0, 0.0)
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tokenizer.render_conversation(conv)
    sup, total, ratio = supervision_stats(mask)
    assert total == len(ids) and sup == len(tokenizer.encode("yo")) + 1 and ratio == sup / total


# ---------------------------------------------------------------------------------------------------------
# end to end: scripts/tok_train.py then scripts/tok_eval.py


@pytest.mark.slow
def test_tok_train_and_eval_end_to_end(data_dir, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_DATA_DIR=data_dir, WANDB_MODE="disabled")
    train = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--max_chars=300000", "--vocab_size=600"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    assert "training time:" in train.stdout and "round trip: OK" in train.stdout
    tok_dir = tmp_path / "base" / "tokenizer"
    tok = RustBPETokenizer.from_directory(str(tok_dir))
    assert tok.get_vocab_size() == 600
    text = "Round trip through the saved tokenizer: café 🙂 42"
    assert tok.decode(tok.encode(text)) == text
    tb = np.load(tok_dir / "token_bytes.npy", allow_pickle=False)
    assert tb.shape == (600,) and (tb[-9:] == 0).all() and (tb[:-9] >= 1).all()
    assert (tmp_path / "base" / "report" / "tokenizer-training.md").exists()

    ev = subprocess.run([sys.executable, "-m", "scripts.tok_eval", "--shard_chars=20000"],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    rows = {}
    for line in ev.stdout.splitlines():
        m = re.match(r"^(\S[\w -]*?)\s+(\d+)\s+(\d+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = float(m.group(4))
    assert set(rows) == {"prose", "code", "math", "chat", "non-English", "train shards", "val shard"}
    assert all(1.0 <= v < 10 for v in rows.values())
    assert rows["train shards"] > rows["non-English"]  # trained on English: English compresses better
    assert (tmp_path / "base" / "report" / "tokenizer-evaluation.md").exists()


def test_visualize_tokenization_without_colour(tokenizer):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ids, mask = tokenizer.render_conversation(conv)
    out = tokenizer.visualize_tokenization(ids, mask, color=False)
    assert "\033[" not in out
    pieces = [f"[{tokenizer.decode([i])}]" if m else tokenizer.decode([i]) for i, m in zip(ids, mask)]
    assert out == "|".join(pieces) and sum(mask) > 0 and out.count("[") >= sum(mask)
