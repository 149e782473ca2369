"""Foreground / background segmenters for the FB-Mem metric (methods.md 7a).

A ``Segmenter`` maps float images ``[N, 3, H, W]`` in [0, 1] to boolean foreground masks ``[N, H, W]``.

- Training images of the organism need no segmenter: MemWorld stores their exact masks
  (``MemWorld.masks``).
- ``MemWorldCNNSegmenter`` (name ``memworld_cnn``), for organism generations: a tiny fully
  convolutional net (4 dilated 3x3 layers, receptive field 31 px, about 7 k parameters; input RGB plus
  each pixel's colour distance to the image border, the baseline's cue) trained on
  the exact masks of a MemWorld drawn with a *different* seed from the organism's world, with pixel
  noise and flips as augmentation. Deterministic from its config (seeded, fixed order), cached as
  safetensors under ``$DIFFMEM_CACHE`` (default ``~/.cache/diffmem``); training (800 steps) measured
  60 s CPU on one thread, and retraining reproduced the cached weights exactly.
  Why learned: MemWorld's backgrounds are textures (stripes, checkers, blobs, 4 px colour mosaics),
  so "background = colours seen on the border" (``BorderPaletteSegmenter``, kept as the baseline)
  misses interior mosaic tiles and objects touching the border, and the plain RGB CNN (no border
  cue) did worse than the baseline in a trial (IoU 0.65 vs 0.81); ``python -m bench.segment`` measures both against
  the exact masks of the organism's own world (images the CNN never saw) and on organism generations
  of fully memorized prompts (MV, RV), whose masks are their training image's.
- ``RembgSegmenter`` (name ``rembg``), for real images: BiRefNet through ``rembg`` as the FB-Mem
  release (session ``birefnet-general``, alpha matting 270 / 20 / erode 11). Needs the ``rembg``
  package and the model file in ``$U2NET_HOME`` (default ``~/.u2net``); nothing is downloaded: if
  either is absent it raises an error that says what to install and where to put the weights.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from bench.embed import as_image_tensor
from tasks.memworld import MemWorldConfig, build_memworld


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


# ----------------------------------------------------------------------------- tiny CNN on MemWorld
@dataclass(frozen=True)
class CNNSegmenterConfig:
    # training world: the organism's world uses seed 0, so the segmenter never sees its images
    world: MemWorldConfig = field(default_factory=lambda: MemWorldConfig(seed=1))
    width: int = 16
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    noise_std: float = 0.04       # generations are noisier than training renders
    seed: int = 0
    threshold: float = 0.5
    version: str = "v1"

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _net(cfg: CNNSegmenterConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 4                      # RGB + border_distance
    for d in cfg.dilations:
        layers += [nn.Conv2d(c_in, cfg.width, 3, padding=d, dilation=d, padding_mode="replicate"), nn.ReLU()]
        c_in = cfg.width
    layers.append(nn.Conv2d(c_in, 1, 1))
    return nn.Sequential(*layers)


def _features(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, border_distance(x)], 1)


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFMEM_CACHE", Path.home() / ".cache" / "diffmem"))


def train_cnn_segmenter(cfg: CNNSegmenterConfig, images: np.ndarray, masks: np.ndarray) -> nn.Sequential:
    """Fit the net to exact masks (BCE, Adam with cosine decay, seeded batches, noise + flip augmentation)."""
    torch.manual_seed(cfg.seed)
    net = _net(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    x_all = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(masks, np.float32))[:, None]
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=g)
        x, y = x_all[idx], y_all[idx]
        x = (x + cfg.noise_std * torch.randn(x.shape, generator=g)).clamp(0, 1)
        flip = torch.rand(2, generator=g) < 0.5
        if flip[0]:
            x, y = x.flip(-1), y.flip(-1)
        if flip[1]:
            x, y = x.flip(-2), y.flip(-2)
        loss = nn.functional.binary_cross_entropy_with_logits(net(_features(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


class MemWorldCNNSegmenter:
    """Tiny CNN trained on a MemWorld (``cfg.world``) with exact masks; cached by config hash."""

    name = "memworld_cnn"

    def __init__(self, cfg: CNNSegmenterConfig = CNNSegmenterConfig(), cache: str | Path | None = None):
        from safetensors.torch import load_file, save_file

        self.cfg = cfg
        self.path = Path(cache or cache_dir()) / f"segmenter-memworld_cnn-{cfg.version}-{cfg.hash}.safetensors"
        self.net = _net(cfg)
        if self.path.is_file():
            self.net.load_state_dict(load_file(self.path))
            self.net.eval()
        else:
            world = build_memworld(cfg.world)
            self.net = train_cnn_segmenter(cfg, world.images, world.masks)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, tmp)
            os.replace(tmp, self.path)

    @torch.inference_mode()
    def probabilities(self, images) -> np.ndarray:
        x = as_image_tensor(images, "MemWorldCNNSegmenter images")
        return torch.sigmoid(self.net(_features(x)))[:, 0].numpy()

    def masks(self, images) -> np.ndarray:
        return self.probabilities(images) > self.cfg.threshold

    def __repr__(self) -> str:
        return f"MemWorldCNNSegmenter({self.cfg}, path={self.path})"


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


SEGMENTERS = {"memworld_cnn": MemWorldCNNSegmenter, "border_palette": BorderPaletteSegmenter, "rembg": RembgSegmenter}


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


def main(argv: list[str] | None = None) -> None:
    """Validate the organism segmenters against MemWorld's exact masks (numbers quoted in README)."""
    import argparse

    ap = argparse.ArgumentParser(description="validate FB-Mem segmenters on MemWorld (exact masks)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-seeds", type=int, default=2, help="seeds per MV/RV prompt for the generation check; 0 skips it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tasks.organism import load_organism, organism_world

    world = organism_world()
    report: dict = {"world": "organism MemWorld (seed 0), exact masks"}
    segs = [MemWorldCNNSegmenter(), BorderPaletteSegmenter()]
    for s in segs:
        report[s.name] = validate_on_world(s, world.images, world.masks, world.image_kind)
    if args.gen_seeds:
        from bench.sampling import sample

        ev = [e for e in world.eval_prompts if e.group in ("MV", "RV")]
        seeds = list(range(args.gen_seeds))
        res = sample(load_organism(), [e.prompt for e in ev], seeds, steps=50, guidance=7.5)
        gens = res.images.float().clamp(0, 1).numpy()
        true = np.repeat(world.masks[[e.targets[0] for e in ev]], len(seeds), axis=0)
        for s in segs:
            report[s.name]["generations_mv_rv"] = {
                "n": int(len(gens)), "iou_mean": float(mask_iou(s.masks(gens), true).mean()),
                "protocol": f"DDIM 50, guidance 7.5, seeds {seeds}; truth = the prompt's training image mask"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
