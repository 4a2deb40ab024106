"""
End-to-end tests of scripts/chat_dpo.py, run as subprocesses from a tiny random SFT checkpoint
(tests/tiny_checkpoint.py) on CPU:
- a tiny run writes chatdpo_checkpoints/<tag>/ (checkpoint, cached reference log-probs), its log lines and the
  "Chat DPO" report section with its curves, and chat_cli loads the result with `-i dpo`;
- save + resume reaches bit-identical final weights, reusing the cached reference log-probs;
- a bad preference row stops the run with one `error: file:line: ...` line, before any model is loaded.
The loss, the optimizer step (accumulation, 2 gloo ranks == 1 process, NaN / out-of-memory skips), the reference
log-probs and the data functions are tested directly in tests/test_dpo.py.

    .venv/bin/python -m pytest tests/test_chat_dpo.py --durations=5
"""

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max_seq_len=64", "--device_batch_size=2", "--target_pairs_per_step=4", "--init_lr_frac=0.5",
        "--val_fraction=0.25"]


@pytest.fixture(scope="module")
def dpo_env(tmp_path_factory, tokenizer):
    """A base dir holding the tokenizer and a tiny SFT checkpoint, and a JSONL file of 24 preference pairs (both
    row formats: string answers and TRL message lists)."""
    from tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("chat_dpo")
    base_dir = root / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="sft", depth=2, n_embd=64)
    rng = random.Random(0)
    data = root / "prefs.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(24):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            answer = f"{a} plus {b} is {a + b}."
            rejected = answer + " Also, the quick brown fox jumps over the lazy dog."
            row = {"prompt": f"What is {a} plus {b}?", "chosen": answer, "rejected": rejected} if i % 2 else \
                {"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                 "chosen": [{"role": "assistant", "content": answer}],
                 "rejected": [{"role": "assistant", "content": rejected}]}
            f.write(json.dumps(row) + "\n")
    return {"base_dir": base_dir, "data": str(data)}


def _env(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO_ROOT)
    env.pop("RANK", None)
    return env


def _run(base_dir, args, nproc=1, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.chat_dpo", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.chat_dpo", "--", *args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(base_dir), capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, f"chat_dpo failed:\nSTDOUT\n{out.stdout[-4000:]}\nSTDERR\n{out.stderr[-4000:]}"
    return out


def _final_weights(base_dir):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    checkpoint_dir = os.path.join(base_dir, "chatdpo_checkpoints", "d2")
    model_data, _, meta = load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu")
    return model_data, meta


def _copy(dpo_env, tmp_path, name):
    base_dir = tmp_path / name
    shutil.copytree(dpo_env["base_dir"], base_dir)
    return base_dir


@pytest.mark.slow
def test_end_to_end_checkpoint_report_and_load_with_dpo(dpo_env, tmp_path):
    base_dir = _copy(dpo_env, tmp_path, "e2e")
    out = _run(base_dir, TINY + [f"--data=['{dpo_env['data']}']", "--num_epochs=2", "--eval_every=3",
                                 "--packing=bestfit"]).stdout
    assert "Preference pairs: 18 train | 6 held out | 0 dropped" in out
    assert "number of iterations: 9" in out  # 18 pairs x 2 epochs // 4
    # at step 0 the policy is the reference: loss log 2, margin 0, for every pair
    assert re.search(r"^Step 00000 \| Validation \| loss: 0\.693147 \| reward_accuracy: 0\.000000 \| "
                     r"reward_margin: 0\.000000 \|", out, re.M), out[-3000:]
    val = [(float(a), float(b)) for a, b in re.findall(
        r"^Step \d{5} \| Validation \| loss: (\d+\.\d+) \| reward_accuracy: (\d\.\d+)", out, re.M)]
    train = re.findall(r"^Step \d{5} \| Training \| loss: \d+\.\d+ \| reward_accuracy: .* \| lrm: ", out, re.M)
    assert len(val) == 4 and len(train) == 9
    assert val[-1][0] < val[0][0] and val[-1][1] > 0.5  # the held-out pairs are learned
    run_dir = base_dir / "chatdpo_checkpoints" / "d2"
    assert (run_dir / "model_000009.safetensors").exists() and (run_dir / "meta_000009.json").exists()
    reference = json.loads((run_dir / "reference_logps.json").read_text())
    assert len(reference["train"]) == 18 and len(reference["val"]) == 6
    meta = json.loads((run_dir / "meta_000009.json").read_text())
    assert meta["source"] == "sft" and meta["metrics"]["val_reward_accuracy"] == val[-1][1]
    # the report section and its curves
    section = (base_dir / "report" / "chat-dpo.md").read_text()
    assert section.startswith("## Chat DPO") and "- beta: 0.1" in section and "- Training pairs: 18" in section
    assert re.search(r"- Final val reward_accuracy: \d\.\d+", section) and "duration: " in section
    curves = json.loads((base_dir / "report" / "chat-dpo.series.json").read_text())["series"]
    assert set(curves) == {f"{split}_{key}" for split in ("train", "val")
                           for key in ("loss", "reward_accuracy", "reward_margin")}
    assert curves["val_loss"]["steps"] == [0, 3, 6, 9]
    logp_curves = json.loads((base_dir / "report" / "chat-dpo-log-probs.series.json").read_text())["series"]
    assert set(logp_curves) == {"train_chosen_logp", "train_rejected_logp", "val_chosen_logp", "val_rejected_logp"}
    from nanochat.report import Report

    Report(str(base_dir / "report")).generate()
    assert (base_dir / "report" / "plots" / "chat-dpo.png").stat().st_size > 0
    # loadable with -i dpo
    res = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-i", "dpo", "-p", "What is 1 plus 2?", "-m", "8",
                          "-d", "float32"], cwd=REPO_ROOT, env=_env(base_dir), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{run_dir} step 9" in res.stdout + res.stderr


@pytest.mark.slow
def test_resume_gives_bit_identical_weights(dpo_env, tmp_path):
    args = TINY + [f"--data=['{dpo_env['data']}']", "--max_iterations=4", "--eval_every=2", "--save_every=2"]
    straight = _copy(dpo_env, tmp_path, "straight")
    _run(straight, args)
    interrupted = tmp_path / "interrupted"  # the folder as it was after step 2 (the final checkpoint never written)
    shutil.copytree(straight, interrupted)
    final_files = glob.glob(os.path.join(interrupted, "chatdpo_checkpoints", "d2", "*000004*"))
    assert final_files
    for path in final_files:
        os.remove(path)
    out = _run(interrupted, args + ["--resume=1"]).stdout
    assert "Resuming from" in out and "step 2" in out and "Reference log-probs: reused from" in out
    assert re.search(r"^Step 00002 \| Training", out, re.M) and not re.search(r"^Step 00001 \|", out, re.M)
    want, want_meta = _final_weights(straight)
    got, got_meta = _final_weights(interrupted)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert got_meta["metrics"] == want_meta["metrics"]


@pytest.mark.slow
def test_bad_row_is_one_line_error_before_the_model(dpo_env, tmp_path):
    base_dir = _copy(dpo_env, tmp_path, "bad")
    data = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    data.write_text("".join(json.dumps(row) + "\n" for row in (good, good, {"prompt": "q", "chosen": "a"})))
    out = _run(base_dir, [f"--data=['{data}']"], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: {data}:3: missing 'rejected' (a string, or a list of one assistant message)"
    assert "Model:" not in out.stdout
