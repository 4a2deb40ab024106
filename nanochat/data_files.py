"""
Reading rows of user data files (a list of dicts, one per record).

minimal version; replaced by the full loader at merge (JSONL and Parquet only here).
Row i of the result is line i + 1 of a JSONL file (blank lines are an error, not skipped, so that the numbers
agree) and row i + 1 of a Parquet file. Tests: tests/test_dpo.py.
"""

import json
import os

from nanochat.common import UserError


def read_rows(path):
    """-> list of dicts: the records of a .jsonl / .json-lines or .parquet file, in file order. A missing file,
    an unknown extension or a line that is not a JSON object is a UserError naming `path:line`."""
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist: check the path")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001  (any arrow failure: the file is not a readable Parquet file)
            raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if not path.endswith((".jsonl", ".json")):
        raise UserError(f"{path}: unsupported file type; use .jsonl (one JSON object per line) or .parquet")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                what = "an empty line" if not line.strip() else f"not JSON ({e.msg}, column {e.colno})"
                raise UserError(f"{path}:{lineno}: {what}; each line must hold one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows
