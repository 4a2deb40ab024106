"""
The data check of scripts/chat_data.py and chat_sft: what is in each training source, and whether it holds the
test questions it will be judged on.

Per source (data_check_rows): detected row shape, conversations, assistant turns, token lengths, supervised share
(with a warning outside SUPERVISED_RANGE), truncated / dropped at max_seq_len (sft_report.data_summary, the
figures of chat_sft's preview), empty or whitespace-only assistant messages, exact duplicates within the source
and shared with other sources (tasks.common.conversation_hash: whitespace-normalised conversation).

Contamination (the GPT-3 paper's rule, appendix C): a training conversation is contaminated by an evaluation
task when they share a 13-word n-gram with one of its test items (question and reference answer), words
lower-cased with punctuation stripped (`words`); a test question shorter than 13 words is matched whole (its
words, contiguous, anywhere in the conversation). The multiple-choice prompt template
(tasks.common.render_mc) is stripped on both sides first, so the template itself never matches. n-grams are
64-bit polynomial hashes of stable per-word hashes (blake2b), computed for every window at once with numpy
(`window_hashes`); a collision can only add a false match, printed with its examples for a human to judge.
The index of an evaluation task's test split is built once and cached in <base_dir>/data_check/, keyed by a
hash of the items' words (so a changed test split gets a new index).

Tests: tests/test_data_check.py. Speed: bench/data_check.py.
"""

import hashlib
import os
import re

import numpy as np

NGRAM = 13  # words; GPT-3's contamination n-gram
INDEX_VERSION = 2  # bump when the word or hash rules change: old cache files are then ignored
SUPERVISED_RANGE = (0.01, 0.75)  # the guide's mixture spans 1.6% (ARC: one-letter answers) to 50% (GSM8K), README
DEFAULT_EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
DECONTAMINATE = ("off", "report", "drop", "fail")
_P = np.uint64(0x100000001B3)  # the 64-bit FNV prime, as the rolling hash multiplier
_MC_HEAD = re.compile(r"^Multiple Choice question: ", re.M)
_MC_CHOICE = re.compile(r"^(- .*)=[A-Z]$", re.M)
_MC_TAIL = "Respond only with the letter of the correct answer."
_WORD = re.compile(r"[^\W_]+")


# ----------------------------------------------------------------------------------------------------------
# Words and n-gram hashes


def strip_templates(text):
    """A user message without the multiple-choice template (render_mc): the question and the choices remain."""
    if "Multiple Choice question: " not in text:
        return text
    return _MC_CHOICE.sub(r"\1", _MC_HEAD.sub("", text)).replace(_MC_TAIL, "")


def words(text):
    """Lower-cased words, punctuation and underscores dropped: 'Hello, World_2!' -> ['hello', 'world', '2']."""
    return _WORD.findall(strip_templates(text).lower())


def conversation_words(conversation):
    """The words of every message of a conversation, in order (assistant parts included)."""
    texts = []
    for message in conversation["messages"]:
        content = message["content"]
        texts.extend([content] if isinstance(content, str) else [part["text"] for part in content])
    return words("\n".join(texts))


class WordIds(dict):
    """Stable 64-bit ids of words (blake2b, the same in every process), memoised: ids(word_list) -> list of ints."""

    def __missing__(self, word):
        value = self[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return value

    def __call__(self, word_list):
        return list(map(self.__getitem__, word_list))


def sequence_hash(ids):
    """window_hashes' hash of one whole sequence of word ids (pure Python, the same arithmetic)."""
    h = 0
    for i in ids:
        h = (h * int(_P) + i) & 0xFFFFFFFFFFFFFFFF
    return h


def window_hashes(id_lists, lengths):
    """Hashes of the contiguous word windows of several documents at once. id_lists: one list of word ids per
    document; lengths: the window lengths wanted. Returns {k: (hashes, docs)}: the uint64 hash of every window of k
    words lying inside one document, and that document's index. hash(w_1..w_k) = sum w_j * P^(k-j) mod 2^64."""
    sizes = np.fromiter((len(x) for x in id_lists), dtype=np.int64, count=len(id_lists))
    ids = np.fromiter((i for x in id_lists for i in x), dtype=np.uint64, count=int(sizes.sum()))
    docs = np.repeat(np.arange(len(id_lists), dtype=np.int64), sizes)
    ends = np.repeat(np.cumsum(sizes), sizes)  # end (exclusive) of each position's document
    start = np.arange(len(ids), dtype=np.int64)
    out, h = {}, ids.copy()
    with np.errstate(over="ignore"):
        for k in range(1, max(lengths, default=0) + 1):
            if k > 1:
                h = h[:-1] * _P + ids[k - 1:]  # h[i] = hash(ids[i:i+k])
            if k in lengths:
                inside = start[:len(h)] + k <= ends[:len(h)]
                out[k] = (h[inside], docs[:len(h)][inside])
    return out


# ----------------------------------------------------------------------------------------------------------
# The index of an evaluation set


class EvalIndex:
    """The n-grams of one evaluation set: `grams[k]` = (sorted hashes, item of each hash) for k = NGRAM (every
    13-gram of every item) and for each shorter question length k (the whole question); `items`: each item's
    first words, for the examples."""

    def __init__(self, name, grams, items):
        self.name, self.grams, self.items = name, grams, items

    @classmethod
    def build(cls, name, conversations, word_ids, item_words):
        """item_words: conversation_words of each conversation (already computed for the cache key)."""
        id_lists = [word_ids(w) for w in item_words]
        hashes, items = window_hashes(id_lists, {NGRAM})[NGRAM]
        order = np.argsort(hashes, kind="stable")
        grams = {NGRAM: (hashes[order], items[order])}
        short = {}  # an item whose question (its user messages) is shorter than NGRAM words: that question whole
        for i, conversation in enumerate(conversations):
            question = word_ids(conversation_words({"messages": [m for m in conversation["messages"]
                                                                 if m["role"] == "user"]}))
            if 0 < len(question) < NGRAM:
                short.setdefault(len(question), []).append((sequence_hash(question), i))
        for k, pairs in short.items():
            pairs.sort()
            grams[k] = (np.array([h for h, _ in pairs], dtype=np.uint64),
                        np.array([i for _, i in pairs], dtype=np.int64))
        return cls(name, grams, [" ".join(w[:30]) for w in item_words])

    def save(self, path):
        arrays = {f"h{k}": h for k, (h, _) in self.grams.items()} | {f"i{k}": i for k, (_, i) in self.grams.items()}
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(tmp, items=np.array(self.items, dtype=str), **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one

    @classmethod
    def load(cls, name, path):
        with np.load(path) as f:
            ks = sorted(int(key[1:]) for key in f.files if key.startswith("h"))
            return cls(name, {k: (f[f"h{k}"], f[f"i{k}"]) for k in ks}, [str(s) for s in f["items"]])

    def match(self, windows):
        """{training document: item of this set it shares an n-gram with} from window_hashes of the training
        documents (computed for at least the lengths of self.grams)."""
        found = {}
        for k, (hashes, items) in self.grams.items():
            doc_hashes, docs = windows[k]
            if len(hashes) == 0 or len(doc_hashes) == 0:
                continue
            pos = np.searchsorted(hashes, doc_hashes).clip(max=len(hashes) - 1)
            hit = hashes[pos] == doc_hashes
            for doc, item in zip(docs[hit].tolist(), items[pos[hit]].tolist()):
                found.setdefault(doc, item)
        return found


def eval_index(name, conversations, cache_dir, word_ids):
    """The EvalIndex of an evaluation set, from <cache_dir>/<name>-<key>.npz when there (key: a hash of every
    item's words, NGRAM and INDEX_VERSION), else built and saved there (cache_dir None: not cached)."""
    digest = hashlib.blake2b(f"{INDEX_VERSION}:{NGRAM}".encode(), digest_size=12)
    item_words = [conversation_words(conversation) for conversation in conversations]
    for item in item_words:
        digest.update(" ".join(item).encode("utf-8") + b"\x00")
    path = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest.hexdigest()}.npz") \
        if cache_dir else None
    if path and os.path.exists(path):
        try:
            return EvalIndex.load(name, path)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is rebuilt
    index = EvalIndex.build(name, conversations, word_ids, item_words)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        index.save(path)
    return index


def contamination(sources, indexes, word_ids, max_examples=3, hash_lists=None):
    """sources: [(name, list of conversations)]; indexes: [EvalIndex]; hash_lists: the conversations'
    conversation_hash per source, if already computed. Returns {source name: {eval name:
    {"count": conversations flagged, "flagged": sorted indices, "examples": [(index, test item words)]}}}.
    Each distinct conversation is hashed once (a source listed twice costs little), and a bit table of every
    index's hashes sends only the few candidate windows to the exact (binary search) match."""
    from tasks.common import conversation_hash

    doc_of, distinct, doc_ids = {}, [], []  # conversation hash -> document; each source's conversations -> documents
    for s, (_, conversations) in enumerate(sources):
        ids = []
        for j, conversation in enumerate(conversations):
            key = hash_lists[s][j] if hash_lists is not None else conversation_hash(conversation)
            if key not in doc_of:
                doc_of[key] = len(distinct)
                distinct.append(conversation)
            ids.append(doc_of[key])
        doc_ids.append(np.asarray(ids, dtype=np.int64))
    windows = window_hashes([word_ids(conversation_words(c)) for c in distinct],
                            {k for index in indexes for k in index.grams})
    bits = np.zeros(1 << 25, dtype=bool)
    mask = np.uint64((1 << 25) - 1)
    for index in indexes:
        for hashes, _ in index.grams.values():
            bits[(hashes & mask).astype(np.int64)] = True
    for k, (hashes, docs) in windows.items():
        candidate = bits[(hashes & mask).astype(np.int64)]
        windows[k] = (hashes[candidate], docs[candidate])
    out = {name: {} for name, _ in sources}
    for index in indexes:
        found = index.match(windows)  # document -> test item
        for (name, _), docs in zip(sources, doc_ids):
            flagged = [i for i, d in enumerate(docs.tolist()) if d in found]
            out[name][index.name] = {"count": len(flagged), "flagged": flagged,
                                     "examples": [(i, index.items[found[int(docs[i])]])
                                                  for i in flagged[:max_examples]]}
    return out


# ----------------------------------------------------------------------------------------------------------
# Per-source figures


def source_figures(conversations):
    """Assistant turns (mean), empty or whitespace-only assistant messages, and the conversation hashes."""
    from tasks.common import conversation_hash

    turns = empty = 0
    hashes = []
    for conversation in conversations:
        for message in conversation["messages"]:
            if message["role"] != "assistant":
                continue
            turns += 1
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            text = "".join(p["text"] for p in parts if p["type"] != "python_output")  # what the assistant wrote
            empty += not text.strip()
        hashes.append(conversation_hash(conversation))
    return {"turns_mean": turns / max(len(conversations), 1), "empty_assistant": empty}, hashes


def duplicate_counts(hash_lists):
    """Per source: (conversations repeating an earlier one of the same source, distinct conversations also found
    in another source)."""
    owners = {}
    for s, hashes in enumerate(hash_lists):
        for h in set(hashes):
            owners.setdefault(h, set()).add(s)
    return [(len(hashes) - len(set(hashes)), sum(1 for h in set(hashes) if len(owners[h]) > 1))
            for hashes in hash_lists]


def supervised_warning(ratio, low=SUPERVISED_RANGE[0], high=SUPERVISED_RANGE[1]):
    """A warning when a source's supervised share is outside the typical range, else ''."""
    if ratio < low:
        return (f"supervised {ratio:.1%} < {low:.0%}: almost nothing is learned from it (weight 0 everywhere, or "
                f"long prompts with short answers?)")
    if ratio > high:
        return f"supervised {ratio:.1%} > {high:.0%}: prompts nearly empty (roles swapped, or no user turns?)"
    return ""


def data_check_rows(sources, summarize=None):
    """sources: [(name, shape, list of conversations)]; summarize: conversations -> sft_report.data_summary dict
    (None: no token figures, e.g. without a tokenizer). Returns (one dict per source, the conversation hashes of
    each source)."""
    rows, hash_lists = [], []
    for name, shape, conversations in sources:
        figures, hashes = source_figures(conversations)
        row = {"source": name, "shape": shape, "conversations": len(conversations), **figures}
        if summarize is not None:
            row.update(summarize(conversations))
            row["warning"] = supervised_warning(row["supervised_ratio"])
        rows.append(row)
        hash_lists.append(hashes)
    for row, (within, across) in zip(rows, duplicate_counts(hash_lists)):
        row["duplicates_within"], row["duplicates_across"] = within, across
    return rows, hash_lists


def format_data_check(rows, found=None, skipped=()):
    """The table lines of a data check (rows: data_check_rows; found: contamination's result or None; skipped:
    evaluation sets not checked)."""
    lines = []
    width = max(len(r["source"]) for r in rows)
    for r in rows:
        line = (f"{r['source']:<{width}} | {r['shape'] or '-':<17} | {r['conversations']:>7,} conv | "
                f"turns {r['turns_mean']:4.1f}")
        if "tokens_mean" in r:
            line += (f" | tokens mean {r['tokens_mean']:6.1f} p50 {r['tokens_p50']:5.0f} p95 {r['tokens_p95']:5.0f} "
                     f"max {r['tokens_max']:6,} | supervised {r['supervised_ratio']:5.1%} | truncated "
                     f"{r['truncated']:,} dropped {r['dropped']:,}")
        line += (f" | empty replies {r['empty_assistant']:,} | duplicates {r['duplicates_within']:,} within, "
                 f"{r['duplicates_across']:,} shared")
        lines.append(line)
        if r.get("warning"):
            lines.append(f"{'':<{width}}   warning: {r['warning']}")
    if skipped:
        lines.append(f"Not checked for contamination (no data): {'; '.join(skipped)}")
    if found and next(iter(found.values())):
        evals = list(next(iter(found.values())))
        lines.append("")
        lines.append(f"Contamination: training conversations sharing a {NGRAM}-word n-gram with each test set "
                     f"(shorter test items matched whole)")
        lines.append(f"{'source':<{width}} | " + " | ".join(f"{e:>13}" for e in evals))
        for r in rows:
            counts = found[r["source"]]
            lines.append(f"{r['source']:<{width}} | " + " | ".join(f"{counts[e]['count']:>13,}" for e in evals))
        for r in rows:
            for e in evals:
                for i, item in found[r["source"]][e]["examples"]:
                    lines.append(f"  {r['source']} #{i} ~ {e}: \"{item[:100]}\"")
    return lines


def drop_flagged(tasks, found):
    """Training tasks without their contaminated conversations: tasks = [(name, task)], found: contamination's
    result for the same names. Returns ([(name, TaskSubset)], number dropped) - TaskSubset keeps every other
    conversation in its order."""
    from tasks.common import TaskSubset

    out, dropped = [], 0
    for name, task in tasks:
        flagged = set().union(*(set(v["flagged"]) for v in found[name].values())) if found[name] else set()
        dropped += len(flagged)
        out.append((name, TaskSubset(task, [i for i in range(len(task)) if i not in flagged])))
    return out, dropped


def eval_conversations(task_names, skipped=None):
    """{name: list of conversations} of chat_eval's test sets (tasks.mixture.EVAL_TASKS names) or any mixture
    spec (e.g. "ChitChat:test", a path). With a `skipped` list, a set whose data cannot be had (offline, no
    mirror) is appended to it as "name (reason)" instead of raising."""
    from tasks.common import DatasetNotFoundError
    from tasks.mixture import EVAL_TASKS, build_task, parse_task_spec

    out = {}
    for name in task_names:
        try:
            task = build_task(parse_task_spec(EVAL_TASKS.get(name, name)))
        except DatasetNotFoundError as e:
            if skipped is None:
                raise
            skipped.append(f"{name} ({str(e).split('. ')[0]})")
            continue
        out[name] = [task[i] for i in range(len(task))]
    return out


def cache_dir_default(base_dir):
    """Where eval indexes are cached: $NANOCHAT_DATA_CHECK_DIR, else <base_dir>/data_check."""
    return os.environ.get("NANOCHAT_DATA_CHECK_DIR") or os.path.join(base_dir, "data_check")


def source_shape(task):
    """What a source holds, for the table: CustomJSON's detected row shape, else the task's class name (a subset,
    e.g. what a held-out share left, is named by the task it is taken from)."""
    while hasattr(task, "task"):  # TaskSubset
        task = task.task
    return getattr(task, "shape", None) or type(task).__name__


def check_sources(parts, eval_names, summarize=None, cache_dir=None, max_examples=3):
    """The whole data check of a training mixture. parts: [(name, task, ...)] (build_mixtures' parts of a key);
    eval_names: evaluation sets to check against (empty: no contamination check). Returns (rows, found,
    skipped): data_check_rows, contamination (None without eval_names) keyed by the names made unique, and the
    evaluation sets that could not be loaded ("name (reason)")."""
    names = []
    for name, *_ in parts:
        names.append(name if name not in names else f"{name} ({sum(n.startswith(name) for n in names) + 1})")
    sources = [(name, source_shape(task), [task[i] for i in range(len(task))])
               for name, (_, task, *_) in zip(names, parts)]
    rows, hash_lists = data_check_rows(sources, summarize)
    found, skipped = None, []
    if eval_names:
        word_ids = WordIds()
        indexes = [eval_index(name, conversations, cache_dir, word_ids)
                   for name, conversations in eval_conversations(eval_names, skipped).items()]
        found = contamination([(name, conversations) for name, _, conversations in sources], indexes, word_ids,
                              max_examples, hash_lists)
    return rows, found, skipped


def decontaminated(mixture, parts, found):
    """The training mixture and its parts without the conversations `found` flags (check_sources' names are
    matched to parts by position). Returns (mixture, parts, number of conversations dropped); the mixture keeps
    its tasks' repeats and weights."""
    from tasks.common import TaskMixture

    kept, dropped = drop_flagged([(name, task) for name, (_, task, *_) in zip(found, parts)], found)
    replace = {id(task): subset for (_, task, *_), (_, subset) in zip(parts, kept)}
    new_parts = [(spec, replace[id(task)], round(entries * len(replace[id(task)]) / max(len(task), 1)), *rest)
                 for spec, task, entries, *rest in parts]  # entries scaled: repeats and weights are per conversation
    new_mixture = TaskMixture([replace.get(id(t), t) for t in mixture.tasks], weights=mixture.weights)
    return new_mixture, new_parts, dropped


def apply_decontamination(mode, found, mixture, parts):
    """chat_sft's `decontaminate` after check_sources: "report" changes nothing, "fail" raises a UserError when
    any training conversation is contaminated, "drop" removes them (decontaminated). Returns (mixture, parts,
    conversations dropped, a line for the log)."""
    from nanochat.common import UserError

    per_source = {name: len(set().union(*(set(v["flagged"]) for v in evals.values()))) if evals else 0
                  for name, evals in (found or {}).items()}
    flagged = sum(per_source.values())
    if flagged == 0:
        return mixture, parts, 0, "Contamination check: no training conversation shares an n-gram with the test sets"
    worst = ", ".join(f"{name} {n}" for name, n in per_source.items() if n)
    if mode == "fail":
        raise UserError(f"decontaminate = fail: {flagged} training conversations share a {NGRAM}-word n-gram with "
                        f"evaluation test sets ({worst}; table above); remove them from the data, or set "
                        f"decontaminate = drop")
    if mode == "drop":
        mixture, parts, dropped = decontaminated(mixture, parts, found)
        return mixture, parts, dropped, (f"decontaminate = drop: {dropped} contaminated training conversations "
                                         f"removed ({worst}); {len(mixture):,} mixture entries left")
    return mixture, parts, 0, (f"Contamination: {flagged} training conversations share a {NGRAM}-word n-gram with "
                               f"evaluation test sets ({worst}); decontaminate = drop removes them, fail stops")


def check_training_data(mode, eval_names, mixture, parts, cache_dir, master=True, log=print):
    """chat_sft's data check before training, one call: check_sources on the training parts, its table logged,
    then apply_decontamination(mode) (its line logged; "fail" raises after the table). Under "report" only the
    master rank checks (nothing changes); under drop / fail every rank does, so all drop or stop alike. Returns
    (mixture, parts, conversations dropped)."""
    if mode == "off" or (mode == "report" and not master):
        return mixture, parts, 0
    rows, found, skipped = check_sources(parts, eval_names, cache_dir=cache_dir)
    log("\n".join(format_data_check(rows, found, skipped)))
    mixture, parts, dropped, line = apply_decontamination(mode, found, mixture, parts)
    log(line)
    return mixture, parts, dropped
