"""Training-time random-token addition: a fresh draw per training sample by default (Somepalli et al.),
the earlier per-pair pool as ``draw="pool"``, both seeded and recorded in ``params()``."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import bench.core.train
from baselines.mitigators.prompt_augment import insert_items, random_vocab_words
from baselines.mitigators.train_augment import (RandomTokenCaptions, TrainRandomTokens, split_weights)
from tasks.finetune_world import WorldFinetuner, finetune_config_from_dict, finetune_world, train_data

FT = WorldFinetuner()   # the organism world's fine-tuning protocol (bench.contracts.Finetuner)
TINY = {"n_mv": 2, "dup_mv": 6, "n_fg": 1, "fg_images": 3, "dup_fg": 2, "eval_fg": 2, "n_bg": 1, "bg_images": 3,
        "dup_bg": 2, "eval_bg": 2, "n_utility": 2,
        "train": {"steps": 3, "batch_size": 8, "warmup": 1, "checkpoint_every": 2, "threads": 0}}
CAPS = ["a red circle", "zork blip poster", "a blue square in the quux room"]


@pytest.fixture(scope="module")
def tok(small_organism):
    return small_organism.tokenizer


def test_fresh_draws_differ_per_sample_and_step(tok):
    h = RandomTokenCaptions(tok, p=1.0, n_tokens=1, seed=0, train_seed=0)
    pairs = torch.zeros(16, dtype=torch.long)                           # one caption drawn 16 times
    got = h.captions(0, pairs, CAPS)
    assert sorted(got) == list(range(16))                               # p = 1: every sample augmented
    assert len(set(got.values())) >= 14                                 # fresh tokens per sample
    for c in got.values():                                              # the caption's words in order + 1
        words, it = c.split(" "), iter(c.split(" "))
        assert len(words) == len(CAPS[0].split(" ")) + 1 and all(w in it for w in CAPS[0].split(" "))
    nxt = h.captions(1, pairs, CAPS)
    assert set(nxt.values()) != set(got.values())                       # and per step
    pool_like = set(got.values()) | set(nxt.values())
    assert len(pool_like) > 4                                           # not a 4-variant pool


def test_fresh_draw_is_seeded(tok):
    pairs = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    a = RandomTokenCaptions(tok, 0.5, 2, seed=3, train_seed=0)
    b = RandomTokenCaptions(tok, 0.5, 2, seed=3, train_seed=0)
    for step in (0, 1, 7):
        assert a.captions(step, pairs, CAPS) == b.captions(step, pairs, CAPS)   # reproducible
    assert RandomTokenCaptions(tok, 0.5, 2, seed=3, train_seed=0).captions(7, pairs, CAPS) == \
        a.captions(7, pairs, CAPS)                                      # keyed by step: resume-safe
    other_seed = RandomTokenCaptions(tok, 0.5, 2, seed=4, train_seed=0).captions(0, pairs, CAPS)
    other_train = RandomTokenCaptions(tok, 0.5, 2, seed=3, train_seed=1).captions(0, pairs, CAPS)
    ref = RandomTokenCaptions(tok, 0.5, 2, seed=3, train_seed=0).captions(0, pairs, CAPS)
    assert other_seed != ref and other_train != ref
    for sub in (ref, other_seed):                                       # replacements keep the pair's caption
        for i, c in sub.items():
            assert len(c.split(" ")) == len(CAPS[int(pairs[i])].split(" ")) + 2
    assert RandomTokenCaptions(tok, 0.0, 1, 0, 0).captions(0, pairs, CAPS) == {}
    h = RandomTokenCaptions(tok, 0.3, 1, seed=0, train_seed=0)
    for step in range(200):
        h.captions(step, pairs, CAPS)
    r = h.report()
    assert r["samples_drawn"] == 1600 and r["steps_drawn"] == 200 and r["draw"] == "fresh"
    assert 0.25 < r["augmented_share"] < 0.35 and r["examples"]
    assert torch.equal(h.keep(None, torch.zeros(3, 1), None, None, None), torch.ones(3, dtype=torch.bool))


def test_default_is_fresh_and_params_record_it(small_organism, monkeypatch):
    rt = TrainRandomTokens(strength=0.5, finetune=TINY, finetuner=FT)
    assert rt.draw == "fresh" and rt.n_variants is None
    assert rt.method() == {"name": "train_random_token", "p": 0.5, "n_tokens": 1, "draw": "fresh"}
    assert rt.transform(small_organism, None, seed=0) is None           # no data change: per-batch hook
    rt.fit_seed = 5
    p = rt.params()
    assert p["draw"] == "fresh" and p["n_variants"] is None and "fresh per training sample" in p["draw_rule"]
    assert p["draw_seeds"] == {"fit_seed": 5, "train_seed": 0} and "step" in p["draw_rng"]
    (h,) = rt.hooks(small_organism, None)
    assert isinstance(h, RandomTokenCaptions) and (h.p, h.n_tokens, h.seed, h.train_seed) == (0.5, 1, 5, 0)
    assert hasattr(h, "captions") and hasattr(bench.core.train, "CaptionHook")   # the loop's caption seam
    with pytest.raises(ValueError, match="only applies to draw='pool'"):
        TrainRandomTokens(strength=0.5, n_variants=4)
    with pytest.raises(ValueError, match="draw must be one of"):
        TrainRandomTokens(strength=0.5, draw="per_epoch")
    with pytest.raises(ValueError, match="n_variants"):
        TrainRandomTokens(strength=0.5, draw="pool", n_variants=0)


def _legacy_pool(data, tok, p, n, pool, seed):
    """The earlier implementation (4 variants per caption, drawn once), verbatim."""
    variants = []
    for c in data.captions:
        rng = np.random.default_rng([int(seed), zlib.crc32(c.encode("utf-8")), 17])
        variants.append([insert_items(c, random_vocab_words(tok, n, rng), rng) for _ in range(pool)])
    return split_weights(data, p, variants)


def test_pool_keeps_the_old_behaviour(small_organism, small_world, tok):
    ftw = finetune_world(small_world, finetune_config_from_dict(TINY))
    data = train_data(ftw)
    rt = TrainRandomTokens(strength=0.5, draw="pool", finetune=TINY, finetuner=FT)
    assert rt.n_variants == 4                                           # the earlier default pool size
    assert rt.method() == {"name": "train_random_token", "p": 0.5, "n_tokens": 1, "pool": 4}   # old cache key
    assert rt.hooks(small_organism, ftw) == ()
    out, info = rt.transform(small_organism, ftw, seed=2)(data)
    ref = _legacy_pool(data, tok, 0.5, 1, 4, 2)
    assert out.captions == ref.captions and torch.equal(out.pair_weight, ref.pair_weight)
    assert torch.equal(out.pair_image, ref.pair_image)
    assert info["draw"] == "pool" and info["pool"] == 4 and info["pairs_after"] == 5 * len(data.captions)
    p = rt.params()
    assert p["draw"] == "pool" and p["n_variants"] == 4 and p["draw_rule"].startswith("pool (deviation)")


def test_conf_builds_the_fresh_default():
    from tasks.studies.finetune_mitigate import make_mitigator, mitigator_conf

    m = make_mitigator(mitigator_conf("train_random_token"), 0.5, TINY)
    assert isinstance(m, TrainRandomTokens) and m.draw == "fresh" and m.n_tokens == 1 and m.strength == 0.5


def test_fresh_fine_tune_end_to_end(small_organism, tmp_path):
    """THE training loop encodes the hook's captions per batch; the build is reproducible."""
    def same(u, v):
        a, b = u.state_dict(), v.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    runs = []
    for root in ("a", "b"):
        rt = TrainRandomTokens(strength=1.0, n_tokens=2, finetune=TINY, finetuner=FT, cache_dir=str(tmp_path / root))
        rt.fit(small_organism, seed=0)
        runs.append(rt)
    r = runs[0].fit_report
    (hook,) = r["hook_report"]
    assert hook["draw"] == "fresh" and hook["samples_drawn"] == 3 * 8 and hook["samples_augmented"] == 24
    assert r["finetune_cached"] is False and r["train_cost_ratio"] > 0
    assert hook == runs[1].fit_report["hook_report"][0]                 # same seed: same draws
    assert same(runs[0].finetuned.unet, runs[1].finetuned.unet)                # bit-reproducible build
    from baselines.mitigators.train_time import PlainFinetune
    plain = PlainFinetune(finetune=TINY, finetuner=FT, cache_dir=str(tmp_path / "a"))
    plain.fit(small_organism, seed=0)
    assert not same(plain.finetuned.unet, runs[0].finetuned.unet)              # the captions changed training


class _SwapSpy:
    """A caption hook replacing positions 0 and 2; ``keep`` checks the embeddings the loop used."""

    def __init__(self, model, captions):
        self.model, self.all, self.seen = model, captions, []

    def captions(self, step, pairs, captions):
        self.pairs = pairs.clone()
        return {0: f"zork {step} blip", 2: "quux quux"}

    def keep(self, model, x_t, t, emb, eps_pred):
        with torch.no_grad():
            self.seen.append((emb.clone(), model.encode([f"zork {len(self.seen)} blip", "quux quux"]),
                              model.encode([self.all[int(i)] for i in self.pairs]), model.encode([""])))
        return torch.ones(x_t.shape[0], dtype=torch.bool)


def test_caption_seam_contract(small_organism, small_world, tmp_path):
    """The loop encodes a hook's per-batch captions for those samples only; dropped samples stay empty."""
    import copy

    from bench.core.train import TrainConfig, train
    from tasks.finetune_world import model_with_unet

    data = train_data(finetune_world(small_world, finetune_config_from_dict(TINY)))
    for dropout in (0.0, 1.0):
        ft = model_with_unet(small_organism, copy.deepcopy(small_organism.unet))
        spy = _SwapSpy(ft, data.captions)
        train(ft, data, TrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=10, caption_dropout=dropout),
              tmp_path / str(dropout), hooks=(spy,), progress=False)
        for emb, swapped, orig, empty in spy.seen:
            if dropout == 0.0:
                assert torch.allclose(emb[[0, 2]], swapped, atol=1e-6)
                assert torch.allclose(emb[[1, 3]], orig[[1, 3]], atol=1e-6)
            else:
                assert torch.allclose(emb, empty.expand_as(emb), atol=1e-6)
