"""Organisms side by side: planted memorization, the non-memorized copy rate, and whether the detector's
signal survives the style-matched controls (how issue 2 chooses between text encoders and versions).

Per version it reads the measured ground truth (``diffmem groundtruth --version V``) and scores every
evaluation prompt with the first-step noise magnitude (one generation, seed 0), then writes
``results/organism_compare.{csv,md}``:

- ``build_min``: the recorded build time, UNet training (``diffmem.json``) plus the CLIP judge
  (``clip/config.json``; a judge depends only on the world, so versions sharing a world share it);
- ``mv_reproduce``: share of MV prompts that reproduce their image in at least half of 4 seeds;
- ``copy_<FAM>``: per-family copy rate over prompts x seeds;
- ``nonmem_half`` / ``nonmem_any`` / ``nonmem_gen``: non-memorized prompts within the copy threshold of
  any training image in at least half of their seeds / in any seed, and the share of generations;
- ``auc_all`` and ``auc_<FAM>_once`` / ``auc_<FAM>_never``: AUC of the family's memorized prompts
  against its trained-once and never-trained controls (0.5 = the score only sees caption form).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.core.atomic import atomic_to_csv, atomic_write_text
from tasks.copies import groundtruth_stem
from tasks.memworld import FAMILIES


def compare_row(version: str, results: Path) -> dict:
    from baselines.detectors.noise_magnitude import NoiseMagnitude
    from bench.measure.metrics import roc_auc
    from tasks.organism import default_dir, load_organism, organism_config

    cfg = organism_config(version)
    gt_file = results / f"{groundtruth_stem(version)}.csv"
    if not gt_file.is_file():
        raise FileNotFoundError(f"{gt_file} is missing: run `diffmem groundtruth --version {version}` first")
    gt = pd.read_csv(gt_file)
    meta = json.loads((default_dir(cfg) / "diffmem.json").read_text())
    neg = gt[gt.label == 0]
    row = {"version": version, "text_encoder": cfg.text_encoder, "config_hash": cfg.hash,
           "dup_mv": cfg.world.dup_mv, "singletons_per_family": cfg.world.singletons_per_family,
           "title_nouns": cfg.world.title_nouns, "build_min": (meta.get("build_seconds", np.nan) + json.loads(
               (default_dir(cfg) / "clip" / "config.json").read_text()).get("build_seconds", np.nan)) / 60,
           "mv_reproduce": gt.loc[gt.group == "MV", "reproduces"].mean(),
           **{f"copy_{f}": gt.loc[gt.group == f, "copy_rate"].mean() for f in FAMILIES},
           "nonmem_half": (neg.near_any_train_frac >= 0.5).mean(),
           "nonmem_any": (neg.near_any_train_frac > 0).mean(),
           "nonmem_gen": neg.near_any_train_frac.mean()}
    for g in ("random_tokens", "MV_never", "MV_once"):
        row[f"nonmem_half_{g}"] = (gt.loc[gt.group == g, "near_any_train_frac"] >= 0.5).mean()
    model = load_organism(cfg, build_if_missing=False)
    s = NoiseMagnitude(n_gen=1, steps=1).score(model, gt["prompt"].tolist(), seed=0)
    y = gt["label"].to_numpy()
    row["auc_all"] = roc_auc(s, y)
    for f in FAMILIES:
        for ctl in ("once", "never"):
            keep = (gt.group == f) | (gt.group == f"{f}_{ctl}")
            row[f"auc_{f}_{ctl}"] = roc_auc(s[keep.to_numpy()], y[keep.to_numpy()])
    return row


def markdown(df: pd.DataFrame) -> str:
    """Versions as columns, numbers to 3 decimals."""
    cells = df.map(lambda x: f"{x:.3f}" if isinstance(x, float) else str(x))
    return cells.set_index("version").T.to_markdown(disable_numparse=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="compare organism versions (ground truth + controls)")
    ap.add_argument("--versions", default="v1,v2,v2-clip")
    ap.add_argument("--results", default="results")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    df = pd.DataFrame([compare_row(v, results) for v in args.versions.split(",")])
    atomic_to_csv(df, results / "organism_compare.csv", index=False, float_format="%.4f")
    atomic_write_text(results / "organism_compare.md", markdown(df))
    print(df.set_index("version").T.to_string())


if __name__ == "__main__":
    main()
