"""Mitigation leaderboard and plots, rebuilt only from run folders (kind ``mitigate``).

    from bench.report.mitigate_board import rebuild_mitigate
    rebuild_mitigate("results")   # mitigate_leaderboard.csv/.md, plots/mitigate_tradeoff_*.png, *_fbmem_*.png,
                                  # and the FB-Mem study (bench/report/fbmem_study.py)

Derived columns need the ``none`` run of the same protocol (same ``protocol_hash``: task, model,
seeds, steps, guidance, prompt selection): ``clip_delta`` = clip_score - none's clip_score, and the
FB-Mem mitigation score from the per-image category transitions none -> mitigated (matched by
prompt and seed, ``bench.measure.fbmem.mitigation_score``). Without a ``none`` run they are left empty.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.atomic import atomic_to_csv, atomic_write_text
from bench.run.leaderboard import mitigate_runs, run_rows
from bench.report.plots import _figure, _save, _slug

MITIGATE_COLUMNS = ["task", "model", "mitigator", "strength", "strength_unit", "copy_rate", "sscd_to_train_mean",
                    "sscd_to_train_p95", "sscd_nn_mean", "fbmem_vm", "fbmem_fm", "fbmem_bm", "fbmem_nm",
                    "fbmem_mitigation_score", "clip_score", "clip_delta", "general_prompt_clip",
                    "general_prompt_clip_delta", "seconds_per_image", "unet_evals_per_image", "fit_seconds",
                    "train_cost_ratio", "params", "protocol_hash", "git_sha", "run"]
CATS = ("VM", "FM", "BM", "NM")
CAT_COLORS = {"VM": "#b2182b", "FM": "#ef8a62", "BM": "#67a9cf", "NM": "#d9d9d9"}


def mitigate_leaderboard(runs_dir: str | Path) -> pd.DataFrame:
    runs = mitigate_runs(Path(runs_dir))
    recs = []
    base = {d["protocol_hash"]: (d, p) for d, p in runs if d["mitigator"] == "none"}
    for d, p in runs:
        row = {k: v for k, v in d.items() if not isinstance(v, (dict, list))}
        rows = run_rows(p)
        if "fbmem_category" in rows:           # FB-Mem shares per planted family (the FB-Mem study)
            mem = rows[rows.label == 1]
            for fam, g in mem.groupby("group"):
                for c in CATS:
                    row[f"fbmem_{c.lower()}_{fam}"] = float((g["fbmem_category"] == c).mean())
        b = base.get(d["protocol_hash"])
        if b is not None:
            row["clip_delta"] = d["clip_score"] - b[0]["clip_score"]
            row["general_prompt_clip_delta"] = d["general_prompt_clip"] - b[0]["general_prompt_clip"]
            after, before = rows, run_rows(b[1])
            if "fbmem_category" in after and "fbmem_category" in before:
                from bench.measure.fbmem import mitigation_score
                j = before[before.label == 1][["id", "fbmem_category"]].merge(
                    after[after.label == 1][["id", "fbmem_category"]], on="id", suffixes=("_before", "_after"))
                row["fbmem_mitigation_score"] = float(mitigation_score(j["fbmem_category_before"].tolist(),
                                                                       j["fbmem_category_after"].tolist()))
        recs.append(row)
    df = pd.DataFrame(recs)
    if len(df):
        lead = [c for c in MITIGATE_COLUMNS if c in df.columns]
        df = df[lead + sorted(c for c in df.columns if c not in lead)]
        df = df.assign(_n=df["mitigator"] != "none").sort_values(["task", "model", "_n", "mitigator", "strength"],
                                                                 kind="mergesort").drop(columns="_n").reset_index(drop=True)
    return df


def tradeoff_plot(df: pd.DataFrame, out_png: str | Path, y: str = "copy_rate", title: str = "") -> Path:
    """Memorization (y) against CLIP score (x): one curve per mitigator over its strengths, none a point."""
    from matplotlib import colormaps
    fig, (ax1, ax2) = _figure(11, 4.4, ncols=2)
    mits = sorted(m for m in df["mitigator"].unique() if m != "none")
    cmap = colormaps["tab10"]
    for ax, x in ((ax1, "clip_score"), (ax2, "general_prompt_clip")):
        for i, m in enumerate(mits):
            s = df[df.mitigator == m].sort_values("strength")
            ax.plot(s[x], s[y], "-o", color=cmap(i % 10), label=m, ms=4)
            for _, r in s.iterrows():
                ax.annotate(f"{r.strength:g}", (r[x], r[y]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        n = df[df.mitigator == "none"]
        if len(n):
            ax.plot(n[x], n[y], "k*", ms=12, label="none")
        ax.set_xlabel(f"CLIPScore, {'memorized' if x == 'clip_score' else 'non-memorized (utility)'} prompts"
                      " (higher = better)", fontsize=8)
        ax.set_ylabel(f"{y}, memorized prompts (lower = less copying)", fontsize=8)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    fig.suptitle(title or "mitigation trade-off (labels: strength)")
    return _save(fig, out_png)


def fbmem_stack_plot(df: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Share of memorized-prompt generations per FB-Mem category, one bar per mitigator@strength."""
    cols = [f"fbmem_{c.lower()}" for c in CATS]
    d = df.dropna(subset=cols)
    fig, (ax,) = _figure(max(6, 0.45 * len(d) + 2), 4)
    labels = [f"{m}@{s:g}" for m, s in zip(d.mitigator, d.strength)]
    bottom = np.zeros(len(d))
    for c, col in zip(CATS, cols):
        ax.bar(range(len(d)), d[col], bottom=bottom, color=CAT_COLORS[c], label=c)
        bottom += d[col].to_numpy()
    ax.set_xticks(range(len(d)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of generations (memorized prompts)")
    ax.legend(title="FB-Mem", fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(title or "FB-Mem categories: VM verbatim, FM foreground-only, BM background-only, NM none")
    return _save(fig, out_png)


def markdown(df: pd.DataFrame) -> str:
    cols = [c for c in ["mitigator", "strength", "copy_rate", "copy_rate_MV", "copy_rate_FG", "copy_rate_BG",
                        "sscd_to_train_mean", "fbmem_vm", "fbmem_fm", "fbmem_bm", "fbmem_mitigation_score",
                        "clip_score", "clip_delta", "general_prompt_clip", "seconds_per_image",
                        "unet_evals_per_image"] if c in df.columns]
    if not len(df):
        return "_no complete mitigation runs_\n"
    out = []
    for (task, model), sub in df.groupby(["task", "model"], sort=True):
        out.append(f"### {task} / {model}\n")
        out.append(sub[cols].to_markdown(index=False, floatfmt=".3f"))
        out.append("")
    return "\n".join(out) + "\n"


def rebuild_mitigate(results_dir: str | Path = "results") -> list[Path]:
    results = Path(results_dir)
    runs_dir, plots = results / "runs", results / "plots"
    df = mitigate_leaderboard(runs_dir) if runs_dir.is_dir() else pd.DataFrame()
    csv = results / "mitigate_leaderboard.csv"
    atomic_to_csv(df if len(df) else pd.DataFrame(columns=MITIGATE_COLUMNS), csv, index=False, float_format="%.6g")
    md = results / "mitigate_leaderboard.md"
    atomic_write_text(md, markdown(df))
    written, pngs = [csv, md], []
    for (task, model), sub in (df.groupby(["task", "model"], sort=True) if len(df) else []):
        tag = f"{_slug(task)}_{_slug(model)}"
        pngs.append(tradeoff_plot(sub, plots / f"mitigate_tradeoff_{tag}.png", title=f"{task} / {model}: copy rate vs CLIP"))
        pngs.append(tradeoff_plot(sub, plots / f"mitigate_tradeoff_sscd_{tag}.png", y="sscd_to_train_mean",
                                  title=f"{task} / {model}: SSCD to the training image vs CLIP"))
        if "fbmem_vm" in sub:
            pngs.append(fbmem_stack_plot(sub, plots / f"mitigate_fbmem_{tag}.png"))
    for stale in sorted(plots.glob("mitigate_*.png")) if plots.is_dir() else []:
        if stale not in pngs:
            stale.unlink()
            print(f"removed stale {stale}", file=sys.stderr)
    from bench.report.fbmem_study import rebuild_fbmem_study
    written += rebuild_fbmem_study(results)
    for p in written + pngs:
        print(f"wrote {p}")
    return written + pngs
