"""Measuring the ground truth of the organism: which evaluation prompts reproduce their training image.

Every evaluation prompt is sampled (DDIM 50, guidance 7.5, seeds 0..3) and each generation is
compared with the training images by colour-robust measures:
- colour-normalised RMSE (cn-RMSE: per image and channel standardised, then RMSE; 0 = identical up
  to per-channel gain/offset, 1.41 = uncorrelated), over the region the family plants: the whole
  image (MV, RV, TV, controls), the foreground mask (FG) or the background (BG) of each target;
- SSCD cosine (sscd_disc_mixup, bilinear upscaling to 288 px), reported beside it.

Thresholds are calibrated on the training set, never on generations (see ``calibrate``): the
1st percentile of nearest-neighbour distances between training images of different units, over
the whole image (MV, RV, TV and "within the copy threshold of any training image") or over the
family's region (FG, BG).
A generation copies when its region cn-RMSE to its nearest target is below its family threshold.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.core.sampling import sample
from bench.measure.embed import cn_rmse, cosine_matrix, get_embedder
from bench.core.atomic import atomic_to_csv, atomic_write_json, atomic_write_text
from tasks.copies import FLOOR, MANIFEST, QUANTILE, calibrate, groundtruth_stem, region_distance


def measure(model, world, *, seeds=(0, 1, 2, 3), steps=50, guidance=7.5, batch_size=256,
            sscd: bool = True, progress: bool = True, groups: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-prompt copy measures for the world's evaluation prompts (``groups``: only those groups)."""
    thr = calibrate(world)
    ev = [e for e in world.eval_prompts if groups is None or e.group in groups]
    res = sample(model, [e.prompt for e in ev], list(seeds), steps=steps, guidance=guidance,
                 batch_size=batch_size, progress=progress)
    gens = res.images.float().numpy().reshape(len(ev), len(seeds), *res.images.shape[1:])
    kinds = np.asarray(world.image_kind)
    nn_all = cn_rmse(gens.reshape(-1, *gens.shape[2:]), world.images, floor=FLOOR)
    nn_all = nn_all.reshape(len(ev), len(seeds), -1)
    if sscd:
        emb = get_embedder("sscd", resize=288, progress=progress)
        e_train = emb.embed(world.images)
        e_gen = emb.embed(gens.reshape(-1, *gens.shape[2:])).reshape(len(ev), len(seeds), -1)
    rows = []
    for k, e in enumerate(ev):
        g = gens[k]
        nn_d, nn_i = nn_all[k].min(1), nn_all[k].argmin(1)
        row = {"id": e.id, "prompt": e.prompt, "label": e.label, "group": e.group, "family": e.family,
               "nn_cn_rmse_median": float(np.median(nn_d)),
               "near_any_train_frac": float((nn_d < thr["global_full"]).mean()),
               "nn_is_planted_frac": float(np.isin(kinds[nn_i], ["MV", "RV", "TV", "FG", "BG"]).mean())}
        if e.targets:
            fam = e.group if e.label == 1 else "global_full"
            d = region_distance(g, world, list(e.targets), e.region or "full").min(1)
            row.update(own_cn_rmse_median=float(np.median(d)), copy_threshold=thr[fam],
                       copy_rate=float((d < thr[fam]).mean()),
                       nn_is_target_frac=float(np.isin(nn_i, e.targets).mean()))
            if sscd:
                s = cosine_matrix(e_gen[k], e_train[list(e.targets)]).max(1)
                row["own_sscd_median"] = float(np.median(s))
        if sscd:
            row["nn_sscd_median"] = float(np.median(cosine_matrix(e_gen[k], e_train).max(1)))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["reproduces"] = df.get("copy_rate", pd.Series(np.nan, index=df.index)) >= 0.5
    return df, thr


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    agg = {"n": ("id", "size"), "label": ("label", "first"),
           "near_any_train_frac": ("near_any_train_frac", "mean"),
           "prompts_near_any_train": ("near_any_train_frac", lambda x: float((x > 0).mean())),
           "nn_cn_rmse_median": ("nn_cn_rmse_median", "median")}
    if "copy_rate" in df:
        agg.update(copy_rate=("copy_rate", "mean"), reproduces_ge_half_seeds=("reproduces", "mean"),
                   own_cn_rmse_median=("own_cn_rmse_median", "median"),
                   nn_is_target_frac=("nn_is_target_frac", "mean"))
    if "own_sscd_median" in df:
        agg["own_sscd_median"] = ("own_sscd_median", "median")
    if "nn_sscd_median" in df:
        agg["nn_sscd_median"] = ("nn_sscd_median", "median")
    out = df.groupby("group", sort=False).agg(**agg).reset_index()
    out.loc[out["label"] == 0, "reproduces_ge_half_seeds"] = np.nan
    return out


def manifest(df: pd.DataFrame, thr: dict, world, weights: str, seconds: float, summ: pd.DataFrame) -> dict:
    """groundtruth.json: protocol, thresholds, the world's and the weights' sha256, and per prompt
    whether it reproduces its training image (>= half the seeds copy) with its copy rate."""
    labels = {str(r.id): {"reproduces": bool(r.reproduces),
                          "copy_rate": None if pd.isna(getattr(r, "copy_rate", np.nan)) else float(r.copy_rate)}
              for r in df.itertuples(index=False)}
    return {"protocol": {"sampler": "DDIM", "steps": 50, "guidance": 7.5, "seeds": [0, 1, 2, 3],
                         "copy_measure": "region cn-RMSE to nearest target < family threshold",
                         "threshold_rule": f"{QUANTILE:.0%} quantile of training-set null distances",
                         "reproduces_rule": "copy_rate >= 0.5 (at least half of the seeds copy)",
                         "cn_std_floor": FLOOR, "sscd": "sscd_disc_mixup ONNX, bilinear 288"},
            "thresholds": thr, "memworld_sha256": world.sha256, "weights_sha256": weights,
            "seconds": seconds, "summary": summ.to_dict(orient="records"), "labels": labels}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from tasks.organism import DEFAULT_VERSION, ORGANISMS, default_dir, load_organism, organism_config, organism_world

    ap = argparse.ArgumentParser(description="measure the organism's ground truth")
    ap.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(ORGANISMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = organism_config(args.version)
    stem = groundtruth_stem(args.version)
    model = load_organism(cfg)
    world = organism_world(cfg)
    t0 = time.perf_counter()
    df, thr = measure(model, world)
    summ = summarize(df)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(df, out / f"{stem}.csv", index=False, float_format="%.4f")
    atomic_to_csv(summ, out / f"{stem}_summary.csv", index=False, float_format="%.3f")
    atomic_write_text(out / f"{stem}_summary.md", summ.to_markdown(index=False, floatfmt=".3f")
                      if _has_tabulate() else summ.to_string(index=False))
    from bench.core.model import weights_sha256

    m = manifest(df, thr, world, weights_sha256(model), time.perf_counter() - t0, summ)
    atomic_write_json(Path(model.path) / MANIFEST, m, sort_keys=False)
    print(summ.to_string(index=False))
    print(f"diffmem groundtruth: {int(df['reproduces'].sum())} of {len(df)} prompts reproduce their training "
          f"image -> {out / (stem + '.csv')}, labels in {Path(model.path) / MANIFEST}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main()
