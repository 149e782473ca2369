"""Clustering-driven training-data augmentation (FB-Mem's clustering, reading (b); methods.md 7c).

This method is diffmem's OWN CONSTRUCTION of FB-Mem's clustering idea: FB-Mem releases no
training-time augmentation (its code clusters prompts, k-means on text-encoder outputs, for analysis),
so everything below (what is clustered, the dense test, the augmentation) is ours, not FB-Mem's.
FB-Mem reports that single prompts link to CLUSTERS of similar training images and that local
(foreground) memorization survives neuron-level mitigation. Reading (b) of 7c clusters the TRAINING
IMAGES instead, which is what a training-time mitigator can act on: here the fine-tuning set's images
are embedded with SSCD (``bench.measure.embed.get_embedder("sscd")``, sscd_disc_mixup, 288 px) and clustered
with FAISS k-means (``faiss.Kmeans``, spherical, seeded by the fit seed, each image weighted by its
number of training rows, i.e. duplicates counted as in web data). A cluster is DENSE when both
- its mass (training rows, duplicates counted) >= ``mass_factor`` x the mean cluster mass, and
- its tightness (mass-weighted mean cosine of its members to the normalised centroid) >= ``min_tightness``.
k = 16 and mass_factor 1 are the method's fixed design choices (one cluster per ~50 images; "heavier
than the average cluster"). ``min_tightness`` is CHOSEN ON A HELD-OUT WORLD, never on the scored one
(``tasks/studies/cluster_tightness.py``, ``python -m tasks.studies.cluster_tightness``): the selection world is the
fine-tuning world drawn with both seeds of the scored one offset by 1000 (base world
``MemWorldConfig.seed`` 1000 instead of 0, ``FinetuneConfig.seed`` 1001 instead of 1; organism-v2's
world config otherwise; sha256 716e85aa48f8...), so it shares no image with the scored world. Rule:
cluster its training images exactly as this mitigator does (same SSCD, k, k-means seed 0 = the
benchmark's fit seed, mass weights) and take the smallest multiple of 0.01 strictly above the largest
tightness of an ordinary-only cluster (any mass). Measured there (k = 16, seed 0): the 10
ordinary-only clusters have tightness 0.654-0.795 (the two tightest are light, mass 35 and 36 against a
mean of 116; the ordinary-only clusters heavy enough to pass the mass test reach only 0.692), so
min_tightness = 0.80 (the value set before, 0.75, had been read off the scored world itself). The
planted images' clusters there: one MV image alone (mass 200, tightness 1.0), one MV + 2 ordinary
(202, 0.996), 2 MV + 3 ordinary (403, 0.835), the 8 mosaic (BG) images + 21 ordinary (149, 0.873), and
the 8 sprite (FG) images split 6 (96, 0.788) + 2 (32, 0.901); at 0.80 the dense clusters hold 4/4 MV,
8/8 BG, 0/8 FG images (the sprite clusters fail the MASS test, at any tightness) and 26 ordinary images.
Caveat measured with ``--sweep-seeds 6``: under k-means seeds 1-5 the same rule would give 0.77, 0.73,
0.73, 0.73, 0.72, so the threshold is set by where one clustering happens to put a few tight light
ordinary clusters; the value is fixed by the rule, not tuned.
Members of dense clusters are then augmented during fine-tuning so their exact pixels (and the
foreground of a repeated sprite) are not learned: with probability p = strength a draw of such a
pair uses an augmented copy of its image: a random translation of up to ``max_shift`` px (reflect
padding), a horizontal flip with probability 1/2, and colour jitter (brightness offset, contrast and
per-channel gain, each uniform in +-``jitter``), clipped to [0, 1]. Captions are unchanged.

Deviation (recorded in the transform report): as for the random-token baseline, THE training loop
holds a fixed image tensor, so each dense member gets a pool of ``pool`` augmented copies drawn
once from ``seed``, and its pair weights are split (1 - p) w on the original, p w / pool per copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from baselines.mitigators.train_time import FinetuneMitigator
from bench.core.train import TrainData


def cluster_images(emb: np.ndarray, weights: np.ndarray, k: int, *, seed: int, niter: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """FAISS spherical k-means with per-image weights; returns (assignment [N], centroids [k, d])."""
    import faiss

    x = np.ascontiguousarray(emb, np.float32)
    if len(x) < k:
        raise ValueError(f"cluster_images: {len(x)} images for k = {k} clusters; lower n_clusters")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), spherical=True, verbose=False)
    km.train(x, weights=np.ascontiguousarray(weights, np.float32))
    _, assign = km.index.search(x, 1)
    return assign[:, 0], km.centroids


def image_weights(data: TrainData) -> tuple[np.ndarray, np.ndarray]:
    """(used image ids, their training rows): each image weighted by the summed weight of its pairs."""
    w = np.zeros(len(data.x0))
    np.add.at(w, data.pair_image.numpy(), data.pair_weight.double().numpy())
    used = np.unique(data.pair_image.numpy())
    return used, w[used]


def embed_images(data: TrainData, used: np.ndarray, *, sscd_resize: int = 288) -> np.ndarray:
    """SSCD embeddings (sscd_disc_mixup at ``sscd_resize`` px) of the used images."""
    from bench.measure.embed import get_embedder

    sscd = get_embedder("sscd", resize=sscd_resize, threads=max(1, torch.get_num_threads()), progress=False)
    return sscd.embed(((data.x0[used].float() + 1) / 2).numpy())


def cluster_training_images(data: TrainData, *, n_clusters: int, seed: int, sscd_resize: int = 288,
                            emb: np.ndarray | None = None):
    """THE clustering of the mitigator (also used to choose ``min_tightness``, tasks/studies/cluster_tightness.py):
    (used image ids, their masses, embeddings, assignment, centroids). ``emb`` skips SSCD."""
    used, w = image_weights(data)
    if emb is None:
        emb = embed_images(data, used, sscd_resize=sscd_resize)
    assign, cent = cluster_images(emb, w, n_clusters, seed=seed)
    return used, w, emb, assign, cent


def dense_clusters(emb: np.ndarray, weights: np.ndarray, assign: np.ndarray, centroids: np.ndarray, *,
                   mass_factor: float, min_tightness: float) -> tuple[list[int], list[dict]]:
    """Dense cluster ids and per-cluster stats (mass, tightness, size)."""
    c = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    mean_mass = weights.sum() / len(centroids)
    stats, dense = [], []
    for j in range(len(centroids)):
        m = assign == j
        mass = float(weights[m].sum())
        tight = float((e[m] @ c[j] * weights[m]).sum() / mass) if mass else 0.0
        stats.append({"cluster": j, "size": int(m.sum()), "mass": mass, "tightness": tight})
        if mass >= mass_factor * mean_mass and tight >= min_tightness:
            dense.append(j)
    return dense, stats


def augment_image(x: torch.Tensor, rng: np.random.Generator, *, max_shift: int, jitter: float) -> torch.Tensor:
    """One augmented copy of x [3, H, W] in [-1, 1]: shift (reflect), flip, colour jitter."""
    img = (x.float() + 1) / 2
    if max_shift:
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
        p = max_shift
        padded = torch.nn.functional.pad(img[None], (p, p, p, p), mode="reflect")[0]
        H, W = img.shape[1:]
        img = padded[:, p + dy:p + dy + H, p + dx:p + dx + W]
    if rng.random() < 0.5:
        img = img.flip(-1)
    if jitter:
        b = float(rng.uniform(-jitter, jitter))
        ctr = float(rng.uniform(1 - jitter, 1 + jitter))
        gain = torch.from_numpy(rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32))[:, None, None]
        mean = img.mean()
        img = ((img - mean) * ctr + mean) * gain + b
    return (img.clamp(0, 1) * 2 - 1).to(x.dtype)


# How the default min_tightness was chosen (tasks/studies/cluster_tightness.py); recorded in every run's params.
MIN_TIGHTNESS_SELECTION = {
    "value": 0.80,
    "rule": "smallest multiple of 0.01 strictly above the max tightness of the non-empty ordinary-only "
            "clusters (any mass) of the selection world, clustered exactly as the mitigator clusters "
            "(SSCD, k-means, mass weights, fit seed)",
    "selection_world": {"organism": "v2", "base_world_seed": 1000, "finetune_seed": 1001,
                        "sha256_prefix": "716e85aa48f8", "kmeans_seed": 0, "n_clusters": 16, "mass_factor": 1.0},
    "scored_world": {"base_world_seed": 0, "finetune_seed": 1},
    "selection_ordinary_only_tightness_max": 0.7954,
    "command": "OMP_NUM_THREADS=1 python -m tasks.studies.cluster_tightness",
}


@dataclass
class TrainClusterAugment(FinetuneMitigator):
    n_clusters: int = 16
    mass_factor: float = 1.0
    min_tightness: float = 0.80      # chosen on a world of another seed: MIN_TIGHTNESS_SELECTION
    pool: int = 8
    max_shift: int = 2
    jitter: float = 0.2
    sscd_resize: int = 288
    name: ClassVar[str] = "train_cluster_augment"
    strength_unit: ClassVar[str] = "p_augmented"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.strength <= 1:
            raise ValueError(f"{self.name}: strength is a probability in [0, 1], got {self.strength}")
        if self.pool < 1 or self.n_clusters < 1:
            raise ValueError(f"{self.name}: pool ({self.pool}) and n_clusters ({self.n_clusters}) must be >= 1")

    def method(self) -> dict:
        return {"name": self.name, "p": float(self.strength), "n_clusters": self.n_clusters,
                "mass_factor": self.mass_factor, "min_tightness": self.min_tightness, "pool": self.pool,
                "max_shift": self.max_shift, "jitter": self.jitter, "sscd_resize": self.sscd_resize}

    def params(self) -> dict:
        d = super().params()
        sel = MIN_TIGHTNESS_SELECTION
        at = sel["selection_world"]           # does this run use the selected value at the selection's k, mass?
        applies = (self.min_tightness == sel["value"] and self.n_clusters == at["n_clusters"]
                   and self.mass_factor == at["mass_factor"])
        d["min_tightness_selection"] = {**sel, "applies": applies}
        return d

    def transform(self, model, world, seed):
        def fn(data: TrainData):
            return self.augment(data, seed=seed, world=world)
        return fn

    def augment(self, data: TrainData, *, seed: int, world=None, emb: np.ndarray | None = None):
        """Cluster the pairs' images, augment dense members; ``emb`` (per used image) skips SSCD (tests)."""
        used, wu, emb, assign, cent = cluster_training_images(data, n_clusters=self.n_clusters, seed=seed,
                                                              sscd_resize=self.sscd_resize, emb=emb)
        w = np.zeros(len(data.x0))
        w[used] = wu
        dense, stats = dense_clusters(emb, w[used], assign, cent, mass_factor=self.mass_factor,
                                      min_tightness=self.min_tightness)
        members = used[np.isin(assign, dense)]
        p, rng = float(self.strength), np.random.default_rng([int(seed), 4242])
        copies, new_index = [], {}
        for i in members:
            new_index[int(i)] = list(range(len(data.x0) + len(copies), len(data.x0) + len(copies) + self.pool))
            copies += [augment_image(data.x0[i], rng, max_shift=self.max_shift, jitter=self.jitter)
                       for _ in range(self.pool)]
        x0 = torch.cat([data.x0, torch.stack(copies)]) if copies else data.x0
        caps, img, wt = list(data.captions), [data.pair_image], [data.pair_weight.double().clone()]
        for k, (i, c) in enumerate(zip(data.pair_image.tolist(), data.captions)):
            if i in new_index:
                wt[0][k] = data.pair_weight[k] * (1 - p)
                caps += [c] * self.pool
                img.append(torch.tensor(new_index[i]))
                wt.append(torch.full((self.pool,), float(data.pair_weight[k]) * p / self.pool, dtype=torch.float64))
        kinds = np.asarray(world.image_kind) if world is not None else None
        info = {"transform": self.name, "p": p, "n_images_clustered": int(len(used)),
                "dense_clusters": [stats[j] for j in dense], "n_dense_members": int(len(members)),
                "dense_member_kinds": ({k: int((kinds[members] == k).sum()) for k in sorted(set(kinds[members]))}
                                       if kinds is not None and len(members) else {}),
                "cluster_mass_mean": float(w[used].sum() / self.n_clusters),
                "tightness_all": sorted(round(s["tightness"], 3) for s in stats),
                "augmentation": f"shift <= {self.max_shift}px reflect, hflip p=0.5, brightness/contrast/gain +-{self.jitter}",
                "deviation": "finite per-image pool of pre-drawn augmented copies (fixed image tensor)"}
        return TrainData(x0, torch.cat(img), torch.cat(wt), caps), info
