"""
The SFT guide's "Custom Dataset Integration": a Task subclass in your own module, used from a config file as

    train_mixture = ["configs.examples.my_custom_task:MyCustomTask:train"]

(module path as for `import`, from the directory you run in; then the class; then the constructor's
arguments; slicing, *repeats and @weight work as for the built-in tasks). This one reads the sample JSONL next
to it: its first 4 conversations are the "test" split, the others "train".
"""

import json
import os

from tasks.common import Task


class MyCustomTask(Task):

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft_sample.jsonl")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        self.data = rows[4:] if split == "train" else rows[:4]

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.data)

    def get_example(self, index):
        return {"messages": self.data[index]["messages"]}
