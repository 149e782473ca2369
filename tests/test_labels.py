"""Measured detection labels on the organism (tasks/studies/groundtruth.py + bench/run/runner.py).

The headline label is measured: a prompt is memorized when its generations reproduce its training
image; planted prompts that do not reproduce form ``planted_not_learned`` (neither class of the
headline); the planted convention is kept beside it. No ground truth for the weights: refused."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from bench.core.model import weights_sha256
from bench.run.runner import PLANTED_NOT_LEARNED, build_task, detect_metrics, detect_row
from bench.errors import GroundTruthError
from tasks.studies.groundtruth import manifest

MCFG = {"_target_": "tasks.organism_task.load_organism_model", "kind": "organism", "size": "small"}
TASK = {"_target_": "tasks.organism_task.OrganismTask", "name": "organism", "source": "organism",
        "labels": "measured"}


def _with_groundtruth(model, world, folder, reproduces: dict[str, bool], weights: str | None = None):
    """The model, pointed at ``folder`` holding a groundtruth.json that says ``reproduces``."""
    df = pd.DataFrame({"id": [e.id for e in world.eval_prompts],
                       "reproduces": [reproduces.get(e.id, False) for e in world.eval_prompts],
                       "copy_rate": [1.0 if reproduces.get(e.id) else 0.0 for e in world.eval_prompts]})
    m = manifest(df, {}, world, weights or weights_sha256(model), 0.0, pd.DataFrame())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "groundtruth.json").write_text(json.dumps(m))
    return dataclasses.replace(model, path=str(folder))


def _split(world):
    planted = [e for e in world.eval_prompts if e.label == 1]
    learned = {e.id: True for e in planted[::2]}                    # every other planted prompt reproduces
    control = next(e for e in world.eval_prompts if e.label == 0 and e.targets)
    learned[control.id] = True                                      # and one non-planted control copies
    return planted, learned, control


def test_measured_labels_are_the_headline(small_organism, small_world, tmp_path):
    planted, learned, control = _split(small_world)
    model = _with_groundtruth(small_organism, small_world, tmp_path / "m", learned)
    ps = build_task(TASK, MCFG, model)
    lab = dict(zip(ps.ids, ps.labels.tolist()))
    grp = dict(zip(ps.ids, ps.groups))
    for e in planted:
        assert lab[e.id] == int(e.id in learned)
        assert (grp[e.id] == PLANTED_NOT_LEARNED) == (e.id not in learned)
    assert lab[control.id] == 1 and grp[control.id] == control.group      # measured, not planted
    assert ps.extra["label_planted"] == [e.label for e in small_world.eval_prompts]
    assert set(ps.extra["label_source"]) == {"measured"}
    planted_ps = build_task({**TASK, "labels": "planted"}, MCFG, model)
    assert planted_ps.sha256 != ps.sha256 and planted_ps.labels.tolist() == ps.extra["label_planted"]

    # headline metrics leave planted_not_learned out of both classes; planted ones sit beside them
    rng = np.random.default_rng(0)
    rows = [detect_row(ps, i, rng.normal() + 3 * ps.labels[i], 0.1, 2.0) for i in range(len(ps))]
    m = detect_metrics(pd.DataFrame(rows).assign(score=lambda d: d["score"].astype(float)), ps)
    n_pnl = sum(g == PLANTED_NOT_LEARNED for g in ps.groups)
    assert n_pnl == len(planted) - len(planted[::2])
    assert m["n_planted_not_learned"] == n_pnl
    assert m["n_pos"] == int(ps.labels.sum()) and m["n_pos"] + m["n_neg"] == len(ps) - n_pnl
    assert m["planted_n_pos"] == len(planted) and m["planted_n_pos"] + m["planted_n_neg"] == len(ps)
    assert PLANTED_NOT_LEARNED not in m["per_group_auc"]
    assert 0 <= m["auc_planted_not_learned"] <= 1 and m["auc"] > m["planted_auc"]


def test_detect_refuses_without_groundtruth_for_these_weights(small_organism, small_world, tmp_path):
    bare = dataclasses.replace(small_organism, path=str(tmp_path / "empty"))
    with pytest.raises(GroundTruthError, match="make groundtruth"):
        build_task(TASK, MCFG, bare)
    other = _with_groundtruth(small_organism, small_world, tmp_path / "other", {}, weights="0" * 64)
    with pytest.raises(GroundTruthError, match="other weights"):
        build_task(TASK, MCFG, other)
    # explicit planted labels need no ground truth, and say so
    ps = build_task({**TASK, "labels": "planted"}, MCFG, bare)
    assert set(ps.extra["label_source"]) == {"planted"}
    with pytest.raises(ValueError, match="task.labels"):
        build_task({**TASK, "labels": "guess"}, MCFG, bare)


def test_detect_cli_names_make_groundtruth(small_organism, tmp_path, capsys, monkeypatch):
    """Through the CLI: one clear message, not a traceback (the organism_small folder has no ground truth)."""
    from bench.cli import main

    from bench.cli import EXIT_NO_GROUNDTRUTH

    with pytest.raises(SystemExit) as exc:
        main(["detect", "model=organism_small", "task.max_per_group=1", "detector=nm_n1_k1",
              f"runs_dir={tmp_path}/runs", "leaderboard=null", "hardware.threads=1"])
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_NO_GROUNDTRUTH and "make groundtruth" in err and "Traceback" not in err
