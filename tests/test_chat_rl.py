"""
End-to-end tests of scripts/chat_rl.py, run as subprocesses from a tiny random SFT checkpoint
(tests/tiny_checkpoint.py) on CPU, training on a toy task whose reward a random model earns sometimes
(tests/rl_toy_task.py) and evaluating pass@k on the synthetic SpellingBee task (no download):
- a 4-step run writes chatrl_checkpoints/d2 (model, meta with the pass@k metrics), its step and pass@k lines and
  the "Chat RL" report section with its reward / pass@k series; chat_eval loads it with -i rl;
- interrupted after step 2 and resumed, it reaches bit-identical final weights (the rollouts included);
- a training task without a reward() is a one-line error before any model loads.
The step itself (advantages, loss, gradients, 2 gloo ranks) is tested in tests/test_rl.py.

    .venv/bin/python -m pytest tests/test_chat_rl.py
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train_task=['tests.rl_toy_task:EShare']", "--eval_task=['SpellingBee:test']", "--examples_per_step=2",
        "--num_samples=4", "--device_batch_size=2", "--max_new_tokens=12", "--max_iterations=4", "--eval_every=2",
        "--eval_examples=4", "--eval_samples=2", "--init_lr_frac=1.0", "--save_every=2"]


@pytest.fixture(scope="module")
def rl_env(tmp_path_factory, tokenizer):
    from tiny_checkpoint import make_tiny_checkpoint

    base_dir = tmp_path_factory.mktemp("chat_rl") / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="sft", depth=2, n_embd=64)
    return base_dir


def _run(base_dir, args, module="scripts.chat_rl", check=True):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO_ROOT, NANOCHAT_TASK_MODULES="tests")  # the toy task's module may be imported
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    if check:
        assert out.returncode == 0, f"{module} failed:\nSTDOUT\n{out.stdout[-4000:]}\nSTDERR\n{out.stderr[-4000:]}"
    return out


def _final(base_dir):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    checkpoint_dir = os.path.join(base_dir, "chatrl_checkpoints", "d2")
    model_data, _, meta = load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu")
    return model_data, meta


@pytest.mark.slow
def test_tiny_run_writes_checkpoints_report_and_resumes_bit_exact(rl_env, tmp_path):
    straight = tmp_path / "straight"
    shutil.copytree(rl_env, straight)
    out = _run(straight, TINY).stdout

    steps = re.findall(r"^Step (\d{5}) \| reward: (\d\.\d{4}) \| loss: -?\d+\.\d{6} \| lrm: .* \| completions/s: "
                       r"[\d.]+ \| gen tok/s: [\d,]+ \|", out, re.M)
    assert [s for s, _ in steps] == ["00000", "00001", "00002", "00003"], out[-3000:]
    assert len(re.findall(r"^Step 0000[024] \| pass@1: \d\.\d{4} \| pass@2: \d\.\d{4}$", out, re.M)) == 3, out[-3000:]
    files = os.listdir(straight / "chatrl_checkpoints" / "d2")
    assert {"model_000004.safetensors", "meta_000004.json", "model_000002.safetensors",
            "state_000002_rank0.pt"} <= set(files), files
    model_data, meta = _final(straight)
    assert meta["source"] == "sft" and meta["totals"]["completions"] == 4 * 2 * 4
    assert set(meta["metrics"]) == {"pass@1", "pass@2"}
    # training moved the weights
    from nanochat.checkpoint_manager import load_checkpoint

    start = load_checkpoint(os.path.join(straight, "chatsft_checkpoints", "d2"), 0, "cpu")[0]
    assert any(not torch.equal(start[k], model_data[k]) for k in start)

    # the report section, and its curves
    section = (straight / "report" / "chat-rl.md").read_text()
    assert section.startswith("## Chat RL\n") and "- advantage: mean" in section
    assert "- Completions sampled: 32" in section and "- Final pass@1: " in section
    assert "Sampled rollouts of the last step" in section and "reward: " in section
    series = json.loads((straight / "report" / "chat-rl.series.json").read_text())["series"]
    assert series["train_reward"]["steps"] == [0, 1, 2, 3] and series["pass@1"]["steps"] == [0, 2, 4]

    # chat_eval accepts -i rl
    res = _run(straight, ["-i", "rl", "-a", "SpellingBee", "-x", "2", "-m", "8"], module="scripts.chat_eval")
    assert re.search(r"SpellingBee accuracy: \d+\.\d{2}%", res.stdout), res.stdout[-2000:]

    # interrupted after the checkpoint of step 2, then resumed: the same final weights, bit for bit
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    for path in glob.glob(os.path.join(interrupted, "chatrl_checkpoints", "d2", "*000004*")):
        os.remove(path)
    out = _run(interrupted, TINY + ["--resume=1"]).stdout
    assert "Resuming from" in out and "step 2" in out
    assert re.search(r"^Step 00002 \| reward", out, re.M) and not re.search(r"^Step 00001 \|", out, re.M)
    resumed, resumed_meta = _final(interrupted)
    for key in model_data:
        assert torch.equal(model_data[key], resumed[key]), key
    assert resumed_meta["metrics"] == meta["metrics"]
    timeless = lambda totals: {k: v for k, v in totals.items() if not k.endswith("_time")}  # noqa: E731
    assert timeless(resumed_meta["totals"]) == timeless(meta["totals"])


@pytest.mark.slow
def test_defaults_train_on_gsm8k_and_a_task_without_reward_is_a_one_line_error(rl_env, data_dir, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(rl_env, base_dir)
    # nanochat's run: no task options, GSM8K from sft (here one tiny step, no evaluation)
    out = _run(base_dir, ["--max_iterations=1", "--examples_per_step=1", "--num_samples=2", "--device_batch_size=2",
                          "--max_new_tokens=4", "--eval_every=-1"]).stdout
    assert "train_task = ['GSM8K:main:train']" in out and "source = 'sft'" in out
    assert "Training questions: 7,473" in out and re.search(r"^Step 00000 \| reward: ", out, re.M), out[-2000:]
    res = _run(base_dir, ["--train_task=['ChitChat:train:0:10']", "--eval_task=['SpellingBee:test']",
                          "--output_tag=no_reward"], check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train_task entry 'ChitChat:train:0:10'"), res.stderr
    assert "reward" in lines[0] and "Loaded checkpoint" not in res.stdout
