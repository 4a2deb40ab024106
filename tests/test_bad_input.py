"""The bad-input suite (issue 11, items 4-8): every user mistake is a one-line `error: ...` on stderr naming the
key / file / line / path, exit code 2, and no traceback; weights never go non-finite silently; chat_cli survives
Ctrl-C and messages longer than the context. Script runs are subprocesses (a torch import each, ~2 s); the pure
functions behind them are tested in-process.
Run: NANOCHAT_DATA_DIR=/work/shared/data .venv/bin/python -m pytest -q tests/test_bad_input.py"""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.chat_turn import reply_budget, stream_reply
from nanochat.checkpoint_manager import CheckpointError, load_checkpoint, save_checkpoint
from nanochat.checks import NonFiniteWeightsError, check_finite_parameters, first_nonfinite
from nanochat.common import UserError
from nanochat.config import ConfigError, Option, load_config
from nanochat.gpt import GPT, ContextLengthError, GPTConfig, config_from_depth

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def run_script(module, *args, base_dir, stdin=None, timeout=120, python_flags=()):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("NANOCHAT_DEBUG", None)
    return subprocess.run([sys.executable, *python_flags, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles):
    """Exit code 2, stderr exactly one line `error: ...` containing every needle, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# 4. Configuration: every option checked where it is declared, before anything is loaded (no checkpoint,
# tokenizer or data exists in these runs: an error about those would mean the check came too late)

CONFIG_CASES = [
    ("scripts.base_train", ["--depth=0"], ["'depth'", ">= 1"]),
    ("scripts.base_train", ["--device_batch_size=0"], ["'device_batch_size'", ">= 1"]),
    ("scripts.base_train", ["--matrix_lr=1e999"], ["'matrix_lr'", "finite"]),
    ("scripts.base_train", ["--device_type=tpu"], ["'device_type'", "'cuda'"]),
    ("scripts.base_train", ["--eval_every=0"], ["'eval_every'", "-1 to disable"]),
    ("scripts.base_train", ["--warmup_ratio=0.5", "--warmdown_ratio=0.6"], ["warmup_ratio + warmdown_ratio"]),
    ("scripts.base_train", ["--total_batch_size=1000", "--device_batch_size=3", "--max_seq_len=7"],
     ["total_batch_size=1000", "device_batch_size"]),
    ("scripts.base_train", ["--depth=2", "--aspect_ratio=3", "--head_dim=3"], ["aspect_ratio", "head_dim=3"]),
    ("scripts.base_train", ["--target_param_data_ratio=0"], ["no training horizon"]),
    ("scripts.chat_sft", ["--device_batch_size=-2", "--packing=bestfit"], ["'device_batch_size'", ">= 1"]),
    ("scripts.chat_sft", ["--packing=zip"], ["'packing'", "'bestfit'"]),
    ("scripts.chat_sft", ["--source=rl"], ["'source'", "'sft'"]),
    ("scripts.chat_sft", ["--loss_normalization=mean"], ["'loss_normalization'", "'token'"]),
    ("scripts.chat_sft", ["--target_examples_per_step=6"], ["target_examples_per_step=6", "device_batch_size"]),
    ("scripts.chat_sft", ["--eval_metrics_tasks=['Nope']"], ["eval_metrics_tasks", "'Nope'"]),
    ("scripts.chat_sft", ["--train_mixture=['Nope:train']"], ["Nope"]),
    ("scripts.chat_sft", ["--init_lr_frac=-0.5"], ["'init_lr_frac'", ">= 0.0"]),
    ("scripts.mid_train", ["--warmdown_ratio=2"], ["'warmdown_ratio'", "<= 1"]),
    ("scripts.mid_train", ["--train_mixture=[]"], ["train_mixture is empty"]),
    ("scripts.base_loss", ["--split_tokens=0"], ["'split_tokens'"]),
    ("scripts.base_eval", ["--max_per_task=0"], ["'max_per_task'", "-1 to disable"]),
    ("scripts.tok_train", ["--vocab_size=100"], ["'vocab_size'", ">= 265"]),
    ("scripts.tok_eval", ["--shard_chars=-5"], ["'shard_chars'"]),
    ("scripts.chat_eval", ["-i", "sft", "-x", "0"], ["-x/--max_problems", ">= 1"]),
    ("scripts.chat_eval", ["-i", "sft", "-b", "0"], ["-b/--batch_size"]),
    ("scripts.chat_eval", ["-i", "sft", "-n", "0"], ["-n/--num_samples"]),
    ("scripts.chat_eval", ["-i", "sft", "-a", ""], ["-a/--task_name", "ARC-Easy"]),
    ("scripts.chat_eval", ["-i", "sft", "-t", "nan"], ["-t/--temperature", "finite"]),
    ("scripts.chat_cli", ["-m", "0"], ["-m/--max_tokens"]),
]


@pytest.mark.parametrize("module,args,needles", CONFIG_CASES,
                         ids=[f"{m[8:]} {' '.join(a)}" for m, a, _ in CONFIG_CASES])
def test_bad_option_is_one_line_error(tmp_path, module, args, needles):
    assert_one_line_error(run_script(module, *args, base_dir=tmp_path / "base"), *needles)


def test_bad_value_in_config_file_names_file_and_line(tmp_path):
    config = tmp_path / "train.txt"
    config.write_text('depth = 4\nmatrix_lr = 1e999\n')
    assert_one_line_error(run_script("scripts.base_train", "--config", str(config), base_dir=tmp_path / "base"),
                          f"{config}:2", "'matrix_lr'", "finite")


def test_checks_survive_python_O(tmp_path):
    """Validation is not done with assert: `python -O` (which strips asserts) still refuses bad values."""
    result = run_script("scripts.chat_sft", "--source=rl", base_dir=tmp_path / "base", python_flags=("-O",))
    assert_one_line_error(result, "'source'")


def test_missing_checkpoint_is_one_line_error(tmp_path):
    assert_one_line_error(run_script("scripts.chat_eval", "-i", "sft", base_dir=tmp_path / "base"),
                          "chatsft_checkpoints")


def test_garbage_parquet_shard_is_one_line_error(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        (shards / name).write_bytes(os.urandom(1000))
    result = run_script("scripts.tok_train", f"--data_dir={shards}", "--max_chars=1000", "--vocab_size=300",
                        base_dir=tmp_path / "base")
    assert_one_line_error(result, f"{shards / 'shard_00000.parquet'}", "cannot be read")


# ----------------------------------------------------------------------------------------------------------
# 5. Corrupt, empty, truncated or garbage model / meta / tokenizer files: one line naming the path


@pytest.fixture
def ckpt(tmp_path, tokenizer):
    """(base_dir, checkpoint_dir) with a tokenizer and a tiny sft checkpoint of step 0."""
    base = tmp_path / "base"
    return base, make_tiny_checkpoint(str(base), tokenizer, source="sft", depth=2, n_embd=64, step=0)


def _model_file(ckpt_dir):
    return os.path.join(ckpt_dir, "model_000000.safetensors")


CORRUPTIONS = {
    "garbage_model": (lambda d: open(_model_file(d), "wb").write(os.urandom(4096)),
                      ["model_000000.safetensors", "not a valid safetensors file"]),
    "empty_model": (lambda d: open(_model_file(d), "wb").close(), ["model_000000.safetensors", "empty"]),
    "truncated_model": (lambda d: os.truncate(_model_file(d), os.path.getsize(_model_file(d)) // 2),
                        ["model_000000.safetensors", "corrupt or truncated"]),
    "missing_model": (lambda d: os.remove(_model_file(d)), ["model_000000.safetensors", "missing"]),
    "garbage_legacy_pt": (lambda d: (os.remove(_model_file(d)),
                                     open(os.path.join(d, "model_000000.pt"), "wb").write(b"\x80\x04garbage" * 50)),
                          ["model_000000.pt", "corrupt"]),
    "garbage_meta": (lambda d: open(os.path.join(d, "meta_000000.json"), "wb").write(b"\xff\xfe{not json"),
                     ["meta_000000.json", "not UTF-8"]),
    "truncated_meta": (lambda d: os.truncate(os.path.join(d, "meta_000000.json"), 20),
                       ["meta_000000.json", "not valid JSON"]),
    "meta_n_head_changed": (lambda d: _edit_meta(d, n_head=4, n_kv_head=4),
                            ["n_head = 2 in the weights file but 4 in the meta file", "meta_000000.json"]),
    "garbage_tokenizer_meta": (lambda d: open(_tok(d, "tokenizer.json"), "w").write("{oops"),
                               ["tokenizer.json", "not valid JSON"]),
    "binary_tokenizer_ranks": (lambda d: open(_tok(d, "mergeable_ranks.tiktoken"), "ab").write(b"\x00\xff\x9c\n"),
                               ["mergeable_ranks.tiktoken:", "not ASCII"]),
    "missing_tokenizer": (lambda d: os.remove(_tok(d, "tokenizer.json")), ["tokenizer.json", "tok_train"]),
}


def _tok(ckpt_dir, name):
    base = os.path.dirname(os.path.dirname(ckpt_dir))
    path = os.path.join(base, "tokenizer", name)
    assert os.path.exists(path), path
    return path


def _edit_meta(ckpt_dir, **changes):
    path = os.path.join(ckpt_dir, "meta_000000.json")
    with open(path) as f:
        meta = json.load(f)
    meta["model_config"].update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_is_one_line_error_naming_path(ckpt, case):
    base, ckpt_dir = ckpt
    corrupt, needles = CORRUPTIONS[case]
    corrupt(ckpt_dir)
    result = run_script("scripts.chat_cli", "-i", "sft", "-p", "hi", "-m", "4", base_dir=base)
    assert_one_line_error(result, *needles)


def test_corrupt_files_in_process(tmp_path, tokenizer, monkeypatch):
    """The optimizer file and token_bytes.npy (read later in the scripts) and the meta n_head case in-process."""
    from nanochat.tokenizer import get_token_bytes

    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    ckpt_dir = make_tiny_checkpoint(str(base), tokenizer, source="base", step=5)
    for content, needle in [(b"", "empty"), (b"PK\x03\x04 not a zip", "corrupt or truncated")]:
        with open(os.path.join(ckpt_dir, "optim_000005_rank0.pt"), "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=needle) as excinfo:
            load_checkpoint(ckpt_dir, 5, "cpu", load_optimizer=True)
        assert "optim_000005_rank0.pt" in str(excinfo.value)
    with open(os.path.join(base, "tokenizer", "token_bytes.npy"), "wb") as f:
        f.write(b"garbage" * 10)
    with pytest.raises(UserError, match="token_bytes.npy"):
        get_token_bytes()


# ----------------------------------------------------------------------------------------------------------
# 6. Non-finite weights: the step stops the run (naming step and parameter); a checkpoint is never written;
# the weights file carries the model config and must agree with the meta


def _tiny_model():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def test_check_finite_parameters_names_step_and_parameter():
    model = _tiny_model()
    check_finite_parameters(model, 3)  # all finite: no error
    assert first_nonfinite(model.named_parameters()) is None
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    assert first_nonfinite(model.named_parameters()) == "transformer.h.1.mlp.c_fc.weight"
    with pytest.raises(NonFiniteWeightsError, match=r"step 7: parameter 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        check_finite_parameters(model, 7)
    assert first_nonfinite([("x", torch.tensor([1, 2]))]) is None  # integer tensors are skipped


def test_save_checkpoint_refuses_nonfinite_weights(tmp_path):
    model = _tiny_model()
    with torch.no_grad():
        model.lm_head.weight[3, 1] = float("nan")
    meta = {"step": 1, "model_config": vars(model.config).copy()}
    with pytest.raises(NonFiniteWeightsError, match="lm_head.weight"):
        save_checkpoint(str(tmp_path / "ck"), 1, model.state_dict(), None, meta)
    assert not os.path.exists(tmp_path / "ck") or not os.listdir(tmp_path / "ck")


def test_weights_file_carries_model_config_and_legacy_pt_loads(tmp_path):
    from safetensors import safe_open

    model = _tiny_model()
    meta = {"step": 2, "model_config": vars(model.config).copy()}
    save_checkpoint(str(tmp_path), 2, model.state_dict(), None, meta)
    with safe_open(str(tmp_path / "model_000002.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["model_config"]) == meta["model_config"]
    meta["model_config"]["n_head"] = 4  # same shapes, another model: refused, naming both values
    (tmp_path / "meta_000002.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="n_head = 2 in the weights file but 4 in the meta file"):
        load_checkpoint(str(tmp_path), 2, "cpu")
    # nanochat's model_<step>.pt (torch.save of the state_dict) still loads
    meta["model_config"]["n_head"] = 2
    (tmp_path / "meta_000002.json").write_text(json.dumps(meta))
    os.remove(tmp_path / "model_000002.safetensors")
    torch.save(model.state_dict(), tmp_path / "model_000002.pt")
    data, _, _ = load_checkpoint(str(tmp_path), 2, "cpu")
    assert all(torch.equal(data[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_huge_lr_stops_training_with_a_clear_error(tmp_path, data_dir, tokenizer):
    """matrix_lr = 1e30 (finite, so the config accepts it) blows the weights up: the run stops at that step,
    naming it and the parameter, exit 2, and writes no checkpoint."""
    base = tmp_path / "base"
    tokenizer.save(str(base / "tokenizer"))
    result = run_script("scripts.base_train", "--depth=2", "--aspect_ratio=32", "--head_dim=32", "--max_seq_len=64",
                        "--device_batch_size=2", "--total_batch_size=128", "--num_iterations=6", "--eval_every=-1",
                        "--core_metric_every=-1", "--sample_every=-1", "--matrix_lr=1e30", "--embedding_lr=1e30",
                        base_dir=base)
    line = assert_one_line_error(result, "became non-finite", "parameter '")
    assert line.startswith("error: step ")
    assert not os.path.exists(base / "base_checkpoints" / "d2" / "meta_000006.json")


# ----------------------------------------------------------------------------------------------------------
# 7. A non-UTF-8 byte in a JSONL file: file:line


def test_customjson_non_utf8_names_file_and_line(tmp_path):
    from tasks.customjson import CustomJSON

    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "data.jsonl"
    path.write_bytes((good + "\n" + good + "\n").encode() + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: not UTF-8: byte 0xe9 at column 18"):
        CustomJSON(str(path))


def test_customjson_non_utf8_in_chat_sft_is_one_line_error(tmp_path, tokenizer):
    base = tmp_path / "base"
    make_tiny_checkpoint(str(base), tokenizer, source="base", depth=2, n_embd=64, step=0)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    result = run_script("scripts.chat_sft", "--source=base", "--device_type=cpu",
                        f"--train_mixture=['CustomJSON:{path}']", "--val_mixture=['ChitChat:test']", base_dir=base)
    assert_one_line_error(result, f"{path}:1", "not UTF-8")


# ----------------------------------------------------------------------------------------------------------
# 8. chat_cli survives the user; the model refuses sequences longer than its rotary table with a clear error


def test_reply_budget():
    assert reply_budget(10, 5, 256, 100) == (100, None)
    assert reply_budget(10, 5, 32, 100) == (17, None)  # capped by the context
    budget, reason = reply_budget(1, 300, 256, 100)
    assert budget == 0 and "message too long: 300 tokens" in reason and "256" in reason
    budget, reason = reply_budget(200, 60, 256, 100)
    assert budget == 0 and "`clear`" in reason


def test_stream_reply_stops_at_ctrl_c_and_keeps_tokens():
    def stream(interrupt_after):
        for i in range(10):
            if i == interrupt_after:
                raise KeyboardInterrupt
            yield [i + 100], [1]

    seen = []
    assert stream_reply(stream(3), {999}, seen.append) == ([100, 101, 102], True)
    assert seen == [100, 101, 102]
    assert stream_reply(stream(99), {105}, lambda t: None) == ([100, 101, 102, 103, 104], False)


def test_chat_cli_refuses_a_240kb_message_and_goes_on(ckpt):
    base, _ = ckpt
    huge = "lorem ipsum dolor " * 13500  # ~240 KB
    result = run_script("scripts.chat_cli", "-i", "sft", "-m", "4", "-t", "0", base_dir=base,
                        stdin=f"{huge}\nhello\nquit\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "(message too long:" in result.stdout and "the model's context holds 256" in result.stdout
    assert result.stdout.count("Assistant:") == 1  # the refused message got no answer; "hello" did


def test_chat_cli_prompt_too_long_is_one_line_error(ckpt):
    base, _ = ckpt
    result = run_script("scripts.chat_cli", "-i", "sft", "-p", "word " * 2000, base_dir=base)
    assert_one_line_error(result, "-p/--prompt", "message too long")


def test_model_refuses_sequence_beyond_rotary_table():
    model = _tiny_model()  # sequence_len 16: rotary table of 160 positions
    with pytest.raises(ContextLengthError, match="161 tokens exceeds the model's rotary table of 160"):
        model(torch.zeros((1, 161), dtype=torch.long))
    with pytest.raises(ContextLengthError):
        model(torch.zeros((1, 161), dtype=torch.long), segment_ids=torch.zeros((1, 161), dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# The pure checks behind the scripts


def test_pure_config_checks():
    with pytest.raises(ConfigError, match="depth"):
        config_from_depth(0, 64, 256, head_dim=64, aspect_ratio=64)
    assert config_from_depth(2, 64, 256, head_dim=32, aspect_ratio=32).n_head == 2
    options = [Option("max_problems", int, None, min=1, short="x"),
               Option("temperature", float, 0.6, min=0.0, max=2.0, short="t")]
    config = load_config(options, ["-x", "3", "-t", "0.5"], verbose=False)
    assert config == {"max_problems": 3, "temperature": 0.5}
    for argv, needle in [(["-x", "0"], r"-x/--max_problems: key 'max_problems' must be >= 1"),
                         (["-x", "a"], "expects int"),
                         (["-t", "1e999"], "finite"), (["-t", "3"], "<= 2.0"), (["--nope"], "unknown config key"),
                         (["-z", "1"], "unknown option '-z'")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(options, argv, verbose=False)


def test_chat_cli_ctrl_c_stops_the_answer_and_keeps_the_session(tmp_path, tokenizer):
    """A real SIGINT while the answer streams: that answer stops, the next message is answered, exit 0.
    The model's context (2048) and -m 2000 make the first answer last seconds; SIGINT goes right after the
    first answer token is printed."""
    import signal
    import time

    base = tmp_path / "base"
    make_tiny_checkpoint(str(base), tokenizer, source="sft", depth=2, n_embd=64, sequence_len=2048, step=0)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_cli", "-i", "sft", "-m", "2000", "-t", "0"],
                            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        seen, deadline = b"", time.time() + 90
        while b"Assistant: " not in seen or len(seen.split(b"Assistant: ", 1)[1]) < 1:
            assert time.time() < deadline, seen
            chunk = os.read(proc.stdout.fileno(), 1)
            assert chunk, seen  # the process ended before answering
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(b"second message\nquit\n", timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (seen + out).decode("utf-8", "replace")
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    assert "(answer stopped)" in out
    assert out.count("Assistant:") == 2  # the session went on and answered the second message


# ---------------------------------------------------------------------------------------------------------
# issue 24: config files that are not text, disk full, torch's advice, sizes that cannot be allocated


def test_config_file_not_utf8_or_not_a_file_is_one_line(tmp_path):
    from nanochat.config import Option, load_config

    options = [Option("run", str, "dummy", "")]
    latin1 = tmp_path / "latin1.cfg"
    latin1.write_bytes('run = "ok"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.cfg:2: byte 0xe9 is not UTF-8"):
        load_config(options, ["--config", str(latin1)], verbose=False)
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):
        load_config(options, ["--config", "/dev/zero"], verbose=False)
    fifo = tmp_path / "fifo.cfg"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(options, ["--config", str(fifo)], verbose=False)
    big = tmp_path / "big.cfg"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(ConfigError, match="more than 1,048,576"):
        load_config(options, ["--config", str(big)], verbose=False)
    result = run_script("scripts.base_train", "--config", str(latin1), base_dir=tmp_path)
    assert_one_line_error(result, "latin1.cfg:2", "UTF-8")


def test_disk_full_during_a_save_says_what_was_saved(tmp_path, monkeypatch):
    import errno

    from nanochat import checkpoint_manager

    d = str(tmp_path / "ckpt")
    save_checkpoint(d, 5, {"w": torch.zeros(2)}, None, {"step": 5})

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint_manager, "atomic_write_bytes", full)
    with pytest.raises(UserError) as e:
        save_checkpoint(d, 10, {"w": torch.ones(2)}, [{"state": {}}], {"step": 10})
    msg = str(e.value)
    assert "disk full" in msg and "step 10 was not saved" in msg and "last complete checkpoint there is step 5" in msg
    assert sorted(os.listdir(d)) == ["meta_000005.json", "model_000005.safetensors"]


def test_bad_pt_errors_never_quote_the_weights_only_advice(tmp_path):
    from nanochat.runs import load_run_state, run_state_path

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = str(tmp_path)
    save_checkpoint(d, 3, {"w": torch.zeros(2)}, [{"state": {}}], {"step": 3})
    for path in (os.path.join(d, "optim_000003_rank0.pt"), run_state_path(d, 3, 0)):
        torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, 3, "cpu", load_optimizer=True)
    with pytest.raises(UserError) as e2:
        load_run_state(d, 3, 0, 1, 10, "cpu")
    for err in (e, e2):
        msg = str(err.value)
        assert "weights_only" not in msg and "arbitrary code" not in msg and "posix.system" in msg, msg


def test_sizes_that_cannot_be_allocated_are_refused_before_allocation():
    from nanochat.perf import check_memory, training_memory_bytes

    with torch.device("meta"):  # nothing allocated: the size is known from the meta model
        huge = GPT(config_from_depth(64, 65536, 10**8))  # --depth=64 --max_seq_len=1e8: terabytes of rotary table
        small = GPT(config_from_depth(2, 256, 64, head_dim=16, aspect_ratio=16))
    with pytest.raises(UserError, match=r"training depth 64 needs at least [\d,.]+ GiB, but cpu has"):
        check_memory(training_memory_bytes(huge), "cpu", "training depth 64", "pick a smaller depth")
    check_memory(training_memory_bytes(small), "cpu", "training depth 2", "pick a smaller depth")
    assert training_memory_bytes(small) >= 4 * 4 * sum(p.numel() for p in small.parameters())
