"""FAISS neighbour index over training-image embeddings: build, save, load (memory-mapped), search.

Embeddings are L2-normalised ``bench.measure.embed`` rows, so the index uses the inner product and a
similarity is a cosine (methods.md 3a: sim(g) = max over training images x of <f(g), f(x)>).
Kinds: ``flat`` (``IndexFlatIP``, exact; the default, what the organism uses); ``ivf``
(``IVF<nlist>,Flat``: approximate recall, exact similarities in the ``nprobe`` visited cells);
``ivfpq`` (``IVF<nlist>,PQ<m>x<nbits>``, m bytes per vector at 8 bits: recall and similarities
approximate; ``build_from_npy`` builds it chunk by chunk from .npy shards for large sets).

A saved index is ``index.faiss`` + ``manifest.json`` (embedder, preprocessing, dimension, count,
sha256 of the inputs, factory, nprobe, faiss version). ``load`` memory-maps it (flat:
``IO_FLAG_MMAP_IFC``; IVF: ``IO_FLAG_MMAP``, inverted lists stay on disk) and refuses a different
embedder, preprocessing or dimension. ``training_index(world, embedder)`` embeds a MemWorld's
training images once and caches the index under ``cache_dir`` (default ``$DIFFMEM_CACHE/index``,
i.e. ``~/.cache/diffmem/index``, the project's cache).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np

from bench.core.atomic import atomic_write_json
from bench.measure.sources import npy_sources

SCHEMA_VERSION = 1
INDEX_FILE, MANIFEST_FILE = "index.faiss", "manifest.json"
KINDS = ("flat", "ivf", "ivfpq")
NORM_TOL = 1e-3          # |‖row‖ - 1| allowed for "L2-normalised" input rows
MIN_POINTS_PER_CENTROID = 39  # faiss's own warning threshold for k-means training


class IndexMismatchError(ValueError):
    """A saved index does not match the embedder / inputs the caller expects."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFMEM_CACHE", Path.home() / ".cache" / "diffmem")) / "index"


@dataclass(frozen=True)
class EmbedderIdentity:
    """What makes two sets of embeddings comparable: embedder name, preprocessing, dimension.

    ``dim = 0`` means "depends on the input size" (``PixelEmbedder(size=None)``); the dimension is
    then checked against the index at search time only.
    """

    embedder_id: str
    preprocessing: str
    dim: int

    @classmethod
    def of(cls, embedder: Any) -> "EmbedderIdentity":
        for attr in ("name", "preprocessing", "dim"):
            if not hasattr(embedder, attr):
                raise TypeError(f"expected a bench.measure.embed embedder (with name, preprocessing, dim); "
                                f"{type(embedder).__name__} has no {attr!r}")
        return cls(str(embedder.name), str(embedder.preprocessing), int(embedder.dim))


@dataclass(frozen=True)
class IndexManifest:
    embedder_id: str
    preprocessing: str
    dim: int
    count: int
    input_sha256: str          # identity of the source (world sha256, file list hash, ...), from the caller
    embeddings_sha256: str     # sha256 of the float32 embedding bytes actually indexed
    kind: str
    factory: str               # faiss.index_factory string, metric inner product
    nprobe: int                # cells visited per query (1 for flat, where it is unused)
    faiss_version: str
    build_seconds: float
    params: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    metric: str = "inner_product"

    @classmethod
    def read(cls, path: Path) -> "IndexManifest":
        d = json.loads(Path(path).read_text())
        if d.get("schema_version") != SCHEMA_VERSION:
            raise IndexMismatchError(f"{path}: index schema version {d.get('schema_version')} != "
                                     f"{SCHEMA_VERSION}; rebuild the index with this version of diffmem")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- helpers
def check_embeddings(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """Validate finite, L2-normalised ``[N, D]`` rows; return them as contiguous float32."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [N, D] of embeddings, got shape {a.shape}")
    if a.shape[1] == 0:
        raise ValueError(f"{what}: embedding dimension is 0")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{what}: dimension {a.shape[1]} != index dimension {dim}; embed with the "
                         "embedder (and preprocessing) the index was built with")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    norms = np.linalg.norm(a, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOL)
    if bad.size:
        raise ValueError(f"{what}: row {bad[0]} has L2 norm {norms[bad[0]]:.4g} (and {bad.size - 1} more "
                         "rows are not unit norm); the index uses inner product = cosine, so pass "
                         "L2-normalised rows (bench.measure.embed.l2_normalize)")
    return a


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) cells (faiss guideline 4-16 sqrt(n)), capped so each gets >= 39 training points."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // MIN_POINTS_PER_CENTROID)))


def default_nprobe(nlist: int) -> int:
    """Visit 1/64 of the cells, at least 8 (or all of them when there are fewer)."""
    return int(min(nlist, max(8, nlist // 64)))


def factory_string(kind: str, dim: int, nlist: int = 0, pq_m: int = 0, pq_nbits: int = 8) -> str:
    if kind == "flat":
        return "Flat"
    if nlist < 1:
        raise ValueError(f"kind={kind!r} needs nlist >= 1, got {nlist}")
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfpq":
        if pq_m < 1 or dim % pq_m:
            raise ValueError(f"PQ needs pq_m dividing the dimension {dim}, got pq_m={pq_m}")
        return f"IVF{nlist},PQ{pq_m}x{pq_nbits}"
    raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")


def _ivf(index: faiss.Index) -> Any:
    """The IVF layer of an index as its concrete class (IndexIVFFlat / IndexIVFPQ)."""
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _new_index(kind: str, dim: int, n: int, nlist: int | None, pq_m: int | None, pq_nbits: int,
               seed: int) -> tuple[faiss.Index, str, int]:
    nl = 0 if kind == "flat" else int(nlist or default_nlist(n))
    m = int(pq_m or (dim // 8 if dim % 8 == 0 else 0)) if kind == "ivfpq" else 0
    fac = factory_string(kind, dim, nl, m, pq_nbits)
    index = faiss.index_factory(dim, fac, faiss.METRIC_INNER_PRODUCT)
    if kind != "flat":
        ivf = _ivf(index)
        ivf.cp.seed = seed
        if kind == "ivfpq":
            ivf.pq.cp.seed = seed
            # Polysemous training (faiss's default here) only serves Hamming pre-filtering, which
            # search never enables (polysemous_ht = 0); it costs ~10x the PQ training time.
            ivf.do_polysemous_training = False
    return index, fac, nl


def _train_size(kind: str, n: int, nlist: int, pq_nbits: int, train_size: int | None) -> int:
    need = MIN_POINTS_PER_CENTROID * max(nlist, 2 ** pq_nbits if kind == "ivfpq" else 0)
    size = int(train_size or max(need, 50_000))
    return min(n, size)


def _training_params(index: faiss.Index, kind: str, n_train: int) -> dict[str, Any]:
    if kind == "flat":
        return {}
    ivf = _ivf(index)
    out = {"nlist": int(ivf.nlist), "train_rows": int(n_train), "kmeans_niter": int(ivf.cp.niter),
           "kmeans_seed": int(ivf.cp.seed)}
    if kind == "ivfpq":
        out |= {"pq_m": int(ivf.pq.M), "pq_nbits": int(ivf.pq.nbits), "pq_niter": int(ivf.pq.cp.niter),
                "pq_by_residual": bool(ivf.by_residual), "polysemous_training": bool(ivf.do_polysemous_training)}
    return out


# ----------------------------------------------------------------------------- index
class NeighbourIndex:
    """A FAISS inner-product index plus the manifest that says what it indexes."""

    def __init__(self, index: faiss.Index, manifest: IndexManifest, path: Path | None = None) -> None:
        self.index, self.manifest, self.path = index, manifest, path
        self.nprobe = manifest.nprobe

    def __repr__(self) -> str:
        m = self.manifest
        return (f"NeighbourIndex({m.factory!r}, count={m.count}, dim={m.dim}, embedder={m.embedder_id!r}, "
                f"nprobe={self.nprobe}, path={str(self.path) if self.path else None!r})")

    def describe(self) -> dict[str, Any]:
        """What to record in a run's params: the manifest's identity fields, nprobe and the folder."""
        keep = ("kind", "factory", "metric", "count", "dim", "embedder_id", "preprocessing", "input_sha256",
                "faiss_version")
        return {k: getattr(self.manifest, k) for k in keep} | {"nprobe": self.nprobe, "path": str(self.path)}

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.manifest.kind != "flat":
            nlist = int(_ivf(self.index).nlist)
            if not 1 <= int(value) <= nlist:
                raise ValueError(f"nprobe must be in [1, nlist={nlist}], got {value}")
            _ivf(self.index).nprobe = int(value)
        self._nprobe = int(value)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, embeddings: np.ndarray, *, embedder_id: str, preprocessing: str, input_sha256: str,
              kind: str = "flat", nlist: int | None = None, pq_m: int | None = None, pq_nbits: int = 8,
              nprobe: int | None = None, train_size: int | None = None, seed: int = 0) -> "NeighbourIndex":
        """Index in-memory L2-normalised embeddings ``[N, D]`` (row i = training image i)."""
        t0 = time.perf_counter()
        x = check_embeddings(embeddings, "embeddings")
        if x.shape[0] == 0:
            raise ValueError("embeddings: no rows to index")
        index, fac, nl = _new_index(kind, x.shape[1], x.shape[0], nlist, pq_m, pq_nbits, seed)
        n_train = 0
        if kind != "flat":
            n_train = _train_size(kind, x.shape[0], nl, pq_nbits, train_size)
            pick = np.sort(np.random.default_rng(seed).choice(x.shape[0], n_train, replace=False))
            index.train(x[pick])
        index.add(x)
        params = {"seed": seed} | _training_params(index, kind, n_train)
        man = IndexManifest(embedder_id, preprocessing, int(x.shape[1]), int(x.shape[0]), input_sha256,
                            hashlib.sha256(x.tobytes()).hexdigest(), kind, fac,
                            1 if kind == "flat" else int(nprobe or default_nprobe(nl)), faiss.__version__,
                            round(time.perf_counter() - t0, 3), params)
        return cls(index, man)

    @classmethod
    def build_from_npy(cls, sources: str | Path | Sequence[str | Path], *, embedder_id: str,
                       preprocessing: str, input_sha256: str = "", kind: str = "ivfpq",
                       nlist: int | None = None, pq_m: int | None = None, pq_nbits: int = 8,
                       nprobe: int | None = None, train_size: int | None = None, chunk_rows: int = 16_384,
                       seed: int = 0) -> "NeighbourIndex":
        """Build chunk by chunk from ``.npy`` shards ``[n_i, D]`` (a folder, sorted, or a file list).

        Rows are numbered in file order. Shards are memory-mapped; at most ``train_size`` sampled rows
        plus one chunk of ``chunk_rows`` are in memory at a time (faiss's PQ encoder takes another
        chunk_rows x m x 2^nbits floats when a sub-quantiser has >= 16 dims). ``input_sha256`` defaults to the
        sha256 of the embedding bytes (which is recorded as ``embeddings_sha256`` in any case).
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        t0 = time.perf_counter()
        files = npy_sources(sources)
        # each shard is mapped only while it is read, so resident pages never cover the whole set
        shapes = [np.load(p, mmap_mode="r").shape for p in files]
        dims = {s[1] if len(s) == 2 else -1 for s in shapes}
        if len(dims) != 1 or -1 in dims:
            raise ValueError(f"embedding shards must all be 2-D [n, D] with one D; got shapes "
                             f"{[(p.name, s) for p, s in zip(files, shapes)]}")
        dim, sizes = dims.pop(), [int(s[0]) for s in shapes]
        n = sum(sizes)
        if n == 0:
            raise ValueError(f"embedding shards {[p.name for p in files]} hold no rows")
        index, fac, nl = _new_index(kind, dim, n, nlist, pq_m, pq_nbits, seed)
        n_train = 0
        if kind != "flat":
            n_train = _train_size(kind, n, nl, pq_nbits, train_size)
            rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
            starts = np.cumsum([0] + sizes)
            picks = [rows[(rows >= starts[f]) & (rows < starts[f + 1])] - starts[f] for f in range(len(files))]
            sample = np.concatenate([np.load(p, mmap_mode="r")[r] for p, r in zip(files, picks)])
            index.train(check_embeddings(sample, "training sample"))
            del sample
        h = hashlib.sha256()
        for p in files:
            a = np.load(p, mmap_mode="r")
            for i in range(0, a.shape[0], chunk_rows):
                x = check_embeddings(a[i:i + chunk_rows], f"{p.name} rows {i}..{i + chunk_rows - 1}", dim)
                h.update(x.tobytes())
                index.add(x)
            del a  # unmap this shard (its last chunk view goes with the next one)
        params = ({"seed": seed, "chunk_rows": chunk_rows,
                   "sources": [{"file": str(p), "rows": s} for p, s in zip(files, sizes)]}
                  | _training_params(index, kind, n_train))
        man = IndexManifest(embedder_id, preprocessing, dim, n, input_sha256 or h.hexdigest(), h.hexdigest(),
                            kind, fac, 1 if kind == "flat" else int(nprobe or default_nprobe(nl)),
                            faiss.__version__, round(time.perf_counter() - t0, 3), params)
        return cls(index, man)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``manifest.json`` into ``directory`` (created; files replaced)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / INDEX_FILE))
        man = dataclasses.replace(self.manifest, nprobe=self.nprobe)
        atomic_write_json(d / MANIFEST_FILE, dataclasses.asdict(man), indent=1, sort_keys=False)
        self.path = d
        return d

    @classmethod
    def load(cls, directory: str | Path, *, expect_embedder: Any = None, expect_input_sha256: str | None = None,
             mmap: bool = True) -> "NeighbourIndex":
        """Load a saved index, memory-mapped unless ``mmap=False``.

        ``expect_embedder`` (a ``bench.measure.embed`` embedder or an ``EmbedderIdentity``) and
        ``expect_input_sha256`` are checked against the manifest; any difference raises
        ``IndexMismatchError`` naming the field, both values and how to fix it.
        """
        d = Path(directory)
        if not (d / MANIFEST_FILE).is_file() or not (d / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a saved neighbour index (needs {INDEX_FILE} and {MANIFEST_FILE}); "
                                    "build one with NeighbourIndex.build(...).save(dir) or training_index(...)")
        man = IndexManifest.read(d / MANIFEST_FILE)
        if expect_embedder is not None:
            want = (expect_embedder if isinstance(expect_embedder, EmbedderIdentity)
                    else EmbedderIdentity.of(expect_embedder))
            checks = [("embedder", man.embedder_id, want.embedder_id),
                      ("preprocessing", man.preprocessing, want.preprocessing)]
            if want.dim:
                checks.append(("dimension", man.dim, want.dim))
            _refuse_mismatch(d, checks)
        if expect_input_sha256 is not None:
            _refuse_mismatch(d, [("input sha256", man.input_sha256, expect_input_sha256)])
        flag = (faiss.IO_FLAG_MMAP_IFC if man.kind == "flat" else faiss.IO_FLAG_MMAP) if mmap else 0
        index = faiss.read_index(str(d / INDEX_FILE), flag)
        if index.ntotal != man.count or index.d != man.dim:
            raise IndexMismatchError(f"{d}: {INDEX_FILE} holds {index.ntotal} x {index.d} but the manifest says "
                                     f"{man.count} x {man.dim}; the folder is corrupt, delete it and rebuild")
        return cls(index, man, d)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` training neighbours of each L2-normalised query row.

        Returns ``(similarities [n, k] float32, indices [n, k] int64)``, best first; similarity is
        the inner product (cosine), approximate for ``ivfpq``. IVF kinds may find fewer than ``k``
        neighbours in the visited cells: those slots hold index -1 and similarity -inf.
        """
        if not 1 <= int(k) <= self.count:
            raise ValueError(f"k must be in [1, count={self.count}], got {k}")
        q = check_embeddings(queries, "queries", self.dim)
        sims, idx = self.index.search(q, int(k))
        sims = np.where(idx < 0, -np.inf, sims).astype(np.float32)
        return sims, idx.astype(np.int64)


def _refuse_mismatch(d: Path, checks: list[tuple[str, Any, Any]]) -> None:
    diffs = [f"{what}: index has {have!r}, expected {want!r}" for what, have, want in checks if have != want]
    if diffs:
        raise IndexMismatchError(f"neighbour index at {d} does not match: " + "; ".join(diffs) +
                                 f". Rebuild it with the expected embedder/inputs (delete {d}; "
                                 "training_index(...) rebuilds automatically, or NeighbourIndex.build(...).save(dir))")


# ----------------------------------------------------------------------------- MemWorld
def training_index(world: Any, embedder: Any, cache_dir: str | Path | None = None, *, kind: str = "flat",
                   batch_size: int = 64, seed: int = 0) -> NeighbourIndex:
    """Neighbour index over a MemWorld's training images, embedded once and cached.

    Row i of the index is ``world.images[i]``. The cache folder is keyed by the world's sha256, the
    embedder identity and the index kind; a hit is loaded memory-mapped and re-checked.
    """
    ident = EmbedderIdentity.of(embedder)
    key = hashlib.sha256(json.dumps([world.sha256, dataclasses.asdict(ident), kind, seed]).encode()).hexdigest()
    name = f"memworld-{world.sha256[:12]}-{ident.embedder_id}-{kind}-{key[:12]}"
    folder = Path(cache_dir or default_cache_dir()) / name
    if not (folder / MANIFEST_FILE).is_file():
        emb = embedder.embed(world.images, batch_size=batch_size)
        built = NeighbourIndex.build(emb, embedder_id=ident.embedder_id, preprocessing=ident.preprocessing,
                                     input_sha256=world.sha256, kind=kind, seed=seed)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        built.save(tmp)
        try:
            tmp.rename(folder)  # atomic publish: a reader never sees a half-written index
        except OSError:  # another process published the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return NeighbourIndex.load(folder, expect_embedder=ident, expect_input_sha256=world.sha256)
