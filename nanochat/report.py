"""
The report card: every stage of the pipeline logs a markdown section under <base_dir>/report/, and
`generate` assembles them into report.md with a header, a summary table, the total wall-clock time and
PNG plots of the loss curves.

    python -m nanochat.report reset       # start of a run: clear the report dir, write the header
    python -m nanochat.report timings tok_train=12 base_train=340   # the "Stage timings" section (speedrun.sh)
    python -m nanochat.report generate    # end of a run: write <base_dir>/report/report.md

From a script (rank 0 writes, other ranks get a DummyReport whose methods do nothing):

    from nanochat.report import get_report
    report = get_report()
    report.log(section="Base model training", data=[config, {"Number of parameters": n, "Final val bpb": 0.91}])
    report.log_series("Base model training", "train_loss", steps, values)   # for the plots
    report.log_series("Base model training", "val_bpb", val_steps, val_values)

`log(section, data, duration_s=None, metrics=None)`: data is a list of dicts (`- key: value` lines, floats to 4
decimals) and strings (as they are), duration_s the stage's wall-clock seconds. It writes <slug>.md for people
and <slug>.json for `generate` (title, timestamp, duration_s, the dicts' values, and `metrics`: {name: value or
{"value": v, "note": "-x 20"}}): the summary is built from data, never by reading the markdown back. Logging
a section again replaces both files.
`merge_task_results(section, results)`: evaluation results per task in <slug>.results.json, so evaluating a
subset of the tasks updates those and keeps the others (format_task_results / task_metrics render them, a
result on a subset of the problems marked `(-x N)`).
`log_series(section, name, steps, values)`: one curve in <slug>.series.json; `generate` draws one PNG per
section (report/plots/<slug>.png): "train*" curves on the left panel, the others (validation) on the right.

Summary table rows (CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE) come from the
sections' JSON: a section's `metrics` first, else its numeric values; names are matched case-insensitively ignoring
punctuation and a trailing "acc" or "metric" ("ARC-Easy", "arc_easy_acc" and "ChatCORE metric" all match).
Columns read, first hit wins: BASE <- "Base model evaluation", "Base model training", "Chat evaluation base";
MID <- "Chat evaluation mid", "Midtraining"; SFT <- "Chat evaluation sft", "Chat SFT"; RL <- "Chat evaluation
rl", "Chat RL". Missing values show "-".

"Total wall clock time" is the sum of the stages' times: the values of the "Stage timings" section that
speedrun.sh writes (stage-timings.json) when there is one, else the sections' duration_s (not the time from the
reset to the report's generation, which counts idle time between stages).

A section written before the JSON files existed (a <slug>.md alone) is still included in report.md as it is,
but adds nothing to the summary table or the total time; report.md lists such sections under the summary
(log them again, e.g. rerun the evaluation, to bring their figures back).

One concern in about 500 lines (over the ~450 guide): the section files and their data, the summary table,
the loss-curve plots and the environment header of one report card.
Tests: tests/test_report.py.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys

from nanochat.common import atomic_write_text, dist_rank_world, get_base_dir, get_git_commit

# Pipeline order of the sections in report.md (nanochat's names); unknown sections follow, sorted.
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss",
                 "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat evaluation base", "Chat SFT",
                 "Chat evaluation sft", "Chat RL", "Chat evaluation rl", "Chat DPO", "Chat evaluation dpo"]

SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
SUMMARY_COLUMNS = {
    "BASE": ["Base model evaluation", "Base model training", "Chat evaluation base"],
    "MID": ["Chat evaluation mid", "Midtraining"],
    "SFT": ["Chat evaluation sft", "Chat SFT"],
    "RL": ["Chat evaluation rl", "Chat RL"],
}

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
HEADER_FILE = "header.md"
CODE_EXTENSIONS = (".py", ".sh", ".md", ".toml", ".txt", ".rs", ".html")


def slugify(section):
    """'Chat evaluation sft' -> 'chat-evaluation-sft' (file names of the section and its plot)."""
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def metric_name_key(name):
    """Normalise a metric name for matching: 'ARC-Easy' / 'arc_easy_acc' -> 'arceasy', 'ChatCORE metric' -> 'chatcore'."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for suffix in ("accuracy", "metric", "acc"):
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_section(section, data, timestamp, duration_s=None):
    """Markdown of one section: title, timestamp (and duration), then each item (dict -> '- key: value'
    lines, str as is)."""
    lines = [f"## {section}", f"timestamp: {timestamp}"]
    if duration_s is not None:
        lines.append(f"duration: {duration_s:.1f}s")
    lines.append("")
    for item in data:
        if isinstance(item, dict):
            lines.extend(f"- {k}: {format_value(v)}" for k, v in item.items())
        else:
            lines.append(str(item))
        lines.append("")
    return "\n".join(lines)


def section_record(section, data, timestamp, duration_s=None, metrics=None):
    """The data `generate` keeps of a section (its <slug>.json): the title, timestamp, duration_s, the dicts'
    key/values (numbers stay numbers; what JSON cannot hold becomes its str) and the metrics, each as
    {"value": float, "note": str or None}."""
    values = {}
    for item in data:
        if isinstance(item, dict):
            values.update({str(k): _json_value(v) for k, v in item.items()})
    cells = {}
    for name, m in (metrics or {}).items():
        value, note = (m.get("value"), m.get("note")) if isinstance(m, dict) else (m, None)
        cells[name] = {"value": float(value), "note": note}
    return {"section": section, "timestamp": timestamp, "duration_s": duration_s, "values": values,
            "metrics": cells}


def _json_value(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return str(value)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_cell(record, metric):
    """(value, note or None) of `metric` in a section record: its `metrics` first, then its numeric values;
    (None, None) when the section does not have it."""
    want = metric_name_key(metric)
    for name, cell in record.get("metrics", {}).items():
        if metric_name_key(name) == want:
            return cell["value"], cell.get("note")
    for key, value in record.get("values", {}).items():
        if metric_name_key(key) == want and _is_number(value):
            return float(value), None
    return None, None


def merge_task_results(old, new):
    """Per-task results {task: {"value", "max_problems", "checkpoint"}}: the new ones replace the old ones of
    the same task; tasks not evaluated again keep their old result."""
    merged = dict(old)
    merged.update(new)
    return merged


def subset_note(result):
    """'-x N' for a task result on a subset of the problems, else None."""
    return f"-x {result['max_problems']}" if result.get("max_problems") is not None else None


def format_task_results(results, checkpoint=None):
    """{task: '0.2500'} lines for a section; a result on a subset is marked '(-x N)', one from another
    checkpoint than `checkpoint` (the one just evaluated) names its own."""
    lines = {}
    for task, r in results.items():
        notes = [subset_note(r)] if subset_note(r) else []
        if checkpoint is not None and r.get("checkpoint") not in (None, checkpoint):
            notes.append(f"from {r['checkpoint']}")
        lines[task] = f"{r['value']:.4f}" + (f" ({', '.join(notes)})" if notes else "")
    return lines


def task_metrics(results, checkpoint=None):
    """The summary table's cells of per-task results: {task: {"value", "note": '-x N' or None}}; a result from
    another checkpoint than `checkpoint` (the one just evaluated) is left out, so a column never mixes models."""
    return {task: {"value": r["value"], "note": subset_note(r)} for task, r in results.items()
            if checkpoint is None or r.get("checkpoint") in (None, checkpoint)}


def summary_table(records):
    """Markdown table `Metric | BASE | MID | SFT` from {section: record} (section_record); missing -> '-'. Each
    column shows one model: the first of its sections holding a summary metric, named in the "Model" row by that
    section's `checkpoint` value (else by the section's title)."""
    header = ["| Metric | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    chosen = []
    for sections in SUMMARY_COLUMNS.values():
        chosen.append(next((s for s in sections if s in records and
                            any(metric_cell(records[s], m)[0] is not None for m in SUMMARY_METRICS)), None))
    lines = []
    for metric in SUMMARY_METRICS:
        cells = []
        for section in chosen:
            value, note = metric_cell(records[section], metric) if section else (None, None)
            cells.append("-" if value is None else f"{value:.4f}" + (f" ({note})" if note else ""))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    models = [str(records[s]["values"].get("checkpoint", s)) if s else "-" for s in chosen]
    if any(m != "-" for m in models):
        lines.insert(0, "| Model | " + " | ".join(models) + " |")
    return "\n".join(header + lines)


def total_stage_seconds(records):
    """The sum of the stages' times: the "Stage timings" section's values (speedrun.sh) except its total,
    else the sections' duration_s; None when no stage recorded its time."""
    timings = records.get("Stage timings", {}).get("values", {})
    times = [v for k, v in timings.items() if k != "total (s)" and _is_number(v)]
    if times:
        return float(sum(times))
    durations = [r["duration_s"] for r in records.values() if _is_number(r.get("duration_s"))]
    return float(sum(durations)) if durations else None


def format_duration(seconds):
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def plot_series(series, title, path):
    """Write a PNG of a section's curves: {name: {"steps": [...], "values": [...]}}. Train curves on the
    left, validation curves on the right (their units differ: nats vs bits per byte)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    train = {k: v for k, v in series.items() if k.startswith("train")}
    other = {k: v for k, v in series.items() if not k.startswith("train")}
    panels = [(name, group) for name, group in (("training", train), ("validation", other)) if group]
    fig = Figure(figsize=(5 * len(panels), 3.5))
    for i, (panel_name, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, curve in sorted(group.items()):
            marker = "o" if len(curve["steps"]) <= 30 else None
            ax.plot(curve["steps"], curve["values"], label=name, marker=marker, markersize=3)
        ax.set_title(f"{title}: {panel_name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100, format="png")


# -----------------------------------------------------------------------------
# Environment facts for the header


def _run(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_files(root):
    """Source files of the repo: git's view (tracked + untracked, not ignored) when available, else a walk."""
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root)
    if listed is not None:
        paths = [p for p in listed.splitlines() if p]
    else:
        paths = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
            paths.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in filenames)
    return sorted(p for p in paths if p.endswith(CODE_EXTENSIONS) and os.path.isfile(os.path.join(root, p)))


def code_size(root):
    """(number of files, lines, characters) of the repo's source files."""
    files = code_files(root)
    lines = chars = 0
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        lines += text.count("\n")
        chars += len(text)
    return len(files), lines, chars


def system_info():
    """Lines describing the machine and software for the header."""
    import torch  # lazily: the report CLI should not pay for torch unless it writes a header

    root = repo_root()
    commit = get_git_commit()
    status = _run(["git", "status", "--porcelain"], cwd=root)
    dirty = "unknown" if status is None else ("dirty" if status.strip() else "clean")
    branch = (_run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root) or "unknown").strip()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    else:
        gpu = "none"
    n_files, n_lines, n_chars = code_size(root)
    return [
        f"- Hostname: {socket.gethostname()}",
        f"- Git commit: {commit} (branch {branch}, {dirty})",
        f"- Platform: {platform.platform()}",
        f"- CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        f"- GPU: {gpu}",
        f"- Python: {platform.python_version()}",
        f"- PyTorch: {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        f"- Code size: {n_files} files, {n_lines} lines, {n_chars} characters",
    ]


# -----------------------------------------------------------------------------
# Report


class Report:
    """A report directory of section files (<slug>.md for people, <slug>.json for `generate`), loss curves
    (<slug>.series.json), evaluation results (<slug>.results.json) and a header."""

    def __init__(self, report_dir):
        self.report_dir = report_dir

    def _now(self):
        return datetime.datetime.now().strftime(TIME_FORMAT)

    def log(self, section, data, duration_s=None, metrics=None):
        """Write (or replace) the section: its data (<slug>.json, written first: a markdown file without it
        reads as a section from before the JSON files) and its markdown; returns the markdown's path."""
        os.makedirs(self.report_dir, exist_ok=True)
        timestamp = self._now()
        record = section_record(section, data, timestamp, duration_s, metrics)
        atomic_write_text(os.path.join(self.report_dir, slugify(section) + ".json"), json.dumps(record, indent=1))
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        atomic_write_text(path, render_section(section, data, timestamp, duration_s))
        return path

    def merge_task_results(self, section, results):
        """Merge per-task results into the section's stored ones (<slug>.results.json); returns all of them."""
        os.makedirs(self.report_dir, exist_ok=True)
        path = os.path.join(self.report_dir, slugify(section) + ".results.json")
        old = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        merged = merge_task_results(old, results)
        atomic_write_text(path, json.dumps(merged, indent=2))
        return merged

    def log_series(self, section, name, steps, values):
        """Store one curve of `section` (for the plots); returns the series file's path."""
        steps, values = [float(s) for s in steps], [float(v) for v in values]
        assert len(steps) == len(values), f"series {name!r}: {len(steps)} steps but {len(values)} values"
        os.makedirs(self.report_dir, exist_ok=True)
        path = os.path.join(self.report_dir, slugify(section) + ".series.json")
        series = {"section": section, "series": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                series = json.load(f)
        series["series"][name] = {"steps": steps, "values": values}
        atomic_write_text(path, json.dumps(series))
        return path

    def reset(self):
        """Clear the report directory and write the header (with the run's start time)."""
        if os.path.isdir(self.report_dir):
            shutil.rmtree(self.report_dir)
        os.makedirs(self.report_dir, exist_ok=True)
        lines = ["# nanochat training report", "", f"Run started: {self._now()}", ""]
        lines += ["## Environment", ""] + system_info() + [""]
        atomic_write_text(os.path.join(self.report_dir, HEADER_FILE), "\n".join(lines))
        return os.path.join(self.report_dir, HEADER_FILE)

    def _sections(self):
        """(records, markdown) of every logged section in pipeline order: {title: record} from the <slug>.json
        files and {title: markdown} of the <slug>.md files. A markdown file without its JSON (written before
        the JSON files existed) is titled by its file name and has no record."""
        records, texts = {}, {}
        if os.path.isdir(self.report_dir):
            for fname in os.listdir(self.report_dir):
                if not fname.endswith(".md") or fname in (HEADER_FILE, "report.md"):
                    continue
                stem = os.path.join(self.report_dir, fname[:-3])
                title = fname[:-3]
                if os.path.exists(stem + ".json"):
                    with open(stem + ".json", encoding="utf-8") as f:
                        record = json.load(f)
                    title = record["section"]
                    records[title] = record
                with open(stem + ".md", encoding="utf-8") as f:
                    texts[title] = f.read()
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        slug_rank = {slugify(name): i for i, name in enumerate(SECTION_ORDER)}  # sections without a record
        order = lambda title: (rank.get(title, slug_rank.get(title, len(rank))), title)  # noqa: E731
        return dict(sorted(records.items(), key=lambda kv: order(kv[0]))), \
            dict(sorted(texts.items(), key=lambda kv: order(kv[0])))

    def summary(self):
        """The summary table (markdown) of the logged sections."""
        return summary_table(self._sections()[0])

    def _series(self):
        """{section: {name: curve}} of every logged series, in pipeline order."""
        found = {}
        if os.path.isdir(self.report_dir):
            for fname in os.listdir(self.report_dir):
                if fname.endswith(".series.json"):
                    with open(os.path.join(self.report_dir, fname), encoding="utf-8") as f:
                        data = json.load(f)
                    found[data["section"]] = data["series"]
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))

    def generate(self):
        """Write report.md (header, summary table, wall-clock time, plots, sections); returns its path."""
        os.makedirs(self.report_dir, exist_ok=True)
        header_path = os.path.join(self.report_dir, HEADER_FILE)
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            header = "# nanochat training report\n\n(no header: run `python -m nanochat.report reset` at the start)\n"
        records, texts = self._sections()
        out = [header.rstrip(), "", f"Report generated: {self._now()}", "", "## Summary", "",
               summary_table(records), ""]
        total = total_stage_seconds(records)
        if total is not None:
            out.append(f"Total wall clock time: {format_duration(total)} (sum of the stages' times)")
        else:
            out.append("Total wall clock time: unknown (no stage recorded its time)")
        out.append("")
        old = [f"`{name}.md`" for name in texts if name not in records]
        if old:
            out += [f"Sections written before the report kept their data ({', '.join(old)}) are included below "
                    "as they are, but not in the summary table or the total time: log them again (rerun the "
                    "stage) to bring their figures in.", ""]

        series = self._series()
        if series:
            out += ["## Loss curves", ""]
            for section, curves in series.items():
                rel = os.path.join("plots", slugify(section) + ".png")
                plot_series(curves, section, os.path.join(self.report_dir, rel))
                out.append(f"![{section}]({rel})")
                out.append("")

        for text in texts.values():
            out += [text.rstrip(), ""]
        path = os.path.join(self.report_dir, "report.md")
        atomic_write_text(path, "\n".join(out))
        return path


class DummyReport:
    """What non-zero ranks get: Report's methods, each doing nothing (returning None)."""

    def _nothing(self, *args, **kwargs):
        return None

    log = merge_task_results = log_series = reset = generate = summary = _nothing


def get_report(rank=None):
    """Report rooted at <base_dir>/report on rank 0, a DummyReport elsewhere. The rank defaults to the
    process group's, else $RANK (torchrun), else 0."""
    if rank is None:
        rank, _ = dist_rank_world()
        if rank == 0:
            rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


def stage_timings(pairs):
    """The "Stage timings" section's data from `name=seconds` strings, with their total."""
    timings = {}
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        timings[f"{name} (s)"] = int(seconds) if seconds.isdigit() else float(seconds)
    timings["total (s)"] = sum(timings.values())
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanochat report card: reset at the start of a run, generate at the end")
    parser.add_argument("command", choices=["reset", "timings", "generate"])
    parser.add_argument("timings", nargs="*", help="timings: the stages' times as name=seconds")
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        print(f"Report reset: {report.reset()}")
    elif args.command == "timings":
        print(f"Stage timings: {report.log('Stage timings', [stage_timings(args.timings)])}")
    else:
        path = report.generate()
        print(f"Report written to {path}")
        print(report.summary())


if __name__ == "__main__":
    sys.exit(main())
