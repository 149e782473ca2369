"""Caption augmentations at inference (Somepalli et al. 2023b; the versions in Wen et al.'s repo).

methods.md 1e / 3b. Each inserts ``strength`` items (an integer count; 0 = the identity) at
positions drawn uniformly over the word boundaries of the prompt (split on spaces), one at a time:
- RTA (``rand_word_add``): a random token, the decoding of one uniform vocabulary id. For CLIP
  tokenizers (Stable Diffusion) ids are uniform in [0, 49400) exactly as the repo; for other
  tokenizers (the organism's MiniLM WordPiece) ids are uniform over the vocabulary minus special and
  ``[unused*]`` entries, with the WordPiece ``##`` prefix stripped (recorded deviation: the repo's
  range is CLIP-specific).
- RNA (``rand_numb_add``): a random integer in [0, 100000).
- CWR (``rand_word_repeat``): a word drawn uniformly from the prompt's own words.
The augmentation is drawn once per prompt (every seed of a prompt sees the same augmented prompt,
as in Wen's ``inference_mem.py``), from a generator keyed by (seed, crc32(prompt)), so it does not
depend on batch position. CLIP scores are computed by the runner against the ORIGINAL prompt.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bench.contracts import GenSpec, Mitigator
from bench.core.model import DiffusionModel
from bench.core.sampling import SampleResult, sample

CLIP_RANDOM_ID_HIGH = 49400


def prompt_rng(seed: int, prompt: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(prompt.encode("utf-8"))])


def insert_items(prompt: str, items: list[str], rng: np.random.Generator) -> str:
    words = prompt.split(" ")
    for it in items:
        words.insert(int(rng.integers(0, len(words) + 1)), it)
    return " ".join(words)


def random_vocab_words(tokenizer, n: int, rng: np.random.Generator) -> list[str]:
    if type(tokenizer).__name__.startswith("CLIPTokenizer"):
        return [tokenizer.decode([int(i)]).strip() for i in rng.integers(0, CLIP_RANDOM_ID_HIGH, n)]
    vocab = _plain_vocab(tokenizer)
    return [vocab[int(i)] for i in rng.integers(0, len(vocab), n)]


_VOCAB_CACHE: dict[int, list[str]] = {}


def _plain_vocab(tokenizer) -> list[str]:
    key = id(tokenizer)
    if key not in _VOCAB_CACHE:
        special = set(tokenizer.all_special_tokens)
        toks = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
                if t not in special and not (t.startswith("[unused") and t.endswith("]"))]
        _VOCAB_CACHE[key] = [t[2:] if t.startswith("##") and len(t) > 2 else t for t in toks]
    return _VOCAB_CACHE[key]


@dataclass
class _Insertion(Mitigator):
    """Shared body: rewrite prompts, then THE sampling loop."""
    strength: float = 4
    strength_unit: ClassVar[str] = "insertions"

    def __post_init__(self):
        if self.strength < 0 or float(self.strength) != int(self.strength):
            raise ValueError(f"{self.name}: strength is a count of insertions (integer >= 0), got {self.strength}")

    def items(self, model: DiffusionModel, prompt: str, rng: np.random.Generator) -> list[str]:
        raise NotImplementedError

    def rewrite(self, model: DiffusionModel, prompts: list[str], *, seed: int) -> list[str]:
        out = []
        for p in prompts:
            rng = prompt_rng(seed, p)
            out.append(insert_items(p, self.items(model, p, rng), rng) if int(self.strength) else p)
        return out

    def generate(self, model: DiffusionModel, prompts: list[str], seeds: list[int], spec: GenSpec,
                 *, seed: int = 0) -> SampleResult:
        return sample(model, self.rewrite(model, prompts, seed=seed), seeds, steps=spec.steps,
                      guidance=spec.guidance, batch_size=spec.batch_size, decode=True)


@dataclass
class RandomTokenAddition(_Insertion):
    name: ClassVar[str] = "rta"

    def items(self, model, prompt, rng):
        return random_vocab_words(model.tokenizer, int(self.strength), rng)


@dataclass
class RandomNumberAddition(_Insertion):
    name: ClassVar[str] = "rna"

    def items(self, model, prompt, rng):
        return [str(int(v)) for v in rng.integers(0, 100000, int(self.strength))]


@dataclass
class CaptionWordRepetition(_Insertion):
    name: ClassVar[str] = "cwr"

    def items(self, model, prompt, rng):
        words = [w for w in prompt.split(" ") if w]
        if not words:
            raise ValueError("cwr: the prompt has no words to repeat")
        return [words[int(i)] for i in rng.integers(0, len(words), int(self.strength))]
