"""
CustomJSON: your own conversations from a file, folder or hub dataset (any format nanochat.data_files.read_rows
reads: JSONL, JSON array, Parquet, CSV, Arrow, a save_to_disk folder, owner/name), in any of these row shapes,
recognised from the first row and named in the data preview (`shape`):

    messages            {"messages": [{"role": ..., "content": ...}, ...]} (OpenAI chat fine-tuning: system and
                        developer -> system; content-part lists of text joined; "weight": 0 on an assistant
                        message -> shown, not trained on; python tool calls -> nanochat's python parts)
    message list        [{"role": ..., "content": ...}, ...]
    sharegpt            {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}, ...]}
    alpaca              {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}
    prompt/completion   {"prompt": str | messages, "completion": str | messages}

Other column names by `fields` (a dict spec's "fields" in a mixture, see tasks/mixture.py): messages_field,
role_field, content_field, prompt_field, completion_field, instruction_field, input_field, output_field,
system_field, and role_map ({"bot": "assistant", ...}, added to the common aliases in ROLE_ALIASES).

Every row is converted and checked when the data is loaded: a bad one raises CustomJSONError, a UserError and
ValueError, "file:line: what is wrong" ("file: row N:" where the format has no lines), or with skip_bad=True is
skipped and counted in `num_skipped`. Rows keep the file's order (a TaskMixture shuffles).
Tests: tests/test_tasks.py, tests/test_data_files.py.
"""

import json

from nanochat.common import UserError
from nanochat.data_files import DataFileMissing, read_rows
from tasks.common import Task, validate_conversation

ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "human": "user", "prompter": "user",
                "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
                "chatgpt": "assistant", "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool"}
PYTHON_TOOLS = ("python", "code_interpreter", "python_interpreter", "execute_python", "run_python", "ipython")
SHAPES = {"messages": "a 'messages' key", "message list": "a list of messages",
          "sharegpt": "a 'conversations' key", "alpaca": "'instruction' and 'output' keys",
          "prompt/completion": "'prompt' and 'completion' keys"}  # shape -> what marks it
FIELD_KEYS = ("messages_field", "role_field", "content_field", "prompt_field", "completion_field",
              "instruction_field", "input_field", "output_field", "system_field", "role_map")
ACCEPTED = ("messages ({\"messages\": [{role, content}]}), a bare message list, sharegpt ({\"conversations\": "
            "[{from, value}]}), alpaca ({instruction, input, output}), prompt/completion ({prompt, completion}); "
            "other column names via a dict spec's \"fields\", e.g. {\"task\": \"CustomJSON\", \"args\": [path], "
            "\"fields\": {\"messages_field\": \"dialog\"}}")


class CustomJSONError(UserError, ValueError):
    """A conversation file that cannot be used; the message starts with `file:line:` or `file: row N:`."""


class CustomJSONMissing(DataFileMissing):
    """The file does not exist."""


# ----------------------------------------------------------------------------------------------------------
# Row shapes -> nanochat conversations (pure)


def detect_shape(row, fields=None):
    """The shape (one of SHAPES) of a row, or None."""
    f = fields or {}
    if isinstance(row, list):
        return "message list"
    if not isinstance(row, dict):
        return None
    if f.get("messages_field", "messages") in row:
        return "messages"
    if "conversations" in row or "conversation" in row:
        return "sharegpt"
    if f.get("instruction_field", "instruction") in row and f.get("output_field", "output") in row:
        return "alpaca"
    if f.get("prompt_field", "prompt") in row and f.get("completion_field", "completion") in row:
        return "prompt/completion"
    return None


def _maybe_json(value):
    """A list or dict stored as a JSON string (a CSV cell) -> the value; anything else unchanged."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text_of(content, i):
    """A message's content -> a string, or a list of nanochat parts (python / python_output kept)."""
    content = _maybe_json(content)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
    if any(isinstance(p, dict) and p.get("type") in ("python", "python_output") for p in content):
        return content  # already nanochat's assistant parts
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"message {i}, part {j}: content part of type {kind!r} is not text; nanochat trains on "
                             f"text only (drop the part or the row)")
    return "\n".join(texts)


def _tool_code(call, i):
    """An OpenAI tool call -> the python code it runs, or ValueError when it is another tool."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    name = function.get("name")
    if name not in PYTHON_TOOLS:
        raise ValueError(f"message {i}: tool call to {name!r}: nanochat's chat format has only the python tool "
                         f"(calls named {', '.join(PYTHON_TOOLS)}); drop this row or rename the tool")
    arguments = _maybe_json(function.get("arguments", ""))
    if isinstance(arguments, dict):
        code = arguments.get("code", arguments.get("script"))
        if not isinstance(code, str):
            raise ValueError(f"message {i}: python tool call without a 'code' argument (got {sorted(arguments)})")
        return code
    if not isinstance(arguments, str):
        raise ValueError(f"message {i}: python tool call arguments must be a string or {{\"code\": ...}}")
    return arguments


def _as_parts(content):
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def convert_messages(messages, fields=None):
    """A list of messages in any of the common spellings -> nanochat's messages: roles through ROLE_ALIASES
    (+ fields["role_map"]), role/content keys from role/from and content/value (or fields), leading system
    messages joined, assistant tool calls to python parts whose tool reply becomes a python_output part of the
    same assistant turn, "weight": 0 kept. Raises ValueError naming the message index."""
    f = fields or {}
    aliases = {**ROLE_ALIASES, **{str(k).lower(): v for k, v in (f.get("role_map") or {}).items()}}
    messages = _maybe_json(messages)
    if not isinstance(messages, list):
        raise ValueError(f"expected a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected a dict with a role and a content, got {type(m).__name__}")
        raw_role = m.get(f.get("role_field", "role"), m.get("from"))
        role = aliases.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise ValueError(f"message {i}: unknown role {raw_role!r} (known: {', '.join(sorted(aliases))}; map "
                             f"others with fields' role_map)")
        content_key = f.get("content_field", "content")
        content = _text_of(m.get(content_key, m.get("value")), i)
        if role == "system":
            if out and out[-1]["role"] != "system":
                raise ValueError(f"message {i}: a system message is only allowed before the first user message")
            if out:
                out[-1]["content"] += "\n\n" + content
            else:
                out.append({"role": "system", "content": content})
            continue
        if role == "tool":
            last = out[-1] if out else None
            parts = _as_parts(last["content"]) if last and last["role"] == "assistant" else []
            if not parts or parts[-1]["type"] != "python":
                raise ValueError(f"message {i}: a tool message must answer an assistant's python tool call")
            last["content"] = parts + [{"type": "python_output", "text": content if isinstance(content, str)
                                        else json.dumps(content)}]
            continue
        message = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["content"] = _as_parts(content) + [{"type": "python", "text": _tool_code(c, i)}
                                                       for c in m["tool_calls"]]
        if "weight" in m and m["weight"] is not None:
            message["weight"] = m["weight"]
        if role == "assistant" and out and out[-1]["role"] == "assistant" and \
                _as_parts(out[-1]["content"])[-1:] and _as_parts(out[-1]["content"])[-1]["type"] == "python_output":
            out[-1]["content"] = _as_parts(out[-1]["content"]) + _as_parts(message["content"])  # after a tool reply
            continue
        out.append(message)
    return out


def to_conversation(row, shape, fields=None):
    """One row of a known shape -> {"messages": [...]} in nanochat's format (not yet validated)."""
    f = fields or {}
    if shape == "message list":
        return {"messages": convert_messages(row, f)}
    if shape == "messages":
        return {"messages": convert_messages(row[f.get("messages_field", "messages")], f)}
    if shape == "sharegpt":
        return {"messages": convert_messages(row.get("conversations", row.get("conversation")), f)}
    if shape == "alpaca":
        get = lambda key: row.get(f.get(f"{key}_field", key))  # noqa: E731
        instruction, extra, output, system = get("instruction"), get("input"), get("output"), get("system")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError("alpaca row: 'instruction' and 'output' must be strings")
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    if shape == "prompt/completion":
        prompt = _maybe_json(row[f.get("prompt_field", "prompt")])
        completion = _maybe_json(row[f.get("completion_field", "completion")])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise ValueError("prompt/completion row: each must be a string or a list of messages")
        return {"messages": convert_messages(prompt + completion, f)}
    raise ValueError(f"unknown shape {shape!r}")


def _check_fields(fields, filepath):
    if fields is None:
        return {}
    if isinstance(fields, str):
        fields = json.loads(fields)
    if not isinstance(fields, dict) or set(fields) - set(FIELD_KEYS):
        unknown = sorted(set(fields) - set(FIELD_KEYS)) if isinstance(fields, dict) else fields
        raise CustomJSONError(f"{filepath}: unknown fields {unknown}; expected some of {', '.join(FIELD_KEYS)}")
    return fields


# ----------------------------------------------------------------------------------------------------------
# The task


class CustomJSON(Task):

    def __init__(self, filepath, skip_bad=False, fields=None, split="train", **kwargs):
        super().__init__(**kwargs)
        self.filepath, self.fields = filepath, _check_fields(fields, filepath)
        unreadable = [] if skip_bad else None
        try:
            rows, lines = read_rows(filepath, split=split, line_numbers=True, errors=unreadable)
        except DataFileMissing as e:
            raise CustomJSONMissing(f"CustomJSON: {e}") from None
        self.errors = list(unreadable or [])
        if not rows:
            raise CustomJSONError(f"{filepath}: no rows{f' (first error: {self.errors[0]})' if self.errors else ''}")
        if detect_shape(rows[0], self.fields) is None:
            keys = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
            raise CustomJSONError(f"{filepath}: row shape not recognised (first row's keys: {keys}); accepted "
                                  f"shapes: {ACCEPTED}")
        self.conversations, self.num_skipped, shapes = [], len(self.errors), {}
        for index, row in enumerate(rows):
            try:
                shape = detect_shape(row, self.fields)
                if shape is None:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"row shape not recognised (keys: {keys}); expected one of: "
                                     f"{'; '.join(f'{k} ({v})' for k, v in SHAPES.items())}")
                conversation = to_conversation(row, shape, self.fields)
                validate_conversation(conversation)
                self.conversations.append(conversation)
                shapes[shape] = shapes.get(shape, 0) + 1
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                where = f"{filepath}:{lines[index]}" if lines else f"{filepath}: row {index + 1}"
                message = f"{where}: {e}"
                if not skip_bad:
                    raise CustomJSONError(message) from None
                self.num_skipped += 1
                self.errors.append(message)
        self.shape = " + ".join(shapes)  # the row shapes found, in order of first appearance (data preview)
        if not self.conversations:
            skipped = f" ({self.num_skipped} bad rows skipped; first: {self.errors[0]})" if self.errors else ""
            raise CustomJSONError(f"{filepath}: no valid conversations{skipped}")

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
