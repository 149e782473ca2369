"""Leaderboard and plots, rebuilt only from run folders (``results/runs/<run>/``).

    from bench.report.plots import rebuild_all
    rebuild_all("results")   # detect_leaderboard.csv/.md and results/plots/detect_*.png

Plots (one set per task+model): ROC curves (log and linear FPR), AUC against seconds per prompt
(Wen et al.'s Table 1 as a picture), AUC against each negative group and per positive family, and
score distributions per group for the best and the fastest run. Matplotlib figures are drawn on
the Agg canvas directly (no pyplot, no global backend change).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.core.atomic import atomic_to_csv, atomic_write_text
from bench.run.leaderboard import DETECT_COLUMNS, is_partial, rebuild_leaderboard
from bench.measure.metrics import roc_curve

FAMILIES = ("MV", "RV", "TV", "FG", "BG")
NOT_FAMILY = ("ci_", "vs_", "planted_not_learned")  # auc_ci_low/high, auc_vs_<group>, auc_planted_not_learned


# ---------------------------------------------------------------------- helpers
def _figure(w: float, h: float, ncols: int = 1, **kw):
    fig = Figure(figsize=(w, h), **kw)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight", metadata={"Software": None})
    return out


def _colors(detectors) -> dict[str, tuple]:
    """Deterministic colour per detector id (sorted), the same in every plot of a task+model."""
    from matplotlib import colormaps
    names = sorted(set(detectors))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {d: cmap(i % cmap.N) for i, d in enumerate(names)}


def _kind(detector: str) -> str:
    return "noise_magnitude" if detector.startswith("nm_") else \
        "generation_density" if detector.startswith("density_") else "other"


MARKERS = {"noise_magnitude": "o", "generation_density": "s", "other": "^"}
LINES = {"noise_magnitude": "-", "generation_density": "--", "other": ":"}


def _load_run(run: str | Path) -> tuple[dict, pd.DataFrame]:
    run = Path(run)
    m = json.loads((run / "metrics.json").read_text())
    df = pd.read_csv(run / "per_prompt.csv", keep_default_na=False, na_values=[""],
                     dtype={"id": str, "prompt": str, "group": str, "family": str, "type": str})
    return m, df


def _labels(detectors: list[str], runs: list[str]) -> list[str]:
    """Detector ids; a detector present in several runs gets its run's hash appended."""
    dup = {d for d in detectors if detectors.count(d) > 1}
    return [f"{d} ({r.rsplit('__', 1)[-1]})" if d in dup else d for d, r in zip(detectors, runs)]


def _title(df: pd.DataFrame) -> str:
    pairs = sorted({(str(t), str(m)) for t, m in zip(df.get("task", []), df.get("model", []))})
    return ", ".join(f"{t} / {m}" for t, m in pairs)


def group_columns(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("auc_vs_"))


def family_columns(df: pd.DataFrame) -> list[str]:
    known = [f"auc_{f}" for f in FAMILIES if f"auc_{f}" in df.columns]
    other = sorted(c for c in df.columns if c.startswith("auc_") and c not in known
                   and not c[4:].startswith(NOT_FAMILY))
    return known + other


def _slug(s) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s))


# ---------------------------------------------------------------------- plots
def roc_plot(runs: list[Path], out_png: str | Path, title: str = "", log: bool = True) -> Path:
    """ROC curve per run (one task+model); with ``log`` a log-FPR panel beside the linear one."""
    loaded = list(map(_load_run, runs))
    loaded.sort(key=lambda x: (-float(x[0]["auc"]), str(x[0]["detector"]), str(x[0]["run"])))
    dets = [str(m["detector"]) for m, _ in loaded]
    labels = _labels(dets, [str(m["run"]) for m, _ in loaded])
    colors = _colors(dets)
    fig, axes = _figure(12 if log else 6.5, 5.2, 2 if log else 1)
    # the headline classes: planted_not_learned prompts are in neither (bench.run.runner.detect_metrics)
    loaded = [(m, df[df["group"] != "planted_not_learned"]) for m, df in loaded]
    n_neg = max([int((df["label"] == 0).sum()) for _, df in loaded] or [100])
    lo = min(1e-3, 0.5 / max(n_neg, 1))
    for (m, df), lab, det in zip(loaded, labels, dets):
        fpr, tpr, _ = roc_curve(df["score"].to_numpy(float), df["label"].to_numpy(int))
        kw = dict(color=colors[det], ls=LINES[_kind(det)], lw=1.6, drawstyle="steps-post",
                  label=f"{lab}  AUC {float(m['auc']):.3f}")
        for i, ax in enumerate(axes):
            ax.plot(np.maximum(fpr, lo) if (log and i == 0) else fpr, tpr, **kw)
    grid = np.logspace(np.log10(lo), 0, 200)
    for i, ax in enumerate(axes):
        is_log = log and i == 0
        if is_log:
            ax.set_xscale("log")
            ax.set_xlim(lo, 1)
        else:
            ax.set_xlim(0, 1)
        ax.plot(grid if is_log else [0, 1], grid if is_log else [0, 1], color="0.6", lw=0.8, ls=":")
        ax.axvline(0.01, color="k", lw=0.9, ls="--")
        ax.text(0.01, 0.02, " FPR = 1%", fontsize=8, ha="left", va="bottom")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate" + (" (log)" if is_log else ""))
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3, which="both" if is_log else "major")
    axes[-1].legend(loc="lower right", fontsize=7.5, frameon=True)
    fig.suptitle(title or "ROC", fontsize=11)
    return _save(fig, out_png)


def cost_plot(leaderboard_df: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """AUC (with bootstrap CI) against wall seconds per prompt (log x), one point per detector."""
    df = leaderboard_df.sort_values(["detector", "run"], kind="mergesort")
    dets = df["detector"].astype(str).tolist()
    labels, colors = _labels(dets, df["run"].astype(str).tolist()), _colors(dets)
    fig, (ax,) = _figure(7.5, 5.2)
    x = np.maximum(df["seconds_per_prompt"].to_numpy(float), 1e-4)
    y = df["auc"].to_numpy(float)
    lo = np.nan_to_num(y - df.get("auc_ci_low", pd.Series(y, index=df.index)).to_numpy(float))
    hi = np.nan_to_num(df.get("auc_ci_high", pd.Series(y, index=df.index)).to_numpy(float) - y)
    for xi, yi, l, h, det, lab in zip(x, y, lo, hi, dets, labels):
        ax.errorbar(xi, yi, yerr=[[max(l, 0)], [max(h, 0)]], fmt=MARKERS[_kind(det)], color=colors[det],
                    ms=7, capsize=3, lw=1)
        ax.annotate(lab, (xi, yi), xytext=(5, 4), textcoords="offset points", fontsize=7.5)
    ax.set_xscale("log")
    if len(x):
        ax.set_xlim(x.min() / 2, x.max() * 3)
    ax.axhline(0.5, color="0.5", lw=0.8, ls="--")
    ax.set_ylim(min(0.45, float(np.nanmin(y - lo)) - 0.03) if len(y) else 0.45, 1.02)
    ax.set_xlabel("wall seconds per prompt (log)")
    ax.set_ylabel("AUC (95% bootstrap CI)")
    ax.grid(alpha=0.3, which="both")
    from matplotlib.lines import Line2D
    kinds = sorted({_kind(d) for d in dets})
    ax.legend([Line2D([], [], marker=MARKERS[k], color="0.35", ls="") for k in kinds],
              [k.replace("_", " ") for k in kinds], loc="lower right", fontsize=8)
    ax.set_title(title or f"detection cost vs AUC: {_title(df)}", fontsize=11)
    return _save(fig, out_png)


def _bars(ax, df: pd.DataFrame, cols: list[str], prefix: str, title: str) -> None:
    dets = _labels(df["detector"].astype(str).tolist(), df["run"].astype(str).tolist())
    n, k = len(dets), max(len(cols), 1)
    width = 0.8 / k
    from matplotlib import colormaps
    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    for j, c in enumerate(cols):
        ax.bar(np.arange(n) - 0.4 + width * (j + 0.5), df[c].to_numpy(float), width,
               color=cmap(j % cmap.N), label=c[len(prefix):])
    ax.axhline(0.5, color="k", lw=1, ls="--")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(dets, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUC")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if cols:
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no columns", ha="center", transform=ax.transAxes)


def group_auc_plot(leaderboard_df: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    """Per detector: AUC of all positives vs each negative group, and of each family vs all negatives."""
    df = leaderboard_df.sort_values(["auc", "detector", "run"], ascending=[False, True, True],
                                    kind="mergesort")
    fig = Figure(figsize=(max(8.0, 0.7 * len(df) + 4), 8.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1)
    _bars(ax1, df, group_columns(df), "auc_vs_", "all positives vs each negative group")
    _bars(ax2, df, family_columns(df), "auc_", "each positive family vs all negatives")
    fig.suptitle(title or f"AUC by group and family: {_title(df)}", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def score_hist_plot(run: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Scores per group of one run (box + jittered strip): positives first, then negative groups."""
    m, df = _load_run(run)
    s, y = df["score"].to_numpy(float), df["label"].to_numpy(int)
    df = df.assign(group=df["group"].fillna("").astype(str))
    order = sorted(df.groupby("group")["label"].max().items(), key=lambda gl: (-gl[1], gl[0]))
    groups = [g for g, _ in order]
    data = [df.loc[df["group"] == g, "score"].to_numpy(float) for g in groups]
    fig, (ax,) = _figure(max(6.0, 0.55 * len(groups) + 3), 5)
    ax.boxplot(data, positions=np.arange(len(groups)), widths=0.6, showfliers=False,
               medianprops={"color": "k"})
    rng = np.random.default_rng(0)
    for i, ((g, lab), v) in enumerate(zip(order, data)):
        ax.scatter(i + rng.uniform(-0.22, 0.22, len(v)), v, s=9, alpha=0.6, lw=0,
                   color="tab:red" if lab == 1 else "tab:blue")
    if (y == 1).any() and (y == 0).any():  # threshold of the 1% FPR point ("strictly below")
        fpr, _, thr = roc_curve(s, y)
        t = thr[np.flatnonzero(fpr < 0.01)[-1]]
        if np.isfinite(t):
            ax.axhline(t, color="k", lw=0.9, ls="--", label="threshold at FPR < 1%")
            ax.legend(fontsize=8, loc="best")
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score (higher = more likely memorized)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title or f"{m['detector']} on {m['task']} / {m['model']}  (AUC {float(m['auc']):.3f})\n"
                 "red = memorized groups, blue = negative groups", fontsize=9.5)
    return _save(fig, out_png)


# ---------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 3) -> str:
    if isinstance(v, str):
        return v.replace("|", "\\|")
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    if not np.isfinite(f):
        return "–"
    return str(int(round(f))) if digits == 0 else f"{f:.{digits}f}"


def _fused(r) -> bool:
    return str(r.get("timing", "")).startswith("apportioned")


def partial_section(df: pd.DataFrame) -> list[str]:
    """Markdown lines listing partial runs apart from the headline tables, with the reason."""
    part = df[is_partial(df)]
    if not len(part):
        return []
    out = ["### Partial runs (not benchmark results)", "",
           "Smoke runs on a subset of their task; their AUC is not comparable with the tables above.", "",
           "| task / model | detector | AUC | pos / neg | why partial | run |", "|---|---|---:|---:|---|---|"]
    for _, r in part.iterrows():
        out.append(f"| {_fmt(r['task'])} / {_fmt(r['model'])} | {_fmt(r['detector'])} | {_fmt(r['auc'])} | "
                   f"{_fmt(r.get('n_pos'), 0)} / {_fmt(r.get('n_neg'), 0)} | {_fmt(r.get('partial_reason'))} | "
                   f"{_fmt(r['run'])} |")
    return out + [""]


def markdown_table(df: pd.DataFrame) -> str:
    """One markdown table per task+model (rows in leaderboard order); partial runs (``is_partial``) are
    listed apart at the end, never as headline rows."""
    if not len(df):
        return "_No complete detection runs._\n"
    out, head_df = [], df[~is_partial(df)]
    if not len(head_df):
        out += ["_No complete detection runs on a whole task._", ""]
    for (task, model), sub in head_df.groupby(["task", "model"], sort=True):
        gcols = [c for c in group_columns(sub) if sub[c].notna().any()]
        planted = "planted_auc" in sub and sub["planted_auc"].notna().any()
        pnl = "auc_planted_not_learned" in sub and sub["auc_planted_not_learned"].notna().any()
        extra = (["labels", "pos / neg"] + (["planted: AUC", "planted: TPR@1%FPR"] if planted else [])
                 + (["AUC planted_not_learned vs neg"] if pnl else []))
        head = ["detector", "n_gen", "steps", "AUC [95% CI]", "TPR@1%FPR", "TPR@3%FPR", *extra,
                *[f"AUC vs {c[7:]}" for c in gcols], "s/prompt", "UNet evals/prompt"]
        out += [f"### {task} / {model}", "", "| " + " | ".join(head) + " |",
                "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for _, r in sub.iterrows():
            cells = [_fmt(r["detector"]), _fmt(r.get("n_gen"), 0), _fmt(r.get("steps"), 0),
                     f"{_fmt(r['auc'])} [{_fmt(r.get('auc_ci_low'))}, {_fmt(r.get('auc_ci_high'))}]",
                     _fmt(r.get("tpr_at_1pct_fpr")), _fmt(r.get("tpr_at_3pct_fpr")),
                     _fmt(r.get("label_source") if isinstance(r.get("label_source"), str)
                          else ("planted" if str(task).startswith("organism") else "published")),
                     f"{_fmt(r.get('n_pos'), 0)} / {_fmt(r.get('n_neg'), 0)}",
                     *([_fmt(r.get("planted_auc")), _fmt(r.get("planted_tpr_at_1pct_fpr"))] if planted else []),
                     *([_fmt(r.get("auc_planted_not_learned"))] if pnl else []),
                     *[_fmt(r[c]) for c in gcols],
                     _fmt(r.get("seconds_per_prompt")) + (" †" if _fused(r) else ""),
                     _fmt(r.get("unet_evals_per_prompt"))]
            out.append("| " + " | ".join(cells) + " |")
        if planted or pnl:
            out += ["", "labels = measured: a prompt is memorized when its generations reproduce its training image "
                        "(ground truth of these weights); planted prompts that do not reproduce "
                        "(planted_not_learned) are in neither class and scored against the negatives in their own "
                        "column (0.5 = scored like non-memorized prompts). planted: = every planted-family prompt "
                        "positive (the convention before measured labels)."]
        if any(_fused(r) for _, r in sub.iterrows()):
            out += ["", "† seconds apportioned from one fused sampling pass by UNet rows "
                        "(`diffmem detect-fused`, bench/run/detect_fused.py), not measured per configuration."]
        out.append("")
    return "\n".join(out + partial_section(df))


# ---------------------------------------------------------------------- rebuild
def rebuild_all(results_dir: str | Path = "results") -> list[Path]:
    """Rebuild detect_leaderboard.csv/.md and results/plots/detect_*.png from results/runs."""
    results = Path(results_dir)
    runs_dir, plots = results / "runs", results / "plots"
    for d in sorted(p for p in runs_dir.glob("*") if p.is_dir()) if runs_dir.is_dir() else []:
        if not (d / "metrics.json").is_file():
            print(f"skipping incomplete run {d.name} (no metrics.json)", file=sys.stderr)
    csv_path = results / "detect_leaderboard.csv"
    df = rebuild_leaderboard(runs_dir, csv_path, "detect")
    written = [csv_path]
    if not len(df):
        print(f"note: no complete detection runs under {runs_dir}; wrote an empty leaderboard")
        atomic_to_csv(pd.DataFrame(columns=DETECT_COLUMNS), csv_path, index=False)
    md = results / "detect_leaderboard.md"
    atomic_write_text(md, markdown_table(df))
    written.append(md)
    pngs: list[Path] = []
    head_df = df[~is_partial(df)] if len(df) else df      # plots show whole-task runs only
    if len(head_df):
        for (task, model), sub in head_df.groupby(["task", "model"], sort=True):
            tag, title = f"{_slug(task)}_{_slug(model)}", f"{task} / {model}"
            pngs.append(roc_plot([runs_dir / r for r in sub["run"]], plots / f"detect_roc_{tag}.png",
                                 f"ROC: {title}"))
            pngs.append(cost_plot(sub, plots / f"detect_cost_{tag}.png"))
            pngs.append(group_auc_plot(sub, plots / f"detect_groups_{tag}.png"))
            best = sub["run"].iloc[0]  # the leaderboard is sorted by AUC desc, then seconds asc
            fastest = sub.sort_values(["seconds_per_prompt", "auc", "run"], ascending=[True, False, True],
                                      kind="mergesort")["run"].iloc[0]
            for r in sorted({best, fastest}):
                pngs.append(score_hist_plot(runs_dir / r, plots / f"detect_scores_{_slug(r)}.png"))
    for stale in sorted(plots.glob("detect_*.png")) if plots.is_dir() else []:
        if stale not in pngs:  # plots of runs that no longer exist
            stale.unlink()
            print(f"removed stale {stale}", file=sys.stderr)
    written += pngs
    for p in written:
        print(f"wrote {p}")
    return written
