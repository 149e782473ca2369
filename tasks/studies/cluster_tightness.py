"""Choose ``train_cluster_augment``'s ``min_tightness`` on a held-out fine-tuning world.

    python -m tasks.studies.cluster_tightness            # prints the chosen value and the per-cluster stats (JSON)

The clustering-driven augmentation (``baselines/mitigators/train_cluster_augment.py``) augments the
members of DENSE clusters of the fine-tuning set's images (SSCD + FAISS spherical k-means, images
weighted by their training rows): mass >= ``mass_factor`` x the mean cluster mass and tightness >=
``min_tightness``. ``min_tightness`` must not be tuned on the world the mitigator is scored on, so it
is chosen here on a SELECTION world that shares no image with the scored one.

Selection world. The scored world (``tasks.studies.finetune_mitigate``) is
``finetune_world(world_for(None, organism), FinetuneConfig(**conf/finetune.yaml finetune))``: the
committed organism's base world (``MemWorldConfig.seed`` 0) and ``FinetuneConfig.seed`` 1. Its 800
ordinary training images ARE the base world's ordinary images, so changing only the fine-tuning seed
would redraw the 20 planted images but keep every ordinary image, i.e. the ordinary-only clusters the
rule thresholds would be (nearly) the scored world's own. The selection world therefore offsets BOTH
seeds by ``OFFSET`` (1000): base world ``MemWorldConfig(seed = 0 + 1000)`` (every other field of the
organism's world config unchanged) and ``FinetuneConfig(seed = 1 + 1000)`` (every other field
unchanged). It is drawn by the same code, so it has the same composition (800 ordinary images, 4 MV
images x 200 rows, one 8-image sprite family x 16, one 8-image mosaic family x 16) and no image in
common with the scored world. The scored world is not built, embedded or clustered here.

Rule (deterministic; the selection world's image kinds may be used because that world is not scored):
cluster the selection world's training images exactly as the mitigator does
(``cluster_training_images``: same SSCD embedding and resize, same k = ``n_clusters``, same FAISS
k-means seed = the benchmark's fit seed, ``seed`` of conf/finetune.yaml, same mass weighting), then set
``min_tightness`` to the smallest multiple of 0.01 STRICTLY above the largest tightness of a non-empty
cluster made only of ordinary (non-planted) images, whatever its mass (so the threshold does not lean
on the mass test: on the scored world an ordinary cluster may be heavier). Every ordinary-only cluster
of the selection world is then not dense at any mass. The 0.01 grid is the only margin: the rule
already takes the max over every ordinary-only cluster, light ones included (a margin of its own would
need a second tuned number).

Result (organism-v2, offset 1000, k = 16, mass_factor 1, k-means seed 0; ``--sweep-seeds 6`` for the
diagnostic): selection world sha256 716e85aa48f8..., 820 images clustered; the 10 ordinary-only clusters
have tightness 0.654-0.795 (max 0.7954, a light cluster of 35 images; the ordinary-only clusters that pass
the mass test reach 0.692) -> min_tightness 0.80. At 0.80 the dense clusters hold 4/4 MV, 8/8 BG and 0/8
FG images (the sprite clusters, tightness 0.79 and 0.90, fail the mass test) and 26 ordinary images.
Diagnostic, not used: k-means seeds 1-5 would give 0.77, 0.73, 0.73, 0.73, 0.72 on the same embeddings.
One core: about 1 minute (SSCD embedding of the 820 images is most of it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OFFSET = 1000
STEP = 0.01
RULE = ("smallest multiple of 0.01 strictly above the max tightness of the non-empty ordinary-only clusters "
        "(any mass) of the selection world, clustered exactly as the mitigator clusters (SSCD, k-means, "
        "mass weights, fit seed)")


def rule_min_tightness(stats: list[dict], *, step: float = STEP) -> float:
    """The rule on per-cluster stats (each with ``size``, ``tightness`` and ``ordinary_only``)."""
    ordinary = [s["tightness"] for s in stats if s["ordinary_only"] and s["size"] > 0]
    if not ordinary:
        raise ValueError("rule_min_tightness: no ordinary-only cluster; the rule needs at least one")
    top = max(ordinary)
    v = round((math.floor(top / step) + 1) * step, 10)
    while v <= top:                               # float floor may land on top itself
        v = round(v + step, 10)
    while round(v - step, 10) > top:
        v = round(v - step, 10)
    return v


def cluster_table(kinds: np.ndarray, weights: np.ndarray, assign: np.ndarray, stats: list[dict]) -> list[dict]:
    """Per-cluster stats plus their member kinds (``ordinary_only``: every member is ordinary)."""
    out = []
    for s in stats:
        m = assign == s["cluster"]
        ks = {str(k): int((kinds[m] == k).sum()) for k in sorted(set(kinds[m].tolist()))}
        out.append({**s, "kinds": ks, "ordinary_only": bool(m.any()) and set(ks) == {"ordinary"},
                    "planted_rows": float(weights[m & (kinds != "ordinary")].sum())})
    return out


def choose_from_embeddings(emb: np.ndarray, weights: np.ndarray, kinds, *, n_clusters: int, mass_factor: float,
                           seed: int) -> tuple[float, dict]:
    """The rule on given per-image embeddings, masses and kinds (the SSCD-free core; tests use it)."""
    from baselines.mitigators.train_cluster_augment import cluster_images

    assign, cent = cluster_images(emb, weights, n_clusters, seed=seed)
    return choose_from_clusters(emb, weights, kinds, assign, cent, mass_factor=mass_factor)


def choose_from_clusters(emb: np.ndarray, weights: np.ndarray, kinds, assign: np.ndarray, cent: np.ndarray, *,
                         mass_factor: float) -> tuple[float, dict]:
    """The rule on a given clustering (the mitigator's ``dense_clusters`` stats)."""
    from baselines.mitigators.train_cluster_augment import dense_clusters

    kinds = np.asarray(kinds).astype(str)
    _, stats = dense_clusters(emb, weights, assign, cent, mass_factor=mass_factor, min_tightness=math.inf)
    table = cluster_table(kinds, weights, assign, stats)
    value = rule_min_tightness(table)
    return value, summarize(table, weights, assign, kinds, value, mass_factor)


def summarize(table: list[dict], weights, assign, kinds, value: float, mass_factor: float) -> dict:
    mean_mass = float(np.asarray(weights).sum() / len(table))
    for s in table:
        s["dense_at_chosen"] = bool(s["mass"] >= mass_factor * mean_mass and s["tightness"] >= value)
        s["tightness"] = round(s["tightness"], 4)
    dense = {s["cluster"] for s in table if s["dense_at_chosen"]}
    planted = kinds != "ordinary"
    covered = {str(k): f"{int((np.isin(assign, list(dense)) & (kinds == k)).sum())}/{int((kinds == k).sum())}"
               for k in sorted(set(kinds[planted].tolist()))}
    ordinary = [s["tightness"] for s in table if s["ordinary_only"] and s["size"] > 0]
    heavy = [s["tightness"] for s in table if s["ordinary_only"] and s["mass"] >= mass_factor * mean_mass]
    majority = [s["tightness"] for s in table if s["size"] and s["planted_rows"] < s["mass"] / 2]
    with_planted = [s for s in table if s["size"] and not s["ordinary_only"]]
    return {"min_tightness": value, "rule": RULE, "cluster_mass_mean": mean_mass,
            "ordinary_only_tightness_max": max(ordinary), "ordinary_only_tightness_min": min(ordinary),
            "n_ordinary_only_clusters": len(ordinary),
            # diagnostics, not the rule: the same max over the ordinary-only clusters that pass the mass
            # test, and over the clusters whose rows are mostly ordinary (a planted image or two inside)
            "diagnostic_mass_passing_ordinary_only_tightness_max": max(heavy, default=None),
            "diagnostic_ordinary_majority_tightness_max": max(majority, default=None),
            "clusters_with_planted": [{k: s[k] for k in ("cluster", "size", "mass", "tightness", "kinds",
                                                         "dense_at_chosen")} for s in with_planted],
            "planted_images_in_dense_clusters": covered,
            "ordinary_images_in_dense_clusters": int((np.isin(assign, list(dense)) & ~planted).sum()),
            "clusters": table}


def scored_configs(version: str | None = None, finetune: dict | None = None):
    """(base world config, FinetuneConfig) of the scored world, as tasks.studies.finetune_mitigate builds it
    (the organism's world config; conf/finetune.yaml's ``finetune`` overrides unless given)."""
    from tasks.studies.finetune_mitigate import load_conf
    from tasks.finetune_world import finetune_config_from_dict
    from tasks.organism import DEFAULT_VERSION, organism_config

    if finetune is None:
        finetune = load_conf().get("finetune") or {}
    return organism_config(version or DEFAULT_VERSION).world, finetune_config_from_dict(finetune)


def selection_configs(version: str | None = None, finetune: dict | None = None, offset: int = OFFSET):
    """(base world config, FinetuneConfig) of the selection world: both seeds of the scored ones + ``offset``."""
    if offset == 0:
        raise ValueError("selection_configs: offset 0 would select on the scored world")
    wc, fc = scored_configs(version, finetune)
    return dataclasses.replace(wc, seed=wc.seed + offset), dataclasses.replace(fc, seed=fc.seed + offset)


def selection_world(version: str | None = None, finetune: dict | None = None, offset: int = OFFSET):
    from tasks.finetune_world import finetune_world
    from tasks.memworld import build_memworld

    wc, fc = selection_configs(version, finetune, offset)
    return finetune_world(build_memworld(wc), fc)


def choose_min_tightness(base_world, finetune_cfg, *, n_clusters: int = 16, mass_factor: float = 1.0,
                         seed: int = 0, sscd_resize: int = 288, emb: np.ndarray | None = None,
                         sweep_seeds: tuple[int, ...] = ()) -> tuple[float, dict]:
    """The rule on ``finetune_world(base_world, finetune_cfg)``, clustered as the mitigator does.

    Pass the SELECTION world's base and config (``selection_configs``), never the scored world's.
    Returns (min_tightness, report with the per-cluster stats and the world's identity). ``sweep_seeds``
    adds, as a diagnostic, the value the rule would give under those k-means seeds (same embeddings)."""
    from baselines.mitigators.train_cluster_augment import cluster_training_images
    from tasks.finetune_world import finetune_world, train_data

    world = finetune_world(base_world, finetune_cfg)
    data = train_data(world)
    t0 = time.perf_counter()
    used, w, emb, assign, cent = cluster_training_images(data, n_clusters=n_clusters, seed=seed,
                                                         sscd_resize=sscd_resize, emb=emb)
    value, report = choose_from_clusters(emb, w, np.asarray(world.image_kind)[used], assign, cent,
                                         mass_factor=mass_factor)
    report = {"selection_world": {"base_world_seed": int(base_world.config.seed),
                                  "finetune_seed": int(finetune_cfg.seed), "sha256": world.sha256,
                                  "n_images_clustered": int(len(used))},
              "n_clusters": n_clusters, "mass_factor": mass_factor, "kmeans_seed": seed,
              "sscd_resize": sscd_resize, "embed_and_cluster_seconds": time.perf_counter() - t0, **report}
    if sweep_seeds:                               # diagnostic only: the rule under other k-means seeds
        kinds = np.asarray(world.image_kind)[used]
        report["diagnostic_kmeans_seed_sweep"] = {
            int(s): choose_from_embeddings(emb, w, kinds, n_clusters=n_clusters, mass_factor=mass_factor,
                                           seed=int(s))[0] for s in sweep_seeds}
    return value, report


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from tasks.studies.finetune_mitigate import load_conf
    from tasks.memworld import build_memworld
    from tasks.organism import DEFAULT_VERSION

    mconf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "mitigator" / "train_cluster_augment.yaml"))
    fconf = load_conf()
    ap = argparse.ArgumentParser(description="choose train_cluster_augment's min_tightness on a held-out world")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="organism whose world config is used")
    ap.add_argument("--offset", type=int, default=OFFSET, help="added to both seeds of the scored world")
    ap.add_argument("--n-clusters", type=int, default=int(mconf["n_clusters"]))
    ap.add_argument("--mass-factor", type=float, default=float(mconf["mass_factor"]))
    ap.add_argument("--seed", type=int, default=int(fconf.get("seed", 0)), help="k-means seed (the fit seed)")
    ap.add_argument("--sscd-resize", type=int, default=int(mconf.get("sscd_resize", 288)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep-seeds", type=int, default=0,
                    help="diagnostic: also report the rule's value under k-means seeds 0..N-1 (not used)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    wc, fc = selection_configs(a.version, fconf.get("finetune") or {}, a.offset)
    value, report = choose_min_tightness(build_memworld(wc), fc, n_clusters=a.n_clusters,
                                         mass_factor=a.mass_factor, seed=a.seed, sscd_resize=a.sscd_resize,
                                         sweep_seeds=tuple(range(a.sweep_seeds)))
    report = {"organism": a.version, "offset": a.offset, **report, "wall_seconds": time.perf_counter() - t0,
              "threads": a.threads}
    text = json.dumps(report, indent=1, default=str)
    if a.out:
        from bench.core.atomic import atomic_write_text
        atomic_write_text(a.out, text)
    print(text)
    print(f"min_tightness = {value}")


if __name__ == "__main__":
    main()
