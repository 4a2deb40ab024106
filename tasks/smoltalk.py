"""
SmolTalk: HuggingFaceTB/smol-smoltalk (~460K train / ~24K test general chat conversations), nanochat's SFT
chat data; from the hub only. Offline (the local mirror cannot have it) use ChitChat(split) or
CustomJSON(path) instead. Tests: tests/test_tasks.py.
"""

from tasks.common import Task, load_rows, validate_conversation

OFFLINE_HINT = ("smol-smoltalk is not in the local mirror: offline, use ChitChat(split) (the mirror's chat "
                "stand-in, chitchat/default) or CustomJSON(path) with your own conversations.")


class SmolTalk(Task):

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be train or test, got {split!r}")
        self.ds = load_rows("HuggingFaceTB/smol-smoltalk", None, split, offline_hint=OFFLINE_HINT)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        conversation = {"messages": self.ds[index]["messages"]}
        validate_conversation(conversation)
        return conversation
