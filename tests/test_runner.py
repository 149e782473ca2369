"""Runner, run folders, resume, leaderboard rebuild and Hydra composition."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.run.runner import run_detect

CONF = str(Path(__file__).resolve().parents[1] / "conf")
GROUPS = ["model", "task", "detector", "hardware"]


def cfg_for(tmp_path, *overrides) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose("detect", overrides=[f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv",
                                         "hardware.threads=1", *overrides])
    return OmegaConf.to_container(c, resolve=True)


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group, tmp_path):
    for f in sorted((Path(CONF) / group).glob("*.yaml")):
        extra = [f"++model.path={tmp_path}"] if group == "model" else []
        c = cfg_for(tmp_path, f"{group}={f.stem}", *extra)
        assert c[group] is not None


def test_sd_model_without_path_is_a_clear_error(tmp_path):
    from bench.run.runner import build_model

    c = cfg_for(tmp_path, "model=sd14", f"model.path={tmp_path}/nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(c["model"])
    with pytest.raises(ValueError, match="model.path"):
        build_model({"_target_": "bench.core.model.load_folder", "kind": "folder", "name": "sd14", "path": "???"})


def test_run_detect_writes_run_folder_and_leaderboard(tmp_path, small_organism):
    c = cfg_for(tmp_path, "model=organism_small", "task.labels=planted", "task.max_per_group=2", "detector=nm_n1_k1")
    m = run_detect(c, model=small_organism, progress=False)
    run = Path(tmp_path, "runs", m["run"])
    man = json.loads((run / "manifest.json").read_text())
    for k in ("git_sha", "versions", "device", "seeds", "prompt_set", "schema_version", "started", "finished"):
        assert k in man, k
    assert man["prompt_set"]["sha256"] == m["prompt_set_sha256"]
    df = pd.read_csv(run / "per_prompt.csv")
    assert len(df) == m["n_pos"] + m["n_neg"] and not df["id"].duplicated().any()
    assert set(m["per_family_auc"]) <= {"MV", "RV", "TV", "FG", "BG"} and m["per_group_auc"]
    lb = pd.read_csv(tmp_path / "lb.csv")
    assert len(lb) == 1 and lb.loc[0, "run"] == m["run"] and lb.loc[0, "unet_evals_per_prompt"] == 2.0


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, small_organism, monkeypatch):
    from baselines.detectors.noise_magnitude import NoiseMagnitude

    c = cfg_for(tmp_path, "model=organism_small", "task.labels=planted", "task.max_per_group=2", "detector=nm_n1_k1", "batch_prompts=5")
    ref = run_detect({**c, "runs_dir": f"{tmp_path}/ref", "leaderboard": None}, model=small_organism, progress=False)
    calls = {"n": 0}
    orig = NoiseMagnitude.score

    def flaky(self, model, prompts, *, seed):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return orig(self, model, prompts, seed=seed)

    monkeypatch.setattr(NoiseMagnitude, "score", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_detect(c, model=small_organism, progress=False)
    run = next(Path(tmp_path, "runs").iterdir())
    assert len(pd.read_csv(run / "per_prompt.csv")) == 10 and not (run / "metrics.json").exists()
    monkeypatch.setattr(NoiseMagnitude, "score", orig)
    m = run_detect(c, model=small_organism, progress=False)
    df = pd.read_csv(run / "per_prompt.csv")
    dref = pd.read_csv(Path(tmp_path, "ref", ref["run"], "per_prompt.csv"))
    assert sorted(df["id"]) == sorted(dref["id"]) and not df["id"].duplicated().any()
    merged = df.merge(dref, on="id")
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], rtol=1e-6)
    assert m["auc"] == ref["auc"]


def test_webster500_on_tiny_sd_end_to_end(tmp_path, tiny_sd_path):
    """task=webster500 with model=sd14 model.path=... composes and runs (scores meaningless)."""
    from bench.cli import main

    main(["detect", "task=webster500", "model=sd14", f"model.path={tiny_sd_path}", "task.max_per_group=3",
          "detector=nm_n1_k1", f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv",
          "hardware.threads=1"])
    lb = pd.read_csv(tmp_path / "lb.csv")
    assert lb.loc[0, "task"] == "webster500" and lb.loc[0, "n_pos"] == 3
    assert lb.loc[0, "n_neg"] == 12  # 3 each of laion, coco, lexica, random_tokens
    assert 0.0 <= lb.loc[0, "auc"] <= 1.0


def test_run_key_does_not_depend_on_the_loader_path(tmp_path, small_organism):
    """Run folders are keyed by what determines the numbers: a model or task config's ``_target_`` (its
    loader's import path) is left out, so naming loaders in conf/ kept the keys of committed runs."""
    from bench.core.model import weights_sha256
    from bench.run.io import RunFolder, config_hash
    from bench.run.runner import build_task, detect_run_config

    c = cfg_for(tmp_path, "model=organism_small", "task.labels=planted", "task.max_per_group=1", "detector=nm_n1_k1")
    assert c["model"]["_target_"] and c["task"]["_target_"]
    bare = {**c, "model": {k: v for k, v in c["model"].items() if k != "_target_"},
            "task": {k: v for k, v in c["task"].items() if k != "_target_"}}
    w = weights_sha256(small_organism)
    ps = build_task(c["task"], c["model"], small_organism, w)
    keyed, plain = (detect_run_config(x, ps.sha256, small_organism, w) for x in (c, bare))
    assert keyed == plain and config_hash(keyed) == config_hash(plain)
    assert "_target_" not in keyed["model"] and "_target_" not in keyed["task"]
    names = {RunFolder(tmp_path / "runs", "detect", "organism", small_organism.name, "nm_n1_k1", x).name
             for x in (keyed, plain)}
    assert len(names) == 1
