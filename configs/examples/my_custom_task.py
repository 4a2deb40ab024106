"""
The SFT guide's "Custom Dataset Integration": a Task subclass in your own module, used from a config file as

    train_mixture = ["configs.examples.my_custom_task:MyCustomTask:train*2"]

(module path as for `import`, from the directory you run in; then the class; then the constructor's
arguments; slicing, *repeats and @weight work as for the built-in tasks). Here load_my_data reads the sample
JSONL next to this file: its first 4 conversations are the "test" split, the others "train". The class is the
README's example as written there (tests/test_repo.py checks they agree).
"""

import json
import os

from tasks.common import Task


def load_my_data(split):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_sample.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[4:] if split == "train" else rows[:4]


class MyCustomTask(Task):
    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        self.data = load_my_data(split)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.data)

    def get_example(self, index):
        return {"messages": self.data[index]["messages"]}
