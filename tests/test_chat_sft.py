"""
End-to-end tests of scripts/chat_sft.py, run as subprocesses from a tiny random base checkpoint
(tests/tiny_checkpoint.py) on CPU:
- the guide's config file with tiny overrides runs on the mirror's ARC / GSM8K / ChitChat: the loss falls,
  the guide's log lines appear, the checkpoint + meta + report are written and chat_eval loads the model;
- save + resume reaches bit-identical final weights (on a CustomJSON file written by the test);
- configs/sft_guide.txt offline: one error line before any model loads, naming the replacement specs for both
  mixtures; with run = "my_sft_run" and no wandb login, wandb logs offline into the run folder;
- configs/sft_cpu.txt: the --dry_run 1 data preview (no model needed), then a shortened run and its report;
- configs/sft_own_data.txt on the sample JSONL in configs/examples/.
The optimizer step itself (accumulation == one big batch, 2 gloo ranks, NaN / out-of-memory skips) is tested
directly in tests/test_sft.py.

    NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest tests/test_chat_sft.py --durations=5
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

# The guide's configuration (scripts/chat_sft.py defaults), as a user would write it in sft_config.txt.
GUIDE_CONFIG = """\
run = "dummy"
source = "mid"
model_tag = None
step = None
dtype = "bfloat16"
device_batch_size = 4
num_epochs = 1
max_iterations = -1
target_examples_per_step = 32
unembedding_lr = 0.004
embedding_lr = 0.2
matrix_lr = 0.02
weight_decay = 0.0
init_lr_frac = 0.02
eval_every = 100
eval_steps = 100
eval_metrics_every = 200
train_mixture = [
    "ARC:ARC-Easy:train",
    "ARC:ARC-Challenge:train",
    "GSM8K:main:train",
    "SmolTalk:train:0:10000",
]
val_mixture = ["SmolTalk:test"]
"""

# flags that keep every run tiny and fast on CPU
TINY = ["--source=base", "--max_seq_len=256", "--eval_every=-1", "--eval_metrics_every=-1"]


def _custom_conversations(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        rows.append([{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Done." * rng.randint(0, 4)}])
    return rows


@pytest.fixture(scope="module")
def sft_env(tmp_path_factory, tokenizer):
    """A base dir holding the tokenizer and a tiny base checkpoint, and a CustomJSON training file."""
    from tiny_checkpoint import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("chat_sft")
    base_dir = root / "base"
    make_tiny_checkpoint(str(base_dir), tokenizer, source="base", depth=2, n_embd=64)
    data = root / "custom.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for row in _custom_conversations(96):
            f.write(json.dumps({"messages": row}) + "\n")
    return {"root": root, "base_dir": base_dir, "data": str(data)}


def _run(base_dir, args, nproc=1, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.chat_sft", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "scripts.chat_sft", "--", *args]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"chat_sft failed:\nSTDOUT\n{out.stdout[-4000:]}\nSTDERR\n{out.stderr[-4000:]}"
    return out.stdout


def _custom_args(sft_env):
    return TINY + [f"--train_mixture=['CustomJSON:{sft_env['data']}']",
                   f"--val_mixture=['CustomJSON:{sft_env['data']}:0:16']"]


def _final_weights(base_dir):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    checkpoint_dir = os.path.join(base_dir, "chatsft_checkpoints", "d2")
    step = find_last_step(checkpoint_dir)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, "cpu")
    return model_data, meta


def _weights_at(base_dir, source_dir, step):
    from nanochat.checkpoint_manager import load_checkpoint

    return load_checkpoint(os.path.join(base_dir, source_dir, "d2"), step, "cpu")[0]


def _base_weights(base_dir):
    from nanochat.checkpoint_manager import find_last_step, load_checkpoint

    checkpoint_dir = os.path.join(base_dir, "base_checkpoints", "d2")
    return load_checkpoint(checkpoint_dir, find_last_step(checkpoint_dir), "cpu")[0]


@pytest.mark.slow
def test_guide_config_end_to_end(sft_env, data_dir, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(sft_env["base_dir"], base_dir)
    config_file = tmp_path / "sft_config.txt"
    config_file.write_text(GUIDE_CONFIG)
    env_args = ["--config", str(config_file), "--source=base", "--max_seq_len=256",
                "--device_batch_size=2", "--target_examples_per_step=4", "--max_iterations=16",
                "--init_lr_frac=1.0", "--eval_every=8", "--eval_steps=4", "--eval_metrics_every=16",
                "--eval_metrics_tasks=['ARC-Easy:4', 'GSM8K:2']", "--eval_max_new_tokens=8",
                "--train_mixture=['ARC:ARC-Easy:train:0:64', 'GSM8K:main:train:0:64', 'ChitChat:train:0:64']",
                "--val_mixture=['ChitChat:test:0:16', 'ChitChat:test:16:32']"]
    out = _run(base_dir, env_args)

    # the guide's log lines
    val = [float(v) for v in re.findall(r"^Step \d{5} \| Validation loss: (\d+\.\d{6})$", out, re.M)]
    train = [float(v) for v in re.findall(
        r"^Step \d{5} \| Training loss: (\d+\.\d{6}) \| lrm: \d\.\d{6} \| num_tokens: [\d,]+ \| supervised", out, re.M)]
    assert re.search(r"^Step 00000 \| Validation loss: ", out, re.M)
    assert re.search(r"^Step 00016 \| arc_easy_acc: \d\.\d{6}, gsm8k_acc: \d\.\d{6}$", out, re.M), out[-3000:]
    assert re.search(r"^Step 00001 \| Training loss: .* \| lrm: 0\.937500 \|", out, re.M)
    assert "padding: " in out and "tok/s: " in out
    assert len(val) == 3 and len(train) == 16
    # training works: the loss falls
    assert val[-1] < val[0] - 0.3
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4

    # checkpoint with meta: resolved config and final metrics
    model_data, meta = _final_weights(base_dir)
    assert meta["step"] == 16 and meta["user_config"]["target_examples_per_step"] == 4
    assert meta["user_config"]["train_mixture"][2] == "ChitChat:train:0:64"
    assert meta["metrics"]["val_loss"] == pytest.approx(val[-1], abs=1e-6)
    assert set(meta["metrics"]) >= {"arc_easy_acc", "gsm8k_acc"}
    assert all(torch.isfinite(t).all() for t in model_data.values() if t.is_floating_point())
    # report section and loss curves for its plots
    with open(os.path.join(base_dir, "report", "chat-sft.md"), encoding="utf-8") as f:
        section = f.read()
    assert "## Chat SFT" in section and "arc_easy_acc" in section and "Number of iterations: 16" in section
    with open(os.path.join(base_dir, "report", "chat-sft.series.json"), encoding="utf-8") as f:
        series = json.load(f)["series"]
    assert series["train_loss"]["values"] == pytest.approx(train, abs=1e-6)
    assert series["val_loss"]["steps"] == [0, 8, 16]
    # per training spec: a "by source" line per step and a curve in the report
    assert len(re.findall(r"^Step \d{5} \| by source: \S+ \d+\.\d{4} \([\d,]+ tok\)", out, re.M)) == 16
    specs = ["ARC:ARC-Easy:train:0:64", "GSM8K:main:train:0:64", "ChitChat:train:0:64"]
    assert {f"train_loss/{spec}" for spec in specs} <= set(series)
    # per validation spec (two): a "Validation by source" line per evaluation, token-weighted mean = the val loss,
    # and a curve in the report
    by_source = re.findall(r"^Step \d{5} \| Validation by source: (.*)$", out, re.M)
    assert len(by_source) == 3
    for line, loss in zip(by_source, val):
        parts = [re.fullmatch(r"(\S+) (\d+\.\d{4}) \(([\d,]+) tok\)", p).groups() for p in line.split(" | ")]
        assert [p[0] for p in parts] == ["ChitChat:test:0:16", "ChitChat:test:16:32"]
        tokens = [int(p[2].replace(",", "")) for p in parts]
        assert sum(float(p[1]) * k for p, k in zip(parts, tokens)) / sum(tokens) == pytest.approx(loss, abs=2e-4)
    assert series["val_loss/ChitChat:test:16:32"]["steps"] == [0, 8, 16]

    # chat_eval loads the SFT checkpoint
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled")
    res = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy", "-x", "4"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"ARC-Easy", res.stdout), res.stdout[-2000:]


@pytest.mark.slow
def test_resume_gives_bit_identical_weights(sft_env, tmp_path):
    args = _custom_args(sft_env) + ["--max_iterations=6", "--device_batch_size=2", "--target_examples_per_step=4",
                                    "--packing=bestfit", "--max_seq_len=64", "--init_lr_frac=0.5",
                                    "--eval_every=3", "--eval_steps=1"]
    straight = tmp_path / "straight"
    shutil.copytree(sft_env["base_dir"], straight)
    _run(straight, args + ["--save_every=3"])
    # the interrupted run: the same directory as it was after step 3 (the final checkpoint never written)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    final_files = glob.glob(os.path.join(interrupted, "chatsft_checkpoints", "d2", "*000006*"))
    assert final_files
    for path in final_files:
        os.remove(path)
    # a checkpoint of the streaming loader (data state {epoch, cursor, pending}) is refused in one line
    old = tmp_path / "old"
    shutil.copytree(interrupted, old)
    state_path = os.path.join(old, "chatsft_checkpoints", "d2", "state_000003_rank0.pt")
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "data_state": {"epoch": 0, "cursor": 6, "pending": [1]}}, state_path)
    res = _run_any(old, args + ["--save_every=3", "--resume=1"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip() == (f"error: cannot resume {old}/chatsft_checkpoints/d2 step 3: it was saved by an older "
                                  f"chat_sft whose data order this version cannot reproduce; start a new run (resume = 0)")
    out = _run(interrupted, args + ["--save_every=3", "--resume=1"])
    assert "Resuming from" in out and "step 3" in out
    assert re.search(r"^Step 00003 \| Training loss", out, re.M) and not re.search(r"^Step 00002 \|", out, re.M)
    want, want_meta = _final_weights(straight)
    got, got_meta = _final_weights(interrupted)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert got_meta["metrics"]["val_loss"] == want_meta["metrics"]["val_loss"]
    # and training did move the weights
    base = _base_weights(straight)
    assert any(not torch.equal(base[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------------
# the configs/ files


def _run_any(base_dir, args, env_extra=(), drop_env=(), timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.update(dict(env_extra))
    for key in drop_env:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "scripts.chat_sft", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_guide_config_file_offline_error_and_wandb_without_login(sft_env, data_dir, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(sft_env["base_dir"], base_dir)  # a base checkpoint only: the guide's source = "mid" is absent
    # the guide's file, offline (from the base checkpoint: the output folder is checked first, and it needs the
    # source's depth): one line, before any model is loaded, naming both replacements
    no_hub = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    offline_env = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    out = _run_any(base_dir, ["--config", "configs/sft_guide.txt", "--source=base"], no_hub, offline_env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: no data for train_mixture entry 'SmolTalk:train:0:10000'")
    assert ('train_mixture = ["ARC:ARC-Easy:train", "ARC:ARC-Challenge:train", "GSM8K:main:train", '
            '"ChitChat:train:0:10000"]  val_mixture = ["ChitChat:test"]') in out.stderr
    # run = "my_sft_run" with no wandb key and no WANDB_MODE: wandb logs offline into the run folder
    home = tmp_path / "home"  # no ~/.netrc
    home.mkdir()
    out = _run_any(base_dir, ["--config", "configs/sft_guide.txt", *TINY, "--max_iterations=2",
                              "--device_batch_size=2", "--target_examples_per_step=4",
                              "--train_mixture=['ChitChat:train:0:32']", "--val_mixture=['ChitChat:test:0:8']"],
                   {"HOME": str(home)}, ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = base_dir / "chatsft_checkpoints" / "d2"
    assert f"wandb: no API key (run `wandb login`) and no WANDB_MODE: logging offline to {run_dir}/wandb" in out.stdout
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    assert re.search(r"^Step 00001 \| Training loss: .* \| step 2/2 \| elapsed \d+h\d\dm\d\ds \| eta 0h00m00s$",
                     out.stdout, re.M), out.stdout[-2000:]


@pytest.mark.slow
def test_cpu_config_dry_run_and_run(sft_env, data_dir, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(sft_env["base_dir"], base_dir)
    # the data preview loads no model: it works with no checkpoint at all
    shutil.rmtree(base_dir / "base_checkpoints")
    out = _run_any(base_dir, ["--config", "configs/sft_cpu.txt", "--dry_run", "1"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    row = re.compile(r"^(\S.*?) +\| +([\d,]+) conv \| tokens mean +[\d.]+ p50 +\d+ p95 +\d+ max +[\d,]+ \| supervised "
                     r"+([\d.]+)% \| truncated \d+ dropped \d+ \| padding pad +([\d.]+)% bestfit +([\d.]+)%$")
    rows = {m.group(1): m.groups()[1:] for m in map(row.match, lines) if m}
    assert set(rows) == {"ChitChat:train:0:400 x400", "ARC:ARC-Easy:train:0:200 x200",
                         "ARC:ARC-Challenge:train:0:100 x100", "GSM8K:main:train:0:200 x200", "training mixture",
                         "validation mixture"}, out.stdout[-3000:]
    assert rows["training mixture"][0] == "900" and rows["validation mixture"][0] == "64"
    assert float(rows["ARC:ARC-Easy:train:0:200 x200"][1]) < 10 < float(rows["GSM8K:main:train:0:200 x200"][1])
    _, _, pad, bestfit = rows["training mixture"]
    assert 0 < float(bestfit) < float(pad) < 100  # packing wastes less than padding to the longest
    assert re.search(r"^Optimizer steps: 20 with packing=pad, \d+ with packing=bestfit$", out.stdout, re.M)
    assert "One training conversation ([supervised] tokens):" in out.stdout and "|[" in out.stdout
    assert "Model:" not in out.stdout and not (base_dir / "chatsft_checkpoints").exists()
    # the run itself, shortened, from the tiny base checkpoint: the report has the new parts
    shutil.copytree(sft_env["base_dir"] / "base_checkpoints", base_dir / "base_checkpoints")
    out = _run_any(base_dir, ["--config", "configs/sft_cpu.txt", "--max_iterations=2", "--eval_every=2",
                              "--eval_steps=1", "--eval_metrics_every=-1"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    section = (base_dir / "report" / "chat-sft.md").read_text()
    assert re.search(r"^ChitChat:train:0:400 x400 +\|     400 conv \| .* supervised +[\d.]+% \| .* padding pad +[\d.]+% "
                     r"bestfit +[\d.]+%$", section, re.M), section  # the preview's lines
    assert re.search(r"^GSM8K:main:train:0:200 x200 +\|     200 conv ", section, re.M)
    assert re.search(r"- Supervised ratio: 0\.\d+", section) and re.search(r"- Tokens per second: \d+", section)
    assert re.search(r"- Padding fraction: 0\.\d+", section) and "- Number of iterations: 2" in section
    assert re.search(r"^Training time: [\d.]+s \| skipped steps: 0 non-finite, 0 out of memory \| truncated: \d+ \| "
                     r"dropped: \d+$", out.stdout, re.M)  # the closing line (CPU: no peak memory, not compiled)
    assert section.count("```") == 2 + 4  # the mixture table and two sample conversations from the final model
    assert "unit of loss_normalization = token" in section


@pytest.mark.slow
def test_own_data_config(sft_env, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(sft_env["base_dir"], base_dir)
    out = _run_any(base_dir, ["--config", "configs/sft_own_data.txt", "--source=base", "--max_seq_len=128"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Training conversations: 16 | validation: 4" in out.stdout
    assert "Number of iterations: 6" in out.stdout  # 16 // 8 * 3 epochs
    val = [float(v) for v in re.findall(r"^Step \d{5} \| Validation loss: (\d+\.\d+)$", out.stdout, re.M)]
    assert len(val) == 3 and val[-1] < val[0]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(sft_env, tmp_path):
    """The script under torchrun (2 gloo ranks x 2 micro-steps) takes the same first step as one process with
    4 micro-steps: the same conversations, one gradient under per-token normalisation."""
    args = _custom_args(sft_env) + ["--max_iterations=1", "--target_examples_per_step=4", "--device_batch_size=1",
                                    "--init_lr_frac=1.0"]
    weights = {}
    for name, nproc in (("one", 1), ("two", 2)):
        base_dir = tmp_path / name
        shutil.copytree(sft_env["base_dir"], base_dir)
        out = _run(base_dir, args, nproc=nproc)
        assert f"world_size {nproc} x grad_accum_steps {4 // nproc}" in out
        weights[name], meta = _final_weights(base_dir)
        assert meta["world_size"] == nproc
    base = _base_weights(tmp_path / "one")
    for key, want in weights["one"].items():
        moved = (want - base[key]).abs().max()
        assert moved > 0 or key.endswith("rotary"), key
        # same update; only the float summation order differs (and Muon's gloo reduction)
        torch.testing.assert_close(weights["two"][key], want, rtol=1e-4, atol=1e-5 * max(float(moved), 1e-3), msg=key)
