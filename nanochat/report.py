"""
The report card: every stage of the pipeline logs a markdown section under <base_dir>/report/, and
`generate` assembles them into report.md with a header, a summary table, the total wall-clock time and
PNG plots of the loss curves.

    python -m nanochat.report reset       # start of a run: clear the report dir, write the header
    python -m nanochat.report generate    # end of a run: write <base_dir>/report/report.md

From a script (rank 0 writes, other ranks get a DummyReport whose methods do nothing):

    from nanochat.report import get_report
    report = get_report()
    report.log(section="Base model training", data=[config, {"Number of parameters": n, "Final val bpb": 0.91}])
    report.log_series("Base model training", "train_loss", steps, values)   # for the plots
    report.log_series("Base model training", "val_bpb", val_steps, val_values)

`log(section, data, duration_s=None)`: data is a list of dicts (written as `- key: value` lines, floats to 4
decimals) and strings (written as they are); duration_s (the stage's wall-clock seconds) is written as a
`duration: ...` line. Logging the same section again replaces it.
`merge_task_results(section, results)`: evaluation results are kept per task in <slug>.results.json, so an
evaluation of a subset of the tasks updates those and keeps the others; format_task_results() renders them
as `- Task: value` lines, a result on a subset of the problems (`-x N`) marked `(-x N)`, which the summary
table shows too.
`log_series(section, name, steps, values)`: stores one curve (two equal-length lists of numbers) for the
section in <slug>.series.json; `generate` draws one PNG per section with all its curves, in
report/plots/<slug>.png, linked from report.md. Names starting with "train" go on the left panel, the
others (validation loss / bpb) on the right one.

Summary table rows (CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE) are parsed from the
`- key: value` lines: keys are matched case-insensitively ignoring punctuation and a trailing "acc" or
"metric" ("ARC-Easy", "arc_easy_acc" and "ChatCORE metric" all match). Columns read, first hit wins:
BASE <- "Base model evaluation", "Base model training", "Chat evaluation base"; MID <- "Chat evaluation mid",
"Midtraining"; SFT <- "Chat evaluation sft", "Chat SFT"; RL <- "Chat evaluation rl", "Chat RL". Missing values
show "-".

"Total wall clock time" is the sum of the stages' times: the entries of the "Stage timings" section that
speedrun.sh writes when there is one, else the `duration:` lines of the sections (not the time from the
reset to the report's generation, which counts idle time between stages).

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
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model loss",
    "Base model evaluation",
    "Midtraining",
    "Chat evaluation mid",
    "Chat evaluation base",
    "Chat SFT",
    "Chat evaluation sft",
    "Chat RL",
    "Chat evaluation rl",
]

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


def parse_section(text):
    """(timestamp or None, {key: value-string}) from a section's markdown."""
    timestamp = None
    values = {}
    for line in text.splitlines():
        if line.startswith("timestamp: ") and timestamp is None:
            timestamp = line[len("timestamp: "):].strip()
        m = re.match(r"^- (.+?): (.*)$", line)
        if m:
            values[m.group(1).strip()] = m.group(2).strip()
    return timestamp, values


def parse_duration(text):
    """The `duration: 12.3s` line of a section's markdown, in seconds, or None."""
    m = re.search(r"^duration: ([0-9.]+)s$", text, flags=re.M)
    return float(m.group(1)) if m else None


def parse_metric_value(text):
    """'0.2500' -> (0.25, None); '0.2500 (-x 20)' -> (0.25, '-x 20'); not a number -> (None, None)."""
    m = re.fullmatch(r"\s*([-+]?[0-9.]+(?:[eE][-+]?\d+)?)\s*(?:\((.*)\))?\s*", text)
    if not m:
        return None, None
    try:
        value = float(m.group(1))
    except ValueError:
        return None, None
    subset = re.search(r"-x \d+", m.group(2) or "")
    return value, (subset.group(0) if subset else None)


def find_metric_cell(values, metric):
    """(value, subset note or None) of `metric` among a section's parsed values, or (None, None)."""
    want = metric_name_key(metric)
    for key, value in values.items():
        if metric_name_key(key) == want:
            return parse_metric_value(value)
    return None, None


def find_metric(values, metric):
    """The float value of `metric` among a section's parsed values, or None."""
    return find_metric_cell(values, metric)[0]


def merge_task_results(old, new):
    """Per-task results {task: {"value", "max_problems", "checkpoint"}}: the new ones replace the old ones of
    the same task; tasks not evaluated again keep their old result."""
    merged = dict(old)
    merged.update(new)
    return merged


def format_task_results(results, checkpoint=None):
    """{task: '0.2500'} lines for a section; a result on a subset is marked '(-x N)', one from another
    checkpoint than `checkpoint` (the one just evaluated) names its own."""
    lines = {}
    for task, r in results.items():
        notes = []
        if r.get("max_problems") is not None:
            notes.append(f"-x {r['max_problems']}")
        if checkpoint is not None and r.get("checkpoint") not in (None, checkpoint):
            notes.append(f"from {r['checkpoint']}")
        lines[task] = f"{r['value']:.4f}" + (f" ({', '.join(notes)})" if notes else "")
    return lines


def summary_table(section_values):
    """Markdown table `Metric | BASE | MID | SFT` from {section: {key: value}}; missing -> '-'."""
    lines = ["| Metric | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for metric in SUMMARY_METRICS:
        cells = []
        for sections in SUMMARY_COLUMNS.values():
            value, subset = None, None
            for section in sections:
                if section in section_values:
                    value, subset = find_metric_cell(section_values[section], metric)
                    if value is not None:
                        break
            cells.append("-" if value is None else f"{value:.4f}" + (f" ({subset})" if subset else ""))
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def total_stage_seconds(sections):
    """The sum of the stages' times: the "Stage timings" section's entries (speedrun.sh) except its total,
    else the sections' `duration:` lines; None when no stage recorded its time."""
    if "Stage timings" in sections:
        _, values = parse_section(sections["Stage timings"])
        times = [float(v) for k, v in values.items() if k != "total (s)" and re.fullmatch(r"[0-9.]+", v)]
        if times:
            return sum(times)
    durations = [d for d in (parse_duration(text) for text in sections.values()) if d is not None]
    return sum(durations) if durations else None


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
    """A report directory of section files (<slug>.md), loss curves (<slug>.series.json) and a header."""

    def __init__(self, report_dir):
        self.report_dir = report_dir

    def _now(self):
        return datetime.datetime.now().strftime(TIME_FORMAT)

    def log(self, section, data, duration_s=None):
        """Write (or replace) the markdown section; returns its path."""
        os.makedirs(self.report_dir, exist_ok=True)
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        atomic_write_text(path, render_section(section, data, self._now(), duration_s))
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
        """{section title: markdown} of every logged section, in pipeline order."""
        found = {}
        if not os.path.isdir(self.report_dir):
            return found
        for fname in os.listdir(self.report_dir):
            if not fname.endswith(".md") or fname in (HEADER_FILE, "report.md"):
                continue
            with open(os.path.join(self.report_dir, fname), encoding="utf-8") as f:
                text = f.read()
            title = text.splitlines()[0][3:].strip() if text.startswith("## ") else fname[:-3]
            found[title] = text
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))

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
        sections = self._sections()
        parsed = {title: parse_section(text) for title, text in sections.items()}

        out = [header.rstrip(), "", f"Report generated: {self._now()}", "", "## Summary", "", summary_table({k: v for k, (_, v) in parsed.items()}), ""]
        total = total_stage_seconds(sections)
        if total is not None:
            out.append(f"Total wall clock time: {format_duration(total)} (sum of the stages' times)")
        else:
            out.append("Total wall clock time: unknown (no stage recorded its time)")
        out.append("")

        series = self._series()
        if series:
            out += ["## Loss curves", ""]
            for section, curves in series.items():
                rel = os.path.join("plots", slugify(section) + ".png")
                plot_series(curves, section, os.path.join(self.report_dir, rel))
                out.append(f"![{section}]({rel})")
                out.append("")

        for text in sections.values():
            out += [text.rstrip(), ""]
        path = os.path.join(self.report_dir, "report.md")
        atomic_write_text(path, "\n".join(out))
        return path


class DummyReport:
    """What non-zero ranks get: every method does nothing."""

    def log(self, *args, **kwargs):
        return None

    def merge_task_results(self, *args, **kwargs):
        return None

    def log_series(self, *args, **kwargs):
        return None

    def reset(self, *args, **kwargs):
        return None

    def generate(self, *args, **kwargs):
        return None


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


def main(argv=None):
    parser = argparse.ArgumentParser(description="nanochat report card: reset at the start of a run, generate at the end")
    parser.add_argument("command", choices=["reset", "generate"])
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        print(f"Report reset: {report.reset()}")
    else:
        path = report.generate()
        print(f"Report written to {path}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        m = re.search(r"## Summary\n\n(.*?)\n\n", text, flags=re.S)
        if m:
            print(m.group(1))


if __name__ == "__main__":
    sys.exit(main())
