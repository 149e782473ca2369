"""The organism's copy criterion and its measured labels: what "this generation copies its training
image" means on MemWorld, and which evaluation prompts reproduce theirs on given weights.

Each generation is compared with the training images by colour-normalised RMSE (cn-RMSE: per image and
channel standardised, then RMSE; 0 = identical up to per-channel gain/offset, 1.41 = uncorrelated), over
the region the family plants: the whole image (MV, RV, TV, controls), the foreground mask (FG) or the
background (BG) of each target.

Thresholds are calibrated on the training set, never on generations (see ``calibrate``): the
1st percentile of nearest-neighbour distances between training images of different units, over
the whole image (MV, RV, TV and "within the copy threshold of any training image") or over the
family's region (FG, BG).
A generation copies when its region cn-RMSE to its nearest target is below its family threshold.
``GroundTruthCriterion`` hands this rule to the engine's copy judge (``bench.contracts.CopyCriterion``);
the measuring run that writes ``groundtruth.json`` is ``tasks/studies/groundtruth.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.errors import GroundTruthError
from bench.measure.embed import cn_rmse

FLOOR = 0.025
QUANTILE = 0.01


def _masked_cn(gen: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """cn-RMSE over ``mask`` pixels only: gen [G,3,H,W] vs one ref [3,H,W] -> [G]."""
    g, r = gen[:, :, mask], ref[None, :, mask]                    # [G,3,M], [1,3,M]
    def z(x):
        return (x - x.mean(-1, keepdims=True)) / np.maximum(x.std(-1, keepdims=True), FLOOR)
    return np.sqrt(((z(g) - z(r)) ** 2).mean(axis=(1, 2)))


def _units(world) -> np.ndarray:
    """Unit id per training image: images of one planted unit (a TV template, an FG sprite, a BG
    texture) share it; every other image is its own unit."""
    unit = np.arange(world.n_images)
    for e in world.eval_prompts:
        if e.label == 1 and len(e.targets) > 1:
            unit[list(e.targets)] = min(e.targets)
    return unit


def region_distance(gen: np.ndarray, world, targets: list[int], region: str) -> np.ndarray:
    """[G, T] cn-RMSE between generations and each target over the family's region."""
    out = np.empty((len(gen), len(targets)))
    for j, t in enumerate(targets):
        if region == "fg":
            m = world.masks[t]
        elif region == "bg":
            m = ~world.masks[t]
        else:
            m = np.ones(world.masks[t].shape, bool)
        out[:, j] = _masked_cn(gen, world.images[t], m)
    return out


def calibrate(world) -> dict:
    """Copy thresholds from nearest-neighbour distances among training images of different units.

    global_full (also MV, RV, TV): 1st percentile over training images of the whole-image cn-RMSE to
    the nearest image of another unit. FG / BG: 1st percentile over the family's targets of the
    region cn-RMSE to the nearest image of another unit. A generation below it is closer to a
    target than 99% of training images are to their nearest unrelated neighbour.
    """
    unit = _units(world)
    full = cn_rmse(world.images, world.images, floor=FLOOR)
    full[unit[:, None] == unit[None, :]] = np.inf
    g = float(np.quantile(full.min(1), QUANTILE))
    thresholds = {"global_full": g, "MV": g, "RV": g, "TV": g}
    for fam, region in (("FG", "fg"), ("BG", "bg")):
        tg = sorted({t for e in world.eval_prompts if e.group == fam for t in e.targets})
        if not tg:
            continue
        nn = [region_distance(world.images[unit != unit[t]], world, [t], region)[:, 0].min() for t in tg]
        thresholds[fam] = float(np.quantile(nn, QUANTILE))
    return thresholds


MANIFEST = "groundtruth.json"     # in the model folder, beside the weights it was measured on


def measured_labels(model, world, weights: str | None = None) -> dict[str, bool]:
    """Per evaluation-prompt id: does it reproduce its training image on *these* weights?

    Read from ``<model folder>/groundtruth.json``; refused (``GroundTruthError``) when the file is
    missing, predates per-prompt labels, or was measured on another world or other weights.
    ``weights``: the model's ``weights_sha256`` when the caller has computed it already.
    """
    from bench.core.model import weights_sha256

    hint = ("run `make groundtruth` (ORGANISM_VERSION=<version>) to measure it, or pass "
            "task.labels=planted to score against planted-family labels (test-size organisms)")
    f = Path(model.path or ".") / MANIFEST
    if not model.path or not f.is_file():
        raise GroundTruthError(f"model {model.name!r} has no measured ground truth ({f} is missing): {hint}")
    d = json.loads(f.read_text())
    if "labels" not in d or "weights_sha256" not in d:
        raise GroundTruthError(f"{f} predates per-prompt labels and weight hashes: {hint}")
    if d.get("memworld_sha256") != world.sha256:
        raise GroundTruthError(f"{f} was measured on another world (memworld sha256 "
                               f"{str(d.get('memworld_sha256'))[:12]} != {world.sha256[:12]}): {hint}")
    w = weights or weights_sha256(model)
    if d["weights_sha256"] != w:
        raise GroundTruthError(f"{f} was measured on other weights (sha256 {d['weights_sha256'][:12]} != "
                               f"{w[:12]} of the loaded model): {hint}")
    return {k: bool(v["reproduces"]) for k, v in d["labels"].items()}


def groundtruth_stem(version: str) -> str:
    """File stem of a version's ground truth under results/ (``<stem>.csv``, ``<stem>_summary.{csv,md}``)."""
    return f"organism_groundtruth_{version}"


class GroundTruthCriterion:
    """The organism's copy rule as a ``bench.contracts.CopyCriterion``."""

    description = "organism ground-truth criterion: region cn-RMSE to nearest target < family threshold (tasks.copies.calibrate)"

    def calibrate(self, world) -> dict:
        return calibrate(world)

    def distance(self, images: np.ndarray, world, targets: list[int], region: str) -> np.ndarray:
        return region_distance(images, world, targets, region)
