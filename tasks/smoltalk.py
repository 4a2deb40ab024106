"""
Chat conversations stored as SmolTalk stores them (one row per conversation, a `messages` list of
{"role", "content"}), from one of two datasets:
- SmolTalk: HuggingFaceTB/smol-smoltalk (~460K train / ~24K test general chat conversations), nanochat's SFT
  chat data; from the hub only (the local mirror cannot have it).
- ChitChat: the local mirror's stand-in for it (chitchat/default/{train,test}.jsonl: 3816 / 201 human-human
  conversations from the BYU PCC Chit-Chat Challenge, roles alternating user/assistant, ending with the
  assistant; see the mirror's README); mirror only: needs NANOCHAT_DATA_DIR.
One class reads both; ChitChat only names the other dataset. Offline, use ChitChat(split) or CustomJSON(path).
Tests: tests/test_tasks.py.
"""

from tasks.common import Task, load_rows, validate_conversation

OFFLINE_HINT = ("smol-smoltalk is not in the local mirror: offline, use ChitChat(split) (the mirror's chat "
                "stand-in, chitchat/default) or CustomJSON(path) with your own conversations.")
# dataset name -> load_rows arguments: repository id, subset, whether the hub may be asked, hint when missing
CHAT_DATASETS = {
    "SmolTalk": ("HuggingFaceTB/smol-smoltalk", None, True, OFFLINE_HINT),
    "ChitChat": ("chitchat", "default", False, ""),
}


class SmolTalk(Task):
    """The conversations of the `dataset` named by the class (SmolTalk, or ChitChat below), split train|test."""

    dataset = "SmolTalk"

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"{self.dataset} split must be train or test, got {split!r}")
        repo_id, subset, hub, hint = CHAT_DATASETS[self.dataset]
        self.ds = load_rows(repo_id, subset, split, hub=hub, offline_hint=hint)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        conversation = {"messages": self.ds[index]["messages"]}
        validate_conversation(conversation)
        return conversation


class ChitChat(SmolTalk):
    """SmolTalk's reader on the mirror's chitchat dataset."""

    dataset = "ChitChat"
