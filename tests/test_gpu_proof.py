"""bench/gpu_proof.sh --cpu-dry-run: the GPU proof's whole sequence at tiny sizes on CPU, so that the proof keeps
working between the days a GPU is available. Asserts on the logs and checkpoints each step wrote.
Run: .venv/bin/python -m pytest tests/test_gpu_proof.py"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["00_setup", "01_cuda_tests", "02_sft_step_d2", "03_sft_step_d3", "04_model_step", "05_chat_sft",
         "06_base_train"]


@pytest.mark.slow
def test_gpu_proof_cpu_dry_run_writes_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), PROOF_WORK=str(work), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("NANOCHAT_DATA_DIR", None)  # the proof makes its own data: it must not need the mirror
    result = subprocess.run(["bash", "bench/gpu_proof.sh", "--cpu-dry-run"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STEPS
    assert all(" rc=0 " in line for line in summary), summary
    logs = {name: (out / f"{name}.log").read_text() for name in STEPS}
    assert "3 skipped" in logs["01_cuda_tests"]  # the cuda tests were collected, and skipped without CUDA only
    for name in ("02_sft_step_d2", "03_sft_step_d3"):
        assert "| pad/eager/chunked " in logs[name] and "| bestfit/eager/full " in logs[name]
    assert "tokens/s:" in logs["04_model_step"]
    sft = logs["05_chat_sft"]
    assert "Step 00002 | Training loss:" in sft and "Validation loss" in sft and "arc_easy_acc" in sft
    assert os.path.isdir(work / "base" / "chatsft_checkpoints" / "d2")
    assert "Validation bpb" in logs["06_base_train"]
    assert any(f.startswith("model_") for f in os.listdir(work / "base" / "base_checkpoints" / "proof_d2"))
