"""GNI: Gaussian noise on the text embedding (Somepalli et al. 2023b, methods.md 3b).

e <- e + strength * N(0, I) on the encoder output, for the conditional AND the unconditional rows
(DCR's sd_mitigation.py noises the whole CFG embedding batch). strength = lambda (0 = the identity;
the DCR README uses 0.1 on SD, whose CLIP outputs have a larger scale than the organism's MiniLM, so
record the embedding scale beside it: ``params()['embedding_std']`` after a run). One noise draw per
prompt (shared by its seeds), from a generator keyed by (seed, crc32(prompt)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bench.contracts import GenSpec, Mitigator
from baselines.mitigators.prompt_augment import prompt_rng
from bench.core.model import DiffusionModel
from bench.core.sampling import SampleResult, sample


@dataclass
class GaussianNoiseInjection(Mitigator):
    strength: float = 0.1
    name: ClassVar[str] = "gni"
    strength_unit: ClassVar[str] = "lambda (embedding-noise std)"
    embedding_std: float | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"gni: strength (noise std) must be >= 0, got {self.strength}")

    def noisy_embeddings(self, model: DiffusionModel, prompts: list[str], *, seed: int):
        with torch.no_grad():          # not inference_mode: the noise is added in place below
            cond = model.encode(prompts).float()
            uncond = model.encode([""]).float().expand(len(prompts), -1, -1).clone()
        self.embedding_std = float(cond.std())
        if self.strength:
            for k, p in enumerate(prompts):
                g = torch.Generator().manual_seed(int(prompt_rng(seed, p).integers(0, 2**62)))
                noise = torch.randn((2, *cond.shape[1:]), generator=g)
                cond[k] += self.strength * noise[0].to(cond.device)
                uncond[k] += self.strength * noise[1].to(cond.device)
        return cond, uncond

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        cond, uncond = self.noisy_embeddings(model, prompts, seed=seed)
        if not self.strength:          # identity: exactly the plain path
            return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                          batch_size=spec.batch_size, decode=True)
        return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance, batch_size=spec.batch_size,
                      decode=True, prompt_embeds=cond, uncond_embeds=uncond)
