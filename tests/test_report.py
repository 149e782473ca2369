"""The HTML report: built from whatever is under results/, renders in headless Chromium with no
missing image. Chromium is required (CI installs it, see .ci/run); set DIFFMEM_SKIP_BROWSER_TESTS=1
to opt out explicitly, otherwise a missing browser fails the test with a clear message."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.report.html_report import build_report

OPT_OUT = "DIFFMEM_SKIP_BROWSER_TESTS"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--dump-dom"]
# Appended to a copy of the page: after the load event, record every image's state on <body>.
CHECK_JS = """<script>window.addEventListener('load', () => {
  const r = Array.from(document.images).map(i => ({src: i.getAttribute('src'),
                                                   ok: i.complete && i.naturalWidth > 0}));
  document.body.setAttribute('data-img-check', JSON.stringify(r)); });</script>"""


def chromium() -> str:
    for name in (os.environ.get("DIFFMEM_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: browser rendering test skipped on request")
    pytest.fail("headless Chromium not found (tried $DIFFMEM_CHROMIUM, chromium, chromium-browser, "
                "google-chrome): install it with `apt-get install -y chromium` (.ci/run does), or set "
                f"{OPT_OUT}=1 to skip the browser test explicitly")


def image_states(page: Path, tmp_path: Path, extra_html: str = "") -> list[dict]:
    """Load ``page`` (a copy with the check script, in the same folder) in headless Chromium."""
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", extra_html + CHECK_JS + "</body>"),
                     encoding="utf-8")
    try:
        res = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}",
                              probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    m = re.search(r'data-img-check="([^"]*)"', res.stdout)
    assert m, f"Chromium produced no check result (rc {res.returncode}); stderr tail: {res.stderr[-800:]}"
    return json.loads(html.unescape(m.group(1)))


def _png(path: Path, label: str) -> None:
    fig = Figure(figsize=(2, 1.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=50)


@pytest.fixture()
def results(tmp_path) -> Path:
    """A results folder with a leaderboard, plots of several kinds (one in a subfolder), a run."""
    r = tmp_path / "results"
    (r / "runs" / "organism__m__nm_n1_k1__abc").mkdir(parents=True)
    pd.DataFrame({"task": ["organism"], "model": ["m"], "detector": ["nm_n1_k1"], "auc": [0.918],
                  "run": ["organism__m__nm_n1_k1__abc"]}).to_csv(r / "detect_leaderboard.csv", index=False)
    pd.DataFrame({"mitigator": ["rt"], "clip_score": [0.3]}).to_csv(r / "mitigate_leaderboard.csv", index=False)
    pd.DataFrame({"group": ["MV"], "n": [20]}).to_csv(r / "organism_groundtruth_summary.csv", index=False)
    for name in ("detect_roc_organism_m", "detect_cost_organism_m", "mitigate_tradeoff_m", "fbmem_shares_m",
                 "explain/token_attribution_p1", "a weird & name"):
        _png(r / "plots" / f"{name}.png", name)
    run = r / "runs" / "organism__m__nm_n1_k1__abc"
    (run / "config.json").write_text(json.dumps({"task": {"name": "organism"}, "detector": {"id": "nm_n1_k1"}}))
    (run / "manifest.json").write_text(json.dumps({
        "run": run.name, "kind": "detect", "git_sha": "0123456789abcdef", "git_dirty": False,
        "seeds": {"seed": 0}, "model": {"name": "m"}, "params": {"n_gen": 1, "steps": 1},
        "prompt_set": {"name": "organism_s0", "n": 515, "sha256": "f4f94dc5f3aa94697574d3ba"},
        "device": {"processor": "x86_64", "cuda": False, "torch_threads": 2},
        "started": "2026-01-01T00:00:00", "finished": "2026-01-01T00:01:00"}))
    return r


def test_report_collects_every_table_plot_and_manifest(results):
    page = build_report(results)
    doc = page.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]*)"', doc)
    pngs = sorted(p.relative_to(results).as_posix() for p in (results / "plots").rglob("*.png"))
    assert sorted(html.unescape(s) for s in srcs) == pngs            # globbed, none missing, none extra
    assert all((page.parent / html.unescape(s)).is_file() for s in srcs)   # relative to the page
    for title in ("Leaderboard: detect", "Leaderboard: mitigate", "ROC curves", "Mitigation trade-off",
                  "FB-Mem", "Token attribution", "Other plots", "Table: organism_groundtruth_summary"):
        assert title in doc, title
    for field in ("organism_s0", "0123456789", "f4f94dc5f3aa9469", "nm_n1_k1", "0.918"):
        assert field in doc, field
    assert "a weird &amp; name" in doc                              # file names are escaped


def test_report_renders_in_chromium_with_no_missing_image(results, tmp_path):
    page = build_report(results, tmp_path / "site" / "report.html")   # page elsewhere: paths stay relative
    states = image_states(page, tmp_path)
    assert len(states) == len(list((results / "plots").rglob("*.png"))) == 6
    assert all(s["ok"] for s in states), [s for s in states if not s["ok"]]


def test_chromium_check_detects_a_broken_image(results, tmp_path):
    page = build_report(results)
    states = image_states(page, tmp_path, extra_html='<img src="plots/does_not_exist.png">')
    bad = [s["src"] for s in states if not s["ok"]]
    assert bad == ["plots/does_not_exist.png"]


def test_report_of_the_committed_results_renders(tmp_path):
    results = Path(__file__).resolve().parents[1] / "results"
    if not (results / "plots").is_dir():
        pytest.fail(f"{results}/plots is missing; the committed results are incomplete")
    page = build_report(results, tmp_path / "report.html")
    states = image_states(page, tmp_path)
    assert states and all(s["ok"] for s in states), [s for s in states if not s["ok"]]


def test_missing_results_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results folder not found"):
        build_report(tmp_path / "nope")


def test_missing_chromium_fails_loudly_unless_opted_out(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv(OPT_OUT, raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        chromium()
    monkeypatch.setenv(OPT_OUT, "1")
    with pytest.raises(pytest.skip.Exception, match="skipped on request"):
        chromium()
