"""A toy Task with a reward() for tests/test_chat_rl.py: an untrained model earns different rewards on its
completions (the share of the letter "e" in the completion), so RL has something to learn from. Loaded through
the custom mixture spec "tests.rl_toy_task:EShare". Not a test module (no test_ prefix)."""

from tasks.common import Task


class EShare(Task):

    def __init__(self, size=64, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"Say a word with an e ({index})."},
                             {"role": "assistant", "content": "tree"}]}

    def evaluate(self, conversation, completion):
        return "e" in completion

    def reward(self, conversation, completion):
        return completion.count("e") / max(len(completion), 1)
