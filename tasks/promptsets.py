"""Prompt sets for memorization detection: shipped labelled sets, user files, random tokens.

    from tasks.promptsets import load_task, load_prompt_file
    task = load_task("webster500")            # 500 memorized + 2000 non-memorized, labels 1/0
    mine = load_prompt_file("prompts.csv", column="caption").prompts

Shipped files (``tasks/data/``, see PROVENANCE.md) are checked against checksums.sha256 on
every read. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
CHECKSUM_FILE = "checksums.sha256"
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".parquet": "parquet"}
AUTO_COLUMNS = ("prompt", "caption", "text")  # column=null (None): first present, case-insensitive


class PromptFileError(ValueError):
    """A prompt file (or a shipped data file) is missing, malformed or fails its checksum."""


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts, binary labels (1 = memorized) and per-prompt metadata, aligned by position.
    ``sha256`` hashes the content (ids, prompts, labels, groups, types, extra), not the name."""

    name: str
    prompts: list[str]
    labels: np.ndarray  # [N] int8, 1 = memorized (read-only)
    groups: list[str]  # source group per prompt: "webster_mem", "laion", "random_tokens", ...
    types: list[str]  # memorization type (VM/TM or MV/RV/TV/N), "" where unknown
    ids: list[str]  # stable unique ids, "<group>:<row in the source file>"
    sources: tuple[str, ...] = ()  # data files (relative to tasks/data) the set was read from
    extra: dict[str, list[Any]] = field(default_factory=dict)  # more per-prompt fields
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        n, lab = len(self.prompts), np.asarray(self.labels)
        columns = {"groups": self.groups, "types": self.types, "ids": self.ids, **self.extra}
        problems = [f"{k} has {len(v)} entries, expected {n}" for k, v in columns.items()
                    if len(v) != n]
        if lab.shape != (n,) or not np.isin(lab, (0, 1)).all():
            problems.append(f"labels must be {n} values in {{0, 1}}")
        if len(set(self.ids)) != len(self.ids):
            problems.append("ids must be unique")
        if not all(isinstance(p, str) for p in self.prompts):
            problems.append("every prompt must be a string")
        if problems:
            raise ValueError(f"PromptSet {self.name!r}: " + "; ".join(problems))
        lab = lab.astype(np.int8)
        lab.flags.writeable = False
        object.__setattr__(self, "labels", lab)
        rows = {"id": self.ids, "prompt": self.prompts, "label": lab.tolist(), "type": self.types,
                "group": self.groups, **{f"extra.{k}": v for k, v in self.extra.items()}}
        blob = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        object.__setattr__(self, "sha256", hashlib.sha256(blob.encode("utf-8")).hexdigest())

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_pos(self) -> int:
        return int(self.labels.sum())


def concat(name: str, sets: Sequence[PromptSet]) -> PromptSet:
    """Concatenate prompt sets in order; ``extra`` keys missing from a set are filled with None."""
    keys = list(dict.fromkeys(k for s in sets for k in s.extra))
    return PromptSet(
        name=name, prompts=[p for s in sets for p in s.prompts],
        labels=np.concatenate([s.labels for s in sets]) if sets else np.zeros(0, np.int8),
        groups=[g for s in sets for g in s.groups], types=[t for s in sets for t in s.types],
        ids=[i for s in sets for i in s.ids],
        sources=tuple(dict.fromkeys(src for s in sets for src in s.sources)),
        extra={k: [v for s in sets for v in s.extra.get(k, [None] * len(s))] for k in keys})


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


def _expected_checksums() -> dict[str, str]:
    table = DATA_DIR / CHECKSUM_FILE
    if not table.is_file():
        raise PromptFileError(f"checksum table missing: {table}; the package data is incomplete")
    rows = [line.split() for line in table.read_text(encoding="utf-8").splitlines()]
    if any(len(r) != 2 or len(r[0]) != 64 for r in rows if r):
        raise PromptFileError(f"{table}: every line must read '<sha256>  <file name>'")
    return {name: digest.lower() for digest, name in (r for r in rows if r)}


def verify_checksums(files: Sequence[str] | None = None) -> dict[str, str]:
    """Check shipped files (default: all listed) against checksums.sha256 -> {name: sha256}.

    Raises PromptFileError naming the file and the expected and actual hash.
    """
    expected = _expected_checksums()
    return {name: hashlib.sha256(_read_shipped(name, expected)).hexdigest()
            for name in (expected if files is None else files)}


def _read_shipped(name: str, expected: dict[str, str] | None = None) -> bytes:
    """Read one shipped file and check its hash; callers parse exactly the bytes checked."""
    expected = _expected_checksums() if expected is None else expected
    path = DATA_DIR / name
    if name not in expected or not path.is_file():
        raise PromptFileError(f"shipped data file {path} is missing or not listed in "
                              f"{CHECKSUM_FILE}; the package data is incomplete")
    data = path.read_bytes()
    if (actual := hashlib.sha256(data).hexdigest()) != expected[name]:
        raise PromptFileError(f"checksum mismatch for {path}: expected {expected[name]}, actual "
                              f"{actual}; the shipped file was modified: restore it from git or "
                              f"rebuild it with tasks/data/make_subsets.py")
    return data


def _shipped_set(name: str, file: str, group: str, label: int, type_key: str | None = None,
                 extra_keys: dict[str, str] | None = None) -> PromptSet:
    """Load a shipped normalized jsonl (prompt under "caption", source row under "row")."""
    path = DATA_DIR / file
    numbers, recs, _ = _read_lines(_read_shipped(file), path, "jsonl", strict=True)
    _collect(path, "jsonl", "caption", recs, numbers, [], strict=True)  # validates prompts
    n = len(recs)
    # a null *type* means "not labelled": it becomes "" (unknown), never a guessed type
    types = [r.get(type_key) or "" for r in recs] if type_key else [""] * n
    extra = {k: [r.get(src) if not k.endswith("_type") else r.get(src) or "" for r in recs]
             for k, src in (extra_keys or {}).items()}
    return PromptSet(name=name, prompts=[r["caption"] for r in recs],
                     labels=np.full(n, label, np.int8), groups=[group] * n, types=types,
                     ids=[f"{group}:{r['row']}" for r in recs], sources=(file,), extra=extra)


def webster500(type_source: str = "nemo") -> PromptSet:
    """Webster's 500 memorized SD v1 prompts in Wen et al.'s order (labels all 1).

    ``types`` holds NeMo's VM/TM (all 500; VM means NeMo's max SSCD > 0.7) when type_source is
    "nemo", or Webster's MV/RV/TV/N ("" for the 148 prompts his bb-edge ground truth lacks) when
    "webster". ``extra`` always has nemo_type, webster_type, laion_index, url, nemo_max_sscd.
    """
    if type_source not in ("nemo", "webster"):
        raise ValueError(f"type_source must be 'nemo' or 'webster', got {type_source!r}")
    keys = {"nemo_type": "nemo_type", "webster_type": "webster_overfit_type",
            "laion_index": "index", "url": "url", "nemo_max_sscd": "nemo_max_sscd"}
    return _shipped_set("webster500", "sdv1_500_memorized_labeled.jsonl", "webster_mem", 1,
                        type_key=keys[f"{type_source}_type"], extra_keys=keys)


def webster_sdv2_219() -> PromptSet:
    """Webster's 219 memorized SD v2 prompts (SAIL's copy); types MV/TV."""
    return _shipped_set("webster_sdv2_219", "webster_sdv2_memorized_219.jsonl",
                        "webster_sdv2_mem", 1, type_key="overfit_type",
                        extra_keys={"laion_index": "index", "url": "url"})


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer  # imports torch: only when needed
    return SimpleTokenizer()  # ships its BPE vocabulary, works offline


def random_token_prompts(n: int, seed: int, max_tokens: int = 76) -> list[str]:
    """Wen et al.'s "random" negatives: decoded strings of k distinct random CLIP BPE tokens.

    Wen draws k = random.randrange(77) (0..76) distinct ids from the whole vocabulary. We draw
    k ~ U{1..76} because k = 0 decodes to "", the unconditional input of classifier-free
    guidance rather than a prompt, and we exclude <start_of_text>/<end_of_text>. Text is stripped
    (as HF's CLIP decode does); a draw that strips to "" is redrawn. Split UTF-8 byte tokens
    decode to U+FFFD, as in Wen's strings. Deterministic in ``seed`` (numpy Generator).
    """
    if n < 0 or not 1 <= max_tokens <= 76:
        raise ValueError(f"need n >= 0 and 1 <= max_tokens <= 76, got n={n}, max_tokens={max_tokens}")
    tok = _clip_bpe()
    regular = np.setdiff1d(np.arange(len(tok.encoder)), tok.all_special_ids)
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(1, max_tokens + 1))  # default 1..76: CLIP's 77 positions hold 76 + <start>
        text = tok.decode(rng.choice(regular, size=k, replace=False).tolist()).strip()
        if text:
            out.append(text)
    return out


def nonmem2000(seed: int = 0) -> PromptSet:
    """500 each of LAION (NeMo), COCO 2017 val, Lexica (Gustavosta test) and random tokens."""
    rand = random_token_prompts(500, seed)
    return concat(f"nonmem2000_s{seed}", [
        _shipped_set("laion", "nonmem_laion_500_nemo.jsonl", "laion", 0,
                     extra_keys={"laion_index": "index", "url": "url"}),
        _shipped_set("coco", "nonmem_coco2017_val_500.jsonl", "coco", 0),
        _shipped_set("lexica", "nonmem_lexica_gustavosta_test_500.jsonl", "lexica", 0),
        PromptSet("random_tokens", rand, np.zeros(500, np.int8), ["random_tokens"] * 500,
                  [""] * 500, [f"random_tokens:s{seed}:{i}" for i in range(500)]),
    ])


def sail500() -> PromptSet:
    """SAIL's 500 mixed negatives. Groups sail_coco/lexica/tuxemon/gpt4 come from the line
    position (0-199, 200-299, 300-399, 400-499), not an upstream label (tasks/data/PROVENANCE.md).
    """
    s = _shipped_set("sail500", "nonmem_sail_sd1_mixed_500.jsonl", "sail", 0,
                     extra_keys={"source_inferred": "source_inferred"})
    groups = [f"sail_{g}" for g in s.extra["source_inferred"]]
    return PromptSet(s.name, s.prompts, s.labels, groups, s.types, s.ids, s.sources)


# name -> parts (positives first); SAIL uses the same 500 negatives for SD v1 and SD v2
TASKS = {
    "webster500": lambda seed: [webster500(), nonmem2000(seed)],
    "webster500_sail": lambda seed: [webster500(), sail500()],
    "webster_sdv2_219_sail": lambda seed: [webster_sdv2_219(), sail500()],
}


def load_task(name: str, seed: int = 0) -> PromptSet:
    """A detection task (positives labelled 1, then negatives 0); ``seed`` seeds random tokens."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {list(TASKS)}")
    return concat(name, TASKS[name](seed))
