"""FB-Mem: foreground / background memorization categories and the mitigation score (methods.md 7).

Pipeline (release ``6_bg_scores.py`` and ``archive/check_score.py`` of Jimmy-di/localizing_memorization_in_diffusion_models):

1. Split every image with its foreground mask (``fg_bg_images``): the foreground image F keeps the
   foreground pixels on black (rembg's cut-out), the background image B paints the foreground white
   (the release pastes the alpha map over the image). RGB only: the release saves generated
   foregrounds as RGB, so their alpha channel is gone before scoring.
2. Similarity of a (generation g, training image x) pair: fg = MS-SSIM(F_x, F_g), bg = MS-SSIM(B_x, B_g),
   avg = (fg + bg) / 2 (``bench/measure/msssim.py``; small-image window, see there). SSCD-FB (cosine of
   SSCD embeddings of F and B) is the optional alternative (``FBMemConfig.similarity = "sscd"``).
   ``FBMemConfig.region``: "blank" is the release (MS-SSIM over the whole blanked images);
   "masked" (default, deviation) restricts every SSIM window to the compared region: the union of
   the two foregrounds for fg, the pixels that are background in both images for bg (normalised
   convolution, ``ms_ssim_pairs(region=...)``). Why: at 16 px the blanked area dominates the blank
   variant. Measured on a constructed case (tests/test_fbmem.py ``constructed``: same mosaic
   background, other sprite elsewhere) the blank variant gives bg 0.68, against 0.45 for the same
   sprite on another background; the masked one gives 0.89 and 0.08. On MemWorld's null (non-pool
   images vs the planted pool) blank foregrounds score a median max of 0.75 just from shared black.
   Degenerate generation masks (the release's adaptive comparison, beta = 0.03): if the generation's
   foreground covers >= 1 - beta of the image, its F image stands in for its B image; if it covers
   <= beta, its B image stands in for its F image. The release tests near-white / near-black pixel
   shares of the segmented images; we test the mask's area share, which is what the rule intends
   (deviation, recorded as ``degenerate_rule`` in ``FBMemConfig``).
3. Matches: the release scores every training image of its pool and keeps the top k = 5 by avg
   (``match_idx=None``); callers with a neighbour index (FAISS) may pass candidates ``match_idx [N, k]``
   instead, which are then ranked by avg the same way. One generation links to up to k images.
4. Category of a pair (``categorize``): VM if fg >= tau_fg and bg >= tau_bg, BM if only bg, FM if only
   fg, else NM. A generation takes its best match's category (highest avg), as the release's
   ``groupby("generated image").last()`` after sorting by avg.
5. Mitigation score (``mitigation_score``): mean over generations (same prompt and seed before and
   after) of the release's transition rewards ``TRANSITION_REWARD``.

Pool: the release compares each generation with its 500 memorized LAION images, not with all of
LAION; on the organism the analogue is ``memorized_pool(world)`` (the planted MV/RV/TV/FG/BG images).
Comparing with the ordinary images too would call many ordinary generations copies of one of the
many near-identical "a red circle" training images.

Thresholds: the release uses tau = 0.8 for both (torchmetrics MS-SSIM on 512 px images). The
organism's 16 px images and the small window give other similarity levels, so thresholds are
calibrated per world on its training images (``calibrate_thresholds``): tau_fg is the 99th
percentile, over the training images outside the pool (ordinary pairs, trained-once controls), of
their highest foreground similarity to a pool image; tau_bg likewise for backgrounds. An image that
copies nothing from the pool thus crosses each threshold at most 1% of the time. ``thresholds_for``
stores them with the world's sha256 (``results/fbmem_thresholds/``, computed once per world and
configuration, a few minutes on 2 cores) and ``check_world`` refuses thresholds made for another world.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.measure.msssim import MSSSIMConfig, ms_ssim_pairs
from bench.measure.segment import check_masks

CATEGORIES = ("VM", "FM", "BM", "NM")
# (before, after) -> reward; release archive/check_score.py (values as in the paper per methods.md 7d).
# Not antisymmetric: BM -> FM costs 0.5 while FM -> BM earns 1.0, as in the release.
TRANSITION_REWARD: dict[tuple[str, str], float] = {
    ("VM", "VM"): 0.0, ("VM", "BM"): 1.5, ("VM", "FM"): 0.5, ("VM", "NM"): 2.0,
    ("BM", "VM"): -1.5, ("BM", "BM"): 0.0, ("BM", "FM"): -0.5, ("BM", "NM"): 0.5,
    ("FM", "VM"): -0.5, ("FM", "BM"): 1.0, ("FM", "FM"): 0.0, ("FM", "NM"): 1.5,
    ("NM", "VM"): -2.0, ("NM", "BM"): -0.5, ("NM", "FM"): -1.5, ("NM", "NM"): 0.0,
}


@dataclass(frozen=True)
class FBThresholds:
    fg: float
    bg: float
    source: str = ""
    world_sha256: str = ""       # the world they were calibrated on ("" = not world-bound, e.g. the release's)


class FBMemThresholdError(ValueError):
    """FB-Mem thresholds used on a world (or configuration) they were not calibrated for."""


RELEASE_THRESHOLDS = FBThresholds(0.8, 0.8, "FB-Mem release tau = 0.8 (torchmetrics MS-SSIM defaults, 512 px)")
THRESHOLD_DIR = Path("results/fbmem_thresholds")
THRESHOLD_QUANTILE = 0.99


def check_world(thr: FBThresholds, world) -> None:
    """Refuse thresholds calibrated on another world (the release's world-free ones pass)."""
    if thr is RELEASE_THRESHOLDS:
        return
    if thr.world_sha256 != world.sha256:
        raise FBMemThresholdError(
            f"FB-Mem thresholds calibrated on world {thr.world_sha256[:12] or '<none recorded>'} used on world "
            f"{world.sha256[:12]}; calibrate them for this world with bench.measure.fbmem.thresholds_for(world) "
            "(`python -m bench.measure.fbmem --model <organism folder>`)")


@dataclass(frozen=True)
class FBMemConfig:
    msssim: MSSSIMConfig = field(default_factory=MSSSIMConfig)
    similarity: str = "ms_ssim"          # or "sscd" (SSCD-FB: cosine of SSCD embeddings of F and B images)
    top_k: int = 5
    beta: float = 0.03                   # degenerate-mask rule (release: 0.97 / 0.03 pixel shares)
    degenerate_rule: str = "mask_area"   # deviation: the release tests pixel values of the segmented images
    region: str = "masked"               # "blank" = release (whole blanked images); "masked" = deviation, see module doc
    chunk_pairs: int = 4096

    def __post_init__(self) -> None:
        if self.similarity not in ("ms_ssim", "sscd"):
            raise ValueError(f"FBMemConfig.similarity must be 'ms_ssim' or 'sscd', got {self.similarity!r}")
        if self.region not in ("blank", "masked"):
            raise ValueError(f"FBMemConfig.region must be 'blank' or 'masked', got {self.region!r}")
        if self.top_k < 1:
            raise ValueError(f"FBMemConfig.top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"FBMemConfig.beta must be in [0, 0.5), got {self.beta}")

    def params(self) -> dict:
        return asdict(self)


def _images(x, what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"{what}: expected float images [N, 3, H, W] in [0, 1], got shape {a.shape}")
    if a.size and (not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6):
        raise ValueError(f"{what}: values must be finite and in [0, 1]; got range [{a.min():.3g}, {a.max():.3g}]")
    return np.clip(a, 0, 1)


def fg_bg_images(images, masks) -> tuple[np.ndarray, np.ndarray]:
    """Foreground image (foreground on black) and background image (foreground painted white)."""
    x = _images(images, "fg_bg_images images")
    m = check_masks(masks, len(x), x.shape[-2:], "fg_bg_images masks")[:, None].astype(np.float32)
    return x * m, x * (1 - m) + m


def degenerate_swap(gen_f: np.ndarray, gen_b: np.ndarray, gen_masks: np.ndarray, beta: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Release's adaptive comparison for generations whose mask is (almost) all or nothing.

    Returns (F, B, rule) with rule "fg_for_bg" (foreground share >= 1 - beta: F also scores the
    background), "bg_for_fg" (share <= beta: B also scores the foreground) or "".
    """
    share = gen_masks.reshape(len(gen_masks), -1).mean(1)
    all_fg, no_fg = share >= 1 - beta, share <= beta
    f, b = gen_f.copy(), gen_b.copy()
    b[all_fg] = gen_f[all_fg]
    f[no_fg & ~all_fg] = gen_b[no_fg & ~all_fg]
    rule = np.where(all_fg, "fg_for_bg", np.where(no_fg, "bg_for_fg", ""))
    return f, b, rule


def _pair_sims(gen_f, gen_b, tr_f, tr_b, ig, it, cfg: FBMemConfig, embedder, gen_w, tr_m
               ) -> tuple[np.ndarray, np.ndarray]:
    if cfg.similarity == "ms_ssim":
        if cfg.region == "blank":
            return (ms_ssim_pairs(tr_f, gen_f, it, ig, cfg.msssim, cfg.chunk_pairs),
                    ms_ssim_pairs(tr_b, gen_b, it, ig, cfg.msssim, cfg.chunk_pairs))
        tm = tr_m.astype(np.float64)
        return (ms_ssim_pairs(tr_f, gen_f, it, ig, cfg.msssim, cfg.chunk_pairs, tm, gen_w[0], "union"),
                ms_ssim_pairs(tr_b, gen_b, it, ig, cfg.msssim, cfg.chunk_pairs, 1 - tm, gen_w[1], "both"))
    if embedder is None:
        raise ValueError("FBMemConfig.similarity='sscd' needs an embedder, e.g. bench.measure.embed.get_embedder('sscd')")
    out = []
    for g, t in ((gen_f, tr_f), (gen_b, tr_b)):
        eg, et = embedder.embed(g), embedder.embed(t)
        out.append(np.einsum("pd,pd->p", eg[ig], et[it]).clip(-1, 1).astype(np.float64))
    return out[0], out[1]


def fbmem_scores(gen_images, gen_masks, train_images, train_masks, match_idx=None,
                 cfg: FBMemConfig = FBMemConfig(), embedder=None) -> pd.DataFrame:
    """Foreground and background similarity of each generation to its matches.

    ``match_idx=None``: every training image is scored and the ``cfg.top_k`` best by avg are kept
    (release). ``match_idx [N, k]`` (int): only those candidates are scored. Returns one row per
    (generation, match), ``rank`` 0 = highest avg: columns gen, rank, train_idx, fg_sim, bg_sim,
    avg_sim, degenerate_rule.
    """
    g = _images(gen_images, "fbmem_scores gen_images")
    t = _images(train_images, "fbmem_scores train_images")
    if g.shape[1:] != t.shape[1:]:
        raise ValueError(f"fbmem_scores: generations {g.shape[1:]} and training images {t.shape[1:]} differ in "
                         "[C, H, W]; resize one set first")
    gm = check_masks(gen_masks, len(g), g.shape[-2:], "fbmem_scores gen_masks")
    gen_f, gen_b = fg_bg_images(g, gm)
    gen_f, gen_b, rule = degenerate_swap(gen_f, gen_b, gm, cfg.beta)
    tm = check_masks(train_masks, len(t), t.shape[-2:], "fbmem_scores train_masks")
    tr_f, tr_b = fg_bg_images(t, tm)
    # region weights of the generations (masked mode): foreground = mask; background = not mask, or the
    # whole image when its F image stands in for B ("fg_for_bg"), so the training background decides
    gen_w = (gm.astype(np.float64), np.where((rule == "fg_for_bg")[:, None, None], 1.0, 1.0 - gm))
    if match_idx is None:
        cand = np.broadcast_to(np.arange(len(t)), (len(g), len(t)))
    else:
        cand = np.asarray(match_idx)
        if cand.ndim != 2 or cand.shape[0] != len(g) or not np.issubdtype(cand.dtype, np.integer):
            raise ValueError(f"fbmem_scores: match_idx must be an int array [N_gen={len(g)}, k], got "
                             f"{cand.dtype} {cand.shape}")
        if cand.size and (cand.min() < 0 or cand.max() >= len(t)):
            raise IndexError(f"fbmem_scores: match_idx holds indices outside [0, {len(t)}) (training images)")
    ig = np.repeat(np.arange(len(g)), cand.shape[1])
    it = cand.reshape(-1)
    fg, bg = _pair_sims(gen_f, gen_b, tr_f, tr_b, ig, it, cfg, embedder, gen_w, tm)
    fg, bg = fg.reshape(cand.shape), bg.reshape(cand.shape)
    avg = 0.5 * fg + 0.5 * bg
    keep = cfg.top_k if match_idx is None else cand.shape[1]
    order = np.argsort(-avg, axis=1, kind="stable")[:, :keep]
    take = lambda a: np.take_along_axis(a, order, axis=1).reshape(-1)  # noqa: E731
    k = order.shape[1]
    return pd.DataFrame({"gen": np.repeat(np.arange(len(g)), k), "rank": np.tile(np.arange(k), len(g)),
                         "train_idx": take(np.ascontiguousarray(cand)), "fg_sim": take(fg), "bg_sim": take(bg),
                         "avg_sim": take(avg), "degenerate_rule": np.repeat(rule, k)})


def categorize(fg_sim, bg_sim, thresholds: FBThresholds) -> np.ndarray:
    """VM / FM / BM / NM per pair (release rule, thresholds inclusive)."""
    fg, bg = np.asarray(fg_sim, np.float64), np.asarray(bg_sim, np.float64)
    if fg.shape != bg.shape:
        raise ValueError(f"categorize: fg_sim {fg.shape} and bg_sim {bg.shape} must have one shape")
    if np.isnan(fg).any() or np.isnan(bg).any():
        raise ValueError("categorize: similarities contain NaN")
    f, b = fg >= thresholds.fg, bg >= thresholds.bg
    return np.where(f & b, "VM", np.where(b, "BM", np.where(f, "FM", "NM"))).astype(object)


def classify_generations(scores: pd.DataFrame, thresholds: FBThresholds) -> pd.DataFrame:
    """One row per generation: its best match (highest avg), that pair's category, and the training
    images it links to (every top-k match whose own category is not NM)."""
    missing = {"gen", "train_idx", "fg_sim", "bg_sim", "avg_sim"} - set(scores.columns)
    if missing:
        raise ValueError(f"classify_generations: scores lack columns {sorted(missing)}; pass fbmem_scores' output")
    df = scores.assign(pair_category=categorize(scores["fg_sim"], scores["bg_sim"], thresholds))
    best = df.sort_values(["gen", "avg_sim"], ascending=[True, False], kind="stable").groupby("gen").head(1)
    linked = df[df["pair_category"] != "NM"].groupby("gen")["train_idx"].agg(lambda s: tuple(int(v) for v in s))
    out = best.rename(columns={"pair_category": "category"}).set_index("gen")
    out["linked_train_idx"] = linked.reindex(out.index).apply(lambda v: v if isinstance(v, tuple) else ())
    out["n_linked"] = out["linked_train_idx"].map(len)
    return out.drop(columns=[c for c in ("rank",) if c in out]).reset_index()


def category_shares(categories) -> dict[str, float]:
    """``fbmem_vm`` / ``fbmem_fm`` / ``fbmem_bm`` / ``fbmem_nm`` shares (leaderboard columns)."""
    c = _categories(categories, "category_shares")
    n = max(len(c), 1)
    return {f"fbmem_{k.lower()}": float((c == k).sum() / n) for k in CATEGORIES}


def _categories(c, what: str) -> np.ndarray:
    a = np.asarray(list(c), dtype=object)
    bad = sorted({str(v) for v in a} - set(CATEGORIES))
    if bad:
        raise ValueError(f"{what}: unknown categories {bad}; expected {CATEGORIES}")
    return a


def transition_counts(before, after) -> pd.DataFrame:
    """4 x 4 counts, rows = category before mitigation, columns = after."""
    b, a = _categories(before, "transition_counts before"), _categories(after, "transition_counts after")
    if len(b) != len(a):
        raise ValueError(f"transition_counts: before has {len(b)} generations, after {len(a)}; pair them by prompt and seed")
    out = pd.DataFrame(0, index=pd.Index(CATEGORIES, name="before"), columns=pd.Index(CATEGORIES, name="after"))
    for x, y in zip(b, a):
        out.loc[x, y] += 1
    return out


def mitigation_score(before, after) -> float:
    """Mean transition reward over generations paired by prompt and seed (higher = better mitigation;
    +2 is every VM becoming NM). Release normalisation: raw sum / number of images."""
    b, a = _categories(before, "mitigation_score before"), _categories(after, "mitigation_score after")
    if len(b) != len(a):
        raise ValueError(f"mitigation_score: before has {len(b)} generations, after {len(a)}; pair them by prompt and seed")
    if len(b) == 0:
        raise ValueError("mitigation_score: no generations")
    return float(np.mean([TRANSITION_REWARD[(x, y)] for x, y in zip(b, a)]))


# ----------------------------------------------------------------------------- pool and threshold calibration
PLANTED_KINDS = ("MV", "RV", "TV", "FG", "BG")


def memorized_pool(world) -> np.ndarray:
    """Indices of the organism's planted (duplicated) training images: the analogue of the release's
    pool of 500 memorized LAION images that every generation is compared with."""
    return np.flatnonzero(np.isin(np.asarray(world.image_kind), PLANTED_KINDS))


def planted_units(world) -> np.ndarray:
    """Unit id per training image: the images of one planted unit (a TV template, an FG sprite, a BG
    texture) share one; every other image is its own unit (as ``tasks/studies/groundtruth.py``)."""
    unit = np.arange(world.n_images)
    for e in world.eval_prompts:
        if e.label == 1 and len(e.targets) > 1:
            unit[list(e.targets)] = min(e.targets)
    return unit


def _same_unit_pairs(unit: np.ndarray, kinds: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(kinds == kind)
    a, b = np.meshgrid(idx, idx, indexing="ij")
    keep = (unit[a] == unit[b]) & (a < b)
    return a[keep], b[keep]


def _training_pair_sims(world, ia, ib, cfg: FBMemConfig) -> tuple[np.ndarray, np.ndarray]:
    """fg, bg similarity of training-image pairs with exact masks (same code path as generations)."""
    f, b = fg_bg_images(world.images, world.masks)
    w = (world.masks.astype(np.float64), 1.0 - world.masks)
    return _pair_sims(f, b, f, b, ia, ib, cfg, None, w, world.masks)


def calibrate_thresholds(world, cfg: FBMemConfig = FBMemConfig(), quantile: float = 0.99,
                         n_query: int | None = None, seed: int = 0) -> tuple[FBThresholds, dict]:
    """Null-calibrated tau_fg, tau_bg from a world's training images and exact masks.

    Null queries: the training images outside the memorized pool (ordinary pairs and trained-once
    controls; ``n_query`` of them drawn with ``seed``, all if None). For each, the highest fg (bg)
    similarity to any pool image; tau = the ``quantile`` of those maxima, so an image that copies
    nothing from the pool is called FM (BM) at most 1 - quantile of the time. Diagnostics: the shares
    of same-unit BG-family pairs (same background, other foreground) and of same-unit FG-family pairs
    (same sprite, other background and position) that clear each threshold.
    """
    if cfg.similarity != "ms_ssim":
        raise ValueError("calibrate_thresholds: only similarity='ms_ssim' is calibrated here")
    unit, kinds = planted_units(world), np.asarray(world.image_kind)
    pool = memorized_pool(world)
    query = np.setdiff1d(np.arange(world.n_images), pool)
    if len(pool) == 0 or len(query) == 0:
        raise ValueError(f"calibrate_thresholds: need planted ({PLANTED_KINDS}) and other training images, got "
                         f"{len(pool)} and {len(query)}")
    if n_query is not None and n_query < len(query):
        query = np.sort(np.random.default_rng(seed).choice(query, size=n_query, replace=False))
    iq, ip = np.repeat(query, len(pool)), np.tile(pool, len(query))
    sims = _training_pair_sims(world, iq, ip, cfg)
    fg, bg = (v.reshape(len(query), len(pool)).max(1) for v in sims)
    thr = FBThresholds(float(np.quantile(fg, quantile)), float(np.quantile(bg, quantile)),
                       f"calibrate_thresholds: {quantile:.0%} quantile of the max similarity of non-pool training "
                       f"images to the planted pool, MemWorld seed {world.config.seed}, {len(query)} queries x "
                       f"{len(pool)} pool images, region={cfg.region!r}, {cfg.msssim}", world.sha256)
    diag: dict = {"n_query": int(len(query)), "n_pool": int(len(pool)), "quantile": quantile,
                  "null_fg_max_median": float(np.median(fg)), "null_bg_max_median": float(np.median(bg))}
    for kind, name in (("BG", "same_background"), ("FG", "same_foreground")):
        a, c = _same_unit_pairs(unit, kinds, kind)
        if len(a):
            pf, pb = _training_pair_sims(world, a, c, cfg)
            diag[name] = {"n_pairs": int(len(a)), "fg_median": float(np.median(pf)), "bg_median": float(np.median(pb)),
                          "share_fg_ge_tau": float((pf >= thr.fg).mean()), "share_bg_ge_tau": float((pb >= thr.bg).mean())}
    return thr, diag


def _calibration_key(cfg: FBMemConfig, quantile: float) -> dict:
    """What a stored calibration depends on besides the world (top_k and chunking do not matter)."""
    p = cfg.params()
    return {"msssim": p["msssim"], "similarity": p["similarity"], "region": p["region"], "beta": p["beta"],
            "degenerate_rule": p["degenerate_rule"], "quantile": quantile}


def thresholds_for(world, cfg: FBMemConfig = FBMemConfig(), *, store_dir: str | Path = THRESHOLD_DIR,
                   quantile: float = THRESHOLD_QUANTILE, progress: bool = True) -> FBThresholds:
    """The world's FB-Mem thresholds: read from ``store_dir/fbmem_thresholds_<world sha256[:16]>.json``,
    or calibrated on all of the world's non-pool training images and written there (atomically).

    A stored file is used only when its world sha256 and calibration settings match; one that does not
    match is refused (``FBMemThresholdError``), never silently replaced."""
    key = _calibration_key(cfg, quantile)
    f = Path(store_dir) / f"fbmem_thresholds_{world.sha256[:16]}.json"
    if f.is_file():
        d = json.loads(f.read_text())
        if d.get("world_sha256") != world.sha256 or d.get("calibration") != key:
            raise FBMemThresholdError(f"{f} holds FB-Mem thresholds for another world or configuration "
                                      f"(world {str(d.get('world_sha256'))[:12]}, {d.get('calibration')}); "
                                      f"move it away to recalibrate for world {world.sha256[:12]} with {key}")
        t = d["thresholds"]
        return FBThresholds(float(t["fg"]), float(t["bg"]), t["source"], d["world_sha256"])
    if progress:
        print(f"[diffmem] FB-Mem thresholds for world {world.sha256[:12]}: calibrating on its training images "
              f"(once per world; written to {f})", flush=True)
    thr, diag = calibrate_thresholds(world, cfg, quantile)
    from bench.core.atomic import atomic_write_json
    atomic_write_json(f, {"world_sha256": world.sha256, "calibration": key, "thresholds": asdict(thr),
                          "diagnostics": diag}, sort_keys=False)
    return thr
