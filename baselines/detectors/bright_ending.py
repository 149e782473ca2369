"""Chen et al. (ICLR 2025): Bright Ending (BE) attention as a mask on Wen's statistic (methods.md 8.2).

Pass 1 (full sampling, ``total_steps``): at the LAST step, a recording attention processor
(``baselines.detectors.cross_attention``, installed and restored through ``bench.core.patching``) reads
the conditional rows' cross-attention maps of the highest-resolution down-block cross-attention layers
(the first down block that has cross-attention: SD v1/v2 ``down_blocks.0``, 2 layers, 64 x 64 queries;
the organism ``down_blocks.2``, its only down block with cross-attention, 1 layer at 4 x 4 queries),
averages them over heads and then over
those layers, and takes the column of the end token (eos = number of tokenizer ids incl. start and end
- 1, capped at max_length - 1; Chen's ``len(tokenizer.encode(p)) - 1``): a soft mask m in (0, 1) per
generation on the layer's query grid (h x w), not thresholded.

Latent-resolution mapping: when the query grid is smaller than the latent grid H x W (the organism:
4 x 4 queries for a 16 x 16 latent), m is upsampled to H x W by bilinear interpolation
(``torch.nn.functional.interpolate``, ``align_corners=False``); a larger grid would be reduced by area
averaging; SD's 64 x 64 maps equal its latent grid and are used as they are. The mask is broadcast over
the latent channels.

Pass 2 (same seeds, so the same trajectory): Wen's statistic through the mask,
BE_t^(j) = || m^(j) * (eps_c - eps_u) ||_2 / mean(m^(j)), mean over the H x W grid; L2 over the whole
latent as in ``noise_magnitude``. Score = mean over the first ``steps`` steps of the mean over the
``n_gen`` generations (Wen's order). With a constant mask BE equals Wen's statistic exactly (the
division by mean(m) cancels the constant). Higher = more memorized.

``masks`` exposes the per-prompt, per-generation masks (latent grid, or the native attention grid) for
localisation benchmarks. Cost in UNet evaluations per prompt: 2 * n_gen * (total_steps + steps).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from baselines.detectors.cross_attention import StepGate, down_block_top_layers, eos_index, grid_of, recording
from bench.core.model import DiffusionModel
from bench.core.sampling import StepInfo, sample

MASK_MAPPING = ("query grid h x w -> latent grid H x W: bilinear upsampling (align_corners=False) when "
                "smaller, area averaging when larger, identity when equal; broadcast over latent channels")


def _check(n_gen: int, steps: int, total_steps: int) -> None:
    if n_gen < 1:
        raise ValueError(f"n_gen must be >= 1, got {n_gen}")
    if not 1 <= steps <= total_steps:
        raise ValueError(f"steps={steps} must be in 1..total_steps={total_steps}")


def to_latent_grid(m: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[b, h, w] masks -> [b, H, W] on the latent grid (the documented mapping)."""
    H, W = latent_hw
    if tuple(m.shape[-2:]) == (H, W):
        return m
    mode = "bilinear" if m.shape[-2] <= H and m.shape[-1] <= W else "area"
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(m[:, None], size=(H, W), mode=mode, **kw)[:, 0]


@dataclass
class BrightEnding:
    n_gen: int = 1
    steps: int = 50                  # pass 2: first k steps averaged (Chen: all 50)
    total_steps: int = 50            # DDIM schedule length; pass 1 always runs all of it
    guidance: float = 7.5
    batch_size: int = 64             # samples per UNet call (each carries a cond and an uncond row)
    name: str = "bright_ending"

    def __post_init__(self):
        _check(self.n_gen, self.steps, self.total_steps)

    def params(self) -> dict:
        return {**asdict(self), "mask": ("conditional cross-attention of the first down block with cross-"
                                         "attention, last step, mean over heads then layers, end-token column, "
                                         "soft (not thresholded)"),
                "mask_mapping": MASK_MAPPING, "eos": "tokenizer ids incl. start and end - 1 (capped)",
                "statistic": "||m * (eps_c - eps_u)||_2 / mean(m) over the whole latent",
                "aggregation": "mean over gens, then steps", "passes": 2,
                "seeds": "seed + j for generation j (same for every prompt, both passes)"}

    # ------------------------------------------------------------------ pass 1
    def masks(self, model: DiffusionModel, prompts: list[str], *, seed: int, native: bool = False) -> np.ndarray:
        """BE masks [P, n_gen, H, W] float32 on the latent grid (``native=True``: [P, n_gen, h, w] on
        the attention layers' query grid), from a full sampling pass."""
        m = self._masks(model, prompts, seed=seed, native=native)
        return m.view(len(prompts), self.n_gen, *m.shape[-2:]).cpu().numpy()

    def _masks(self, model: DiffusionModel, prompts: list[str], *, seed: int, native: bool = False) -> torch.Tensor:
        P, n, T = len(prompts), self.n_gen, self.total_steps
        layers = down_block_top_layers(model.unet)
        latent_hw = tuple(model.latent_shape[-2:])
        eos = torch.tensor(eos_index(model, prompts), device=model.device)
        rows, cols = [], []
        with recording(model, layers, maps=set(layers)) as rec:
            gate = StepGate(rec, {T - 1}, T)

            def on_step(s: StepInfo) -> None:
                if rec.active:
                    amap = torch.stack([rec.maps[n] for n in layers]).mean(0)           # [b, N, L]
                    e = eos[s.prompt_idx.to(amap.device)]
                    rows.append(s.sample_idx)
                    cols.append(amap[torch.arange(amap.shape[0], device=amap.device), :, e])   # [b, N]
                gate.after(s.i)

            sample(model, prompts, [seed + j for j in range(n)], steps=T, guidance=self.guidance,
                   on_step=on_step, batch_size=self.batch_size, decode=False)
        col = torch.cat(cols)
        h, w = grid_of(col.shape[-1], latent_hw)
        out = torch.empty((P * n, h, w), dtype=torch.float32, device=col.device)
        out[torch.cat(rows).to(col.device)] = col.view(-1, h, w)
        return out if native else to_latent_grid(out, latent_hw)

    # ------------------------------------------------------------------ pass 2
    def masked_norms(self, model: DiffusionModel, prompts: list[str], masks, *, seed: int) -> np.ndarray:
        """[P, n_gen, steps] of ||m * (eps_c - eps_u)||_2 / mean(m); ``masks`` [P, n_gen, H, W] or
        [P * n_gen, H, W] on the latent grid (prompts x generations row-major)."""
        P, n = len(prompts), self.n_gen
        m = torch.as_tensor(masks, dtype=torch.float32)
        m = m.reshape(P * n, *m.shape[-2:]).to(model.device)
        if tuple(m.shape[-2:]) != tuple(model.latent_shape[-2:]):
            raise ValueError(f"masks are {tuple(m.shape[-2:])}, the latent grid is {tuple(model.latent_shape[-2:])}")
        mean = m.mean(dim=(1, 2))
        if not bool((mean > 0).all()):
            raise ValueError("every mask needs a positive mean")
        norms = torch.zeros(P * n, self.steps, dtype=torch.float64)
        rows, steps, values = [], [], []

        def on_step(s: StepInfo) -> None:
            idx = s.sample_idx.to(m.device)
            d = (s.eps_text.float() - s.eps_uncond.float()) * m[idx][:, None]
            rows.append(s.sample_idx)
            steps.append(s.i)
            values.append(d.flatten(1).norm(dim=1) / mean[idx])

        sample(model, prompts, [seed + j for j in range(n)], steps=self.total_steps, guidance=self.guidance,
               on_step=on_step, stop_after=self.steps, batch_size=self.batch_size, decode=False)
        t = torch.tensor(steps).repeat_interleave(torch.tensor([len(r) for r in rows]))
        norms[torch.cat(rows), t] = torch.cat(values).double().cpu()
        return norms.view(P, n, self.steps).numpy()

    def score(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> np.ndarray:
        m = self._masks(model, prompts, seed=seed)
        return self.masked_norms(model, prompts, m, seed=seed).mean(axis=1).mean(axis=1)
