"""The committed organism: it loads without training, and its planted memorization is real."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.organism import ARTIFACT_DIR, OrganismConfig, default_dir, load_organism, organism_world

ART = ARTIFACT_DIR / f"organism-{OrganismConfig().version}"


@pytest.fixture(scope="module")
def organism():
    return load_organism(OrganismConfig(), build_if_missing=False)


@pytest.fixture(scope="module")
def world():
    return organism_world(OrganismConfig())


def test_committed_organism_matches_config_and_is_small():
    assert default_dir(OrganismConfig()) == ART, "committed organism missing or built from another config"
    size = sum(f.stat().st_size for f in ART.rglob("*") if f.is_file())
    assert size < 25e6
    meta = json.loads((ART / "diffmem.json").read_text())
    assert meta["train"]["steps"] == OrganismConfig().train.steps


def test_mv_prompts_reproduce_their_training_image(organism, world):
    """Issue acceptance: >= 80% of MV prompts reproduce their image in >= half of 4 seeds."""
    from tasks.groundtruth import measure

    df, thr = measure(organism, world, groups=["MV"], sscd=False, progress=False)
    assert len(df) == 20
    assert df["reproduces"].mean() >= 0.8, df[["prompt", "copy_rate", "own_cn_rmse_median"]]


def test_noise_magnitude_separates_memorized_from_all_controls(organism, world):
    """First-step noise magnitude (n=1, seed 0) on planted prompts vs every non-memorized group.

    Measured by `make bench-detect` on this organism: AUC 0.918 [0.882, 0.948] against all 411
    negatives, MV family 0.996. The floors (0.85 overall, 0.95 for MV) sit below the bootstrap interval
    and far above chance, so float noise across machines cannot trip them while a broken detector,
    sampling loop or organism (AUC near 0.5) does."""
    from baselines.detectors.noise_magnitude import NoiseMagnitude
    from bench.metrics import roc_auc

    ev = world.eval_prompts
    s = NoiseMagnitude(n_gen=1, steps=1).score(organism, [e.prompt for e in ev], seed=0)
    y = np.array([e.label for e in ev])
    assert roc_auc(s, y) >= 0.85
    mv = np.array([e.group == "MV" for e in ev])
    keep = mv | (y == 0)
    assert roc_auc(s[keep], y[keep]) >= 0.95
