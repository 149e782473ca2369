"""The mitigator contract shared by every registry entry.

A mitigator is a small dataclass with a ``strength`` knob (0 = the identity, ``none``'s only value)
and one method, ``generate(model, prompts, seeds, spec)``, that returns images generated under the
mitigation through THE sampling loop (``bench.sampling.sample``). Prompt-side methods rewrite
prompts or embeddings before sampling; model-side methods patch the UNet only through
``bench.patching`` so the model is restored exactly, also on error. ``fit`` precomputes what a
method needs from the model (activation statistics, masks) before the timed generations; its cost is
measured by the runner and reported separately. The runner, not the method, measures wall time and
UNet rows, and scores CLIP against the ORIGINAL prompt.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from bench.model import DiffusionModel
from bench.sampling import SampleResult, sample


@dataclass
class GenSpec:
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 64


@dataclass
class Mitigator:
    strength: float = 0.0
    name: ClassVar[str] = "none"
    strength_unit: ClassVar[str] = "-"

    def params(self) -> dict:
        return {"name": self.name, "strength_unit": self.strength_unit, **asdict(self)}

    def fit(self, model: DiffusionModel, *, memorized: list[str], reference: list[str], seed: int = 0) -> None:
        """Precompute model-side state (no-op for prompt-side methods)."""

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        """Images for every (prompt, seed), prompts x seeds row-major, decoded to [0, 1]."""
        return sample(model, prompts, seeds, steps=spec.steps, guidance=spec.guidance,
                      batch_size=spec.batch_size, decode=True)


@dataclass
class NoMitigation(Mitigator):
    name: ClassVar[str] = "none"
