"""Every inference-time and model-side mitigator, at its strongest registered strength, on the
committed organism: does it lower the copy rate of memorized prompts below ``none``'s?

A fixed small set: the first 4 MV and 4 BG prompts whose generations reproduce their training image
(measured ground truth), 2 seeds each, DDIM 50, guidance 7.5; copy = the ground-truth criterion
(region cn-RMSE to the nearest target below the family's training-calibrated threshold).
Methods the leaderboard shows mitigating must do so here; the ones that do not mitigate on this
organism are listed in ``DOES_NOT_MITIGATE`` with the measured reason and run as strict xfails, so
that a change in either direction fails the test and is seen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.core.model import weights_sha256

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "mitigator"
SEEDS = [0, 1]
PER_FAMILY = {"MV": 4, "BG": 4}
# Measured with this test's set (8 prompts x 2 seeds) and in results/mitigate_leaderboard.md (organism,
# 40 prompts x 4 seeds): copy rate at the strongest strength vs none.
DOES_NOT_MITIGATE = {
    "nemo": "per-prompt neurons in the attn2.to_v value layers: the organism's copies do not run through "
            "the few out-of-distribution value neurons NeMo finds (leaderboard: 0.762 at strength 1 vs none 0.769)",
    "nemo_c": "the union of NeMo's neurons over clustered prompts; as NeMo (leaderboard: 0.706 vs 0.769, "
              "all of it from BG)",
    "wanda_prune": "Wanda pruning of ff.net.2 at <= 5% per row leaves the MV/BG copies (leaderboard: 0.781 vs 0.769)",
}
SKIP = {"none"}     # the reference itself


def _registry() -> dict[str, dict]:
    out = {}
    for f in sorted(CONF.glob("*.yaml")):
        c = yaml.safe_load(f.read_text())
        if f.stem.startswith("train_") or c["id"] in SKIP:     # training-time: the fine-tuning protocol
            continue
        out[c["id"]] = c
    return out


REGISTRY = _registry()


@pytest.fixture(scope="module")
def setup():
    import torch

    from bench.run.runner import build_task
    from tasks.copies import calibrate
    from tasks.organism import load_organism, organism_config, organism_world

    torch.set_num_threads(2)
    cfg = organism_config()
    model = load_organism(cfg, build_if_missing=False)
    world = organism_world(cfg)
    ps = build_task({"_target_": "tasks.organism_task.OrganismTask", "name": "organism", "source": "organism",
                     "labels": "measured"}, {"kind": "organism"}, model)
    learned = {pid for pid, y in zip(ps.ids, ps.labels) if y == 1}
    prompts = [e for fam, k in PER_FAMILY.items()
               for e in [x for x in world.eval_prompts if x.group == fam and x.id in learned][:k]]
    assert [e.group for e in prompts].count("MV") == 4 and [e.group for e in prompts].count("BG") == 4
    thr = calibrate(world)
    return model, world, prompts, thr, weights_sha256(model)


def _copy_rate(images: np.ndarray, world, prompts, thr) -> float:
    from tasks.copies import region_distance

    S, copies = len(SEEDS), []
    for k, e in enumerate(prompts):
        d = region_distance(images[k * S:(k + 1) * S], world, list(e.targets), e.region or "full").min(1)
        copies += list(d < thr[e.group])
    return float(np.mean(copies))


def _images(mit, setup) -> np.ndarray:
    from bench.contracts import GenSpec

    model, world, prompts, thr, sha = setup
    mit.fit(model, memorized=[e.prompt for e in prompts],
            reference=[e.prompt for e in world.eval_prompts if e.group == "ordinary_seen"], seed=0)
    res = mit.generate(model, [e.prompt for e in prompts], SEEDS, GenSpec(50, 7.5, 64), seed=0)
    assert weights_sha256(model) == sha, f"{mit.name} left the model changed"
    return res.images.float().numpy()


def _rate(mit, setup) -> float:
    _, world, prompts, thr, _ = setup
    return _copy_rate(_images(mit, setup), world, prompts, thr)


@pytest.fixture(scope="module")
def none_images(setup):
    from baselines.mitigators.base import NoMitigation

    return _images(NoMitigation(), setup)


@pytest.fixture(scope="module")
def none_rate(setup, none_images):
    _, world, prompts, thr, _ = setup
    rate = _copy_rate(none_images, world, prompts, thr)
    assert rate >= 0.75, f"none copies only {rate:.2f} of the fixed memorized set"
    return rate


@pytest.mark.slow
@pytest.mark.parametrize("mid", [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=DOES_NOT_MITIGATE[m]))
                                 if m in DOES_NOT_MITIGATE else m for m in REGISTRY])
def test_strongest_setting_lowers_copy_rate(mid, setup, none_rate):
    from hydra.utils import instantiate

    c = {k: v for k, v in REGISTRY[mid].items() if k not in ("id", "strengths")}
    strongest = max(float(s) for s in REGISTRY[mid]["strengths"])
    mit = instantiate({**c, "strength": strongest})
    rate = _rate(mit, setup)
    print(f"{mid}@{strongest:g}: copy rate {rate:.3f} vs none {none_rate:.3f}")
    assert rate < none_rate, f"{mid}@{strongest:g} copies {rate:.3f}, not below none's {none_rate:.3f}"


def test_every_registered_mitigator_is_covered():
    """A new inference-time or model-side YAML joins this test automatically; listed exceptions must exist."""
    assert set(DOES_NOT_MITIGATE) <= set(REGISTRY)
    assert {"rta", "rna", "cwr", "gni", "embed_opt", "nemo", "nemo_c", "wanda_prune"} <= set(REGISTRY)


FBMEM_SHARE_NOTE = (
    "measured 0.267 (4 of 15 copies; world-calibrated thresholds fg 0.812, bg 0.764, v1's were 0.825, 0.778): "
    "the thresholds are not the cause. Diagnosis (4 MV/RV/TV/BG families, 144 copies, seeds 0-1): the memworld_cnn "
    "segmenter's masks give 0.30; the copied image's own exact mask instead gives 0.63 (region='masked') and 0.81 "
    "(region='blank'); a segmenter trained on this world's form gives 0.36. The organism's copies are "
    "colour-shifted 16-px reproductions (cn-RMSE copies) whose per-region MS-SSIM sits near the null's")


@pytest.mark.xfail(strict=True, reason=FBMEM_SHARE_NOTE)
def test_fbmem_calls_nones_copies_memorized(setup, none_images, none_rate):
    """FB-Mem with the committed world's own thresholds (results/fbmem_thresholds/, keyed by its sha256):
    the share of ``none``'s copies (ground-truth criterion) that FB-Mem calls VM, FM or BM."""
    from bench.measure.fbmem import FBMemConfig, check_world, classify_generations, fbmem_scores, memorized_pool, thresholds_for
    from tasks.copies import region_distance
    from tasks.memworld_segment import MemWorldCNNSegmenter

    _, world, prompts, thr, _ = setup
    fb_thr = thresholds_for(world, FBMemConfig(), store_dir=REPO / "results" / "fbmem_thresholds", progress=False)
    check_world(fb_thr, world)
    pool = memorized_pool(world)
    masks = MemWorldCNNSegmenter().masks(none_images)
    sc = fbmem_scores(none_images, masks, world.images[pool], world.masks[pool], None, FBMemConfig())
    cat = classify_generations(sc, fb_thr).sort_values("gen")["category"].to_numpy()
    S, copy = len(SEEDS), []
    for k, e in enumerate(prompts):
        d = region_distance(none_images[k * S:(k + 1) * S], world, list(e.targets), e.region or "full").min(1)
        copy += list(d < thr[e.group])
    copy = np.array(copy)
    share = float((cat[copy] != "NM").mean())
    print(f"FB-Mem VM+FM+BM share of none's {int(copy.sum())} copies: {share:.3f} (thresholds {fb_thr.fg:.3f}, {fb_thr.bg:.3f})")
    assert share >= 0.8
