"""nanochat.config: the SFT guide's config file, precedence, and the errors a user sees."""

import pytest

from nanochat.config import ConfigError, Option, load_config, parse_config_text

SFT_OPTIONS = [
    Option("run", str, "dummy", "wandb run name"),
    Option("source", str, "mid", "base|mid"),
    Option("model_tag", str, None, "model tag"),
    Option("num_epochs", int, 1, "epochs"),
    Option("target_examples_per_step", int, 32, "examples per optimizer step"),
    Option("device_batch_size", int, 4, "per-device batch size"),
    Option("eval_every", int, 100, "validation loss every N steps"),
    Option("eval_metrics_every", int, 200, "task metrics every N steps"),
    Option("matrix_lr", float, 0.02, "Muon lr"),
    Option("resume", bool, False, "resume"),
    Option("train_mixture", list, ["ARC:ARC-Easy:train"], "tasks"),
]

GUIDE_FILE = '''\
run = "my_sft_run"
source = "mid" # or "base" depending on your checkpoint
num_epochs = 1
target_examples_per_step = 32
device_batch_size = 4 # Adjust based on your GPU memory
eval_every = 50
eval_metrics_every = 100
'''


def write(tmp_path, text, name="sft_config.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_guide_file_parses_exactly(tmp_path):
    entries = parse_config_text(GUIDE_FILE, "sft_config.txt")
    assert {k: v for k, (v, _) in entries.items()} == {
        "run": "my_sft_run", "source": "mid", "num_epochs": 1, "target_examples_per_step": 32,
        "device_batch_size": 4, "eval_every": 50, "eval_metrics_every": 100,
    }
    config = load_config(SFT_OPTIONS, ["--config", write(tmp_path, GUIDE_FILE)], verbose=False)
    assert config["run"] == "my_sft_run" and config["eval_every"] == 50 and config["eval_metrics_every"] == 100
    assert config["model_tag"] is None and config["matrix_lr"] == 0.02  # untouched defaults
    assert type(config["device_batch_size"]) is int


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write(tmp_path, GUIDE_FILE)
    config = load_config(SFT_OPTIONS, ["--config", path, "--device_batch_size=8", "--eval_every", "7"], verbose=False)
    assert config["device_batch_size"] == 8 and config["eval_every"] == 7
    assert config["run"] == "my_sft_run"            # from the file
    assert config["target_examples_per_step"] == 32  # file == default here; check a pure default too:
    assert config["matrix_lr"] == 0.02
    # a lone "--" (torchrun examples) and --config=FILE form
    config = load_config(SFT_OPTIONS, ["--", f"--config={path}", "--run=other"], verbose=False)
    assert config["run"] == "other"


def test_cli_values(tmp_path):
    config = load_config(SFT_OPTIONS, ["--run=123", "--model-tag=d4", "--resume", "--matrix_lr=1",
                                       "--train_mixture=['GSM8K:main:train']"], verbose=False)
    assert config["run"] == "123" and config["model_tag"] == "d4" and config["resume"] is True
    assert config["matrix_lr"] == 1.0 and isinstance(config["matrix_lr"], float)
    assert config["train_mixture"] == ["GSM8K:main:train"]
    bare = load_config(SFT_OPTIONS, ["--train_mixture=data/chats.jsonl"], verbose=False)  # one item, no brackets
    assert bare["train_mixture"] == ["data/chats.jsonl"]


def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, 'run = "x"\ndevice_batch_sise = 4\n')
    with pytest.raises(ConfigError) as e:
        load_config(SFT_OPTIONS, ["--config", path], verbose=False)
    msg = str(e.value)
    assert "device_batch_sise" in msg and f"{path}:2" in msg and "device_batch_size" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match=r"unknown config key 'eval_evry'.*eval_every"):
        load_config(SFT_OPTIONS, ["--eval_evry=3"], verbose=False)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, 'device_batch_size = "four"\n')
    with pytest.raises(ConfigError, match=r"sft_config.txt:1.*'device_batch_size' expects int.*'four'"):
        load_config(SFT_OPTIONS, ["--config", path], verbose=False)
    with pytest.raises(ConfigError, match=r"'device_batch_size' expects int"):
        load_config(SFT_OPTIONS, ["--device_batch_size=four"], verbose=False)
    with pytest.raises(ConfigError, match=r"'num_epochs' expects int"):
        load_config(SFT_OPTIONS, ["--num_epochs=1.5"], verbose=False)
    with pytest.raises(ConfigError, match=r"'run' cannot be None"):
        load_config(SFT_OPTIONS, ["--run=None"], verbose=False)


def test_int_accepted_for_float_and_toml_literals(tmp_path):
    path = write(tmp_path, "matrix_lr = 1\nresume = true\ntrain_mixture = [\n  'a',  # first\n  'b',\n]\n")
    config = load_config(SFT_OPTIONS, ["--config", path], verbose=False)
    assert config["matrix_lr"] == 1.0 and isinstance(config["matrix_lr"], float)
    assert config["resume"] is True and config["train_mixture"] == ["a", "b"]
    config = load_config(SFT_OPTIONS, ["--config", write(tmp_path, "run = 123\n")], verbose=False)
    assert config["run"] == "123"  # an int where a str is expected is the string, as on the command line
    with pytest.raises(ConfigError, match="'run' expects str"):
        load_config(SFT_OPTIONS, ["--config", write(tmp_path, "run = 1.5\n")], verbose=False)


def test_file_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"run = __import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(ConfigError, match="not a literal"):
        load_config(SFT_OPTIONS, ["--config", path], verbose=False)
    assert not marker.exists()
    with pytest.raises(ConfigError, match=r":1: expected `key = value`"):
        load_config(SFT_OPTIONS, ["--config", write(tmp_path, "import os\n")], verbose=False)
    with pytest.raises(ConfigError, match=r":2: not a `key = value` line"):
        load_config(SFT_OPTIONS, ["--config", write(tmp_path, "run = 'a'\nbatch size = 4\n")], verbose=False)


def test_missing_file_and_duplicate_key(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.txt"):
        load_config(SFT_OPTIONS, ["--config", str(tmp_path / "nope.txt")], verbose=False)
    with pytest.raises(ConfigError, match=r":2: key 'run' is set twice"):
        load_config(SFT_OPTIONS, ["--config", write(tmp_path, "run = 'a'\nrun = 'b'\n")], verbose=False)


def test_resolved_config_is_printed(capsys):
    config = load_config(SFT_OPTIONS, ["--eval_every=3"])
    out = capsys.readouterr().out
    assert "eval_every = 3" in out and "run = 'dummy'" in out
    assert isinstance(config, dict) and config["eval_every"] == 3


def test_choices_bounds_and_finite_floats_are_checked_where_declared():
    options = [Option("packing", str, "pad", choices=("pad", "bestfit")),
               Option("device_batch_size", int, 4, min=1),
               Option("eval_every", int, 100, min=1, disabled=-1),
               Option("matrix_lr", float, 0.02, min=0.0)]
    assert load_config(options, ["--packing=bestfit", "--eval_every=-1"], verbose=False)["eval_every"] == -1
    with pytest.raises(ConfigError, match=r"'packing' must be one of 'pad', 'bestfit', got 'bestfti'"):
        load_config(options, ["--packing=bestfti"], verbose=False)
    with pytest.raises(ConfigError, match=r"'device_batch_size' must be >= 1, got -2"):
        load_config(options, ["--device_batch_size=-2"], verbose=False)
    with pytest.raises(ConfigError, match=r"'eval_every' must be >= 1 \(or -1 to disable\), got 0"):
        load_config(options, ["--eval_every=0"], verbose=False)
    with pytest.raises(ConfigError, match=r"'matrix_lr' must be a finite number, got inf"):
        load_config(options, ["--matrix_lr=1e999"], verbose=False)


def test_booleans_accept_true_false_1_0_on_the_command_line_and_in_files(tmp_path):
    options = [Option("dry_run", bool, False), Option("verify", bool, True), Option("compile", bool, None)]
    for argv, expected in [(["--dry_run"], True), (["--dry_run=1"], True), (["--dry_run", "0"], False),
                           (["--dry_run=TRUE"], True), (["--dry_run=false"], False), (["--dry-run", "true"], True)]:
        config = load_config(options, argv, verbose=False)
        assert config["dry_run"] is expected, argv
    path = write(tmp_path, "dry_run = 1\nverify = false\ncompile = 0\n")
    assert load_config(options, ["--config", path], verbose=False) == {"dry_run": True, "verify": False,
                                                                        "compile": False}
    assert load_config(options, [], verbose=False)["compile"] is None  # None: the option's own "auto"
    for argv in (["--dry_run=2"], ["--dry_run=yes"]):
        with pytest.raises(ConfigError, match="key 'dry_run' expects bool"):
            load_config(options, argv, verbose=False)
    with pytest.raises(ConfigError, match=r"config.txt:1: key 'verify' expects bool, got 2"):
        load_config(options, ["--config", write(tmp_path, "verify = 2\n", "config.txt")], verbose=False)


def test_short_flags():
    options = [Option("source", str, "sft", choices=("base", "mid", "sft"), short="i"),
               Option("max_problems", int, None, min=1, short="x"),
               Option("temperature", float, 0.6, min=0.0, short="t"),
               Option("overwrite", bool, False)]
    config = load_config(options, ["-i", "mid", "-x16", "-t=0", "--overwrite"], verbose=False)
    assert config == {"source": "mid", "max_problems": 16, "temperature": 0.0, "overwrite": True}
    # a bare bool flag before a short flag does not swallow it; a negative number is a value, not a flag
    config = load_config(options, ["--overwrite", "-i", "base"], verbose=False)
    assert config["overwrite"] is True and config["source"] == "base"
    with pytest.raises(ConfigError, match=r"command line -t/--temperature: key 'temperature' must be >= 0.0, got -1"):
        load_config(options, ["-t", "-1"], verbose=False)
    with pytest.raises(ConfigError, match=r"unknown option '-q' \(short options: -i, -t, -x"):
        load_config(options, ["-q", "1"], verbose=False)
    with pytest.raises(ConfigError, match=r"'source' must be one of 'base', 'mid', 'sft', got 'rl'"):
        load_config(options, ["-i", "rl"], verbose=False)


def test_help_shows_short_flags_and_every_default(capsys):
    options = [Option("temperature", float, 0.6, "sampling temperature", min=0.0, short="t"),
               Option("top_k", int, 50, "top-k sampling", min=0, short="k")]
    with pytest.raises(SystemExit) as exit_info:
        load_config(options, ["--help"], description="Chat")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "-t, --temperature" in out and "default 0.6" in out and "-k, --top_k" in out and "default 50" in out


@pytest.mark.parametrize("module", ["scripts.chat_cli", "scripts.chat_eval", "scripts.chat_web"])
def test_serving_scripts_help_shows_every_default_and_short_flag(module, monkeypatch):
    import importlib
    import sys

    from nanochat.config import format_help

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its handler on import
    options = importlib.import_module(module).OPTIONS
    text = format_help(options)
    for o in options:
        flag = (f"-{o.short}, " if o.short else "") + f"--{o.name}"
        line = next(line for line in text.splitlines() if line.strip().startswith(flag + " "))
        assert f"default {o.default!r}" in line, line
    if module == "scripts.chat_cli":  # issue 25: the 0.6 of -t was not shown
        assert any(o.short == "t" and o.default == 0.6 for o in options)
    # every checkpoint family a pipeline stage writes can be loaded (chat_rl and chat_dpo are stages since #21, #23)
    assert next(o for o in options if o.name == "source").choices == ("base", "mid", "sft", "rl", "dpo")
