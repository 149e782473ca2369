"""Plain-function runners (no Hydra inside): build model and task from config dicts, run, record.

``run_detect(cfg)`` scores every prompt of a task with one detector, batch by batch, appending to
the run folder's per_prompt.csv (a restarted run skips prompts already scored), then computes the
metrics: headline AUC / TPR@FPR against all negatives, and AUC per negative group and per family.
Cost (wall seconds, UNet rows) is measured here, never reported by methods.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.io import RunFolder, rebuild_leaderboard
from bench.metrics import detection_metrics, roc_auc
from bench.model import DiffusionModel, load_model
from tasks.promptsets import PromptSet


# ---------------------------------------------------------------------- model / task
def build_model(mcfg: dict) -> DiffusionModel:
    kind = mcfg.get("kind", "folder")
    device, dtype = mcfg.get("device", "cpu"), mcfg.get("dtype", "float32")
    if kind == "organism":
        from tasks.organism import OrganismConfig, load_organism, small_config
        ocfg = small_config() if mcfg.get("size", "default") == "small" else OrganismConfig()
        return load_organism(ocfg, device=device, dtype=dtype)
    if kind == "oracle":
        from tasks.oracle import oracle_model
        return oracle_model(world_for(mcfg), dtype=dtype)
    if kind == "folder":
        if mcfg.get("path") in (None, "", "???"):
            raise ValueError(f"model={mcfg.get('name')} needs model.path=/path/to/a/diffusers/folder")
        return load_model(mcfg["path"], device=device, dtype=dtype, name=mcfg.get("name"))
    raise ValueError(f"unknown model kind {kind!r}; use organism, oracle or folder")


def world_for(mcfg: dict | None, model: DiffusionModel | None = None):
    """The MemWorld a model was trained on: read from its folder when it has one."""
    from tasks.memworld import build_memworld, config_from_dict
    from tasks.organism import OrganismConfig, small_config

    if model is not None and model.path and (Path(model.path) / "diffmem.json").is_file():
        meta = json.loads((Path(model.path) / "diffmem.json").read_text())
        return build_memworld(config_from_dict(meta["config"]["world"]))
    small = (mcfg or {}).get("size", "default") == "small"
    return build_memworld((small_config() if small else OrganismConfig()).world)


def organism_promptset(world) -> PromptSet:
    ev = world.eval_prompts
    return PromptSet(
        name=f"organism_s{world.config.seed}", prompts=[e.prompt for e in ev],
        labels=np.array([e.label for e in ev], np.int8), groups=[e.group for e in ev],
        types=[e.family for e in ev], ids=[e.id for e in ev],
        extra={"family": [e.family for e in ev], "region": [e.region for e in ev],
               "targets": [" ".join(map(str, e.targets)) for e in ev]})


def build_task(tcfg: dict, mcfg: dict, model: DiffusionModel | None) -> PromptSet:
    if tcfg["source"] == "organism":
        ps = organism_promptset(world_for(mcfg, model))
    else:
        from tasks.promptsets import load_task
        ps = load_task(tcfg["name"], seed=int(tcfg.get("seed", 0)))
    k = tcfg.get("max_per_group")
    if k:
        keep, seen = [], {}
        for i, g in enumerate(ps.groups):
            seen[g] = seen.get(g, 0) + 1
            if seen[g] <= k:
                keep.append(i)
        ps = subset(ps, keep, f"{ps.name}_max{k}")
    return ps


def subset(ps: PromptSet, idx: list[int], name: str) -> PromptSet:
    return PromptSet(name, [ps.prompts[i] for i in idx], ps.labels[idx], [ps.groups[i] for i in idx],
                     [ps.types[i] for i in idx], [ps.ids[i] for i in idx], ps.sources,
                     {k: [v[i] for i in idx] for k, v in ps.extra.items()})


def instantiate(dcfg: dict):
    from hydra.utils import instantiate as hy
    return hy({k: v for k, v in dcfg.items() if k != "id"})


# ---------------------------------------------------------------------- detection
def run_detect(cfg: dict, *, model: DiffusionModel | None = None, progress: bool = True) -> dict:
    """Score ``cfg['task']`` with ``cfg['detector']`` on ``cfg['model']``; returns metrics."""
    t_load = time.perf_counter()
    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    model = model or build_model(cfg["model"])
    load_seconds = time.perf_counter() - t_load
    ps = build_task(cfg["task"], cfg["model"], model)
    det = instantiate(cfg["detector"])
    det_id = cfg["detector"].get("id") or det.name
    seed = int(cfg.get("seed", 0))
    run_cfg = {"kind": "detect", "task": cfg["task"], "model": cfg["model"], "detector": cfg["detector"],
               "seed": seed, "prompt_set_sha256": ps.sha256, "model_fingerprint": model.fingerprint()}
    run = RunFolder(cfg.get("runs_dir", "results/runs"), "detect", cfg["task"]["name"], model.name, det_id, run_cfg)
    if cfg.get("rerun") and run.complete:      # re-measure finished runs; partial ones resume
        run.reset()
    run.write_manifest(seeds={"seed": seed}, prompt_set={"name": ps.name, "sha256": ps.sha256, "n": len(ps),
                       "sources": list(ps.sources)}, model=model.fingerprint(), params=det.params(),
                       model_load_seconds=load_seconds)
    done = run.done_ids()
    todo = [i for i, pid in enumerate(ps.ids) if pid not in done]
    bs = int(cfg.get("batch_prompts", 64))
    bar = tqdm(total=len(ps), initial=len(ps) - len(todo), desc=f"detect {det_id}", disable=not progress)
    for b0 in range(0, len(todo), bs):
        idx = todo[b0:b0 + bs]
        rows0, t0 = model.counter.rows, time.perf_counter()
        scores = np.asarray(det.score(model, [ps.prompts[i] for i in idx], seed=seed), dtype=np.float64)
        dt, rows = time.perf_counter() - t0, model.counter.rows - rows0
        if scores.shape != (len(idx),) or not np.isfinite(scores).all():
            raise FloatingPointError(f"detector {det_id} returned {scores.shape} scores with "
                                     f"{int((~np.isfinite(scores)).sum())} non-finite for prompts "
                                     f"{[ps.ids[i] for i in idx][:5]}...; nothing of this batch was written")
        run.append_rows([{"id": ps.ids[i], "prompt": ps.prompts[i], "label": int(ps.labels[i]),
                          "group": ps.groups[i], "family": ps.extra.get("family", ps.types)[i] or "",
                          "type": ps.types[i], "score": repr(float(s)), "seconds": dt / len(idx),
                          "unet_evals": rows / len(idx)} for i, s in zip(idx, scores)])
        bar.update(len(idx))
    bar.close()
    metrics = detect_metrics(run.read_rows(), ps, seed=seed)
    metrics.update({"kind": "detect", "task": cfg["task"]["name"], "model": model.name, "detector": det_id,
                    "params": json.dumps(det.params(), sort_keys=True, default=str),
                    "n_gen": getattr(det, "n_gen", None), "steps": getattr(det, "steps", None),
                    "git_sha": json.loads((run.path / "manifest.json").read_text())["git_sha"],
                    "run": run.name, "prompt_set_sha256": ps.sha256})
    run.write_metrics(metrics)
    run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if cfg.get("leaderboard"):
        rebuild_leaderboard(run.path.parent, cfg["leaderboard"], "detect")
    return metrics


def detect_metrics(df: pd.DataFrame, ps: PromptSet, *, seed: int = 0) -> dict:
    """Headline metrics against all negatives, plus AUC against each negative group and per family."""
    order = {pid: i for i, pid in enumerate(ps.ids)}
    df = df.assign(_o=df["id"].map(order)).sort_values("_o")
    if df["id"].duplicated().any() or len(df) != len(ps) or df["_o"].isna().any():
        raise RuntimeError(f"per-prompt rows do not match the prompt set: {len(df)} rows for {len(ps)} "
                           "prompts (duplicates or strangers); remove the run folder and rerun")
    s, y = df["score"].to_numpy(float), df["label"].to_numpy(int)
    m = detection_metrics(s, y, seed=seed)
    m["seconds_per_prompt"] = float(df["seconds"].mean())
    m["unet_evals_per_prompt"] = float(df["unet_evals"].mean())
    pos = y == 1
    groups = df["group"].to_numpy()
    m["per_group_auc"] = {g: roc_auc(np.r_[s[pos], s[groups == g]], np.r_[y[pos], y[groups == g]])
                          for g in dict.fromkeys(groups[~pos])}
    fam = df["family"].fillna("").to_numpy()
    m["per_family_auc"] = {f: roc_auc(np.r_[s[pos & (fam == f)], s[~pos]], np.r_[y[pos & (fam == f)], y[~pos]])
                           for f in dict.fromkeys(fam[pos]) if f}
    return m
