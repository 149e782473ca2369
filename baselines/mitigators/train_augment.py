"""Random tokens added to captions at training time (Wen et al.'s training baseline; Somepalli's RT).

methods.md 1d: Wen's "random token addition" baseline inserts 1 random token per caption during
fine-tuning; 3c: Somepalli's RT (``randwordadd``) inserts random tokens with probability p each time
a caption is drawn (p = 0.1 by default, 2 tokens). Here strength = p, the probability that a drawn
caption carries ``n_tokens`` random tokens (default 1, Wen's count; p = 1 is Wen's setting, p = 0.1
Somepalli's probability). Tokens and insertion positions follow the inference-time RTA
(``baselines.mitigators.prompt_augment``: uniform vocabulary words, uniform word-boundary positions).

Two ways of drawing the tokens (``draw``, recorded in ``params()`` and in the fine-tune's cache key):

- ``"fresh"`` (default; as Somepalli et al. and Wen et al. do): every training SAMPLE draws anew.
  Each time THE training loop draws a pair, with probability p its caption gets ``n_tokens`` new
  random tokens at new positions, so two draws of the same caption (in one batch or in different
  steps) almost never carry the same augmentation. THE loop encodes every distinct caption once
  with the frozen text encoder (``bench.core.train._caption_table``), so the augmented captions are
  supplied per batch by a training hook (``RandomTokenCaptions.captions``) and encoded by the loop
  for those samples only (the per-batch caption seam of ``bench/core/train.py``). The draw is seeded:
  a generator keyed by (fit seed, training seed, step), so a build is reproducible, independent of
  the loop's own generator (the pair / noise / timestep stream is the one of plain fine-tuning) and
  of resuming from a checkpoint. Caption-dropped samples stay unconditional.
- ``"pool"`` (the earlier behaviour, a recorded deviation): each pair gets a pool of
  ``n_variants`` (default 4) augmented variants drawn once from the seed; the pair's duplication
  weight w is split into (1 - p) w on the original caption and p w / n_variants on each variant.
  Per draw this is "with probability p, a random-token caption", but the tokens come from a finite
  per-pair pool. Its cache key is unchanged, so earlier pool builds are reused.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from baselines.mitigators.prompt_augment import insert_items, random_vocab_words
from baselines.mitigators.train_time import FinetuneMitigator
from bench.core.train import TrainData

DRAWS = ("fresh", "pool")
DEFAULT_N_VARIANTS = 4
FRESH_RNG_TAG = 0x52544B        # "RTK": separates the fresh draw's generator from other users of the seeds


def split_weights(data: TrainData, p: float, variants: list[list[str]]) -> TrainData:
    """Pairs: every original pair with weight (1 - p) w, then per pair its variants with p w / len."""
    caps, img, w = list(data.captions), [data.pair_image], [data.pair_weight.double() * (1 - p)]
    for i, vs in enumerate(variants):
        caps += vs
        img.append(data.pair_image[i].repeat(len(vs)))
        w.append(torch.full((len(vs),), float(data.pair_weight[i]) * p / len(vs), dtype=torch.float64))
    return TrainData(data.x0, torch.cat(img), torch.cat(w), caps)


def fresh_rng(seed: int, train_seed: int, step: int) -> np.random.Generator:
    """The fresh draw's generator for one training step."""
    return np.random.default_rng([int(seed), int(train_seed), int(step), FRESH_RNG_TAG])


class RandomTokenCaptions:
    """Training hook of ``draw="fresh"``: per batch, a fresh random-token caption for each sample
    with probability p (``captions``); it drops nothing from the loss (``keep``: all True).

    ``captions(step, pairs, captions)`` -> {batch position: augmented caption} for the samples that
    drew an augmentation; ``pairs`` [B] are the pair indices the loop drew, ``captions`` the pairs'
    captions. One generator per step (``fresh_rng``); every position consumes its own uniform
    (augment or not) and, when augmented, its tokens and positions, in batch order.
    """

    def __init__(self, tokenizer, p: float, n_tokens: int, seed: int, train_seed: int, n_examples: int = 8):
        self.tokenizer, self.p, self.n_tokens = tokenizer, float(p), int(n_tokens)
        self.seed, self.train_seed, self.n_examples = int(seed), int(train_seed), n_examples
        self.n_samples = self.n_augmented = self.n_calls = 0
        self.examples: list[str] = []

    def draw(self, step: int, captions: list[str]) -> list[str | None]:
        """The step's draw for a batch of captions: the augmented caption, or None (kept as is)."""
        rng = fresh_rng(self.seed, self.train_seed, step)
        out: list[str | None] = []
        for c in captions:
            if rng.random() < self.p:
                out.append(insert_items(c, random_vocab_words(self.tokenizer, self.n_tokens, rng), rng))
            else:
                out.append(None)
        return out

    def captions(self, step: int, pairs: torch.Tensor, captions: list[str]) -> dict[int, str]:
        drawn = self.draw(step, [captions[int(i)] for i in pairs])
        sub = {b: c for b, c in enumerate(drawn) if c is not None}
        self.n_calls += 1
        self.n_samples += len(drawn)
        self.n_augmented += len(sub)
        for c in sub.values():
            if len(self.examples) < self.n_examples:
                self.examples.append(c)
        return sub

    def keep(self, model, x_t, t, emb, eps_pred) -> torch.Tensor:
        return torch.ones(x_t.shape[0], dtype=torch.bool, device=x_t.device)

    def report(self) -> dict:
        return {"hook": "train_random_token", "draw": "fresh", "p": self.p, "n_tokens": self.n_tokens,
                "seed": self.seed, "train_seed": self.train_seed, "steps_drawn": self.n_calls,
                "samples_drawn": self.n_samples, "samples_augmented": self.n_augmented,
                "augmented_share": self.n_augmented / max(1, self.n_samples),
                "note": "counts are before caption dropout (dropped samples stay unconditional)",
                "examples": list(self.examples)}


@dataclass
class TrainRandomTokens(FinetuneMitigator):
    n_tokens: int = 1
    draw: str = "fresh"                 # fresh (per training sample) | pool (n_variants per pair, drawn once)
    n_variants: int | None = None       # pool only (None = 4); the caption table holds (n_variants + 1) x pairs rows
    name: ClassVar[str] = "train_random_token"
    strength_unit: ClassVar[str] = "p_augmented"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.strength <= 1:
            raise ValueError(f"{self.name}: strength is a probability in [0, 1], got {self.strength}")
        if self.draw not in DRAWS:
            raise ValueError(f"{self.name}: draw must be one of {DRAWS}, got {self.draw!r}")
        if self.draw == "fresh" and self.n_variants is not None:
            raise ValueError(f"{self.name}: n_variants ({self.n_variants}) only applies to draw='pool' "
                             "(draw='fresh' draws new tokens for every training sample)")
        if self.draw == "pool" and self.n_variants is None:
            self.n_variants = DEFAULT_N_VARIANTS
        if self.n_tokens < 1 or (self.draw == "pool" and self.n_variants < 1):
            raise ValueError(f"{self.name}: n_tokens ({self.n_tokens}) and n_variants ({self.n_variants}) "
                             "must be >= 1")

    def method(self) -> dict:
        if self.draw == "pool":       # the earlier key (key "pool"), so earlier pool builds are reused
            return {"name": self.name, "p": float(self.strength), "n_tokens": self.n_tokens,
                    "pool": self.n_variants}
        return {"name": self.name, "p": float(self.strength), "n_tokens": self.n_tokens, "draw": "fresh"}

    def params(self) -> dict:
        d = super().params()
        if self.draw == "fresh":
            d["draw_rule"] = ("fresh per training sample: each time the training loop draws a pair, with "
                              "probability p its caption gets n_tokens new random vocabulary words at uniform "
                              "word-boundary positions (Somepalli et al. 2023b RT / Wen et al.'s baseline)")
            d["draw_rng"] = ("numpy default_rng([fit seed, training seed, step, "
                             f"{FRESH_RNG_TAG:#x}]), one uniform per batch position then its tokens")
            d["draw_seeds"] = {"fit_seed": self.fit_seed,
                               "train_seed": self.protocol().train.seed if self.finetuner is not None else None}
        else:
            d["draw_rule"] = (f"pool (deviation): {self.n_variants} variants per pair drawn once from the seed; "
                              "weight (1 - p) w on the original caption, p w / n_variants on each variant")
            d["draw_rng"] = "numpy default_rng([fit seed, crc32(caption), 17]) per pair"
            d["draw_seeds"] = {"fit_seed": self.fit_seed}
        return d

    def hooks(self, model, world) -> tuple:
        if self.draw != "fresh":
            return ()
        return (RandomTokenCaptions(model.tokenizer, float(self.strength), self.n_tokens, self.fit_seed,
                                    self.protocol().train.seed),)

    def transform(self, model, world, seed):
        if self.draw != "pool":
            return None
        p, n, pool, tok = float(self.strength), self.n_tokens, self.n_variants, model.tokenizer

        def fn(data: TrainData):
            variants = []
            for c in data.captions:
                rng = np.random.default_rng([int(seed), zlib.crc32(c.encode("utf-8")), 17])
                variants.append([insert_items(c, random_vocab_words(tok, n, rng), rng) for _ in range(pool)])
            out = split_weights(data, p, variants)
            return out, {"transform": self.name, "draw": "pool", "p": p, "n_tokens": n, "pool": pool,
                         "pairs_before": len(data.captions), "pairs_after": len(out.captions),
                         "example": variants[-1][0] if variants else "",
                         "deviation": "finite per-pair pool of pre-drawn variants (frozen caption table)"}
        return fn
