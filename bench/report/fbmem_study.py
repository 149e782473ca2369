"""The FB-Mem study (issue 5; FB-Mem, methods.md 7): per planted family, what each mitigator leaves.

Rebuilt from mitigate run folders only (``diffmem leaderboard`` calls it after the leaderboard):

    results/fbmem_study.csv    one row per (task, model, mitigator, strength, family)
    results/fbmem_study.md     per task: copy rate and FB-Mem shares per family, mitigator by mitigator
    results/plots/fbmem_study_<task>_<model>.png   stacked VM/FM/BM/NM per family, copy rate as a dot

FB-Mem's claims (abstract): neuron deactivation and pruning leave local memorization in place,
foreground above all; the clustering mitigations (NeMo-C, cluster-driven training augmentation)
remove more of it. Per family ``f`` in MV (verbatim), FG (foreground-local) and BG (background-local):

- ``copy_rate``: share of generations judged copies by the organism's criterion (``bench.measure.copyscore``:
  cn-RMSE to a planted target, over the foreground region for FG, the background for BG);
- ``vm`` / ``fm`` / ``bm`` / ``nm``: FB-Mem category shares (``bench.measure.fbmem``, MS-SSIM thresholds
  calibrated on MemWorld); ``fg_memorized`` = vm + fm (the foreground still reproduced),
  ``bg_memorized`` = vm + bm;
- ``mitigation_score``: FB-Mem's transition reward none -> mitigated, images paired by prompt and
  seed, over the family's generations only (the paper's is over all images).

Rows of the two protocols are never mixed: ``none`` of the ``organism`` task is the committed organism,
``none`` of ``organism_finetune`` is the plain fine-tune (the only model with a memorized FG family).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.atomic import atomic_to_csv, atomic_write_text
from bench.report.plots import _figure, _save, _slug

FAMILIES = ("MV", "FG", "BG")
CATS = ("VM", "FM", "BM", "NM")
CAT_COLORS = {"VM": "#b2182b", "FM": "#ef8a62", "BM": "#67a9cf", "NM": "#d9d9d9"}
COLUMNS = ["task", "model", "mitigator", "strength", "family", "n_images", "copy_rate", "vm", "fm", "bm", "nm",
           "fg_memorized", "bg_memorized", "mitigation_score", "protocol_hash", "run"]


def fbmem_study(runs_dir: str | Path) -> pd.DataFrame:
    from bench.measure.fbmem import mitigation_score
    from bench.run.leaderboard import mitigate_runs, run_rows

    runs = [(d, p) for d, p in mitigate_runs(Path(runs_dir))]
    base = {d["protocol_hash"]: p for d, p in runs if d["mitigator"] == "none"}
    recs = []
    for d, p in runs:
        rows = run_rows(p)
        if "fbmem_category" not in rows:
            continue
        mem = rows[rows.label == 1]
        before = run_rows(base[d["protocol_hash"]]) if d["protocol_hash"] in base else None
        for fam in FAMILIES:
            g = mem[mem.group == fam]
            if not len(g):
                continue
            share = {c.lower(): float((g["fbmem_category"] == c).mean()) for c in CATS}
            rec = {"task": d["task"], "model": d["model"], "mitigator": d["mitigator"], "strength": d["strength"],
                   "family": fam, "n_images": int(len(g)), "copy_rate": float(g["copy"].mean()), **share,
                   "fg_memorized": share["vm"] + share["fm"], "bg_memorized": share["vm"] + share["bm"],
                   "mitigation_score": np.nan, "protocol_hash": d["protocol_hash"], "run": d["run"]}
            if before is not None:
                j = before[(before.label == 1) & (before.group == fam)][["id", "fbmem_category"]].merge(
                    g[["id", "fbmem_category"]], on="id", suffixes=("_before", "_after"))
                if len(j) != len(g):
                    raise RuntimeError(f"FB-Mem study: {d['run']} family {fam} has {len(g)} images, of which "
                                       f"{len(j)} pair with the none run by prompt and seed; rerun both")
                rec["mitigation_score"] = mitigation_score(j["fbmem_category_before"].tolist(),
                                                           j["fbmem_category_after"].tolist())
            recs.append(rec)
    df = pd.DataFrame(recs, columns=COLUMNS)
    if len(df):
        df = (df.assign(_n=df["mitigator"] != "none", _f=df["family"].map(FAMILIES.index))
              .sort_values(["task", "model", "_n", "mitigator", "strength", "_f"], kind="mergesort")
              .drop(columns=["_n", "_f"]).reset_index(drop=True))
    return df


def markdown(df: pd.DataFrame) -> str:
    if not len(df):
        return "_no mitigate runs with FB-Mem categories_\n"
    out = ["# FB-Mem study (rebuilt by `diffmem leaderboard`; discussion: README \"FB-Mem study\")\n",
           "Per family: copy = copy rate (organism criterion), VM+FM = share whose foreground is still "
           "reproduced, VM+BM = share whose background is, score = FB-Mem mitigation score against `none` of the same protocol "
           "(+2 = every VM became NM; 0 = no change).\n"]
    for (task, model), sub in df.groupby(["task", "model"], sort=True):
        wide = sub.pivot_table(index=["mitigator", "strength"], columns="family", sort=False,
                               values=["copy_rate", "fg_memorized", "bg_memorized", "mitigation_score"])
        fams = [f for f in FAMILIES if f in set(sub.family)]
        cols, names = [], []
        for f in fams:
            for v, short in (("copy_rate", "copy"), ("fg_memorized", "VM+FM"), ("bg_memorized", "VM+BM"),
                             ("mitigation_score", "score")):
                cols.append((v, f)), names.append(f"{f} {short}")
        order = list(dict.fromkeys(zip(sub.mitigator, sub.strength)))
        t = wide[cols].reindex(pd.MultiIndex.from_tuples(order, names=["mitigator", "strength"]))
        t.columns = names
        n = sub.groupby("family")["n_images"].max()
        out.append(f"## {task} / {model}\n\nimages per family and run: "
                   + ", ".join(f"{f} {int(n[f])}" for f in fams) + "\n")
        out.append(t.reset_index().to_markdown(index=False, floatfmt=".2f"))
        out.append("")
    return "\n".join(out) + "\n"


def study_plot(sub: pd.DataFrame, out_png: str | Path, title: str = "") -> Path:
    fams = [f for f in FAMILIES if f in set(sub.family)]
    labels = list(dict.fromkeys(f"{m}@{s:g}" for m, s in zip(sub.mitigator, sub.strength)))
    fig, axes = _figure(max(7.0, 0.32 * len(labels) * len(fams) + 2), 4.2, ncols=len(fams))
    for ax, fam in zip(axes, fams):
        g = sub[sub.family == fam].assign(label=lambda x: [f"{m}@{s:g}" for m, s in zip(x.mitigator, x.strength)])
        g = g.set_index("label").reindex(labels)
        x, bottom = np.arange(len(labels)), np.zeros(len(labels))
        for c in CATS:
            v = g[c.lower()].fillna(0).to_numpy()
            ax.bar(x, v, bottom=bottom, color=CAT_COLORS[c], label=c, width=0.8)
            bottom += v
        ax.plot(x, g["copy_rate"], "ko", ms=4, label="copy rate")
        ax.set_xticks(x, labels, rotation=75, ha="right", fontsize=6)
        ax.set_title(f"{fam} family", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of generations of memorized prompts")
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.suptitle(title or "FB-Mem study: categories per family (VM verbatim, FM foreground, BM background, NM none)",
                 fontsize=10)
    return _save(fig, out_png)


def rebuild_fbmem_study(results_dir: str | Path = "results") -> list[Path]:
    results = Path(results_dir)
    runs = results / "runs"
    df = fbmem_study(runs) if runs.is_dir() else pd.DataFrame(columns=COLUMNS)
    csv, md = results / "fbmem_study.csv", results / "fbmem_study.md"
    atomic_to_csv(df, csv, index=False, float_format="%.6g")
    atomic_write_text(md, markdown(df))
    out = [csv, md]
    plots = results / "plots"
    keep = []
    for (task, model), sub in (df.groupby(["task", "model"], sort=True) if len(df) else []):
        keep.append(study_plot(sub, plots / f"fbmem_study_{_slug(task)}_{_slug(model)}.png",
                               title=f"FB-Mem study, {task} / {model}: categories per family, copy rate as dots"))
    for stale in sorted(plots.glob("fbmem_study_*.png")) if plots.is_dir() else []:
        if stale not in keep:
            stale.unlink()
    return out + keep
