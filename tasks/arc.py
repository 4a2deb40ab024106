"""
ARC (AI2 Reasoning Challenge) multiple-choice science questions: allenai/ai2_arc, subsets ARC-Easy and
ARC-Challenge, splits train / validation / test. Categorical: the prompt lists the choices with the row's own
labels (usually A-D, some rows 1-4, a few with 3 or 5 choices); the answer is the gold label.
Tests: tests/test_tasks.py.
"""

from tasks.common import Task, load_rows, render_mc


class ARC(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be ARC-Easy or ARC-Challenge, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        self.ds = load_rows("allenai/ai2_arc", subset, split)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = list(row["choices"]["label"])
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answer {answer!r} is not one of its labels {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, completion):
        """completion: the letter the model picked (among conversation["letters"])."""
        return completion == conversation["messages"][-1]["content"]
