"""Validation and repair of a run folder's ``per_prompt.csv`` (read on resume and for metrics).

Rows are only ever appended by ``RunFolder.append_rows``, so a file is a header and rows of exactly its
columns. A row is bad when it is not UTF-8, has another number of fields than the header (garbage, or
two rows run together after a torn write), has an empty ``id``, repeats an ``id`` (a later identical
copy is bad; rows of one id that disagree are all bad, since neither can be trusted), or holds a value
that is not a finite number in a numeric column (``NUMERIC``: a score, seed, label, seconds, UNet
evaluations). ``check_rows`` lists the bad rows with their line numbers; ``RunFolder.read_rows`` refuses a
file with any (``CorruptRowsError``: file, lines, what, how to fix). ``repair_rows`` moves them to
``per_prompt.rejected.csv`` beside it (line, reason, the raw row) and rewrites the file without them, so
resume scores exactly those prompts again: ``repair=true`` on the run's command, or
``diffmem repair RUN_FOLDER``.
"""
from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

NUMERIC = ("score", "seed", "label", "label_planted", "seconds", "unet_evals")
from bench.errors import EXIT_BAD_ROWS  # noqa: E402,F401 (9: a command refused for bad rows)
REJECTED = "per_prompt.rejected.csv"
REPAIR_HINT = ("run the same command again with repair=true, or `diffmem repair {folder}`: the bad rows move to "
               "{folder}/" + REJECTED + " and resume scores only their prompts again")


class CorruptRowsError(ValueError):
    """``per_prompt.csv`` holds rows that cannot be trusted; the message names the file, lines and fix."""


@dataclass
class RowCheck:
    path: Path
    header: list[str]
    lines: list[bytes]                          # raw data rows (line break included), in file order
    starts: list[int]                           # the 1-based file line each row starts on
    bad: dict[int, str] = field(default_factory=dict)   # index into lines -> reason

    def line_no(self, i: int) -> int:
        return self.starts[i]

    def describe(self, limit: int = 5) -> str:
        items = [f"line {self.line_no(i)}: {why}" for i, why in sorted(self.bad.items())]
        more = f"; ... {len(items) - limit} more" if len(items) > limit else ""
        return "; ".join(items[:limit]) + more


def _number(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _records(data: bytes) -> tuple[list[bytes], list[int]]:
    """Physical lines (split at a line feed, kept) joined while a quoted field is open (a prompt may hold a
    line break inside quotes): one entry per CSV record, and the 1-based line each starts on."""
    parts = data.split(b"\n")
    out, starts, cur = [], [], b""
    for no, line in enumerate([x + b"\n" for x in parts[:-1]] + ([parts[-1]] if parts[-1] else []), 1):
        if not cur:
            starts.append(no)
        cur += line
        if cur.count(b'"') % 2 == 0:
            out.append(cur)
            cur = b""
    return out + ([cur] if cur else []), starts


def check_rows(path: str | Path) -> RowCheck:
    """Parse ``path`` line by line and list its bad rows (module docstring). An unusable header (not
    UTF-8, or without an ``id`` column) is a ``CorruptRowsError``: nothing in the file can be read."""
    path = Path(path)
    raw, starts = _records(path.read_bytes())
    try:
        header = next(csv.reader([raw[0].decode("utf-8")])) if raw else []
    except (UnicodeDecodeError, csv.Error, StopIteration):
        header = []
    if "id" not in header:
        raise CorruptRowsError(f"{path}, line 1: the header is not a per-prompt header ({raw[:1]!r}); "
                               f"the file cannot be repaired: delete {path.parent} and run again")
    res = RowCheck(path, header, raw[1:], starts[1:])
    num = [header.index(c) for c in NUMERIC if c in header]
    id_col, seen = header.index("id"), {}
    for i, line in enumerate(res.lines):
        try:
            fields = next(csv.reader(io.StringIO(line.decode("utf-8"), newline="")), [])
        except UnicodeDecodeError as e:
            res.bad[i] = f"not UTF-8 (byte {line[e.start:e.start + 1]!r} at column {e.start + 1})"
            continue
        except csv.Error as e:
            res.bad[i] = f"not a CSV row ({e})"
            continue
        if len(fields) != len(header):
            res.bad[i] = f"{len(fields)} fields, the header has {len(header)} (garbage or rows run together)"
        elif not fields[id_col]:
            res.bad[i] = "empty id"
        elif bad := [header[c] for c in num if not _number(fields[c])]:
            res.bad[i] = ", ".join(f"{c}={fields[header.index(c)]!r} is not a finite number" for c in bad)
        else:
            seen.setdefault(fields[id_col], []).append(i)
    for pid, idx in seen.items():
        if len(idx) > 1:
            same = len({res.lines[i].rstrip(b"\r\n") for i in idx}) == 1
            for i in (idx[1:] if same else idx):
                res.bad[i] = (f"duplicate of line {res.line_no(idx[0])} (id {pid})" if same else
                              f"id {pid} appears on lines {[res.line_no(j) for j in idx]} with different values")
    return res


def refuse_bad_rows(path: str | Path) -> None:
    """``CorruptRowsError`` when ``path`` holds bad rows (see ``check_rows``), naming lines and the fix."""
    res = check_rows(path)
    if res.bad:
        raise CorruptRowsError(f"{res.path}: {len(res.bad)} bad row(s): {res.describe()}; "
                               + REPAIR_HINT.format(folder=res.path.parent))


def repair_rows(path: str | Path) -> int:
    """Move the bad rows of ``path`` to ``per_prompt.rejected.csv`` beside it (appended: line, reason, raw
    row) and rewrite ``path`` atomically without them; returns how many were moved."""
    from bench.core.atomic import atomic_write_text

    res = check_rows(path)
    if not res.bad:
        return 0
    rej = res.path.with_name(REJECTED)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if not rej.is_file() or rej.stat().st_size == 0:
        w.writerow(["line", "reason", "raw"])
    for i, why in sorted(res.bad.items()):
        w.writerow([res.line_no(i), why, res.lines[i].rstrip(b"\r\n").decode("utf-8", "backslashreplace")])
    with open(rej, "a", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
    keep = [line for i, line in enumerate(res.lines) if i not in res.bad]
    text = _records(res.path.read_bytes())[0][0] + b"".join(keep)
    atomic_write_text(res.path, text.decode("utf-8"))
    print(f"[diffmem] {res.path}: moved {len(res.bad)} bad row(s) to {rej} ({res.describe(3)}); "
          "resume scores their prompts again", file=sys.stderr)
    return len(res.bad)


def main(argv: list[str]) -> None:
    """``diffmem repair RUN_FOLDER...``: move each folder's bad per-prompt rows aside (see ``repair_rows``)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: diffmem repair RUN_FOLDER [RUN_FOLDER...]\n  move the bad rows of each run folder's "
              f"per_prompt.csv to {REJECTED}; run the same command again (without rerun=true) to score them")
        return
    for a in argv:
        f = Path(a) / "per_prompt.csv" if Path(a).is_dir() else Path(a)
        if not f.is_file():
            raise SystemExit(f"diffmem repair: {f} does not exist (pass a run folder under results/runs)")
        n = repair_rows(f)
        print(f"{f}: {n} bad row(s) moved to {f.with_name(REJECTED)}" if n else f"{f}: no bad rows")
