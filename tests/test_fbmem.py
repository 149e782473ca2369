"""FB-Mem metric: MS-SSIM, segmenters, categories on constructed cases, top-k links, mitigation score."""
from __future__ import annotations

import numpy as np
import pytest

from bench.measure.fbmem import (CATEGORIES, TRANSITION_REWARD, FBMemConfig, FBThresholds,
                         calibrate_thresholds, categorize, category_shares, classify_generations,
                         fbmem_scores, fg_bg_images, mitigation_score, transition_counts)
from bench.measure.msssim import MSSSIMConfig, ms_ssim, ms_ssim_matrix, ms_ssim_pairs, ssim_map
from bench.measure.segment import BorderPaletteSegmenter, RembgSegmenter, check_masks, get_segmenter, mask_iou
from tasks.memworld_segment import CNNSegmenterConfig, MemWorldCNNSegmenter
from tasks.memworld_draw import draw_background, draw_mosaic, draw_sprite

RES = 16


# ----------------------------------------------------------------------------- MS-SSIM
def test_ssim_map_matches_scikit_image_away_from_borders():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 3, 40, 40)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
    ours = ssim_map(a, b, kernel_size=11, sigma=1.5)
    for i in range(2):
        _, ref = structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1.0, channel_axis=0, full=True)
        # interiors agree; borders differ only by padding mode (reflect vs scipy's symmetric)
        np.testing.assert_allclose(ours[i][:, 5:-5, 5:-5], ref[:, 5:-5, 5:-5], atol=1e-5)


def test_ms_ssim_identity_symmetry_and_pairwise_consistency():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (4, 3, RES, RES))
    b = rng.uniform(0, 1, (5, 3, RES, RES))
    np.testing.assert_allclose(ms_ssim(a, a), 1.0, atol=1e-6)
    m = ms_ssim_matrix(a, b)
    np.testing.assert_allclose(m, ms_ssim_matrix(b, a).T, atol=1e-6)
    np.testing.assert_allclose(m[np.arange(4), np.arange(4)], ms_ssim(a, b[:4]), atol=1e-6)
    np.testing.assert_allclose(ms_ssim_pairs(a, b, [3, 0], [1, 4]), [m[3, 1], m[0, 4]], atol=1e-6)
    assert (m < 0.5).all()                             # independent noise images are dissimilar
    assert np.isclose(sum(MSSSIMConfig().betas), 1.0)


def test_ms_ssim_rejects_images_too_small_for_the_window():
    x = np.zeros((1, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(x, x)
    ms_ssim(x, x, MSSSIMConfig(scales=2))              # 8 px fits 2 scales of a 5-tap window


# ----------------------------------------------------------------------------- constructed cases
def _compose(bg: np.ndarray, sprite: np.ndarray, disc: np.ndarray, y0: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
    img = bg.copy()
    mask = np.zeros((RES, RES), bool)
    s = disc.shape[0]
    img[:, y0:y0 + s, x0:x0 + s][:, disc] = sprite[:, disc]
    mask[y0:y0 + s, x0:x0 + s] = disc
    return img, mask


@pytest.fixture(scope="module")
def constructed():
    """Training image 0 = background T1 + sprite S at P; distractors; generations that copy both,
    only the foreground, only the background, or neither."""
    rng = np.random.default_rng(7)
    t1, t2 = draw_mosaic(rng, RES), draw_background("stripes", rng, RES)
    s1, d1 = draw_sprite(rng, 8)
    s2, d2 = draw_sprite(rng, 8)
    train, tmask = zip(*[_compose(t1, s1, d1, 4, 3)]
                      + [_compose(draw_background(k, rng, RES), *draw_sprite(rng, 8), *rng.integers(0, 9, 2))
                         for k in ("solid", "gradient", "checker", "blobs", "gradient", "solid")])
    gens, gmask = zip(_compose(t1, s1, d1, 4, 3),          # VM
                      _compose(t2, s1, d1, 4, 3),          # FM: same sprite, same place, other background
                      _compose(t1, s2, d2, 5, 6),          # BM: same background, other sprite elsewhere
                      _compose(t2, s2, d2, 5, 6))          # NM
    noise = rng.normal(0, 0.015, (4, 3, RES, RES))
    gens = np.clip(np.stack(gens) + noise, 0, 1).astype(np.float32)
    return np.stack(train).astype(np.float32), np.stack(tmask), gens, np.stack(gmask)


# fixed thresholds for the constructed cases (organism-scale similarity levels; not world-bound)
THR = FBThresholds(0.8245, 0.7780, "test constant")


def test_categories_on_constructed_cases(constructed):
    train, tmask, gens, gmask = constructed
    scores = fbmem_scores(gens, gmask, train, tmask)                   # exhaustive top-k, as the release
    assert list(scores.columns) == ["gen", "rank", "train_idx", "fg_sim", "bg_sim", "avg_sim", "degenerate_rule"]
    assert (scores.groupby("gen")["avg_sim"].apply(lambda s: s.is_monotonic_decreasing)).all()
    per_gen = classify_generations(scores, THR)
    assert per_gen["category"].tolist() == ["VM", "FM", "BM", "NM"]
    assert per_gen["train_idx"].tolist()[:3] == [0, 0, 0]           # the copies link to the copied image
    assert category_shares(per_gen["category"]) == {"fbmem_vm": 0.25, "fbmem_fm": 0.25, "fbmem_bm": 0.25,
                                                    "fbmem_nm": 0.25}


def test_world_thresholds_are_stored_by_sha256_and_refused_elsewhere(small_world, tmp_path):
    """Thresholds belong to the world they were calibrated on: stored with its sha256, reused, and
    refused for another world (stored file or in memory)."""
    import dataclasses
    import json

    from bench.measure.fbmem import FBMemThresholdError, check_world, thresholds_for
    from tasks.memworld import build_memworld

    thr = thresholds_for(small_world, store_dir=tmp_path, progress=False)
    f = tmp_path / f"fbmem_thresholds_{small_world.sha256[:16]}.json"
    d = json.loads(f.read_text())
    assert d["world_sha256"] == small_world.sha256 == thr.world_sha256
    assert thr.source.startswith("calibrate_thresholds") and "masked" in thr.source
    assert 0 < thr.fg <= 1 and 0 < thr.bg <= 1
    assert thresholds_for(small_world, store_dir=tmp_path, progress=False) == thr        # read back, not recomputed
    check_world(thr, small_world)
    other = build_memworld(dataclasses.replace(small_world.config, seed=small_world.config.seed + 1))
    with pytest.raises(FBMemThresholdError, match="another world|used on world"):
        check_world(thr, other)
    f.write_text(json.dumps({**d, "world_sha256": other.sha256}))           # a file made for another world
    with pytest.raises(FBMemThresholdError, match="another world"):
        thresholds_for(small_world, store_dir=tmp_path, progress=False)


def test_given_candidates_score_the_same_pairs_and_rank_by_average(constructed):
    train, tmask, gens, gmask = constructed
    full = fbmem_scores(gens, gmask, train, tmask, cfg=FBMemConfig(top_k=len(train)))
    cand = np.array([[3, 0], [0, 5], [1, 0], [2, 4]])
    sub = fbmem_scores(gens, gmask, train, tmask, match_idx=cand)
    assert sub.groupby("gen").size().tolist() == [2] * 4
    merged = sub.merge(full, on=["gen", "train_idx"], suffixes=("", "_full"))
    assert len(merged) == 8
    np.testing.assert_allclose(merged["fg_sim"], merged["fg_sim_full"], atol=1e-9)
    np.testing.assert_allclose(merged["bg_sim"], merged["bg_sim_full"], atol=1e-9)
    assert sub[sub["rank"] == 0]["train_idx"].tolist()[:3] == [0, 0, 0]


def test_one_generation_links_to_a_cluster_of_training_images():
    """Three training images share a background under different sprites (a BG-family unit): a
    generation with that background and a new sprite is BM and links to all three."""
    rng = np.random.default_rng(3)
    t = draw_mosaic(rng, RES)
    spr = [draw_sprite(rng, 6) for _ in range(4)]
    unit = [_compose(t, *spr[i], *pos) for i, pos in enumerate([(1, 1), (8, 2), (2, 9)])]
    others = [_compose(draw_background(k, rng, RES), *draw_sprite(rng, 6), 5, 5) for k in ("stripes", "blobs", "solid")]
    train, tmask = (np.stack(v) for v in zip(*(unit + others)))
    gen, gmask = _compose(t, *spr[3], 9, 9)
    scores = fbmem_scores(gen[None].astype(np.float32), gmask[None], train.astype(np.float32), tmask,
                          cfg=FBMemConfig(top_k=4))
    row = classify_generations(scores, THR).iloc[0]
    assert row["category"] == "BM"
    assert sorted(row["linked_train_idx"]) == [0, 1, 2]


def test_foreground_and_background_images_and_degenerate_rule(constructed):
    train, tmask, gens, gmask = constructed
    f, b = fg_bg_images(train[:1], tmask[:1])
    assert (f[0][:, ~tmask[0]] == 0).all() and (b[0][:, tmask[0]] == 1).all()
    np.testing.assert_array_equal(f[0][:, tmask[0]], train[0][:, tmask[0]])
    # a generation segmented as all foreground: its F image scores the background too (release rule)
    all_fg = np.ones_like(gmask[:1])
    _, tb = fg_bg_images(train[:1], tmask[:1])
    blank = fbmem_scores(gens[:1], all_fg, train, tmask, match_idx=np.array([[0]]), cfg=FBMemConfig(region="blank"))
    assert blank["degenerate_rule"].iloc[0] == "fg_for_bg"
    # release: MS-SSIM of the training B image and the generation's F image (= the whole generation)
    assert blank["bg_sim"].iloc[0] == pytest.approx(ms_ssim(tb, gens[:1])[0], abs=1e-6)
    masked = fbmem_scores(gens[:1], all_fg, train, tmask, match_idx=np.array([[0]]))
    # masked: the training image's background region decides, compared with the whole generation there
    expect = ms_ssim_pairs(tb, gens[:1], [0], [0], weights_a=~tmask[:1], weights_b=all_fg, region="both")[0]
    assert masked["bg_sim"].iloc[0] == pytest.approx(expect, abs=1e-6)
    assert expect >= THR.bg             # the copied background is still recognised
    none_fg = np.zeros_like(gmask[:1])
    assert fbmem_scores(gens[:1], none_fg, train, tmask, match_idx=np.array([[0]]))["degenerate_rule"].iloc[0] == "bg_for_fg"


# ----------------------------------------------------------------------------- categories and mitigation score
def test_categorize_thresholds_are_inclusive_and_separate():
    thr = FBThresholds(fg=0.6, bg=0.4)
    got = categorize([0.6, 0.59, 0.6, 0.1], [0.4, 0.4, 0.39, 0.39], thr)
    assert got.tolist() == ["VM", "BM", "FM", "NM"]


def test_mitigation_score_uses_the_release_transition_table():
    assert set(TRANSITION_REWARD) == {(a, b) for a in CATEGORIES for b in CATEGORIES}
    assert all(TRANSITION_REWARD[(c, c)] == 0 for c in CATEGORIES)
    before = ["VM", "VM", "FM", "BM", "NM"]
    after = ["NM", "BM", "VM", "FM", "NM"]
    assert mitigation_score(before, after) == pytest.approx((2 + 1.5 - 0.5 - 0.5 + 0) / 5)
    assert mitigation_score(["VM"] * 3, ["NM"] * 3) == 2.0
    counts = transition_counts(before, after)
    assert counts.loc["VM", "NM"] == 1 and counts.values.sum() == 5


def test_mitigation_score_bad_input():
    with pytest.raises(ValueError, match="pair them"):
        mitigation_score(["VM"], ["VM", "NM"])
    with pytest.raises(ValueError, match="unknown categories"):
        mitigation_score(["VM"], ["XM"])


def test_bad_masks_and_candidates_are_named(constructed):
    train, tmask, gens, gmask = constructed
    with pytest.raises(ValueError, match="gen_masks: expected a bool"):
        fbmem_scores(gens, gmask.astype(np.uint8), train, tmask)
    with pytest.raises(ValueError, match="train_masks: expected shape"):
        fbmem_scores(gens, gmask, train, tmask[:2])
    with pytest.raises(IndexError, match="match_idx"):
        fbmem_scores(gens, gmask, train, tmask, match_idx=np.full((4, 1), 99))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fbmem_scores(gens * 255, gmask, train, tmask)
    with pytest.raises(ValueError, match="needs an embedder"):
        fbmem_scores(gens, gmask, train, tmask, cfg=FBMemConfig(similarity="sscd"))


# ----------------------------------------------------------------------------- segmenters
def test_mask_iou_and_check_masks():
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True
    np.testing.assert_allclose(mask_iou(a, b), [0.5, 1.0])
    with pytest.raises(ValueError, match="expected shape"):
        check_masks(a, 3, (4, 4), "x")


def test_cnn_segmenter_is_deterministic_cached_and_beats_trivial_masks(tmp_path, small_world):
    from tasks.organism import small_config

    cfg = CNNSegmenterConfig(world=small_config(seed=1).world, steps=300, lr=1e-2)   # test-size training
    seg = MemWorldCNNSegmenter(cfg, cache=tmp_path)
    assert seg.path.is_file()
    again = MemWorldCNNSegmenter(cfg, cache=tmp_path)                # loads, does not retrain
    held_out = small_world                                           # seed 0: never seen in training
    m = seg.masks(held_out.images)
    assert m.dtype == bool and m.shape == held_out.masks.shape
    np.testing.assert_array_equal(m, again.masks(held_out.images))
    iou = mask_iou(m, held_out.masks).mean()
    trivial = mask_iou(np.ones_like(held_out.masks), held_out.masks).mean()   # everything foreground
    assert iou > trivial + 0.2
    assert isinstance(get_segmenter("border_palette"), BorderPaletteSegmenter)


def test_rembg_segmenter_without_weights_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    with pytest.raises((ImportError, FileNotFoundError), match="rembg"):
        RembgSegmenter().masks(np.zeros((1, 3, RES, RES), np.float32))


# ----------------------------------------------------------------------------- calibration
def test_calibration_on_small_world(small_world):
    thr, diag = calibrate_thresholds(small_world, n_query=60, seed=0)
    assert 0 < thr.fg <= 1 and 0 < thr.bg <= 1
    assert diag["n_query"] == 60
    # a shared background clears tau_bg far more often than the 1% null rate
    assert diag["same_background"]["share_bg_ge_tau"] > 0.2


def test_embedding_similarity_path_scores_copies_highest(constructed):
    """SSCD-FB path (cosine of embeddings of F and B images), run with the cheap pixel embedder."""
    from bench.measure.embed import PixelEmbedder

    train, tmask, gens, gmask = constructed
    s = fbmem_scores(gens, gmask, train, tmask, match_idx=np.zeros((4, 1), int),
                     cfg=FBMemConfig(similarity="sscd"), embedder=PixelEmbedder(progress=False))
    fg, bg = s["fg_sim"].to_numpy(), s["bg_sim"].to_numpy()
    assert fg[0] > 0.99 and bg[0] > 0.99                         # verbatim copy
    assert fg[1] > 0.99 and bg[1] < bg[0]                        # same foreground, other background
    assert bg[2] > bg[3] and fg[2] < fg[1]                       # same background, other foreground
