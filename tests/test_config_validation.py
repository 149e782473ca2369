"""Issue 16 item 7: config values are validated before any model load, with one message naming the key,
its value and the allowed range (NaN guidance used to run and be recorded in the manifest)."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

EXIT_CONFIG = 2             # bench/errors.py


def check_config(command, cfg):
    from bench.run.validate import check_config
    check_config(command, cfg)


def problems_of(command, cfg):
    from bench.run.validate import problems_of
    return problems_of(command, cfg)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(name: str, tmp_path, *overrides) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        c = compose(name, overrides=[*overrides])
    out = OmegaConf.to_container(c, resolve=True)
    out.update(runs_dir=str(tmp_path / "runs"), leaderboard=str(tmp_path / "lb.csv"))
    return out


@pytest.mark.parametrize("name", ["detect", "mitigate", "explain"])
def test_shipped_defaults_are_valid(name, tmp_path):
    assert problems_of(name, composed(name, tmp_path)) == []


@pytest.mark.parametrize("overrides", [["hardware=gpu"], ["hardware=multi_gpu", "shard=0/2"], ["model=organism_small"],
                                       ["model=oracle"], ["task=webster500", "model=sd14", "model.path=/x"]])
def test_shipped_hardware_models_and_tasks_are_valid(overrides, tmp_path):
    assert problems_of("detect", composed("detect", tmp_path, *overrides)) == []


@pytest.mark.parametrize("det", sorted(p.stem for p in (Path(CONF) / "detector").glob("*.yaml")))
def test_every_shipped_detector_is_valid(det, tmp_path):
    assert problems_of("detect", composed("detect", tmp_path, f"detector={det}")) == []


@pytest.mark.parametrize("mit", sorted(p.stem for p in (Path(CONF) / "mitigator").glob("*.yaml")))
def test_every_shipped_mitigator_is_valid(mit, tmp_path):
    assert problems_of("mitigate", composed("mitigate", tmp_path, f"mitigator={mit}")) == []


def test_shipped_screen_defaults_are_valid(tmp_path):
    assert problems_of("screen", composed("screen", tmp_path, "prompts=x.jsonl")) == []


@pytest.mark.parametrize("name, override, needle", [
    ("detect", "detector.guidance=nan", "detector.guidance=nan must be a finite number >= 0"),
    ("detect", "detector.guidance=inf", "detector.guidance=inf must be a finite number"),
    ("detect", "detector.guidance=-1", "detector.guidance=-1 must be a finite number >= 0"),
    ("detect", "detector.n_gen=0", "detector.n_gen=0 must be an integer >= 1"),
    ("detect", "detector.steps=-3", "detector.steps=-3 must be an integer >= 1"),
    ("detect", "detector.steps=60", "detector.steps=60 must be <= detector.total_steps=50"),
    ("detect", "detector.n_gen=1.5", "detector.n_gen=1.5 must be an integer >= 1"),
    ("detect", "task.max_per_group=0", "task.max_per_group=0 must be an integer >= 1 or null"),
    ("detect", "batch_prompts=0", "batch_prompts=0 must be an integer >= 1"),
    ("detect", "shard=3/2", "shard='3/2'"),
    ("detect", "model=sd14", "model.path='???'"),
    ("mitigate", "guidance=nan", "guidance=nan must be a finite number >= 0"),
    ("mitigate", "n_seeds=0", "n_seeds=0 must be an integer >= 1"),
    ("mitigate", "steps=-1", "steps=-1 must be an integer >= 1"),
    ("mitigate", "mitigator.strengths=[nan]", "mitigator.strengths=[nan] must be a non-empty list of finite"),
    ("explain", "explainer.guidance=nan", "explainer.guidance=nan"),
    ("explain", "explainer.target_steps=80", "explainer.target_steps=80 must be <= explainer.steps=50"),
])
def test_bad_values_are_named_with_their_range(name, override, needle, tmp_path):
    with pytest.raises(ValueError) as e:
        check_config(name, composed(name, tmp_path, override))
    assert needle in str(e.value), str(e.value)


def test_screen_alpha_range(tmp_path):
    with pytest.raises(ValueError, match=r"alpha=2\.0 must be a number in \(0, 1\)"):
        check_config("screen", composed("screen", tmp_path, "prompts=x.jsonl", "alpha=2.0"))


def test_every_bad_value_in_one_message(tmp_path):
    c = composed("detect", tmp_path, "detector.guidance=nan", "detector.n_gen=0")
    with pytest.raises(ValueError) as e:
        check_config("detect", c)
    assert "detector.guidance=nan" in str(e.value) and "detector.n_gen=0" in str(e.value)


def _no_model(*a, **k):
    raise AssertionError("a model was loaded before the config was validated")


def test_config_error_is_a_value_error():
    from bench.errors import ConfigError
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("runner", ["detect", "mitigate"])
def test_runners_refuse_before_loading_a_model(runner, tmp_path, monkeypatch):
    import bench.run.mitigate
    import bench.run.runner

    monkeypatch.setattr(bench.run.runner, "build_model", _no_model)
    monkeypatch.setattr(bench.run.mitigate, "build_model", _no_model)
    if runner == "detect":
        with pytest.raises(ValueError, match="detector.guidance=nan"):
            bench.run.runner.run_detect(composed("detect", tmp_path, "detector.guidance=nan"))
    else:
        with pytest.raises(ValueError, match="guidance=nan"):
            bench.run.mitigate.run_mitigate(composed("mitigate", tmp_path, "guidance=nan"))
    assert not (tmp_path / "runs").exists()                    # nothing written


def test_cli_nan_guidance_exits_with_a_config_error(tmp_path, monkeypatch, capsys):
    import bench.run.runner
    from bench.cli import main

    monkeypatch.setattr(bench.run.runner, "build_model", _no_model)
    with pytest.raises(SystemExit) as e:
        main(["detect", "detector.guidance=nan", f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_CONFIG, err
    assert "detector.guidance=nan must be a finite number >= 0" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
