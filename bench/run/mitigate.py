"""``run_mitigate(cfg)``: one mitigator over its strengths on one task and model (``make bench-mitigate``).

For each strength: generate images for the memorized evaluation prompts (``memorized_per_family``
per planted family, ``n_seeds`` seeds each) and for non-memorized prompts (``utility_prompts``,
utility: does the method keep prompt alignment where there is nothing to remove), then record per
image the measures of ``bench.measure.copyscore.CopyJudge``. Rows are appended prompt batch by prompt batch,
so an interrupted run resumes: it writes exactly the missing (prompt, seed) rows (a kill mid-batch can
leave a prompt with only some of its seeds), generated in their batch of an uninterrupted run
(``resume_batches``), and metrics are computed only from rows holding every (prompt, seed) exactly
once (``check_rows``). Cost is measured here: wall seconds and UNet rows of
``generate`` per image (``fit`` is timed separately, once), never reported by methods. Each strength is its own
run folder ``<task>__<model>__<mitigator>@<strength>__<hash>``; ``protocol_hash`` (config without the
mitigator) ties rows that may be compared, and the leaderboard derives clip_delta and the FB-Mem
mitigation score against the ``none`` run of the same protocol.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.contracts import GenSpec
from bench.run.io import RunFolder, config_hash, releases_locks
from bench.run.merge import merge_runs_dir, shard_entry
from bench.run.registry import config_id, instantiate
from bench.run.runner import build_model, build_task_object, identity, model_key
from bench.run.shard import Shard
from bench.run.validate import check_config

MEMORIZED_FAMILIES = ("MV", "RV", "TV", "FG", "BG")
UTILITY_GROUPS = ("ordinary_seen", "ordinary_unseen")


def select_prompts(world, per_family: int, n_utility: int) -> list:
    """The first ``per_family`` prompts of each memorized family, then ``n_utility`` non-memorized
    prompts alternating seen / unseen ordinary captions (deterministic, recorded by id)."""
    ev = world.eval_prompts
    mem = [e for f in MEMORIZED_FAMILIES for e in [x for x in ev if x.group == f][:per_family]]
    pools = [[x for x in ev if x.group == g] for g in UTILITY_GROUPS]
    util = [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)][:n_utility]
    return mem + util


def _strengths(mcfg: dict) -> list[float]:
    s = mcfg.get("strengths")
    return [float(x) for x in (s if s is not None else [mcfg.get("strength", 0.0)])]


@releases_locks
def run_mitigate(cfg: dict, *, model=None, judge=None, progress: bool = True) -> list[dict]:
    check_config("mitigate", cfg)                   # before any model load
    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    t0 = time.perf_counter()
    shard = Shard.parse(cfg.get("shard"))
    model = model or build_model(cfg["model"], shard=shard)
    load_seconds = time.perf_counter() - t0
    world = build_task_object(cfg["task"]).world(model, cfg["model"])   # its training images (or NotImplementedError)
    prompts = select_prompts(world, int(cfg["memorized_per_family"]), int(cfg["utility_prompts"]))
    mine = [prompts[i] for i in shard.select(len(prompts))]
    seeds = [int(cfg.get("seed", 0)) + j for j in range(int(cfg["n_seeds"]))]
    spec = GenSpec(int(cfg["steps"]), float(cfg["guidance"]), int(cfg.get("batch_images", 64)))
    if judge is None:                                # conf/judge/<name>.yaml (bench.contracts.CopyJudge)
        judge = instantiate(cfg["judge"], plain_errors=True, world=world, model=model,
                            threads=int(cfg.get("threads") or 2))
    mcfg = {k: v for k, v in cfg["mitigator"].items() if k not in ("strengths", "strength")}
    # keyed by what determines the numbers (model_key: weights sha256, no folder path), computed once
    protocol = {"task": identity(cfg["task"]), **{k: cfg[k] for k in ("seed", "n_seeds", "steps", "guidance",
                                                                       "memorized_per_family", "utility_prompts")},
                **model_key(cfg["model"], model)}
    protocol_hash = config_hash(protocol)
    results = []
    for strength in _strengths(cfg["mitigator"]):
        results.append(_one_strength(cfg, model, world, judge, prompts, mine, shard, seeds, spec, mcfg, protocol,
                                     protocol_hash, strength, load_seconds, progress))
    return results


def _one_strength(cfg, model, world, judge, prompts, mine, shard, seeds, spec, mcfg, protocol, protocol_hash,
                  strength, load_seconds, progress) -> dict:
    seed = int(cfg.get("seed", 0))
    mit = instantiate({**mcfg, "strength": strength})
    mit_id = config_id("mitigator", cfg["mitigator"]) or mit.name
    method = f"{mit_id}@{strength:g}"
    run_cfg = {"kind": "mitigate", **protocol, "mitigator": {**mcfg, "strength": strength},
               "world_sha256": world.sha256}
    run = RunFolder(cfg.get("runs_dir", "results/runs"), "mitigate", cfg["task"]["name"], model.name, method,
                    run_cfg, shard=shard).lock()
    if cfg.get("rerun") and run.complete:
        run.reset()
    t_fit = time.perf_counter()
    rows0 = model.counter.rows
    mit.fit(model, memorized=[e.prompt for e in prompts if e.label == 1],
            reference=[e.prompt for e in world.eval_prompts if e.group == "ordinary_seen"], seed=seed)
    fit_seconds, fit_rows = time.perf_counter() - t_fit, model.counter.rows - rows0
    prompt_ids = [e.id for e in prompts]
    result_fields = {"kind": "mitigate", "task": cfg["task"]["name"], "model": model.name, "mitigator": mit_id,
                     "strength": strength, "strength_unit": mit.strength_unit,
                     "params": json.dumps(mit.params(), sort_keys=True, default=str), "n_seeds": len(seeds),
                     "protocol_hash": protocol_hash}
    run.write_manifest(seeds={"seed": seed, "generation_seeds": seeds}, params=mit.params(), protocol=protocol,
                       judge=judge.protocol(), model=model.fingerprint(), model_load_seconds=load_seconds,
                       prompt_set={"name": f"{cfg['task']['name']}_mitigate", "n": len(prompts),
                                   "sha256": config_hash({"ids": prompt_ids, "world": world.sha256})},
                       result_fields=result_fields, base_run=run.base_name,
                       fit={"seconds": fit_seconds, "unet_evals": fit_rows},   # measured per process (shard)
                       shard=shard_entry(shard, prompt_ids), finished=None)
    done = run.done_ids(repair=bool(cfg.get("repair")))
    todo = resume_batches(mine, seeds, done, int(cfg.get("batch_prompts", 16)))
    bar = tqdm(total=len(mine), initial=len(mine) - sum(map(len, todo)), desc=f"mitigate {method}",
               disable=not progress)
    for batch in todo:
        rows = generate_and_measure(mit, model, judge, batch, seeds, spec, seed=seed, what=method)
        run.append_rows([r for r in rows if r["id"] not in done])
        bar.update(len(batch))
    bar.close()
    if not shard.whole:
        check_rows(run.read_rows(), [e.id for e in mine], seeds, where=str(run.path))
        run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        run.release()
        merge_runs_dir(run.path.parent, kind="mitigate", strict=False)
        return {"kind": "mitigate_shard", "run": run.name, "base_run": run.base_name, "shard": str(shard)}
    metrics = mitigate_result(run.read_rows(), prompt_ids, run_cfg, run.manifest(), where=str(run.path))
    run.write_metrics(metrics)
    run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    run.release()
    return metrics


def row_id(prompt_id, seed) -> str:
    """The ``id`` of a per-image row: ``<prompt_id>:<seed>``."""
    return f"{prompt_id}:{int(seed)}"


def missing_seeds(prompt_id: str, seeds: list[int], done: set[str]) -> list[int]:
    """The seeds of ``prompt_id`` that have no row among the ``done`` row ids (``RunFolder.done_ids``)."""
    return [s for s in seeds if row_id(prompt_id, s) not in done]


def resume_batches(prompts: list, seeds: list[int], done: set[str], batch_prompts: int) -> list[list]:
    """The prompt batches left to generate: each batch ``prompts[b0:b0 + batch_prompts]`` of an
    uninterrupted run that misses any (prompt, seed) row. The runner generates such a batch whole,
    every prompt with every seed, and appends only its rows missing from ``done``.

    Whole batches, not just the missing pairs, because an image is not a function of its (prompt,
    seed) alone: embed_opt optimises one embedding per prompt over the joint norm of all its seeds'
    x_T (its cost is shared by them too), and the sampling loop is batch-invariant only up to float
    rounding (about 5e-6 in pixels on the test organism), which the int8 SSCD amplifies to about 1e-3
    in cosine. The same batches as an uninterrupted run give the same rows. A kill leaves at most one
    batch partly written, so this regenerates at most that batch's rows already on disk."""
    bs = max(1, int(batch_prompts))
    grid = [prompts[b0:b0 + bs] for b0 in range(0, len(prompts), bs)]
    return [b for b in grid if any(missing_seeds(e.id, seeds, done) for e in b)]


def generate_and_measure(mit, model, judge, batch: list, seeds: list[int], spec: GenSpec, *, seed: int,
                         what: str) -> list[dict]:
    """Per-image rows of one prompt batch: generate under ``mit`` (timed, UNet rows counted), then the
    judge's measures (not timed). NaN (no target: utility prompts) becomes an empty CSV cell."""
    r0, t1 = model.counter.rows, time.perf_counter()
    res = mit.generate(model, [e.prompt for e in batch], seeds, spec, seed=seed)
    gen_s, rows = time.perf_counter() - t1, model.counter.rows - r0
    images = res.images.float().cpu().numpy()
    if not np.isfinite(images).all():
        raise FloatingPointError(f"{what}: non-finite pixels for prompts {[e.id for e in batch]}; "
                                 "nothing of this batch was written")
    measures = judge.measure(images, batch, seeds)
    n_img = len(batch) * len(seeds)
    out = [{"id": row_id(e.id, s), "prompt_id": e.id, "prompt": e.prompt, "seed": s, "label": e.label,
            "group": e.group, "family": e.family, **measures[k * len(seeds) + j],
            "seconds": gen_s / n_img, "unet_evals": rows / n_img}
           for k, e in enumerate(batch) for j, s in enumerate(seeds)]
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in out]


def run_seeds(run_cfg: dict, manifest: dict | None = None) -> list[int]:
    """The generation seeds of a mitigate run: ``seed + j`` for ``j < n_seeds`` (as ``run_mitigate``)."""
    if "n_seeds" in run_cfg:
        return [int(run_cfg.get("seed", 0)) + j for j in range(int(run_cfg["n_seeds"]))]
    return [int(s) for s in (manifest or {})["seeds"]["generation_seeds"]]


def check_rows(rows: pd.DataFrame, ids: list[str], seeds: list[int], *, where: str) -> None:
    """Refuse per-image rows that do not hold every (prompt, seed) of ``ids`` x ``seeds`` exactly once
    (RuntimeError naming ``where``, the counts, a few examples and the fix); a stranger is a row of
    another prompt or seed, or whose ``id`` is not ``<prompt_id>:<seed>``."""
    want = {row_id(p, s) for p in ids for s in seeds}
    if len(rows):
        seed_col = pd.to_numeric(rows["seed"], errors="coerce")
        own = [f"{p}:{int(s)}" if s == s and float(s).is_integer() else f"{p}:{s}"
               for p, s in zip(rows["prompt_id"].astype(str), seed_col)]
        got = [str(i) if i == o else f"{i} (prompt_id:seed {o})" for i, o in zip(rows["id"].astype(str), own)]
    else:
        got = []
    counts = pd.Series(got, dtype=object).value_counts(sort=False)
    missing = [i for p in ids for s in seeds if (i := row_id(p, s)) not in counts.index]
    dup = [i for i, n in counts.items() if n > 1 and i in want]
    stranger = [i for i in counts.index if i not in want]
    if not (missing or dup or stranger):
        return

    def ex(xs: list[str]) -> str:
        return f" (e.g. {', '.join(xs[:3])}{', ...' if len(xs) > 3 else ''})" if xs else ""

    fix = ("run the same configuration again without rerun=true (for a sharded run: each shard, with its "
           f"shard=i/n): it resumes and writes only the missing rows; or delete {where} and run again"
           if not (dup or stranger) else
           f"resume cannot repair duplicated or stranger rows: delete {where} (and its shard folders, if it was "
           "merged from shards) and run again (rerun=true only resets a run that has finished)")
    raise RuntimeError(f"{where}: per_prompt.csv must hold every (prompt, seed) of the run exactly once "
                       f"({len(ids)} prompts x {len(seeds)} seeds = {len(want)} images, {len(got)} rows): "
                       f"{len(missing)} missing{ex(missing)}, {len(dup)} duplicated{ex(dup)}, "
                       f"{len(stranger)} stranger{ex(stranger)}; {fix}")


def mitigate_result(rows: pd.DataFrame, ids: list[str], run_cfg: dict, manifest: dict, *,
                    where: str | None = None) -> dict:
    """metrics.json of a mitigate run from its per-image rows (plain runs and shard merges alike),
    after ``check_rows``; ``where`` names the run folder in its error (default: the manifest's run)."""
    check_rows(rows, ids, run_seeds(run_cfg, manifest), where=where or f"run folder {manifest.get('run')}")
    m = aggregate(rows)
    m.update(manifest["result_fields"])
    m.update(git_sha=manifest["git_sha"], run=manifest["run"], fit_seconds=manifest.get("fit", {}).get("seconds"),
             fit_unet_evals=manifest.get("fit", {}).get("unet_evals"))
    return m


def aggregate(df: pd.DataFrame) -> dict:
    """Run-level numbers (DESIGN.md section 5 columns) from per-image rows."""
    mem, util = df[df["label"] == 1], df[df["label"] == 0]
    m = {"n_images_memorized": int(len(mem)), "n_images_utility": int(len(util)),
         "sscd_to_train_mean": float(mem["sscd_to_train"].mean()),
         "sscd_to_train_p95": float(mem["sscd_to_train"].quantile(0.95)),
         "sscd_nn_mean": float(mem["sscd_nn"].mean()), "sscd_nn_p95": float(mem["sscd_nn"].quantile(0.95)),
         "copy_rate": float(mem["copy"].mean()),
         "clip_score": float(mem["clip_score"].mean()),
         "general_prompt_clip": float(util["clip_score"].mean()) if len(util) else float("nan"),
         "seconds_per_image": float(df["seconds"].mean()), "unet_evals_per_image": float(df["unet_evals"].mean())}
    if "fbmem_category" in df:
        for c in ("VM", "FM", "BM", "NM"):
            m[f"fbmem_{c.lower()}"] = float((mem["fbmem_category"] == c).mean())
    for fam, g in mem.groupby("group"):
        m[f"copy_rate_{fam}"] = float(g["copy"].mean())
        m[f"sscd_to_train_mean_{fam}"] = float(g["sscd_to_train"].mean())
    return m
