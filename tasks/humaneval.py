"""
HumanEval (openai/openai_humaneval, 164 problems, split test): write a Python function from its signature and
docstring. Generative: the user message is the prompt, the reference assistant message is prompt + canonical
solution. `evaluate` runs the candidate program (the prompt's imports + the completion's code: its first fenced
python block if it has one, else the whole completion) in one sandbox, and the prompt, the tests and
`check(entry_point)` in another that calls the candidate's function through a pipe; the verdict is the tests'
process's, which the completion cannot write (nanochat.execution.judge_function; nanochat ran everything in
one interpreter, where a completion can forge a pass). Tests: tests/test_tasks.py, tests/test_sandbox.py.
"""

import re

from nanochat.execution import judge_function
from tasks.common import Task, load_rows

FENCED_RE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a prompt (before the first other code line)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first ```python fenced block of a completion, else the whole completion."""
    match = FENCED_RE.search(completion)
    return match.group(1) if match else completion


def build_candidate(conversation, completion):
    """The untrusted program: the prompt's imports + the completion's code (it must define the entry point)."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return "\n\n".join([imports, extract_program(completion), ""])


def build_tests(conversation):
    """The trusted tests: the problem's `check` and the call that runs it on the entry point."""
    return "\n\n".join([conversation["test"], f"check({conversation['entry_point']})", ""])


def run_completion(conversation, completion, timeout=5.0, isolation="auto"):
    """ExecutionResult of the completion against the problem's tests (success: they all passed)."""
    return judge_function(build_candidate(conversation, completion), conversation["entry_point"],
                          build_tests(conversation), context_code=conversation["messages"][0]["content"],
                          timeout=timeout, isolation=isolation)


class HumanEval(Task):

    def __init__(self, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout  # seconds per program in the sandbox
        self.ds = load_rows("openai/openai_humaneval", "openai_humaneval", "test")

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
        ]
        return {"messages": messages, "entry_point": row["entry_point"], "test": row["test"],
                "task_id": row["task_id"]}

    def evaluate(self, conversation, completion):
        """True if the completion's code passes the problem's tests in the sandbox."""
        return run_completion(conversation, completion, timeout=self.timeout).success

    def reward(self, conversation, completion):
        """chat_rl's reward: 1.0 when the sandboxed tests pass (the tests' process's verdict, which the program
        cannot forge), else 0.0."""
        return float(self.evaluate(conversation, completion))
