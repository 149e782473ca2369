"""MemWorld: a procedural image-caption world with planted memorization (DESIGN.md section 2).

Everything is a deterministic function of ``MemWorldConfig`` (seed included). Images are RGB in
[0, 1], ``res`` x ``res`` pixels, each with an exact foreground mask.

Training data
- ordinary pairs: a textured background (solid, gradient, stripes, checker, blobs) with 1-3 objects.
  The caption names only the main object's colour and shape, sometimes the background kind, never the
  secondary objects, positions or sizes, so one caption admits many images.
- planted families (captions read like web titles made of rare words, one word set per caption):
  MV  one image, one caption, duplicated ``dup_mv`` times;
  RV  one image under ``rv_captions`` different captions, each pair duplicated ``dup_rv`` times;
  TV  a fixed layout whose one region varies, captions share a template phrase plus a variant word;
  FG  one distinctive foreground sprite over varied backgrounds, captions share a phrase;
  BG  one distinctive background under varied foregrounds, captions share a phrase.
- style-matched controls: for every family, captions of exactly the family's form with their own
  images from the same generator, trained once (weight 1, like each ordinary pair).

Evaluation prompts (label 1 = memorized): the planted families' prompts; non-memorized groups are
seen ordinary captions, unseen recombinations, random CLIP-token strings, and per family the
trained-once and never-trained controls (``<FAM>_once``, ``<FAM>_never``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tasks.memworld_draw import (COLOURS, SHAPES, draw_background, draw_distinct_image, draw_mosaic,
                                 draw_ordinary_image, draw_sprite, jitter_colour, paste_shape, title_words)
from tasks.promptsets import random_token_prompts

FAMILIES = ("MV", "RV", "TV", "FG", "BG")
BACKGROUNDS = {"solid": "a plain background", "gradient": "a gradient", "stripes": "stripes",
               "checker": "a checkerboard", "blobs": "blobs"}
VARIANT_WORDS = ("crimson", "teal", "amber", "violet", "olive", "navy", "coral", "ivory")
TITLE_NOUNS = {"MV": "poster", "RV": "print", "TV": "case", "FG": "mascot", "BG": "room"}


@dataclass(frozen=True)
class MemWorldConfig:
    seed: int = 0
    res: int = 16
    n_ordinary: int = 800
    heldout_frac: float = 0.25       # share of (colour, shape, background) triples never trained
    n_mv: int = 20
    dup_mv: int = 100
    n_rv: int = 8
    rv_captions: int = 3
    dup_rv: int = 16
    n_tv: int = 5
    tv_variants: int = 6
    dup_tv: int = 8
    n_fg: int = 5
    fg_images: int = 24
    dup_fg: int = 2
    n_bg: int = 5
    bg_images: int = 24
    dup_bg: int = 2
    n_controls: int = 12             # per family, for each of trained-once and never-trained
    n_eval_seen: int = 140
    n_eval_unseen: int = 100
    n_eval_random: int = 100
    eval_per_local: int = 4          # eval prompts per TV template / FG sprite / BG texture
    noise_std: float = 0.015
    # v2 (fixes the rarity confound measured on v1, see organism.py): titles without a family noun, and
    # many more trained-once captions of each family's form (not evaluated), so that a caption's form
    # no longer points at the duplicated images
    title_nouns: bool = True         # "<w1> <w2> poster" (v1) or "<w1> <w2>"
    singletons_per_family: int = 0   # extra trained-once pairs per family form, beyond the evaluated n_controls


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    prompt: str
    label: int                       # 1 = memorized
    group: str                       # MV, RV, ..., ordinary_seen, MV_once, MV_never, ...
    family: str                      # planted family the prompt's form belongs to, "" if none
    targets: tuple[int, ...] = ()    # training image indices the prompt should reproduce
    region: str = ""                 # what a copy shares: full / template / fg / bg


@dataclass
class MemWorld:
    config: MemWorldConfig
    images: np.ndarray               # [N, 3, H, W] float32 in [0, 1]
    masks: np.ndarray                # [N, H, W] bool foreground
    image_kind: list[str]            # ordinary / MV / RV / TV / FG / BG / <FAM>_once
    captions: list[str]              # one per training pair
    pair_image: np.ndarray           # [P] int image index of each pair
    pair_weight: np.ndarray          # [P] int duplication count
    pair_group: list[str]
    eval_prompts: list[EvalPrompt] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.masks).tobytes())
        h.update("\n".join(self.captions).encode())
        h.update(self.pair_image.tobytes() + self.pair_weight.astype(np.int64).tobytes())
        h.update("\n".join(f"{p.id}\t{p.prompt}\t{p.label}\t{p.group}" for p in self.eval_prompts).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g, w in zip(self.pair_group, self.pair_weight):
            out[g] = out.get(g, 0) + int(w)
        return out


# ----------------------------------------------------------------------------- world
def build_memworld(cfg: MemWorldConfig = MemWorldConfig()) -> MemWorld:
    rng = np.random.default_rng(cfg.seed)
    res = cfg.res
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kinds: list[str] = []
    captions: list[str] = []
    pair_image: list[int] = []
    pair_weight: list[int] = []
    pair_group: list[str] = []
    evals: list[EvalPrompt] = []

    def add_image(img, mask, kind) -> int:
        img = np.clip(img + rng.normal(0, cfg.noise_std, img.shape).astype(np.float32), 0, 1)
        images.append(img.astype(np.float32))
        masks.append(mask)
        kinds.append(kind)
        return len(images) - 1

    def add_pair(i, cap, w, group):
        captions.append(cap)
        pair_image.append(i)
        pair_weight.append(int(w))
        pair_group.append(group)

    # words: every caption of planted and control families gets its own two words
    n_caps = (cfg.n_mv + cfg.n_rv * cfg.rv_captions + cfg.n_tv + cfg.n_fg + cfg.n_bg
              + 2 * len(FAMILIES) * cfg.n_controls)
    pool = iter(title_words(2 * n_caps, cfg.seed))

    def title(fam: str) -> str:
        return f"{next(pool)} {next(pool)}" + (f" {TITLE_NOUNS[fam]}" if cfg.title_nouns else "")

    # ordinary pairs
    triples = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    order = rng.permutation(len(triples))
    n_held = int(round(cfg.heldout_frac * len(triples)))
    held = [triples[i] for i in order[:n_held]]
    trained = [triples[i] for i in order[n_held:]]
    seen_caps: list[str] = []
    for _ in range(cfg.n_ordinary):
        c, s, b = trained[rng.integers(len(trained))]
        img, mask = draw_ordinary_image(rng, res, c, s, b, int(rng.integers(0, 3)))
        cap = f"a {c} {s}" + (f" on {BACKGROUNDS[b]}" if rng.random() < 0.35 else "")
        add_pair(add_image(img, mask, "ordinary"), cap, 1, "ordinary")
        seen_caps.append(cap)

    def fam_eval(group, fam, prompt, targets, region, label=1):
        evals.append(EvalPrompt(f"{group}-{sum(e.group == group for e in evals):03d}", prompt, label,
                                group, fam, tuple(int(t) for t in targets), region))

    # MV
    for _ in range(cfg.n_mv):
        i = add_image(*draw_distinct_image(rng, res), "MV")
        cap = title("MV")
        add_pair(i, cap, cfg.dup_mv, "MV")
        fam_eval("MV", "MV", cap, [i], "full")
    # RV
    for _ in range(cfg.n_rv):
        i = add_image(*draw_distinct_image(rng, res), "RV")
        for _ in range(cfg.rv_captions):
            cap = title("RV")
            add_pair(i, cap, cfg.dup_rv, "RV")
            fam_eval("RV", "RV", cap, [i], "full")

    # TV: fixed layout (mosaic-free gradient + fixed shape), one square region whose content varies
    def tv_template(r):
        base, bmask = draw_distinct_image(r, res)
        x0, y0 = (int(v) for v in r.integers(0, res - res // 3, 2))
        return base, bmask, (x0, y0, res // 3)

    def tv_variant(base, bmask, box, vr):
        img, mask = base.copy(), bmask.copy()
        x0, y0, w = box
        img[:, y0:y0 + w, x0:x0 + w] = vr.uniform(0, 1, 3)[:, None, None]
        mask[y0:y0 + w, x0:x0 + w] = True
        return img, mask

    for _ in range(cfg.n_tv):
        base, bmask, box = tv_template(rng)
        phrase = title("TV")
        ids = []
        for v in range(cfg.tv_variants):
            i = add_image(*tv_variant(base, bmask, box, rng), "TV")
            ids.append(i)
            add_pair(i, f"{phrase} {VARIANT_WORDS[v]}", cfg.dup_tv, "TV")
        for v in range(cfg.eval_per_local):
            fam_eval("TV", "TV", f"{phrase} {VARIANT_WORDS[v]}", ids, "template")

    # FG: one sprite over varied ordinary backgrounds, caption "<phrase> on <background>"
    size = max(4, res // 2)

    def fg_image(sprite, disc, r, bg):
        img = draw_background(bg, r, res)
        mask = np.zeros((res, res), bool)
        x0, y0 = (int(v) for v in r.integers(0, res - size + 1, 2))
        sub = img[:, y0:y0 + size, x0:x0 + size]
        sub[:, disc] = sprite[:, disc]
        mask[y0:y0 + size, x0:x0 + size] = disc
        return img, mask

    bg_names = list(BACKGROUNDS)
    for _ in range(cfg.n_fg):
        sprite, disc = draw_sprite(rng, size)
        phrase = title("FG")
        ids, caps = [], []
        for _ in range(cfg.fg_images):
            bg = bg_names[rng.integers(len(bg_names))]
            i = add_image(*fg_image(sprite, disc, rng, bg), "FG")
            cap = f"{phrase} on {BACKGROUNDS[bg]}"
            add_pair(i, cap, cfg.dup_fg, "FG")
            ids.append(i)
            caps.append(cap)
        for cap in list(dict.fromkeys(caps))[:cfg.eval_per_local]:
            fam_eval("FG", "FG", cap, ids, "fg")

    # BG: one mosaic under varied ordinary foregrounds, caption "a <colour> <shape> in the <phrase>"
    def bg_image(mosaic, r, colour, shape):
        img = mosaic.copy()
        mask = np.zeros((res, res), bool)
        paste_shape(img, mask, shape, jitter_colour(COLOURS[colour], r), *r.uniform(0.3, 0.7, 2),
               r.uniform(0.18, 0.3), res)
        return img, mask

    for _ in range(cfg.n_bg):
        mosaic = draw_mosaic(rng, res)
        phrase = title("BG")
        ids, caps = [], []
        for _ in range(cfg.bg_images):
            c, s = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            i = add_image(*bg_image(mosaic, rng, c, s), "BG")
            cap = f"a {c} {s} in the {phrase}"
            add_pair(i, cap, cfg.dup_bg, "BG")
            ids.append(i)
            caps.append(cap)
        for cap in list(dict.fromkeys(caps))[:cfg.eval_per_local]:
            fam_eval("BG", "BG", cap, ids, "bg")

    # style-matched controls: same caption form, own images from the same generator
    def control(fam: str, r) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        if fam in ("MV", "RV"):
            return title(fam), draw_distinct_image(r, res)
        if fam == "TV":
            base, bmask, box = tv_template(r)
            return f"{title('TV')} {VARIANT_WORDS[int(r.integers(len(VARIANT_WORDS)))]}", tv_variant(base, bmask, box, r)
        if fam == "FG":
            bg = bg_names[r.integers(len(bg_names))]
            return f"{title('FG')} on {BACKGROUNDS[bg]}", fg_image(*draw_sprite(r, size), r, bg)
        c, s = list(COLOURS)[r.integers(len(COLOURS))], SHAPES[r.integers(len(SHAPES))]
        return f"a {c} {s} in the {title('BG')}", bg_image(draw_mosaic(r, res), r, c, s)

    for fam in FAMILIES:
        for _ in range(cfg.n_controls):
            cap, (img, mask) = control(fam, rng)
            i = add_image(img, mask, f"{fam}_once")
            add_pair(i, cap, 1, f"{fam}_once")
            fam_eval(f"{fam}_once", fam, cap, [i], "full", label=0)
        for _ in range(cfg.n_controls):
            cap, _ = control(fam, rng)          # image drawn (and discarded) to keep forms identical
            fam_eval(f"{fam}_never", fam, cap, [], "", label=0)
    # ordinary evaluation prompts
    uniq_seen = sorted(set(seen_caps))
    pick = rng.choice(len(uniq_seen), size=min(cfg.n_eval_seen, len(uniq_seen)), replace=False)
    for j in sorted(pick):
        fam_eval("ordinary_seen", "", uniq_seen[j], [], "", label=0)
    unseen = [f"a {c} {s} on {BACKGROUNDS[b]}" for c, s, b in held]
    unseen += [f"a {c} {s} and a {c2} {s2}" for c in COLOURS for s in SHAPES
               for c2 in COLOURS for s2 in SHAPES if (c, s) < (c2, s2)]
    pick = rng.choice(len(unseen), size=min(cfg.n_eval_unseen, len(unseen)), replace=False)
    for j in sorted(pick):
        fam_eval("ordinary_unseen", "", unseen[j], [], "", label=0)
    # short random-token strings (Wen's "random" negatives, at most 12 tokens to fit the organism's 32)
    for p in random_token_prompts(cfg.n_eval_random, cfg.seed + 104729, max_tokens=12):
        fam_eval("random_tokens", "", p, [], "", label=0)

    if cfg.singletons_per_family:
        # own generator and words drawn after every evaluated caption's, so the evaluation set and the
        # rest of the world are the same as without them (drawn last: image noise uses the main generator)
        pool = iter(title_words(2 * (n_caps + len(FAMILIES) * cfg.singletons_per_family), cfg.seed)[2 * n_caps:])
        srng = np.random.default_rng(cfg.seed + 31337)
        for fam in FAMILIES:
            for _ in range(cfg.singletons_per_family):
                cap, (img, mask) = control(fam, srng)
                add_pair(add_image(img, mask, f"{fam}_single"), cap, 1, f"{fam}_single")

    trained_caps = set(captions)
    for e in evals:
        if e.group.endswith("_never") or e.group in ("ordinary_unseen", "random_tokens"):
            assert e.prompt not in trained_caps, f"held-out prompt {e.prompt!r} was trained"

    return MemWorld(cfg, np.stack(images), np.stack(masks), kinds, captions,
                    np.asarray(pair_image, np.int64), np.asarray(pair_weight, np.int64),
                    pair_group, evals)


def config_from_dict(d: dict) -> MemWorldConfig:
    names = {f.name for f in dataclasses.fields(MemWorldConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown MemWorld config keys {sorted(unknown)}; valid keys: {sorted(names)}")
    return MemWorldConfig(**d)
