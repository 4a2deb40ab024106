"""
tasks/mixture.py: the mixture spec syntax (strings, quoted fields, dict entries), custom `module:Class` tasks
with their errors, building mixtures, and the one offline error naming replacement specs for every mixture.

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_mixture.py
"""

import json
import os

import pytest

from tasks.mixture import (MixtureSpecError, TaskSpec, build_mixture, build_mixtures, parse_eval_spec, parse_task_spec,
                           spec_locator)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    ("SmolTalk:train*99999999999", "positive integer of at most 1000"),  # was a list of 1e11 entries
    ("SmolTalk:train@1e12", "positive number of at most 1000"),
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


# ---------------------------------------------------------------------------------------------------------
# quoted fields and dict entries (paths holding ':' or '@')


def test_quoted_fields_and_dict_entries():
    spec = parse_task_spec('CustomJSON:"C:/my data@home/chats*.jsonl":0:10*2@0.5')
    assert spec == TaskSpec("CustomJSON", ("C:/my data@home/chats*.jsonl",), 0, 10, 1, 2, 0.5)
    assert parse_task_spec('CustomJSON:"a\\"b.jsonl"').args == ('a"b.jsonl',)  # JSON escapes
    as_dict = {"task": "CustomJSON", "args": ["C:/my data@home/chats*.jsonl"], "start": 0, "stop": 10,
               "repeats": 2, "weight": 0.5}
    assert parse_task_spec(as_dict) == spec
    for bad, message in [('CustomJSON:"open', "not closed"), ('CustomJSON:a"b"c', "quote the whole field"),
                         ({"task": "CustomJSON", "args": "x"}, "list of strings"),
                         ({"task": "CustomJSON", "path": "x"}, "unknown: path"),
                         ({"task": "ARC", "args": ["ARC-Easy"]}, "takes 2 argument")]:
        with pytest.raises(MixtureSpecError, match=message):
            parse_task_spec(bad)


def test_path_with_colon_and_at_loads(tmp_path):
    folder = tmp_path / "a:b@c"
    folder.mkdir()
    path = folder / "x.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(build_mixture([f'CustomJSON:"{path}":0:4'])) == 4
    assert len(build_mixture([{"task": "CustomJSON", "args": [str(path)], "repeats": 2}])) == 12


# ---------------------------------------------------------------------------------------------------------
# custom tasks: "module:Class[:args...]"


def test_custom_task_from_a_module(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs/examples/my_custom_task.py, importable from the working directory
    spec = parse_task_spec("configs.examples.my_custom_task:MyCustomTask:train:0:10:2*3")
    assert spec == TaskSpec("configs.examples.my_custom_task:MyCustomTask", ("train",), 0, 10, 2, 3)
    mix = build_mixture(["configs.examples.my_custom_task:MyCustomTask:train:0:10:2*3",
                         "configs.examples.my_custom_task:MyCustomTask:test"])
    assert len(mix) == 5 * 3 + 4
    assert all(mix[i]["messages"][-1]["role"] == "assistant" for i in range(len(mix)))
    # an empty argument keeps the constructor's default (split="train"), then the slice
    assert len(build_mixture(["configs.examples.my_custom_task:MyCustomTask::0:7"])) == 7


@pytest.mark.parametrize("spec, message", [
    ("tasks.no_such_module:MyTask", "cannot import module 'tasks.no_such_module'"),
    ("no_such_pkg.module:MyTask", "may not be imported by a mixture spec.*NANOCHAT_TASK_MODULES=no_such_pkg"),
    ("configs.examples.my_custom_task:NoSuchTask", "has no class 'NoSuchTask' .*MyCustomTask"),
    ("configs.examples.my_custom_task:Task", None),
    ("json:JSONDecoder", "'json' may not be imported"),
    ("tasks.common:DatasetNotFoundError", "not a subclass of tasks.common.Task"),
    ("configs.examples.my_custom_task", "module:Class"),
])
def test_custom_task_errors(spec, message, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    if message is None:  # the base class itself is a Task: accepted by the parser (it fails when built)
        assert parse_task_spec(spec).name == spec
        return
    with pytest.raises(MixtureSpecError, match=message):
        parse_task_spec(spec)


# ---------------------------------------------------------------------------------------------------------
# one error for every missing dataset, with the replacement specs


def test_missing_offline_data_names_replacements_for_every_mixture(data_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub (refused at once); the mirror has no SmolTalk
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MixtureSpecError) as excinfo:
        build_mixtures({"train_mixture": ["ARC:ARC-Easy:train:0:8", "SmolTalk:train:0:10000*2"],
                        "val_mixture": ["SmolTalk:test"]})
    message = str(excinfo.value)
    assert "\n" not in message
    assert "train_mixture entry 'SmolTalk:train:0:10000*2'" in message and "val_mixture entry 'SmolTalk:test'" in message
    assert ('train_mixture = ["ARC:ARC-Easy:train:0:8", "ChitChat:train:0:10000*2"]  '
            'val_mixture = ["ChitChat:test"]') in message
    # the replacements load
    mixtures, parts, _ = build_mixtures({"train_mixture": ["ARC:ARC-Easy:train:0:8", "ChitChat:train:0:10*2"],
                                         "val_mixture": ["ChitChat:test:0:5"]})
    assert len(mixtures["train_mixture"]) == 8 + 20 and len(mixtures["val_mixture"]) == 5
    assert [(spec, entries) for spec, _, entries in parts["train_mixture"]] == [("ARC:ARC-Easy:train:0:8", 8),
                                                                              ("ChitChat:train:0:10*2", 20)]
    # spec_locator: each entry's spec and conversation; a spec's repeats are the same (spec, conversation) twice
    train = mixtures["train_mixture"]
    where = [spec_locator(train, parts["train_mixture"])(i) for i in range(len(train))]
    assert sorted(where) == [(0, i) for i in range(8)] + [(1, i) for i in range(10) for _ in range(2)]
    assert all(train[i] == parts["train_mixture"][k][1][j] for i, (k, j) in enumerate(where))
    # an optional entry is dropped with a note instead
    mixtures, _, notes = build_mixtures({"train_mixture": ["ChitChat:train:0:4", "SmolTalk:train"]},
                                        optional=["SmolTalk:train"])
    assert len(mixtures["train_mixture"]) == 4 and "Skipping train_mixture entry 'SmolTalk:train'" in notes[0]


def test_build_mixtures_names_the_config_key():
    with pytest.raises(MixtureSpecError, match=r"^val_mixture: mixture spec 'Smoltalk:test': unknown task"):
        build_mixtures({"train_mixture": ["HumanEval"], "val_mixture": ["Smoltalk:test"]})
    with pytest.raises(MixtureSpecError, match="train_mixture is empty"):
        build_mixtures({"train_mixture": []})


def test_check_mixture_specs_before_loading():
    from nanochat.config import ConfigError
    from tasks.mixture import check_mixture_specs

    check_mixture_specs({"train_mixture": ["ChitChat:train", "ARC:ARC-Easy:train:0:10*2"], "val_mixture": ["SmolTalk:test"]})
    with pytest.raises(ConfigError, match=r'val_mixture is empty: give at least one mixture spec, e.g. \["ChitChat'):
        check_mixture_specs({"train_mixture": ["ChitChat:train"], "val_mixture": []})
    with pytest.raises(MixtureSpecError, match="ChitChat:train:x"):
        check_mixture_specs({"train_mixture": ["ChitChat:train:x"]})


# ---------------------------------------------------------------------------------------------------------
# bare paths, column mappings, the held-out validation share


def test_bare_path_and_fields_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"dialog": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert parse_task_spec("data/chats.jsonl:0:4*2") == TaskSpec("CustomJSON", ("data/chats.jsonl",), 0, 4, repeats=2)
    assert parse_task_spec("chats.parquet@0.5") == TaskSpec("CustomJSON", ("chats.parquet",), weight=0.5)
    assert parse_task_spec("owner/dataset").name == "CustomJSON"
    spec = {"task": "CustomJSON", "args": ["data/chats.jsonl"], "fields": {"messages_field": "dialog"}}
    assert len(build_mixture([spec])) == 6
    with pytest.raises(MixtureSpecError, match="CustomJSON only"):
        parse_task_spec({"task": "ChitChat", "args": ["train"], "fields": {"messages_field": "x"}})


def test_held_out_validation_never_overlaps_training(tmp_path, monkeypatch):
    from tasks.common import conversation_hash

    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(60)]
    rows += rows[:10]  # duplicates: a held-out conversation must leave training with all its copies
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))  # the same conversations in a second source
    mixtures = {"train_mixture": [str(path), f"{other}*2"], "val_mixture": ["NoSuch:x"]}
    with pytest.raises(MixtureSpecError):  # an unknown task is still an error, never replaced by a held-out share
        build_mixtures(mixtures, held_out=("train_mixture", "val_mixture", 0.05))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub (refused at once), no mirror: no ChitChat
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    results = []
    for val, optional in ((["ChitChat:test"], ["ChitChat:test"]), ([], [])):  # the default unavailable; none given
        built, parts, notes = build_mixtures({"train_mixture": mixtures["train_mixture"], "val_mixture": val},
                                             optional=optional, held_out=("train_mixture", "val_mixture", 0.05))
        train, val = built["train_mixture"], built["val_mixture"]
        train_hashes = {conversation_hash(train[i]) for i in range(len(train))}
        val_hashes = {conversation_hash(val[i]) for i in range(len(val))}
        assert 1 <= len(val_hashes) <= 12  # about 5% of 60 distinct conversations, at least one
        assert not train_hashes & val_hashes and len(train_hashes | val_hashes) == 60
        assert "held out of training" in notes[-1]
        results.append(sorted(val_hashes))
    assert results[0] == results[1]  # deterministic
    from tasks.common import split_held_out  # a rule of each conversation: the same share whatever the grouping
    task = build_mixtures({"t": [str(path)]})[0]["t"].tasks[0]
    _, held = split_held_out([task])
    assert sorted({conversation_hash(c) for c in held[0]}) == results[0]
