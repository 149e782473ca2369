"""Neighbour search at scale: build an IVF-PQ index over N synthetic 512-d embeddings in chunks from
.npy shards, memory-map it, and measure build time, query time per 1,000 queries, recall@10 against
exact search, and peak RSS of each phase -> ``results/faiss_scale.csv`` (``make bench-faiss``).

Each phase (generate, build, exact, search) runs in its own subprocess so its peak RSS
(``ru_maxrss``, which counts the resident pages of memory-mapped files) is its own.

Synthetic data (a stand-in for image descriptors; pure isotropic noise would be a worst case with
meaningless neighbours): ``n_clusters`` Gaussian clusters (unit-variance centres, spread 0.5) in a
``latent_dim``-dimensional space (intrinsic dimension 64 by default), mapped to 512-d by a random
orthonormal projection, plus isotropic noise of about 0.1 of the signal norm, L2-normalised. Half the
queries are near-copies of training rows (noise of L2 norm 0.3, cosine to the source about 0.96, the
copy-detection case), half fresh draws. Recall@10 is the 10-recall@10 (|ANN top-10 ∩ exact top-10| /
10) on every ``recall_every``-th query, against exact search by chunked numpy matmul;
``nn_in_top10`` is faiss's 1-recall@10; ``copy_top1`` the share of near-copy queries whose source is
the first result.

Default index ``IVF1024,PQ64x8``. nlist: faiss's guideline is 4-16 sqrt(N) (4096-16384 at 1M);
we use 1024 = sqrt(N) so k-means training (50k rows) and assigning 1M rows to cells (cost
proportional to nlist) fit the ~10-minute budget on 2 shared cores; the price is longer lists, i.e.
more codes scanned per probe. Here clusters are compact, so recall saturates at a few probes and is
limited by the PQ codes, not by nlist. m = 64: 8 dims per sub-quantiser, 64 bytes per vector (32x
smaller than raw float32), the usual balance for 512-d descriptors. Timings are wall-clock on a
machine whose 2 cores are shared with other jobs: they may include contention (the 1-minute load
average at the start is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARD_ROWS = 100_000
COPY_NOISE, SPREAD, ISO_NOISE = 0.3, 0.5, 0.1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- phases
def synthetic(rng: np.random.Generator, centres: np.ndarray, proj: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows: a cluster centre plus spread in the latent space, projected to ``dim``, plus
    isotropic noise of about 0.1 of the signal norm, L2-normalised."""
    k, latent = centres.shape
    z = centres[rng.integers(0, k, n)] + SPREAD * rng.standard_normal((n, latent), dtype=np.float32)
    x = z @ proj
    noise = rng.standard_normal(x.shape, dtype=np.float32) * (ISO_NOISE * np.sqrt(latent / proj.shape[1]))
    return normalise(x + noise)


def phase_generate(a) -> dict:
    rng = np.random.default_rng(a.seed)
    centres = rng.standard_normal((a.n_clusters, a.latent_dim)).astype(np.float32)
    proj = np.linalg.qr(rng.standard_normal((a.dim, a.latent_dim)))[0].T.astype(np.float32)  # orthonormal rows
    emb = Path(a.workdir) / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, a.n, SHARD_ROWS)):
        np.save(emb / f"shard_{s:05d}.npy", synthetic(rng, centres, proj, min(SHARD_ROWS, a.n - start)))
    half = a.n_queries // 2
    src = np.sort(rng.choice(a.n, half, replace=False))
    rows = np.concatenate([np.load(emb / f"shard_{i // SHARD_ROWS:05d}.npy", mmap_mode="r")[i % SHARD_ROWS][None]
                           for i in src])
    # near-copies: noise of L2 norm about COPY_NOISE on unit rows (cosine to the source about 0.96)
    copies = normalise(rows + COPY_NOISE / np.sqrt(a.dim) * rng.standard_normal(rows.shape, dtype=np.float32))
    fresh = synthetic(rng, centres, proj, a.n_queries - half)
    np.save(Path(a.workdir) / "queries.npy", np.concatenate([copies, fresh]))
    np.save(Path(a.workdir) / "copy_sources.npy", src.astype(np.int64))
    return {"copy_cosine_mean": round(float(np.mean(np.sum(copies * rows, 1))), 4)}


def phase_build(a) -> dict:
    import faiss

    from bench.measure.retrieval import NeighbourIndex

    faiss.omp_set_num_threads(a.threads)
    nlist, pq = a.factory.split(",")
    m, nbits = (pq[2:].split("x") + ["8"])[:2]
    t0 = time.perf_counter()
    index = NeighbourIndex.build_from_npy(Path(a.workdir) / "emb", embedder_id="synthetic",
                                          preprocessing=f"synthetic clustered 512-d, seed {a.seed}",
                                          kind="ivfpq", nlist=int(nlist[3:]), pq_m=int(m), pq_nbits=int(nbits),
                                          train_size=a.train_rows, seed=a.seed)
    folder = index.save(Path(a.workdir) / "index")
    return {"build_seconds": round(time.perf_counter() - t0, 1), "train_rows": index.manifest.params["train_rows"],
            "kmeans_niter": index.manifest.params["kmeans_niter"],
            "index_file_mb": round((folder / "index.faiss").stat().st_size / 2**20, 1)}


def phase_exact(a) -> dict:
    """Exact top-k by chunked numpy matmul over the memory-mapped shards (the ground truth)."""
    q = np.load(Path(a.workdir) / "queries.npy")[::a.recall_every]  # a sample: copies and fresh alike
    best_s = np.full((len(q), a.k), -np.inf, np.float32)
    best_i = np.full((len(q), a.k), -1, np.int64)
    t0, offset = time.perf_counter(), 0
    for f in sorted((Path(a.workdir) / "emb").glob("*.npy")):
        x = np.load(f, mmap_mode="r")
        s = q @ np.asarray(x).T
        top = np.argpartition(-s, a.k - 1, axis=1)[:, :a.k]
        cat_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cat_i = np.concatenate([best_i, top + offset], 1)
        order = np.argsort(-cat_s, axis=1, kind="stable")[:, :a.k]
        best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
        offset += len(x)
    secs = time.perf_counter() - t0
    np.save(Path(a.workdir) / "exact_idx.npy", best_i)
    return {"exact_seconds_per_1000_queries": round(secs * 1000 / len(q), 2)}


def phase_search(a) -> dict:
    import faiss

    from bench.measure.retrieval import NeighbourIndex

    faiss.omp_set_num_threads(a.threads)
    w = Path(a.workdir)
    q, ref, src = np.load(w / "queries.npy"), np.load(w / "exact_idx.npy"), np.load(w / "copy_sources.npy")
    sample = np.arange(0, len(q), a.recall_every)
    t0 = time.perf_counter()
    index = NeighbourIndex.load(w / "index", mmap=True)
    load_s = time.perf_counter() - t0
    rows = []
    for nprobe in a.nprobe:
        index.nprobe = nprobe
        index.search(q[:50], a.k)  # warm the mapped pages once, so the first setting is not charged for it
        t0 = time.perf_counter()
        _, got = index.search(q, a.k)
        secs = time.perf_counter() - t0
        rows.append({"nprobe": nprobe, "query_seconds_per_1000": round(secs * 1000 / len(q), 3),
                     "recall_at_10": round(float(np.mean([len(set(g) & set(r)) / a.k
                                                          for g, r in zip(got[sample], ref)])), 4),
                     "nn_in_top10": round(float(np.mean([r[0] in g for g, r in zip(got[sample], ref)])), 4),
                     "copy_top1": round(float(np.mean(got[:len(src), 0] == src)), 4)})
    return {"load_seconds": round(load_s, 3), "per_nprobe": rows}


PHASES = {"generate": phase_generate, "build": phase_build, "exact": phase_exact, "search": phase_search}


# ----------------------------------------------------------------------------- driver
def run_phase(name: str, argv: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tasks.studies.faiss_scale", "--phase", name, *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"faiss_scale phase {name!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res[f"{name}_wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[faiss_scale] {name}: {res}", flush=True)
    return res


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="training-set size (vectors)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-clusters", type=int, default=10_000)
    ap.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension of the synthetic data")
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--factory", default="IVF1024,PQ64x8", help="IVF<nlist>,PQ<m>x<nbits>")
    ap.add_argument("--train-rows", type=int, default=None, help="k-means sample (default 39 x nlist)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--recall-every", type=int, default=5, help="exact ground truth on every j-th query")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="faiss/BLAS threads (1: the cores are shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, deleted after)")
    ap.add_argument("--out", default=str(ROOT / "results" / "faiss_scale.csv"))
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.phase:  # inside a subprocess
        res = PHASES[a.phase](a)
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(res))
        return
    import faiss
    import pandas as pd

    load1 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="faiss_scale_") as tmp:
        work = a.workdir or tmp
        argv2 = [f"--n={a.n}", f"--dim={a.dim}", f"--n-clusters={a.n_clusters}",
                 f"--latent-dim={a.latent_dim}", f"--n-queries={a.n_queries}",
                 f"--factory={a.factory}", f"--k={a.k}", f"--recall-every={a.recall_every}",
                 f"--threads={a.threads}", f"--seed={a.seed}",
                 f"--workdir={work}", "--nprobe", *map(str, a.nprobe)]
        if a.train_rows:
            argv2.append(f"--train-rows={a.train_rows}")
        res = {p: run_phase(p, argv2, a.threads) for p in ("generate", "build", "exact", "search")}
    common = {
        "n_vectors": a.n, "dim": a.dim, "factory": a.factory, "metric": "inner_product",
        "train_rows": res["build"]["train_rows"], "kmeans_niter": res["build"]["kmeans_niter"],
        "build_seconds": res["build"]["build_seconds"], "build_peak_rss_mb": res["build"]["peak_rss_mb"],
        "index_file_mb": res["build"]["index_file_mb"], "load_seconds": res["search"]["load_seconds"],
        "search_peak_rss_mb": res["search"]["peak_rss_mb"],
        "exact_seconds_per_1000_queries": res["exact"]["exact_seconds_per_1000_queries"],
        "n_queries": a.n_queries, "n_recall_queries": len(range(0, a.n_queries, a.recall_every)), "k": a.k,
        "threads": a.threads, "faiss_version": faiss.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "loadavg_1min_at_start": round(load1, 2),
        "data": f"{a.n_clusters} Gaussian clusters (spread {SPREAD}) in a {a.latent_dim}-d latent space, "
                f"projected to {a.dim}-d + isotropic noise {ISO_NOISE}, L2-normalised, seed {a.seed}; queries: "
                f"half near-copies (noise norm {COPY_NOISE}, mean cosine {res['generate']['copy_cosine_mean']}), "
                "half fresh",
        "note": "wall-clock on a shared 2-core machine: timings may include contention from other jobs",
        "command": "python -m tasks.studies.faiss_scale " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    rows = [common | r for r in res["search"]["per_nprobe"]]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(a.out, index=False)
    cols = ["factory", "nprobe", "build_seconds", "query_seconds_per_1000", "recall_at_10", "nn_in_top10",
            "copy_top1", "build_peak_rss_mb", "search_peak_rss_mb"]
    print(pd.DataFrame(rows)[cols].to_string())
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
