"""
CustomJSON: your own conversations from a JSONL file, one conversation per line, either
`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}` or (as in
nanochat) the bare messages list. An optional leading system message; user/assistant alternate, starting with
user and ending with assistant (tasks.common.validate_conversation). Every line is checked when the file is
loaded: a bad one raises ValueError("file:line: what is wrong"), or with skip_bad=True is skipped and counted
in `num_skipped`. Rows keep the file's order (a TaskMixture shuffles). Tests: tests/test_tasks.py.
"""

import json
import os

from tasks.common import Task, validate_conversation


class CustomJSON(Task):

    def __init__(self, filepath, skip_bad=False, **kwargs):
        super().__init__(**kwargs)
        if not os.path.isfile(filepath):
            raise FileNotFoundError(f"CustomJSON: no such file {filepath!r} (expected a JSONL file of "
                                    f"{{\"messages\": [...]}} rows; relative paths are from {os.getcwd()})")
        self.filepath = filepath
        self.conversations, self.num_skipped, self.errors = [], 0, []
        with open(filepath, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    self.conversations.append(self._parse(line))
                except ValueError as e:
                    message = f"{filepath}:{line_no}: {e}"
                    if not skip_bad:
                        raise ValueError(message) from None
                    self.num_skipped += 1
                    self.errors.append(message)
        if not self.conversations:
            skipped = f" ({self.num_skipped} bad lines skipped; first: {self.errors[0]})" if self.errors else ""
            raise ValueError(f"{filepath}: no valid conversations{skipped}")

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
