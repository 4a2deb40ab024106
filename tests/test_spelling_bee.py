"""
Tests of tasks/spelling_bee.py: the seeded generator (same examples every time, held-out pairs never in the
train split, balanced counts), the tool call the Engine's calculator answers, the reward, and the supervision
masks of a rendered example (the call and the answer supervised, the tool's output not).

    .venv/bin/python -m pytest tests/test_spelling_bee.py
"""

import collections

import pytest

from nanochat.engine import use_calculator
from tasks.mixture import build_mixture
from tasks.spelling_bee import WORDS, SpellingBee, letter_pairs, make_conversation, pair_split


def _pair(conversation):
    call = conversation["messages"][1]["content"][0]["text"]  # " 'word'.count('x')"
    word, letter = call.split("'")[1], call.split("'")[3]
    return word, letter


def test_generator_is_seeded_and_splits_are_disjoint():
    train, test = SpellingBee("train"), SpellingBee("test")
    assert len(train) == 20000 and len(test) == 500
    assert [train[i] for i in range(20)] == [SpellingBee("train")[i] for i in range(20)]  # same on every run
    assert [train[i] for i in range(20)] != [SpellingBee("train", seed=1)[i] for i in range(20)]
    train_pairs = {_pair(train[i]) for i in range(2000)}
    test_pairs = {_pair(test[i]) for i in range(len(test))}
    assert not train_pairs & test_pairs  # the held-out questions are never trained on
    assert all(pair_split(*p) == "test" for p in test_pairs) and len(test_pairs) > 100
    assert all(w.isalpha() and w.islower() for w in WORDS)
    assert len(letter_pairs()) == sum(len(set(w)) + 1 for w in WORDS)
    # counts 0, 1 and 2+ about equally often: answering "1" every time scores about a third
    counts = collections.Counter(min(int(test[i]["messages"][1]["content"][1]["text"]), 2) for i in range(len(test)))
    assert all(130 < counts[c] < 200 for c in (0, 1, 2)), counts
    with pytest.raises(ValueError):
        SpellingBee("validation")


def test_tool_call_output_and_answer_agree():
    task = SpellingBee("train")
    for i in range(200):
        conversation = task[i]
        word, letter = _pair(conversation)
        call, output, answer = conversation["messages"][1]["content"]
        assert letter in conversation["messages"][0]["content"] and word in conversation["messages"][0]["content"]
        assert (call["type"], output["type"], answer["type"]) == ("python", "python_output", "text")
        assert use_calculator(call["text"]) == output["text"] == str(word.count(letter))  # the Engine's tool
        assert answer["text"] == f"#### {word.count(letter)}"


def test_reward_and_evaluate():
    task = SpellingBee("test")
    conversation = make_conversation("strawberry", "r")
    assert conversation["messages"][0]["content"] == "How many 'r' are in 'strawberry'?"
    assert task.reward(conversation, "#### 3") == 1.0 and task.evaluate(conversation, "so #### 3")
    assert task.reward(conversation, "#### 2") == 0.0
    assert task.reward(conversation, "3") == 0.0  # the answer must be given as "#### N"
    assert task.reward(conversation, "") == 0.0


def test_masks_supervise_the_call_and_the_answer_not_the_tool_output(tokenizer):
    conversation = make_conversation("balloon", "l", template=2)
    ids, mask = tokenizer.render_conversation(conversation)
    special = tokenizer.encode_special
    start, end = ids.index(special("<|python_start|>")), ids.index(special("<|python_end|>"))
    out_start, out_end = ids.index(special("<|output_start|>")), ids.index(special("<|output_end|>"))
    assert all(mask[start:end + 1]) and tokenizer.decode(ids[start + 1:end]) == " 'balloon'.count('l')"
    # the call repeats the question's tokens of the word (a leading space, as in the question)
    question = tokenizer.encode(conversation["messages"][0]["content"])
    word_tokens = tokenizer.encode(" 'balloon'")
    assert any(question[i:i + len(word_tokens)] == word_tokens for i in range(len(question)))
    assert ids[start + 1:start + 1 + len(word_tokens)] == word_tokens
    assert not any(mask[out_start:out_end + 1]) and tokenizer.decode(ids[out_start + 1:out_end]) == "2"
    assert all(mask[out_end + 1:]) and tokenizer.decode(ids[out_end + 1:-1]) == "#### 2"
    assert not any(mask[:start])  # the question is not supervised


def test_mixture_spec():
    mixture = build_mixture(["SpellingBee:train:0:50", "SpellingBee:test:0:10"])
    assert len(mixture) == 60
    assert all(isinstance(mixture.task_of(i), SpellingBee) for i in range(len(mixture)))
    assert sorted(mixture.task_of(i).split for i in range(len(mixture))).count("test") == 10
