"""Foreground / background segmenters for the FB-Mem metric (methods.md 7a).

A ``Segmenter`` maps float images ``[N, 3, H, W]`` in [0, 1] to boolean foreground masks ``[N, H, W]``.

- Training images of the organism need no segmenter: MemWorld stores their exact masks
  (``MemWorld.masks``).
- ``MemWorldCNNSegmenter`` (name ``memworld_cnn``; ``tasks/memworld_segment.py``, it is trained on a world), for organism generations: a tiny fully
  convolutional net (4 dilated 3x3 layers, receptive field 31 px, about 7 k parameters; input RGB plus
  each pixel's colour distance to the image border, the baseline's cue) trained on
  the exact masks of a MemWorld drawn with a *different* seed from the organism's world, with pixel
  noise and flips as augmentation. Deterministic from its config (seeded, fixed order), cached as
  safetensors under ``$DIFFMEM_CACHE`` (default ``~/.cache/diffmem``); training (800 steps) measured
  60 s CPU on one thread, and retraining reproduced the cached weights exactly.
  Why learned: MemWorld's backgrounds are textures (stripes, checkers, blobs, 4 px colour mosaics),
  so "background = colours seen on the border" (``BorderPaletteSegmenter``, kept as the baseline)
  misses interior mosaic tiles and objects touching the border, and the plain RGB CNN (no border
  cue) did worse than the baseline in a trial (IoU 0.65 vs 0.81); ``python -m tasks.memworld_segment`` measures both against
  the exact masks of the organism's own world (images the CNN never saw) and on organism generations
  of fully memorized prompts (MV, RV), whose masks are their training image's.
- ``RembgSegmenter`` (name ``rembg``), for real images: BiRefNet through ``rembg`` as the FB-Mem
  release (session ``birefnet-general``, alpha matting 270 / 20 / erode 11). Needs the ``rembg``
  package and the model file in ``$U2NET_HOME`` (default ``~/.u2net``); nothing is downloaded: if
  either is absent it raises an error that says what to install and where to put the weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from bench.measure.embed import as_image_tensor


@runtime_checkable
class Segmenter(Protocol):
    name: str

    def masks(self, images) -> np.ndarray:
        """``images [N, 3, H, W]`` float in [0, 1] -> bool foreground masks ``[N, H, W]``."""
        ...


def check_masks(masks, n: int, hw: tuple[int, int], what: str) -> np.ndarray:
    """Validate boolean masks ``[n, H, W]`` matching the images they belong to."""
    m = np.asarray(masks)
    if m.dtype != bool:
        raise ValueError(f"{what}: expected a bool array [N, H, W] (True = foreground), got dtype {m.dtype}")
    if m.shape != (n, *hw):
        raise ValueError(f"{what}: expected shape {(n, *hw)} to match the images, got {m.shape}")
    return m


def mask_iou(pred, true) -> np.ndarray:
    """Per-image foreground IoU ``[N]``; 1.0 where both masks are empty."""
    p, t = np.asarray(pred, bool), np.asarray(true, bool)
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"mask_iou: expected two bool [N, H, W] arrays of one shape, got {p.shape} and {t.shape}")
    inter = (p & t).sum((1, 2))
    union = (p | t).sum((1, 2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


# ----------------------------------------------------------------------------- border baseline
def border_distance(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]``: RGB distance of each pixel to the nearest border pixel's colour."""
    n, _, h, w = x.shape
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    pix = x.flatten(2).transpose(1, 2)                            # [N, HW, 3]
    return torch.cdist(pix, pix[:, border.flatten()]).min(-1).values.reshape(n, 1, h, w)


@dataclass(frozen=True)
class BorderPaletteSegmenter:
    """Baseline: a pixel is background when its colour is within ``tol`` (RGB Euclidean, [0, 1]
    units) of some pixel on the image border."""

    tol: float = 0.15
    name: str = "border_palette"

    def masks(self, images) -> np.ndarray:
        x = as_image_tensor(images, "BorderPaletteSegmenter images")
        return (border_distance(x) > self.tol)[:, 0].numpy()


# ----------------------------------------------------------------------------- real images
REMBG_HELP = ("pip install rembg, then put the BiRefNet ONNX file ({file}) in {home} (or point U2NET_HOME "
              "at the folder holding it); it is available from the rembg project's GitHub releases")


@dataclass(frozen=True)
class RembgSegmenter:
    """BiRefNet via rembg, as the FB-Mem release (methods.md 7a). Foreground = alpha > 0.5."""

    session: str = "birefnet-general"
    model_file: str = "BiRefNet-general-epoch_244.onnx"
    alpha_matting: bool = True
    fg_threshold: int = 270
    bg_threshold: int = 20
    erode_size: int = 11
    name: str = "rembg"

    def model_path(self) -> Path:
        return Path(os.environ.get("U2NET_HOME", Path.home() / ".u2net")) / self.model_file

    def _session(self):
        try:
            import rembg
        except ImportError as e:
            raise ImportError("RembgSegmenter needs the rembg package: "
                              + REMBG_HELP.format(file=self.model_file, home=self.model_path().parent)) from e
        if not self.model_path().is_file():
            raise FileNotFoundError(f"RembgSegmenter: weights {self.model_path()} not found (rembg would try to "
                                    "download them; diffmem never downloads): "
                                    + REMBG_HELP.format(file=self.model_file, home=self.model_path().parent))
        return rembg, rembg.new_session(self.session)

    def masks(self, images) -> np.ndarray:
        from PIL import Image

        rembg, session = self._session()
        x = as_image_tensor(images, "RembgSegmenter images")
        out = []
        for img in (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8):
            rgba = rembg.remove(Image.fromarray(img), session=session, alpha_matting=self.alpha_matting,
                                alpha_matting_foreground_threshold=self.fg_threshold,
                                alpha_matting_background_threshold=self.bg_threshold,
                                alpha_matting_erode_size=self.erode_size)
            out.append(np.asarray(rgba)[..., 3] > 127)
        return np.stack(out) if out else np.zeros((0, *x.shape[-2:]), bool)


SEGMENTERS = {"border_palette": BorderPaletteSegmenter, "rembg": RembgSegmenter}   # memworld_cnn: tasks.memworld_segment


def get_segmenter(name: str, **kw) -> Segmenter:
    if name not in SEGMENTERS:
        raise KeyError(f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTERS)}")
    return SEGMENTERS[name](**kw)


# ----------------------------------------------------------------------------- validation
def validate_on_world(segmenter: Segmenter, images: np.ndarray, masks: np.ndarray, kinds: list[str]) -> dict:
    """Foreground IoU and pixel accuracy against exact masks, overall and per image kind."""
    pred = segmenter.masks(images)
    iou = mask_iou(pred, masks)
    kinds_a = np.asarray(kinds)
    return {"n": int(len(iou)), "iou_mean": float(iou.mean()), "iou_median": float(np.median(iou)),
            "pixel_acc": float((pred == masks).mean()),
            "iou_by_kind": {k: float(iou[kinds_a == k].mean()) for k in sorted(set(kinds))}}
