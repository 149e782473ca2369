"""Wen et al.'s noise magnitude computed the way the public reference code does (methods.md 1a).

This is the speed benchmark's "naive" baseline and a second, independent implementation of the score
``baselines/detectors/noise_magnitude.py`` computes (``tests/test_speed.py`` checks they agree). It is
written here from methods.md 1a's description of the reference pipeline, not copied from it:

- one prompt per pipeline call, ``num_images_per_prompt = n_gen``; the prompt and the negative prompt
  "" are encoded by two separate text-encoder calls (the pipeline's ``encode_prompt``);
- every one of the ``total_steps`` DDIM steps is run (the repo never exits early), the CFG batch
  ordered [uncond; cond] as in diffusers' pipelines, x_{t-1} = DDIM(eps_u + w (eps_c - eps_u), x_t);
- at every step ||eps_c - eps_u||_2 and ||eps_u||_2 of each generation are read to the host one
  sample at a time with ``.item()`` (the repo's ``track_noise_norm``), a host synchronisation each;
- the final latents are decoded to images (the pipeline's output), although the score ignores them;
- the score is computed afterwards from the recorded norms: mean over the generations, then over the
  first ``steps`` steps.

Deviation from the repo (recorded in ``params``): generation j of every prompt starts from seed
``seed + j`` like ``NoiseMagnitude``, not from ``prompt_index + gen_seed``, so both implementations
see the same x_T and must give the same scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from baselines.detectors.noise_magnitude import check_grid
from bench.core.model import DiffusionModel


@dataclass
class NoiseMagnitudeNaive:
    n_gen: int = 1
    steps: int = 1                 # first k steps averaged into the score (all total_steps always run)
    total_steps: int = 50
    guidance: float = 7.5
    decode: bool = True            # decode the final latents, as the pipeline does
    name: str = "noise_magnitude_naive"

    def __post_init__(self):
        check_grid(self.n_gen, self.steps, self.total_steps)

    def params(self) -> dict:
        return {**asdict(self), "norm": "L2 over the whole latent", "aggregation": "mean over gens, then steps",
                "seeds": "seed + j for generation j (repo: prompt_index + gen_seed)",
                "protocol": "one prompt per call, all total_steps run, .item() per sample per step, decode"}

    def generate(self, model: DiffusionModel, prompt: str, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One pipeline call: ([n_gen, total_steps] text-conditional norms, same for ||eps_u||)."""
        n = self.n_gen
        text_norm = [[0.0] * self.total_steps for _ in range(n)]
        uncond_norm = [[0.0] * self.total_steps for _ in range(n)]
        with torch.no_grad():
            cond = model.encode([prompt])                      # encode_prompt: prompt ...
            uncond = model.encode([""])                        # ... and negative prompt, separately
            emb = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
            scheduler = model.make_scheduler()
            scheduler.set_timesteps(self.total_steps)
            x = model.init_latents([seed + j for j in range(n)])
            for i, t in enumerate(scheduler.timesteps):
                eps_u, eps_c = model.eps(torch.cat([x, x]), t, emb).chunk(2)
                for j in range(n):                             # track_noise_norm: .item() per sample
                    text_norm[j][i] = (eps_c[j].float() - eps_u[j].float()).norm(p=2).item()
                    uncond_norm[j][i] = eps_u[j].float().norm(p=2).item()
                x = scheduler.step(eps_u + self.guidance * (eps_c - eps_u), t, x, eta=0.0,
                                   return_dict=False)[0]
            if self.decode:
                model.decode(x)
        return np.array(text_norm), np.array(uncond_norm)

    def per_step_norms(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        """[n_prompts, n_gen, total_steps] of ||eps_c - eps_u||_2, one prompt at a time."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings")
        return np.stack([self.generate(model, p, seed=seed)[0] for p in prompts])

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        norms = self.per_step_norms(model, prompts, seed=seed)
        return norms[:, :, :self.steps].mean(axis=1).mean(axis=1)
