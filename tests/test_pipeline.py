"""
End-to-end test of the CPU profile (`bash speedrun.sh cpu`) at its smallest size (NANOCHAT_CPU_TINY=1):
every stage runs as a subprocess in a temporary NANOCHAT_BASE_DIR, and the test checks what they wrote:
the tokenizer, every checkpoint directory, every report section, the summary table, the plots, the stage
timings and the sample answer. Marked slow (a few minutes on 2 cores); it still runs in CI.
Run: NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_pipeline.py
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
            "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT", "Chat evaluation sft"]
PLOTTED = ["base-model-training", "midtraining", "chat-sft"]
STAGES = ["report_reset", "tok_train", "tok_eval", "base_train", "base_loss", "base_eval", "mid_train",
          "chat_eval_mid", "chat_sft", "chat_eval_sft"]


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
    for source in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints"):
        tags = os.listdir(base_dir / source)
        assert tags == ["d2"], f"{source}: {tags}"
        files = os.listdir(base_dir / source / "d2")
        assert any(f.startswith("model_") for f in files), f"{source}/d2 has no model file: {files}"

    # the report: every section file, the summary table with numbers for the chat evaluations, the plots
    report_dir = base_dir / "report"
    text = (report_dir / "report.md").read_text()
    for section in SECTIONS:
        assert f"## {section}\n" in text, f"report.md has no section {section!r}"
    assert "| Metric | BASE | MID | SFT |" in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    assert set(rows) == {"CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"}
    for metric in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"):
        mid, sft = rows[metric][1], rows[metric][2]
        assert 0.0 <= float(mid) <= 1.0 and 0.0 <= float(sft) <= 1.0, (metric, rows[metric])
    assert "Total wall clock time: 0h" in text
    for slug in PLOTTED:
        assert f"](plots/{slug}.png)" in text
        with open(report_dir / "plots" / f"{slug}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # per-stage timings, and the sample answer at the end
    assert "## Stage timings" in text
    for stage in STAGES:
        assert f"- {stage} (s): " in text, f"no timing for stage {stage}"
    assert "Sample answer" in out.stdout


def _base_train(base_dir, data_dir, *extra):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA_DIR=data_dir, WANDB_MODE="disabled")
    args = ["--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64", "--device_batch_size=2",
            "--total_batch_size=256", "--num_iterations=6", "--eval_every=3", "--eval_tokens=512",
            "--sample_every=-1", "--core_metric_every=-1"]
    out = subprocess.run([sys.executable, "-m", "scripts.base_train", *args, *extra], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return [line.split("|")[:2] for line in out.stdout.splitlines() if line.startswith(("step ", "Step "))]


@pytest.mark.slow
def test_base_train_resume_is_exact(tmp_path, data_dir, tokenizer):
    """base_train saved at step 3 and resumed from it logs the same losses as the uninterrupted run."""
    from nanochat.tokenizer import compute_token_bytes, save_token_bytes

    base_dir = tmp_path / "base"
    tokenizer_dir = base_dir / "tokenizer"
    tokenizer.save(str(tokenizer_dir))
    save_token_bytes(compute_token_bytes(tokenizer), str(tokenizer_dir))
    full = _base_train(base_dir, data_dir, "--save_every=3")
    resumed = _base_train(base_dir, data_dir, "--resume_from_step=3")
    assert len(full) == 6 + 3  # 6 training steps + validations at 0, 3, 6
    assert len(resumed) == 3 + 2  # validation at 3, updates 3, 4, 5, validation at 6
    assert resumed == full[-len(resumed):]
