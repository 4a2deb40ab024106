"""
GSM8K grade-school math word problems: openai/gsm8k, subsets main / socratic, splits train / test.
Generative. The assistant message is a list of parts built from the solution's calculator annotations
`<<expr=result>>`: the text before it, {"type": "python", "text": expr}, {"type": "python_output",
"text": result}, ..., then the final text with "#### answer" (so the model learns to call the calculator tool).
`evaluate` compares the number after "####" (commas removed) in the gold solution and in the completion;
`reward` (chat_rl) is 1.0 when it matches, else 0.0.
Tests: tests/test_tasks.py.
"""

import re

from tasks.common import Task, load_rows

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
ANNOTATION_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after "####" with commas removed ("#### 1,200" -> "1200"), or None."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def solution_to_parts(solution):
    """'a <<2*3=6>>6 b #### 6' -> text 'a ', python '2*3', python_output '6', text '6 b #### 6'.
    Empty text pieces (two annotations back to back) are left out; "".join of the texts with each
    python/python_output pair written back as <<expr=result>> gives the solution again."""
    parts = []
    for piece in ANNOTATION_RE.split(solution):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, eq, result = piece[2:-2].rpartition("=")
            if not eq:  # no '=' inside: the whole annotation is the expression
                expr, result = result, ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def parts_to_solution(parts):
    """Inverse of solution_to_parts."""
    out = []
    for part in parts:
        if part["type"] == "python":
            out.append(f"<<{part['text']}=")
        elif part["type"] == "python_output":
            out.append(f"{part['text']}>>")
        else:
            out.append(part["text"])
    return "".join(out)


class GSM8K(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        self.ds = load_rows("openai/gsm8k", subset, split)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": solution_to_parts(row["answer"])},
        ]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        """True if the completion's "#### number" equals the gold one."""
        gold_parts = conversation["messages"][-1]["content"]
        gold = extract_answer(gold_parts[-1]["text"] if isinstance(gold_parts, list) else gold_parts)
        return gold is not None and extract_answer(completion) == gold

    def reward(self, conversation, completion):
        """chat_rl's reward, as nanochat's: 1.0 for the right answer, else 0.0."""
        return float(self.evaluate(conversation, completion))
