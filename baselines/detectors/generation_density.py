"""Carlini et al. (2023) generate-and-compare density, as a continuous score (methods.md 2b).

Generate ``n_gen`` full DDIM generations per prompt and measure how alike they are:
- space="pixel": Carlini's tiled L2 (normalised L2 on each tile of a 4x4 grid of non-overlapping
  tiles, max over tiles), a distance, so the score is its negation;
- space="sscd": cosine similarity of SSCD descriptors (Wen's second baseline).

The papers do not say how the n x n matrix becomes one score (methods.md 2b: unconfirmed). Default
``reduction="mean"``: mean over pairs i<j (methods.md's recommendation). Alternatives: "closest"
(the single most similar pair) and "count" (number of pairs closer than ``tau``, Carlini's graph
edges; ties broken by the mean). Higher = more memorized, whatever the reduction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from bench.measure.embed import cosine_matrix, get_embedder, tiled_l2
from bench.core.model import DiffusionModel
from bench.core.sampling import sample

REDUCTIONS = ("mean", "closest", "count")


@dataclass
class GenerationDensity:
    n_gen: int = 4
    space: str = "pixel"           # pixel | sscd
    reduction: str = "mean"
    tau: float = 0.1               # edge threshold for reduction="count" (tiled L2; SSCD: similarity)
    steps: int = 50
    guidance: float = 7.5
    grid: int = 4
    sscd_resize: int = 288
    batch_size: int = 256
    name: str = "generation_density"
    fuse: ClassVar[str] = "density"   # can share a fused sampling pass (bench.run.detect_fused)

    def __post_init__(self):
        if self.space not in ("pixel", "sscd"):
            raise ValueError(f"space must be 'pixel' or 'sscd', got {self.space!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.n_gen < 2:
            raise ValueError(f"n_gen must be >= 2 to compare generations, got {self.n_gen}")
        self._embedder = None

    def params(self) -> dict:
        p = {k: v for k, v in asdict(self).items()}
        p["similarity"] = "-tiled_l2 (4x4 grid, pixels in [0,1])" if self.space == "pixel" else \
            f"SSCD cosine (sscd_disc_mixup ONNX, bilinear resize to {self.sscd_resize})"
        return p

    def similarity(self, images: np.ndarray) -> np.ndarray:
        """[P, n, n] similarity among each prompt's ``n`` generations (higher = more alike);
        ``images`` is [P, n, 3, H, W] in [0, 1]."""
        P, n = images.shape[:2]
        if self.space == "pixel":
            return np.stack([-tiled_l2(im, im, grid=self.grid) for im in images])
        if self._embedder is None:
            self._embedder = get_embedder("sscd", resize=self.sscd_resize, progress=False)
        e = self._embedder.embed(images.reshape(P * n, *images.shape[2:])).reshape(P, n, -1)
        return np.stack([cosine_matrix(x, x) for x in e])

    def reduce(self, sim: np.ndarray) -> float:
        iu = np.triu_indices(sim.shape[0], k=1)
        pairs = sim[iu]
        if self.reduction == "mean":
            return float(pairs.mean())
        if self.reduction == "closest":
            return float(pairs.max())
        thr = -self.tau if self.space == "pixel" else self.tau
        return float((pairs >= thr).sum()) + float(pairs.mean()) * 1e-3

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        n = self.n_gen
        res = sample(model, prompts, [seed + j for j in range(n)], steps=self.steps, guidance=self.guidance,
                     batch_size=self.batch_size, decode=True)
        imgs = res.images.float().cpu().numpy().reshape(len(prompts), n, *res.images.shape[1:])
        return np.array([self.reduce(m) for m in self.similarity(imgs)])
