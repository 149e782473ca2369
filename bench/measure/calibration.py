"""Calibrated detection: conformal p-values from a saved, versioned set of reference scores.

A *calibration* is the detector scores of n reference prompts that are NOT memorized, scored by one
detector configuration on one model with one seed. A new prompt with score s gets the standard
one-sided split-conformal p-value (``bench.measure.metrics.conformal_pvalues``)

    p(s) = (1 + #{reference scores >= s}) / (n + 1),

and is flagged at a chosen false-positive rate alpha when p(s) <= alpha.

Finite-sample guarantee (split conformal; Vovk et al. 2005, Angelopoulos & Bates 2021): if the new
prompt is not memorized and is exchangeable with the reference prompts (drawn from the same
distribution), then P(p <= alpha) <= alpha for every n and every alpha, the probability taken over the
reference set and the new prompt together (marginal, not conditional on one calibration set). Without
ties it is also >= alpha - 1/(n + 1). The smallest p-value possible is 1/(n + 1), so a flag at alpha
needs n >= 1/alpha - 1 reference prompts (99 for alpha = 0.01); asking for less is refused. The
guarantee says nothing when the user's non-memorized prompts differ from the reference ones (another
style, language or length): calibrate on prompts that resemble the ones you screen.

Versioning: a calibration stores the detector id and every hyperparameter (``Detector.params()``),
``model.fingerprint()``, a sha256 of the model's weights (UNet and text encoder), the detector seed,
the reference prompt set's name and sha256, and the scores. ``check_matches`` refuses a calibration
made with another detector configuration, model or seed, naming every field that differs.
Deviation from a literal reading of "store model.fingerprint()": the fingerprint's ``path`` entry is
recorded but not compared (moving a model folder does not change its scores); the weights sha256 is
compared instead, which is stricter than the fingerprint alone (same architecture, other weights).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from bench.measure.metrics import conformal_pvalues
from bench.core.model import weights_sha256  # noqa: F401  (re-exported: calibrations key by it)

SCHEMA_VERSION = 1
NOT_COMPARED = ("path",)  # fingerprint entries recorded but not compared (see module docstring)


class CalibrationError(ValueError):
    """A calibration file is missing or malformed, or too small for the requested alpha."""


class CalibrationMismatchError(CalibrationError):
    """A calibration belongs to another detector configuration, model or seed."""


def prompts_sha256(prompts: list[str]) -> str:
    """Content hash of an ordered prompt list (the reference set of a calibration)."""
    blob = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def config_key(detector_id: str, detector_params: dict, model_fingerprint: dict, model_weights: str,
               seed: int) -> str:
    """What a calibration must match, hashed: names its file so each configuration has its own."""
    blob = json.dumps({"detector_id": detector_id, "detector_params": detector_params,
                       "model": {k: v for k, v in model_fingerprint.items() if k not in NOT_COMPARED},
                       "model_weights_sha256": model_weights, "seed": int(seed)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, sort_keys=True, default=str))


@dataclass(frozen=True)
class Calibration:
    detector_id: str
    detector_params: dict
    model_fingerprint: dict
    model_weights_sha256: str
    seed: int
    reference_name: str
    reference_sha256: str
    scores: tuple[float, ...]                  # reference scores, higher = more memorized
    created: str = ""
    git_sha: str = ""
    notes: dict = field(default_factory=dict)  # free-form provenance (e.g. the split used)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        s = np.asarray(self.scores, dtype=np.float64)
        if s.ndim != 1 or s.size == 0:
            raise CalibrationError(f"calibration for {self.detector_id!r} has no reference scores; "
                                   "score at least 1/alpha - 1 non-memorized prompts")
        if not np.isfinite(s).all():
            raise CalibrationError(f"calibration for {self.detector_id!r} holds "
                                   f"{int((~np.isfinite(s)).sum())} non-finite reference scores")
        object.__setattr__(self, "scores", tuple(float(x) for x in s))
        object.__setattr__(self, "detector_params", _jsonable(self.detector_params))
        object.__setattr__(self, "model_fingerprint", _jsonable(self.model_fingerprint))

    # ------------------------------------------------------------------ identity
    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def key(self) -> str:
        return config_key(self.detector_id, self.detector_params, self.model_fingerprint,
                          self.model_weights_sha256, self.seed)

    @property
    def min_pvalue(self) -> float:
        return 1.0 / (self.n + 1)

    def check_matches(self, *, detector_id: str, detector_params: dict, model_fingerprint: dict,
                      model_weights_sha256: str, seed: int, source: str = "calibration") -> None:
        """Raise CalibrationMismatchError naming every field where this calibration differs."""
        want = {"detector_id": detector_id, "seed": int(seed), "model_weights_sha256": model_weights_sha256,
                **{f"detector_params.{k}": v for k, v in _jsonable(detector_params).items()},
                **{f"model.{k}": v for k, v in _jsonable(model_fingerprint).items() if k not in NOT_COMPARED}}
        have = {"detector_id": self.detector_id, "seed": self.seed,
                "model_weights_sha256": self.model_weights_sha256,
                **{f"detector_params.{k}": v for k, v in self.detector_params.items()},
                **{f"model.{k}": v for k, v in self.model_fingerprint.items() if k not in NOT_COMPARED}}
        diffs = [f"{k}: calibration has {have.get(k, '<absent>')!r}, this run has {want.get(k, '<absent>')!r}"
                 for k in sorted(set(want) | set(have)) if have.get(k, "<absent>") != want.get(k, "<absent>")]
        if diffs:
            raise CalibrationMismatchError(
                f"{source} was made for another detector configuration or model, refusing to use it "
                f"({len(diffs)} difference(s)):\n  " + "\n  ".join(diffs[:12]) +
                "\nRecalibrate with the same model=/detector=/seed= overrides: "
                "`diffmem calibrate prompts=<non-memorized reference file> ...`")

    # ------------------------------------------------------------------ p-values and flags
    def pvalues(self, scores: ArrayLike) -> NDArray[np.float64]:
        return conformal_pvalues(np.asarray(self.scores), scores)

    def check_alpha(self, alpha: float) -> None:
        if not 0.0 < float(alpha) < 1.0:
            raise CalibrationError(f"alpha={alpha!r} must be in (0, 1), e.g. alpha=0.01")
        if self.min_pvalue > alpha:
            raise CalibrationError(
                f"the calibration has n={self.n} reference scores, so the smallest possible p-value is "
                f"1/(n+1) = {self.min_pvalue:.4g} > alpha={alpha:g}: nothing could ever be flagged. "
                f"Calibrate on at least {min_reference(alpha)} non-memorized prompts, or raise alpha")

    def flags(self, pvalues: ArrayLike, alpha: float) -> NDArray[np.bool_]:
        """p <= alpha (see the guarantee in the module docstring)."""
        self.check_alpha(alpha)
        return np.asarray(pvalues, dtype=np.float64) <= alpha

    def threshold(self, alpha: float) -> float:
        """The score a prompt must strictly exceed to be flagged at alpha (equivalent to p <= alpha)."""
        self.check_alpha(alpha)
        k = math.floor(alpha * (self.n + 1) + 1e-12) - 1   # flag iff #{ref >= s} <= k
        return float(np.sort(self.scores)[self.n - 1 - k])

    # ------------------------------------------------------------------ files
    @property
    def content_sha256(self) -> str:
        """Hash of everything stored (scores included): a file edited by hand is refused on load."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key, "n": self.n, "content_sha256": self.content_sha256}

    def save(self, path: str | Path) -> Path:
        from bench.core.atomic import atomic_write_json
        return atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path} (resolved: {path.resolve()}); "
                                   "create one with `diffmem calibrate prompts=<reference file>`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{path}: not a calibration file (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
            raise CalibrationError(f"{path}: schema_version {d.get('schema_version') if isinstance(d, dict) else None!r}"
                                   f" is not {SCHEMA_VERSION}; recalibrate with this version of diffmem")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(d) - {"created", "git_sha", "notes", "schema_version"})
        if missing:
            raise CalibrationError(f"{path}: missing field(s) {missing}; the file is truncated or not a calibration")
        cal = cls(**{k: v for k, v in d.items() if k in names})
        if d.get("key") != cal.key or d.get("content_sha256") != cal.content_sha256:
            raise CalibrationError(f"{path}: its stored key / content_sha256 do not match its content; "
                                   "the file was edited by hand or truncated: recalibrate")
        return cal


def min_reference(alpha: float) -> int:
    """Smallest n with 1/(n+1) <= alpha."""
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def default_path(calibration_dir: str | Path, model_name: str, detector_id: str, key: str) -> Path:
    return Path(calibration_dir) / f"{model_name}__{detector_id}__{key}.json"


def resolve(spec: str | None, calibration_dir: str | Path, model_name: str, detector_id: str,
            key: str) -> Path | None:
    """``calibration=`` -> file: "none" -> None (scores only), "auto" -> the file of this exact
    configuration in ``calibration_dir`` (a clear error listing other configurations' files if
    absent), anything else -> that path."""
    if spec is None or str(spec).lower() == "none":
        return None
    if str(spec) != "auto":
        return Path(spec)
    path = default_path(calibration_dir, model_name, detector_id, key)
    if path.is_file():
        return path
    others = sorted(p.name for p in Path(calibration_dir).glob(f"{glob.escape(model_name)}__{glob.escape(detector_id)}__*.json"))
    hint = (f" Calibrations of other configurations of {model_name}/{detector_id} exist: {others}"
            " (another seed, detector parameters or weights)." if others else "")
    raise CalibrationError(
        f"no calibration for model {model_name!r}, detector {detector_id!r} (key {key}) in "
        f"{calibration_dir}/.{hint} Create it with `diffmem calibrate prompts=<non-memorized reference "
        f"file>` and the same model=/detector=/seed= overrides, pass calibration=<file>, or pass "
        f"calibration=none for scores without p-values")


def calibrate(model, detector, detector_id: str, prompts: list[str], *, seed: int, reference_name: str,
              batch_prompts: int = 64, notes: dict | None = None, scores: ArrayLike | None = None,
              weights: str | None = None) -> Calibration:
    """Score ``prompts`` (non-memorized references) and build a Calibration.

    ``scores`` may be passed when they were already computed by this very detector, model and seed
    (as ``diffmem calibrate-check`` does); otherwise they are computed here in batches.
    """
    from bench.run.io import git_info

    if not prompts:
        raise CalibrationError("the reference prompt set is empty; pass non-memorized prompts")
    if scores is None:
        parts = [np.asarray(detector.score(model, prompts[i:i + batch_prompts], seed=seed), dtype=np.float64)
                 for i in range(0, len(prompts), batch_prompts)]
        scores = np.concatenate(parts)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(prompts),):
        raise CalibrationError(f"{scores.shape} scores for {len(prompts)} reference prompts")
    return Calibration(
        detector_id=detector_id, detector_params=detector.params(), model_fingerprint=model.fingerprint(),
        model_weights_sha256=weights or weights_sha256(model), seed=int(seed), reference_name=reference_name,
        reference_sha256=prompts_sha256(prompts), scores=tuple(scores.tolist()),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), git_sha=git_info()["git_sha"], notes=notes or {})


def binomial_interval(m: int, alpha: float, level: float = 0.99) -> tuple[int, int]:
    """Central ``level`` interval of Binomial(m, alpha): the flag count expected from m held-out
    non-memorized prompts if each were flagged independently with probability alpha."""
    from scipy.stats import binom

    tail = (1.0 - level) / 2.0
    return int(binom.ppf(tail, m, alpha)), int(binom.ppf(1.0 - tail, m, alpha))


def heldout_check(cal: Calibration, heldout_scores: ArrayLike, alphas=(0.01, 0.05),
                  positive_scores: ArrayLike | None = None, level: float = 0.99) -> list[dict]:
    """Flag rate of held-out non-memorized prompts (and of memorized ones, if given) per alpha.

    ``flags_in_interval`` says whether the held-out flag count lies in the central ``level`` interval
    of Binomial(m, alpha) (validity: not more false flags than alpha allows, nor far fewer).
    """
    p_neg = cal.pvalues(heldout_scores)
    p_pos = None if positive_scores is None else cal.pvalues(positive_scores)
    rows = []
    for a in alphas:
        flags = cal.flags(p_neg, a)
        lo, hi = binomial_interval(flags.size, a, level)
        row = {"alpha": a, "n_calibration": cal.n, "n_heldout": int(flags.size),
               "heldout_flags": int(flags.sum()), "heldout_flag_rate": float(flags.mean()),
               "binomial_low": lo, "binomial_high": hi, "interval_level": level,
               "flags_in_interval": bool(lo <= flags.sum() <= hi), "threshold_score": cal.threshold(a)}
        if p_pos is not None:
            row.update({"n_memorized": int(p_pos.size), "memorized_flag_rate": float(cal.flags(p_pos, a).mean())})
        rows.append(row)
    return rows


def repeated_splits(neg_scores: ArrayLike, alphas=(0.01, 0.05), repeats: int = 1000, seed: int = 0,
                    level: float = 0.99) -> list[dict]:
    """The guarantee is marginal over the calibration draw: re-split ``neg_scores`` (non-memorized)
    into halves ``repeats`` times and average the held-out flag rate (expected <= alpha; without ties
    exactly floor(alpha (n+1)) / (n+1)), beside its spread over splits."""
    s = np.asarray(neg_scores, dtype=np.float64)
    rng, half = np.random.default_rng(seed), s.size // 2
    rates = {a: np.empty(repeats) for a in alphas}
    inside = {a: 0 for a in alphas}
    bounds = {a: binomial_interval(s.size - half, a, level) for a in alphas}
    for r in range(repeats):
        perm = rng.permutation(s.size)
        p = conformal_pvalues(s[perm[:half]], s[perm[half:]])
        for a in alphas:
            k = int((p <= a).sum())
            rates[a][r] = k / p.size
            inside[a] += bounds[a][0] <= k <= bounds[a][1]
    return [{"alpha": a, "repeats": repeats, "n_calibration": half, "n_heldout": s.size - half,
             "mean_flag_rate": float(rates[a].mean()),
             "expected_without_ties": math.floor(a * (half + 1) + 1e-12) / (half + 1),
             "p05_flag_rate": float(np.quantile(rates[a], 0.05)), "p95_flag_rate": float(np.quantile(rates[a], 0.95)),
             "share_of_splits_in_interval": inside[a] / repeats} for a in alphas]
