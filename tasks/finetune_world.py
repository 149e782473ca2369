"""The fine-tuning protocol of the training-time mitigators (analogue of Wen et al.'s, methods.md 1d).

Wen fine-tunes SD v1.4 on LAION pairs where a set of image-caption pairs is duplicated (200 pairs x
200 repeats + 3x as many ordinary pairs) with and without the mitigation. The committed organism
(``tasks/artifacts/organism-v1``) has already memorized its own planted families, so this module
plants a NEW duplicated set, drawn deterministically with MemWorld's drawing code
(``tasks/memworld_draw.py``):

- ``n_mv`` MV-style images (2-colour gradient + two shapes), each with one new rare-word title
  caption ("<word> <word> poster"), duplicated ``dup_mv`` times;
- ``n_fg`` FG-style sprite families: one new sprite over ``fg_images`` ordinary backgrounds,
  captions "<word> <word> mascot on <background>", each pair duplicated ``dup_fg`` times
  (local / foreground memorization);
- ``n_bg`` BG-style mosaic families: one new colour mosaic under ``bg_images`` ordinary shapes,
  captions "a <colour> <shape> in the <word> <word> room", each pair duplicated ``dup_bg`` times
  (local / background memorization). Same construction as MemWorld's BG family.
The title words are taken after the base world's words in the same shuffled vocabulary, so they were
never seen by the organism. The fine-tuning set is these pairs mixed with all of the base world's
ordinary pairs (weight 1 each); the organism's own planted pairs are not trained again.

``finetune_world`` returns a ``MemWorld`` whose images are the base world's images followed by the new
ones (so ``bench.measure.copyscore.CopyJudge`` and ``tasks.studies.groundtruth`` work on it unchanged: nearest-neighbour
search covers everything the model was ever trained on), whose pairs are the fine-tuning pairs (groups ``ordinary``, ``FT_MV``, ``FT_FG``, ``FT_BG``; the new images'
kinds are ``MV`` / ``FG`` / ``BG`` so FB-Mem's memorized pool, ``bench.measure.fbmem.memorized_pool``, includes them) and
whose evaluation prompts are the new set's prompts (label 1, groups ``MV`` / ``FG`` / ``BG``) followed by
non-memorized utility prompts (the base world's ordinary seen / unseen captions, alternating).

``finetune`` fine-tunes a COPY of a model (the passed model is never modified) through THE training
loop ``bench.core.train.train``, with optional hooks (``TrainHook.keep``) and a data transform (caption or
image augmentation), and caches the result under ``.cache/diffmem/finetune/<config-hash>/`` (UNet
safetensors + ``manifest.json`` with config, wall and CPU seconds, kept-sample share). A cache hit
loads the weights instead of training.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.core.model import DiffusionModel
from bench.core.train import TrainConfig, TrainData, TrainHook, train
from tasks.memworld import BACKGROUNDS, FAMILIES, TITLE_NOUNS, EvalPrompt, MemWorld
from tasks.memworld_draw import (COLOURS, SHAPES, draw_background, draw_distinct_image, draw_mosaic, draw_sprite,
                                 jitter_colour, paste_shape, title_words)

UTILITY_GROUPS = ("ordinary_seen", "ordinary_unseen")


def default_finetune_train() -> TrainConfig:
    # Pilot-chosen budget (README "Training-time mitigation"): plain fine-tuning reproduces the new set.
    return TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup=20, caption_dropout=0.1, seed=0,
                       checkpoint_every=100, threads=1)


@dataclass(frozen=True)
class FinetuneConfig:
    seed: int = 1                    # draws the new set (the base world uses its own seed)
    n_mv: int = 4
    dup_mv: int = 200                # Wen: 200 repeats (100 left MV unmemorized once BG was planted)
    n_fg: int = 1
    fg_images: int = 8
    dup_fg: int = 16
    eval_fg: int = 4                 # FG evaluation prompts per sprite (distinct captions)
    n_bg: int = 1                    # BG-local families (FB-Mem study needs foreground AND background)
    bg_images: int = 8
    dup_bg: int = 16
    eval_bg: int = 4
    n_utility: int = 8               # non-memorized evaluation prompts
    train: TrainConfig = field(default_factory=default_finetune_train)

    def __post_init__(self):
        for k in ("n_mv", "dup_mv", "n_fg", "fg_images", "dup_fg", "n_bg", "bg_images", "dup_bg"):
            if getattr(self, k) < 0:
                raise ValueError(f"FinetuneConfig.{k} = {getattr(self, k)} must be >= 0")
        if self.n_mv + self.n_fg + self.n_bg == 0:
            raise ValueError("FinetuneConfig plants nothing: set n_mv, n_fg or n_bg > 0")


def finetune_config_from_dict(d: dict) -> FinetuneConfig:
    d = dict(d)
    tr = d.pop("train", None)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"train"}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown finetune config keys {sorted(unknown)}; valid: {sorted(names | {'train'})}")
    train_cfg = dataclasses.replace(default_finetune_train(), **(tr or {}))
    return FinetuneConfig(**d, train=train_cfg)


def _base_title_count(wc) -> int:
    n_caps = (wc.n_mv + wc.n_rv * wc.rv_captions + wc.n_tv + wc.n_fg + wc.n_bg
              + 2 * len(FAMILIES) * wc.n_controls)
    return 2 * n_caps


def finetune_world(base: MemWorld, cfg: FinetuneConfig = FinetuneConfig()) -> MemWorld:
    """Base world's images + the new planted set; fine-tuning pairs; the new set's evaluation prompts."""
    wc = base.config
    res = wc.res
    rng = np.random.default_rng([wc.seed, cfg.seed, 1000003])
    n_base_words = _base_title_count(wc)
    n_new = cfg.n_mv + cfg.n_fg + cfg.n_bg
    words = iter(title_words(n_base_words + 2 * n_new, wc.seed)[n_base_words:])
    images, masks, kinds = list(base.images), list(base.masks), list(base.image_kind)
    captions, pair_image, pair_weight, pair_group = [], [], [], []
    for c, i, w, g in zip(base.captions, base.pair_image, base.pair_weight, base.pair_group):
        if g == "ordinary":
            captions.append(c), pair_image.append(int(i)), pair_weight.append(int(w)), pair_group.append(g)
    evals: list[EvalPrompt] = []

    def add_image(img, mask, kind) -> int:
        img = np.clip(img + rng.normal(0, wc.noise_std, img.shape).astype(np.float32), 0, 1)
        images.append(img.astype(np.float32)), masks.append(mask), kinds.append(kind)
        return len(images) - 1

    def add_eval(group, prompt, targets, region, label=1):
        n = sum(e.group == group for e in evals)
        evals.append(EvalPrompt(f"FT_{group}-{n:03d}", prompt, label, group, group if label else "",
                                tuple(int(t) for t in targets), region))

    for _ in range(cfg.n_mv):
        i = add_image(*draw_distinct_image(rng, res), "MV")
        cap = f"{next(words)} {next(words)} {TITLE_NOUNS['MV']}"
        captions.append(cap), pair_image.append(i), pair_weight.append(cfg.dup_mv), pair_group.append("FT_MV")
        add_eval("MV", cap, [i], "full")
    def local_family(fam: str, n_images: int, dup: int, n_eval: int, region: str, draw) -> None:
        """One FG- or BG-style family: ``draw(phrase)`` -> (image, mask, caption) per member."""
        phrase = f"{next(words)} {next(words)} {TITLE_NOUNS[fam]}"
        ids, caps = [], []
        for _ in range(n_images):
            img, mask, cap = draw(phrase)
            i = add_image(img, mask, fam)
            captions.append(cap), pair_image.append(i), pair_weight.append(dup), pair_group.append(f"FT_{fam}")
            ids.append(i), caps.append(cap)
        for cap in list(dict.fromkeys(caps))[:n_eval]:
            add_eval(fam, cap, ids, region)

    size = max(4, res // 2)
    bg_names = list(BACKGROUNDS)

    def sprite_on_background(sprite, disc):          # same construction as MemWorld's FG family
        def draw(phrase):
            bg = bg_names[rng.integers(len(bg_names))]
            img = draw_background(bg, rng, res)
            mask = np.zeros((res, res), bool)
            x0, y0 = (int(v) for v in rng.integers(0, res - size + 1, 2))
            img[:, y0:y0 + size, x0:x0 + size][:, disc] = sprite[:, disc]
            mask[y0:y0 + size, x0:x0 + size] = disc
            return img, mask, f"{phrase} on {BACKGROUNDS[bg]}"
        return draw

    def shape_on_mosaic(mosaic):                     # same construction as MemWorld's BG family
        def draw(phrase):
            c, sh = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            img, mask = mosaic.copy(), np.zeros((res, res), bool)
            paste_shape(img, mask, sh, jitter_colour(COLOURS[c], rng), *rng.uniform(0.3, 0.7, 2),
                        rng.uniform(0.18, 0.3), res)
            return img, mask, f"a {c} {sh} in the {phrase}"
        return draw

    for _ in range(cfg.n_fg):
        sprite, disc = draw_sprite(rng, size)            # drawn before the phrase's words, as before
        local_family("FG", cfg.fg_images, cfg.dup_fg, cfg.eval_fg, "fg", sprite_on_background(sprite, disc))
    for _ in range(cfg.n_bg):
        local_family("BG", cfg.bg_images, cfg.dup_bg, cfg.eval_bg, "bg", shape_on_mosaic(draw_mosaic(rng, res)))
    pools = [[e for e in base.eval_prompts if e.group == g] for g in UTILITY_GROUPS]
    util = [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)][:cfg.n_utility]
    evals += util
    return MemWorld(wc, np.stack(images), np.stack(masks), kinds, captions,
                    np.asarray(pair_image, np.int64), np.asarray(pair_weight, np.int64), pair_group, evals)


def train_data(world: MemWorld) -> TrainData:
    return TrainData(torch.from_numpy(world.images) * 2 - 1, torch.from_numpy(world.pair_image),
                     torch.from_numpy(world.pair_weight), list(world.captions))


# ----------------------------------------------------------------------------- fine-tuning + cache
def cache_root() -> Path:
    return Path(os.environ.get("DIFFMEM_FINETUNE_CACHE", ".cache/diffmem/finetune"))


def model_with_unet(model: DiffusionModel, unet) -> DiffusionModel:
    """A model sharing ``model``'s frozen text encoder and UNet-row counter, with another UNet."""
    return dataclasses.replace(model, unet=unet)


def base_identity(model: DiffusionModel) -> dict:
    """What a cached fine-tune depends on in its base model: the UNet's exact weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return {"name": model.name, "unet_sha256": h.hexdigest()[:16]}


def finetune_key(base: dict, cfg: FinetuneConfig, world_sha256: str, method: dict) -> tuple[str, dict]:
    spec = {"base": base, "finetune": asdict(cfg), "world_sha256": world_sha256, "method": method,
            "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12], spec


@dataclass
class Finetuned:
    model: DiffusionModel            # the fine-tuned copy (shares text encoder and counter)
    manifest: dict
    path: Path
    cached: bool                     # loaded from the cache rather than trained now


def finetune(model: DiffusionModel, world: MemWorld, cfg: FinetuneConfig, *, method: dict,
             hooks: tuple[TrainHook, ...] = (), transform: Callable[[TrainData], tuple[TrainData, dict]] | None = None,
             root: str | Path | None = None, progress: bool = False) -> Finetuned:
    """Fine-tune a copy of ``model`` on ``world``'s pairs (cached by config hash); ``model`` is untouched.

    ``method``: the mitigation's identity and parameters (part of the cache key); ``transform``:
    TrainData -> (TrainData, info) applied before training (its seconds are counted as training cost).
    """
    key, spec = finetune_key(base_identity(model), cfg, world.sha256, method)
    folder = Path(root or cache_root()) / key
    unet = copy.deepcopy(model.unet)
    if (folder / "manifest.json").is_file():
        unet.load_state_dict(load_file(str(folder / "unet.safetensors")), strict=True)
        unet.eval().requires_grad_(False)
        return Finetuned(model_with_unet(model, unet), json.loads((folder / "manifest.json").read_text()),
                         folder, True)
    work = folder.with_name(folder.name + ".work")
    if work.exists():
        # An interrupted build is started again rather than resumed: its CPU seconds before the
        # interruption are unknown, and they are the training cost this module reports.
        print(f"[diffmem] discarding the partial fine-tune {work} (a resumed build's cost could not be measured)")
        shutil.rmtree(work)
    ft = model_with_unet(model, unet)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    data, info = transform(train_data(world)) if transform else (train_data(world), {})
    threads = torch.get_num_threads()
    try:
        summary = train(ft, data, cfg.train, work, hooks=hooks, progress=progress)
        train_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)       # train() sets cfg.train.threads for the process; restore it
    manifest = {**spec, "key": key, "train_summary": summary, "transform": info,
                "wall_seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0,
                "threads": train_threads, "torch": torch.__version__,
                "kept_fraction": summary["kept_fraction"],
                "hooks": [h.report() for h in hooks if hasattr(h, "report")]}
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
    for f in ("loss_history.csv", "train_summary.json"):
        shutil.copy(work / f, tmp / f)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    shutil.rmtree(work, ignore_errors=True)
    return Finetuned(ft, manifest, folder, False)


class WorldFinetuner:
    """The fine-tuning protocol of the organism's world as a ``bench.contracts.Finetuner``: handed to the
    training-time mitigators (``baselines.mitigators.train_time``) by whoever builds them
    (``tasks/studies/finetune_mitigate.py``), so the methods never import a world."""

    def config(self, overrides: dict) -> FinetuneConfig:
        return finetune_config_from_dict(overrides)

    def world(self, model: DiffusionModel, cfg: FinetuneConfig) -> MemWorld:
        from tasks.organism_task import world_for
        return finetune_world(world_for(None, model), cfg)

    def finetune(self, model: DiffusionModel, world: MemWorld, cfg: FinetuneConfig, *, method: dict,
                 hooks: tuple = (), transform=None, root: str | None = None) -> Finetuned:
        return finetune(model, world, cfg, method=method, hooks=hooks, transform=transform, root=root)

    def __repr__(self) -> str:
        return "WorldFinetuner()"
