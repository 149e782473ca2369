"""Wen et al.'s training-time mitigator: magnitude-based sample filtering (``wen_train_filter``, methods.md 1d).

For every training batch, at the same noisy inputs x_t and timesteps t the loss uses, one extra
UNet forward without gradient gives eps(x_t, e_empty); a sample counts in the loss only when
m = || eps(x_t, e_p) - eps(x_t, e_empty) ||_2 (over the flattened sample) < tau. If no sample of a
batch is kept the update is skipped (``bench.core.train.train`` does both). Cost: +1 UNet forward per batch.

Strength = 1 / tau (0 = tau infinite = plain fine-tuning). Wen uses tau = 2 on SD's 4x64x64 latents;
the organism's 3x16x16 pixel samples have their own scale, so tau is calibrated on the organism
(``noise_magnitudes``; ``tasks.studies.finetune_mitigate calibrate``): the distribution of m over ordinary
pairs and over duplicated (planted) pairs at random t ~ U{0..999} with fresh noise, exactly as the
training loop draws them, measured on the base organism (whose own planted pairs are memorized, the
analogue of the memorized pairs in Wen's LAION data) and on the plain fine-tune. The swept taus sit
between the upper quantiles of the ordinary distribution and the bulk of the memorized one
(recorded in ``conf/mitigator/train_filter.yaml`` and ``results/finetune_tau_calibration_<model>.json``).

Deviation (recorded): the organism's training loop applies 10% caption dropout (Wen's script has
none); dropped captions are encoded as "" so their m is ~0 and they are always kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from baselines.mitigators.train_time import FinetuneMitigator
from bench.core.model import DiffusionModel


def text_cond_magnitude(model: DiffusionModel, x_t: torch.Tensor, t: torch.Tensor, eps_text: torch.Tensor,
                        e_empty: torch.Tensor) -> torch.Tensor:
    """m per sample: || eps_text - eps(x_t, t, e_empty) ||_2 over the flattened sample, one no-grad forward."""
    with torch.no_grad():
        eps_u = model.eps(x_t, t, e_empty.expand(x_t.shape[0], *e_empty.shape[1:]))
    return (eps_text.detach().float() - eps_u.float()).flatten(1).norm(dim=1)


@dataclass
class MagnitudeFilterHook:
    """``TrainHook``: keep samples with m < tau. ``tracked``: group -> caption embeddings [k, L, D]
    whose samples are counted separately (kept share of the planted set vs the rest)."""
    model: DiffusionModel
    tau: float
    tracked: dict = field(default_factory=dict)
    record: bool = False                          # keep every batch's (m, keep) for tests
    seen: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"MagnitudeFilterHook: tau must be > 0, got {self.tau}")
        with torch.inference_mode():
            self.e_empty = self.model.encode([""]).clone()

    def groups(self, emb: torch.Tensor) -> list[str]:
        out = ["other"] * emb.shape[0]
        for g, e in self.tracked.items():
            d = (emb[:, None].float() - e[None].float().to(emb.device)).abs().flatten(2).amax(2)   # [B, k]
            for i in torch.nonzero((d < 1e-4).any(1)).flatten().tolist():
                out[i] = g
        return out

    def keep(self, model, x_t, t, emb, eps_pred) -> torch.Tensor:
        m = text_cond_magnitude(model, x_t, t, eps_pred, self.e_empty.to(x_t.dtype))
        keep = m < self.tau
        for g, k in zip(self.groups(emb), keep.tolist()):
            self.seen[g] = self.seen.get(g, 0) + 1
            self.kept[g] = self.kept.get(g, 0) + int(k)
        if self.record:
            self.history.append((m.clone(), keep.clone()))
        return keep

    def report(self) -> dict:
        return {"hook": "magnitude_filter", "tau": self.tau,
                "kept_share": {g: self.kept[g] / self.seen[g] for g in sorted(self.seen)},
                "seen": dict(sorted(self.seen.items()))}


def planted_embeddings(model: DiffusionModel, world) -> dict[str, torch.Tensor]:
    """Caption embeddings of the fine-tuning set's planted groups (FT_MV, FT_FG, ...)."""
    out = {}
    for g in sorted({g for g in world.pair_group if g != "ordinary"}):
        caps = sorted({c for c, gg in zip(world.captions, world.pair_group) if gg == g})
        with torch.inference_mode():
            out[g] = model.encode(caps).clone()
    return out


def noise_magnitudes(model: DiffusionModel, world, groups: dict[str, list[int]], n_per_group: int, *,
                     seed: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """m at random t ~ U{0..T-1} and fresh noise for ``n_per_group`` draws (with replacement, by pair
    weight) from each group of pair indices, drawn as the training loop draws them (no caption dropout)."""
    gen = torch.Generator().manual_seed(int(seed))
    sched = model.make_scheduler()
    acp = sched.alphas_cumprod.to(torch.float32)
    T = sched.config.num_train_timesteps
    with torch.inference_mode():
        e_empty = model.encode([""])
    out = {}
    for g, pairs in groups.items():
        if not pairs:
            raise ValueError(f"noise_magnitudes: group {g!r} has no pairs")
        w = torch.tensor([float(world.pair_weight[p]) for p in pairs], dtype=torch.float64)
        ms = []
        for b0 in range(0, n_per_group, batch_size):
            b = min(batch_size, n_per_group - b0)
            pick = [pairs[i] for i in torch.multinomial(w, b, replacement=True, generator=gen).tolist()]
            x0 = torch.from_numpy(world.images[[world.pair_image[p] for p in pick]]) * 2 - 1
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, T, (b,), generator=gen)
            a = acp[t].view(-1, 1, 1, 1)
            x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(model.device, model.dtype)
            with torch.inference_mode():
                emb = model.encode([world.captions[p] for p in pick])
                eps_c = model.eps(x_t, t.to(model.device), emb)
                ms.append(text_cond_magnitude(model, x_t, t.to(model.device), eps_c, e_empty).cpu().numpy())
        out[g] = np.concatenate(ms)
    return out


@dataclass
class TrainMagnitudeFilter(FinetuneMitigator):
    """Wen's ``--hard_threshold`` filter; strength = 1 / tau."""
    name: ClassVar[str] = "wen_train_filter"
    strength_unit: ClassVar[str] = "1/tau"

    @property
    def tau(self) -> float:
        return float("inf") if self.strength == 0 else 1.0 / self.strength

    def method(self) -> dict:
        return {"name": self.name, "tau": self.tau}

    def hooks(self, model, world) -> tuple:
        return (MagnitudeFilterHook(model, self.tau, tracked=planted_embeddings(model, world)),)
