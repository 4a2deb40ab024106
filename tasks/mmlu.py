"""
MMLU (Massive Multitask Language Understanding): cais/mmlu, subset "all" (splits test / validation / dev)
or "auxiliary_train" (split train; hub only, not in the local mirror). Categorical, letters A-D.
Tests: tests/test_tasks.py.
"""

from tasks.common import Task, load_rows, render_mc


class MMLU(Task):

    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be all or auxiliary_train, got {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train has only the train split, got {split!r}")
        if subset == "all" and split not in ("test", "validation", "dev", "auxiliary_train"):
            raise ValueError(f"MMLU 'all' split must be test, validation, dev or auxiliary_train, got {split!r}")
        self.subset = subset
        self.ds = load_rows("cais/mmlu", subset, split)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if self.subset == "auxiliary_train" and "train" in row:  # the hub nests these rows under "train"
            row = row["train"]
        choices, answer = row["choices"], row["answer"]
        if len(choices) != len(self.letters) or not 0 <= answer < len(self.letters):
            raise ValueError(f"MMLU row {index}: expected 4 choices and answer 0-3, got {len(choices)} and {answer}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
            {"role": "assistant", "content": self.letters[answer]},
        ]
        return {"messages": messages, "subject": row.get("subject", ""), "letters": list(self.letters)}

    def evaluate(self, conversation, completion):
        """completion: the letter the model picked (A-D)."""
        return completion == conversation["messages"][-1]["content"]
