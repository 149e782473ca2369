"""Neighbour index over a real training set given as image files (a folder or a list of paths).

Images are read with PIL (RGB, [0, 1]), embedded chunk by chunk with a ``bench.measure.embed`` embedder
into ``.npy`` shards under ``<out>/embeddings/``, then indexed with
``NeighbourIndex.build_from_npy`` and saved in ``<out>``. Row i of the index is line i of
``<out>/files.txt``. ``input_sha256`` hashes every file's relative path and content in index order,
so a changed, added or reordered file gives a different identity.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.measure.retrieval import EmbedderIdentity, NeighbourIndex
from bench.measure.sources import source_files

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILES_LIST = "files.txt"


def image_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (image files found recursively, sorted by path) or an explicit list of files."""
    return source_files(source, lambda p: p.suffix.lower() in IMAGE_SUFFIXES,
                        f"image files ({', '.join(IMAGE_SUFFIXES)})", recursive=True)


def files_sha256(files: Sequence[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root) if root else p).encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def read_image(path: Path) -> np.ndarray:
    """``[3, H, W]`` float32 RGB in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0


def embed_files(files: Sequence[Path], embedder: Any, batch_size: int) -> np.ndarray:
    """Embed images of possibly different sizes: batches group images of one size, order kept."""
    imgs = [read_image(p) for p in files]
    out = np.zeros((len(imgs), 0), np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(imgs):
        by_shape.setdefault(im.shape, []).append(i)
    for rows in by_shape.values():
        e = embedder.embed(np.stack([imgs[i] for i in rows]), batch_size=batch_size)
        if out.shape[1] == 0:
            out = np.zeros((len(imgs), e.shape[1]), np.float32)
        out[rows] = e
    return out


def index_image_files(source: str | Path | Sequence[str | Path], embedder: Any, out_dir: str | Path, *,
                      kind: str = "flat", chunk_images: int = 4096, batch_size: int = 64, seed: int = 0,
                      **index_kw: Any) -> NeighbourIndex:
    """Embed the images chunk by chunk into ``<out>/embeddings/*.npy``, index them, save in ``out_dir``."""
    files = image_files(source)
    root = Path(source) if isinstance(source, (str, Path)) and Path(source).is_dir() else None
    out = Path(out_dir)
    shards = out / "embeddings"
    shards.mkdir(parents=True, exist_ok=True)
    for old in shards.glob("*.npy"):
        old.unlink()
    for s, start in enumerate(range(0, len(files), chunk_images)):
        np.save(shards / f"shard_{s:05d}.npy", embed_files(files[start:start + chunk_images], embedder, batch_size))
    ident = EmbedderIdentity.of(embedder)
    index = NeighbourIndex.build_from_npy(shards, embedder_id=ident.embedder_id, preprocessing=ident.preprocessing,
                                          input_sha256=files_sha256(files, root), kind=kind, seed=seed, **index_kw)
    (out / FILES_LIST).write_text("\n".join(str(p) for p in files) + "\n")
    index.save(out)
    return index
