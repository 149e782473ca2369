"""One static HTML page over ``results/`` (``make report`` -> ``results/report.html``).

Everything on the page is read from what is on disk when it is built, nothing is hardcoded:
every ``*_leaderboard.csv`` as a table, every PNG under ``plots/`` (globbed, grouped into sections
by file-name prefix: ROC, cost, trade-off, FB-Mem, attribution, other), the other summary tables
(``*.csv`` next to the leaderboards, small ones inline, large ones linked), calibration held-out
checks (``calibration/heldout__*.json``) and the protocol fields of every run manifest
(``runs/*/manifest.json``: task, model, method, seeds, prompt set and its sha256, git sha, device).
Images use paths relative to the page, so the page and ``results/`` can be moved together.

    diffmem report [RESULTS_DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.core.atomic import atomic_write_text

from bench.run.io import git_info
from bench.run.leaderboard import is_partial

# (section title, file-name prefixes); first match wins, unmatched plots go to "Other plots"
PLOT_SECTIONS = (
    ("ROC curves", ("detect_roc",)),
    ("Cost vs accuracy", ("detect_cost", "speed", "cost")),
    ("Per-group and per-family AUC", ("detect_groups",)),
    ("Score distributions", ("detect_scores",)),
    ("Mitigation trade-off", ("mitigate", "tradeoff", "trade_off")),
    ("FB-Mem (foreground / background memorization)", ("fbmem", "fb_mem")),
    ("Token attribution", ("explain", "attribution", "token")),
)
INLINE_MAX_ROWS = 60
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:right;white-space:nowrap}th{background:#f0f0f0}.scroll{overflow-x:auto}figure{display:inline-block;
margin:0 1em 1em 0;vertical-align:top}figure img{max-width:640px;border:1px solid #ddd}figcaption{font-size:12px}
code{background:#f4f4f4;padding:0 3px}.meta{color:#555;font-size:13px}"""
PROTOCOL_FIELDS = ("run", "kind", "task", "model", "method", "seeds", "prompt_set", "prompt_set_n",
                   "prompt_set_sha256", "params", "git_sha", "git_dirty", "device", "torch_threads",
                   "started", "finished")


@dataclass(frozen=True)
class Section:
    title: str
    body: str


def _esc(x) -> str:
    return html.escape("" if x is None else str(x))


def _table(df: pd.DataFrame) -> str:
    # long text columns (e.g. params JSON) go last, so the numbers stay in view
    long = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c]) and df[c].astype(str).str.len().max() > 60]
    df = df[[c for c in df.columns if c not in long] + long]
    return '<div class="scroll">' + df.to_html(index=False, escape=True, na_rep="", border=0,
                                               float_format=lambda v: f"{v:.4g}") + "</div>"


def _rel(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


# ---------------------------------------------------------------------- sections
def leaderboard_sections(results: Path) -> list[Section]:
    out = []
    for csv in sorted(results.glob("*_leaderboard.csv")):
        df = _read_csv(csv)
        part = is_partial(df)
        body = _table(df[~part]) if (~part).any() else "<p>(no complete runs yet)</p>"
        if part.any():              # smoke runs on a subset of their task: apart, never headline rows
            body += ("<h3>Partial runs (not benchmark results)</h3><p class=meta>runs on a subset of their task "
                     "(see partial_reason); not comparable with the table above.</p>" + _table(df[part]))
        out.append(Section(f"Leaderboard: {csv.stem.removesuffix('_leaderboard')}",
                           f"<p class=meta>{_esc(csv.name)}: {len(df)} rows, rebuilt from run folders.</p>{body}"))
    return out


def plot_sections(results: Path, page: Path) -> list[Section]:
    groups: dict[str, list[Path]] = {}
    for png in sorted((results / "plots").rglob("*.png")):
        title = next((t for t, prefixes in PLOT_SECTIONS if png.stem.lower().startswith(prefixes)), "Other plots")
        groups.setdefault(title, []).append(png)
    order = [t for t, _ in PLOT_SECTIONS] + ["Other plots"]
    return [Section(t, "".join(f'<figure><a href="{_esc(_rel(p, page))}"><img src="{_esc(_rel(p, page))}" '
                               f'alt="{_esc(p.stem)}" loading="eager"></a><figcaption>{_esc(p.relative_to(results))}'
                               "</figcaption></figure>" for p in groups[t]))
            for t in order if t in groups]


def other_table_sections(results: Path, page: Path) -> list[Section]:
    out = []
    for csv in sorted(p for p in results.glob("*.csv") if not p.name.endswith("_leaderboard.csv")):
        df = _read_csv(csv)
        if len(df) > INLINE_MAX_ROWS:
            body = f'<p><a href="{_esc(_rel(csv, page))}">{_esc(csv.name)}</a>: {len(df)} rows (linked, not inlined).</p>'
        else:
            body = _table(df)
        out.append(Section(f"Table: {csv.stem}", body))
    return out


def calibration_section(results: Path) -> list[Section]:
    rows = []
    for f in sorted((results / "calibration").glob("heldout__*.json")):
        d = json.loads(f.read_text())
        for a in d.get("alphas", []):
            rep = next((r for r in d.get("repeated_splits", []) if r["alpha"] == a["alpha"]), {})
            rows.append({"model": d.get("model"), "detector": d.get("detector"), "alpha": a["alpha"],
                         "n_calibration": a["n_calibration"], "n_heldout": a["n_heldout"],
                         "heldout_flag_rate": a["heldout_flag_rate"],
                         "binomial_99%": f"[{a['binomial_low']}, {a['binomial_high']}] flags",
                         "mean_rate_over_splits": rep.get("mean_flag_rate"), "splits": rep.get("repeats"),
                         "memorized_flag_rate": a.get("memorized_flag_rate"), "file": f.name})
    if not rows:
        return []
    return [Section("Calibrated p-values: held-out check",
                    "<p class=meta>Flag = conformal p-value &le; alpha; for non-memorized prompts exchangeable "
                    "with the reference set, P(flag) &le; alpha (bench/measure/calibration.py).</p>" + _table(pd.DataFrame(rows)))]


def manifest_rows(results: Path) -> pd.DataFrame:
    rows = []
    for f in sorted((results / "runs").glob("*/manifest.json")):
        m = json.loads(f.read_text())
        cfg_f = f.parent / "config.json"
        cfg = json.loads(cfg_f.read_text()) if cfg_f.is_file() else {}
        ps = m.get("prompt_set") or {}
        rf = m.get("result_fields") or {}            # the run's id: an overridden config shows its difference
        method = rf.get("detector") or rf.get("mitigator") or next(
            (cfg[k].get("id") for k in ("detector", "mitigator", "explainer") if isinstance(cfg.get(k), dict)), None)
        task = cfg.get("task")
        rows.append({"run": m.get("run", f.parent.name), "kind": m.get("kind"),
                     "task": task.get("name") if isinstance(task, dict) else task,
                     "model": (m.get("model") or {}).get("name") if isinstance(m.get("model"), dict) else m.get("model"),
                     "method": method, "seeds": json.dumps(m.get("seeds"), sort_keys=True),
                     "prompt_set": ps.get("name"), "prompt_set_n": ps.get("n"),
                     "prompt_set_sha256": (ps.get("sha256") or "")[:16],
                     "params": json.dumps(m.get("params"), sort_keys=True) if m.get("params") else "",
                     "git_sha": (m.get("git_sha") or "")[:10], "git_dirty": m.get("git_dirty"),
                     "device": "cuda: " + str((m.get("device") or {}).get("gpu")) if (m.get("device") or {}).get("cuda")
                     else (m.get("device") or {}).get("processor"),
                     "torch_threads": (m.get("device") or {}).get("torch_threads"),
                     "started": m.get("started"), "finished": m.get("finished")})
    return pd.DataFrame(rows, columns=list(PROTOCOL_FIELDS))


def build_report(results_dir: str | Path = "results", out: str | Path | None = None) -> Path:
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results folder not found: {results} (resolved {results.resolve()}); "
                                "run `make bench-detect` first or pass the folder: diffmem report RESULTS_DIR")
    page = Path(out) if out else results / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    runs = manifest_rows(results)
    sections = [*leaderboard_sections(results), *plot_sections(results, page), *calibration_section(results),
                *other_table_sections(results, page)]
    sections.append(Section("Runs and their protocol (from manifest.json)",
                            _table(runs) if len(runs) else "<p>(no run folders)</p>"))
    git = git_info()
    run_shas = sorted(set(runs["git_sha"].dropna()) - {""}) if len(runs) else []
    nav = " | ".join(f'<a href="#s{i}">{_esc(s.title)}</a>' for i, s in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{_esc(s.title)}</h2>{s.body}' for i, s in enumerate(sections))
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>diffmem report</title>'
           f"<style>{CSS}</style></head><body><h1>diffmem report</h1>"
           f"<p class=meta>Built {time.strftime('%Y-%m-%d %H:%M:%S %z')} from <code>{_esc(results)}</code> at git "
           f"<code>{_esc(git['git_sha'])}</code>{' (uncommitted changes)' if git['git_dirty'] else ''}; "
           f"runs were measured at git {', '.join(f'<code>{_esc(s)}</code>' for s in run_shas) or '-'}. "
           f"Every number is rebuilt from run folders; rebuild with <code>make report</code>.</p>"
           f"<nav>{nav}</nav>{body}</body></html>\n")
    atomic_write_text(page, doc)
    return page


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="diffmem report", description="static HTML page over results/")
    ap.add_argument("results_dir", nargs="?", default="results")
    ap.add_argument("--out", default=None, help="HTML file (default RESULTS_DIR/report.html)")
    args = ap.parse_args(argv)
    print(f"report -> {build_report(args.results_dir, args.out)}")
