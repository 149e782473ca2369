"""Tests for tasks.organism_clip: build, save (safetensors), load, score, determinism, missing folder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.organism_clip import (
    ClipConfig, build_clip, distinct_pairs, load_clip_scorer, multi_positive_loss, positives,
)

CFG = ClipConfig(steps=20, batch_size=64)


@pytest.fixture(scope="module")
def built(small_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_a")
    return root, build_clip(small_world, CFG, root, progress=False)


def test_build_writes_safetensors_and_config(built):
    root, d = built
    assert d == root / "clip"
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["clip_config"] == {"steps": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "seed": 0}
    assert cfg["architecture"]["embed_dim"] == 64 and cfg["architecture"]["text_cfg"]["context_length"] == 32
    assert np.isfinite(cfg["train"]["final_loss"]) and cfg["train"]["train_seconds"] > 0
    ev = cfg["eval"]
    assert 0.0 <= ev["retrieval_top1"] <= 1.0 and 0.0 < ev["retrieval_chance"] < 1.0
    assert np.isfinite(ev["clip_score_matched"]) and np.isfinite(ev["clip_score_shuffled"])


def test_load_scores_finite_and_deterministic(built, small_world):
    root, _ = built
    scorer = load_clip_scorer(root)
    idx, caps = distinct_pairs(small_world)
    imgs = small_world.images[idx[:40]]
    s1 = scorer.score(imgs, caps[:40])
    s2 = load_clip_scorer(root).score(imgs, caps[:40])
    assert s1.shape == (40,) and s1.dtype == np.float32 and np.isfinite(s1).all()
    assert (s1 >= 0).all() and (s1 <= 100).all()
    np.testing.assert_array_equal(s1, s2)
    raw = scorer.score(imgs, caps[:40], raw=True)
    assert np.isfinite(raw).all() and (np.abs(raw) <= 1 + 1e-5).all()
    # the loaded model reproduces the build-time evaluation
    cfg = json.loads((root / "clip" / "config.json").read_text())
    np.testing.assert_allclose(scorer.score(small_world.images[idx], caps).mean(),
                               cfg["eval"]["clip_score_matched"], rtol=1e-5)


def test_same_seed_same_weights(built, small_world, tmp_path):
    from safetensors.torch import load_file

    _, d = built
    d2 = build_clip(small_world, CFG, tmp_path, progress=False)
    a, b = load_file(str(d / "model.safetensors")), load_file(str(d2 / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sd = load_clip_scorer(tmp_path).model.state_dict()
    assert all(torch.equal(sd[k], a[k]) for k in a)


def test_distinct_pairs_ignore_duplication(small_world):
    idx, caps = distinct_pairs(small_world)
    assert len(set(zip(idx.tolist(), caps))) == len(caps) == len(small_world.captions)
    assert len(set(caps)) < len(caps)            # ordinary captions repeat: multi-positive is needed


def test_multi_positive_loss_target():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    # pairs 0, 1 share a caption (identical text features); pairs 2, 3 share an image (RV-like)
    img, txt = f[[0, 1, 2, 2]], f[[0, 0, 2, 3]]
    cap, im = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 2])
    pos = positives(cap, im)
    assert pos.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    scale = torch.tensor(100.0)
    multi = multi_positive_loss(img, txt, scale, cap, im)
    # exact duplicates: same value as CLIP's one-hot target, floor = mean log(#positives) = ln 2 here
    logits = scale * img @ txt.T
    onehot = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    torch.testing.assert_close(multi, onehot)
    assert float(multi) >= math.log(2) - 1e-6
    # aligned embeddings (each caption's text equal to its images) reach the floor
    aligned = multi_positive_loss(f[[0, 0, 2, 2]], f[[0, 0, 2, 2]], scale, cap, im)
    assert abs(float(aligned) - math.log(2)) < 1e-3 and float(multi) > float(aligned) + 0.1


def test_missing_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make organism"):
        load_clip_scorer(tmp_path / "nothing")
