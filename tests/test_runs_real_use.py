"""Runs that survive real use (issue 16, items 1-6): run identity by weights not path, partial runs apart
from the leaderboard, overridden configurations named by their difference, exclusive locks, atomic
writes, and validation / repair of corrupted per-prompt rows (small organism)."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from baselines.detectors.noise_magnitude import NoiseMagnitude
from bench.run.runner import run_detect

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def cfg_for(tmp_path, *overrides, name: str = "detect") -> dict:
    base = ([f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv"] if name == "detect" else
            ["model=organism_small", f"out_dir={tmp_path}/screen", "calibration=none"])
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose(name, overrides=[*base, "hardware.threads=1", *overrides])
    return OmegaConf.to_container(c, resolve=True)


def small(tmp_path, *overrides, model: str = "organism_small") -> dict:
    return cfg_for(tmp_path, f"model={model}", "task.labels=planted", "task.max_per_group=1",
                   "detector=nm_n1_k1", *overrides)


def no_scoring(monkeypatch) -> dict:
    """Count the prompts the detector scores from now on."""
    calls, orig = {"prompts": 0}, NoiseMagnitude.score

    def counted(self, model, prompts, *, seed):
        calls["prompts"] += len(prompts)
        return orig(self, model, prompts, seed=seed)

    monkeypatch.setattr(NoiseMagnitude, "score", counted)
    return calls


# ---------------------------------------------------------------------- 1. run identity
def test_a_clone_resumes_the_same_run_and_changed_weights_start_a_new_one(tmp_path, small_organism, monkeypatch):
    from safetensors.torch import load_file, save_file

    a = shutil.copytree(small_organism.path, tmp_path / "checkout_a" / "organism-test")
    b = shutil.copytree(small_organism.path, tmp_path / "checkout_b" / "organism-test")

    def cfg(path):
        return small(tmp_path, f"model.path={path}", "model.name=organism-test", "leaderboard=null", model="sd14")

    first = run_detect(cfg(a), progress=False)
    calls = no_scoring(monkeypatch)
    clone = run_detect(cfg(b), progress=False)                  # a fresh clone in another directory
    assert clone["run"] == first["run"] and calls["prompts"] == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [first["run"]]
    man = json.loads((tmp_path / "runs" / first["run"] / "manifest.json").read_text())
    assert man["model"]["path"] == str(b) and man["model_weights_sha256"]   # path recorded, not keyed
    f = Path(b) / "unet" / "diffusion_pytorch_model.safetensors"           # retrained in the same folder
    t = load_file(f)
    k = sorted(t)[0]
    t[k] = t[k] + 1e-3
    save_file(t, f, metadata={"format": "pt"})
    new = run_detect(cfg(b), progress=False)
    assert new["run"] != first["run"] and calls["prompts"] == first["n_pos"] + first["n_neg"]


# ---------------------------------------------------------------------- 2. partial runs
def test_smoke_runs_are_marked_partial_and_listed_apart(tmp_path, small_organism):
    from bench.report.plots import markdown_table, rebuild_all

    m = run_detect(small(tmp_path, "task.max_per_group=2"), model=small_organism, progress=False)
    n = m["n_pos"] + m["n_neg"]
    assert m["partial"] is True and m["partial_reason"].startswith(f"task.max_per_group=2: {n} of ")
    man = json.loads((tmp_path / "runs" / m["run"] / "manifest.json").read_text())
    assert man["partial"] is True and man["partial_reason"] == m["partial_reason"]
    rebuild_all(tmp_path)
    md = (tmp_path / "detect_leaderboard.md").read_text()
    head, _, apart = md.partition("### Partial runs")
    assert m["run"] not in head and "No complete detection runs on a whole task" in head
    assert m["run"] in apart and m["partial_reason"] in apart
    lb = pd.read_csv(tmp_path / "detect_leaderboard.csv")
    assert bool(lb.loc[0, "partial"]) and lb.loc[0, "partial_reason"] == m["partial_reason"]
    whole = pd.DataFrame([{**{k: v for k, v in m.items() if not isinstance(v, (dict, list))}, "partial": False,
                           "partial_reason": None, "run": "whole_run", "detector": "nm_whole"}])
    md = markdown_table(pd.concat([whole, lb], ignore_index=True))
    head, _, apart = md.partition("### Partial runs")
    assert "nm_whole" in head and m["run"] not in head and m["run"] in apart


# ---------------------------------------------------------------------- 3. overridden configurations
def test_an_overridden_detector_gets_an_id_showing_the_difference(tmp_path, small_organism):
    plain = run_detect(small(tmp_path), model=small_organism, progress=False)
    over = run_detect(small(tmp_path, "detector.guidance=5"), model=small_organism, progress=False)
    assert plain["detector"] == "nm_n1_k1" and over["detector"] == "nm_n1_k1[guidance=5]"
    assert "__nm_n1_k1[guidance=5]__" in over["run"] and over["run"] != plain["run"]
    from bench.run.registry import config_id

    det = cfg_for(tmp_path, "detector=nm_n1_k1")["detector"]
    assert config_id("detector", {**det, "guidance": float("nan"), "n_gen": 4}) == "nm_n1_k1[guidance=nan,n_gen=4]"
    assert config_id("detector", {**det, "guidance": 7.5}) == "nm_n1_k1"     # the registered value
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        mit = OmegaConf.to_container(compose("mitigate", ["mitigator=rta"]).mitigator, resolve=True)
    assert config_id("mitigator", {**mit, "strengths": [4]}) == "rta"         # strengths are swept, not an id
    assert config_id("mitigator", {**mit, "_target_": "my.Other"}) == "rta[_target_=my.Other]"


# ---------------------------------------------------------------------- 4. exclusive locks
HOLD = ("import sys; from bench.run.io import acquire_lock; acquire_lock(sys.argv[1], 'test'); "
        "print('held', flush=True); sys.stdin.read()")


def hold(lock_file: Path) -> subprocess.Popen:
    """A second process that holds ``lock_file`` until its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_process_on_the_same_run_or_output_stops_at_once_naming_the_holder(tmp_path, small_organism,
                                                                                     world_prompts, capsys,
                                                                                     monkeypatch):
    from bench.run.calibrate_cmd import cli

    m = run_detect(small(tmp_path), model=small_organism, progress=False)
    run = tmp_path / "runs" / m["run"]
    p = hold(run / ".lock")
    try:
        with pytest.raises(RuntimeError, match=rf"run folder {re.escape(str(run))} is in use .*pid {p.pid}"):
            run_detect(small(tmp_path, "rerun=true"), model=small_organism, progress=False)
        assert (run / "metrics.json").is_file()                   # the rerun did not reset the holder's run
    finally:
        p.communicate("")
    run_detect(small(tmp_path, "rerun=true"), model=small_organism, progress=False)   # released: runs
    def killed(self, model, prompts, *, seed):
        raise KeyboardInterrupt("simulated kill")

    with monkeypatch.context() as mp:                               # a run that fails releases its lock
        mp.setattr(NoiseMagnitude, "score", killed)
        with pytest.raises(KeyboardInterrupt):
            run_detect(small(tmp_path, "rerun=true"), model=small_organism, progress=False)
    hold(run / ".lock").communicate("")

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in world_prompts[0][:4]))
    out = tmp_path / "out.csv"
    c = cfg_for(tmp_path, f"prompts={f}", f"out={out}", name="screen")
    p = hold(tmp_path / "out.csv.lock")
    try:
        from bench.cli import _guarded
        with pytest.raises(SystemExit) as e:
            _guarded("detect", cli, "screen", c)                      # as `diffmem detect prompts=...` runs it
        assert e.value.code == 8 and not out.exists()                # bench.errors.EXIT_LOCKED
        assert f"pid {p.pid}" in capsys.readouterr().err
    finally:
        p.communicate("")


@pytest.fixture(scope="module")
def world_prompts(small_world):
    return [e.prompt for e in small_world.eval_prompts if e.label == 0], None


# ---------------------------------------------------------------------- 5. atomic writes
class FullDisk:
    """``open`` whose writes to files named like ``match`` write half their text, then fail with ENOSPC."""

    def __init__(self, match: str):
        self.real, self.match = io.open, match

    def __call__(self, file, mode="r", *args, **kwargs):
        f = self.real(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax") or self.match not in Path(str(file)).name:
            return f
        write = f.write

        def half(data):
            write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = half
        return f


def full_disk(monkeypatch, match: str) -> None:
    import builtins

    fake = FullDisk(match)
    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


def test_a_full_disk_leaves_manifests_leaderboards_and_reports_intact(tmp_path, small_organism, world_prompts,
                                                                      monkeypatch):
    from bench.run.screen import run_screen

    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in world_prompts[0][:4]))
    c = cfg_for(tmp_path, f"prompts={f}", f"out={tmp_path}/s/out.csv", name="screen")
    res = run_screen(c, model=small_organism, progress=False)
    before = res.manifest.read_bytes()
    with monkeypatch.context() as mp:
        full_disk(mp, "manifest.json")
        with pytest.raises(OSError, match="No space left"):
            run_screen(c, model=small_organism, progress=False)
    assert res.manifest.read_bytes() == before                      # the old manifest, not 0 bytes
    assert sorted(p.name for p in res.manifest.parent.iterdir() if ".tmp" in p.name) == []
    assert run_screen(c, model=small_organism, progress=False).n_scored == 4   # resume is not blocked

    from bench.core.atomic import atomic_to_csv, atomic_write_text

    from bench.run.io import RunFolder

    run = RunFolder(tmp_path / "runs", "detect", "t", "m", "d", {"a": 1})
    run.write_manifest(note="old")
    (tmp_path / "lb.csv").write_text("old,csv\n")
    (tmp_path / "report.html").write_text("<p>old</p>")
    with monkeypatch.context() as mp:
        full_disk(mp, "")
        for write in (lambda: run.write_manifest(note="new"), lambda: run.write_metrics({"auc": 1.0}),
                      lambda: atomic_to_csv(pd.DataFrame({"a": [1]}), tmp_path / "lb.csv"),
                      lambda: atomic_write_text(tmp_path / "report.html", "<p>new</p>" * 100)):
            with pytest.raises(OSError):
                write()
    assert run.manifest()["note"] == "old" and not (run.path / "metrics.json").exists()
    assert (tmp_path / "lb.csv").read_text() == "old,csv\n" and (tmp_path / "report.html").read_text() == "<p>old</p>"
    left = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")
            and (".tmp" in p.name or p.stat().st_size == 0)]
    assert left == []


# ---------------------------------------------------------------------- 6. corrupted rows
def corrupt(kind: str, lines: list[bytes]) -> tuple[list[bytes], int, int]:
    """``lines`` (header first) with data row 2 (file line 3) corrupted; returns them, the number of bad
    rows and the number of prompts that must be scored again."""
    row = lines[2]
    fields = next(csv.reader([row.decode()]))

    def line(fs):
        buf = io.StringIO()
        csv.writer(buf).writerow(fs)
        return buf.getvalue().encode()
    if kind == "garbage":
        return lines[:3] + [b"#### not a row ####\r\n"] + lines[3:], 1, 0
    if kind == "duplicate":                         # the same id again with another score: neither is trusted
        return lines[:3] + [line(fields[:6] + ["0.5"] + fields[7:])] + lines[3:], 2, 1
    if kind == "non_numeric_score":
        return lines[:2] + [line(fields[:6] + ["0.1x"] + fields[7:])] + lines[3:], 1, 1
    if kind == "non_utf8":
        i = row.index(b",") + 1
        return lines[:2] + [row[:i] + b"\xff" + row[i:]] + lines[3:], 1, 1
    if kind == "cut_off":                           # a row cut after the first digits of its score
        return lines[:2] + [line(fields[:6] + [fields[6][:4]])] + lines[3:], 1, 1
    raise ValueError(kind)


@pytest.mark.parametrize("how", ["repair=true", "diffmem repair"])
@pytest.mark.parametrize("kind", ["garbage", "duplicate", "non_numeric_score", "non_utf8", "cut_off"])
def test_a_corrupted_row_is_named_and_only_it_is_rescored(kind, how, tmp_path, small_organism, monkeypatch, capsys):
    from bench.cli import main

    ref = run_detect(small(tmp_path), model=small_organism, progress=False)
    run = tmp_path / "runs" / ref["run"]
    good = pd.read_csv(run / "per_prompt.csv", dtype={"id": str})
    lines, n_bad, rescore = corrupt(kind, (run / "per_prompt.csv").read_bytes().splitlines(keepends=True))
    (run / "per_prompt.csv").write_bytes(b"".join(lines))
    where = re.escape(str(run / "per_prompt.csv"))
    with pytest.raises(ValueError, match=rf"{where}: {n_bad} bad row\(s\): line (3|4): .*repair=true"):
        run_detect(small(tmp_path), model=small_organism, progress=False)
    calls = no_scoring(monkeypatch)
    if how == "repair=true":
        m = run_detect(small(tmp_path, "repair=true"), model=small_organism, progress=False)
    else:
        main(["repair", str(run)])
        assert f"{n_bad} bad row(s) moved" in capsys.readouterr().out
        m = run_detect(small(tmp_path), model=small_organism, progress=False)
    assert calls["prompts"] == rescore
    rej = pd.read_csv(run / "per_prompt.rejected.csv")
    assert len(rej) == n_bad and list(rej.columns) == ["line", "reason", "raw"]
    df = pd.read_csv(run / "per_prompt.csv", dtype={"id": str}).set_index("id").loc[good["id"]]
    np.testing.assert_allclose(df["score"], good["score"], rtol=1e-5)   # batch composition: float rounding
    assert m["auc"] == ref["auc"] and m["n_pos"] + m["n_neg"] == len(good)


def test_cli_exits_with_one_message_for_bad_rows_and_for_a_locked_run(tmp_path, small_organism, capsys):
    from bench.cli import main
    from bench.errors import EXIT_BAD_ROWS, EXIT_LOCKED

    args = ["detect", "model=organism_small", "task.labels=planted", "task.max_per_group=1", "detector=nm_n1_k1",
            f"runs_dir={tmp_path}/runs", "leaderboard=null", "hardware.threads=1"]
    m = run_detect(small(tmp_path), model=small_organism, progress=False)
    f = tmp_path / "runs" / m["run"] / "per_prompt.csv"
    f.write_bytes(f.read_bytes() + b"garbage\r\n")
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == EXIT_BAD_ROWS == 9 and f"{f}: 1 bad row(s): line " in err and "Traceback" not in err
    p = hold(f.parent / ".lock")
    try:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == EXIT_LOCKED == 8 and f"pid {p.pid}" in capsys.readouterr().err
    finally:
        p.communicate("")
