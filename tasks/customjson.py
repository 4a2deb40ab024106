"""
CustomJSON: your own conversations from a JSONL file, one conversation per line, either
`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}` or (as in
nanochat) the bare messages list. An optional leading system message; user/assistant alternate, starting with
user and ending with assistant (tasks.common.validate_conversation). Every line is checked when the file is
loaded: a bad one (invalid JSON, a non-UTF-8 byte, a malformed conversation) raises CustomJSONError, a
UserError and ValueError, "file:line: what is wrong", or with skip_bad=True is skipped and counted
in `num_skipped`. Rows keep the file's order (a TaskMixture shuffles). Tests: tests/test_tasks.py.
"""

import json
import os

from nanochat.common import UserError
from tasks.common import Task, validate_conversation


class CustomJSONError(UserError, ValueError):
    """A JSONL file that cannot be used; the message starts with `file:line:`."""


class CustomJSONMissing(UserError, FileNotFoundError):
    """The JSONL file does not exist."""


def _describe(error):
    if isinstance(error, UnicodeDecodeError):
        return (f"not UTF-8: byte 0x{error.object[error.start]:02x} at column {error.start + 1}; "
                f"save the file as UTF-8")
    return str(error)


class CustomJSON(Task):

    def __init__(self, filepath, skip_bad=False, **kwargs):
        super().__init__(**kwargs)
        if not os.path.isfile(filepath):
            raise CustomJSONMissing(f"CustomJSON: no such file {filepath!r} (expected a JSONL file of "
                                    f"{{\"messages\": [...]}} rows; relative paths are from {os.getcwd()})")
        self.filepath = filepath
        self.conversations, self.num_skipped, self.errors = [], 0, []
        with open(filepath, "rb") as f:  # bytes, decoded per line: a non-UTF-8 byte is reported as file:line
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    self.conversations.append(self._parse(line))
                except ValueError as e:  # UnicodeDecodeError is a ValueError too
                    message = f"{filepath}:{line_no}: {_describe(e)}"
                    if not skip_bad:
                        raise CustomJSONError(message) from None
                    self.num_skipped += 1
                    self.errors.append(message)
        if not self.conversations:
            skipped = f" ({self.num_skipped} bad lines skipped; first: {self.errors[0]})" if self.errors else ""
            raise CustomJSONError(f"{filepath}: no valid conversations{skipped}")

    @staticmethod
    def _parse(line):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON ({e})") from None
        conversation = {"messages": row} if isinstance(row, list) else row
        validate_conversation(conversation)
        return {"messages": conversation["messages"]}

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]
