"""A detector and a mitigator defined outside the diffmem repository (README: "Adding your own detector or mitigator")."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from bench.contracts import GenSpec, Mitigator
from bench.core.sampling import SampleResult, StepInfo, sample


@dataclass
class CondGap:
    """Cosine distance between the text-conditional and the unconditional noise prediction at the
    first DDIM step, averaged over n_gen generations. Higher = more memorized."""
    n_gen: int = 1
    total_steps: int = 50
    guidance: float = 7.5
    steps: int = 1                 # DDIM steps run per generation (recorded in the leaderboard)
    name: str = "cond_gap"

    def params(self) -> dict:
        return asdict(self)

    def score(self, model, prompts: list[str], *, seed: int) -> np.ndarray:
        gap = torch.zeros(len(prompts) * self.n_gen, dtype=torch.float64)

        def on_step(s: StepInfo) -> None:
            c, u = s.eps_text.float().flatten(1), s.eps_uncond.float().flatten(1)
            gap[s.sample_idx.cpu()] = (1 - torch.nn.functional.cosine_similarity(c, u, dim=1)).double().cpu()

        sample(model, prompts, [seed + j for j in range(self.n_gen)], steps=self.total_steps,
               guidance=self.guidance, on_step=on_step, stop_after=self.steps, decode=False)
        return gap.view(len(prompts), self.n_gen).mean(dim=1).numpy()


@dataclass
class AppendWords(Mitigator):
    """Prompt-side mitigation: append ``strength`` copies of a neutral word to every prompt."""
    word: str = "painting"
    name: ClassVar[str] = "append_words"
    strength_unit: ClassVar[str] = "words appended"

    def generate(self, model, prompts: list[str], seeds: list[int], spec: GenSpec, *, seed: int = 0) -> SampleResult:
        extra = " ".join([self.word] * int(self.strength))
        return sample(model, [f"{p} {extra}".strip() for p in prompts], seeds, steps=spec.steps,
                      guidance=spec.guidance, batch_size=spec.batch_size, decode=True)
