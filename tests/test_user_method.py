"""Issue 16 item 12: a detector and a mitigator added from OUTSIDE the repository (README: "Adding your own detector or mitigator"):
a user folder holding conf/detector/*.yaml, conf/mitigator/*.yaml and the module their _target_ names,
reached through DIFFMEM_INCLUDE or through Hydra's search path + PYTHONPATH."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "data" / "user_methods"
RUN = ["model=organism_small", "hardware.threads=1", "task.labels=planted", "task.max_per_group=1"]


@pytest.fixture()
def user_folder(tmp_path, monkeypatch) -> Path:
    """A copy of the example outside the repository; sys.path and sys.modules restored afterwards."""
    folder = tmp_path / "my_diffmem_methods"
    shutil.copytree(EXAMPLE, folder)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_methods", raising=False)
    return folder


def _detect(capsys, tmp_path, *args) -> tuple[dict, str]:
    from bench.cli import main

    main(["detect", *args, *RUN, f"runs_dir={tmp_path}/runs", f"leaderboard={tmp_path}/lb.csv"])
    out = capsys.readouterr().out
    run = Path(out.strip().splitlines()[-1].rsplit(" -> ", 1)[1].split(" (leaderboard")[0])
    return json.loads((run / "metrics.json").read_text()), out


def test_user_detector_through_diffmem_include(user_folder, tmp_path, monkeypatch, capsys, small_organism):
    monkeypatch.setenv("DIFFMEM_INCLUDE", str(user_folder))
    m, out = _detect(capsys, tmp_path, "detector=cond_gap")
    assert m["detector"] == "cond_gap" and json.loads(m["params"])["name"] == "cond_gap"
    assert m["n_pos"] > 0 and m["n_neg"] > 0 and 0.0 <= m["auc"] <= 1.0
    assert "diffmem detect: cond_gap on organism / organism-test: AUC" in out
    assert sys.modules["my_methods"].__file__.startswith(str(user_folder))


def test_user_detector_through_hydra_searchpath(user_folder, tmp_path, monkeypatch, capsys, small_organism):
    monkeypatch.delenv("DIFFMEM_INCLUDE", raising=False)
    monkeypatch.syspath_prepend(str(user_folder))                 # what PYTHONPATH=<folder> does
    m, _ = _detect(capsys, tmp_path, f"hydra.searchpath=[file://{user_folder}/conf]", "detector=cond_gap")
    assert m["detector"] == "cond_gap"


def test_user_mitigator_composes_and_generates(user_folder, monkeypatch, small_organism):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench.contracts import GenSpec
    from bench.cli import CONF, include_overrides
    from bench.run.registry import instantiate
    from bench.run.validate import check_config

    monkeypatch.setenv("DIFFMEM_INCLUDE", str(user_folder))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("mitigate", [*include_overrides([]), "mitigator=append_words",
                                                          "model=organism_small"]), resolve=True)
    check_config("mitigate", cfg)
    assert cfg["mitigator"]["strengths"] == [2, 4]
    mit = instantiate({k: v for k, v in cfg["mitigator"].items() if k != "strengths"} | {"strength": 2})
    res = mit.generate(small_organism, ["a red circle"], [0, 1], GenSpec(steps=2, guidance=7.5, batch_size=4))
    assert res.images.shape[0] == 2 and mit.params()["strength_unit"] == "words appended"


def test_include_that_is_not_a_folder_is_a_config_error(tmp_path, monkeypatch, capsys):
    from bench.cli import main
    from bench.errors import EXIT_CONFIG

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("DIFFMEM_INCLUDE", str(tmp_path / "nope"))
    with pytest.raises(SystemExit) as e:
        main(["detect", "detector=cond_gap"])
    assert e.value.code == EXIT_CONFIG and "DIFFMEM_INCLUDE" in capsys.readouterr().err


def test_a_target_that_cannot_be_imported_is_a_config_error(tmp_path, monkeypatch, capsys):
    import bench.run.runner
    from bench.cli import main

    (tmp_path / "u" / "conf" / "detector").mkdir(parents=True)
    (tmp_path / "u" / "conf" / "detector" / "nope.yaml").write_text("_target_: no_such_module.Nope\nid: nope\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("DIFFMEM_INCLUDE", str(tmp_path / "u"))
    monkeypatch.setattr(bench.run.runner, "build_model", lambda *a, **k: pytest.fail("model loaded first"))
    with pytest.raises(SystemExit) as e:
        main(["detect", "detector=nope", f"runs_dir={tmp_path}/runs"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Error locating target 'no_such_module.Nope'" in err and "Traceback" not in err
