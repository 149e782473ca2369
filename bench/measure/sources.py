"""Input file sets: a folder (its matching files, sorted by path) or an explicit list of files.

One resolver for every "folder or file list" input (embedding shards for ``bench.measure.retrieval``, image
files for ``bench.measure.image_index``), with one set of errors for an empty folder or missing files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def source_files(source: str | Path | Sequence[str | Path], keep, what: str, *, recursive: bool = False) -> list[Path]:
    """A folder (its files passing ``keep``, sorted by path; ``recursive``: subfolders too) or an
    explicit list of files, each checked to exist. ``what`` names them in the errors."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        walk = Path(source).rglob("*") if recursive else Path(source).glob("*")
        files = sorted(p for p in walk if p.is_file() and keep(p))
        if not files:
            raise FileNotFoundError(f"no {what} under {source}")
        return files
    files = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{what} not found: {missing[:5] or '(empty list)'}")
    return files


def npy_sources(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (its ``*.npy`` files) or an explicit list of ``.npy`` embedding shards [n, dim] float32."""
    return source_files(sources, lambda p: p.suffix == ".npy", ".npy embedding files ([n, dim] float32 shards)")
