"""Asthana & Belagiannis (ICLR 2026): anisotropy of the guidance on pure noise (methods.md 8.7).

Denoising-free: every term is read on the initial noise x_T of generation j (seed ``seed + j``), with
the CFG batch (UNet on [x_T, x_T] with [e_prompt, e_empty]):

- norm term  N = || eps_c - eps_u ||_2 at t = T, the first DDIM timestep (981 on SD v1.4's 50-step
  schedule): the two halves of THE sampling loop's first CFG pass (``stop_after=1``; its DDIM update
  is discarded). L2 over the whole latent, eps units (public code, SD v1 branch).
- cosine term C at t_cos = ``timesteps[cos_step]`` of the ``total_steps`` DDIM schedule, default
  ``cos_step = -3`` (the public code's ``timesteps[-3]``: t = 41 on SD v1.4), evaluated on the SAME x_T
  (one extra CFG pass through the adapter). ``cos_pair`` picks the two vectors, named as in the public
  code's ``--mode``: "x,c|x" (default) = cos(eps_u, eps_c - eps_u) = cos(s_u, s_D) of the paper
  (score s = -eps/sigma_t: the sigma factors and signs cancel in a cosine); "x,x|c" = cos(eps_u, eps_c);
  "x|c,c|x" = cos(eps_c, eps_c - eps_u).
  ``cosine: channel`` (default, the public code): ``cosine_similarity(..., dim=1)`` i.e. a cosine over
  the latent channels at every pixel, then the mean over pixels; ``cosine: flat``: one cosine between
  the whole flattened latents (the formula as the paper / methods.md write it).
- per prompt: N and C are each averaged over the ``n_gen`` generations, then
  M = gamma_1 * N + gamma_2 * C (the public detect_eval.py; raw, unstandardised terms). Higher = memorized.

Weights (``gamma_mode``):
- ``fixed`` (default): ``gamma`` from the YAML; default (1, 2), the public code's SD v1.4 values (SD v2:
  (1, 0.1); public code says "fit by logistic regression on ~20 prompts").
- ``fit``: gamma = the raw-feature weights of a logistic regression (scikit-learn, on standardised [N, C],
  mapped back to raw units; the intercept is irrelevant to ranking) fitted on a labelled CALIBRATION split
  only, never on the evaluated prompts. Two ways to give the split:
  1. ``detector.calibration=/path/calib.jsonl`` (one JSON object a line: ``{"prompt": ..., "label": 0|1}``,
     optional ``"id"``): the detector fits on the first ``score`` call, e.g.
     ``diffmem detect detector=aniso_n1 detector.gamma_mode=fit detector.calibration=calib.jsonl``;
  2. in Python: ``det.fit(model, memorized=[...], reference=[...], seed=0)`` before ``score`` (the
     mitigators' ``fit`` signature). Calibration generations use seeds ``seed + j`` of the fit seed
     (``calibration_seed`` for the file route).
  ``score`` refuses prompts that are in the calibration split. ``params()`` records the split (ids, a
  sha256 per prompt and of the whole split, the file's sha256), the seed, the fitted gamma, intercept,
  scaler, training AUC and the weights sha256 of the model fitted on. Note: the runner writes
  ``params()`` to the manifest before the first ``score``; with route 1 the manifest holds the split,
  seed and file hash (gamma is a deterministic function of those and the model weights the manifest
  also records), not gamma itself. Route 3 puts gamma in the manifest:
- ``file``: ``det.save_fit("fit.json")`` after a fit, then ``detector.gamma_mode=file
  detector.gamma_file=fit.json``: the fitted weights and their whole provenance are loaded at
  construction (so ``params()`` is complete before scoring); a file fitted with other term options or
  on other model weights is refused; calibration prompts are refused as evaluated prompts.

Deviations recorded in ``params``: terms in float32 (public: bf16); the public SD v2 branch uses score
units (1/sigma_t^2 at t = T) for N and raw v outputs for C, the adapter here gives eps for every model;
the public code's optional L1 / L2 "normalization" of eps (default off) is not implemented.

Cost: 2 CFG passes per generation = 4 UNet rows per generation, 4 n per prompt (counted by the adapter).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines.detectors.sail_sharpness import encode_cfg
from bench.core.model import DiffusionModel
from bench.core.sampling import StepInfo, sample

COS_PAIRS = {"x,c|x": ("uncond", "delta"), "x,x|c": ("uncond", "cond"), "x|c,c|x": ("cond", "delta")}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_calibration(path: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(prompts, labels, ids) of a calibration JSONL file."""
    prompts, labels, ids = [], [], []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("prompt"), str) or row.get("label") not in (0, 1):
            raise ValueError(f"{path} line {i + 1}: need {{'prompt': str, 'label': 0 or 1}}, got {row!r}")
        prompts.append(row["prompt"])
        labels.append(int(row["label"]))
        ids.append(str(row.get("id", f"calib:{i}")))
    return prompts, labels, ids


@dataclass
class Anisotropy:
    n_gen: int = 1
    total_steps: int = 50          # DDIM schedule that t = T and t_cos are read from
    cos_step: int = -3             # index of t_cos in that schedule (public code: timesteps[-3])
    cosine: str = "channel"        # channel (public code) | flat (paper formula)
    cos_pair: str = "x,c|x"        # public --mode; "x,c|x" = cos(s_u, s_D)
    gamma: tuple = (1.0, 2.0)      # (gamma_norm, gamma_cos); SD v1.4 public values
    gamma_mode: str = "fixed"      # fixed | fit | file
    calibration: str | None = None  # labelled JSONL for gamma_mode=fit (the split; never the evaluated prompts)
    calibration_seed: int = 0      # seeds of the calibration generations (seed + j)
    gamma_file: str | None = None   # gamma_mode=file: a save_fit() JSON (fitted weights + provenance)
    guidance: float = 7.5          # unused by the score (the loop's DDIM update is discarded); kept for the record
    batch_size: int = 64
    name: str = "anisotropy"
    _fit: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.gamma = tuple(float(g) for g in self.gamma)
        problems = []
        if self.n_gen < 1:
            problems.append(f"n_gen must be >= 1, got {self.n_gen}")
        if len(self.gamma) != 2:
            problems.append(f"gamma must be two numbers (norm, cos), got {self.gamma}")
        if not -self.total_steps <= self.cos_step < self.total_steps:
            problems.append(f"cos_step={self.cos_step} must index a {self.total_steps}-step schedule")
        if self.cosine not in ("channel", "flat"):
            problems.append(f"cosine={self.cosine!r} must be 'channel' or 'flat'")
        if self.cos_pair not in COS_PAIRS:
            problems.append(f"cos_pair={self.cos_pair!r} must be one of {sorted(COS_PAIRS)}")
        if self.gamma_mode not in ("fixed", "fit", "file"):
            problems.append(f"gamma_mode={self.gamma_mode!r} must be 'fixed', 'fit' or 'file'")
        if self.gamma_mode == "file" and not self.gamma_file:
            problems.append("gamma_mode=file needs detector.gamma_file=/path/fit.json (written by save_fit)")
        if problems:
            raise ValueError("; ".join(problems))
        if self.gamma_mode == "file":
            self._load_gamma_file()

    # ------------------------------------------------------------------ record
    def params(self) -> dict:
        p = {k: v for k, v in asdict(self).items() if k != "_fit"}
        p.update(norm_term="||eps_c - eps_u||_2 on x_T at t = timesteps[0] (the loop's first step), eps units",
                 cos_term=f"{self.cosine} cosine of {self.cos_pair} on the same x_T at t = timesteps[{self.cos_step}]",
                 combine="M = gamma[0] * mean_j N + gamma[1] * mean_j C (raw terms)",
                 precision="float32 terms", unet_rows_per_gen=4,
                 seeds="seed + j for generation j (same for every prompt); public code: 42 for all",
                 deviations="public SD v2 branch: N in score units, C on raw v (here eps for every model); "
                            "public L1/L2 eps normalisation (off by default) not implemented")
        if self.gamma_mode != "fixed":
            p["gamma"] = None if self._fit is None else self._fit["gamma"]
            if self.calibration is not None:
                p["calibration_file_sha256"] = _sha(Path(self.calibration).read_text(encoding="utf-8"))
            if self.gamma_file is not None:
                p["gamma_file_sha256"] = _sha(Path(self.gamma_file).read_text(encoding="utf-8"))
            p["fit"] = (self._fit if self._fit is not None
                        else "pending: fitted on the calibration split at the first score")
        return p

    # ------------------------------------------------------------------ terms
    def timesteps(self, model: DiffusionModel) -> tuple[int, int]:
        """(t of the norm term, t of the cosine term)."""
        ts = model.timesteps(self.total_steps)
        return int(ts[0]), int(ts[self.cos_step])

    def _cos(self, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        vec = {"cond": eps_c, "uncond": eps_u, "delta": eps_c - eps_u}
        a, b = (vec[k] for k in COS_PAIRS[self.cos_pair])
        if self.cosine == "flat":
            return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
        return F.cosine_similarity(a, b, dim=1).flatten(1).mean(dim=1)

    def terms(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        """[n_prompts, n_gen, 2]: (norm term at t = T, cosine term at t_cos), both on x_T."""
        P, n = len(prompts), self.n_gen
        cond, uncond = encode_cfg(model, prompts)
        _, t_cos = self.timesteps(model)
        t_cos_dev = torch.tensor(t_cos, device=model.device)
        rows, values = [], []

        def on_step(s: StepInfo) -> None:
            b = s.x_t.shape[0]
            norm = (s.eps_text.float() - s.eps_uncond.float()).flatten(1).norm(dim=1)
            p = s.prompt_idx.to(cond.device)
            emb = torch.cat([cond[p], uncond.expand(b, -1, -1)])
            e = model.eps(torch.cat([s.x_t, s.x_t]), t_cos_dev, emb).float()
            rows.append(s.sample_idx)
            values.append(torch.stack([norm, self._cos(e[:b], e[b:])], dim=1))

        sample(model, prompts, [seed + j for j in range(n)], steps=self.total_steps, guidance=self.guidance,
               on_step=on_step, stop_after=1, batch_size=self.batch_size, decode=False,
               prompt_embeds=cond, uncond_embeds=uncond.expand(P, -1, -1))
        out = torch.zeros(P * n, 2, dtype=torch.float64)
        out[torch.cat(rows)] = torch.cat(values).double().cpu()
        return out.view(P, n, 2).numpy()

    # ------------------------------------------------------------------ weights
    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0,
            ids: list[str] | None = None, source: str | None = None) -> "Anisotropy":
        """Fit gamma by logistic regression on a labelled calibration split (memorized = 1, reference = 0)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        from bench.core.model import weights_sha256

        prompts = [*memorized, *reference]
        y = np.r_[np.ones(len(memorized)), np.zeros(len(reference))].astype(int)
        if not memorized or not reference:
            raise ValueError("fit needs at least one memorized and one reference calibration prompt")
        if len(set(prompts)) != len(prompts):
            raise ValueError("calibration prompts must be distinct")
        feats = self.terms(model, prompts, seed=seed).mean(axis=1)          # [N, 2]
        mu, sd = feats.mean(axis=0), feats.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        clf = LogisticRegression(random_state=seed, max_iter=1000).fit((feats - mu) / sd, y)
        w = clf.coef_[0] / sd
        ids = list(ids) if ids is not None else [f"{'mem' if v else 'ref'}:{i}" for i, v in enumerate(y)]
        rows = [{"id": i, "prompt_sha256": _sha(p), "label": int(v)} for i, p, v in zip(ids, prompts, y)]
        self._fit = {
            "gamma": [float(w[0]), float(w[1])],
            "intercept": float(clf.intercept_[0] - (clf.coef_[0] * mu / sd).sum()),
            "scaler_mean": mu.tolist(), "scaler_std": sd.tolist(),
            "model": "sklearn LogisticRegression(C=1.0, lbfgs) on standardised [norm, cos], mapped to raw units",
            "seed": int(seed), "n_memorized": len(memorized), "n_reference": len(reference),
            "split": rows, "split_sha256": _sha(json.dumps(rows, sort_keys=True)),
            "train_auc": float(roc_auc_score(y, feats @ w)), "source": source or "fit() call",
            "model_weights_sha256": weights_sha256(model)}
        return self

    def weights(self, model: DiffusionModel) -> np.ndarray:
        """The gamma in use (fitting on the calibration file first when ``gamma_mode=fit``)."""
        if self.gamma_mode == "fixed":
            return np.asarray(self.gamma, dtype=np.float64)
        if self._fit is None:
            if self.calibration is None:
                raise ValueError("gamma_mode=fit needs a calibration split: detector.calibration=/path/calib.jsonl "
                                 "(lines {'prompt': ..., 'label': 0|1}) or a det.fit(model, memorized=..., "
                                 "reference=..., seed=...) call before score")
            prompts, labels, ids = read_calibration(self.calibration)
            mem = [p for p, v in zip(prompts, labels) if v == 1]
            ref = [p for p, v in zip(prompts, labels) if v == 0]
            order = [i for v in (1, 0) for i, lab in enumerate(labels) if lab == v]
            self.fit(model, memorized=mem, reference=ref, seed=self.calibration_seed,
                     ids=[ids[i] for i in order], source=str(self.calibration))
        return np.asarray(self._fit["gamma"], dtype=np.float64)

    def save_fit(self, path: str | Path) -> Path:
        """Write the fitted weights with their provenance (for ``gamma_mode=file``)."""
        if self._fit is None:
            raise ValueError("nothing fitted yet: call fit(...) (or score with gamma_mode=fit) first")
        path = Path(path)
        path.write_text(json.dumps({"fit": self._fit, "terms": self._terms_config()}, indent=1, sort_keys=True))
        return path

    def _terms_config(self) -> dict:
        """What the fitted gamma's features depend on (a file fitted under others is refused)."""
        return {k: getattr(self, k) for k in ("n_gen", "total_steps", "cos_step", "cosine", "cos_pair")}

    def _load_gamma_file(self) -> None:
        data = json.loads(Path(self.gamma_file).read_text(encoding="utf-8"))
        if data.get("terms") != self._terms_config():
            raise ValueError(f"gamma_file {self.gamma_file} was fitted with terms {data.get('terms')}, this "
                             f"detector computes {self._terms_config()}: refit or match the options")
        self._fit = data["fit"]

    def _check_model(self, model: DiffusionModel) -> None:
        """gamma_mode=file: the weights were fitted on this model (checked once per model object)."""
        if self.gamma_mode != "file" or getattr(self, "_checked", None) == id(model):
            return
        from bench.core.model import weights_sha256
        if weights_sha256(model) != self._fit.get("model_weights_sha256"):
            raise ValueError(f"gamma_file {self.gamma_file} was fitted on other model weights "
                             f"({self._fit.get('model_weights_sha256')}); refit on this model")
        self._checked = id(model)

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        w = self.weights(model)
        if self.gamma_mode != "fixed":
            self._check_model(model)
            calib = {r["prompt_sha256"] for r in self._fit["split"]}
            leaked = [p for p in prompts if _sha(p) in calib]
            if leaked:
                raise ValueError(f"{len(leaked)} evaluated prompt(s) are in the calibration split (e.g. "
                                 f"{leaked[0][:60]!r}): gamma must be fitted on held-out prompts only")
        return self.terms(model, prompts, seed=seed).mean(axis=1) @ w
