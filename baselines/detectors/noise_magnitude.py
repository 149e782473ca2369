"""Wen et al. (ICLR 2024): magnitude of the text-conditional noise prediction (methods.md 1a).

d_t^(j) = || eps(x_t^(j), e_p) - eps(x_t^(j), e_empty) ||_2 over the whole latent of generation j,
read from the two halves of the ordinary CFG batch at each of the first ``steps`` DDIM steps (early
exit: a k-step configuration runs only k steps). Score = mean over the steps of the mean over the
``n_gen`` generations, exactly the repo's aggregation order. Higher = more memorized.

Protocol choice (recorded in ``params``): generation j of every prompt starts from seed ``seed + j``
(Wen's repo seeds prompt i with ``i + gen_seed``), so a prompt's score does not depend on its position
in the prompt file. The norm is the L2 norm over the whole latent, not a per-element mean.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from bench.core.model import DiffusionModel
from bench.core.sampling import StepInfo, sample


def check_grid(n_gen: int, steps: int, total_steps: int) -> None:
    """The (n, k) grid point must exist: 1 <= k <= total_steps and n >= 1."""
    if not 1 <= steps <= total_steps:
        raise ValueError(f"steps={steps} must be in 1..total_steps={total_steps}")
    if n_gen < 1:
        raise ValueError(f"n_gen must be >= 1, got {n_gen}")


@dataclass
class NoiseMagnitude:
    n_gen: int = 1
    steps: int = 1                 # first k denoising steps averaged (k <= total_steps)
    total_steps: int = 50          # DDIM schedule length the k steps belong to
    guidance: float = 7.5
    batch_size: int = 256          # samples per UNet call (each carries a cond and an uncond row)
    name: str = "noise_magnitude"
    fuse: ClassVar[str] = "noise"   # can share a fused sampling pass (bench.run.detect_fused)

    def __post_init__(self):
        check_grid(self.n_gen, self.steps, self.total_steps)

    def params(self) -> dict:
        return {**asdict(self), "norm": "L2 over the whole latent", "aggregation": "mean over gens, then steps",
                "seeds": "seed + j for generation j (same for every prompt)"}

    def per_step_norms(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        """[n_prompts, n_gen, steps] of ||eps_c - eps_u||_2."""
        P, n = len(prompts), self.n_gen
        norms = torch.zeros(P * n, self.steps, dtype=torch.float64)
        rows, steps, values = [], [], []    # norms stay on the device until the end: one host copy

        def on_step(s: StepInfo) -> None:
            rows.append(s.sample_idx)
            steps.append(s.i)
            values.append((s.eps_text.float() - s.eps_uncond.float()).flatten(1).norm(dim=1))

        sample(model, prompts, [seed + j for j in range(n)], steps=self.total_steps, guidance=self.guidance,
               on_step=on_step, stop_after=self.steps, batch_size=self.batch_size, decode=False)
        flat = torch.cat(values).double().cpu()
        norms[torch.cat(rows), torch.tensor(steps).repeat_interleave(torch.tensor([len(r) for r in rows]))] = flat
        return norms.view(P, n, self.steps).numpy()

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        return self.per_step_norms(model, prompts, seed=seed).mean(axis=1).mean(axis=1)
