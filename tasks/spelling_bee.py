"""
SpellingBee: "How many 'r' are in 'strawberry'?", generated from a seed (no download), a skill a tiny model
can learn and RL can sharpen. The assistant answers with the python tool, as nanochat's SpellingBee does, in
the short form a small CPU model learns (nanochat's also spells the word out first):

    user:       How many 'r' are in 'strawberry'?
    assistant:  <|python_start|> 'strawberry'.count('r')<|python_end|><|output_start|>3<|output_end|>#### 3

A model cannot see the letters of a word (its tokens hide them), so the count has to come from the tool: the
skill is exact copying, of the word and the letter into the call and of the tool's output into the answer.
The call starts with a space (the tool strips it) so that " 'strawberry'" is tokenized in the call exactly as in
the question: with a small vocabulary "'strawberry'" alone merges the quote into the word's first token, and
copying would need a different token sequence than the one in the question.
Examples are (word, letter) pairs of a built-in word list (every letter of each word, and one letter it lacks);
a pair belongs to the test split or the train split by a hash of the pair (about 1 in 5 is test), so the
held-out questions are never trained on. Example i of a split is drawn by random.Random(f"{seed}:{split}:{i}"):
first the count, 0, 1 or "2 or more" with equal chances (most letters occur once: without this, answering 1
every time would score well; now a guess scores about 1/3), then a pair with that count and a phrasing; the
same on every machine and run. Generative; `evaluate` / `reward` compare the number
after "####" with the true count. Tests: tests/test_spelling_bee.py.
"""

import random
import zlib

from tasks.common import Task
from tasks.gsm8k import extract_answer

# common English words of 3 to 10 letters (lowercase a-z only)
WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry strawberry raspberry blueberry
water river ocean island mountain valley forest desert meadow garden flower tree leaf branch root seed
house window door kitchen table chair pillow blanket mirror ladder bottle basket bucket candle hammer
school teacher student pencil paper letter number picture story poem music guitar piano violin drum
summer winter spring autumn morning evening night sunday monday friday today tomorrow yesterday
animal rabbit turtle monkey donkey giraffe elephant tiger lion zebra kitten puppy parrot pigeon eagle
butter bread cookie pepper carrot potato tomato onion garlic cheese coffee sugar honey cereal noodle
happy little pretty simple yellow purple silver golden bright gentle quiet sudden strong narrow
button pocket jacket sweater mitten boots ribbon zipper saddle bridge tunnel castle tower village
doctor farmer driver artist banker baker sailor soldier pilot nurse barber lawyer dancer singer
engine rocket planet comet galaxy moon star cloud thunder storm rainbow breeze shadow mirror
coffee kettle saucer spoon fork knife plate bowl cup glass teapot skillet oven toaster
address balloon cabbage dessert eleven grammar hobby jelly jigsaw kayak lizard marble needle
parallel quizzes raccoon scissors tattoo umbrella volcano waffle yogurt zipper accordion assessment
bookkeeper committee coffee mississippi occurrence possession success tennessee bubble puzzle
""".split()
WORDS = sorted(set(WORDS))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATES = (
    "How many '{letter}' are in '{word}'?",
    "How many times does the letter '{letter}' appear in '{word}'?",
    "Count the letter '{letter}' in the word '{word}'.",
)
SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 20000, "test": 500}


def letter_pairs(words=WORDS):
    """(word, letter) pairs: every distinct letter of each word, and one letter it lacks (chosen by a hash of
    the word, so the list is the same on every run)."""
    pairs = []
    for word in words:
        present = sorted(set(word))
        absent = [c for c in LETTERS if c not in word]
        pairs += [(word, c) for c in present]
        pairs.append((word, absent[zlib.crc32(word.encode()) % len(absent)]))
    return pairs


def pair_split(word, letter):
    """'test' for about 1 in 5 pairs (a hash of the pair), else 'train'."""
    return "test" if zlib.crc32(f"{word}:{letter}".encode()) % 5 == 0 else "train"


def make_conversation(word, letter, template=0):
    """The example for (word, letter): the question, then the tool call, its output and the answer."""
    count = word.count(letter)
    return {"messages": [
        {"role": "user", "content": TEMPLATES[template].format(letter=letter, word=word)},
        {"role": "assistant", "content": [
            {"type": "python", "text": f" '{word}'.count('{letter}')"},  # leading space: see the module docstring
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"#### {count}"},
        ]},
    ]}


class SpellingBee(Task):

    def __init__(self, split, size=None, seed=0, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SpellingBee split must be train or test, got {split!r}")
        self.split, self.seed = split, int(seed)
        self.size = DEFAULT_SIZES[split] if size in (None, "") else int(size)
        pairs = [p for p in letter_pairs() if pair_split(*p) == split]
        self.buckets = [[(w, c) for w, c in pairs if min(w.count(c), 2) == b] for b in range(3)]  # count 0, 1, 2+

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"{self.seed}:{self.split}:{index}")
        bucket = self.buckets[rng.randrange(len(self.buckets))]
        word, letter = bucket[rng.randrange(len(bucket))]
        return make_conversation(word, letter, rng.randrange(len(TEMPLATES)))

    def evaluate(self, conversation, completion):
        """True if the completion's "#### number" is the letter's count."""
        gold = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return gold is not None and extract_answer(completion) == gold

    def reward(self, conversation, completion):
        """1.0 for the right count, else 0.0."""
        return float(self.evaluate(conversation, completion))
