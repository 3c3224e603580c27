"""Bad data, caught before anything trains or is written: the file, the first bad row, the fix.

Two passes. :func:`check_file` reads a local text file as bytes before ``datasets`` parses it
(an empty file, bytes that are not UTF-8, a JSON line that does not parse); :func:`check_rows`
reads the parsed splits (a missing text or label, a label that is not a number for regression,
a label column that mixes numbers and words, a class that only validation has). Each finding is
one :class:`RankoptError` naming the file and the row (1-based, as a spreadsheet counts data
rows; for a CSV also its line, the header being line 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets

from rankopt.config import TaskConfig
from rankopt.errors import RankoptError

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check_file(path: Path) -> None:
    """Raise on an empty file, non-UTF-8 bytes or (JSON lines) a line that is not a JSON object."""
    path = Path(path)
    if path.suffix not in TEXT_SUFFIXES:
        return  # parquet: binary, and pyarrow's own error names the problem
    json_lines = path.suffix == ".jsonl" or (path.suffix == ".json" and not _starts_with(path, b"["))
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RankoptError(f"{path} line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                   f"column {exc.start + 1}); save the file as UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte order mark: datasets reads past it, so do we
            if not line.strip():
                continue
            rows += 1
            if json_lines:
                _check_json_line(path, number, line)
    if rows == 0 or (path.suffix == ".csv" and rows == 1):
        what = "has a header but no rows" if rows == 1 else "is empty"
        raise RankoptError(f"{path} {what}; add examples to it (one per line)")
    if path.suffix == ".csv":
        _check_csv_fields(path)
    elif path.suffix == ".json" and not json_lines:
        _check_json_list(path)


def _check_json_list(path: Path) -> None:
    """A .json file holding one list: of objects, at least one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise RankoptError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}, line {getattr(exc, 'lineno', '?')}); "
                           "write a list of objects, or one object per line (.jsonl)") from None
    if not value:
        raise RankoptError(f"{path} is an empty list; add examples to it")
    bad = next((i for i, item in enumerate(value) if not isinstance(item, dict)), None)
    if bad is not None:
        raise RankoptError(f"{path} item {bad + 1} is a JSON {type(value[bad]).__name__}, not an object; write a "
                           "list of objects such as {\"text\": \"...\", \"label\": 0}")


def _check_csv_fields(path: Path) -> None:
    """Every CSV row has the header's number of fields (a stray comma, a quote never closed)."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                raise RankoptError(f"{path} line {start} has {len(row)} field(s), the header {len(header)}; put a "
                                   "field holding a comma in double quotes, and close every quote")
            start = reader.line_num + 1


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").startswith(prefix)


def _check_json_line(path: Path, number: int, line: str) -> None:
    try:
        value = json.loads(line)
    except ValueError as exc:
        raise RankoptError(f"{path} line {number} is not valid JSON ({exc.msg}, column {exc.colno}); "
                           "write one JSON object per line") from None
    if not isinstance(value, dict):
        raise RankoptError(f"{path} line {number} is a JSON {type(value).__name__}, not an object; write one "
                           "object per line, such as {\"text\": \"...\", \"label\": 0}")


def where(source: str, index: int) -> str:
    """``source`` row ``index + 1`` (and its line, for a CSV file)."""
    line = f" (line {index + 2})" if source.endswith(".csv") else ""
    return f"{source} row {index + 1}{line}"


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def check_rows(task: TaskConfig, raw: datasets.DatasetDict, sources: dict[str, str]) -> None:
    """Raise on the first bad row of the train and eval splits (the test split has its own rules)."""
    for role in ("train", "eval"):
        split, source = raw[role], sources[role]
        if len(split) == 0:
            raise RankoptError(f"{source} has no rows; add examples to it")
        label = task.response_column if task.type == "causal_lm" else task.label_column
        for column in task.columns():
            if column == label and task.type != "causal_lm":
                continue
            if split.data.column(column).null_count:
                index = next(i for i, v in enumerate(_values(split, column)) if v is None)
                raise RankoptError(f"{where(source, index)} has no '{column}'; fill it in or drop the row")
        if task.type != "causal_lm":
            _check_labels(task, _values(split, label), source)
    if task.type == "classification":
        _check_classes_seen(task, raw, sources)


def _values(split: datasets.Dataset, column: str) -> list:
    """One column as Python values, read at once (iterating ``split[column]`` reads row by row: slow)."""
    return split.select_columns([column]).to_dict()[column]


def _check_labels(task: TaskConfig, values: list, source: str) -> None:
    column = task.label_column
    for index, value in enumerate(values):
        if _missing(value):
            raise RankoptError(f"{where(source, index)} has no label in column '{column}'; fill it in or drop "
                               "the row")
        if task.type == "regression" and not (_is_number(value) and math.isfinite(float(value))):
            raise RankoptError(f"{where(source, index)} has label {value!r}, not a finite number; a regression "
                               "task needs a number in every row: fix the row or drop it")
    if task.type != "classification":
        return
    for index, value in enumerate(values):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                not (math.isfinite(value) and float(value).is_integer() and value >= 0):
            raise RankoptError(f"{where(source, index)} has label {value!r}; a classification label is a class "
                               "id 0..K-1 or a name: fix the row (or set task.type=regression for scores)")
    numbers = [i for i, v in enumerate(values) if _is_number(v)]
    words = [i for i, v in enumerate(values) if not _is_number(v)]
    if numbers and words:
        n, w = numbers[0], words[0]
        raise RankoptError(f"{source} mixes numbers and words in label column '{column}' (row {n + 1}: "
                           f"{values[n]!r}, row {w + 1}: {values[w]!r}); use one kind: class ids 0..K-1 or names")


def _check_classes_seen(task: TaskConfig, raw: datasets.DatasetDict, sources: dict[str, str]) -> None:
    """A class that validation has and training never shows cannot be learned: name its first row."""
    seen = {_key(v) for v in _values(raw["train"], task.label_column)}
    for index, value in enumerate(_values(raw["eval"], task.label_column)):
        if _key(value) not in seen:
            raise RankoptError(f"{where(sources['eval'], index)} has label {value!r}, which no row of "
                               f"{sources['train']} has; fix the row, or add training rows of that class")


def _key(value):
    """Labels compared as the model sees them: 1 and 1.0 alike, names as they are."""
    return float(value) if _is_number(value) and not isinstance(value, str) else value
