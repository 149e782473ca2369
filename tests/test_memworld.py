"""tasks.memworld: determinism, the default world's evaluation groups and training weights, and the
planted structure (masks, shared backgrounds and sprites)."""

from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
import pytest

from tasks.memworld import FAMILIES, MemWorldConfig, build_memworld, config_from_dict
from tasks.organism import small_config


@pytest.fixture(scope="module", params=["v1", "v2"])
def world(request):
    """The organisms' worlds (v1's is ``MemWorldConfig()``; v2 adds singletons, drops title nouns)."""
    from tasks.organism import organism_config
    return build_memworld(organism_config(request.param).world)


def units(w, fam: str, size: int) -> list[np.ndarray]:
    """Image indices of each planted unit of family ``fam`` (consecutive blocks of ``size``)."""
    ids = np.nonzero(np.asarray(w.image_kind) == fam)[0]
    assert len(ids) % size == 0
    return [ids[u:u + size] for u in range(0, len(ids), size)]


# ----------------------------------------------------------------------------- determinism
def test_deterministic(small_world):
    cfg = small_config().world
    a, b = build_memworld(cfg), build_memworld(cfg)
    assert a.sha256 == b.sha256 == small_world.sha256
    assert np.array_equal(a.images, b.images) and np.array_equal(a.masks, b.masks)
    assert a.captions == b.captions and a.eval_prompts == b.eval_prompts
    c = build_memworld(dataclasses.replace(cfg, seed=1))
    assert c.sha256 != a.sha256
    assert c.images.shape == a.images.shape and not np.array_equal(c.images, a.images)
    assert c.captions != a.captions


def test_small_world_shape(small_world):
    w, cfg = small_world, small_config().world
    n = (cfg.n_ordinary + cfg.n_mv + cfg.n_rv + cfg.n_tv * cfg.tv_variants + cfg.n_fg * cfg.fg_images
         + cfg.n_bg * cfg.bg_images + len(FAMILIES) * cfg.n_controls)
    assert w.n_images == n == len(w.masks) == len(w.image_kind)
    assert w.images.shape == (n, 3, cfg.res, cfg.res)
    assert len(w.captions) == len(w.pair_image) == len(w.pair_weight) == len(w.pair_group)


# ----------------------------------------------------------------------------- default world
def test_eval_prompt_counts(world):
    ev = world.eval_prompts
    mem = [e for e in ev if e.label == 1]
    non = [e for e in ev if e.label == 0]
    assert len(mem) >= 100
    assert len(non) >= 400
    by_group = collections.Counter(e.group for e in ev)
    for fam in FAMILIES:
        assert sum(e.group == fam for e in mem) >= 20, fam
        assert by_group[f"{fam}_once"] > 0 and by_group[f"{fam}_never"] > 0, fam
    for g in ("ordinary_seen", "ordinary_unseen", "random_tokens"):
        assert by_group[g] > 0, g
    assert {e.group for e in mem} == set(FAMILIES)
    assert all(e.group in FAMILIES or e.group.split("_")[0] in FAMILIES or e.group.startswith(
        ("ordinary_", "random_")) for e in non)
    assert len({e.id for e in ev}) == len(ev)
    # memorized prompts point at training images, never-trained ones at none
    n = world.n_images
    assert all(e.targets and all(0 <= t < n for t in e.targets) for e in mem)
    assert all(e.targets == () for e in ev if e.group.endswith("_never"))


def test_held_out_prompts_never_trained(world):
    trained = set(world.captions)
    held = [e for e in world.eval_prompts
            if e.group.endswith("_never") or e.group in ("ordinary_unseen", "random_tokens")]
    assert len(held) >= 200
    assert not [e.prompt for e in held if e.prompt in trained]
    seen = [e for e in world.eval_prompts if e.group == "ordinary_seen"]
    assert all(e.prompt in trained for e in seen)


def test_training_weights(world):
    cfg = world.config
    counts = collections.Counter(world.captions)
    idx = {c: i for i, c in enumerate(world.captions)}
    for e in world.eval_prompts:
        if e.group.endswith("_once"):
            assert counts[e.prompt] == 1, e.prompt
            i = idx[e.prompt]
            assert world.pair_weight[i] == 1
            assert world.image_kind[world.pair_image[i]] == e.group
            assert list(e.targets) == [world.pair_image[i]]
        elif e.group == "MV":
            assert counts[e.prompt] == 1
            i = idx[e.prompt]
            assert world.pair_weight[i] == cfg.dup_mv
            assert list(e.targets) == [world.pair_image[i]]
        elif e.group == "RV":
            assert world.pair_weight[idx[e.prompt]] == cfg.dup_rv
    groups = np.asarray(world.pair_group)
    assert (world.pair_weight[groups == "MV"] == cfg.dup_mv).all()
    assert (world.pair_weight[groups == "ordinary"] == 1).all()
    # RV: each image carries rv_captions different captions
    rv = collections.Counter(world.pair_image[groups == "RV"].tolist())
    assert len(rv) == cfg.n_rv and set(rv.values()) == {cfg.rv_captions}


def test_ordinary_captions_underspecify(world):
    base = re.compile(r"^a (\w+) (circle|square|triangle|cross)$")
    images = collections.defaultdict(set)
    for cap, i in zip(world.captions, world.pair_image):
        if world.image_kind[i] == "ordinary" and base.match(cap):
            images[cap].add(int(i))
    assert len(images) >= 15
    assert "a red circle" in images
    assert min(len(v) for v in images.values()) >= 10


def test_images_and_masks_types(world):
    assert world.images.dtype == np.float32
    assert world.images.min() >= 0 and world.images.max() <= 1
    assert world.masks.dtype == bool
    assert world.masks.shape == (world.n_images, world.config.res, world.config.res)
    assert world.masks.reshape(world.n_images, -1).any(1).all()     # every image has a foreground


def test_mv_masks_partial(world):
    mv = np.nonzero(np.asarray(world.image_kind) == "MV")[0]
    assert len(mv) == world.config.n_mv
    cover = world.masks[mv].reshape(len(mv), -1).mean(1)
    assert (cover > 0).all() and (cover < 1).all()


def test_bg_units_share_background(world):
    cfg = world.config
    tol = 6 * cfg.noise_std             # deviations from the unit's median are noise (max ~4.6 sigma)
    medians = []
    for uid in units(world, "BG", cfg.bg_images):
        im, outside = world.images[uid], ~world.masks[uid][:, None].repeat(3, 1)
        arr = np.where(outside, im, np.nan)
        med = np.nanmedian(arr, 0)
        assert not np.isnan(med).any()                  # every pixel is background somewhere
        dev = np.abs(arr - med)[outside]
        assert dev.max() < tol
        assert dev.mean() < 1.5 * cfg.noise_std
        medians.append(med)
    # different units really have different backgrounds (the check above is not vacuous)
    for a in range(len(medians)):
        for b in range(a + 1, len(medians)):
            assert np.abs(medians[a] - medians[b]).mean() > 0.1


def test_fg_units_share_sprite(world):
    cfg = world.config
    tol = 6 * cfg.noise_std
    sprites = []
    for uid in units(world, "FG", cfg.fg_images):
        m = world.masks[uid]
        assert len({int(x.sum()) for x in m}) == 1          # the same disc, translated
        sp = np.stack([world.images[j][:, m[k]] for k, j in enumerate(uid)])   # [n, 3, pixels]
        med = np.median(sp, 0)
        assert np.abs(sp - med).max() < tol
        sprites.append(med)
        # the positions vary (the sprite is not simply a fixed image)
        assert len({x.tobytes() for x in m}) > 1
    for a in range(len(sprites)):
        for b in range(a + 1, len(sprites)):
            assert np.abs(sprites[a] - sprites[b]).mean() > 0.1


def test_config_from_dict():
    assert config_from_dict({"seed": 3, "res": 8}) == MemWorldConfig(seed=3, res=8)
    with pytest.raises(ValueError, match="unknown MemWorld config keys.*n_imgs"):
        config_from_dict({"n_imgs": 3})
