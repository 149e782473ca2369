"""NeMo's memorization-strength signal: first-step noise differences compared by MS-SSIM.

methods.md section 5b. For a prompt embedding e_p and initial noise x_T (n latents drawn as ONE batch
from ONE generator, as NeMo does), the noise difference is

    delta(x_T) = eps(x_T, t, e_p) - x_T       (conditional prediction only, no CFG)

min-max normalised per sample and per channel over the spatial map. NeMo's repo quirk is kept: its
loop leaves at step index 1 without ever updating the latents, so delta uses x_T but the SECOND
timestep of the 50-step schedule (t = 961 for SD, not 981). Two delta maps are compared by multi-scale
SSIM (torchmetrics' formulation: Gaussian window, reflect padding cropped back, relu-normalised
contrast/structure terms, 2x average pooling between scales) with kernel 11, sigma 1.5, 3 scales,
betas (0.33, 0.33, 0.33), data range 1.

Deviation (small images): MS-SSIM with kernel k and s scales needs maps larger than (k-1)*2^(s-1)
pixels (40 for NeMo's setting); the organism's maps are 16x16. ``SignalConfig.kernel_for`` then uses
the largest odd kernel that fits (3 at 16 px) with sigma scaled by k/11; the value used is recorded by
the caller (``NeMo.params()``, localisation rows). torchmetrics itself is not a dependency; this file
re-implements its MS-SSIM (checked against the formula, see tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.core.model import DiffusionModel

NEMO_KERNEL = 11
NEMO_SIGMA = 1.5


@dataclass(frozen=True)
class SignalConfig:
    n_seeds: int = 10               # latents per prompt, one batch from one generator (NeMo: 10)
    generator_seed: int = 1         # NeMo: seed 1
    schedule_steps: int = 50        # the DDIM schedule whose timestep index ``step_index`` is used
    step_index: int = 1             # repo quirk: second timestep (t = 961 on SD), see module doc
    kernel_size: int = NEMO_KERNEL  # requested; shrunk for small maps by ``kernel_for`` (recorded)
    sigma: float = NEMO_SIGMA
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)

    def kernel_for(self, size_px: int) -> tuple[int, float]:
        """(kernel, sigma) used for ``size_px`` maps: the requested kernel when it fits, else the
        largest odd kernel > 1 that does, sigma scaled by kernel / requested kernel."""
        scale = 2 ** (len(self.betas) - 1)
        k = self.kernel_size
        while k > 1 and (k - 1) * scale >= size_px:
            k -= 2
        if k < 3:
            raise ValueError(f"maps of {size_px} px are too small for {len(self.betas)}-scale MS-SSIM "
                             f"(needs > {2 * scale} px even with kernel 3); use fewer betas (scales)")
        return k, self.sigma * k / self.kernel_size


def initial_noise(model: DiffusionModel, cfg: SignalConfig) -> torch.Tensor:
    """[n_seeds, *latent] x_T as one batch from one generator seeded ``cfg.generator_seed``."""
    g = torch.Generator().manual_seed(int(cfg.generator_seed))
    x = torch.randn((cfg.n_seeds, *model.latent_shape), generator=g)
    return x.to(model.device, model.dtype)


def signal_timestep(model: DiffusionModel, cfg: SignalConfig) -> int:
    ts = model.timesteps(cfg.schedule_steps)
    if not 0 <= cfg.step_index < len(ts):
        raise ValueError(f"step_index={cfg.step_index} is outside the {len(ts)}-step schedule")
    return int(ts[cfg.step_index])


@torch.inference_mode()
def noise_diff(model: DiffusionModel, emb: torch.Tensor, x_T: torch.Tensor, t: int) -> torch.Tensor:
    """Min-max normalised delta = eps(x_T, t, e_p) - x_T for one prompt embedding emb [1, L, D]."""
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise ValueError(f"emb must be one prompt's embedding [1, L, D], got {tuple(emb.shape)}")
    d = (model.eps(x_T, t, emb.expand(x_T.shape[0], -1, -1)) - x_T).float()
    lo = d.amin(dim=(-2, -1), keepdim=True)
    hi = d.amax(dim=(-2, -1), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-12)


def _gauss(kernel: int, sigma: float, channels: int, device) -> torch.Tensor:
    r = torch.arange(kernel, dtype=torch.float64, device=device) - (kernel - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, kernel, kernel).contiguous()


def _ssim_cs(a: torch.Tensor, b: torch.Tensor, kernel: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image SSIM and contrast-structure terms (mean over the valid region), data range 1."""
    c = a.shape[1]
    w = _gauss(kernel, sigma, c, a.device)
    pad = (kernel - 1) // 2
    stack = torch.cat([a, b, a * a, b * b, a * b])
    out = F.conv2d(F.pad(stack, (pad,) * 4, mode="reflect"), w, groups=c)
    n = a.shape[0]
    mu_a, mu_b, e_aa, e_bb, e_ab = out.split(n)
    var_a, var_b, cov = e_aa - mu_a ** 2, e_bb - mu_b ** 2, e_ab - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    ssim = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * cs
    crop = (slice(None), slice(None), slice(pad, -pad or None), slice(pad, -pad or None))
    return ssim[crop].flatten(1).mean(1), cs[crop].flatten(1).mean(1)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, cfg: SignalConfig = SignalConfig()) -> torch.Tensor:
    """MS-SSIM per image pair: a, b [N, C, H, W] in [0, 1] -> [N]."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ms_ssim needs two [N, C, H, W] tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    kernel, sigma = cfg.kernel_for(min(a.shape[-2:]))
    a, b = a.float(), b.float()
    terms = []
    for j in range(len(cfg.betas)):
        s, cs = _ssim_cs(a, b, kernel, sigma)
        terms.append(torch.relu(s if j == len(cfg.betas) - 1 else cs))
        if j < len(cfg.betas) - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    betas = torch.tensor(cfg.betas, device=a.device).unsqueeze(1)
    return torch.prod(torch.stack(terms) ** betas, dim=0)


def pairwise_max_ssim(d: torch.Tensor, cfg: SignalConfig = SignalConfig()) -> torch.Tensor:
    """For each of n delta maps, its max MS-SSIM to the other n-1 maps -> [n]."""
    n = d.shape[0]
    if n < 2:
        raise ValueError("pairwise SSIM needs at least 2 seeds (SignalConfig.n_seeds >= 2)")
    i, j = torch.triu_indices(n, n, 1)
    s = ms_ssim(d[i], d[j], cfg)
    m = torch.full((n, n), -torch.inf)
    m[i, j] = s
    m[j, i] = s
    return m.max(1).values
