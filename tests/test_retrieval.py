"""bench.measure.retrieval: FAISS neighbour index vs numpy brute force, save/load (memory-mapped), identity
checks, chunked IVF-PQ build from .npy shards, and the cached MemWorld training index."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from bench.measure.embed import PixelEmbedder, l2_normalize
from bench.measure.retrieval import (EmbedderIdentity, IndexMismatchError, NeighbourIndex, check_embeddings,
                             training_index)


def clustered(n: int, dim: int, n_clusters: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """L2-normalised points around random centres (structured like image descriptors, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    x = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim))
    return l2_normalize(x)


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def build(db, kind="flat", **kw) -> NeighbourIndex:
    return NeighbourIndex.build(db, embedder_id="pixel", preprocessing="test rows", input_sha256="abc",
                                kind=kind, **kw)


def mapped_files() -> str:
    """Files this process has memory-mapped (Linux); the mmap checks need it."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("no /proc/self/maps on this OS: cannot check memory mapping")
    return maps.read_text()


@pytest.fixture(scope="module")
def data():
    db = clustered(3000, 48, 40, seed=1)
    q = clustered(50, 48, 40, seed=2)
    return db, q


def test_flat_matches_numpy_brute_force(data):
    db, q = data
    sims, idx = build(db).search(q, 10)
    ref_sims, ref_idx = brute_force(db, q, 10)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and sims.shape == idx.shape == (50, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)  # best first


def test_ivf_visiting_every_cell_is_exact(data):
    db, q = data
    index = build(db, kind="ivf", nlist=16)
    assert index.manifest.factory == "IVF16,Flat" and index.manifest.params["nlist"] == 16
    index.nprobe = 16
    sims, idx = index.search(q, 5)
    ref_sims, ref_idx = brute_force(db, q, 5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_is_memory_mapped_and_identical(tmp_path, data, kind):
    db, q = data
    built = build(db, kind=kind, nlist=16)
    folder = built.save(tmp_path / kind)
    loaded = NeighbourIndex.load(folder)
    assert str(folder / "index.faiss") in mapped_files()
    if kind == "ivf":
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded.index).invlists)
        assert isinstance(invlists, faiss.OnDiskInvertedLists)  # lists stay in the file, not RAM
    assert loaded.manifest == built.manifest and loaded.count == 3000 and loaded.dim == 48
    for a, b in zip(built.search(q, 7), loaded.search(q, 7)):
        np.testing.assert_array_equal(a, b)
    in_ram = NeighbourIndex.load(folder, mmap=False)
    np.testing.assert_array_equal(in_ram.search(q, 3)[1], built.search(q, 3)[1])


def test_manifest_records_identity_and_hashes(data):
    db, _ = data
    m = build(db).manifest
    assert (m.embedder_id, m.preprocessing, m.dim, m.count, m.input_sha256) == ("pixel", "test rows", 48, 3000, "abc")
    assert m.metric == "inner_product" and m.faiss_version == faiss.__version__ and len(m.embeddings_sha256) == 64
    assert build(db[::-1]).manifest.embeddings_sha256 != m.embeddings_sha256


def test_load_refuses_mismatched_embedder_preprocessing_dimension_and_inputs(tmp_path):
    emb = PixelEmbedder(size=4, progress=False)
    x = emb.embed(np.random.default_rng(0).random((20, 3, 8, 8), dtype=np.float32))
    ident = EmbedderIdentity.of(emb)
    folder = NeighbourIndex.build(x, embedder_id=ident.embedder_id, preprocessing=ident.preprocessing,
                                  input_sha256="world-1").save(tmp_path / "ix")
    assert NeighbourIndex.load(folder, expect_embedder=emb, expect_input_sha256="world-1").count == 20

    cases = {
        "embedder": PixelEmbedder(size=4, colour_normalised=True, progress=False),  # name pixel_cn
        "preprocessing": PixelEmbedder(size=4, resample="bicubic", progress=False),
        "dimension": EmbedderIdentity(ident.embedder_id, ident.preprocessing, 512),
    }
    for field, other in cases.items():
        with pytest.raises(IndexMismatchError, match=field) as err:
            NeighbourIndex.load(folder, expect_embedder=other)
        assert "Rebuild" in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(IndexMismatchError, match="input sha256.*world-1.*world-2"):
        NeighbourIndex.load(folder, expect_input_sha256="world-2")


def test_bad_inputs_are_named(data, tmp_path):
    db, q = data
    index = build(db[:100])
    with pytest.raises(ValueError, match="queries: dimension 8 != index dimension 48"):
        index.search(l2_normalize(np.ones((2, 8))), 3)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(q, 101)
    with pytest.raises(ValueError, match="L2 norm"):
        build(db * 2.0)
    with pytest.raises(ValueError, match="NaN"):
        check_embeddings(np.full((2, 4), np.nan), "x")
    with pytest.raises(ValueError, match="unknown index kind"):
        build(db, kind="hnsw")
    with pytest.raises(FileNotFoundError, match="not a saved neighbour index"):
        NeighbourIndex.load(tmp_path)


def test_ivfpq_chunked_build_from_npy_folder(tmp_path):
    """Three shards, chunked add, PQ codes: sensible recall vs exact and planted copies found at rank 1."""
    db = clustered(6000, 32, 60, seed=3)
    shards = tmp_path / "emb"
    shards.mkdir()
    for i, part in enumerate(np.array_split(db, 3)):
        np.save(shards / f"part{i:02d}.npy", part)
    index = NeighbourIndex.build_from_npy(shards, embedder_id="synthetic", preprocessing="none", kind="ivfpq",
                                          nlist=32, pq_m=16, pq_nbits=6, nprobe=8, chunk_rows=777, seed=0)
    m = index.manifest
    assert m.factory == "IVF32,PQ16x6" and m.count == 6000 and [s["rows"] for s in m.params["sources"]] == [2000] * 3
    # the hash covers the bytes in row order, independent of the chunking
    again = NeighbourIndex.build_from_npy(sorted(shards.glob("*.npy")), embedder_id="synthetic",
                                          preprocessing="none", kind="flat", chunk_rows=5000)
    assert again.manifest.embeddings_sha256 == m.embeddings_sha256 == m.input_sha256
    np.testing.assert_array_equal(again.search(db[:5], 1)[1][:, 0], np.arange(5))  # file order = row order

    rng = np.random.default_rng(4)
    src = rng.choice(6000, 100, replace=False)
    copies = l2_normalize(db[src] + 0.05 * rng.standard_normal((100, 32)))  # near-duplicates of training rows
    fresh = clustered(100, 32, 60, seed=5)
    q = np.concatenate([copies, fresh])
    _, ref = brute_force(db, q, 10)
    loaded = NeighbourIndex.load(index.save(tmp_path / "ix"))
    _, got = loaded.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref)])
    assert recall >= 0.6, f"IVF-PQ recall@10 {recall:.2f}"
    assert np.mean([r[0] in g for r, g in zip(ref, got)]) >= 0.9  # exact nearest neighbour within the top 10
    assert np.mean(got[:100, 0] == src) >= 0.95


def test_training_index_memworld_cached(small_world, tmp_path):
    class Counting(PixelEmbedder):
        calls = 0

        def embed(self, images, batch_size=32, progress=None):
            Counting.calls += 1
            return super().embed(images, batch_size, progress)

    emb = Counting(size=8, progress=False)
    index = training_index(small_world, emb, tmp_path)
    assert index.count == small_world.n_images and index.manifest.input_sha256 == small_world.sha256
    sims, idx = index.search(emb.embed(small_world.images[:10]), 2)
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))  # each training image finds itself
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert str(index.path / "index.faiss") in mapped_files()

    again = training_index(small_world, emb, tmp_path)
    assert Counting.calls == 2 and again.path == index.path  # second call: cache hit, no re-embedding
    other = training_index(small_world, PixelEmbedder(size=4, progress=False), tmp_path)
    assert other.path != index.path and other.dim == 48


def test_index_image_files_folder(tmp_path):
    """A folder of PNGs of two sizes: embedded in chunks, each image finds itself, row i = files.txt line i."""
    from PIL import Image

    from bench.measure.image_index import files_sha256, image_files, index_image_files, read_image

    rng = np.random.default_rng(0)
    folder = tmp_path / "train"
    (folder / "sub").mkdir(parents=True)
    for i in range(11):
        side = 8 if i % 2 else 12
        px = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        Image.fromarray(px).save(folder / ("sub" if i > 7 else "") / f"img{i:02d}.png")
    emb = PixelEmbedder(size=4, progress=False)
    index = index_image_files(folder, emb, tmp_path / "ix", chunk_images=4)
    files = (tmp_path / "ix" / "files.txt").read_text().split()
    assert files == [str(p) for p in image_files(folder)] and len(files) == 11 == index.count
    assert len(list((tmp_path / "ix" / "embeddings").glob("*.npy"))) == 3
    loaded = NeighbourIndex.load(tmp_path / "ix", expect_embedder=emb)
    q = np.concatenate([emb.embed(read_image(Path(f))[None]) for f in files])
    np.testing.assert_array_equal(loaded.search(q, 1)[1][:, 0], np.arange(11))
    before = files_sha256(image_files(folder), folder)
    assert loaded.manifest.input_sha256 == before
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "img01.png")
    assert files_sha256(image_files(folder), folder) != before


def test_describe_records_identity(data):
    d = build(data[0], kind="ivf", nlist=16, nprobe=4).describe()
    assert d["factory"] == "IVF16,Flat" and d["nprobe"] == 4 and d["count"] == 3000
    assert d["embedder_id"] == "pixel" and d["input_sha256"] == "abc" and d["metric"] == "inner_product"
