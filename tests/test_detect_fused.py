"""The fused detection pass: one sampling pass, every configuration's score as its plain run gives it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from baselines.detectors.generation_density import GenerationDensity
from baselines.detectors.noise_magnitude import NoiseMagnitude
from bench.run.detect_fused import fused_scores, run_detect_fused
from bench.core.patching import state_digest
from bench.run.runner import run_detect

CONF = str(Path(__file__).resolve().parents[1] / "conf")
NM = "baselines.detectors.noise_magnitude.NoiseMagnitude"
GD = "baselines.detectors.generation_density.GenerationDensity"
# a 3-step schedule keeps the test fast; the grid mirrors Table 1's (n, k) x density n structure
DETS = {"nm_a": {"_target_": NM, "id": "nm_a", "n_gen": 1, "steps": 1, "total_steps": 3},
        "nm_b": {"_target_": NM, "id": "nm_b", "n_gen": 3, "steps": 3, "total_steps": 3},
        "nm_c": {"_target_": NM, "id": "nm_c", "n_gen": 2, "steps": 2, "total_steps": 3},
        "px2": {"_target_": GD, "id": "px2", "n_gen": 2, "space": "pixel", "steps": 3},
        "px3": {"_target_": GD, "id": "px3", "n_gen": 3, "space": "pixel", "steps": 3, "reduction": "closest"},
        "sscd3": {"_target_": GD, "id": "sscd3", "n_gen": 3, "space": "sscd", "steps": 3}}


def cfgs(tmp_path, names) -> list[dict]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        base = OmegaConf.to_container(compose("detect", overrides=[
            f"runs_dir={tmp_path}/runs", "leaderboard=null", "hardware.threads=1", "model=organism_small", "task.labels=planted",
            "task.max_per_group=1", "batch_prompts=5"]), resolve=True)
    return [{**base, "detector": dict(DETS[n])} for n in names]


def test_fused_scores_equal_each_detector_alone(small_organism, small_world):
    prompts = [e.prompt for e in small_world.eval_prompts[:4]]
    dets = [NoiseMagnitude(1, 1, 3), NoiseMagnitude(3, 3, 3), NoiseMagnitude(2, 2, 3),
            GenerationDensity(2, "pixel", steps=3), GenerationDensity(3, "pixel", "closest", steps=3),
            GenerationDensity(3, "sscd", steps=3)]
    before = state_digest(small_organism.unet)
    r0 = small_organism.counter.rows
    got = fused_scores(small_organism, prompts, dets, seed=5)
    assert got["rows"] == small_organism.counter.rows - r0 == 4 * 3 * 2 * 3     # one pass: N=3 seeds, 3 steps
    for i, d in enumerate(dets):
        np.testing.assert_allclose(got["scores"][i], d.score(small_organism, prompts, seed=5), rtol=1e-5,
                                   atol=1e-6, err_msg=str(d))
    assert state_digest(small_organism.unet) == before


def test_fused_pass_stops_early_without_density(small_organism, small_world):
    prompts = [e.prompt for e in small_world.eval_prompts[:2]]
    r0 = small_organism.counter.rows
    fused_scores(small_organism, prompts, [NoiseMagnitude(2, 1, 3), NoiseMagnitude(1, 2, 3)], seed=0)
    assert small_organism.counter.rows - r0 == 2 * 2 * 2 * 2                      # K = 2 steps, N = 2
    with pytest.raises(ValueError, match="share the DDIM schedule"):
        fused_scores(small_organism, prompts, [NoiseMagnitude(1, 1, 3), NoiseMagnitude(1, 1, 4)], seed=0)


def test_fused_runs_match_plain_runs_and_resume(tmp_path, small_organism):
    names = ["nm_a", "nm_c", "px2"]
    out = run_detect_fused(cfgs(tmp_path, names), model=small_organism, progress=False)
    plain = run_detect({**cfgs(tmp_path / "plain", ["nm_c"])[0]}, model=small_organism, progress=False)
    assert out[1]["run"] == plain["run"]                          # same config -> same folder name
    f = pd.read_csv(tmp_path / "runs" / out[1]["run"] / "per_prompt.csv")
    p = pd.read_csv(tmp_path / "plain" / "runs" / plain["run"] / "per_prompt.csv")
    np.testing.assert_allclose(f["score"], p["score"], rtol=1e-5)
    assert (f["unet_evals"] == p["unet_evals"]).all() and out[1]["auc"] == pytest.approx(plain["auc"])
    man = json.loads((tmp_path / "runs" / out[0]["run"] / "manifest.json").read_text())
    assert man["fused_with"] == names and man["timing"].startswith("apportioned")
    assert out[0]["timing"] == "apportioned (fused pass)"
    # one run loses its tail (interrupted): the fused rerun appends only what is missing, nowhere else
    victim = tmp_path / "runs" / out[2]["run"] / "per_prompt.csv"
    full = victim.read_text().splitlines(keepends=True)
    victim.write_text("".join(full[:3]))
    (victim.parent / "metrics.json").unlink()
    again = run_detect_fused(cfgs(tmp_path, names), model=small_organism, progress=False)
    for m0, m1 in zip(out, again):
        rows = pd.read_csv(tmp_path / "runs" / m1["run"] / "per_prompt.csv")
        assert not rows["id"].duplicated().any() and len(rows) == m0["n_pos"] + m0["n_neg"]
        assert m1["auc"] == pytest.approx(m0["auc"])
    with pytest.raises(ValueError, match="differ only in the detector"):
        run_detect_fused([cfgs(tmp_path, ["nm_a"])[0], {**cfgs(tmp_path, ["nm_c"])[0], "seed": 3}],
                         model=small_organism, progress=False)
