"""
Rows of a data file, whatever it is stored in: `read_rows(path) -> list[dict]`, used by tasks/customjson.py
(conversations) and the DPO loader (preference pairs). What a row means is the caller's business.

    .jsonl / .ndjson        one JSON value per line (blank lines skipped); errors name file:line
    .json                   a JSON array of rows, or JSON Lines under a .json name
    .parquet                pyarrow.parquet
    .csv / .tsv             pyarrow.csv (cells holding JSON, e.g. a messages column, are decoded by the caller)
    .arrow                  an Arrow IPC file or stream (what `datasets` writes)
    a folder                `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` output
                            (load_from_disk; a DatasetDict gives its `split`)
    owner/name              a Hugging Face hub dataset (not a local path): from the mirror
                            $NANOCHAT_DATA_DIR/owner/name/<subset or default>/<split>.jsonl when present,
                            else datasets.load_dataset (tasks.common.load_rows, as every other loader)

A bad file raises DataFileError (a UserError): "path:line: what is wrong" for JSON Lines, "path: row N: ..."
elsewhere. Tests: tests/test_data_files.py.
"""

import json
import os
import re

from nanochat.common import UserError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
              ".csv": "csv", ".tsv": "tsv", ".arrow": "arrow"}
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DataFileError(UserError, ValueError):
    """A data file that cannot be read; the message names the file (and line or row)."""


class DataFileMissing(UserError, FileNotFoundError):
    """No such file or folder, and not a dataset name."""


def _decode_error(error):
    if isinstance(error, UnicodeDecodeError):
        return (f"not UTF-8: byte 0x{error.object[error.start]:02x} at column {error.start + 1}; "
                f"save the file as UTF-8")
    return f"invalid JSON ({error})"


def _read_json_lines(path, lines=None, errors=None):
    rows = []
    with open(path, "rb") as f:  # bytes, decoded per line: a non-UTF-8 byte is reported with its line
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append(json.loads(line))
                    if lines is not None:
                        lines.append(line_no)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                if errors is None:
                    raise DataFileError(f"{path}:{line_no}: {_decode_error(e)}") from None
                errors.append(f"{path}:{line_no}: {_decode_error(e)}")
    return rows


def _read_json(path, lines):
    """A JSON array (or an object holding one list of rows, e.g. {"data": [...]}), else JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"[") and not head.startswith(b"{"):
        return _read_json_lines(path, lines)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: {_decode_error(e)}") from None
    except json.JSONDecodeError as e:
        if head.startswith(b"{") and e.msg == "Extra data":  # one object per line: JSON Lines named .json
            return _read_json_lines(path, lines)
        raise DataFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, list):
        return data
    lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if len(lists) == 1:
        return data[lists[0]]
    return [data]


def _read_table(path, kind):
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if kind in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
            return pacsv.read_csv(path, parse_options=parse).to_pylist()
        import pyarrow.ipc as ipc

        try:
            with pa.memory_map(path) as source:
                return ipc.open_file(source).read_all().to_pylist()
        except pa.ArrowInvalid:
            with pa.memory_map(path) as source:
                return ipc.open_stream(source).read_all().to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"{path}: cannot read as {kind} ({str(e).splitlines()[0]})") from None


def _read_saved_dataset(path, split):
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataFileError(f"{path}: a folder, but not one written by datasets' save_to_disk ({e}); give a "
                            f"file instead (.jsonl, .json, .parquet, .csv, .arrow)") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataFileError(f"{path}: a DatasetDict without split {split!r} (splits: {', '.join(data)}); "
                                f"pick one with split=...")
        data = data[split]
    return data.to_list()


def read_rows(path, split="train", subset=None, line_numbers=False, errors=None):
    """The rows of a data file, folder or hub dataset (module docstring), as a list (dicts; a JSON Lines row
    may also be a list, e.g. a bare message list). `split` picks the split of a DatasetDict folder or a hub
    dataset; `subset` the hub dataset's configuration. With line_numbers=True returns (rows, lines): lines[i]
    is row i's line in a JSON Lines file, or lines is None where the format has no lines. `errors` (a list):
    unreadable JSON Lines are appended to it as "file:line: what" and skipped, instead of raising."""
    lines = [] if line_numbers else None
    rows = _read_any(os.fspath(path), split, subset, lines, errors)
    if not line_numbers:
        return rows
    return rows, (lines if lines and len(lines) == len(rows) else None)


def _read_any(path, split, subset, lines, errors):
    if os.path.isdir(path):
        return _read_saved_dataset(path, split)
    if not os.path.isfile(path):
        kind = FILE_KINDS.get(os.path.splitext(path)[1].lower())
        if kind is None and HUB_NAME.fullmatch(path) and not path.startswith("."):
            from tasks.common import DatasetNotFoundError, load_rows

            try:
                return load_rows(path, subset, split).to_list()
            except DatasetNotFoundError as e:
                raise DataFileMissing(f"{path}: no such file or folder, and as a Hugging Face dataset name: {e}") \
                    from None
        raise DataFileMissing(f"no such file or folder {path!r} (relative paths are from {os.getcwd()}; a hub "
                              f"dataset is written owner/name)")
    kind = FILE_KINDS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataFileError(f"{path}: unknown file type {os.path.splitext(path)[1] or '(no extension)'!r}; "
                            f"expected one of {', '.join(sorted(FILE_KINDS))} or a save_to_disk folder")
    if kind == "jsonl":
        return _read_json_lines(path, lines, errors)
    if kind == "json":
        return _read_json(path, lines)
    return _read_table(path, kind)
