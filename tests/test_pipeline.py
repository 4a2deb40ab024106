"""
End-to-end test of the CPU profile (`bash speedrun.sh cpu`) at its smallest size (NANOCHAT_CPU_TINY=1):
every stage runs as a subprocess in a temporary NANOCHAT_BASE_DIR, and the test checks what they wrote:
the tokenizer, every checkpoint directory, every report section, the summary table, the plots, the stage
timings and the sample answer. Marked slow (a few minutes on 2 cores); it still runs in CI.
Run: NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_pipeline.py
"""

import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
            "Base model evaluation", "Chat evaluation base", "Midtraining", "Chat evaluation mid", "Chat SFT",
            "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
PLOTTED = ["base-model-training", "midtraining", "chat-sft", "chat-rl"]
STAGES = ["report_reset", "tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "skill_base", "mid_train",
          "chat_eval_mid", "skill_mid", "chat_sft", "chat_eval_sft", "skill_sft", "chat_rl", "skill_rl"]


@pytest.mark.slow
def test_speedrun_cpu_tiny(tmp_path, data_dir):
    base_dir = tmp_path / "base"
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA_DIR=data_dir, NANOCHAT_CPU_TINY="1",
               NANOCHAT_PYTHON=sys.executable, WANDB_MODE="disabled")
    out = subprocess.run(["bash", "speedrun.sh", "cpu"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]

    # tokenizer and every checkpoint directory, with a model file in each
    assert os.listdir(base_dir / "tokenizer")
    for source in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        tags = os.listdir(base_dir / source)
        assert tags == ["d2"], f"{source}: {tags}"
        files = os.listdir(base_dir / source / "d2")
        assert any(f.startswith("model_") for f in files), f"{source}/d2 has no model file: {files}"

    # the report: every section file, the summary table with numbers for the chat evaluations, the plots
    report_dir = base_dir / "report"
    text = (report_dir / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in text, f"report.md has no section {section!r}"
    assert "| Metric | BASE | MID | SFT | RL |" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    models = rows.pop("Model")  # each column names the one checkpoint its scores are of
    assert models[1].startswith("mid_checkpoints/d2 step ") and models[2].startswith("chatsft_checkpoints/d2 step ")
    assert set(rows) == {"CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"}
    for cell in rows["SpellingBee"]:  # the skill after base, mid, SFT and RL, on the same 4 held-out problems
        value, marker = cell.split(" ", 1)
        assert 0.0 <= float(value) <= 1.0 and marker == "(-x 4)", rows["SpellingBee"]
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"):
        for cell in rows[metric][1:3]:  # MID, SFT: evaluated on the first 4 problems, and marked so
            value, marker = cell.split(" ", 1)
            assert 0.0 <= float(value) <= 1.0 and marker == "(-x 4)", (metric, rows[metric])
    assert re.search(r"^Total wall clock time: 0h\d\dm\d\ds \(sum of the stages' times\)$", text, re.M)
    for slug in PLOTTED:
        assert f"](plots/{slug}.png)" in text
        with open(report_dir / "plots" / f"{slug}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a speedrun starts from scratch: every training stage replaces an earlier run, and says so
    assert "every training stage runs with overwrite = 1" in out.stdout
    for stage in ("tok_train", "base_train", "mid_train", "chat_sft", "chat_rl"):
        assert re.search(rf"^=== {stage}: .* --overwrite=1", out.stdout, re.M), f"{stage} without overwrite = 1"

    # per-stage timings, and the sample answer at the end
    assert "## Stage timings" in text
    for stage in STAGES:
        assert f"- {stage} (s): " in text, f"no timing for stage {stage}"
    assert "Sample answer" in out.stdout and "Sample answer after RL" in out.stdout
