"""The organism's segmenter: a tiny CNN trained on a MemWorld's exact masks (``memworld_cnn``), and the
validation of the segmenters against MemWorld (``python -m tasks.memworld_segment``; numbers in the README).

Generic segmenters, the ``Segmenter`` protocol and ``validate_on_world`` are the engine's
(``bench.measure.segment``); this one is trained on a world, so it lives with the worlds.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.measure.embed import as_image_tensor
from bench.measure.segment import BorderPaletteSegmenter, border_distance, mask_iou, validate_on_world
from tasks.memworld import MemWorldConfig, build_memworld


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
        from bench.core.sampling import sample

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
