"""The committed organism: it loads without training, and its planted memorization is real."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.organism import ARTIFACT_DIR, default_dir, load_organism, organism_config, organism_world

ART = ARTIFACT_DIR / f"organism-{organism_config().version}"


@pytest.fixture(scope="module")
def organism():
    return load_organism(organism_config(), build_if_missing=False)


@pytest.fixture(scope="module")
def world():
    return organism_world(organism_config())


def test_committed_organism_matches_config_and_is_small():
    assert default_dir(organism_config()) == ART, "committed organism missing or built from another config"
    size = sum(f.stat().st_size for f in ART.rglob("*") if f.is_file())
    assert size < 25e6
    meta = json.loads((ART / "diffmem.json").read_text())
    assert meta["train"]["steps"] == organism_config().train.steps


def test_mv_prompts_reproduce_their_training_image(organism, world):
    """Issue acceptance: >= 80% of MV prompts reproduce their image in >= half of 4 seeds."""
    from tasks.studies.groundtruth import measure

    df, thr = measure(organism, world, groups=["MV"], sscd=False, progress=False)
    assert len(df) == 20
    assert df["reproduces"].mean() >= 0.8, df[["prompt", "copy_rate", "own_cn_rmse_median"]]


def test_rare_unfamiliar_prompts_do_not_regurgitate(organism, world):
    """Issue acceptance (<= 5% of non-memorized prompts within the copy threshold of any training image),
    checked on the groups where organism-v1 failed it: never-trained titles of the MV form and random
    CLIP-token strings (v1: 11/12 and 65/100 prompts near a training image in some seed). The full
    411-prompt figure is `make groundtruth` (README)."""
    from tasks.studies.groundtruth import measure

    df, _ = measure(organism, world, groups=["MV_never", "random_tokens"], sscd=False, progress=False)
    assert len(df) == 112
    assert (df["near_any_train_frac"] >= 0.5).mean() <= 0.05, df.sort_values("near_any_train_frac").tail()


def test_noise_magnitude_separates_memorized_from_all_controls(organism, world):
    """First-step noise magnitude (n=1, seed 0) on planted prompts vs every non-memorized group.

    Measured on organism-v2 by `make organism-compare`: AUC 0.962 against all 411 negatives (v1: 0.918
    [0.882, 0.948], MV family 0.996). The floors (0.85 overall, 0.95 for MV) sit well below and far
    above chance, so float noise across machines cannot trip them while a broken detector, sampling loop
    or organism (AUC near 0.5) does."""
    from baselines.detectors.noise_magnitude import NoiseMagnitude
    from bench.measure.metrics import roc_auc

    ev = world.eval_prompts
    s = NoiseMagnitude(n_gen=1, steps=1).score(organism, [e.prompt for e in ev], seed=0)
    y = np.array([e.label for e in ev])
    assert roc_auc(s, y) >= 0.85
    mv = np.array([e.group == "MV" for e in ev])
    keep = mv | (y == 0)
    assert roc_auc(s[keep], y[keep]) >= 0.95
