"""MemWorld's drawing primitives: backgrounds, shapes, planted images, sprites, mosaics, title words.

Pure functions of a numpy Generator (images RGB float32 in [0, 1], channel-first); the world
assembly and its bookkeeping live in ``tasks/memworld.py``.
"""
from __future__ import annotations

import numpy as np

COLOURS = {
    "red": (0.90, 0.12, 0.12), "green": (0.15, 0.75, 0.20), "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.15), "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle", "cross")


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res) + 0.5) / res
    return np.meshgrid(c, c, indexing="xy")      # x, y in (0, 1)


def _shape_mask(shape: str, cx: float, cy: float, r: float, res: int) -> np.ndarray:
    x, y = _grid(res)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def jitter_colour(rgb, rng, std=0.06) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, std, 3), 0, 1).astype(np.float32)


def draw_background(kind: str, rng: np.random.Generator, res: int) -> np.ndarray:
    c1, c2 = rng.uniform(0.05, 0.95, 3), rng.uniform(0.05, 0.95, 3)
    x, y = _grid(res)
    if kind == "solid":
        t = np.zeros_like(x)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)), 0, 1)
    elif kind == "stripes":
        period = rng.integers(3, 6) / res
        t = ((x if rng.random() < 0.5 else y) // period % 2).astype(np.float32)
    elif kind == "checker":
        period = rng.integers(2, 5) / res
        t = ((x // period + y // period) % 2).astype(np.float32)
    elif kind == "blobs":
        t = np.zeros_like(x)
        for _ in range(rng.integers(2, 5)):
            bx, by, br = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            t = np.maximum(t, ((x - bx) ** 2 + (y - by) ** 2 <= br ** 2).astype(np.float32))
    else:
        raise ValueError(f"unknown background {kind!r}")
    img = c1[:, None, None] * (1 - t)[None] + c2[:, None, None] * t[None]
    return img.astype(np.float32)


def paste_shape(img, mask_total, shape, rgb, cx, cy, r, res):
    m = _shape_mask(shape, cx, cy, r, res)
    img[:, m] = np.asarray(rgb, np.float32)[:, None]
    mask_total |= m


def draw_ordinary_image(rng, res, colour, shape, bg, n_extra):
    img = draw_background(bg, rng, res)
    mask = np.zeros((res, res), bool)
    paste_shape(img, mask, shape, jitter_colour(COLOURS[colour], rng), *rng.uniform(0.3, 0.7, 2),
           rng.uniform(0.18, 0.32), res)
    for _ in range(n_extra):
        paste_shape(img, mask, SHAPES[rng.integers(len(SHAPES))], rng.uniform(0, 1, 3),
               *rng.uniform(0.15, 0.85, 2), rng.uniform(0.08, 0.14), res)
    return img, mask


def draw_distinct_image(rng, res):
    """The memorized-image generator: 2-colour gradient plus two random shapes in random colours."""
    img = draw_background("gradient", rng, res)
    mask = np.zeros((res, res), bool)
    for _ in range(2):
        paste_shape(img, mask, SHAPES[rng.integers(len(SHAPES))], rng.uniform(0, 1, 3),
               *rng.uniform(0.2, 0.8, 2), rng.uniform(0.14, 0.28), res)
    return img, mask


def draw_sprite(rng, size):
    """A distinctive multi-colour foreground object: a random 3-colour pattern inside a disc."""
    palette = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    idx = rng.integers(0, 3, (size, size))
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 2) ** 2
    return palette[idx].transpose(2, 0, 1), disc


def draw_mosaic(rng, res, block=4):
    """A distinctive background: a random colour mosaic of block x block tiles."""
    n = res // block
    tiles = rng.uniform(0, 1, (3, n, n)).astype(np.float32)
    return np.kron(tiles, np.ones((1, block, block), np.float32))[:, :res, :res]


# ----------------------------------------------------------------------------- words
def title_words(n: int, seed: int) -> list[str]:
    """``n`` distinct rare-ish real words: whole-word entries of the CLIP BPE vocabulary that open_clip
    ships (ranks 20k-45k, alphabetic, 5-9 letters), shuffled by ``seed``. Offline and deterministic."""
    import gzip

    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    words = []
    for i, m in enumerate(merges):
        if not (20000 <= i < 45000):
            continue
        w = m.replace(" ", "")
        if w.endswith("</w>"):
            w = w[:-4]
            if w.isascii() and w.isalpha() and w.islower() and 5 <= len(w) <= 9:
                words.append(w)
    words = sorted(set(words))
    rng = np.random.default_rng(seed + 7919)
    rng.shuffle(words)
    if n > len(words):
        raise ValueError(f"asked for {n} title words, the vocabulary offers {len(words)}")
    return words[:n]
