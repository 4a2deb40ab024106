"""nanochat/data_check.py: words and n-gram hashes, planted contamination found (verbatim and lightly edited) with
no false positives, `drop` removing exactly the flagged conversations, the index cache, per-source figures.
Run: NANOCHAT_DATA_DIR=/work/shared/data python -m pytest tests/test_data_check.py"""

import json
import os

import numpy as np

from nanochat.data_check import (NGRAM, WordIds, check_sources, decontaminated, format_data_check, sequence_hash,
                                 strip_templates, window_hashes, words)
from tasks.common import render_mc
from tasks.mixture import build_mixtures

LONG_Q = ("A farmer plants seventeen rows of corn with forty two plants in each row and then sells half of the "
          "harvest at the market on Saturday morning")  # 27 words
SHORT_Q = "Who painted the Mona Lisa?"  # 5 words: matched whole


def chat(user, assistant="Sure."):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_words_and_hashes():
    assert words("Hello, World_2! It's 3.5") == ["hello", "world", "2", "it", "s", "3", "5"]
    prompt = render_mc("Which planet is largest?", ["A", "B"], ["Jupiter", "Mars"])
    assert words(strip_templates(prompt)) == ["which", "planet", "is", "largest", "jupiter", "mars"]
    ids = WordIds()
    a, b = ids("one two three four".split()), ids("zero one two three".split())
    assert a[:3] == b[1:] and WordIds()(["one"]) == a[:1]  # stable across instances (and processes)
    windows = window_hashes([a, b], {1, 3, 4})
    hashes, docs = windows[3]
    assert len(hashes) == 4 and docs.tolist() == [0, 0, 1, 1]  # no window crosses a document boundary
    assert hashes[0] == hashes[3] == sequence_hash(a[:3])  # "one two three" in both documents
    assert windows[4][0].tolist() == [sequence_hash(a), sequence_hash(b)]


def test_planted_contamination_found_and_dropped_exactly(tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [chat(LONG_Q, "It sells 357 plants."), chat(SHORT_Q, "Leonardo.")])
    edited = LONG_Q.upper().replace(" and ", ", and ").replace("morning", "morning!!")
    twelve = " ".join(LONG_Q.split()[:NGRAM - 1])  # 12 consecutive words: below the n-gram, never flagged
    rows = [chat("How are you today?"), chat(f"Quick question: {LONG_Q}?", "357"), chat(twelve + " and more"),
            chat("Tell me about painting."), chat(f"so... {edited}"), chat("I wonder: who painted the mona lisa"),
            chat("Who painted the famous Mona Lisa?"), chat("hi", f"Here it is: {SHORT_Q}")]
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    built, parts, _ = build_mixtures({"train_mixture": [f"{train_path}*2"]})  # one task, listed twice
    parts, name = parts["train_mixture"], f"{train_path}*2"
    cache = str(tmp_path / "cache")
    rows_out, found, _ = check_sources(parts, [eval_path], None, cache)
    flags = found[name][eval_path]
    assert flags["flagged"] == [1, 4, 5, 7] and flags["count"] == 4
    assert flags["examples"][0] == (1, " ".join(words(LONG_Q + " It sells 357 plants."))[:len(flags["examples"][0][1])])
    assert len(os.listdir(cache)) == 1  # the index is cached ...
    assert check_sources(parts, [eval_path], None, cache)[1] == found  # ... and the cached one agrees
    # drop: exactly the flagged conversations leave the mixture
    mixture = built["train_mixture"]
    new_mixture, new_parts, dropped = decontaminated(mixture, parts, found)
    assert dropped == 4
    left = sorted(new_mixture[i]["messages"][0]["content"] for i in range(len(new_mixture)))
    keep = [0, 2, 3, 6]
    assert left == sorted(rows[i]["messages"][0]["content"] for i in keep for _ in range(2))  # listed twice
    assert len(new_parts[0][1]) == 4
    assert any("Contamination" in line for line in format_data_check(rows_out, found))


def test_figures_duplicates_and_empty_replies(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("x", "y"), chat("x", "y "), chat("q", "   "), chat("z", "w")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("z", "w"), chat("new", "one")])
    _, parts, _ = build_mixtures({"train_mixture": [a, b]})
    rows, found, _ = check_sources(parts["train_mixture"], [], lambda convs: {"supervised_ratio": 0.9}, None)
    assert found is None
    assert [(r["duplicates_within"], r["duplicates_across"], r["empty_assistant"]) for r in rows] == \
        [(1, 1, 1), (0, 1, 0)]  # "y" and "y " are the same conversation (whitespace-normalised)
    assert rows[0]["shape"] == "messages" and rows[0]["turns_mean"] == 1.0
    assert "prompts nearly empty" in rows[0]["warning"]


def test_mirror_planted_found_and_chitchat_clean(data_dir, tmp_path):
    from nanochat.data_check import eval_conversations

    tests = eval_conversations(["GSM8K", "ARC-Easy"])
    gsm = [c["messages"][0]["content"] for c in tests["GSM8K"][:5]]
    arc = [c["messages"][0]["content"] for c in tests["ARC-Easy"][:5]]
    arc = [strip_templates(q).lower().replace(",", "").replace("?", " ?") for q in arc]  # edited: case, punctuation
    planted = [chat(f"Please solve this. {q}", "ok") for q in gsm] + [chat(q, "A") for q in arc]
    unrelated = [chat(f"Tell me about your day number {i}, please.", "It was fine.") for i in range(20)]
    path = write_jsonl(tmp_path / "planted.jsonl", unrelated[:10] + planted + unrelated[10:])
    _, parts, _ = build_mixtures({"train_mixture": [path, "ChitChat:train:0:400"]})
    evals = ["ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval"]
    _, found, _ = check_sources(parts["train_mixture"], evals, None, os.path.join(os.environ["NANOCHAT_BASE_DIR"], "c"))
    assert found[path]["GSM8K"]["flagged"] == list(range(10, 15))
    assert found[path]["ARC-Easy"]["flagged"] == list(range(15, 20))
    assert sum(found[path][e]["count"] for e in ("ARC-Challenge", "HumanEval")) == 0
    assert all(v["count"] == 0 for v in found["ChitChat:train:0:400"].values())  # no false positives
    assert np.all([len(v["examples"]) <= 3 for v in found[path].values()])


def test_check_training_data_modes(tmp_path):
    """chat_sft's one call: "off", and "report" on a rank other than the master, check nothing; "report" logs the
    table and changes nothing; "fail" logs the table, then stops; "drop" returns the mixture without the flagged."""
    import pytest

    from nanochat.common import UserError
    from nanochat.data_check import check_training_data

    eval_path = write_jsonl(tmp_path / "eval.jsonl", [chat(LONG_Q, "It sells 357 plants.")])
    train_path = write_jsonl(tmp_path / "train.jsonl", [chat("How are you today?"), chat(LONG_Q), chat("Hi there.")])
    built, parts, _ = build_mixtures({"train_mixture": [train_path]})
    mixture, parts, cache = built["train_mixture"], parts["train_mixture"], str(tmp_path / "cache")
    for mode, master in (("off", True), ("report", False)):
        logged = []
        assert check_training_data(mode, [eval_path], mixture, parts, cache, master, logged.append) == \
            (mixture, parts, 0) and logged == [] and not os.path.exists(cache)
    logged = []
    assert check_training_data("report", [eval_path], mixture, parts, cache, True, logged.append)[1:] == (parts, 0)
    assert "Contamination" in logged[0] and logged[1].startswith("Contamination: 1 training conversations")
    logged = []
    with pytest.raises(UserError, match="decontaminate = fail: 1 training"):
        check_training_data("fail", [eval_path], mixture, parts, cache, False, logged.append)
    assert len(logged) == 1 and "Contamination" in logged[0]  # the table, before the error
    new_mixture, _, dropped = check_training_data("drop", [eval_path], mixture, parts, cache, False, logged.append)
    assert dropped == 1 and len(new_mixture) == 2 and logged[-1].startswith("decontaminate = drop: 1")
