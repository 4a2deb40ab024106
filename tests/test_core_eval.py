"""
Tests for nanochat/core_eval.py: a hand-made DCLM-style bundle (one task of each type) scored with a fake
"next byte = this byte + 1" model and a byte tokenizer, so every answer is known in advance; prompt
rendering with few-shot examples; continuation spans; left truncation.
Run: .venv/bin/python -m pytest tests/test_core_eval.py
"""

import json
import os

import pytest
import torch

from nanochat.common import UserError
from nanochat.core_eval import (centered_accuracy, continuation_spans, evaluate_core, find_eval_bundle,
                                render_prompts, truncate_left)

VOCAB = 257
BOS = 256


class ByteTokenizer:
    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None):
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))


class NextByteModel(torch.nn.Module):
    """Predicts that the byte after b is b + 1 (logit 10 there, 0 elsewhere)."""

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, VOCAB)
        logits.scatter_(2, ((ids + 1) % VOCAB).unsqueeze(-1), 10.0)
        return logits


def _write_bundle(root):
    bundle = root / "eval_bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: mc\n  dataset_uri: mc.jsonl\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
        "  continuation_delimiter: ''\n"
        "- label: lm\n  dataset_uri: lm.jsonl\n  num_fewshot: [1]\n  icl_task_type: language_modeling\n"
        "  continuation_delimiter: ''\n"
        "- label: schema\n  dataset_uri: schema.jsonl\n  num_fewshot: [0]\n  icl_task_type: schema\n"
        "  continuation_delimiter: ''\n")
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\nlm,0\nschema,50\n")
    rows = {
        "mc.jsonl": [{"query": "xa", "choices": ["bcd", "zzz"], "gold": 0},   # right
                     {"query": "xa", "choices": ["qrs", "bcd"], "gold": 1},   # right
                     {"query": "xa", "choices": ["bcd", "efg"], "gold": 1}],  # wrong: the model likes bcd
        "lm.jsonl": [{"context": "ab", "continuation": "cd"},                 # right
                     {"context": "ab", "continuation": "ce"}],                # wrong
        "schema.jsonl": [{"context_options": ["xa", "xq"], "continuation": "bc", "gold": 0}],  # right
    }
    for name, items in rows.items():
        (bundle / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(bundle)


def test_find_eval_bundle(tmp_path):
    assert find_eval_bundle(str(tmp_path)) is None
    _write_bundle(tmp_path)
    assert find_eval_bundle(str(tmp_path)) == os.path.join(str(tmp_path), "eval_bundle")


def test_core_on_known_answers(tmp_path):
    bundle = _write_bundle(tmp_path)
    out = evaluate_core(NextByteModel(), ByteTokenizer(), "cpu", bundle)
    assert out["results"] == pytest.approx({"mc": 2 / 3, "lm": 0.5, "schema": 1.0})
    expected_centered = {"mc": (2 / 3 - 0.25) / 0.75, "lm": 0.5, "schema": 1.0}
    assert out["centered_results"] == pytest.approx(expected_centered)
    assert out["core_metric"] == pytest.approx(sum(expected_centered.values()) / 3)
    limited = evaluate_core(NextByteModel(), ByteTokenizer(), "cpu", bundle, max_per_task=1)
    assert limited["results"]["mc"] == 1.0 and limited["results"]["lm"] == 1.0


def test_render_and_spans():
    row = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
    shot = {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0}
    texts, context = render_prompts("multiple_choice", row, [shot], " A: ")
    assert texts == ["Q: 2+2? A: 4\n\nQ: 1+1? A: 2", "Q: 2+2? A: 4\n\nQ: 1+1? A: 3"] and context is None
    tok = ByteTokenizer()
    ids = [tok.encode(t, prepend=BOS) for t in texts]
    assert continuation_spans("multiple_choice", ids) == [(len(ids[0]) - 1, len(ids[0]))] * 2
    schema = [tok.encode("aa b", prepend=BOS), tok.encode("c b", prepend=BOS)]
    assert continuation_spans("schema", schema) == [(3, 5), (2, 4)]  # common suffix " b"
    texts, context = render_prompts("language_modeling", {"context": " ab ", "continuation": "cd"}, [], "")
    assert texts == ["abcd"] and context == "ab"
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0


def test_truncate_left():
    tokens, spans = truncate_left([[9, 1, 2, 3, 4, 5]], [(4, 6)], 4)
    assert tokens == [[2, 3, 4, 5]] and spans == [(2, 4)]
    with pytest.raises(UserError, match="does not fit the model's context"):
        truncate_left([[9, 1, 2, 3, 4, 5]], [(2, 6)], 4)
