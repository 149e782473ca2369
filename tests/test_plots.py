"""bench.report.plots: leaderboard CSV/markdown and PNGs rebuilt from fake run folders (exact run schema)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from bench.run.io import config_hash
from bench.measure.metrics import FewNegativesWarning
from bench.report.plots import rebuild_all
from bench.run.runner import detect_metrics
from bench.contracts import PromptSet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GROUPS = [("MV", 1, "MV", 12), ("RV", 1, "RV", 8), ("ordinary_seen", 0, "", 40),
          ("random_tokens", 0, "", 40), ("MV_never", 0, "MV", 30)]


def _promptset() -> PromptSet:
    groups, labels, fams, ids = [], [], [], []
    for g, lab, fam, n in GROUPS:
        groups += [g] * n
        labels += [lab] * n
        fams += [fam] * n
        ids += [f"{g}-{i:03d}" for i in range(n)]
    return PromptSet(name="fake", prompts=[f"prompt {i}" for i in ids], labels=np.array(labels, np.int8),
                     groups=groups, types=list(fams), ids=ids, extra={"family": fams})


def _make_run(runs_dir, ps, task, model, det, strength, sec, unet, *, complete=True, seed=0):
    """Write a run folder the way bench.run.runner.run_detect does (config, manifest, per_prompt, metrics)."""
    cfg = {"kind": "detect", "task": {"name": task}, "model": {"name": model},
           "detector": {"id": det}, "seed": seed, "prompt_set_sha256": ps.sha256}
    name = f"{task}__{model}__{det}__{config_hash(cfg)}"
    path = runs_dir / name
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    y = ps.labels.astype(int)
    scores = rng.normal(size=len(ps)) + strength * y
    n_gen = int(det.split("_n")[1].split("_")[0]) if "_n" in det else None
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "kind": "detect", "run": name,
                                                    "git_sha": "abc123"}, indent=2, sort_keys=True))
    rows = pd.DataFrame({"id": ps.ids, "prompt": ps.prompts, "label": y, "group": ps.groups,
                         "family": ps.extra["family"], "type": ps.types,
                         "score": [repr(float(s)) for s in scores], "seconds": sec, "unet_evals": unet})
    rows.to_csv(path / "per_prompt.csv", index=False)
    if not complete:
        return name, None
    back = pd.read_csv(path / "per_prompt.csv", keep_default_na=False, na_values=[""],
                       dtype={"id": str, "prompt": str, "group": str, "family": str, "type": str})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewNegativesWarning)
        m = detect_metrics(back, ps, seed=seed)
    m.update({"kind": "detect", "task": task, "model": model, "detector": det,
              "params": json.dumps({"n_gen": n_gen}, sort_keys=True), "n_gen": n_gen, "steps": 50,
              "git_sha": "abc123", "run": name, "prompt_set_sha256": ps.sha256})
    (path / "metrics.json").write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
    return name, m


@pytest.fixture()
def fake_results(tmp_path):
    ps, runs = _promptset(), tmp_path / "runs"
    specs = [("organism", "organism-small", "nm_n1_k1", 0.8, 0.02, 1.0),
             ("organism", "organism-small", "nm_n4_k10", 2.5, 0.3, 40.0),
             ("organism", "organism-small", "density_pixel_n4", 1.5, 1.2, 200.0),
             ("organism", "oracle", "nm_n1_k1", 1.0, 0.01, 1.0)]
    made = {(t, mo, d): _make_run(runs, ps, t, mo, d, st, sec, u, seed=i)[1]
            for i, (t, mo, d, st, sec, u) in enumerate(specs)}
    incomplete, _ = _make_run(runs, ps, "organism", "organism-small", "density_sscd_n4", 3.0, 2.0, 200.0,
                              complete=False)
    return tmp_path, made, incomplete


def _table_rows(md: str) -> list[str]:
    rows = [l for l in md.splitlines() if l.startswith("|")]
    return [l for l in rows if not l.startswith("| detector") and not set(l) <= set("|-: ")]


def test_rebuild_all(fake_results, capsys):
    root, made, incomplete = fake_results
    written = rebuild_all(root)
    out = capsys.readouterr()
    assert f"skipping incomplete run {incomplete}" in out.err

    df = pd.read_csv(root / "detect_leaderboard.csv")
    assert len(df) == len(made) == 4
    assert incomplete not in set(df["run"])
    assert list(df[["task", "model"]].itertuples(index=False, name=None)) == \
        sorted(df[["task", "model"]].itertuples(index=False, name=None))
    for _, sub in df.groupby(["task", "model"]):
        assert sub["auc"].is_monotonic_decreasing
    for (t, mo, d), m in made.items():
        row = df[(df.task == t) & (df.model == mo) & (df.detector == d)].iloc[0]
        assert row["auc"] == pytest.approx(m["auc"], rel=1e-5)
        for g, v in m["per_group_auc"].items():
            assert row[f"auc_vs_{g}"] == pytest.approx(v, rel=1e-5)
        for f, v in m["per_family_auc"].items():
            assert row[f"auc_{f}"] == pytest.approx(v, rel=1e-5)

    plots = root / "plots"
    small = df[df.model == "organism-small"]
    best = small["run"].iloc[0]
    fastest = small.loc[small["seconds_per_prompt"].idxmin(), "run"]
    oracle_run = df[df.model == "oracle"]["run"].iloc[0]
    expected = {f"detect_{k}_organism_{m}.png" for k in ("roc", "cost", "groups")
                for m in ("organism-small", "oracle")}
    expected |= {f"detect_scores_{r}.png" for r in (best, fastest, oracle_run)}
    assert best != fastest
    assert {p.name for p in plots.glob("*.png")} == expected
    for name in sorted(expected):
        p = plots / name
        assert p in written and p.read_bytes()[:8] == PNG_MAGIC
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert float(img[..., :3].std()) > 0.01  # not blank
        assert f"wrote {p}" in out.out

    md = (root / "detect_leaderboard.md").read_text()
    assert len(_table_rows(md)) == len(df)
    assert md.count("### ") == 2
    assert "AUC vs random_tokens" in md and "AUC vs MV_never" in md
    top = small.iloc[0]
    assert f"| {top['detector']} | 4 | 50 | {top['auc']:.3f} [{top['auc_ci_low']:.3f}, " \
           f"{top['auc_ci_high']:.3f}]" in md


def test_rebuild_all_deterministic(fake_results, capsys):
    root, _, _ = fake_results
    first = rebuild_all(root)
    blobs = {p: p.read_bytes() for p in first}
    second = rebuild_all(root)
    assert first == second
    assert all(p.read_bytes() == blobs[p] for p in second)


def test_rebuild_all_removes_stale_plots(fake_results, capsys):
    root, _, _ = fake_results
    stale = root / "plots" / "detect_scores_gone__run.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    rebuild_all(root)
    assert not stale.exists()


def test_rebuild_all_empty(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    written = rebuild_all(tmp_path)
    out = capsys.readouterr().out
    assert "no complete detection runs" in out
    df = pd.read_csv(tmp_path / "detect_leaderboard.csv")
    assert len(df) == 0 and "auc" in df.columns
    assert _table_rows((tmp_path / "detect_leaderboard.md").read_text()) == []
    assert not list(tmp_path.glob("plots/*.png"))
    assert written == [tmp_path / "detect_leaderboard.csv", tmp_path / "detect_leaderboard.md"]
    rebuild_all(tmp_path / "missing")  # no runs folder at all
    assert pd.read_csv(tmp_path / "missing" / "detect_leaderboard.csv").empty
