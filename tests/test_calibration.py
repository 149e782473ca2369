"""Conformal p-values and calibrations: the formula, finite-sample validity (synthetic and with real
detector scores on the small organism's non-memorized prompts), versioning and refusal."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.stats import binom

from baselines.detectors.noise_magnitude import NoiseMagnitude
from bench.measure.calibration import (Calibration, CalibrationError, CalibrationMismatchError, binomial_interval,
                               calibrate, heldout_check, min_reference, repeated_splits, weights_sha256)
from bench.measure.metrics import conformal_pvalues


def _cal(scores, **kw) -> Calibration:
    base = dict(detector_id="nm_n1_k1", detector_params={"n_gen": 1, "steps": 1}, model_fingerprint={"name": "m"},
                model_weights_sha256="w" * 64, seed=0, reference_name="ref", reference_sha256="r" * 64,
                scores=tuple(scores))
    return Calibration(**{**base, **kw})


# ---------------------------------------------------------------------- the formula
def test_conformal_pvalue_is_the_standard_formula_with_ties():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 10, 57).astype(float)          # many ties
    new = np.r_[rng.integers(-1, 12, 40).astype(float), ref[:5]]
    brute = [(1 + np.sum(ref >= s)) / (ref.size + 1) for s in new]
    np.testing.assert_array_equal(conformal_pvalues(ref, new), brute)
    assert conformal_pvalues(ref, [ref.max() + 1])[0] == 1 / (ref.size + 1)   # smallest possible
    assert conformal_pvalues(ref, [ref.min() - 1])[0] == 1.0


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_flag_rate_is_exactly_valid_over_calibration_draws(alpha):
    # Each trial draws a fresh calibration set and one new exchangeable score: the flag count over T
    # trials is exactly Binomial(T, P(p <= alpha)) with P = floor(alpha (n+1)) / (n+1) <= alpha.
    n, T = 199, 20000
    x = np.random.default_rng(1).standard_normal((T, n + 1))
    p = np.array([conformal_pvalues(row[:n], row[n:])[0] for row in x])
    flags = _cal(x[0, :n]).flags(p, alpha)                 # the flag rule: p <= alpha
    lo, hi = binom.ppf(0.0005, T, alpha), binom.ppf(0.9995, T, alpha)
    assert lo <= flags.sum() <= hi, (flags.sum(), lo, hi)


def test_ties_make_the_test_conservative_not_liberal():
    n, T, alpha = 99, 20000, 0.05
    x = np.random.default_rng(2).integers(0, 4, (T, n + 1)).astype(float)   # heavy ties
    p = np.array([conformal_pvalues(r[:n], r[n:])[0] for r in x])
    assert (p <= alpha).sum() <= binom.ppf(0.9995, T, alpha)


def test_threshold_agrees_with_flags():
    rng = np.random.default_rng(3)
    cal = _cal(rng.standard_normal(250))
    new = np.r_[rng.standard_normal(2000) * 1.5, np.array(cal.scores)]
    for alpha in (0.004, 0.01, 0.05, 0.2):
        flags = cal.flags(cal.pvalues(new), alpha)
        np.testing.assert_array_equal(flags, new > cal.threshold(alpha))


def test_alpha_below_the_smallest_pvalue_is_refused():
    cal = _cal(np.arange(50.0))                                   # smallest p = 1/51 ~ 0.0196
    cal.check_alpha(0.05)
    with pytest.raises(CalibrationError, match=r"n=50 .* nothing could ever be flagged.* at least 99"):
        cal.flags([0.01], 0.01)
    assert min_reference(0.01) == 99 and min_reference(0.05) == 19
    with pytest.raises(CalibrationError, match="alpha"):
        cal.check_alpha(1.5)
    with pytest.raises(CalibrationError, match="no reference scores"):
        _cal([])
    with pytest.raises(CalibrationError, match="non-finite"):
        _cal([0.1, float("nan")])


# ---------------------------------------------------------------------- files and refusal
def test_save_load_roundtrip_and_edited_file_refused(tmp_path):
    cal = _cal(np.linspace(0, 1, 120), notes={"split_seed": 0})
    path = cal.save(tmp_path / "c.json")
    back = Calibration.load(path)
    assert back == cal and back.key == cal.key
    d = json.loads(path.read_text())
    d["scores"][0] = -5.0
    path.write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match="edited by hand"):
        Calibration.load(path)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="invalid JSON"):
        Calibration.load(path)
    with pytest.raises(CalibrationError, match="not found.*diffmem calibrate"):
        Calibration.load(tmp_path / "missing.json")


def test_calibration_is_refused_for_another_config_model_or_seed(small_organism):
    det = NoiseMagnitude()
    prompts = [f"a red circle number {i}" for i in range(6)]
    cal = calibrate(small_organism, det, "nm_n1_k1", prompts, seed=0, reference_name="t")
    same = dict(detector_id="nm_n1_k1", detector_params=det.params(),
                model_fingerprint=small_organism.fingerprint(), model_weights_sha256=weights_sha256(small_organism),
                seed=0)
    cal.check_matches(**same)
    # the model folder's path is recorded, not compared (moving a folder does not change scores)
    cal.check_matches(**{**same, "model_fingerprint": {**same["model_fingerprint"], "path": "/elsewhere"}})
    other_det = NoiseMagnitude(n_gen=4)
    with pytest.raises(CalibrationMismatchError, match=r"detector_params.n_gen: calibration has 1, this run has 4"):
        cal.check_matches(**{**same, "detector_id": "nm_n4_k1", "detector_params": other_det.params()})
    with pytest.raises(CalibrationMismatchError, match="seed"):
        cal.check_matches(**{**same, "seed": 1})
    with pytest.raises(CalibrationMismatchError, match="model.name"):
        cal.check_matches(**{**same, "model_fingerprint": {**same["model_fingerprint"], "name": "sd14"}})
    with pytest.raises(CalibrationMismatchError, match="model_weights_sha256"):
        cal.check_matches(**{**same, "model_weights_sha256": "0" * 64})
    # and the weights hash really follows the weights
    p = next(small_organism.unet.parameters())
    orig = p.detach().clone()
    with torch.no_grad():
        try:
            p.view(-1)[0] += 1.0
            assert weights_sha256(small_organism) != same["model_weights_sha256"]
        finally:
            p.copy_(orig)                                 # the fixture is shared: restore exactly
    assert weights_sha256(small_organism) == same["model_weights_sha256"]


# ---------------------------------------------------------------------- real detector scores
@pytest.fixture(scope="module")
def organism_negatives(small_organism):
    """nm_n1_k1 scores of the small organism's non-memorized prompts (a world with more of them)."""
    from tasks.memworld import build_memworld
    from tasks.organism import small_config

    world = build_memworld(dataclasses.replace(small_config().world, n_eval_unseen=180, n_eval_random=180,
                                               n_eval_seen=40))
    prompts = [e.prompt for e in world.eval_prompts if e.label == 0]
    return prompts, NoiseMagnitude().score(small_organism, prompts, seed=0)


def test_heldout_flag_rate_within_binomial_interval_on_real_scores(organism_negatives):
    prompts, scores = organism_negatives
    assert len(prompts) >= 400 and len(set(np.round(scores, 9))) == len(scores)   # continuous, no ties
    perm = np.random.default_rng(0).permutation(len(scores))
    half = len(scores) // 2
    cal = _cal(scores[perm[:half]])
    for row in heldout_check(cal, scores[perm[half:]], alphas=(0.01, 0.05)):
        assert row["flags_in_interval"], row
        assert row["binomial_low"] <= row["heldout_flags"] <= row["binomial_high"]


def test_flag_rate_averaged_over_splits_matches_the_guarantee_on_real_scores(organism_negatives):
    _, scores = organism_negatives
    for row in repeated_splits(scores, alphas=(0.01, 0.05), repeats=400, seed=0):
        # mean over random splits estimates P(p <= alpha) = floor(alpha (n+1))/(n+1) <= alpha; its
        # standard error over 400 splits is below 0.001 here
        assert row["mean_flag_rate"] <= row["alpha"] + 0.004, row
        assert abs(row["mean_flag_rate"] - row["expected_without_ties"]) < 0.004, row


def test_binomial_interval():
    assert binomial_interval(200, 0.01, 0.99) == (int(binom.ppf(0.005, 200, 0.01)), int(binom.ppf(0.995, 200, 0.01)))
    lo, hi = binomial_interval(1000, 0.05)
    assert lo < 50 < hi


def test_memorized_prompts_get_small_pvalues_on_the_committed_organism():
    """The committed organism (tasks/artifacts): MV prompts reproduce their training image (README ground truth)."""
    from tasks.organism_task import organism_promptset, world_for
    from tasks.organism import load_organism

    model = load_organism(build_if_missing=False)
    ps = organism_promptset(world_for({"size": "default"}, model))
    groups = np.array(ps.groups)
    ref = [p for p, g in zip(ps.prompts, groups) if g in ("ordinary_unseen", "random_tokens")]   # 200 prompts
    mv = [p for p, g in zip(ps.prompts, groups) if g == "MV"]
    det = NoiseMagnitude()
    cal = calibrate(model, det, "nm_n1_k1", ref, seed=0, reference_name="organism ordinary_unseen+random_tokens")
    p_mv = cal.pvalues(det.score(model, mv, seed=0))
    assert np.median(p_mv) <= 0.01 and (p_mv <= 0.05).mean() >= 0.9, p_mv
