"""Atomic file writes: every result file (run folders, leaderboards, calibrations, thresholds, reports) is
written whole or not at all."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder (named per process,
    so concurrent writers never share one), flushed and fsynced, then ``os.replace``. A failure (a full
    disk, a kill) leaves the old file intact and no partial or 0-byte file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding=encoding, newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj, indent: int = 2, sort_keys: bool = True) -> Path:
    """``atomic_write_text`` of ``obj`` as JSON (``default=str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def atomic_to_csv(df: pd.DataFrame, path: str | Path, **to_csv_kwargs) -> Path:
    """``df.to_csv(path, **kwargs)``, written atomically (``atomic_write_text``)."""
    return atomic_write_text(path, df.to_csv(None, **to_csv_kwargs))
