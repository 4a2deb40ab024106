"""
tasks/mixture.py: the mixture spec syntax (strings, quoted fields, dict entries), custom `module:Class` tasks
with their errors, building mixtures, and the one offline error naming replacement specs for every mixture.

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_mixture.py
"""

import json

import pytest

from tasks.mixture import MixtureSpecError, TaskSpec, build_mixture, build_mixtures, parse_eval_spec, parse_task_spec

# ---------------------------------------------------------------------------------------------------------
# mixture specs


def test_parse_task_spec_examples():
    assert parse_task_spec("ARC:ARC-Easy:train") == TaskSpec("ARC", ("ARC-Easy", "train"))
    assert parse_task_spec("SmolTalk:train:0:10000") == TaskSpec("SmolTalk", ("train",), 0, 10000)
    assert parse_task_spec("SmolTalk:train::10000") == TaskSpec("SmolTalk", ("train",), 0, 10000)
    assert parse_task_spec(" GSM8K:main:train * 3 ") == TaskSpec("GSM8K", ("main", "train"), repeats=3)
    assert parse_task_spec("ChitChat:train:5:50:2@0.25") == TaskSpec("ChitChat", ("train",), 5, 50, 2, 1, 0.25)
    assert parse_task_spec("CustomJSON:data/my file.jsonl*2@2") == TaskSpec(
        "CustomJSON", ("data/my file.jsonl",), repeats=2, weight=2.0)
    assert parse_task_spec("HumanEval") == TaskSpec("HumanEval", ())


@pytest.mark.parametrize("spec, message", [
    ("Smoltalk:train", "did you mean SmolTalk"),
    ("Nope:x", "unknown task"),
    ("ARC:ARC-Easy", "needs 2 argument"),
    ("ARC::train", "empty"),
    ("SmolTalk:train:a", "not an integer"),
    ("SmolTalk:train:10:5", "greater than start"),
    ("SmolTalk:train:1:2:3:4", "too many fields"),
    ("SmolTalk:train*0", "positive integer"),
    ("SmolTalk:train*x", "positive integer"),
    ("SmolTalk:train@-1", "positive number"),
    ("SmolTalk:train@abc", "not a number"),
    ("", "non-empty"),
])
def test_parse_task_spec_errors(spec, message):
    with pytest.raises(MixtureSpecError, match=message) as excinfo:
        parse_task_spec(spec)
    assert "Syntax" in str(excinfo.value)


class _FakeTask:
    def __init__(self, *args, start=0, stop=None, step=1):
        self.args, self.start, self.stop, self.step = args, start, stop, step


class _FakeMixture:
    def __init__(self, tasks, weights=None):
        self.tasks, self.weights = tasks, weights


def test_build_mixture_with_fakes():
    registry = {"A": _FakeTask, "B": _FakeTask}
    task_args = {"A": ("split",), "B": ()}
    mix = build_mixture(["A:train:0:10", "B*2"], registry, task_args, _FakeMixture)
    assert [t.args for t in mix.tasks] == [("train",), (), ()]
    assert mix.tasks[0].stop == 10 and mix.tasks[1] is mix.tasks[2]
    assert mix.weights is None
    mix = build_mixture(["A:train@3", "B"], registry, task_args, _FakeMixture)
    assert mix.weights == [3.0, 1.0]
    with pytest.raises(MixtureSpecError, match="non-empty list"):
        build_mixture([], registry, task_args, _FakeMixture)
    with pytest.raises(MixtureSpecError, match="unknown task"):
        build_mixture(["C"], registry, task_args, _FakeMixture)


def test_eval_specs():
    assert parse_eval_spec("MMLU:1024") == ("MMLU", 1024)
    assert parse_eval_spec("HumanEval") == ("HumanEval", None)
    with pytest.raises(MixtureSpecError):
        parse_eval_spec("GSM8K:zero")


def test_build_mixture_with_real_tasks(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = build_mixture([f"CustomJSON:{path}*2", f"CustomJSON:{path}:0:4@0.5"])
    assert len(mix) == 2 * 10 + 2  # two passes, plus half of a 4-example slice
    contents = sorted(mix[i]["messages"][1]["content"] for i in range(len(mix)))
    assert contents.count("a0") + contents.count("a1") + contents.count("a2") + contents.count("a3") == 2 * 4 + 2


def test_build_mixture_from_the_mirror(data_dir):
    mix = build_mixture(["ChitChat:train:0:10", "GSM8K:main:train:0:5", "ARC:ARC-Easy:train::3"])
    assert len(mix) == 18
    assert all(mix[i]["messages"][-1]["role"] == "assistant" for i in range(len(mix)))
