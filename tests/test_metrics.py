"""Tests for bench.measure.metrics (compared against scikit-learn where it applies)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from bench.measure.metrics import (
    FewNegativesWarning,
    bootstrap_ci,
    conformal_pvalues,
    detection_metrics,
    roc_auc,
    roc_curve,
    similarity_summary,
    tpr_at_fpr,
)


def _random_data(seed: int, n: int, pos_frac: float, tied: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_frac).astype(int)
    y[0], y[1] = 0, 1  # both classes always present
    if tied:
        s = rng.integers(0, 4, size=n) + y  # few distinct values, many ties across classes
    else:
        s = rng.normal(size=n) + 0.8 * y
    return s, y


CASES = [(seed, n, frac) for seed in range(4) for n, frac in [(7, 0.5), (60, 0.2), (500, 0.5), (2000, 0.05)]]

# --------------------------------------------------------------------------- AUC / ROC


@pytest.mark.parametrize("seed,n,frac", CASES)
def test_auc_matches_sklearn(seed, n, frac):
    s, y = _random_data(seed, n, frac)
    assert abs(roc_auc(s, y) - skm.roc_auc_score(y, s)) < 1e-12


@pytest.mark.parametrize("seed,n,frac", CASES)
def test_auc_matches_sklearn_heavy_ties(seed, n, frac):
    s, y = _random_data(seed, n, frac, tied=True)
    assert len(np.unique(s)) <= 5
    assert abs(roc_auc(s, y) - skm.roc_auc_score(y, s)) < 1e-12


def test_auc_ties_count_half():
    # one positive and one negative with equal score -> AUC 0.5; all-tied -> 0.5
    assert roc_auc([1.0, 1.0], [1, 0]) == 0.5
    # pos {2, 1}, neg {1, 0}: pairs (2>1)=1, (2>0)=1, (1=1)=0.5, (1>0)=1 -> 3.5/4
    assert roc_auc([2, 1, 1, 0], [1, 1, 0, 0]) == 0.875


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed,n,frac", CASES)
def test_roc_curve_matches_sklearn(seed, n, frac, tied):
    s, y = _random_data(seed, n, frac, tied=tied)
    fpr, tpr, thr = roc_curve(s, y)
    sf, st, sth = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sf)
    np.testing.assert_array_equal(tpr, st)
    np.testing.assert_array_equal(thr, sth)
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and thr[0] == np.inf


# --------------------------------------------------------------------------- TPR@FPR


def test_tpr_at_fpr_conventions_differ_inexact_target():
    # pos: 1.0 0.8 0.6 0.4   neg: 0.9 0.7 0.2 0.1
    # ROC (idx: thr -> fpr, tpr):
    #  0: inf -> (0, 0)     1: 1.0 -> (0, .25)   2: 0.9 -> (.25, .25)
    #  3: 0.8 -> (.25, .5)  4: 0.7 -> (.5, .5)   5: 0.6 -> (.5, .75)
    #  6: 0.4 -> (.5, 1)    7: 0.2 -> (.75, 1)   8: 0.1 -> (1, 1)
    # target 0.3: strictly_below -> last idx with fpr < .3 is 3 -> tpr 0.5
    #             closest -> |fpr-.3| minimal (.05) at idx 2 and 3; first is 2 -> tpr 0.25
    s = [1.0, 0.8, 0.6, 0.4, 0.9, 0.7, 0.2, 0.1]
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    assert tpr_at_fpr(s, y, 0.3, "strictly_below") == 0.5
    assert tpr_at_fpr(s, y, 0.3, "closest") == 0.25
    # target 0.6: strictly_below -> idx 6 (fpr .5) -> 1.0; closest -> |.5-.6|=.1 first at idx 4 -> 0.5
    assert tpr_at_fpr(s, y, 0.6, "strictly_below") == 1.0
    assert tpr_at_fpr(s, y, 0.6, "closest") == 0.5


def test_tpr_at_fpr_conventions_differ_exact_hit():
    # pos: 1.0 0.8 0.8 0.4   neg: 0.8 0.6 0.2 0.1   (0.8 is a mixed tie: 2 pos + 1 neg)
    # ROC: 0: inf -> (0, 0)   1: 1.0 -> (0, .25)   2: 0.8 -> (.25, .75)
    #      3: 0.6 -> (.5, .75) 4: 0.4 -> (.5, 1)   5: 0.2 -> (.75, 1)   6: 0.1 -> (1, 1)
    # target 0.25 (hit exactly at idx 2):
    #   strictly_below -> fpr < .25 strictly -> idx 1 -> tpr 0.25
    #   closest        -> |fpr - .25| = 0 at idx 2 -> tpr 0.75
    s = [1.0, 0.8, 0.8, 0.4, 0.8, 0.6, 0.2, 0.1]
    y = [1, 1, 1, 1, 0, 0, 0, 0]
    assert tpr_at_fpr(s, y, 0.25, "strictly_below") == 0.25
    assert tpr_at_fpr(s, y, 0.25, "closest") == 0.75
    # target 0.5 is hit at idx 3 and 4; "closest" takes the first (idx 3) -> 0.75, not 1.0
    assert tpr_at_fpr(s, y, 0.5, "closest") == 0.75
    assert tpr_at_fpr(s, y, 0.5, "strictly_below") == 0.75  # idx 2


@pytest.mark.parametrize("seed,n,frac", CASES[:8])
@pytest.mark.parametrize("target", [0.01, 0.03, 0.1])
def test_tpr_at_fpr_matches_reference_snippets(seed, n, frac, target):
    s, y = _random_data(seed, n, frac, tied=seed % 2 == 1)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewNegativesWarning)
        got_strict = tpr_at_fpr(s, y, target, "strictly_below")
        got_close = tpr_at_fpr(s, y, target, "closest")
    assert got_strict == tpr[np.where(fpr < target)[0][-1]]
    assert got_close == tpr[np.argmin(np.abs(fpr - target))]


def test_tpr_at_fpr_rejects_bad_convention_and_target():
    s, y = [0.1, 0.9], [0, 1]
    with pytest.raises(ValueError, match="unknown convention"):
        tpr_at_fpr(s, y, 0.5, "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_fpr"):
        tpr_at_fpr(s, y, 0.0, "closest")


def test_few_negatives_warning():
    rng = np.random.default_rng(0)
    s50 = rng.normal(size=150)
    y50 = np.r_[np.ones(100, int), np.zeros(50, int)]
    with pytest.warns(FewNegativesWarning, match=r"n_neg=50.*0\.01.*100"):
        tpr_at_fpr(s50, y50, 0.01, "strictly_below")

    s200 = rng.normal(size=300)
    y200 = np.r_[np.ones(100, int), np.zeros(200, int)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewNegativesWarning)
        tpr_at_fpr(s200, y200, 0.01, "strictly_below")
        tpr_at_fpr(s200, y200, 0.01, "closest")
    # boundary: exactly 100 negatives at 1% is resolvable
    y100 = np.r_[np.ones(10, int), np.zeros(100, int)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewNegativesWarning)
        tpr_at_fpr(rng.normal(size=110), y100, 0.01)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_point_and_is_deterministic():
    s, y = _random_data(3, 400, 0.3)
    point = roc_auc(s, y)
    lo, hi = bootstrap_ci(s, y, roc_auc, n_boot=300, seed=7)
    assert lo <= point <= hi
    assert lo < hi
    assert (lo, hi) == bootstrap_ci(s, y, roc_auc, n_boot=300, seed=7)
    assert (lo, hi) != bootstrap_ci(s, y, roc_auc, n_boot=300, seed=8)
    # narrower interval at a larger alpha
    lo2, hi2 = bootstrap_ci(s, y, roc_auc, n_boot=300, alpha=0.5, seed=7)
    assert lo <= lo2 <= hi2 <= hi


def test_bootstrap_is_stratified():
    s, y = _random_data(1, 50, 0.2)
    n_pos = int(y.sum())
    seen: list[tuple[int, int]] = []

    def count_classes(ss, yy):
        seen.append((int(yy.sum()), int(yy.size - yy.sum())))
        return roc_auc(ss, yy)

    bootstrap_ci(s, y, count_classes, n_boot=50, seed=0)
    assert seen == [(n_pos, len(y) - n_pos)] * 50


# --------------------------------------------------------------------------- detection_metrics


def test_detection_metrics_keys_and_values():
    s, y = _random_data(2, 600, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewNegativesWarning)  # ~300 negatives: no warning
        m = detection_metrics(s, y, n_boot=100, seed=0)
    expected = {
        "auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_closest",
        "tpr_at_3pct_fpr", "tpr_at_3pct_fpr_closest", "tpr_at_1pct_ci_low", "tpr_at_1pct_ci_high",
        "acc_best", "n_pos", "n_neg", "tpr_convention",
    }
    assert set(m) == expected
    json.dumps(m)  # JSON-serialisable
    assert all(type(m[k]) is float for k in expected - {"n_pos", "n_neg", "tpr_convention"})
    assert type(m["n_pos"]) is int and type(m["n_neg"]) is int
    assert m["n_pos"] + m["n_neg"] == 600 and m["n_pos"] == int(y.sum())
    assert m["tpr_convention"] == "strictly_below"
    assert abs(m["auc"] - skm.roc_auc_score(y, s)) < 1e-12
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]
    assert m["tpr_at_1pct_fpr"] == tpr_at_fpr(s, y, 0.01, "strictly_below")
    assert m["tpr_at_3pct_fpr_closest"] == tpr_at_fpr(s, y, 0.03, "closest")
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert m["acc_best"] == pytest.approx(np.max(1 - (fpr + (1 - tpr)) / 2), abs=1e-15)
    assert m["tpr_at_1pct_ci_low"] <= m["tpr_at_1pct_ci_high"]
    assert m == detection_metrics(s, y, n_boot=100, seed=0)


def test_detection_metrics_warns_with_few_negatives():
    s, y = _random_data(0, 60, 0.2)
    with pytest.warns(FewNegativesWarning):
        detection_metrics(s, y, n_boot=10)


def test_acc_best_perfect_separation():
    with pytest.warns(FewNegativesWarning):
        m = detection_metrics([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=10)
    assert m["acc_best"] == 1.0 and m["auc"] == 1.0


# --------------------------------------------------------------------------- conformal


def test_conformal_pvalues_range_and_monotone():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=200)
    new = np.sort(rng.normal(size=500) * 2)
    p = conformal_pvalues(ref, new)
    assert p.shape == new.shape
    assert np.all(p > 0) and np.all(p <= 1)
    assert np.all(np.diff(p) <= 0)  # non-increasing in the score
    # hand-made: ref {1, 2, 2, 3}; s=2 -> #{ref>=2}=3 -> 4/5; s=0 -> 5/5; s=10 -> 1/5
    np.testing.assert_allclose(conformal_pvalues([1, 2, 2, 3], [2, 0, 10]), [0.8, 1.0, 0.2])


def test_conformal_pvalues_valid_under_exchangeability():
    alpha, n_ref, n_new = 0.05, 19_999, 4_000
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref = rng.normal(size=n_ref)
        new = rng.normal(size=n_new)
        k = int(np.sum(conformal_pvalues(ref, new) <= alpha))
        lo, hi = stats.binom.interval(0.999, n_new, alpha)
        assert lo <= k <= hi, (seed, k, lo, hi)


def test_conformal_pvalues_validation():
    with pytest.raises(ValueError, match="new_scores contain 1 non-finite"):
        conformal_pvalues([0.0, 1.0], [0.5, np.nan])
    with pytest.raises(ValueError, match="ref_scores contain 2 non-finite.*index 0"):
        conformal_pvalues([np.nan, np.inf, 1.0], [0.5])
    with pytest.raises(ValueError, match="empty"):
        conformal_pvalues([], [0.5])


# --------------------------------------------------------------------------- summary / errors


def test_similarity_summary():
    v = np.arange(101, dtype=float) / 100  # 0.00 .. 1.00
    out = similarity_summary(v)
    assert out == pytest.approx({"mean": 0.5, "median": 0.5, "p95": 0.95, "min": 0.0, "max": 1.0, "n": 101}, abs=1e-12)
    assert type(out["n"]) is int
    json.dumps(out)
    with pytest.raises(ValueError, match="empty"):
        similarity_summary([])


@pytest.mark.parametrize("fn", [roc_auc, roc_curve, lambda s, y: tpr_at_fpr(s, y, 0.01), detection_metrics])
def test_errors(fn):
    with pytest.raises(ValueError, match=r"only one class.*n_pos=3, n_neg=0"):
        fn([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match=r"only one class.*n_pos=0, n_neg=2"):
        fn([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match=r"scores contain 2 non-finite value\(s\).*first at index 1"):
        fn([0.1, np.nan, 0.3, np.nan], [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"first at index 2"):
        fn([0.1, 0.2, np.inf], [0, 1, 1])
    with pytest.raises(ValueError, match="length mismatch: 3 scores but 2 labels"):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        fn([0.1, 0.2, 0.3], [0, 1, 2])
