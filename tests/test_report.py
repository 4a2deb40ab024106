"""
Tests for nanochat/report.py: section files, the summary table parsed from fake sections, the wall-clock
time, the loss-curve PNGs, the header, DummyReport on non-zero ranks, and the CLI.
Run: .venv/bin/python -m pytest tests/test_report.py
"""

import os
import subprocess
import sys

from nanochat.report import (DummyReport, Report, find_metric, format_duration, get_report, metric_name_key,
                             parse_section, slugify, summary_table)

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
    assert find_metric({"MMLU": "0.5", "x": "y"}, "MMLU") == 0.5
    assert find_metric({"MMLU": "n/a"}, "MMLU") is None
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert format_duration(3723.4) == "1h02m03s"


def test_section_roundtrip(tmp_path):
    report = Report(str(tmp_path / "report"))
    path = report.log("Base model loss", [{"train bpb": 1.23456, "note": "x: y"}, "free text"])
    with open(path) as f:
        text = f.read()
    assert text.startswith("## Base model loss\n")
    stamp, values = parse_section(text)
    assert stamp is not None
    assert values == {"train bpb": "1.2346", "note": "x: y"}
    assert "free text" in text
    report.log("Base model loss", [{"train bpb": 2.0}])  # logging again replaces the section
    with open(path) as f:
        assert "1.2346" not in f.read()


def test_summary_table_missing_is_dash():
    table = summary_table({"Chat evaluation sft": {"GSM8K": "0.5"}})
    assert table.splitlines()[0] == "| Metric | BASE | MID | SFT | RL |"
    assert _table_row(table, "GSM8K") == ["-", "-", "0.5000", "-"]
    assert _table_row(table, "CORE") == ["-", "-", "-", "-"]


def test_summary_table_spelling_bee_base_to_rl():
    table = summary_table({"Chat evaluation base": {"SpellingBee": "0.0"},
                           "Chat evaluation sft": {"SpellingBee": "0.25"},
                           "Chat evaluation rl": {"SpellingBee": "0.5 (-x 64)"}, "Chat RL": {"Final pass@1": "0.4"}})
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
