"""Detection metrics for memorization benchmarks (pure numpy).

Orientation everywhere: a higher score means "more likely memorized";
labels are 1 = memorized (positive) and 0 = not memorized (negative).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "FewNegativesWarning",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
    "min_negatives_for_fpr",
    "bootstrap_ci",
    "detection_metrics",
    "conformal_pvalues",
    "similarity_summary",
]

Convention = Literal["strictly_below", "closest"]
_CONVENTIONS: tuple[str, ...] = ("strictly_below", "closest")


class FewNegativesWarning(UserWarning):
    """Too few negatives for the requested FPR to be resolvable."""


# --------------------------------------------------------------------------- validation


def _check_finite(x: NDArray[np.float64], name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        n_bad = int(bad.sum())
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} contain {n_bad} non-finite value(s) (NaN/inf); first at index {first}"
        )


def _as_1d_float(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    _check_finite(arr, name)
    return arr


def _validate(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Return (scores, labels) as 1-D float / {0,1} int arrays or raise ValueError."""
    s_raw = np.asarray(scores)
    y_raw = np.asarray(labels)
    if s_raw.ndim != 1 or y_raw.ndim != 1:
        raise ValueError(
            f"scores and labels must be 1-D, got shapes {s_raw.shape} and {y_raw.shape}"
        )
    if s_raw.shape[0] != y_raw.shape[0]:
        raise ValueError(
            f"length mismatch: {s_raw.shape[0]} scores but {y_raw.shape[0]} labels"
        )
    s = _as_1d_float(s_raw, "scores")
    y_f = np.asarray(y_raw, dtype=np.float64)
    not_binary = ~np.isin(y_f, (0.0, 1.0))
    if not_binary.any():
        first = int(np.flatnonzero(not_binary)[0])
        raise ValueError(
            f"labels must be 0 (not memorized) or 1 (memorized); "
            f"got {y_raw[first]!r} at index {first}"
        )
    y = y_f.astype(np.int64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"only one class present in labels (n_pos={n_pos}, n_neg={n_neg}); "
            "ROC metrics need both memorized (1) and non-memorized (0) samples"
        )
    return s, y


def min_negatives_for_fpr(target_fpr: float) -> int:
    """Smallest n_neg with 1/n_neg <= target_fpr (e.g. 100 for 1%)."""
    _check_target(target_fpr)
    return int(math.ceil(1.0 / target_fpr - 1e-9))


def _check_target(target_fpr: float) -> None:
    if not (0.0 < float(target_fpr) <= 1.0):
        raise ValueError(f"target_fpr must be in (0, 1], got {target_fpr!r}")


def _warn_few_negatives(n_neg: int, target_fpr: float) -> None:
    minimum = min_negatives_for_fpr(target_fpr)
    if n_neg < minimum:
        warnings.warn(
            f"only n_neg={n_neg} negatives: an FPR of {target_fpr:g} is not resolvable "
            f"(need at least {minimum} negatives, i.e. 1/target_fpr)",
            FewNegativesWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- ROC


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC via Mann-Whitney U with midranks (ties count 1/2); equals sklearn's roc_auc_score."""
    s, y = _validate(scores, labels)
    n = s.size
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    # tie groups [start, end) in sorted order; midrank (1-based) = (start + 1 + end) / 2
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.r_[0, boundaries]
    ends = np.r_[boundaries, n]
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    n_pos = float(y.sum())
    n_neg = float(n - n_pos)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1.0) / 2.0
    return float(u / (n_pos * n_neg))


def _roc_arrays(
    s: NDArray[np.float64], y: NDArray[np.int64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    # Same construction as sklearn's _binary_clf_curve + roc_curve(drop_intermediate=False).
    order = np.argsort(s, kind="mergesort")[::-1]
    s_desc = s[order]
    y_desc = y[order]
    distinct = np.flatnonzero(np.diff(s_desc))
    idx = np.r_[distinct, s_desc.size - 1]
    tps = np.cumsum(y_desc)[idx].astype(np.float64)
    fps = 1.0 + idx - tps
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thresholds = np.r_[np.inf, s_desc[idx]]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_curve(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Full ROC curve (fpr, tpr, thresholds), one point per distinct score plus (0, 0) at +inf.

    Matches ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    s, y = _validate(scores, labels)
    return _roc_arrays(s, y)


def _tpr_from_curve(
    fpr: NDArray[np.float64], tpr: NDArray[np.float64], target_fpr: float, convention: str
) -> float:
    if convention == "strictly_below":
        # fpr[0] == 0 < target, so the index set is never empty.
        return float(tpr[np.flatnonzero(fpr < target_fpr)[-1]])
    if convention == "closest":
        return float(tpr[int(np.argmin(np.abs(fpr - target_fpr)))])  # argmin -> first on ties
    raise ValueError(f"unknown convention {convention!r}; expected one of {_CONVENTIONS}")


def tpr_at_fpr(
    scores: ArrayLike,
    labels: ArrayLike,
    target_fpr: float,
    convention: Convention = "strictly_below",
) -> float:
    """TPR at a target FPR on the full (non-dropped) ROC curve.

    Conventions:
      * ``"strictly_below"``: TPR of the last ROC point with FPR < target (strict)
        -- Wen et al. 2024, "Detecting, Explaining, and Mitigating Memorization in
        Diffusion Models" (ICLR), evaluation notebook: ``tpr[np.where(fpr < t)[0][-1]]``.
      * ``"closest"``: TPR of the ROC point minimising |FPR - target|; on ties the
        first such point in ROC order (lowest FPR / highest threshold) wins, as
        ``np.argmin`` does -- Ren et al. 2024 (ECCV, cross-attention memorization)
        and SAIL evaluation code: ``tpr[np.argmin(np.abs(fpr - t))]``.

    Warns ``FewNegativesWarning`` if n_neg < 1/target_fpr.
    """
    _check_target(target_fpr)
    if convention not in _CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {_CONVENTIONS}")
    s, y = _validate(scores, labels)
    _warn_few_negatives(int(y.size - y.sum()), target_fpr)
    fpr, tpr, _ = _roc_arrays(s, y)
    return _tpr_from_curve(fpr, tpr, target_fpr, convention)


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    scores: ArrayLike,
    labels: ArrayLike,
    metric_fn: Callable[[NDArray[np.float64], NDArray[np.int64]], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified percentile bootstrap CI of ``metric_fn(scores, labels)``.

    Positives and negatives are resampled separately (class sizes fixed) with
    ``np.random.default_rng(seed)``; deterministic for a given seed.
    FewNegativesWarning is suppressed inside the resamples.
    """
    s, y = _validate(scores, labels)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    stats = np.empty(n_boot, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewNegativesWarning)
        for b in range(n_boot):
            idx = np.concatenate(
                [rng.choice(pos, size=pos.size), rng.choice(neg, size=neg.size)]
            )
            stats[b] = metric_fn(s[idx], y[idx])
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


# --------------------------------------------------------------------------- summary


def _tpr_strict_1pct(s: NDArray[np.float64], y: NDArray[np.int64]) -> float:
    fpr, tpr, _ = _roc_arrays(s, y)
    return _tpr_from_curve(fpr, tpr, 0.01, "strictly_below")


def detection_metrics(
    scores: ArrayLike, labels: ArrayLike, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """All detection columns for one method as a JSON-serialisable dict.

    Unsuffixed ``tpr_at_*`` columns use the "strictly_below" convention (recorded
    in ``tpr_convention``); ``*_closest`` columns use "closest".
    ``acc_best`` = max over thresholds of 1 - (FPR + (1 - TPR)) / 2 (Wen et al.).
    """
    s, y = _validate(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    for target in (0.01, 0.03):
        _warn_few_negatives(n_neg, target)
    fpr, tpr, _ = _roc_arrays(s, y)
    auc_low, auc_high = bootstrap_ci(s, y, roc_auc, n_boot=n_boot, seed=seed)
    tpr_low, tpr_high = bootstrap_ci(s, y, _tpr_strict_1pct, n_boot=n_boot, seed=seed)
    return {
        "auc": roc_auc(s, y),
        "auc_ci_low": auc_low,
        "auc_ci_high": auc_high,
        "tpr_at_1pct_fpr": _tpr_from_curve(fpr, tpr, 0.01, "strictly_below"),
        "tpr_at_1pct_fpr_closest": _tpr_from_curve(fpr, tpr, 0.01, "closest"),
        "tpr_at_3pct_fpr": _tpr_from_curve(fpr, tpr, 0.03, "strictly_below"),
        "tpr_at_3pct_fpr_closest": _tpr_from_curve(fpr, tpr, 0.03, "closest"),
        "tpr_at_1pct_ci_low": tpr_low,
        "tpr_at_1pct_ci_high": tpr_high,
        "acc_best": float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0)),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "tpr_convention": "strictly_below",
    }


def conformal_pvalues(ref_scores: ArrayLike, new_scores: ArrayLike) -> NDArray[np.float64]:
    """One-sided conformal p-values, p = (1 + #{ref >= s}) / (n_ref + 1).

    ``ref_scores`` are calibration scores from non-memorized prompts; a small p
    means ``s`` is unusually high (likely memorized). Values lie in (0, 1].
    """
    ref = _as_1d_float(ref_scores, "ref_scores")
    new = _as_1d_float(new_scores, "new_scores")
    if ref.size == 0:
        raise ValueError("ref_scores is empty; need at least one calibration score")
    ref_sorted = np.sort(ref)
    n_ge = ref.size - np.searchsorted(ref_sorted, new, side="left")
    return (1.0 + n_ge) / (ref.size + 1.0)


def similarity_summary(values: ArrayLike) -> dict[str, float | int]:
    """Summary (mean, median, p95, min, max, n) of a set of similarity values."""
    v = _as_1d_float(values, "values")
    if v.size == 0:
        raise ValueError("values is empty; cannot summarise zero similarities")
    return {
        "mean": float(np.mean(v)),
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "min": float(np.min(v)),
        "max": float(np.max(v)),
        "n": int(v.size),
    }
