"""min_tightness of train_cluster_augment is chosen by a rule on a held-out world (tasks/studies/cluster_tightness.py)."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from omegaconf import OmegaConf

from baselines.mitigators.train_cluster_augment import MIN_TIGHTNESS_SELECTION, TrainClusterAugment
from tasks.studies.cluster_tightness import (OFFSET, choose_from_embeddings, choose_min_tightness, rule_min_tightness,
                                     scored_configs, selection_configs)


def _stat(t, ordinary_only=True, size=5):
    return {"tightness": t, "ordinary_only": ordinary_only, "size": size}


def test_rule_is_next_hundredth_above_ordinary_only():
    stats = [_stat(0.62), _stat(0.708), _stat(0.95, False), _stat(0.99, True, size=0)]   # empty cluster ignored
    assert rule_min_tightness(stats) == 0.71
    assert rule_min_tightness([_stat(0.71), _stat(0.5)]) == 0.72                          # strictly above
    assert rule_min_tightness([_stat(0.7954)]) == 0.80
    with pytest.raises(ValueError, match="ordinary-only"):
        rule_min_tightness([_stat(0.9, False)])


def _synthetic(rng, d=32):
    """Four ordinary blobs of graded spread (tightness ~0.55-0.85) and one tight duplicated planted blob."""
    emb, kinds, w = [], [], []
    for spread, n in ((0.35, 40), (0.5, 40), (0.8, 40), (1.2, 40)):
        c = rng.normal(size=d)
        c /= np.linalg.norm(c)
        x = c + spread * rng.normal(size=(n, d)) / np.sqrt(d)
        emb.append(x)
        kinds += ["ordinary"] * n
        w += [1.0] * n
    c = rng.normal(size=d)
    emb.append(c / np.linalg.norm(c) + 0.02 * rng.normal(size=(4, d)) / np.sqrt(d))
    kinds += ["MV"] * 4
    w += [50.0] * 4
    e = np.concatenate(emb).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True), np.asarray(w), np.asarray(kinds)


def test_rule_on_synthetic_clusters_sits_just_above_ordinary():
    emb, w, kinds = _synthetic(np.random.default_rng(0))
    v, rep = choose_from_embeddings(emb, w, kinds, n_clusters=5, mass_factor=1.0, seed=0)
    ordinary = [s["tightness"] for s in rep["clusters"] if s["ordinary_only"] and s["size"]]
    assert len(ordinary) >= 3 and max(ordinary) == rep["ordinary_only_tightness_max"]
    assert max(ordinary) < v <= max(ordinary) + 0.01 + 1e-9                  # just above every ordinary cluster
    assert not any(s["dense_at_chosen"] for s in rep["clusters"] if s["ordinary_only"])
    assert rep["planted_images_in_dense_clusters"] == {"MV": "4/4"}         # the duplicated blob stays dense
    assert rep["ordinary_images_in_dense_clusters"] == 0
    again, _ = choose_from_embeddings(emb, w, kinds, n_clusters=5, mass_factor=1.0, seed=0)
    assert again == v                                                        # deterministic


def test_choose_min_tightness_clusters_as_the_mitigator(small_world):
    """Plumbing on the test world with given embeddings (no SSCD): the report names the selection world."""
    from tasks.finetune_world import FinetuneConfig, finetune_world

    fc = FinetuneConfig(seed=1 + OFFSET)
    world = finetune_world(small_world, fc)
    used = np.unique(world.pair_image)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(used), 16)).astype(np.float32)
    kinds = np.asarray(world.image_kind)[used]
    for k in ("MV", "FG", "BG"):
        emb[kinds == k] = rng.normal(size=16)                               # each planted family: one spot
    planted = kinds == "MV"
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    v, rep = choose_min_tightness(small_world, fc, n_clusters=6, mass_factor=1.0, seed=0, emb=emb, sweep_seeds=(1,))
    assert rep["selection_world"] == {"base_world_seed": small_world.config.seed, "finetune_seed": 1 + OFFSET,
                                      "sha256": world.sha256, "n_images_clustered": len(used)}
    assert v > rep["ordinary_only_tightness_max"] and rep["min_tightness"] == v
    assert sum(s["size"] for s in rep["clusters"]) == len(used) and set(rep["diagnostic_kmeans_seed_sweep"]) == {1}
    assert rep["planted_images_in_dense_clusters"]["MV"] == f"{int(planted.sum())}/{int(planted.sum())}"


def _image_hashes(world) -> set[str]:
    return {hashlib.sha256(world.images[i].tobytes()).hexdigest() for i in np.unique(world.pair_image)}


def test_selection_world_is_not_the_scored_world():
    """Default configs: other seeds, another sha256, no training image in common, and it is the recorded one."""
    from tasks.finetune_world import finetune_world
    from tasks.memworld import build_memworld

    (swc, sfc), (cwc, cfc) = scored_configs(), selection_configs()
    assert cwc.seed != swc.seed and cfc.seed != sfc.seed
    assert dataclasses.replace(cwc, seed=swc.seed) == swc and dataclasses.replace(cfc, seed=sfc.seed) == sfc
    scored, selection = finetune_world(build_memworld(swc), sfc), finetune_world(build_memworld(cwc), cfc)
    assert selection.sha256 != scored.sha256
    assert not _image_hashes(selection) & _image_hashes(scored)
    rec = MIN_TIGHTNESS_SELECTION["selection_world"]
    assert selection.sha256.startswith(rec["sha256_prefix"])
    assert (rec["base_world_seed"], rec["finetune_seed"]) == (cwc.seed, cfc.seed)
    assert (MIN_TIGHTNESS_SELECTION["scored_world"]["base_world_seed"],
            MIN_TIGHTNESS_SELECTION["scored_world"]["finetune_seed"]) == (swc.seed, sfc.seed)
    with pytest.raises(ValueError, match="scored world"):
        selection_configs(offset=0)


def test_default_min_tightness_is_the_selected_value_and_recorded():
    conf = OmegaConf.to_container(OmegaConf.load("conf/mitigator/train_cluster_augment.yaml"))
    value = MIN_TIGHTNESS_SELECTION["value"]
    assert conf["min_tightness"] == TrainClusterAugment().min_tightness == value
    assert value == rule_min_tightness([_stat(MIN_TIGHTNESS_SELECTION["selection_ordinary_only_tightness_max"])])
    assert (conf["n_clusters"], conf["mass_factor"]) == (MIN_TIGHTNESS_SELECTION["selection_world"]["n_clusters"],
                                                         MIN_TIGHTNESS_SELECTION["selection_world"]["mass_factor"])
    p = TrainClusterAugment(strength=0.5).params()
    assert p["min_tightness_selection"]["applies"] and p["min_tightness_selection"]["rule"]
    assert not TrainClusterAugment(strength=0.5, min_tightness=0.6).params()["min_tightness_selection"]["applies"]
