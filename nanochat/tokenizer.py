"""
The chat tokenizer: a GPT-4 style byte-level BPE trained with `rustbpe`, run with `tiktoken`, plus the chat
format (`render_conversation`) that decides which tokens SFT learns from.

- Training: `RustBPETokenizer.train_from_iterator(texts, vocab_size)`; the 9 special tokens take the LAST ids.
- Saving: `save(dir)` writes `mergeable_ranks.tiktoken` ("<base64 token bytes> <rank>" lines), `tokenizer.json`
  (split pattern, special tokens) and `token_bytes.npy` (byte length of every token, 0 for specials).
  Nothing is pickled: loading a tokenizer parses text and never executes code.
- Plain text is always encoded with `encode_ordinary`: a document containing the string "<|bos|>" gets ordinary
  tokens, never the special id. Special ids only come from `encode_special` / `prepend` / `append`.

Supervision table of `render_conversation` (mask 1 = the token is a training target):

    <|bos|>                                   0
    <|user_start|> user content <|user_end|>  0 0 0
    <|assistant_start|>                       0
    assistant content (str or "text" part)    1
    <|python_start|> code <|python_end|>      1 1 1   ("python" part)
    <|output_start|> out <|output_end|>       0 0 0   ("python_output" part)
    <|assistant_end|>                         1

An assistant message with "weight": 0 (OpenAI's fine-tuning format) is rendered the same but all of its tokens
have mask 0: it is context, not a target.

Tests: tests/test_tokenizer.py (uses the session `tokenizer` fixture from tests/conftest.py).
"""

import base64
import copy
import json
import os
import warnings

import numpy as np
import torch

from nanochat.common import UserError, atomic_write_bytes, atomic_write_text, get_base_dir

class TokenizerFileError(UserError, ValueError):
    """A tokenizer file that is corrupt, truncated or of another format (the message names the path)."""


class TokenizerFileMissing(UserError, FileNotFoundError):
    """No trained tokenizer where one is expected."""


SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool (calculator)
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant (never supervised)
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers are split into groups of at most 2 digits (\p{N}{1,2}, GPT-4 uses 1,3):
# nanochat found this wastes fewer tokens on numbers at small vocab sizes.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501

RANKS_FILE = "mergeable_ranks.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
FORMAT_VERSION = 1

_ROLES = ("system", "user", "assistant")
_PART_TYPES = ("text", "python", "python_output")


# ---------------------------------------------------------------------------------------------------------
# conversation validation (pure; shared by render_conversation and render_for_completion)

def _check_message(i, message):
    if not isinstance(message, dict):
        raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"message {i}: missing key '{key}' (a message needs 'role' and 'content')")
    if message["role"] not in _ROLES:
        raise ValueError(f"message {i}: unknown role {message['role']!r} (expected one of {', '.join(_ROLES)})")


def _check_assistant_content(i, content):
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"message {i}: assistant content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"message {i}, part {j}: expected a dict with 'type' and 'text', "
                             f"got {type(part).__name__}")
        for key in ("type", "text"):
            if key not in part:
                raise ValueError(f"message {i}, part {j}: missing key '{key}' (a part needs 'type' and 'text')")
        if part["type"] not in _PART_TYPES:
            raise ValueError(f"message {i}, part {j}: unknown part type {part['type']!r} "
                             f"(expected one of {', '.join(_PART_TYPES)})")
        if not isinstance(part["text"], str):
            raise ValueError(f"message {i}, part {j}: part text must be a string, got {type(part['text']).__name__}")


def normalize_messages(conversation):
    """Validate a conversation and return its messages with a leading system message merged into the first user
    message (system + "\\n\\n" + user). Raises ValueError naming the message index and what is wrong.
    Rules: non-empty list under "messages"; an optional system message only at index 0, followed by a user
    message; then strictly alternating user / assistant, starting with user; user (and system) content is a
    string; assistant content is a string or a list of {"type": text|python|python_output, "text": str} parts;
    an assistant message may carry "weight": 0 or 1 (kept in the output only when 0)."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError("conversation must be a dict with a 'messages' key")
    messages = conversation["messages"]
    if not isinstance(messages, list):
        raise ValueError(f"conversation['messages'] must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("conversation has an empty message list")
    for i, message in enumerate(messages):
        _check_message(i, message)
    offset = 0
    system = None
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            raise ValueError(f"message 0: system content must be a string, got {type(system).__name__}")
        if len(messages) == 1 or messages[1]["role"] != "user":
            got = "nothing" if len(messages) == 1 else f"role {messages[1]['role']!r}"
            raise ValueError(f"message 1: a system message must be followed by a user message, got {got}")
        offset = 1
    out = []
    for i in range(offset, len(messages)):
        message = messages[i]
        role, content = message["role"], message["content"]
        if role == "system":
            raise ValueError(f"message {i}: a system message is only allowed as the first message")
        expected = "user" if (i - offset) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i}: expected role '{expected}' but got '{role}' "
                             "(roles must alternate user/assistant, starting with user after an optional "
                             "system message)")
        if role == "user":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: user content must be a string, got {type(content).__name__}")
            if system is not None and i == offset:
                content = system + "\n\n" + content
        else:
            _check_assistant_content(i, content)
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, str):
            raise ValueError(f"message {i}: weight must be 0 (not trained on) or 1, got {weight!r}")
        if weight == 0 and role != "assistant":
            raise ValueError(f"message {i}: only assistant messages take a weight (got one on a {role} message)")
        out.append({"role": role, "content": content, **({"weight": 0} if weight == 0 else {})})
    return out


def supervision_stats(mask):
    """(supervised, total, ratio) of a 0/1 mask; ratio is 0.0 for an empty mask."""
    total = len(mask)
    supervised = int(sum(1 for m in mask if m))
    return supervised, total, (supervised / total if total else 0.0)


# ---------------------------------------------------------------------------------------------------------
# the tokenizer

class RustBPETokenizer:
    """Byte-level BPE: trained by rustbpe, encoded/decoded by tiktoken. Construct with `train_from_iterator`
    or `from_directory`."""

    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        self._special_ids = dict(enc._special_tokens)  # the encode_special cache: name -> id (a plain dict, no leak)
        self.bos_token_id = self.encode_special(bos_token)

    # ---- construction / persistence

    @classmethod
    def from_ranks(cls, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=None):
        """Build from {token bytes: rank}; specials default to SPECIAL_TOKENS placed after the last rank."""
        import tiktoken

        if special_tokens is None:
            offset = len(mergeable_ranks)
            special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train on an iterator of strings; vocab_size includes the 9 special tokens (they take the last ids)."""
        import rustbpe

        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size_no_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
        if len(mergeable_ranks) < vocab_size_no_special:  # the text ran out of pairs to merge
            warnings.warn(f"training text only supported {len(mergeable_ranks)} of {vocab_size_no_special} "
                          f"regular tokens: vocab size is {len(mergeable_ranks) + len(SPECIAL_TOKENS)}, "
                          f"not {vocab_size}")
        return cls.from_ranks(mergeable_ranks, trainer.get_pattern())

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load what `save` wrote. Only text is parsed (base64 lines and JSON); nothing is executed."""
        meta_path = os.path.join(tokenizer_dir, META_FILE)
        ranks_path = os.path.join(tokenizer_dir, RANKS_FILE)
        for path in (meta_path, ranks_path):
            if not os.path.exists(path):
                raise TokenizerFileMissing(f"tokenizer file {path} not found: "
                                           "train one with `python -m scripts.tok_train`")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerFileError(f"tokenizer file {meta_path} is not valid JSON ({e}); it is corrupt: retrain "
                                     f"with `python -m scripts.tok_train`") from None
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise TokenizerFileError(f"{meta_path}: unsupported tokenizer format_version {version!r}")
        mergeable_ranks = {}
        with open(ranks_path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("ascii")
                except UnicodeDecodeError:
                    raise TokenizerFileError(f"{ranks_path}:{lineno}: not ASCII (a corrupt tokenizer file): "
                                             f"{raw[:40]!r}") from None
                if not line.strip():
                    continue
                try:
                    token_b64, rank = line.split()
                    mergeable_ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
                except ValueError:
                    raise TokenizerFileError(f"{ranks_path}:{lineno}: expected '<base64 token> <rank>', "
                                             f"got {line!r}") from None
        if not mergeable_ranks:
            raise TokenizerFileError(f"tokenizer file {ranks_path} holds no ranks (empty or truncated)")
        try:
            enc_specials = {name: int(i) for name, i in meta["special_tokens"].items()}
            pattern = meta["pattern"]
            import tiktoken

            enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                    special_tokens=enc_specials)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise TokenizerFileError(f"tokenizer files in {tokenizer_dir} do not make a tokenizer "
                                     f"({type(e).__name__}: {e}); retrain with `python -m scripts.tok_train`") from None
        return cls(enc, meta.get("bos_token", "<|bos|>"))

    def save(self, tokenizer_dir):
        """Write the ranks, the metadata and the token byte lengths into tokenizer_dir (atomically per file)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in ranks]
        atomic_write_text(os.path.join(tokenizer_dir, RANKS_FILE), "\n".join(lines) + "\n")
        meta = {
            "format_version": FORMAT_VERSION,
            "pattern": self.enc._pat_str,
            "special_tokens": self._special_ids,
            "bos_token": self.id_to_token(self.bos_token_id),
            "vocab_size": self.get_vocab_size(),
        }
        atomic_write_text(os.path.join(tokenizer_dir, META_FILE), json.dumps(meta, indent=2, ensure_ascii=False))
        save_token_bytes(compute_token_bytes(self), tokenizer_dir)
        return tokenizer_dir

    # ---- basic API

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self._special_ids)

    def get_bos_token_id(self):
        return self.bos_token_id

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def encode_special(self, text):
        """The id of a special token, e.g. encode_special("<|bos|>")."""
        try:
            return self._special_ids[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token (known: {', '.join(self._special_ids)})") from None

    def _as_id(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, (int, np.integer)) and 0 <= int(token) < self.get_vocab_size():
            return int(token)
        raise ValueError(f"prepend/append must be a special token string or a token id, got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists). Specials in the text are
        plain text. prepend/append: a special token's string or any token id, added to every sequence."""
        prepend_id = None if prepend is None else self._as_id(prepend)
        append_id = None if append is None else self._as_id(append)
        if isinstance(text, str):
            batch, single = [text], True
        elif isinstance(text, (list, tuple)):
            batch, single = list(text), False
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        if single:
            ids = [self.enc.encode_ordinary(text)]
        else:
            ids = self.enc.encode_ordinary_batch(batch, num_threads=num_threads)
        for row in ids:
            if prepend_id is not None:
                row.insert(0, prepend_id)
            if append_id is not None:
                row.append(append_id)
        return ids[0] if single else ids

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # ---- chat format

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokenize a conversation -> (ids, mask), two lists of ints of equal length (supervision table in the
        module docstring). A leading system message is merged into the first user message.

        Truncation: ids and mask are cut to the first `max_tokens` tokens (None: no cut), masks unchanged. A cut
        assistant turn keeps its supervised prefix and gets no <|assistant_end|>: every kept target is a true
        next token of the real conversation, and the model is never taught to stop where the reply did not
        stop (which appending a fake <|assistant_end|> would do). Dropping the cut turn instead would waste
        it and make the result shorter than max_tokens, which breaks callers that detect over-long
        conversations by asking for one token more than they keep (len(ids) == max_tokens means "maybe cut").
        Raises ValueError (with the message index) on a malformed conversation."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        messages = normalize_messages(conversation)
        ids, mask = [], []

        def add(tokens, supervised):
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        special = self.encode_special
        add([self.get_bos_token_id()], 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([special("<|user_start|>")], 0)
                add(self.encode(content), 0)
                add([special("<|user_end|>")], 0)
                continue
            add([special("<|assistant_start|>")], 0)
            target = 0 if message.get("weight", 1) == 0 else 1  # weight 0: shown as context, never learned
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), target)
                elif part["type"] == "python":
                    add([special("<|python_start|>")], target)
                    add(self.encode(part["text"]), target)
                    add([special("<|python_end|>")], target)
                else:  # python_output: produced by the tool at inference time, never a target
                    add([special("<|output_start|>")], 0)
                    add(self.encode(part["text"]), 0)
                    add([special("<|output_end|>")], 0)
            add([special("<|assistant_end|>")], target)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the assistant's reply: the conversation (deep-copied, not modified) without
        its final assistant message, ending with <|assistant_start|>. A conversation that ends with a user
        message is rendered whole. Never truncated."""
        normalize_messages(conversation)  # validate the whole conversation first, so errors name its indices
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if messages[-1]["role"] == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize_tokenization(self, ids, mask, with_token_id=False, color=True):
        """Tokens separated by '|', green where supervised (mask 1), red where not (ANSI colours); with
        color=False (a log file, not a terminal) the supervised tokens are [bracketed] instead."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        out = []
        for token_id, m in zip(ids, mask):
            text = self.decode([token_id])
            if with_token_id:
                text += f"({token_id})"
            if color:
                out.append(f"{green if m else red}{text}{reset}")
            else:
                out.append(f"[{text}]" if m else text)
        return "|".join(out)


# ---------------------------------------------------------------------------------------------------------
# token byte lengths (for bits-per-byte) and the default tokenizer location

def compute_token_bytes(tokenizer):
    """int32 tensor (vocab_size,): number of raw bytes of each token (from tiktoken's bytes, not a str round
    trip, so partial UTF-8 tokens count their true length); 0 for special tokens."""
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    lengths = [0 if i in specials else len(tokenizer.enc.decode_single_token_bytes(i))
               for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(lengths, dtype=torch.int32)


def save_token_bytes(token_bytes, tokenizer_dir):
    """Write the token byte lengths as a .npy (no pickle)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(token_bytes, dtype=np.int32), allow_pickle=False)
    path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILE)
    atomic_write_bytes(path, buf.getvalue())
    return path


def get_tokenizer():
    """The tokenizer trained by scripts/tok_train.py, from <base_dir>/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """The int32 tensor of per-token byte lengths saved next to the tokenizer (0 for specials)."""
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise TokenizerFileMissing(f"{path} not found: train a tokenizer with `python -m scripts.tok_train`")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TokenizerFileError(f"tokenizer file {path} is not a valid .npy array ({e}); it is corrupt: retrain "
                                 f"with `python -m scripts.tok_train`") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise TokenizerFileError(f"tokenizer file {path} holds a {array.dtype} array of shape {array.shape}, "
                                 f"expected a 1-D integer array of token byte lengths")
    return torch.from_numpy(array.astype(np.int32)).to(device)
