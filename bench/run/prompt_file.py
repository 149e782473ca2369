"""A user's prompt file (JSONL, CSV/TSV, TXT, parquet) read line by line, with line numbers for errors.

    from bench.run.prompt_file import load_prompt_file
    mine = load_prompt_file("prompts.csv", column="caption").prompts

Screening (``bench.run.screen``) and explanation (``bench.run.explain``) read users' files with it;
``tasks.promptsets`` reads the shipped labelled sets with the same line parser.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import PromptFileError  # noqa: F401  (raised here; exit code 3, bench/errors.py)

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".parquet": "parquet"}
AUTO_COLUMNS = ("prompt", "caption", "text")  # column=null (None): first present, case-insensitive

@dataclass(frozen=True)
class PromptFile:
    """Result of :func:`load_prompt_file`. Line numbers are 1-based (parquet: row numbers)."""

    path: Path
    fmt: str
    column: str | None  # None for txt
    prompts: list[str]  # unchanged: not stripped, not deduplicated
    records: list[dict[str, Any]]  # full row of each good prompt ({"prompt": p} for txt)
    line_numbers: list[int]  # line of each good prompt (csv: line where the row ends)
    errors: list[tuple[int, str]]  # (line_no, message) of rejected lines; empty when strict


def load_prompt_file(path: str | Path, column: str | None = "prompt", fmt: str | None = None,
                     *, strict: bool = True) -> PromptFile:
    """Read prompts from a JSONL, CSV/TSV, TXT (one prompt per line) or parquet file.

    Args:
        column: field holding the prompt (ignored for txt); None: first of AUTO_COLUMNS present.
        fmt: "jsonl", "csv", "tsv", "txt" or "parquet"; None infers it from the suffix. A csv
            delimiter is , ; or tab, whichever is most frequent in the header line.
        strict: raise on the first bad line. With False, bad lines (malformed JSON, bad UTF-8
            in jsonl/txt, empty or non-string prompt, missing field) go to ``errors`` as
            (line_no, message) and every good line is kept.

    Raises:
        PromptFileError: missing/empty/unreadable file, unknown format, missing column, bad
            UTF-8 in a csv, no valid prompt at all, or (strict) any bad line.
    """
    path = Path(path)
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt not in FORMATS.values():
        raise PromptFileError(f"{path}: unknown format (suffix {path.suffix!r}, format={fmt or 'null'}); "
                              f"use a suffix in {sorted(FORMATS)} or pass format=<{'|'.join(sorted(set(FORMATS.values())))}>")
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path} (resolved: {path.resolve()})")
    errors: list[tuple[int, str]] = []
    if fmt == "parquet":
        import pyarrow.parquet as pq  # heavy import, only when needed
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise PromptFileError(f"{path}: cannot read parquet: {e}") from None
        if not records:
            raise PromptFileError(f"{path}: file is empty (parquet with 0 rows)")
        numbers = list(range(1, len(records) + 1))
    else:
        data = path.read_bytes()
        if not data.strip():
            raise PromptFileError(f"{path}: file is empty")
        if fmt in ("csv", "tsv"):
            records, numbers = _read_csv(data, path, tsv=fmt == "tsv")
        else:
            numbers, records, errors = _read_lines(data, path, fmt, strict)
    if fmt == "txt":
        column = "prompt"
    elif records:
        column = _resolve_column(records, column, path)
    return _collect(path, fmt, column, records, numbers, errors, strict)


def _read_lines(data: bytes, path: Path, fmt: str, strict: bool):
    """Parse jsonl/txt line by line; each line is decoded on its own, so a bad one stays local."""
    numbers, records, errors = [], [], []
    lines = data.split(b"\n")
    if lines[-1] == b"":  # a final newline ends the last line, it does not start a new one
        lines.pop()
    offset = 0
    for no, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw) + 1
        rec = _parse_line(raw, start, fmt, first=no == 1)
        if isinstance(rec, str):  # an error message
            _fail_or_keep(path, no, rec, strict, errors)
        else:
            records.append(rec)
            numbers.append(no)
    return numbers, records, errors


def _parse_line(raw: bytes, start: int, fmt: str, first: bool) -> dict[str, Any] | str:
    """One line -> record, or an error message (str) for a bad line."""
    if first and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
        raw, start = raw[3:], start + 3
    raw = raw[:-1] if raw.endswith(b"\r") else raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {start + e.start}"
    if fmt == "txt":
        return {"prompt": text}
    if not text.strip():
        return "blank line (expected a JSON object)"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg} at column {e.colno})"
    return obj if isinstance(obj, dict) else f"expected a JSON object, not {type(obj).__name__}"


def _read_csv(data: bytes, path: Path, tsv: bool):
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}: not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset "
                              f"{e.start} (line {line})") from None
    header = text.split("\n", 1)[0]  # column names rarely hold , ; or tab (NeMo's files use ;)
    delimiter = "\t" if tsv else max(",;\t", key=lambda c: (header.count(c), c == ","))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    records, numbers = [], []
    try:
        for row in reader:
            if None in row:  # more cells than header names: keep them under a string key
                row["__extra_cells__"] = row.pop(None)
            records.append(row)
            numbers.append(reader.line_num)
    except csv.Error as e:
        raise PromptFileError(f"{path}: CSV error at line {reader.line_num}: {e}") from None
    if not records:
        raise PromptFileError(f"{path}: CSV has a header but no rows")
    return records, numbers


def _resolve_column(records: list[dict[str, Any]], column: str | None, path: Path) -> str:
    available = list(dict.fromkeys(k for r in records[:1000] for k in r))
    if column is None:
        lower = {k.lower(): k for k in reversed(available)}
        column = next((lower[c] for c in AUTO_COLUMNS if c in lower), None)
        if column is None:
            raise PromptFileError(f"{path}: no prompt column found (tried {list(AUTO_COLUMNS)})"
                                  f"; available columns: {available}; pass column=")
    elif not any(column in r for r in records):
        raise PromptFileError(f"{path}: column {column!r} not found; available columns {available};"
                              " pass column=<name>, or column=null to pick prompt/caption/text")
    return column


def _collect(path, fmt, column, records, numbers, errors, strict) -> PromptFile:
    good, good_numbers = [], []
    for no, rec in zip(numbers, records):
        value = rec.get(column)
        if column not in rec:
            msg = f"field {column!r} missing (keys: {list(rec)})"
        elif not isinstance(value, str):
            msg = f"prompt is {type(value).__name__}, not a string: {value!r:.60}"
        elif not value.strip():
            msg = f"empty prompt {value!r}"
        else:
            good.append(rec)
            good_numbers.append(no)
            continue
        _fail_or_keep(path, no, msg, strict, errors, "row" if fmt == "parquet" else "line")
    errors.sort()
    if not good:
        shown = "; ".join(f"line {n}: {m}" for n, m in errors[:3])
        raise PromptFileError(f"{path}: no valid prompt ({len(errors)} bad lines: {shown})")
    if errors:
        log.warning("%s: kept %d prompts, rejected %d lines (first: line %d: %s)", path, len(good),
                    len(errors), *errors[0])
    return PromptFile(path, fmt, None if fmt == "txt" else column, [r[column] for r in good], good,
                      good_numbers, errors)


def _fail_or_keep(path, no, msg, strict, errors, where="line") -> None:
    if strict:
        raise PromptFileError(f"{path}, {where} {no}: {msg}")
    errors.append((no, msg))

