"""Clustering-driven training-data augmentation (FB-Mem's clustering, reading (b); methods.md 7c).

FB-Mem reports that single prompts link to CLUSTERS of similar training images and that local
(foreground) memorization survives neuron-level mitigation; its code clusters prompts (k-means on
text-encoder outputs). Reading (b) of 7c clusters the TRAINING IMAGES instead, which is what a
training-time mitigator can act on: here the fine-tuning set's images are embedded with SSCD
(``bench.embed.get_embedder("sscd")``, sscd_disc_mixup, 288 px) and clustered with FAISS k-means
(``faiss.Kmeans``, spherical, each image weighted by its number of training rows, i.e. duplicates
counted as in web data). A cluster is DENSE when both
- its mass (training rows, duplicates counted) >= ``mass_factor`` x the mean cluster mass, and
- its tightness (mass-weighted mean cosine of its members to the normalised centroid) >= ``min_tightness``.
Defaults (k = 16, mass_factor 1, min_tightness 0.75) were set from the organism's fine-tuning set
(python -m tasks.finetune_mitigate build logs the per-cluster stats in the manifest): at k = 16 the
ordinary-only clusters have tightness 0.70-0.71 (max 0.708), each new MV image forms its own cluster
(mass 100, tightness 1.0) and 7 of the 8 sprite images form one (mass 112, tightness 0.80); the 8th
sprite image falls in an ordinary cluster (tightness 0.74) and is not augmented.
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
from bench.train import TrainData


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


@dataclass
class TrainClusterAugment(FinetuneMitigator):
    n_clusters: int = 16
    mass_factor: float = 1.0
    min_tightness: float = 0.75
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

    def transform(self, model, world, seed):
        def fn(data: TrainData):
            return self.augment(data, seed=seed, world=world)
        return fn

    def augment(self, data: TrainData, *, seed: int, world=None, emb: np.ndarray | None = None):
        """Cluster the pairs' images, augment dense members; ``emb`` (per used image) skips SSCD (tests)."""
        from bench.embed import get_embedder

        used = np.unique(data.pair_image.numpy())
        w = np.zeros(len(data.x0))
        np.add.at(w, data.pair_image.numpy(), data.pair_weight.double().numpy())
        if emb is None:
            sscd = get_embedder("sscd", resize=self.sscd_resize, threads=max(1, torch.get_num_threads()),
                                progress=False)
            emb = sscd.embed(((data.x0[used].float() + 1) / 2).numpy())
        assign, cent = cluster_images(emb, w[used], self.n_clusters, seed=seed)
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
