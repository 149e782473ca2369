"""Leaderboards from run folders: every complete run's ``metrics.json`` into one sorted CSV (complete shard
sets merged first), and the mitigation runs with their per-image rows (for the report boards)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.core.atomic import atomic_to_csv
from bench.run.merge import merge_runs_dir


DETECT_COLUMNS = ["task", "model", "detector", "params", "n_gen", "steps", "auc", "auc_ci_low",
                  "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr", "tpr_at_1pct_fpr_closest",
                  "tpr_convention", "label_source", "n_pos", "n_neg", "planted_auc", "planted_tpr_at_1pct_fpr",
                  "auc_planted_not_learned", "n_planted_not_learned", "seconds_per_prompt", "unet_evals_per_prompt",
                  "timing", "git_sha", "run", "partial", "partial_reason"]


def is_partial(df: pd.DataFrame) -> pd.Series:
    """Leaderboard rows of runs on a subset of their task (``partial``: smoke runs, ``task.max_per_group=k``)."""
    if "partial" not in df:
        return pd.Series(False, index=df.index)
    return df["partial"].astype(str).str.lower().isin(("true", "1", "1.0"))


def rebuild_leaderboard(runs_dir: str | Path, out_csv: str | Path, kind: str = "detect") -> pd.DataFrame:
    """Collect ``metrics.json`` of every complete run of ``kind`` into one sorted CSV.

    Runs on a subset of their task (``partial``, e.g. ``task.max_per_group=2``) are rows with
    ``partial`` true and their ``partial_reason``; the markdown table lists them apart (bench/report/plots.py).

    Complete shard sets are merged into their whole run first (bench/run/merge.py); incomplete ones are
    named on stderr and left out. Shard folders have no metrics.json, so they are never rows."""
    merge_runs_dir(runs_dir, kind=kind, strict=False)
    rows = []
    for m in sorted(Path(runs_dir).glob("*/metrics.json")):
        d = json.loads(m.read_text())
        if d.get("kind") != kind:
            continue
        row = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
        for g, v in (d.get("per_group_auc") or {}).items():
            row[f"auc_vs_{g}"] = v
        for g, v in (d.get("per_family_auc") or {}).items():
            row[f"auc_{g}"] = v
        for g, v in (d.get("planted_per_family_auc") or {}).items():
            row[f"planted_auc_{g}"] = v
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        lead = [c for c in DETECT_COLUMNS if c in df.columns]
        df = df[lead + sorted(c for c in df.columns if c not in lead)]
        df = df.sort_values(["task", "model", "auc", "seconds_per_prompt"],
                            ascending=[True, True, False, True], kind="mergesort")
    atomic_to_csv(df, out_csv, index=False, float_format="%.6g")   # the jobs of a multirun rebuild it at once
    return df


def mitigate_runs(runs_dir: Path) -> list[tuple[dict, Path]]:
    """(metrics, folder) of every complete, whole mitigation run in ``runs_dir``."""
    out = []
    for m in sorted(Path(runs_dir).glob("*/metrics.json")):
        d = json.loads(m.read_text())
        if d.get("kind") == "mitigate" and "shard" not in d:
            out.append((d, m.parent))
    return out


def run_rows(run: Path) -> pd.DataFrame:
    """A run folder's per_prompt.csv, ids and groups as strings."""
    return pd.read_csv(run / "per_prompt.csv", keep_default_na=False, na_values=[""],
                       dtype={"id": str, "prompt_id": str, "group": str, "family": str})
