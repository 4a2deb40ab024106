"""
Configuration for every script, without exec: one list of Options per script (name, type, default, help),
an optional config file of `key = value` lines, and command-line overrides.

    OPTIONS = [Option("device_batch_size", int, 4, "per-device batch size"), ...]
    config = load_config(OPTIONS)            # -> plain dict, printed on rank 0

Precedence: command line > config file > defaults.
- `--config FILE`: `key = value` lines; values are Python/TOML literals (`"text"`, `32`, `0.02`, `true`,
  `None`, `[...]`, `{...}`; lists may span lines); `#` starts a comment. The file is parsed with `ast` and
  only literals are accepted: it is data, never executed.
- `--key=value` or `--key value` (dashes in keys are accepted for underscores; a bare `--flag` sets a bool
  option to True). An option declared with `short="x"` is also `-x value` / `-x=value` / `-xvalue`. A `str`
  option takes the text as it is (`--run=my_run`, `-p "any prompt"`; a quoted literal is unquoted, `None`
  is None); other types take a literal.
- Booleans are `bool` options: `true` / `false` / `1` / `0` (any case on the command line) are accepted on
  the command line and in config files, and a bare `--flag` means true.
- An unknown key raises ConfigError naming the key, where it came from and the closest known keys; a wrong
  type names the key and the expected type. An int is accepted where a float is expected.
- Values are checked where the option is declared: `choices` (allowed values), `min` / `max` (inclusive
  bounds for numbers), floats must be finite, and `disabled` names one extra value allowed outside the
  bounds (the `-1` of every `*_every` option). ConfigError is a UserError: one line, exit code 2.

Tests: tests/test_config.py.
"""

import ast
import difflib
import math
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any

from nanochat.common import UserError, print0


class ConfigError(UserError, ValueError):
    """A bad configuration: unknown key, wrong type or value, or a config file that is not `key = value` data."""


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # one of str, int, float, bool, list, dict
    default: Any
    help: str = ""
    choices: tuple = None  # allowed values (None: any value of the type)
    min: float = None  # inclusive lower bound for int / float options
    max: float = None  # inclusive upper bound
    disabled: Any = None  # one more allowed value outside the bounds, meaning "off" (e.g. -1 for *_every)
    short: str = None  # one letter: `-x value` on the command line as well as `--name value`


_TYPES = (str, int, float, bool, list, dict)
_TOML_NAMES = {"true": True, "false": False, "True": True, "False": False, "None": None, "none": None, "null": None}


def coerce_value(option, value, where):
    """Check `value` against the option's type (int accepted for float, None only for options whose default
    is None) and return it, converted where harmless (int -> float, tuple -> list)."""
    if value is None:
        if option.default is None:
            return None
        raise ConfigError(f"{where}: key '{option.name}' cannot be None (expected {option.type.__name__})")
    t = option.type
    ok = False
    if t is bool:
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            value = bool(value)  # `overwrite = 1` in a file, `--overwrite 1` on the command line
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is str and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, str(value)  # `resume = 1` or `run = 123` mean the strings "1" / "123", as on the CLI
    elif t is list:
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, t)
    if not ok:
        raise ConfigError(f"{where}: key '{option.name}' expects {t.__name__}, got {value!r} ({type(value).__name__})")
    check_value(option, value, where)
    return value


def check_value(option, value, where):
    """Allowed values and bounds declared on the option; floats must be finite."""
    if option.disabled is not None and value == option.disabled:
        return
    if option.choices is not None and value not in option.choices:
        allowed = ", ".join(repr(c) for c in option.choices)
        raise ConfigError(f"{where}: key '{option.name}' must be one of {allowed}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: key '{option.name}' must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        off = f" (or {option.disabled!r} to disable)" if option.disabled is not None else ""
        if option.min is not None and value < option.min:
            raise ConfigError(f"{where}: key '{option.name}' must be >= {option.min}{off}, got {value!r}")
        if option.max is not None and value > option.max:
            raise ConfigError(f"{where}: key '{option.name}' must be <= {option.max}{off}, got {value!r}")


def _unknown_key(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Closest known keys: {', '.join(close)}." if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"{where}: unknown config key '{key}'.{hint}")


def _literal(node, where):
    """Evaluate an AST node as a literal; TOML's true/false/null are accepted as names."""
    if isinstance(node, ast.Name) and node.id in _TOML_NAMES:
        return _TOML_NAMES[node.id]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(f"{where}: value is not a literal (configs are data, never executed): "
                          f"{ast.unparse(node)}") from None


def parse_config_text(text, filename="<config>"):
    """Parse `key = value` lines into {key: (value, line_number)}. Raises ConfigError naming file:line."""
    try:
        tree = ast.parse(text, filename=filename, mode="exec")
    except SyntaxError as e:
        raise ConfigError(f"{filename}:{e.lineno}: not a `key = value` line: {(e.text or '').strip()!r}") from None
    entries = {}
    for stmt in tree.body:
        where = f"{filename}:{stmt.lineno}"
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ConfigError(f"{where}: expected `key = value`, got {ast.unparse(stmt)!r}")
        key = stmt.targets[0].id
        if key in entries:
            raise ConfigError(f"{where}: key '{key}' is set twice (first on line {entries[key][1]})")
        entries[key] = (_literal(stmt.value, where), stmt.lineno)
    return entries


def _parse_cli_value(option, text):
    """A command-line value: a literal if it parses as one, else a plain string (for str options; for list
    options a one-item list: --train_mixture=data/chats.jsonl is ["data/chats.jsonl"])."""
    if option.type is bool and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"  # TRUE / False / true: any case
    if option.type is str and not text.strip().startswith(("'", '"')):
        return None if text.strip() in ("None", "none", "null") else text  # plain text (a prompt, a path)
    try:
        value = _literal(ast.parse(text, mode="eval").body, "command line")
    except (SyntaxError, ConfigError, MemoryError, RecursionError):
        if option.type is str:
            return text
        if option.type is float:
            try:
                return float(text)  # `inf` / `nan`: then refused as not finite, naming the key
            except ValueError:
                pass
        if option.type is list:
            return [text]
        raise ConfigError(f"command line: key '{option.name}' expects {option.type.__name__}, got {text!r}") from None
    if option.type is str and value is not None and not isinstance(value, str):
        return text  # --run=123 means the string "123"
    return value


def _is_flag(arg):
    """`--key...` or a short flag `-x...` (a letter after the dash: `-1` or `-0.5` are values)."""
    return arg.startswith("--") or (len(arg) >= 2 and arg[0] == "-" and arg[1].isalpha())


def split_argv(argv, shorts=None):
    """Split argv into (config_file or None, [(key, raw_value or None), ...]). A lone `--` is skipped
    (torchrun examples put one before the script's own arguments). `shorts` maps a letter to the option name
    it stands for: `-x 16`, `-x=16` and `-x16` are `--name 16`."""
    shorts = shorts or {}
    config_file, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            continue
        if not _is_flag(arg):
            raise ConfigError(f"command line: unexpected argument {arg!r} (use --key=value or --config FILE)")
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
        else:
            letter, rest = arg[1], arg[2:]
            if letter not in shorts:
                known = ", ".join(f"-{k}" for k in sorted(shorts)) or "none"
                raise ConfigError(f"command line: unknown option {arg!r} (short options: {known}; see --help)")
            key, eq, value = shorts[letter], bool(rest), rest.removeprefix("=")
        if not eq:
            if i < len(argv) and not _is_flag(argv[i]):
                value = argv[i]
                i += 1
            else:
                value = None  # a bare flag
        if key == "config":
            if value is None:
                raise ConfigError("command line: --config needs a file name")
            config_file = value
        else:
            pairs.append((key, value))
    return config_file, pairs


def format_help(options, description=None):
    lines = [description.strip(), ""] if description else []
    lines.append("Options (--config FILE with `key = value` lines, then --key=value overrides):")
    for o in options:
        allowed = f" [{'|'.join(str(c) for c in o.choices)}]" if o.choices else ""
        bounds = [f">= {o.min}"] if o.min is not None else []
        bounds += [f"<= {o.max}"] if o.max is not None else []
        bounds += [f"or {o.disabled} to disable"] if o.disabled is not None and bounds else []
        allowed += f" [{' '.join(bounds)}]" if bounds else ""
        flag = (f"-{o.short}, " if o.short else "") + f"--{o.name}"
        lines.append(f"  {flag:<30} {o.type.__name__:<6} default {o.default!r:<14} {o.help}{allowed}")
    return "\n".join(lines)


MAX_CONFIG_BYTES = 1 << 20  # a config file is a page of `key = value` lines; more is not a config file


def read_config_file(path):
    """The text of a config file: a regular file (not /dev/zero, a FIFO or a folder) of at most MAX_CONFIG_BYTES,
    in UTF-8; a ConfigError naming the file (and the line of a byte that is not UTF-8) otherwise."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config file {path} is not a regular file (a device, FIFO or folder); give a text file "
                              f"of `key = value` lines")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {st.st_size:,} bytes, more than {MAX_CONFIG_BYTES:,}: not a "
                              f"config file of `key = value` lines")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8 (saved as Latin-1 or "
                          f"another encoding?); save the file as UTF-8") from None


def load_config(options, argv=None, description=None, verbose=True):
    """Resolve the configuration: defaults < config file < command line. Returns a plain dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    by_name = {o.name: o for o in options}
    assert len(by_name) == len(options), "duplicate option names"
    shorts = {o.short: o.name for o in options if o.short}
    assert len(shorts) == sum(1 for o in options if o.short), "duplicate short flags"
    for o in options:
        assert o.type in _TYPES, f"option {o.name}: unsupported type {o.type}"
        assert o.short is None or (len(o.short) == 1 and o.short.isalpha() and o.short != "h"), o.short
        coerce_value(o, o.default, f"default of {o.name}")
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(options, description))
        sys.exit(0)

    config = {o.name: o.default for o in options}
    config_file, pairs = split_argv(argv, shorts)
    if config_file is not None:
        text = read_config_file(config_file)
        for key, (value, lineno) in parse_config_text(text, config_file).items():
            where = f"{config_file}:{lineno}"
            if key not in by_name:
                raise _unknown_key(key, by_name, f"config file {where}")
            config[key] = coerce_value(by_name[key], value, where)
    for key, raw in pairs:
        if key not in by_name:
            raise _unknown_key(key, by_name, "command line")
        option = by_name[key]
        if raw is None:
            if option.type is not bool:
                raise ConfigError(f"command line: --{key} needs a value ({option.type.__name__})")
            value = True
        else:
            value = _parse_cli_value(option, raw)
        flag = f"-{option.short}/--{key}" if option.short else f"--{key}"
        config[key] = coerce_value(option, value, f"command line {flag}")

    if verbose:
        source = f" (config file: {config_file})" if config_file else ""
        print0(f"Configuration{source}:")
        for key, value in config.items():
            print0(f"  {key} = {value!r}")
    return config


# ----------------------------------------------------------------------------------------------------------
# Options shared by the training scripts


def run_options(checkpoints_dir_name):
    """The options of every training script for where it writes and what it resumes (README: "Runs, output
    folders and resume"), declared once here; checkpoints_dir_name is e.g. "chatsft_checkpoints"."""
    return [
        Option("output_tag", str, None, f"output folder name under {checkpoints_dir_name}/ (default: d<depth>)"),
        Option("overwrite", bool, False, "replace the checkpoints of another run in the output folder"),
        Option("save_every", int, -1, "resumable checkpoint every this many steps (-1 disables; the final one is "
                                      "always)", min=1, disabled=-1),
        Option("keep_last", int, -1, "keep only the newest this many resumable checkpoints, removing older ones "
                                     "after each save (-1 keeps all)", min=1, disabled=-1),
        Option("resume", str, "0", "0: fresh run; 1: continue the run in the output folder from its last resumable "
                                   "checkpoint (fresh if the folder is empty); or a checkpoint folder to continue from"),
    ]
