"""
The one task registry and mixture-spec parser, used by chat_sft, mid_train and chat_eval.
Tests: tests/test_mixture.py (`python -m pytest tests/test_mixture.py`).

A mixture (config keys train_mixture / val_mixture) is a list of specs, each a string

    "Name[:arg...][:start[:stop[:step]]][*repeats][@weight]"

    "ARC:ARC-Easy:train"            ARC("ARC-Easy", "train")
    "GSM8K:main:train*2"            GSM8K("main", "train") listed twice (two passes per epoch)
    "SmolTalk:train:0:10000"        SmolTalk("train", start=0, stop=10000)
    "SmolTalk:train::10000"         same (an empty field keeps the default)
    "ChitChat:train@0.5"            ChitChat("train") with mixture weight 0.5: half of it per epoch
    "SpellingBee:train:0:2000"      SpellingBee("train", start=0, stop=2000): synthetic, no download
    "CustomJSON:data/mine.jsonl"    CustomJSON("data/mine.jsonl")
    "data/chats.parquet"            the same for a bare path (any file read_rows reads, a save_to_disk folder,
                                    or owner/name of a hub dataset): CustomJSON("data/chats.parquet")
    'CustomJSON:"C:/my@data.jsonl"' a double-quoted field may hold ':', '@' and '*' (JSON string escapes apply)
    "my_pkg.my_module:MyTask:train" your own Task subclass, imported from my_pkg/my_module.py (working
                                    directory or sys.path), called as MyTask("train", start=0, step=1)

or, equivalently, a JSON/dict entry, which needs no quoting at all:

    {"task": "CustomJSON", "args": ["C:/my@data.jsonl"], "start": 0, "stop": 100, "repeats": 2, "weight": 0.5}
    {"task": "CustomJSON", "args": ["chats.csv"], "fields": {"messages_field": "dialog"}}   (column names: customjson)

Built-in tasks take a fixed number of string arguments (TASKS); a custom task's arguments fill its constructor's
positional parameters in order (an empty field keeps a parameter's default). Up to three integer fields after the
arguments slice the task. `*N` lists a task N times (nanochat's way to oversample); `@w` is a repetition
multiplier for TaskMixture (round(w * len) entries: 0.5 = a random half, 2.0 = two passes). A bad spec raises
MixtureSpecError (a UserError) naming the spec and what is wrong.
"""

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import sys

from nanochat.common import UserError
from nanochat.config import ConfigError
from tasks.common import DatasetNotFoundError, Task, TaskMixture, split_held_out

# task name -> (module, class name, names of its positional string arguments)
TASKS = {
    "ARC": ("tasks.arc", "ARC", ("subset", "split")),
    "MMLU": ("tasks.mmlu", "MMLU", ("subset", "split")),
    "GSM8K": ("tasks.gsm8k", "GSM8K", ("subset", "split")),
    "HumanEval": ("tasks.humaneval", "HumanEval", ()),
    "SmolTalk": ("tasks.smoltalk", "SmolTalk", ("split",)),
    "ChitChat": ("tasks.smoltalk", "ChitChat", ("split",)),  # SmolTalk's class on the mirror's data
    "SpellingBee": ("tasks.spelling_bee", "SpellingBee", ("split",)),
    "CustomJSON": ("tasks.customjson", "CustomJSON", ("filepath",)),
}
# the evaluation tasks of chat_eval (nanochat's names) -> their spec (the test splits, as nanochat)
EVAL_TASKS = {
    "ARC-Easy": "ARC:ARC-Easy:test",
    "ARC-Challenge": "ARC:ARC-Challenge:test",
    "MMLU": "MMLU:all:test",
    "GSM8K": "GSM8K:main:test",
    "HumanEval": "HumanEval",
    "SpellingBee": "SpellingBee:test",
}
# a task that cannot be had offline -> the mirror's stand-in with the same arguments
OFFLINE_REPLACEMENTS = {"SmolTalk": "ChitChat"}
SYNTAX = ("\"Name[:arg...][:start[:stop[:step]]][*repeats][@weight]\", e.g. \"SmolTalk:train:0:10000\", "
          "\"GSM8K:main:train*2\", \"ChitChat:train@0.5\", \"my_pkg.my_module:MyTask:train\"")


class MixtureSpecError(UserError, ValueError):
    """A train_mixture / val_mixture entry that does not follow the spec syntax, or names a task that cannot
    be built."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # a TASKS name, or "module:Class" for a custom task
    args: tuple
    start: int = 0
    stop: int | None = None
    step: int = 1
    repeats: int = 1
    weight: float | None = None
    fields: str | None = None  # CustomJSON's column mapping, as JSON (a dict spec's "fields")
    text: str = dataclasses.field(default="", compare=False)  # the spec as written, for messages


# ----------------------------------------------------------------------------------------------------------
# Parsing


def split_unquoted(text, separators):
    """Split `text` at the characters in `separators` that stand outside double quotes. Returns (pieces,
    separators found), e.g. 'a:"b:c"@2' with ':@' -> (['a', '"b:c"', '2'], [':', '@'])."""
    pieces, seps, current, quoted, escaped = [], [], [], False, False
    for ch in text:
        if quoted:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch in separators:
            pieces.append("".join(current))
            seps.append(ch)
            current = []
        else:
            current.append(ch)
    if quoted:
        raise ValueError("a double quote is not closed")
    pieces.append("".join(current))
    return pieces, seps


def unquote(field):
    """'"C:/a@b"' -> 'C:/a@b' (a JSON string); an unquoted field is stripped of spaces."""
    field = field.strip()
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return json.loads(field)
    if '"' in field:
        raise ValueError(f"field {field!r}: quote the whole field, \"like:this\"")
    return field


TASK_MODULE_ROOTS = ("tasks", "configs")  # where a spec may import a custom task from (+ NANOCHAT_TASK_MODULES)
MAX_REPEATS = 1000  # *N and @w bounds: nanochat oversamples by 2-4; a billion copies is a typo, not a mixture


def allowed_task_module(module_name, environ=os.environ):
    """Whether a mixture spec may import `module_name`: modules under tasks/ or configs/, or under a module listed
    in $NANOCHAT_TASK_MODULES (comma-separated). A config file is data: it must not import any module it names."""
    extra = [m.strip() for m in environ.get("NANOCHAT_TASK_MODULES", "").split(",") if m.strip()]
    return any(module_name == root or module_name.startswith(root + ".") for root in (*TASK_MODULE_ROOTS, *extra))


def _custom_arg_names(module_name, class_name, fail):
    """The positional parameter names of a custom Task subclass's constructor (start/stop/step excluded), and
    the class itself. Imports the module (only an allowed one: allowed_task_module): the working directory is
    searched too (as `python -m` does)."""
    if not allowed_task_module(module_name):
        raise fail(f"module '{module_name}' may not be imported by a mixture spec: custom tasks come from modules "
                   f"under tasks/ or configs/ (e.g. configs.my_task), or from modules listed in NANOCHAT_TASK_MODULES "
                   f"(comma-separated, e.g. NANOCHAT_TASK_MODULES={module_name.split('.')[0]})")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise fail(f"cannot import module '{module_name}' ({e}); the module must be importable from the "
                   f"working directory {os.getcwd()} or sys.path (a file {module_name.replace('.', '/')}.py)") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Task))
        hint = f"Task subclasses it defines: {', '.join(defined)}" if defined else "it defines no Task subclass"
        raise fail(f"module '{module_name}' has no class '{class_name}' ({hint})")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise fail(f"'{module_name}:{class_name}' is not a subclass of tasks.common.Task "
                   f"(write `class {class_name}(Task)` with `from tasks.common import Task`)")
    return positional_params(cls), cls


def positional_params(cls):
    """The names of a Task subclass's positional constructor parameters, start/stop/step excluded."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("start", "stop", "step"))


def is_data_path(name):
    """A spec name that is a data file, folder or hub dataset (owner/name) rather than a task: it has a data file
    extension, contains a path separator, or exists."""
    from nanochat.data_files import FILE_KINDS

    return (os.path.splitext(name)[1].lower() in FILE_KINDS or "/" in name or os.sep in name
            or os.path.exists(name))


def _is_custom_name(name):
    """A name that is not a registered task but names an importable module (e.g. 'my_pkg.my_module')."""
    if "." in name:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def parse_task_spec(spec, task_args=None):
    """One mixture entry (a spec string, or a dict {"task", "args", "start", "stop", "step", "repeats",
    "weight"}) -> a TaskSpec. `task_args` maps a task name to the names of its positional arguments (default:
    from TASKS); names outside it are custom tasks "module:Class"."""
    task_args = {k: v[2] for k, v in TASKS.items()} if task_args is None else task_args

    def fail(msg):
        return MixtureSpecError(f"mixture spec {spec!r}: {msg}. Syntax: {SYNTAX}, or a dict "
                                f"{{\"task\": ..., \"args\": [...], \"start\": ..., \"stop\": ...}}")

    if isinstance(spec, dict):
        return _parse_dict_spec(spec, task_args, fail)
    if not isinstance(spec, str) or not spec.strip():
        raise fail("expected a non-empty string")
    try:
        pieces, seps = split_unquoted(spec.strip(), ":*@")
    except ValueError as e:
        raise fail(str(e)) from None
    # the suffixes *repeats and @weight, in that order, at the end
    weight = repeats = None
    if seps and seps[-1] == "@":
        weight, pieces, seps = pieces[-1], pieces[:-1], seps[:-1]
    if seps and seps[-1] == "*":
        repeats, pieces, seps = pieces[-1], pieces[:-1], seps[:-1]
    if any(s != ":" for s in seps):
        raise fail("'*' and '@' may only end the spec, as *repeats then @weight (quote a field that holds them)")
    try:
        fields = [unquote(p) for p in pieces]
    except ValueError as e:
        raise fail(str(e)) from None
    name, rest = fields[0], fields[1:]
    if name in task_args:
        arg_names = task_args[name]
    elif is_data_path(name):  # a bare file, folder or hub dataset name: CustomJSON
        name, rest, arg_names = "CustomJSON", fields, ("filepath",)
    elif _is_custom_name(name):
        if not rest or not rest[0].isidentifier():
            raise fail(f"a custom task is written module:Class, e.g. \"{name}:MyTask\"")
        arg_names, _ = _custom_arg_names(name, rest[0], fail)
        name, rest = f"{name}:{rest[0]}", rest[1:]
    else:
        close = difflib.get_close_matches(name, list(task_args), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(task_args)}"
        raise fail(f"unknown task {name!r} ({hint}; your own Task subclass is written \"my_pkg.my_module:MyTask\")")
    custom = ":" in name
    args, slices = rest[: len(arg_names)], rest[len(arg_names):]
    if not custom:
        if len(args) < len(arg_names):
            raise fail(f"{name} needs {len(arg_names)} argument(s) ({', '.join(arg_names)}), got {len(args)}")
        for arg_name, arg in zip(arg_names, args):
            if not arg:
                raise fail(f"{name}: argument '{arg_name}' is empty")
    if len(slices) > 3:
        raise fail(f"too many fields: after {name}'s argument(s) ({', '.join(arg_names) or 'none'}) "
                   f"only start:stop:step may follow")
    values = {}
    for slice_name, value in zip(("start", "stop", "step"), slices):
        if value != "":
            values[slice_name] = value
    spec_kwargs = _check_numbers(values, repeats, weight, fail)
    return TaskSpec(name=name, args=tuple(args), text=spec if isinstance(spec, str) else json.dumps(spec),
                    **spec_kwargs)


def _parse_dict_spec(spec, task_args, fail):
    unknown = set(spec) - {"task", "args", "start", "stop", "step", "repeats", "weight", "fields"}
    if unknown or "task" not in spec:
        raise fail(f"a dict entry needs \"task\" and may have args, start, stop, step, repeats, weight, fields"
                   f"{' (unknown: ' + ', '.join(sorted(unknown)) + ')' if unknown else ''}")
    args = spec.get("args", [])
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise fail("\"args\" must be a list of strings")
    name = spec["task"]
    if not isinstance(name, str):
        raise fail("\"task\" must be a string")
    if name in task_args:
        if len(args) != len(task_args[name]):
            raise fail(f"{name} takes {len(task_args[name])} argument(s) ({', '.join(task_args[name])}), "
                       f"got {len(args)}")
    else:
        module_name, _, class_name = name.partition(":")
        if not class_name or not _is_custom_name(module_name):
            raise fail(f"unknown task {name!r} (known tasks: {', '.join(task_args)}; or \"module:Class\")")
        _custom_arg_names(module_name, class_name, fail)
    values = {k: spec[k] for k in ("start", "stop", "step") if spec.get(k) is not None}
    kwargs = _check_numbers(values, spec.get("repeats"), spec.get("weight"), fail)
    if spec.get("fields") is not None:
        if name != "CustomJSON" or not isinstance(spec["fields"], dict):
            raise fail("\"fields\" (a dict of column names, see tasks/customjson.py) is for CustomJSON only")
        kwargs["fields"] = json.dumps(spec["fields"], sort_keys=True)
    return TaskSpec(name=name, args=tuple(args), text=json.dumps(spec), **kwargs)


def _check_numbers(slices, repeats, weight, fail):
    """Slice fields, repeats and weight (strings from a spec string, or numbers from a dict) -> TaskSpec kwargs."""
    out = {}
    for key, value in slices.items():
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise fail(f"{key} {value!r} is not an integer") from None
        if isinstance(value, (bool, float)) or number < 0:
            raise fail(f"{key} must be an integer >= 0, got {value!r}")
        out[key] = number
    if out.get("step", 1) < 1:
        raise fail("step must be >= 1")
    if out.get("stop") is not None and out["stop"] <= out.get("start", 0):
        raise fail(f"stop ({out['stop']}) must be greater than start ({out.get('start', 0)})")
    if repeats is not None:
        if not str(repeats).strip().isdigit() or not 1 <= int(repeats) <= MAX_REPEATS:
            raise fail(f"repeats {str(repeats).strip()!r} must be a positive integer of at most {MAX_REPEATS}")
        out["repeats"] = int(repeats)
    if weight is not None:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise fail(f"weight {str(weight).strip()!r} is not a number") from None
        if not (0 < w <= MAX_REPEATS):
            raise fail(f"weight must be a positive number of at most {MAX_REPEATS}, got {w}")
        out["weight"] = w
    return out


# ----------------------------------------------------------------------------------------------------------
# Building


def task_class(name, registry=None):
    """The class of a parsed task name: from `registry` (tests), TASKS, or a custom "module:Class"."""
    if registry is not None:
        return registry[name]
    if name in TASKS:
        module, class_name, _ = TASKS[name]
        return getattr(importlib.import_module(module), class_name)
    module_name, _, class_name = name.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_task(task_spec, registry=None):
    """Instantiate a TaskSpec. Data loading errors propagate (DatasetNotFoundError, ValueError from a bad file)."""
    cls = task_class(task_spec.name, registry)
    kwargs = {"start": task_spec.start, "step": task_spec.step}
    if task_spec.stop is not None:
        kwargs["stop"] = task_spec.stop
    if task_spec.fields is not None:
        kwargs["fields"] = task_spec.fields
    if ":" not in task_spec.name:
        return cls(*task_spec.args, **kwargs)
    # a custom task: its arguments by parameter name; an empty field keeps that parameter's default
    kwargs.update({name: value for name, value in zip(positional_params(cls), task_spec.args) if value != ""})
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise MixtureSpecError(f"mixture spec {task_spec.text!r}: {task_spec.name}{inspect.signature(cls)} "
                               f"cannot be called with {kwargs}: {e}") from None


def mixture_of(parsed, tasks, mixture_cls=TaskMixture):
    """Parsed specs and their built tasks -> one TaskMixture: each task listed `repeats` times; weights (1.0
    where not given) passed only when some spec has one."""
    listed, weights = [], []
    for p, task in zip(parsed, tasks):
        listed.extend([task] * p.repeats)
        weights.extend([1.0 if p.weight is None else p.weight] * p.repeats)
    if any(p.weight is not None for p in parsed):
        return mixture_cls(listed, weights=weights)
    return mixture_cls(listed)


def build_mixture(specs, registry=None, task_args=None, mixture_cls=TaskMixture):
    """A list of specs -> one TaskMixture. registry/task_args/mixture_cls are for tests."""
    if not isinstance(specs, (list, tuple)) or len(specs) == 0:
        raise MixtureSpecError(f"a mixture must be a non-empty list of spec strings, got {specs!r}")
    parsed = [parse_task_spec(s, task_args) for s in specs]
    return mixture_of(parsed, [build_task(p, registry) for p in parsed], mixture_cls)


def offline_replacement(raw_spec, task_spec):
    """The spec (as written: a string or a dict) with the offline stand-in of its task, same arguments,
    slices, repeats and weight; None if the task has no stand-in."""
    new_name = OFFLINE_REPLACEMENTS.get(task_spec.name)
    if new_name is None:
        return None
    if isinstance(raw_spec, dict):
        return {**raw_spec, "task": new_name}
    text = raw_spec.strip()
    return new_name + text[len(task_spec.name):]


def check_mixture_specs(mixtures):
    """{config key: list of specs}, checked before anything is loaded: a ConfigError for an empty list, a
    MixtureSpecError naming the first spec that does not parse. Loads no data."""
    for key, specs in mixtures.items():
        if not specs:
            raise ConfigError(f"{key} is empty: give at least one mixture spec, e.g. [\"ChitChat:train\"]")
        for spec in specs:
            parse_task_spec(spec)


def build_mixtures(mixtures, optional=(), held_out=None):
    """{config key: list of specs} -> ({key: TaskMixture}, {key: [(spec text, task, entries in the mixture)]},
    notes), loading every task once. Specs in `optional` whose data is missing are dropped with a note.
    held_out = (train key, validation key, share): when none of the validation key's specs could be loaded (all
    optional and missing, or the list is empty), about `share` of the training conversations become the
    validation mixture instead (split_held_out: deterministic, never also trained on), with a note. When data
    of other specs is missing, ONE MixtureSpecError names every missing entry and the replacement lists for all the mixtures at once (in config syntax);
    other loading errors name the key and the spec."""
    parsed = {}
    for key, specs in mixtures.items():
        if not isinstance(specs, (list, tuple)):
            raise MixtureSpecError(f"{key} must be a list of mixture specs, got {specs!r}")
        try:
            parsed[key] = [parse_task_spec(s) for s in specs]
        except MixtureSpecError as e:
            raise MixtureSpecError(f"{key}: {e}") from None
    built, missing, notes, skipped = {}, {}, [], []
    for key, specs in parsed.items():
        if not specs and not (held_out is not None and key == held_out[1]):  # [] asks for the held-out share
            raise MixtureSpecError(f"{key} is empty: give at least one mixture spec")
        built[key] = []
        for p, raw in zip(specs, mixtures[key]):
            try:
                built[key].append((p, build_task(p)))
            except DatasetNotFoundError as e:
                if raw in optional:
                    reason = str(e).split(". Fix:")[0]  # the loader's fix is for data that is required
                    notes.append(f"Skipping {key} entry {p.text!r}: its data is not available ({reason})")
                    skipped.append(p)
                else:
                    missing.setdefault(key, []).append((p, e))
            except (OSError, ValueError) as e:
                if isinstance(e, UserError):
                    raise
                raise MixtureSpecError(f"{key} entry {p.text!r}: {e}") from None
    if missing:
        what = "; ".join(f"{key} entry {p.text!r}" for key, items in missing.items() for p, _ in items)
        first = next(iter(missing.values()))[0][1]
        fixes = []
        for key, specs in parsed.items():
            lost = [p for p, _ in missing.get(key, [])] + skipped  # optional ones too: the fix names every stand-in
            new = [raw if p not in lost else offline_replacement(raw, p) for p, raw in zip(specs, mixtures[key])]
            fixes.append(f"{key} = {json.dumps([s for s in new if s is not None])}")
        reason = str(first).split(". Fix:")[0]  # the loader's own fix is replaced by the specs below
        raise MixtureSpecError(f"no data for {what} ({reason}). Use instead: {'  '.join(fixes)}")
    held_parts = None
    if held_out is not None and not built.get(held_out[1]) and built.get(held_out[0]):
        train_key, val_key, share = held_out
        try:
            kept, held = split_held_out([t for _, t in built[train_key]], share)
        except ValueError as e:
            raise MixtureSpecError(f"{val_key}: no data, and {e} of {train_key}; give {val_key}") from None
        built[train_key] = [(p, k) for (p, _), k in zip(built[train_key], kept)]
        held_parts = [(f"held out of {p.text}", h, len(h)) for (p, _), h in zip(built[train_key], held) if len(h)]
        del built[val_key]
        notes.append(f"{val_key}: its data is not available, so {sum(n for *_, n in held_parts)} conversations "
                     f"(about {share:.0%} of {train_key}'s, chosen by content hash) are held out of training and "
                     f"used for validation")
    for key, items in built.items():
        if not items:
            raise MixtureSpecError(f"{key}: no data left after dropping unavailable entries {optional}")
    out = {key: mixture_of([p for p, _ in items], [t for _, t in items]) for key, items in built.items()}
    parts = {key: [(p.text, t, round((1.0 if p.weight is None else p.weight) * len(t)) * p.repeats)
                   for p, t in items] for key, items in built.items()}
    if held_parts is not None:
        out[held_out[1]] = TaskMixture([t for _, t, _ in held_parts])
        parts[held_out[1]] = held_parts
    return out, parts, notes


def spec_locator(mixture, parts):
    """For render_share: entry index of `mixture` -> (k, i), the spec parts[k] (build_mixtures' list for that
    mixture) it comes from and which conversation of its task, so an entry a spec repeats is known as the same."""
    spec_of = {id(task): k for k, (_, task, _) in enumerate(parts)}

    def locate(index):
        task, i = mixture.locate(index)
        return spec_of[id(mixture.tasks[task])], i
    return locate


def load_eval_task(task_name):
    """One of chat_eval's tasks (EVAL_TASKS) by its nanochat name, e.g. "ARC-Easy"."""
    if task_name not in EVAL_TASKS:
        raise MixtureSpecError(f"unknown evaluation task {task_name!r}; expected one of {', '.join(EVAL_TASKS)}")
    return build_task(parse_task_spec(EVAL_TASKS[task_name]))


def parse_eval_spec(spec):
    """chat_sft's eval_metrics_tasks entry "Name[:max_problems]" -> (name, max_problems or None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MixtureSpecError(f"eval_metrics_tasks entry {spec!r}: expected \"Name[:max_problems]\"")
    name, _, limit = spec.strip().partition(":")
    if name not in EVAL_TASKS:
        raise MixtureSpecError(f"eval_metrics_tasks entry {spec!r}: unknown task {name!r}, expected one of "
                               f"{', '.join(EVAL_TASKS)}")
    if not limit:
        return name, None
    if not limit.isdigit() or int(limit) < 1:
        raise MixtureSpecError(f"eval_metrics_tasks entry {spec!r}: max_problems {limit!r} must be a positive integer")
    return name, int(limit)
