"""Merge prompt shards (``shard=i/n``) into the whole run: same rows, same order, same metrics.

A shard folder ``<name>__shard-<i>of<n>/`` (bench/run/io.py) holds the whole run's config.json, its
block of per_prompt.csv rows, and a manifest with ``shard`` = {spec, index, count, start, stop,
n_total, ids} and ``finished`` once it is done. A set is mergeable when all n shards of one
``<name>`` are there, finished, agree on kind, config, model, prompt set and result fields, and each
holds exactly its block's prompts (no torn line, no duplicate, no stranger). The merge writes
``<name>/`` beside them: per_prompt.csv with the shards' rows (byte strings kept) in prompt-set
order, the manifest with ``merged_from``, and metrics.json recomputed from those rows by the kind's
own result function, the same one a plain run calls, so the folder is what a single run writes
(measured wall seconds aside). Generic over run kinds: ``KINDS`` maps a kind to its result function
and row key. A runner that shards (see bench/run/runner.py run_detect): opens
``RunFolder(..., cfg_without_shard, shard=shard)``, writes manifest fields ``shard=shard_entry(...)``,
``base_run``, ``prompt_set`` (whole set: name, sha256, n), ``model``, ``result_fields`` and, when done,
``finished``; writes no metrics.json for a shard; and adds its kind to ``KINDS``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.core.atomic import atomic_write_json

from bench.run.io import RunFolder
from bench.run.shard import Shard

SHARD_MARK = "__shard-"


@dataclass(frozen=True)
class KindSpec:
    """How to merge one run kind. ``result_fn`` ("module:function") is called as
    ``fn(rows: DataFrame, ids: list[str], run_cfg: dict, manifest: dict) -> metrics dict`` on the
    merged rows; ``key`` names the columns that identify a row (unique within a run); ``id_col`` the
    column holding the shard's prompt ids (several rows may share one, e.g. one per seed)."""
    result_fn: str
    key: tuple[str, ...] = ("id",)
    id_col: str = "id"


KINDS: dict[str, KindSpec] = {
    "detect": KindSpec("bench.run.runner:detect_result"),
    "mitigate": KindSpec("bench.run.mitigate:mitigate_result", key=("id",), id_col="prompt_id"),
}


def shard_entry(shard: Shard, all_ids: list[str]) -> dict | None:
    """The manifest's ``shard`` entry a sharded runner writes (None for the whole set): the shard,
    its block [start, stop) of the ``all_ids`` prompt set and that block's ids, in order."""
    if shard.whole:
        return None
    start, stop = shard.bounds(len(all_ids))
    return {"spec": str(shard), "index": shard.index, "count": shard.count, "start": start, "stop": stop,
            "n_total": len(all_ids), "ids": list(all_ids[start:stop])}


class ShardSetError(RuntimeError):
    """A shard set is incomplete or inconsistent; the message says which shard and how to fix it."""


@dataclass
class ShardRun:
    path: Path
    config: dict
    manifest: dict

    @property
    def shard(self) -> Shard:
        return Shard(int(self.manifest["shard"]["index"]), int(self.manifest["shard"]["count"]))

    @property
    def ids(self) -> list[str]:
        return list(self.manifest["shard"]["ids"])


def read_shard(path: str | Path) -> ShardRun:
    path = Path(path)
    man_f, cfg_f = path / "manifest.json", path / "config.json"
    if not man_f.is_file() or not cfg_f.is_file():
        raise ShardSetError(f"{path}: not a run folder (no manifest.json/config.json)")
    try:
        man, cfg = json.loads(man_f.read_text()), json.loads(cfg_f.read_text())
    except json.JSONDecodeError as e:
        raise ShardSetError(f"{path}: unreadable manifest.json/config.json ({e}); relaunch that shard") from None
    if not isinstance(man.get("shard"), dict):
        raise ShardSetError(f"{path}: its manifest has no 'shard' entry; merge takes shard folders "
                            f"(named <run>{SHARD_MARK}<i>of<n>) or a runs folder holding them")
    return ShardRun(path, cfg, man)


def read_rows_exact(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and records of a per_prompt.csv as the strings on disk; a torn file is an error."""
    f = path / "per_prompt.csv"
    if not f.is_file():
        return [], []
    data = f.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ShardSetError(f"{f} ends in a torn line (the shard was killed mid-write); launch that "
                            "shard again with the same overrides: it drops the line and resumes")
    with open(f, newline="", encoding="utf-8") as fh:
        records = list(csv.reader(fh, strict=True))
    if not records:
        return [], []
    header, rows = records[0], records[1:]
    bad = [i for i, r in enumerate(rows) if len(r) != len(header)]
    if bad:
        raise ShardSetError(f"{f}: row {bad[0] + 2} has a different number of fields than the header")
    return header, rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _same(shards: list[ShardRun], what: str, get) -> None:
    ref = get(shards[0])
    for s in shards[1:]:
        if get(s) != ref:
            raise ShardSetError(f"shards disagree on {what}: {shards[0].path.name} and {s.path.name}; "
                                "they are not shards of one run (remove the stale ones and relaunch)")


def check_set(shards: list[ShardRun]) -> list[ShardRun]:
    """Sorted shards of one complete, consistent set, or a ShardSetError naming the problem."""
    if not shards:
        raise ShardSetError("no shard folders given")
    m0 = shards[0].manifest
    kind = m0.get("kind")
    _same(shards, "run kind", lambda s: s.manifest.get("kind"))
    _same(shards, "config (config.json)", lambda s: s.config)
    _same(shards, "model", lambda s: {k: v for k, v in (s.manifest.get("model") or {}).items()
                                      if k != "path"})     # the path is informational (shards may run elsewhere)
    _same(shards, "prompt set (sha256)", lambda s: s.manifest.get("prompt_set", {}).get("sha256"))
    _same(shards, "result fields", lambda s: s.manifest.get("result_fields"))
    _same(shards, "shard count", lambda s: s.shard.count)
    n = shards[0].shard.count
    by_index: dict[int, ShardRun] = {}
    for s in shards:
        if s.shard.index in by_index:
            raise ShardSetError(f"shard {s.shard} given twice: {by_index[s.shard.index].path} and {s.path}")
        by_index[s.shard.index] = s
    missing = [f"{i}/{n}" for i in range(n) if i not in by_index]
    if missing:
        raise ShardSetError(f"incomplete shard set for {m0.get('base_run')}: shard(s) {', '.join(missing)} "
                            "missing; launch them with the same overrides plus shard=i/n")
    n_total = int(m0["prompt_set"]["n"])
    key = KINDS[kind].key if kind in KINDS else ("id",)
    id_col = KINDS[kind].id_col if kind in KINDS else "id"
    for i in range(n):
        s = by_index[i]
        a, b = s.shard.bounds(n_total)
        if (s.manifest["shard"]["start"], s.manifest["shard"]["stop"]) != (a, b) or len(s.ids) != b - a:
            raise ShardSetError(f"{s.path}: block {s.manifest['shard']['start']}..{s.manifest['shard']['stop']} "
                                f"with {len(s.ids)} ids is not shard {s.shard} of {n_total} prompts ({a}..{b})")
        header, rows = read_rows_exact(s.path)
        if not s.manifest.get("finished"):
            raise ShardSetError(f"shard {s.shard} ({s.path}) has not finished; launch it again with the same "
                                "overrides (it resumes where it stopped)")
        if not rows:
            raise ShardSetError(f"shard {s.shard} ({s.path}) has no rows")
        cols = [header.index(k) for k in key]
        keys = [tuple(r[c] for c in cols) for r in rows]
        got = {r[header.index(id_col)] for r in rows}
        if len(set(keys)) != len(keys) or got != set(s.ids):
            raise ShardSetError(f"shard {s.shard} ({s.path}) holds {len(got & set(s.ids))} of its {len(s.ids)} "
                                f"prompts, {len(got - set(s.ids))} strangers and {len(keys) - len(set(keys))} "
                                "duplicate rows; launch it again with rerun=true")
    return [by_index[i] for i in range(n)]


def _result_fn(kind: str):
    if kind not in KINDS:
        raise ShardSetError(f"no merge rule for run kind {kind!r}; add it to bench.run.merge.KINDS")
    mod, fn = KINDS[kind].result_fn.split(":")
    return getattr(importlib.import_module(mod), fn)


def merge_shards(paths: list[str | Path]) -> dict:
    """Merge one complete shard set into the whole run folder beside it; returns its metrics."""
    shards = check_set([read_shard(p) for p in paths])
    m0, kind = shards[0].manifest, shards[0].manifest["kind"]
    result_fn = _result_fn(kind)
    target = shards[0].path.parent / m0["base_run"]
    old = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").is_file() else {}
    if (target / "per_prompt.csv").is_file() and "merged_from" not in old:
        raise ShardSetError(f"{target} holds a run that was not merged from shards (a plain run of the same "
                            "config); remove that folder to merge, or keep it and remove the shard folders")
    run = RunFolder.at(target, kind, shards[0].config)
    header, order, records = None, {}, []
    for s in shards:
        h, rows = read_rows_exact(s.path)
        if header is not None and h != header:
            raise ShardSetError(f"{s.path}: per_prompt.csv columns {h} differ from {header}")
        header = h
        for pid in s.ids:
            order[pid] = len(order)
        records += rows
    id_col = header.index(KINDS[kind].id_col)
    records.sort(key=lambda r: order[r[id_col]])        # stable: rows of one id keep their order
    tmp = target / f"per_prompt.csv.{os.getpid()}.tmp"   # per process: the last shards may merge at once
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)                                # same dialect as RunFolder.append_rows
        w.writerow(header)
        w.writerows(records)
    tmp.replace(run.per_prompt)

    shard_only = ("shard", "base_run", "started", "finished", "device", "model_load_seconds")
    manifest = {k: v for k, v in m0.items() if k not in shard_only}
    manifest.update(
        run=run.name, config_hash=run.hash, device=m0.get("device"),
        started=min(s.manifest.get("started", "") for s in shards),
        finished=max(s.manifest["finished"] for s in shards), merged=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        merged_from=[{"run": s.path.name, "shard": str(s.shard),
                      "per_prompt_sha256": _sha256(s.path / "per_prompt.csv"),
                      "git_sha": s.manifest.get("git_sha"), "device": s.manifest.get("device"),
                      "started": s.manifest.get("started"), "finished": s.manifest.get("finished"),
                      "model_load_seconds": s.manifest.get("model_load_seconds")} for s in shards])
    shas = sorted({s.manifest.get("git_sha") for s in shards})
    if len(shas) > 1:
        manifest["git_sha_shards"] = shas
    atomic_write_json(target / "manifest.json", manifest)
    metrics = result_fn(run.read_rows(), list(order), shards[0].config, manifest)
    run.write_metrics(metrics)
    return metrics


def shard_sets(runs_dir: str | Path) -> dict[str, list[Path]]:
    """Shard folders under ``runs_dir`` grouped by the whole run's name."""
    sets: dict[str, list[Path]] = {}
    for p in sorted(Path(runs_dir).glob(f"*{SHARD_MARK}*of*")):
        if p.is_dir():
            sets.setdefault(p.name.split(SHARD_MARK)[0], []).append(p)
    return sets


def up_to_date(target: Path, shards: list[Path]) -> bool:
    man = target / "manifest.json"
    if not (target / "metrics.json").is_file() or not man.is_file():
        return False
    merged = json.loads(man.read_text()).get("merged_from") or []
    have = {(m["run"], m["per_prompt_sha256"]) for m in merged}
    return have == {(p.name, _sha256(p / "per_prompt.csv")) for p in shards}


def merge_runs_dir(runs_dir: str | Path, *, kind: str | None = None, strict: bool = True) -> list[dict]:
    """Merge every shard set under ``runs_dir`` whose whole run is missing or older than its shards.

    strict: raise on the first incomplete or inconsistent set; otherwise name it on stderr and go on
    (the leaderboard rebuild, which runs while other shards may still be working)."""
    out = []
    for base, paths in shard_sets(runs_dir).items():
        try:
            shards = [read_shard(p) for p in paths]
            if kind is not None and shards[0].manifest.get("kind") != kind:
                continue
            counts = sorted({s.shard.count for s in shards})
            if len(counts) > 1:
                raise ShardSetError(f"{base}: shard folders of {len(counts)} different counts "
                                    f"({', '.join(f'of{c}' for c in counts)}); remove the stale ones")
            if up_to_date(Path(runs_dir) / base, paths):
                continue
            out.append(merge_shards(paths))
        except ShardSetError as e:
            if strict:
                raise
            print(f"[diffmem] not merged yet: {e}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="diffmem merge", description=(
        "merge complete shard sets (shard=i/n runs) into whole run folders; refuses incomplete or "
        "mismatched sets. Give runs folders (every set inside) or the shard folders of one set."))
    ap.add_argument("paths", nargs="*", default=["results/runs"])
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.is_dir():
            raise SystemExit(f"diffmem merge: {p} is not a folder (give a runs folder or shard folders)")
    try:
        if all(SHARD_MARK in p.name for p in paths):
            results = [merge_shards(paths)]
        else:
            results = [m for p in paths for m in merge_runs_dir(p, strict=True)]
    except ShardSetError as e:
        raise SystemExit(f"diffmem merge: {e}") from None
    for m in results:
        print(f"merged -> {m.get('run')}  (kind {m.get('kind')}, auc {m.get('auc')})")
    if not results:
        print("diffmem merge: nothing to merge (no shard sets, or every merged run is up to date)")
