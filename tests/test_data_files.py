"""nanochat/data_files.py (read_rows: every storage format) and tasks/customjson.py (every row shape, rendered
with the same masks as its `messages` equivalent). Each file is written by the test; no network.
Run: python -m pytest tests/test_data_files.py"""

import json

import pytest

from nanochat.common import UserError
from nanochat.data_files import read_rows
from tasks.customjson import CustomJSON

ROWS = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]


def write(path, rows, kind):
    """rows -> a file (or folder) of `kind`, written with the library a user would use."""
    import datasets
    import pyarrow as pa

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        import pyarrow.csv as pacsv

        flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]
        pacsv.write_csv(pa.Table.from_pylist(flat), path)
    elif kind == "arrow":
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "dataset_dict":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind,name", [("jsonl", "d.jsonl"), ("json", "d.json"), ("parquet", "d.parquet"),
                                       ("csv", "d.csv"), ("arrow", "d.arrow"), ("save_to_disk", "saved"),
                                       ("dataset_dict", "saved_dict")])
def test_every_format_gives_the_same_conversations(tmp_path, kind, name):
    path = write(tmp_path / name, ROWS, kind)
    task = CustomJSON(path)
    assert [task[i] for i in range(len(task))] == ROWS
    assert task.shape == "messages"
    if kind != "csv":  # CSV keeps the messages column as a JSON string; the loader decodes it
        assert read_rows(path) == ROWS


def test_json_lines_named_json_and_object_wrapper(tmp_path):
    (tmp_path / "a.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert read_rows(str(tmp_path / "a.json")) == ROWS == read_rows(str(tmp_path / "b.json"))
    rows, lines = read_rows(str(tmp_path / "a.json"), line_numbers=True)
    assert lines == [1, 2]


def test_bad_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"messages": []},\n{oops}\n]')
    with pytest.raises(UserError, match=rf"^{bad}:3: invalid JSON"):
        read_rows(str(bad))
    other = tmp_path / "x.parquet"
    other.write_text("not parquet")
    with pytest.raises(UserError, match=rf"^{other}: cannot read as parquet"):
        read_rows(str(other))
    with pytest.raises(UserError, match="unknown file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        read_rows(str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="not one written by datasets' save_to_disk"):
        read_rows(str(tmp_path))


def test_hub_name_reads_the_mirror(data_dir):
    rows = read_rows("allenai/ai2_arc", subset="ARC-Easy", split="test")
    assert len(rows) > 1000 and {"question", "choices", "answerKey"} <= set(rows[0])


# ----------------------------------------------------------------------------------------------------------
# Row shapes: each equals its messages equivalent, masks included

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
               {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
               {"role": "assistant", "content": "Blue."}]
SHAPED = {
    "message list": [SYSTEM_CHAT],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
                                    {"from": "gpt", "value": "Red."}, {"from": "user", "value": "Another?"},
                                    {"from": "chatgpt", "value": "Blue."}]}],
    "messages": [{"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                               {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
                               {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
                               {"role": "assistant", "content": "Blue."}]}],
    "prompt/completion": [{"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}],
}


@pytest.mark.parametrize("shape", list(SHAPED))
def test_row_shapes_render_like_messages(tmp_path, tokenizer, shape):
    reference = CustomJSON(write(tmp_path / "ref.jsonl", [{"messages": SYSTEM_CHAT}], "jsonl"))[0]
    task = CustomJSON(write(tmp_path / "d.jsonl", SHAPED[shape], "jsonl"))
    assert task.shape == shape
    assert task[0] == reference
    assert tokenizer.render_conversation(task[0]) == tokenizer.render_conversation(reference)


def test_alpaca_and_prompt_completion_strings(tmp_path, tokenizer):
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be exact."},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    task = CustomJSON(write(tmp_path / "a.parquet", alpaca, "parquet"))
    assert task.shape == "alpaca"
    assert task[0]["messages"] == [{"role": "system", "content": "Be exact."},
                                   {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert task[1]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    pc = CustomJSON(write(tmp_path / "p.csv", [{"prompt": "Say hi.", "completion": "hi"}], "csv"))
    assert pc.shape == "prompt/completion" and pc[0]["messages"] == task[1]["messages"]


def test_field_mapping_and_role_map(tmp_path):
    rows = [{"dialog": [{"speaker": "asker", "text": "Q?"}, {"speaker": "answerer", "text": "A."}]}]
    fields = {"messages_field": "dialog", "role_field": "speaker", "content_field": "text",
              "role_map": {"asker": "user", "answerer": "assistant"}}
    task = CustomJSON(write(tmp_path / "d.jsonl", rows, "jsonl"), fields=fields)
    assert task[0]["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_weight_zero_is_context_not_target(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer", "weight": 0},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer", "weight": 1}]
    task = CustomJSON(write(tmp_path / "w.jsonl", [{"messages": chat}], "jsonl"))
    ids, mask = tokenizer.render_conversation(task[0])
    full_ids, full_mask = tokenizer.render_conversation({"messages": [{k: v for k, v in m.items() if k != "weight"}
                                                                      for m in chat]})
    assert ids == full_ids
    second = tokenizer.encode("second answer")
    first = tokenizer.encode("first answer")
    assert sum(mask) == len(second) + 1  # only the second reply and its <|assistant_end|>
    assert sum(full_mask) == len(first) + len(second) + 2
    with pytest.raises(UserError, match="weight must be 0"):
        CustomJSON(write(tmp_path / "bad.jsonl", [{"messages": [chat[0], {**chat[1], "weight": 0.5}]}], "jsonl"))


def test_python_tool_calls_become_python_parts(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "python", "arguments": json.dumps({"code": "6*7"})}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42."}]
    task = CustomJSON(write(tmp_path / "t.jsonl", [{"messages": chat}], "jsonl"))
    assert task[0]["messages"][1] == {"role": "assistant", "content": [
        {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": "It is 42."}]}
    other = [chat[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}, chat[2], chat[3]]
    path = write(tmp_path / "w.jsonl", [{"messages": other}], "jsonl")
    with pytest.raises(UserError, match=rf"^{path}:1: message 1: tool call to 'get_weather': nanochat's chat format "
                                        r"has only the python tool"):
        CustomJSON(path)


def test_unrecognised_shape_names_file_keys_and_shapes(tmp_path):
    path = write(tmp_path / "q.parquet", [{"question": "q", "answer": "a"}], "parquet")
    with pytest.raises(UserError) as excinfo:
        CustomJSON(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: row shape not recognised (first row's keys: ['answer', 'question'])")
    assert all(s in message for s in ("sharegpt", "alpaca", "prompt/completion", "fields"))
    assert "\n" not in message
    parts = lambda kind: [{"type": kind, "text": "x"}]  # noqa: E731
    rows = [{"messages": [{"role": "user", "content": parts("text")}, {"role": "assistant", "content": parts("text")}]}]
    path = write(tmp_path / "p.parquet", rows * 2 + [{"messages": [{"role": "user", "content": parts("image_url")}]}],
                 "parquet")
    with pytest.raises(UserError, match=rf"^{path}: row 3: message 0, part 0: content part of type 'image_url'"):
        CustomJSON(path)
