"""
Small fakes for the engine / chat_eval tests (a byte tokenizer, fake models, fake tasks), and a worker that
runs a categorical and a generative evaluation on them.

Under torchrun (2 CPU processes, gloo) it writes rank<r>.json with the all-reduced counts:
    torchrun --standalone --nproc_per_node=2 tests/chat_eval_worker.py OUT_DIR
tests/test_chat_eval.py compares that with the same evaluation in one process.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Bytes are ids 0..255, the 9 special tokens follow (256..264)."""

    def __init__(self):
        self.special_ids = {name: 256 + i for i, name in enumerate(SPECIALS)}
        self.id_to_special = {v: k for k, v in self.special_ids.items()}

    def get_vocab_size(self):
        return 256 + len(SPECIALS)

    def encode_special(self, name):
        return self.special_ids[name]

    def get_bos_token_id(self):
        return self.special_ids["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace") + self.id_to_special[i])
                buf = bytearray()
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def render_for_completion(self, conversation):
        messages = list(conversation["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the answer is what the model completes
        ids = [self.get_bos_token_id()]
        for m in messages:
            role = "user" if m["role"] in ("user", "system") else "assistant"
            ids += [self.special_ids[f"<|{role}_start|>"]] + self.encode(m["content"])
            ids += [self.special_ids[f"<|{role}_end|>"]]
        return ids + [self.special_ids["<|assistant_start|>"]]


def fake_config(vocab_size, n_layer=2, n_head=2, n_embd=16, sequence_len=256):
    return SimpleNamespace(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                           n_kv_head=n_head, n_embd=n_embd)


class FakeModel(torch.nn.Module):
    """Base for fake models: keeps the KV-cache protocol (inserts zeros per layer) so positions advance."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = fake_config(vocab_size)
        self.calls = []  # (B, T) of every forward

    def get_device(self):
        return torch.device("cpu")

    def scores(self, idx):  # (B, T, V)
        raise NotImplementedError

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.shape
        self.calls.append((B, T))
        if kv_cache is not None:
            c = self.config
            z = torch.zeros(B, c.n_kv_head, T, c.n_embd // c.n_head)
            for layer in range(c.n_layer):
                kv_cache.insert_kv(layer, z, z)
        return self.scores(idx)


class UniformModel(FakeModel):
    def scores(self, idx):
        return torch.zeros(*idx.shape, self.config.vocab_size)


class MarkovModel(FakeModel):
    """Next token = table[current token] (default: `default`), as a one-hot of large logits."""

    def __init__(self, vocab_size, table, default):
        super().__init__(vocab_size)
        self.table, self.default = table, default

    def scores(self, idx):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                logits[b, t, self.table.get(int(idx[b, t]), self.default)] = 20.0
        return logits


class FakeTask:
    """A list of conversations; `evaluate` is given as a function (conversation, completion) -> bool."""

    def __init__(self, conversations, evaluate, eval_type="categorical"):
        self.conversations, self._evaluate, self.eval_type = conversations, evaluate, eval_type

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i]

    def evaluate(self, conversation, completion):
        return self._evaluate(conversation, completion)


def mc_conversation(i, letters, answer):
    question = f"Question {i}: pick one. " + " ".join(f"{l}) choice {l}{i}" for l in letters) + "." * (i % 7)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "letters": list(letters), "answer": answer}


# ----------------------------------------------------------------------------------------------------------
# The distributed-equality worker


def tiny_gpt(vocab_size, seed=0):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # init_weights zeroes some projections: make every layer matter
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def dist_tasks():
    letter_sets = ["ABCD", "1234", "ABC", "ABCDE"]
    categorical = FakeTask([mc_conversation(i, letter_sets[i % 4], letter_sets[i % 4][i % 3]) for i in range(13)],
                           lambda conv, letter: letter == conv["answer"])
    generative = FakeTask([{"messages": [{"role": "user", "content": f"Say something {i}"},
                                         {"role": "assistant", "content": ""}]} for i in range(7)],
                          lambda conv, completion: len(completion.encode()) % 3 == 0, eval_type="generative")
    return categorical, generative


def evaluate_all(rank, world_size):
    from nanochat.chat_eval import run_categorical_eval, run_generative_eval
    from nanochat.engine import Engine

    tokenizer = ByteTokenizer()
    model = tiny_gpt(tokenizer.get_vocab_size())
    categorical, generative = dist_tasks()
    cat = run_categorical_eval(categorical, tokenizer, model, batch_size=1, rank=rank, world_size=world_size)
    gen = run_generative_eval(generative, tokenizer, Engine(model, tokenizer), num_samples=2, max_new_tokens=6,
                              temperature=1.0, top_k=50, rank=rank, world_size=world_size)
    return {"categorical": list(cat), "generative": list(gen)}


if __name__ == "__main__":
    from nanochat.common import compute_cleanup, compute_init

    _, rank, _, world_size, _ = compute_init("cpu")
    result = evaluate_all(rank, world_size)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    compute_cleanup()
