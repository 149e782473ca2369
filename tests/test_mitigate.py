"""The mitigation benchmark end to end on the test-size organism: run folders, per-image rows,
resume without loss or duplication, shards that merge into the plain run, the leaderboard with
clip_delta / FB-Mem mitigation score, and the plots."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from bench.run.mitigate import run_mitigate, select_prompts
from bench.report.mitigate_board import rebuild_mitigate


@pytest.fixture(scope="module")
def judge(small_organism, small_world, tmp_path_factory):
    import open_clip

    from bench.measure.copyscore import CopyJudge
    from bench.measure.embed import ClipScorer
    from bench.measure.segment import BorderPaletteSegmenter
    from tasks.copies import GroundTruthCriterion
    from tasks.organism_clip import ARCH, MEAN, STD, make_clip, tokenize

    torch.manual_seed(0)
    clip = ClipScorer.from_model(make_clip(ARCH), tokenize, ARCH["vision_cfg"]["image_size"], MEAN, STD)
    assert open_clip is not None
    return CopyJudge(small_world, clip, GroundTruthCriterion(), BorderPaletteSegmenter(), threads=1,
                     cache_dir=str(tmp_path_factory.mktemp("index")),
                     fbmem_threshold_dir=str(tmp_path_factory.mktemp("fbthr")))


def cfg(tmp_path, mitigator: dict, **kw) -> dict:
    base = {"model": {"kind": "organism", "name": "organism-test", "size": "small", "device": "cpu",
                      "dtype": "float32"},
            "task": {"_target_": "tasks.organism_task.OrganismTask", "name": "organism", "source": "organism"},
            "mitigator": mitigator, "seed": 0, "n_seeds": 2,
            "steps": 3, "guidance": 7.5, "memorized_per_family": 1, "utility_prompts": 2, "batch_prompts": 3,
            "batch_images": 8, "threads": 1, "runs_dir": str(tmp_path / "runs"), "rerun": False}
    return {**base, **kw}


NONE = {"_target_": "baselines.mitigators.base.NoMitigation", "id": "none", "strengths": [0]}
RTA = {"_target_": "baselines.mitigators.prompt_augment.RandomTokenAddition", "id": "rta", "strengths": [2, 6]}


def test_select_prompts(small_world):
    ps = select_prompts(small_world, 1, 3)
    assert [p.group for p in ps[:5]] == ["MV", "RV", "TV", "FG", "BG"]
    assert [p.group for p in ps[5:]] == ["ordinary_seen", "ordinary_unseen", "ordinary_seen"]


def test_run_leaderboard_and_resume(tmp_path, small_organism, judge):
    m_none = run_mitigate(cfg(tmp_path, NONE), model=small_organism, judge=judge, progress=False)
    m_rta = run_mitigate(cfg(tmp_path, RTA), model=small_organism, judge=judge, progress=False)
    assert [m["strength"] for m in m_rta] == [2.0, 6.0]
    run = tmp_path / "runs" / m_none[0]["run"]
    rows = pd.read_csv(run / "per_prompt.csv")
    assert len(rows) == 7 * 2 and not rows["id"].duplicated().any()
    mem = rows[rows.label == 1]
    assert mem["sscd_to_train"].between(-1, 1).all() and mem["copy"].isin([0, 1]).all()
    assert set(mem["fbmem_category"]) <= {"VM", "FM", "BM", "NM"}
    assert rows["unet_evals"].eq(2 * 3).all()                  # cond + uncond rows x 3 steps per image
    man = json.loads((run / "manifest.json").read_text())
    assert man["judge"]["copy_thresholds"] and man["protocol"]["n_seeds"] == 2 and man["finished"]
    # resume: drop the last batch and run again -> same rows, none duplicated
    full = (run / "per_prompt.csv").read_text().splitlines(keepends=True)
    (run / "per_prompt.csv").write_text("".join(full[:1 + 3 * 2]))
    (run / "metrics.json").unlink()
    again = run_mitigate(cfg(tmp_path, NONE), model=small_organism, judge=judge, progress=False)
    r2 = pd.read_csv(run / "per_prompt.csv")
    assert list(r2["id"]) == list(rows["id"])
    assert np.allclose(r2["sscd_to_train"].fillna(9), rows["sscd_to_train"].fillna(9), atol=1e-5)
    assert again[0]["copy_rate"] == pytest.approx(m_none[0]["copy_rate"])
    written = rebuild_mitigate(tmp_path)
    lb = pd.read_csv(tmp_path / "mitigate_leaderboard.csv")
    assert list(lb["mitigator"]) == ["none", "rta", "rta"]
    assert lb.loc[lb.mitigator == "none", "clip_delta"].iloc[0] == 0
    assert lb["fbmem_mitigation_score"].notna().all()
    assert any(str(p).endswith(".png") and "tradeoff" in str(p) for p in written)
    # the FB-Mem study: per family, shares from the per-image categories, score against none
    st = pd.read_csv(tmp_path / "fbmem_study.csv")
    assert any(str(p).endswith("fbmem_study.md") for p in written)
    assert (tmp_path / "plots" / "fbmem_study_organism_organism-test.png").is_file()
    assert set(st["family"]) == {"MV", "FG", "BG"} and len(st) == 3 * 3          # none + rta@2 + rta@6
    none = st[st.mitigator == "none"]
    assert (none["mitigation_score"] == 0).all()                                 # none against itself
    assert np.allclose(st[["vm", "fm", "bm", "nm"]].sum(1), 1)
    assert np.allclose(st["fg_memorized"], st["vm"] + st["fm"])
    for _, r in st.iterrows():                                                    # shares = the per-image rows
        rows_r = pd.read_csv(tmp_path / "runs" / r["run"] / "per_prompt.csv")
        g = rows_r[(rows_r.label == 1) & (rows_r.group == r["family"])]
        assert r["n_images"] == len(g) and r["vm"] == pytest.approx((g.fbmem_category == "VM").mean())
        assert r["copy_rate"] == pytest.approx(g["copy"].mean())


def test_shards_merge_into_the_plain_run(tmp_path, small_organism, judge):
    plain = run_mitigate(cfg(tmp_path / "a", NONE), model=small_organism, judge=judge, progress=False)[0]
    for i in range(3):
        out = run_mitigate(cfg(tmp_path / "b", NONE, shard=f"{i}/3"), model=small_organism, judge=judge,
                           progress=False)
    assert out[0]["kind"] == "mitigate_shard"
    merged = json.loads((tmp_path / "b" / "runs" / plain["run"] / "metrics.json").read_text())
    for k in ("copy_rate", "sscd_to_train_mean", "clip_score", "fbmem_vm", "n_images_memorized"):
        assert merged[k] == pytest.approx(plain[k], rel=1e-6), k
    a = pd.read_csv(tmp_path / "a" / "runs" / plain["run"] / "per_prompt.csv")
    b = pd.read_csv(tmp_path / "b" / "runs" / plain["run"] / "per_prompt.csv")
    assert list(a["id"]) == list(b["id"])


def test_real_tasks_are_refused_clearly(tmp_path, small_organism, judge):
    c = cfg(tmp_path, NONE, task={"_target_": "tasks.promptsets.PublishedTask", "name": "webster500", "source": "promptsets"})
    with pytest.raises(NotImplementedError, match="training images"):
        run_mitigate(c, model=small_organism, judge=judge, progress=False)


def test_every_mitigator_config_builds_at_each_strength():
    from pathlib import Path

    from omegaconf import OmegaConf

    from bench.contracts import Mitigator
    from bench.run.registry import instantiate

    confs = sorted((Path(__file__).resolve().parents[1] / "conf" / "mitigator").glob("*.yaml"))
    assert {c.stem for c in confs} >= {"none", "rta", "rna", "cwr", "gni", "embed_opt", "pruning", "nemo"}
    for c in confs:
        d = OmegaConf.to_container(OmegaConf.load(c))
        assert d["id"] and d["strengths"], c
        for s in d["strengths"]:
            m = instantiate({k: v for k, v in d.items() if k != "strengths"} | {"strength": s})
            assert isinstance(m, Mitigator) and m.strength == s and m.params()["strength"] == s, c
