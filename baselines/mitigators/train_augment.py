"""Random tokens added to captions at training time (Wen et al.'s training baseline; Somepalli's RT).

methods.md 1d: Wen's "random token addition" baseline inserts 1 random token per caption during
fine-tuning; 3c: Somepalli's RT (``randwordadd``) inserts random tokens with probability p each time
a caption is drawn (p = 0.1 by default, 2 tokens). Here strength = p, the probability that a drawn
caption carries ``n_tokens`` random tokens (default 1, Wen's count; p = 1 is Wen's setting, p = 0.1
Somepalli's probability). Tokens and insertion positions follow the inference-time RTA
(``baselines.mitigators.prompt_augment``: uniform vocabulary words, uniform word-boundary positions).

Deviation (recorded in the transform report): THE training loop encodes every distinct caption once
with the frozen text encoder, so instead of a fresh draw per training draw, each pair gets a pool of
``pool`` augmented variants drawn once from ``seed``; the pair's duplication weight w is split into
(1 - p) w on the original caption and p w / pool on each variant. Per draw this is exactly
"with probability p, a random-token caption", with tokens drawn from a finite per-pair pool.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from baselines.mitigators.prompt_augment import insert_items, random_vocab_words
from baselines.mitigators.train_time import FinetuneMitigator
from bench.train import TrainData


def split_weights(data: TrainData, p: float, variants: list[list[str]]) -> TrainData:
    """Pairs: every original pair with weight (1 - p) w, then per pair its variants with p w / len."""
    caps, img, w = list(data.captions), [data.pair_image], [data.pair_weight.double() * (1 - p)]
    for i, vs in enumerate(variants):
        caps += vs
        img.append(data.pair_image[i].repeat(len(vs)))
        w.append(torch.full((len(vs),), float(data.pair_weight[i]) * p / len(vs), dtype=torch.float64))
    return TrainData(data.x0, torch.cat(img), torch.cat(w), caps)


@dataclass
class TrainRandomTokens(FinetuneMitigator):
    n_tokens: int = 1
    pool: int = 4                     # variants per pair (the caption table holds (pool + 1) x pairs rows)
    name: ClassVar[str] = "train_random_token"
    strength_unit: ClassVar[str] = "p_augmented"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.strength <= 1:
            raise ValueError(f"{self.name}: strength is a probability in [0, 1], got {self.strength}")
        if self.n_tokens < 1 or self.pool < 1:
            raise ValueError(f"{self.name}: n_tokens ({self.n_tokens}) and pool ({self.pool}) must be >= 1")

    def method(self) -> dict:
        return {"name": self.name, "p": float(self.strength), "n_tokens": self.n_tokens, "pool": self.pool}

    def transform(self, model, world, seed):
        p, n, pool, tok = float(self.strength), self.n_tokens, self.pool, model.tokenizer

        def fn(data: TrainData):
            variants = []
            for c in data.captions:
                rng = np.random.default_rng([int(seed), zlib.crc32(c.encode("utf-8")), 17])
                variants.append([insert_items(c, random_vocab_words(tok, n, rng), rng) for _ in range(pool)])
            out = split_weights(data, p, variants)
            return out, {"transform": self.name, "p": p, "n_tokens": n, "pool": pool,
                         "pairs_before": len(data.captions), "pairs_after": len(out.captions),
                         "example": variants[-1][0] if variants else "",
                         "deviation": "finite per-pair pool of pre-drawn variants (frozen caption table)"}
        return fn
