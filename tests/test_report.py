"""
Tests for nanochat/report.py: section files (markdown + the JSON the summary is built from), the summary
table from fake sections, old sections without JSON, the wall-clock time, the loss-curve PNGs, the header,
DummyReport on non-zero ranks, and the CLI.
Run: .venv/bin/python -m pytest tests/test_report.py
"""

import json
import os
import subprocess
import sys

from nanochat.report import (DummyReport, Report, format_duration, get_report, metric_cell, metric_name_key,
                             section_record, slugify, summary_table, task_metrics)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(report):
    report.reset()
    report.log("Base model training", [{"depth": 2, "run": "dummy"}, {"Minimum validation bpb": 2.5, "CORE metric": 0.1234}])
    report.log("Base model evaluation", [{"CORE": 0.2}])  # BASE column: evaluation wins over training
    report.log("Chat evaluation mid", [{"source": "mid"}, {"ARC-Easy": 0.25, "MMLU": 0.3, "ChatCORE metric": 0.01}])
    report.log("Chat SFT", ["some free text", {"val_loss": 1.5, "gsm8k_acc": 0.5}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.375, "ARC-Challenge": 0.125, "GSM8K": 0.0625}])
    report.log_series("Base model training", "train_loss", [0, 1, 2], [5.0, 4.0, 3.5])
    report.log_series("Base model training", "val_bpb", [0, 2], [3.0, 2.5])
    report.log_series("Chat SFT", "train_loss", [0, 1], [2.0, 1.8])
    report.log_series("Chat SFT", "val_loss", [1], [1.9])


def _table_row(text, metric):
    for line in text.splitlines():
        if line.startswith(f"| {metric} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row for {metric}")


def test_metric_name_matching():
    assert metric_name_key("ARC-Easy") == metric_name_key("arc_easy_acc") == "arceasy"
    assert metric_name_key("ChatCORE metric") == "chatcore"
    assert metric_name_key("CORE metric") == "core" != metric_name_key("ChatCORE")
    record = section_record("s", [{"MMLU": 0.5, "x": "y", "GSM8K": "0.5"}], "t")
    assert metric_cell(record, "MMLU") == (0.5, None)
    assert metric_cell(record, "GSM8K") == (None, None)  # text is never parsed back into a number
    record = section_record("s", [{"MMLU": 0.5}], "t", metrics={"mmlu_acc": {"value": 0.25, "note": "-x 8"}})
    assert metric_cell(record, "MMLU") == (0.25, "-x 8")  # the explicit metric wins
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert format_duration(3723.4) == "1h02m03s"


def test_section_markdown_and_data(tmp_path):
    report = Report(str(tmp_path / "report"))
    path = report.log("Base model loss", [{"train bpb": 1.23456, "note": "x: y", "shape": (2, 3)}, "free text"],
                      duration_s=12.5)
    with open(path) as f:
        text = f.read()
    assert text.startswith("## Base model loss\n") and "- train bpb: 1.2346" in text and "free text" in text
    with open(tmp_path / "report" / "base-model-loss.json") as f:
        record = json.load(f)
    assert record["section"] == "Base model loss" and record["duration_s"] == 12.5 and record["timestamp"]
    assert record["values"] == {"train bpb": 1.23456, "note": "x: y", "shape": [2, 3]}  # full precision kept
    report.log("Base model loss", [{"train bpb": 2.0}])  # logging again replaces the section
    with open(path) as f:
        assert "1.2346" not in f.read()
    with open(tmp_path / "report" / "base-model-loss.json") as f:
        assert json.load(f)["values"] == {"train bpb": 2.0}


def test_old_sections_without_json_stay_readable_but_out_of_the_summary(tmp_path):
    report = Report(str(tmp_path / "report"))
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.375}], duration_s=30.0)
    os.makedirs(tmp_path / "report", exist_ok=True)
    (tmp_path / "report" / "chat-evaluation-mid.md").write_text(
        "## Chat evaluation mid\ntimestamp: 2025-01-01 00:00:00\nduration: 99.0s\n\n- ARC-Easy: 0.2500\n")
    with open(report.generate()) as f:
        text = f.read()
    assert _table_row(text, "ARC-Easy") == ["-", "-", "0.3750", "-"]  # the old section's 0.25 is not parsed back
    assert "`chat-evaluation-mid.md`" in text and "not in the summary table" in text
    assert "- ARC-Easy: 0.2500" in text  # ... but its markdown is in the report, in pipeline order
    assert text.index("## Chat evaluation mid") < text.index("## Chat evaluation sft")
    assert "Total wall clock time: 0h00m30s" in text  # its duration line is not read either


def test_summary_table_missing_is_dash():
    table = summary_table({"Chat evaluation sft": section_record("Chat evaluation sft", [{"GSM8K": 0.5}], "t")})
    assert table.splitlines()[0] == "| Metric | BASE | MID | SFT | RL |"
    assert _table_row(table, "GSM8K") == ["-", "-", "0.5000", "-"]
    assert _table_row(table, "CORE") == ["-", "-", "-", "-"]


def test_summary_table_spelling_bee_base_to_rl():
    def record(name, metrics, note=None):
        return section_record(name, [], "t", metrics={k: {"value": v, "note": note} for k, v in metrics.items()})
    table = summary_table({"Chat evaluation base": record("Chat evaluation base", {"SpellingBee": 0.0}),
                           "Chat evaluation sft": record("Chat evaluation sft", {"SpellingBee": 0.25}),
                           "Chat evaluation rl": record("Chat evaluation rl", {"SpellingBee": 0.5}, "-x 64"),
                           "Chat RL": section_record("Chat RL", [{"Final pass@1": 0.4}], "t")})
    assert _table_row(table, "SpellingBee") == ["0.0000", "-", "0.2500", "0.5000 (-x 64)"]


def test_generate_table_plots_and_sections(tmp_path):
    report = Report(str(tmp_path / "report"))
    _fake_run(report)
    path = report.generate()
    with open(path) as f:
        text = f.read()
    # header
    assert "Git commit:" in text and "PyTorch:" in text and "Code size:" in text
    # summary table parsed from the sections
    assert _table_row(text, "CORE") == ["0.2000", "-", "-", "-"]
    assert _table_row(text, "ARC-Easy") == ["-", "0.2500", "0.3750", "-"]
    assert _table_row(text, "ARC-Challenge") == ["-", "-", "0.1250", "-"]
    assert _table_row(text, "MMLU") == ["-", "0.3000", "-", "-"]
    assert _table_row(text, "GSM8K") == ["-", "-", "0.0625", "-"]  # chat eval beats the SFT section's gsm8k_acc
    assert _table_row(text, "HumanEval") == ["-", "-", "-", "-"]
    assert _table_row(text, "ChatCORE") == ["-", "0.0100", "-", "-"]
    assert "Total wall clock time: unknown (no stage recorded its time)" in text  # no durations were logged
    # sections in pipeline order
    order = ["## Base model training", "## Base model evaluation", "## Chat evaluation mid", "## Chat SFT",
             "## Chat evaluation sft"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    # plots: linked and real PNGs
    for slug in ("base-model-training", "chat-sft"):
        rel = f"plots/{slug}.png"
        assert f"]({rel})" in text
        with open(tmp_path / "report" / rel, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert not os.path.exists(tmp_path / "report" / "plots" / "chat-evaluation-sft.png")


def test_reset_clears_sections(tmp_path):
    report = Report(str(tmp_path / "report"))
    report.log("Chat SFT", [{"a": 1}])
    report.log_series("Chat SFT", "train_loss", [0], [1.0])
    report.reset()
    assert sorted(os.listdir(tmp_path / "report")) == ["header.md"]


def test_get_report_rank(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    report = get_report()
    assert isinstance(report, Report) and report.report_dir == os.path.join(str(tmp_path), "report")
    dummy = get_report(rank=1)
    assert isinstance(dummy, DummyReport)
    assert dummy.log("x", [{"a": 1}]) is None and dummy.generate() is None
    monkeypatch.setenv("RANK", "3")
    assert isinstance(get_report(), DummyReport)
    assert not os.path.exists(tmp_path / "report")


def test_cli_reset_generate(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    for command in ("reset", "generate"):
        out = subprocess.run([sys.executable, "-m", "nanochat.report", command], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert "| Metric | BASE | MID | SFT | RL |" in out.stdout
    assert os.path.exists(tmp_path / "report" / "report.md")
    out = subprocess.run([sys.executable, "-m", "nanochat.report", "timings", "tok_train=10", "base_train=50.5"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "report" / "stage-timings.json") as f:
        assert json.load(f)["values"] == {"tok_train (s)": 10, "base_train (s)": 50.5, "total (s)": 60.5}


def test_summary_columns_never_mix_models():
    def record(values, metrics):
        return {"values": values, "metrics": {k: {"value": v, "note": None} for k, v in metrics.items()}}
    # chat_eval keeps only this checkpoint's results as metrics (task_metrics drops the older model's GSM8K)
    results = {"ARC-Easy": {"value": 0.5, "max_problems": None, "checkpoint": "chatsft_checkpoints/d2-ft step 8"},
               "GSM8K": {"value": 0.1, "max_problems": 20, "checkpoint": "chatsft_checkpoints/d2 step 4"}}
    kept = task_metrics(results, "chatsft_checkpoints/d2-ft step 8")
    assert set(kept) == {"ARC-Easy"}
    evaluation = {"values": {"checkpoint": "chatsft_checkpoints/d2-ft step 8"}, "metrics": kept}
    training = record({}, {"ARC-Easy": 0.2, "GSM8K": 0.3, "MMLU": 0.4})  # chat_sft's own metrics, another model
    table = summary_table({"Chat evaluation sft": evaluation, "Chat SFT": training})
    assert "| Model | - | - | chatsft_checkpoints/d2-ft step 8 |" in table
    assert "| ARC-Easy | - | - | 0.5000 |" in table
    assert "| GSM8K | - | - | - |" in table  # the older model's result is not shown as this one's
    assert "| MMLU | - | - | - |" in table  # nor the training section's, which is another run
    assert "| MMLU | - | - | 0.4000 |" in summary_table({"Chat SFT": training})
