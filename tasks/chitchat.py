"""
ChitChat: the local mirror's chat stand-in for SmolTalk (chitchat/default/{train,test}.jsonl: 3816 / 201
human-human conversations from the BYU PCC Chit-Chat Challenge, roles alternating user/assistant, ending with
the assistant; see the mirror's README). Mirror only: needs NANOCHAT_DATA_DIR. Tests: tests/test_tasks.py.
"""

from tasks.common import Task, load_rows, validate_conversation


class ChitChat(Task):

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"ChitChat split must be train or test, got {split!r}")
        self.ds = load_rows("chitchat", "default", split, hub=False)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        conversation = {"messages": self.ds[index]["messages"]}
        validate_conversation(conversation)
        return conversation
