"""Summary, CSVs and plot of ``tasks/studies/speed.py``'s raw timings.

Every ratio is computed inside one repeat (variants of a repeat ran back to back) and then summarised
over repeats by its median and its range (min, max): on a shared machine the load changes between
repeats, and within-repeat ratios cancel most of that.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.atomic import atomic_to_csv

KEY = ["variant", "n_prompts"]


def _stats(prefix: str, v: pd.Series) -> dict:
    v = v.dropna()
    if v.empty:
        return {}
    return {f"{prefix}_median": float(v.median()), f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}


def _per_repeat(raw: pd.DataFrame, variant: str, n_prompts: int | None = None) -> pd.Series:
    d = raw[raw.variant == variant]
    if d.empty:
        return pd.Series(dtype=float)
    if n_prompts is None:                      # the largest batch measured (most efficient)
        n_prompts = int(d.n_prompts.max())
    d = d[d.n_prompts == n_prompts]
    return d.set_index("repeat")["sec_per_prompt"]


def summarise(raw_rows: list[dict]) -> pd.DataFrame:
    """One row per (variant, n_prompts): seconds per prompt (median, min, max), prompts/s, UNet rows
    per prompt, and within-repeat ratios: ``x_floor`` (time / the floor of the same n, k and prompts;
    naive and density: / floor_n1_k1), ``speedup_vs_naive`` and ``speedup_vs_density`` (at the same n)."""
    raw = pd.DataFrame(raw_rows)
    out = []
    for (variant, P), d in raw.groupby(KEY, sort=False):
        first = d.iloc[0]
        kind, n, k = first["kind"], int(first["n_gen"]), int(first["k"])
        t = d.set_index("repeat")["sec_per_prompt"]
        row = {"variant": variant, "kind": kind, "n_gen": n, "k": k, "n_prompts": int(P),
               "steps_run": k if kind in ("floor", "ours") else 50,
               "unet_rows_per_prompt": float(d["unet_rows"].mean() / P), "repeats": len(d),
               **_stats("sec_per_prompt", t), "prompts_per_second": float(1 / t.median())}
        row["sec_per_prompt_p25"], row["sec_per_prompt_p75"] = (float(q) for q in t.quantile([.25, .75]))
        floor = f"floor_n{n}_k{k}" if kind == "ours" else "floor_n1_k1"
        if kind != "floor" or variant != floor:
            ft = _per_repeat(raw, floor, int(P) if kind == "ours" else None)
            if not ft.empty:
                row["floor_variant"] = floor
                row.update(_stats("x_floor", t / ft))
        for ref, name in ((f"naive_n{n}", "naive"), (f"density_pixel_n{n}", "density")):
            if kind in ("floor", "ours") or (kind == "naive" and name == "density"):
                rt = _per_repeat(raw, ref)
                if not rt.empty:
                    row[f"{name}_variant"] = ref
                    row.update(_stats(f"speedup_vs_{name}", rt / t))
        out.append(row)
    return pd.DataFrame(out)


def write_csvs(table: pd.DataFrame, raw_rows: list[dict], info: dict, out: str | Path) -> tuple[Path, Path]:
    """``out``: the summary with the machine columns on every row; ``<stem>_repeats.csv``: raw timings."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = table.assign(**{k: v for k, v in info.items()})
    atomic_to_csv(full, out, index=False, float_format="%.6g")
    raw_path = out.with_name(out.stem + "_repeats.csv")
    atomic_to_csv(pd.DataFrame(raw_rows).assign(model=info.get("model"), device=info.get("device")), raw_path,
                  index=False, float_format="%.6g")
    return out, raw_path


def plot_speed(table: pd.DataFrame, raw_rows: list[dict], info: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = pd.DataFrame(raw_rows)
    sweep = table[table.variant.isin(["floor_n1_k1", "nm_n1_k1"])].n_prompts.nunique() > 1
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(15 if sweep else 11, 4.6))
    colors = {"floor": "#7f7f7f", "ours": "#1f77b4", "naive": "#d62728", "density": "#ff7f0e"}
    main = table.sort_values("n_prompts").drop_duplicates("variant", keep="last")
    ax = axes[0]
    y = np.arange(len(main))
    med = main.sec_per_prompt_median.to_numpy() * 1e3
    err = np.vstack([med - main.sec_per_prompt_min * 1e3, main.sec_per_prompt_max * 1e3 - med])
    ax.barh(y, med, xerr=err, color=[colors[k] for k in main.kind], capsize=3)
    ax.set_yticks(y, [f"{v} ({p}p)" for v, p in zip(main.variant, main.n_prompts)])
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ms per prompt (median, bars: min-max over repeats)")
    hi = main.sec_per_prompt_max.to_numpy() * 1e3
    ratios = main.get("x_floor_median", pd.Series([np.nan] * len(main))).to_numpy()
    for yi, (h, r, kind) in enumerate(zip(hi, ratios, main.kind)):
        if np.isfinite(r):
            ax.text(h * 1.2, yi, f"{r:.2f}x {'its floor' if kind == 'ours' else 'floor_n1_k1'}",
                    va="center", fontsize=7)
    ax.set_xlim(right=hi.max() * 20)
    ax.set_title(f"{info['model']} on {info['device']} ({info['dtype']}, {info['torch_threads']} thr)", fontsize=9)

    ax = axes[1]
    ours = table[table.kind == "ours"].sort_values(["n_gen", "k", "n_prompts"])
    for i, (_, r) in enumerate(ours.iterrows()):
        ft = _per_repeat(raw, r.floor_variant, int(r.n_prompts)) if isinstance(r.get("floor_variant"), str) else None
        tt = _per_repeat(raw, r.variant, int(r.n_prompts))
        if ft is not None and not ft.empty:
            ratios = (tt / ft).to_numpy()
            ax.scatter(np.full(len(ratios), i), ratios, color=colors["ours"], alpha=.6, s=18)
            ax.hlines(np.median(ratios), i - .3, i + .3, color="k")
    ax.axhline(1.0, color="#7f7f7f", ls=":", lw=1)
    ax.axhline(1.1, color="#d62728", ls="--", lw=1, label="1.10x target")
    ax.set_xticks(range(len(ours)), [f"{v}\n{p}p" for v, p in zip(ours.variant, ours.n_prompts)], fontsize=7)
    ax.set_ylabel("time / floor (same repeat)")
    ax.set_title("ours vs its floor, per repeat (line: median)", fontsize=9)
    ax.legend(fontsize=7)

    if sweep:
        ax = axes[2]
        for v, kind in (("floor_n1_k1", "floor"), ("nm_n1_k1", "ours")):
            d = table[table.variant == v].sort_values("n_prompts")
            ax.errorbar(d.n_prompts, d.sec_per_prompt_median * 1e3,
                        yerr=[(d.sec_per_prompt_median - d.sec_per_prompt_min) * 1e3,
                              (d.sec_per_prompt_max - d.sec_per_prompt_median) * 1e3],
                        marker="o", color=colors[kind], label=v, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompts per batch")
        ax.set_ylabel("ms per prompt")
        ax.legend(fontsize=7)
        ax.set_title("batch size sweep (n=1, k=1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def replot(csv: str | Path, plot: str | Path) -> Path:
    """Redraw the plot from a written ``speed.csv`` and its ``speed_repeats.csv`` (no re-measuring)."""
    csv = Path(csv)
    table = pd.read_csv(csv)
    raw = pd.read_csv(csv.with_name(csv.stem + "_repeats.csv")).to_dict("records")
    cols = [c for c in ("model", "device", "dtype", "torch_threads") if c in table]
    return plot_speed(table.drop(columns=cols), raw, table.iloc[0][cols].to_dict(), plot)


if __name__ == "__main__":
    import sys
    replot(*(sys.argv[1:3] if len(sys.argv) > 2 else ("results/speed.csv", "results/plots/speed.png")))
