"""MS-SSIM for small images, pairwise and all-pairs (the FB-Mem similarity, methods.md 7b).

The FB-Mem release scores with torchmetrics' ``MultiScaleStructuralSimilarityIndexMeasure`` at its
defaults (5 scales, Gaussian window 11 px, sigma 1.5, Wang et al.'s scale weights, ``relu``
normalisation, "valid" maps) on 512 px images. That configuration needs images larger than
(11 - 1) * 2**4 = 160 px; the organism's images are 16 px. ``MSSSIMConfig()`` is the documented
small-image window used instead (deviation, recorded in every FB-Mem result via ``asdict``):

- 3 scales (16, 8, 4 px for a 16 px image; 2x2 average pooling between scales, as torchmetrics);
- Gaussian window of 5 taps, sigma 1.0 (Wang's 11 taps / sigma 1.5 spans +-3.3 sigma; 5 taps at
  sigma 1.0 span +-2 sigma and still fit a 4 px scale);
- "same"-size maps with reflect padding averaged over every pixel, instead of the valid maps that
  torchmetrics keeps (a valid 5-tap map of a 4 px scale would be empty);
- scale weights: Wang's first three (0.0448, 0.2856, 0.3001) renormalised to sum to 1;
- C1 = (0.01 L)^2, C2 = (0.03 L)^2 with data range L = 1 (images in [0, 1]); population
  (not sample) covariances, as Wang et al. and torchmetrics; ``relu`` of the per-scale means
  before the weighted product, as torchmetrics' default.

The Gaussian filter with reflect padding is a linear map, applied as one matrix product with the
precomputed ``[H*W, H*W]`` operator ``kron(A_h, A_w).T``; per-image moments are computed once and
each image pair only costs its cross moment (float32 moments, float64 scale products). ``ssim_map`` (one scale, full map) is checked against scikit-image in the
tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class MSSSIMConfig:
    scales: int = 3
    kernel_size: int = 5
    sigma: float = 1.0
    data_range: float = 1.0
    k1: float = 0.01
    k2: float = 0.03

    def __post_init__(self) -> None:
        if not 1 <= self.scales <= len(WANG_BETAS):
            raise ValueError(f"MSSSIMConfig.scales must be in 1..{len(WANG_BETAS)}, got {self.scales}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"MSSSIMConfig.kernel_size must be odd and positive, got {self.kernel_size}")
        if self.sigma <= 0 or self.data_range <= 0:
            raise ValueError(f"MSSSIMConfig.sigma and data_range must be > 0, got {self.sigma}, {self.data_range}")

    @property
    def betas(self) -> tuple[float, ...]:
        b = np.asarray(WANG_BETAS[: self.scales], np.float64)
        return tuple(float(v) for v in b / b.sum())

    def min_side_px(self) -> int:
        """Smallest image side this config accepts: the coarsest scale must exceed the window radius."""
        return (self.kernel_size // 2 + 1) * 2 ** (self.scales - 1)


def gaussian_taps(kernel_size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def filter_matrix(n: int, kernel_size: int, sigma: float) -> torch.Tensor:
    """``[n, n]`` matrix of 1-D Gaussian filtering with reflect padding ("same" output size)."""
    pad = kernel_size // 2
    if pad >= n:
        raise ValueError(f"a {kernel_size}-tap window needs sides > {pad} px for reflect padding, got {n} px")
    eye = torch.eye(n, dtype=torch.float64)[:, None, :]                     # [n, 1, n] impulses
    padded = F.pad(eye, (pad, pad), mode="reflect")
    out = F.conv1d(padded, gaussian_taps(kernel_size, sigma)[None, None])   # [n, 1, n]: row i = response to impulse i
    return out[:, 0, :].T.contiguous()                                      # A[y, i]: weight of input i at output y


def _check_images(x: torch.Tensor | np.ndarray, what: str, cfg: MSSSIMConfig) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if t.ndim != 4:
        raise ValueError(f"{what}: expected [N, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{what}: expected float images in [0, {cfg.data_range}], got dtype {t.dtype}")
    if min(t.shape[-2:]) < cfg.min_side_px():
        raise ValueError(f"{what}: {tuple(t.shape[-2:])} px is too small for {cfg}; need sides >= "
                         f"{cfg.min_side_px()} px (use fewer scales or a smaller kernel)")
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return t.detach().to("cpu", torch.float64)


class _Moments:
    """Per-scale flattened images ``[N, C, H*W]``, local means and variances of one image set.

    The separable reflect-padded Gaussian filter is applied as one GEMM with ``kron(A_h, A_w).T``.
    """

    def __init__(self, x: torch.Tensor, cfg: MSSSIMConfig, weights: torch.Tensor | None = None):
        self.x, self.mu, self.var, self.ops, self.w = [], [], [], [], []
        w = None if weights is None else weights[:, None].to(torch.float64)
        for s in range(cfg.scales):
            if s:
                x = F.avg_pool2d(x, 2)
                w = None if w is None else F.avg_pool2d(w, 2)
            self.w.append(None if w is None else w.flatten(1).to(torch.float32))   # [N, HW]
            ah = filter_matrix(x.shape[-2], cfg.kernel_size, cfg.sigma)
            aw = filter_matrix(x.shape[-1], cfg.kernel_size, cfg.sigma)
            op = torch.kron(ah, aw).T.to(torch.float32).contiguous()              # [HW, HW]
            flat = x.flatten(2).to(torch.float32)                                  # [N, C, HW]
            mu = flat @ op
            self.x.append(flat)
            self.mu.append(mu)
            self.var.append(flat * flat @ op - mu * mu)
            self.ops.append(op)


def _masked_cs_ssim(a: _Moments, b: _Moments, ia, ib, s: int, w: torch.Tensor, c1: float, c2: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-restricted local statistics (normalised convolution): every local mean, variance and
    covariance uses only pixels of the pair's region ``w [P, HW]``; returns weighted means of the cs and
    SSIM maps over the region [P]."""
    x, y, op = a.x[s][ia], b.x[s][ib], a.ops[s]
    wc = w[:, None, :]
    stats = torch.cat([wc, wc * x, wc * y, wc * x * x, wc * y * y, wc * x * y], 1) @ op    # [P, 1 + 5C, HW]
    c = x.shape[1]
    gw = stats[:, :1].clamp_min(1e-6)
    mx, my, exx, eyy, exy = (stats[:, 1 + i * c:1 + (i + 1) * c] / gw for i in range(5))
    vx, vy, cov = exx - mx * mx, eyy - my * my, exy - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    ssim = cs * (2 * mx * my + c1) / (mx * mx + my * my + c1)
    tot = w.double().sum(1).clamp_min(1e-12)
    return ((cs.double().mean(1) * w.double()).sum(1) / tot, (ssim.double().mean(1) * w.double()).sum(1) / tot)


def _combine(a: _Moments, b: _Moments, ia: torch.Tensor, ib: torch.Tensor, cfg: MSSSIMConfig,
             region: str = "all") -> torch.Tensor:
    """MS-SSIM of pairs (a[ia[p]], b[ib[p]]) -> [P]."""
    c1, c2 = (cfg.k1 * cfg.data_range) ** 2, (cfg.k2 * cfg.data_range) ** 2
    out = torch.ones(len(ia), dtype=torch.float64)
    for s, beta in enumerate(cfg.betas):
        last = s == cfg.scales - 1
        if region == "all":
            mx, my = a.mu[s][ia], b.mu[s][ib]
            cov = (a.x[s][ia] * b.x[s][ib]) @ a.ops[s] - mx * my
            cs = (2 * cov + c2) / (a.var[s][ia] + b.var[s][ib] + c2)
            if last:
                cs = cs * (2 * mx * my + c1) / (mx * mx + my * my + c1)    # full SSIM at the coarsest scale
            val = cs.double().mean(dim=(1, 2))
        else:
            wa, wb = a.w[s][ia], b.w[s][ib]
            w = (1 - (1 - wa) * (1 - wb)) if region == "union" else wa * wb
            empty = w.sum(1) <= 1e-6
            w = torch.where(empty[:, None], torch.ones_like(w), w)             # empty region: whole map
            cs_m, ssim_m = _masked_cs_ssim(a, b, ia, ib, s, w, c1, c2)
            val = ssim_m if last else cs_m
        out = out * val.clamp_min(0) ** beta                                # relu normalisation (torchmetrics)
    return out


def ms_ssim(a, b, cfg: MSSSIMConfig = MSSSIMConfig()) -> np.ndarray:
    """Row-wise MS-SSIM of two aligned batches ``[N, C, H, W]`` -> float64 ``[N]`` (1 = identical)."""
    ta, tb = _check_images(a, "ms_ssim a", cfg), _check_images(b, "ms_ssim b", cfg)
    if ta.shape != tb.shape:
        raise ValueError(f"ms_ssim: a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    idx = torch.arange(len(ta))
    return _combine(_Moments(ta, cfg), _Moments(tb, cfg), idx, idx, cfg).numpy()


def ms_ssim_pairs(a, b, ia, ib, cfg: MSSSIMConfig = MSSSIMConfig(), chunk_pairs: int = 4096,
                  weights_a=None, weights_b=None, region: str = "all") -> np.ndarray:
    """MS-SSIM of the pairs ``(a[ia[p]], b[ib[p]])`` -> float64 ``[P]``; moments computed once per image.

    ``region="all"``: every pixel of each scale's SSIM / cs map counts (standard MS-SSIM).
    ``region="union"`` / ``"both"``: masked MS-SSIM. The pair's region weights are the union
    (1 - (1 - wa)(1 - wb)) or the intersection (wa * wb) of the two images' region masks
    ``weights_a [Na, H, W]``, ``weights_b [Nb, H, W]`` in [0, 1] (each 2x2-averaged with its image
    between scales); local means, variances and covariances are normalised convolutions over the
    region only (pixels outside it do not enter any window), and the cs / SSIM maps are averaged with
    the region weights. A pair whose region is empty at a scale uses the whole image at that scale.
    """
    ta, tb = _check_images(a, "ms_ssim_pairs a", cfg), _check_images(b, "ms_ssim_pairs b", cfg)
    if region not in ("all", "union", "both"):
        raise ValueError(f"ms_ssim_pairs: region must be 'all', 'union' or 'both', got {region!r}")
    if region != "all":
        for name, w, t in (("weights_a", weights_a, ta), ("weights_b", weights_b, tb)):
            if w is None or tuple(np.shape(w)) != (t.shape[0], *t.shape[-2:]):
                raise ValueError(f"ms_ssim_pairs: region={region!r} needs {name} of shape "
                                 f"{(t.shape[0], *t.shape[-2:])}, got {None if w is None else np.shape(w)}")
        weights_a = torch.as_tensor(np.asarray(weights_a, np.float64))
        weights_b = torch.as_tensor(np.asarray(weights_b, np.float64))
    else:
        weights_a = weights_b = None
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"ms_ssim_pairs: a and b need the same [C, H, W], got {tuple(ta.shape[1:])} and {tuple(tb.shape[1:])}")
    ia_t, ib_t = torch.from_numpy(np.array(ia, dtype=np.int64, ndmin=1)), torch.from_numpy(np.array(ib, dtype=np.int64, ndmin=1))
    if ia_t.shape != ib_t.shape or ia_t.ndim != 1:
        raise ValueError(f"ms_ssim_pairs: ia and ib must be 1-D of equal length, got {tuple(ia_t.shape)} and {tuple(ib_t.shape)}")
    for name, idx, n in (("ia", ia_t, len(ta)), ("ib", ib_t, len(tb))):
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"ms_ssim_pairs: {name} has indices outside [0, {n})")
    ma, mb = _Moments(ta, cfg, weights_a), _Moments(tb, cfg, weights_b)
    out = [_combine(ma, mb, ia_t[s:s + chunk_pairs], ib_t[s:s + chunk_pairs], cfg, region)
           for s in range(0, len(ia_t), chunk_pairs)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def ms_ssim_matrix(a, b, cfg: MSSSIMConfig = MSSSIMConfig(), chunk_pairs: int = 4096) -> np.ndarray:
    """All-pairs MS-SSIM ``[Na, Nb]``."""
    na, nb = len(a), len(b)
    ia, ib = np.repeat(np.arange(na), nb), np.tile(np.arange(nb), na)
    return ms_ssim_pairs(a, b, ia, ib, cfg, chunk_pairs).reshape(na, nb)


def ssim_map(a, b, kernel_size: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> np.ndarray:
    """Single-scale SSIM map ``[N, C, H, W]`` (reflect padding, same size), for checks and plots."""
    cfg = MSSSIMConfig(scales=1, kernel_size=kernel_size, sigma=sigma, data_range=data_range)
    ma, mb = _Moments(_check_images(a, "ssim_map a", cfg), cfg), _Moments(_check_images(b, "ssim_map b", cfg), cfg)
    c1, c2 = (cfg.k1 * data_range) ** 2, (cfg.k2 * data_range) ** 2
    mx, my = ma.mu[0], mb.mu[0]
    cov = ma.x[0] * mb.x[0] @ ma.ops[0] - mx * my
    m = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (ma.var[0] + mb.var[0] + c2))
    return m.reshape(tuple(a.shape)).numpy().astype(np.float64)
