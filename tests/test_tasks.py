"""tasks/: Task slicing, TaskMixture / TaskSequence, render_mc, CustomJSON validation, the loader's errors (small
fakes), and every dataset of the local mirror (`data_dir` fixture: skipped without NANOCHAT_DATA_DIR): row
counts, ARC/MMLU conversations render and their gold letter is a choice, GSM8K evaluates its own gold solution
as correct, the 164 HumanEval canonical solutions pass in the sandbox."""

import collections
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import tasks.common
from tasks.common import (DatasetNotFoundError, Task, TaskMixture, TaskSequence, load_rows, render_mc,
                          validate_conversation)
from tasks.customjson import CustomJSON


class ToyTask(Task):
    """n conversations whose assistant answer is f"{name}{i}"."""

    def __init__(self, name, n, **kwargs):
        super().__init__(**kwargs)
        self.name, self.n = name, n

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"{self.name}{index}"}]}


def answers(task):
    return [task[i]["messages"][-1]["content"] for i in range(len(task))]


# ----------------------------------------------------------------------------------------------------------
# Task / TaskMixture / TaskSequence / render_mc


def test_task_slicing():
    assert answers(ToyTask("a", 10)) == [f"a{i}" for i in range(10)]
    assert answers(ToyTask("a", 10, start=2, stop=9, step=3)) == ["a2", "a5", "a8"]
    assert len(ToyTask("a", 10, start=2, stop=8, step=3)) == 2  # ceil(6 / 3)
    assert len(ToyTask("a", 10, stop=100)) == 10  # stop is clamped to the dataset
    assert len(ToyTask("a", 10, start=12)) == 0
    assert [c["messages"][-1]["content"] for c in ToyTask("a", 5, step=2)] == ["a0", "a2", "a4"]  # iteration stops
    with pytest.raises(IndexError):
        ToyTask("a", 5)[5]
    with pytest.raises(ValueError):
        ToyTask("a", 5, step=0)


def test_render_mc_exact_format():
    assert render_mc("Which is largest?", ["A", "B", "C"], ["Mars", "Jupiter", "Venus"]) == (
        "Multiple Choice question: Which is largest?\n- Mars=A\n- Jupiter=B\n- Venus=C\n"
        "\nRespond only with the letter of the correct answer.")


def test_mixture_covers_every_pair_once_in_nanochat_order():
    a, b = ToyTask("a", 30), ToyTask("b", 50)
    mix = TaskMixture([a, b])
    got = answers(mix)
    assert len(mix) == 80 and sorted(got) == sorted(answers(a) + answers(b))
    # nanochat's construction: the list of (task, index) pairs shuffled by random.Random(42)
    pairs = [(0, j) for j in range(30)] + [(1, j) for j in range(50)]
    random.Random(42).shuffle(pairs)
    assert got == [("a" if t == 0 else "b") + str(j) for t, j in pairs]


def test_mixture_is_deterministic_and_interleaved():
    first = answers(TaskMixture([ToyTask("a", 200), ToyTask("b", 200)]))
    assert first == answers(TaskMixture([ToyTask("a", 200), ToyTask("b", 200)]))
    for window in range(0, 400, 50):  # both tasks appear in every window of 50
        assert {x[0] for x in first[window:window + 50]} == {"a", "b"}
    assert first != sorted(first)


def test_mixture_oversampling_by_listing_twice():
    a, b = ToyTask("a", 10), ToyTask("b", 40)
    counts = collections.Counter(answers(TaskMixture([a, a, b])))
    assert len(counts) == 50 and all(counts[f"a{i}"] == 2 for i in range(10))
    assert all(counts[f"b{i}"] == 1 for i in range(40))


def test_mixture_weights():
    a, b = ToyTask("a", 100), ToyTask("b", 40)
    mix = TaskMixture([a, b], weights=[0.5, 2.5])
    assert len(mix) == 50 + 100 and mix.counts == [50, 100]
    counts = collections.Counter(answers(mix))
    assert sorted(k for k in counts if k[0] == "a") == sorted(f"a{i}" for i in range(50))  # first half of a
    assert all(counts[f"a{i}"] == 1 for i in range(50))
    assert all(counts[f"b{i}"] == (3 if i < 20 else 2) for i in range(40))  # 2 passes + first half again
    assert answers(mix) == answers(TaskMixture([a, b], weights=[0.5, 2.5]))  # deterministic
    # all weights 1.0 is the unweighted mixture; listing twice equals weight 2
    assert answers(TaskMixture([a, b], weights=[1, 1])) == answers(TaskMixture([a, b]))
    assert answers(TaskMixture([a, b], weights=[2, 1])) == answers(TaskMixture([a, a, b]))
    assert len(TaskMixture([a, b], weights=[0, 1])) == 40
    with pytest.raises(ValueError):
        TaskMixture([a, b], weights=[1.0])
    with pytest.raises(ValueError):
        TaskMixture([a, b], weights=[-1.0, 1.0])


def test_mixture_slicing_and_sequence():
    mix = TaskMixture([ToyTask("a", 10), ToyTask("b", 10)], start=5, stop=15)
    assert answers(mix) == answers(TaskMixture([ToyTask("a", 10), ToyTask("b", 10)]))[5:15]
    seq = TaskSequence([ToyTask("a", 3), ToyTask("b", 2), ToyTask("c", 0), ToyTask("d", 1)])
    assert answers(seq) == ["a0", "a1", "a2", "b0", "b1", "d0"]


# ----------------------------------------------------------------------------------------------------------
# Conversation validation and CustomJSON

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_validate_conversation_accepts_good_ones():
    validate_conversation(GOOD)
    validate_conversation({"messages": [{"role": "system", "content": "be brief"}] + GOOD["messages"] * 2})
    validate_conversation({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": [
        {"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"}, {"type": "text", "text": "4"}]}]})


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    ({"msgs": []}, "'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least one user and one assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "expected role 'user'"),
    ({"messages": GOOD["messages"] + [{"role": "user", "content": "more?"}]}, "last message must be from the assis"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "x"}]}, "unknown role"),
    ({"messages": GOOD["messages"] + [{"role": "system", "content": "s"}] + GOOD["messages"]}, "system message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code"}]}]}, "part 0"),
]


@pytest.mark.parametrize("bad,expected", BAD_ROWS)
def test_customjson_bad_row_names_file_line_and_problem(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(ValueError) as excinfo:
        CustomJSON(path)
    assert str(excinfo.value).startswith(f"{path}:4: ") and expected in str(excinfo.value)


def test_customjson_loads_and_skips_bad_rows(tmp_path):
    other = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, other["messages"]] + [bad for bad, _ in BAD_ROWS] + [GOOD])
    task = CustomJSON(path, skip_bad=True, start=1)
    assert task.num_skipped == len(BAD_ROWS) and len(task.errors) == len(BAD_ROWS)
    assert [c["messages"] for c in task] == [other["messages"], GOOD["messages"]]  # bare list rows too
    assert task.eval_type == "generative"
    with pytest.raises(FileNotFoundError, match="no such file"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------------------
# Loader errors (no network needed)


def test_missing_mirror_file_error_names_path_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    from tasks.smoltalk import ChitChat

    with pytest.raises(DatasetNotFoundError) as excinfo:
        ChitChat("train")
    msg = str(excinfo.value)
    assert str(tmp_path / "chitchat" / "default" / "train.jsonl") in msg and "NANOCHAT_DATA_DIR" in msg
    # hub datasets: when the hub is unreachable too, fail at once with the path looked for and both fixes
    monkeypatch.setattr(tasks.common, "_hub_unreachable_reason", lambda: "cannot connect (test)")
    t0 = time.time()
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_rows("openai/gsm8k", "main", "train")
    msg = str(excinfo.value)
    assert str(tmp_path / "openai" / "gsm8k" / "main" / "train.jsonl") in msg and "NANOCHAT_DATA_DIR" in msg
    assert "network" in msg and time.time() - t0 < 5.0
    from tasks.smoltalk import SmolTalk

    with pytest.raises(DatasetNotFoundError, match="ChitChat"):
        SmolTalk("train")


def test_mirror_rows_are_shuffled_with_seed_42(tmp_path, monkeypatch):
    rows = [{"question": f"q{i}", "answer": f"step <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(50)]
    (tmp_path / "openai" / "gsm8k" / "main").mkdir(parents=True)
    write_jsonl(tmp_path / "openai" / "gsm8k" / "main" / "test.jsonl", rows)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    from tasks.gsm8k import GSM8K

    task = GSM8K("main", "test")
    questions = [c["messages"][0]["content"] for c in task]
    assert sorted(questions) == sorted(r["question"] for r in rows) and questions != [r["question"] for r in rows]
    assert questions == [c["messages"][0]["content"] for c in GSM8K("main", "test")]


# ----------------------------------------------------------------------------------------------------------
# The real datasets (local mirror)

ROW_COUNTS = [
    ("gsm8k", ("main", "train"), 7473), ("gsm8k", ("main", "test"), 1319),
    ("arc", ("ARC-Easy", "train"), 2251), ("arc", ("ARC-Easy", "test"), 2376),
    ("arc", ("ARC-Challenge", "train"), 1119), ("arc", ("ARC-Challenge", "test"), 1172),
    ("mmlu", ("all", "test"), 14042), ("humaneval", (), 164),
    ("chitchat", ("train",), 3816), ("chitchat", ("test",), 201),
]
CLASSES = {"gsm8k": "GSM8K", "arc": "ARC", "mmlu": "MMLU", "humaneval": "HumanEval", "chitchat": "ChitChat"}
MODULES = {"chitchat": "smoltalk"}  # ChitChat is SmolTalk's class on another dataset


def make_task(module, args, **kwargs):
    import importlib

    task_class = getattr(importlib.import_module(f"tasks.{MODULES.get(module, module)}"), CLASSES[module])
    return task_class(*args, **kwargs)


@pytest.mark.parametrize("module,args,expected", ROW_COUNTS)
def test_row_counts(data_dir, module, args, expected):
    assert len(make_task(module, args)) == expected


@pytest.mark.parametrize("module,args", [("arc", ("ARC-Easy", "train")), ("arc", ("ARC-Easy", "test")),
                                         ("arc", ("ARC-Challenge", "train")), ("arc", ("ARC-Challenge", "test")),
                                         ("mmlu", ("all", "test"))])
def test_multiple_choice_conversations_render(data_dir, tokenizer, module, args):
    task = make_task(module, args)
    assert task.eval_type == "categorical"
    letter_sets = collections.Counter()
    for conversation in task:
        letters, gold = conversation["letters"], conversation["messages"][-1]["content"]
        assert gold in letters
        letter_sets[tuple(letters)] += 1
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=16384)  # no truncation
        assert len(ids) == len(mask) and sum(mask) > 0  # the answer letter is supervised
        wrong = next(x for x in letters if x != gold)
        assert task.evaluate(conversation, gold) and not task.evaluate(conversation, wrong)
    assert letter_sets[("A", "B", "C", "D")] > 0.9 * len(task)


def test_gsm8k_gold_solutions_evaluate_true_and_parts_round_trip(data_dir):
    from tasks.gsm8k import GSM8K, parts_to_solution

    for split in ("train", "test"):
        task = GSM8K("main", split)
        assert task.eval_type == "generative"
        for i, row in enumerate(task.ds):
            conversation = task[i]
            parts = conversation["messages"][-1]["content"]
            assert parts_to_solution(parts) == row["answer"]
            results = [p["text"] for p in parts if p["type"] == "python_output"]
            assert results == [a.rsplit("=", 1)[-1] for a in re.findall(r"<<([^>]+)>>", row["answer"])]
            assert task.evaluate(conversation, row["answer"]), (i, row["answer"])
            assert not task.evaluate(conversation, "#### 123456789.5")
            assert not task.evaluate(conversation, "the answer is 42")
    # commas are removed on both sides
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "so #### 1200"}]}]}
    assert task.evaluate(conv, "... #### 1,200") and not task.evaluate(conv, "#### 120")


def test_humaneval_canonical_solutions_pass_and_bad_bodies_fail(data_dir):
    from tasks.humaneval import HumanEval

    task = HumanEval()
    problems = list(task)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        passed = list(pool.map(lambda c: task.evaluate(c, c["messages"][-1]["content"]), problems))
    elapsed = time.time() - t0
    print(f"HumanEval: {sum(passed)}/{len(problems)} canonical solutions pass in {elapsed:.1f}s (2 workers)")
    assert all(passed), [c["task_id"] for c, ok in zip(problems, passed) if not ok]
    # an empty body, a wrong body, and the fenced-block extraction
    for c in problems[:8]:
        prompt = c["messages"][0]["content"]
        assert not task.evaluate(c, prompt + "    pass\n")
        assert not task.evaluate(c, prompt + "    return 'definitely wrong'\n")
        fenced = f"Here you go:\n```python\n{c['messages'][-1]['content']}\n```\nHope it helps!"
        assert task.evaluate(c, fenced)
        assert not task.evaluate(c, "Here you go:\n```python\n" + prompt + "    pass\n```\n")


def test_chitchat_conversations_are_valid(data_dir, tokenizer):
    from tasks.smoltalk import ChitChat, SmolTalk

    assert issubclass(ChitChat, SmolTalk) and ChitChat.get_example is SmolTalk.get_example  # one reader
    with pytest.raises(ValueError, match="ChitChat split must be train or test, got 'val'"):
        ChitChat("val")

    for split in ("train", "test"):
        task = ChitChat(split)
        for conversation in task:
            validate_conversation(conversation)
    for conversation in ChitChat("test"):
        ids, mask = tokenizer.render_conversation(conversation)
        assert sum(mask) > 0
