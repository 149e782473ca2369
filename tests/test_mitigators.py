"""Prompt-side mitigators (RTA, RNA, CWR, GNI, embedding optimisation): identity at strength 0,
model untouched (also on error), insertion rules, batching exactness of the embedding optimiser."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.contracts import GenSpec

from baselines.mitigators.base import NoMitigation
from baselines.mitigators.embed_opt import EmbeddingOptimization
from baselines.mitigators.gaussian_noise import GaussianNoiseInjection
from baselines.mitigators.prompt_augment import (CaptionWordRepetition, RandomNumberAddition,
                                                 RandomTokenAddition, random_vocab_words)
from bench.core.patching import state_digest
from bench.core.sampling import sample

SPEC = GenSpec(steps=4, guidance=7.5, batch_size=8)
PROMPTS = ["a red circle on a striped background", "zorbix quantelle hexagon poster"]
SEEDS = [0, 1]
ALL = [RandomTokenAddition, RandomNumberAddition, CaptionWordRepetition, GaussianNoiseInjection, EmbeddingOptimization]


@pytest.fixture(scope="module")
def plain(small_organism):
    return sample(small_organism, PROMPTS, SEEDS, steps=SPEC.steps, guidance=SPEC.guidance).images


@pytest.mark.parametrize("cls", ALL + [NoMitigation])
def test_strength_zero_is_identity_and_model_untouched(cls, small_organism, plain):
    d0 = state_digest(small_organism.unet)
    out = cls(strength=0).generate(small_organism, PROMPTS, SEEDS, SPEC, seed=0)
    assert torch.equal(out.images, plain)
    assert state_digest(small_organism.unet) == d0


@pytest.mark.parametrize("cls,strength", [(RandomTokenAddition, 4), (RandomNumberAddition, 4),
                                          (CaptionWordRepetition, 4), (GaussianNoiseInjection, 0.5),
                                          (EmbeddingOptimization, 20.0)])
def test_mitigation_changes_images_and_restores_model(cls, strength, small_organism, plain):
    d0 = state_digest(small_organism.unet)
    out = cls(strength=strength).generate(small_organism, PROMPTS, SEEDS, SPEC, seed=0)
    assert out.images.shape == plain.shape and torch.isfinite(out.images).all()
    assert not torch.equal(out.images, plain)
    assert state_digest(small_organism.unet) == d0
    assert all(p.grad is None for p in small_organism.unet.parameters())
    again = cls(strength=strength).generate(small_organism, PROMPTS, SEEDS, SPEC, seed=0)
    assert torch.equal(out.images, again.images)            # deterministic per seed


@pytest.mark.parametrize("cls,strength", [(GaussianNoiseInjection, 0.5), (EmbeddingOptimization, 20.0),
                                          (RandomTokenAddition, 2)])
def test_model_untouched_when_generation_raises(cls, strength, small_organism, monkeypatch):
    d0 = state_digest(small_organism.unet)
    calls = {"n": 0}
    orig = small_organism.eps

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return orig(*a, **k)

    monkeypatch.setattr(small_organism, "eps", boom)
    with pytest.raises(RuntimeError, match="injected"):
        cls(strength=strength).generate(small_organism, PROMPTS, SEEDS, SPEC, seed=0)
    monkeypatch.undo()
    assert state_digest(small_organism.unet) == d0


def test_insertions_follow_the_rules(small_organism):
    p = "one two three"
    for cls in (RandomTokenAddition, RandomNumberAddition, CaptionWordRepetition):
        out = cls(strength=3).rewrite(small_organism, [p], seed=0)[0]
        words = out.split(" ")
        assert len(words) == 6, out
        rest = list(words)
        for w in p.split(" "):                               # original words kept, in order
            rest = rest[rest.index(w) + 1:] if w in rest else pytest.fail(out)
        assert cls(strength=3).rewrite(small_organism, [p], seed=0)[0] == out
        assert cls(strength=3).rewrite(small_organism, [p], seed=1)[0] != out or cls is CaptionWordRepetition
    extra = [w for w in RandomNumberAddition(strength=5).rewrite(small_organism, [p], seed=0)[0].split(" ")
             if w not in p.split(" ")]
    assert all(w.isdigit() and 0 <= int(w) < 100000 for w in extra)
    cwr = CaptionWordRepetition(strength=5).rewrite(small_organism, [p], seed=0)[0].split(" ")
    assert set(cwr) <= set(p.split(" "))
    with pytest.raises(ValueError, match="integer"):
        RandomTokenAddition(strength=1.5)


def test_random_tokens_from_vocabularies(small_organism):
    from bench.core.tokenizer import clip_tokenizer

    rng = np.random.default_rng(0)
    words = random_vocab_words(small_organism.tokenizer, 50, rng)
    assert not any(w.startswith("[") or w.startswith("##") for w in words)
    clip_words = random_vocab_words(clip_tokenizer(), 20, np.random.default_rng(0))
    assert all(isinstance(w, str) and w and "</w>" not in w for w in clip_words)


def test_gni_noise_scale(small_organism):
    g = GaussianNoiseInjection(strength=0.3)
    cond, uncond = g.noisy_embeddings(small_organism, PROMPTS * 8, seed=0)
    with torch.inference_mode():
        clean = small_organism.encode(PROMPTS * 8).float()
        e_u = small_organism.encode([""]).float()
    assert abs(float((cond - clean).std()) - 0.3) < 0.02
    assert abs(float((uncond - e_u).std()) - 0.3) < 0.02     # DCR noises the unconditional rows too
    assert not torch.equal(cond[0] - clean[0], cond[1] - clean[1])   # independent draw per prompt
    assert torch.equal(cond[0], cond[2])                     # keyed by (seed, prompt): same prompt, same draw


def test_embed_opt_stops_at_target_freezes_bos_and_batches_exactly(small_organism):
    eo = EmbeddingOptimization(strength=1 / 1e-6, max_iters=3)          # unreachable target: 3 updates
    with torch.inference_mode():
        e0 = small_organism.encode(PROMPTS).float()
    e = eo.optimise(small_organism, PROMPTS, SEEDS, 50)
    assert eo.last_iters == [3, 3]
    # BOS gets no gradient; AdamW's decoupled weight decay still shrinks it, as in Wen's repo
    assert torch.allclose(e[:, 0], e0[:, 0] * (1 - eo.lr * eo.weight_decay) ** 3, atol=1e-7)
    assert not torch.equal(e[:, 1:], e0[:, 1:])
    singles = torch.cat([EmbeddingOptimization(strength=1 / 1e-6, max_iters=3).optimise(
        small_organism, [p], SEEDS, 50) for p in PROMPTS])
    assert torch.allclose(e, singles, atol=1e-4)        # equal up to float rounding of batched matmuls
    lazy = EmbeddingOptimization(strength=1e-6)                         # l_target huge: 0 updates
    assert torch.equal(lazy.optimise(small_organism, PROMPTS, SEEDS, 50), e0.to(e.dtype))
    assert lazy.last_iters == [0, 0]
