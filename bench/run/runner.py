"""Plain-function runners (no Hydra inside): build model and task from config dicts, run, record.

``run_detect(cfg)`` scores every prompt of a task with one detector, batch by batch, appending to
the run folder's per_prompt.csv (a restarted run skips prompts already scored), then computes the
metrics: headline AUC / TPR@FPR against all negatives, and AUC per negative group and per family.
Cost (wall seconds, UNet rows) is measured here, never reported by methods.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bench.contracts import PromptSet, Task
from bench.core.model import DiffusionModel, weights_sha256
from bench.errors import ConfigError
from bench.measure.metrics import detection_metrics, roc_auc
from bench.run.io import RunFolder, releases_locks
from bench.run.leaderboard import rebuild_leaderboard
from bench.run.merge import merge_runs_dir, shard_entry
from bench.run.registry import config_id, instantiate
from bench.run.shard import Shard
from bench.run.validate import check_config


# ---------------------------------------------------------------------- model / task
class NoGPUError(ConfigError, RuntimeError):
    """hardware=multi_gpu on a machine without a CUDA GPU (a config error, exit code 2)."""


PER_SHARD = "cuda:per_shard"   # hardware=multi_gpu: shard i runs on visible GPU i mod n_gpus


def shard_device(device: str, shard: Shard | None, n_visible: int | None = None) -> str:
    """Resolve ``device: cuda:per_shard`` (conf/hardware/multi_gpu.yaml) to ``cuda:<i mod n>`` for shard
    i of the set, n = visible GPUs; any other device string is returned unchanged."""
    if device != PER_SHARD:
        return device
    if shard is None or shard.whole:
        raise ConfigError(f"device={PER_SHARD} (hardware=multi_gpu) needs a shard: run a multirun over "
                          "shard=0/N,...,N-1/N with N = number of GPUs (see README 'Running at scale')")
    n = torch.cuda.device_count() if n_visible is None else n_visible
    if n < 1:
        raise NoGPUError(f"device={PER_SHARD} (hardware=multi_gpu) but torch sees no CUDA GPU; "
                         "use hardware=cpu or hardware=gpu")
    return f"cuda:{shard.index % n}"


def build_model(mcfg: dict, shard: Shard | None = None) -> DiffusionModel:
    """The model ``mcfg['_target_']`` loads (``conf/model/*.yaml``: a loader called with the YAML's keys,
    ``device`` and ``dtype``; ``bench.contracts``). Its own errors (a missing folder, an unbuilt organism)
    reach the caller unchanged."""
    if not mcfg.get("_target_"):
        raise ConfigError(f"model={mcfg.get('name')} has no _target_ (its loader, e.g. "
                          "bench.core.model.load_folder); see conf/model/*.yaml")
    missing = [k for k, v in mcfg.items() if v in ("???", None, "") and k == "path"] + \
        [k for k, v in mcfg.items() if v == "???" and k != "path"]          # OmegaConf's mandatory marker
    if missing:
        raise ConfigError(f"model={mcfg.get('name')} needs " + ", ".join(f"model.{k}=..." for k in missing) +
                          (" (model.path=/path/to/a/diffusers/folder)" if "path" in missing else ""))
    device, dtype = shard_device(mcfg.get("device", "cpu"), shard), mcfg.get("dtype", "float32")
    return instantiate({**mcfg, "device": device, "dtype": dtype}, plain_errors=True)


def build_task_object(tcfg: dict) -> Task:
    """The task ``tcfg['_target_']`` names (``conf/task/*.yaml``; ``bench.contracts.Task``)."""
    if not tcfg.get("_target_"):
        raise ConfigError(f"task={tcfg.get('name')} has no _target_ (its prompt-set builder); see conf/task/*.yaml")
    return instantiate(tcfg, plain_errors=True)


PLANTED_NOT_LEARNED = "planted_not_learned"   # planted family, but its generations do not reproduce


def identity(cfg: dict) -> dict:
    """A model or task config as run folders are keyed by it: without ``_target_``. The loader's import path
    does not determine the numbers (the weights' sha256 and the prompt set's sha256 do), and leaving it out
    keeps the keys of runs made before configs named their loaders."""
    return {k: v for k, v in cfg.items() if k != "_target_"}


def labels_protocol(ps: PromptSet) -> dict:
    """How a prompt set's labels were made (recorded in every detect run's result fields)."""
    src = (ps.extra.get("label_source") or ["published"])[0]
    rule = {"measured": "1 = generations reproduce the training image in >= half of the ground-truth seeds "
                        "(groundtruth.json of these weights); planted_not_learned left out of both classes",
            "planted": "1 = planted family (not measured)",
            "published": "the prompt set's published labels"}[src]
    return {"label_source": src, "label_rule": rule}


def build_task(tcfg: dict, mcfg: dict, model: DiffusionModel | None, weights: str | None = None,
               task: Task | None = None) -> PromptSet:
    """The task's prompt set (``weights``: the model's sha256 when computed already, for measured labels);
    ``task.max_per_group`` keeps the first k prompts of each group (a partial, smoke run)."""
    ps = (task or build_task_object(tcfg)).prompt_set(model, mcfg, weights)
    k = tcfg.get("max_per_group")
    if k:
        keep, seen = [], {}
        for i, g in enumerate(ps.groups):
            seen[g] = seen.get(g, 0) + 1
            if seen[g] <= k:
                keep.append(i)
        n_full, ps = len(ps), subset(ps, keep, f"{ps.name}_max{k}")
        reason = f"task.max_per_group={k}: {len(ps)} of {n_full} prompts"
        ps = dataclasses.replace(ps, extra={**ps.extra, "partial_reason": [reason] * len(ps)})
    return ps


def partial_fields(ps: PromptSet) -> dict:
    """``partial`` (a smoke run on a subset of the task, e.g. ``task.max_per_group=2``) and its reason:
    recorded in the run's result fields; the leaderboard lists such runs apart from the headline table."""
    reason = (ps.extra.get("partial_reason") or [None])[0]
    return {"partial": reason is not None, "partial_reason": reason}


def subset(ps: PromptSet, idx: list[int], name: str) -> PromptSet:
    return PromptSet(name, [ps.prompts[i] for i in idx], ps.labels[idx], [ps.groups[i] for i in idx],
                     [ps.types[i] for i in idx], [ps.ids[i] for i in idx], ps.sources,
                     {k: [v[i] for i in idx] for k, v in ps.extra.items()})


# ---------------------------------------------------------------------- detection
def model_key(mcfg: dict, model: DiffusionModel, weights: str | None = None) -> dict:
    """What of the model a run is keyed by: its config and fingerprint without the folder path (a clone or
    a moved checkout resumes the same runs) and the weights' sha256 (``bench.core.model.weights_sha256``;
    retrained weights in the same folder start new runs). ``weights``: the hash when already computed."""
    return {"model": {k: v for k, v in identity(mcfg).items() if k != "path"},
            "model_fingerprint": {k: v for k, v in model.fingerprint().items() if k != "path"},
            "model_weights_sha256": weights or weights_sha256(model)}


def detect_run_config(cfg: dict, ps_sha256: str, model: DiffusionModel, weights: str | None = None) -> dict:
    """The config a detect run folder is named and checked by (plain and fused runs share it, so they
    resume each other): config, prompt-set sha256 and ``model_key``, never a path."""
    return {"kind": "detect", "task": identity(cfg["task"]), "detector": cfg["detector"], "seed": int(cfg.get("seed", 0)),
            "prompt_set_sha256": ps_sha256, **model_key(cfg["model"], model, weights)}


def detect_row(ps: PromptSet, i: int, score: float, seconds: float, unet_evals: float) -> dict:
    """One per_prompt.csv row of a detect run."""
    planted = ps.extra.get("label_planted")
    return {"id": ps.ids[i], "prompt": ps.prompts[i], "label": int(ps.labels[i]), "group": ps.groups[i],
            "family": ps.extra.get("family", ps.types)[i] or "", "type": ps.types[i], "score": repr(float(score)),
            "seconds": seconds, "unet_evals": unet_evals,
            "label_planted": int(planted[i]) if planted is not None else int(ps.labels[i])}


@releases_locks
def run_detect(cfg: dict, *, model: DiffusionModel | None = None, progress: bool = True) -> dict:
    """Score ``cfg['task']`` with ``cfg['detector']`` on ``cfg['model']``; returns metrics.

    ``cfg['shard'] = "i/n"`` scores only the i-th contiguous block of the prompt set into its own
    shard folder and returns ``{"kind": "detect_shard", ...}``; the shard that completes a set
    merges it (bench/run/merge.py) into the folder and metrics a single run writes."""
    check_config("detect", cfg)                     # before any model load
    det = instantiate(cfg["detector"])               # a bad _target_ or argument fails here, before it too
    task = build_task_object(cfg["task"])            # and a bad task option
    shard = Shard.parse(cfg.get("shard"))
    t_load = time.perf_counter()
    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    model = model or build_model(cfg["model"], shard=shard)
    if cfg.get("compile"):                   # hardware.compile: torch.compile the UNet in place
        from bench.core.hardware import compile_unet
        compile_unet(model)
    load_seconds = time.perf_counter() - t_load
    weights = weights_sha256(model)              # once per run: keys the run folder
    ps_all = build_task(cfg["task"], cfg["model"], model, weights, task=task)
    ps = ps_all if shard.whole else subset(ps_all, shard.select(len(ps_all)),
                                           f"{ps_all.name}_shard{shard.index}of{shard.count}")
    det_id = config_id("detector", cfg["detector"]) or det.name
    seed = int(cfg.get("seed", 0))
    run_cfg = detect_run_config(cfg, ps_all.sha256, model, weights)
    run = RunFolder(cfg.get("runs_dir", "results/runs"), "detect", cfg["task"]["name"], model.name, det_id,
                    run_cfg, shard=shard).lock()
    if cfg.get("rerun") and run.complete:      # re-measure finished runs; partial ones resume
        run.reset()
    result_fields = {"kind": "detect", "task": cfg["task"]["name"], "model": model.name, "detector": det_id,
                     "params": json.dumps(det.params(), sort_keys=True, default=str),
                     "n_gen": getattr(det, "n_gen", None), "steps": getattr(det, "steps", None),
                     **labels_protocol(ps_all), **partial_fields(ps_all)}
    run.write_manifest(seeds={"seed": seed}, prompt_set={"name": ps_all.name, "sha256": ps_all.sha256,
                       "n": len(ps_all), "sources": list(ps_all.sources)}, model=model.fingerprint(),
                       model_weights_sha256=weights, params=det.params(), model_load_seconds=load_seconds,
                       result_fields=result_fields, **partial_fields(ps_all),
                       base_run=run.base_name, shard=shard_entry(shard, ps_all.ids), finished=None)
    done = run.done_ids(repair=bool(cfg.get("repair")))
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
        run.append_rows([detect_row(ps, i, s, dt / len(idx), rows / len(idx)) for i, s in zip(idx, scores)])
        bar.update(len(idx))
    bar.close()
    if not shard.whole:
        run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        run.release()
        if cfg.get("leaderboard"):        # the shard that completes its set merges it (the rebuild does)
            rebuild_leaderboard(run.path.parent, cfg["leaderboard"], "detect")
        else:
            merge_runs_dir(run.path.parent, kind="detect", strict=False)
        return {"kind": "detect_shard", "run": run.name, "base_run": run.base_name, "shard": str(shard),
                "n": len(ps), "merged": (run.path.parent / run.base_name / "metrics.json").is_file()}
    metrics = detect_result(run.read_rows(), ps.ids, run_cfg, run.manifest())
    run.write_metrics(metrics)
    run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    run.release()
    if cfg.get("leaderboard"):
        rebuild_leaderboard(run.path.parent, cfg["leaderboard"], "detect")
    return metrics


def detect_result(rows: pd.DataFrame, ids: list[str], run_cfg: dict, manifest: dict) -> dict:
    """metrics.json of a detect run from its per-prompt rows; a plain run and a shard merge
    (bench/run/merge.py KINDS) both call this, so both write the same metrics."""
    m = detect_metrics(rows, ids, seed=int(run_cfg["seed"]))
    m.update(manifest["result_fields"])
    m.update(git_sha=manifest["git_sha"], run=manifest["run"], prompt_set_sha256=manifest["prompt_set"]["sha256"])
    return m


def detect_metrics(df: pd.DataFrame, ps: PromptSet | list[str], *, seed: int = 0) -> dict:
    """Headline metrics against all negatives, plus AUC against each negative group and per family.
    ``ps``: the prompt set, or its ids in order.

    Headline classes: ``label`` (measured on the organism), leaving out the ``planted_not_learned``
    group; those prompts are scored beside it (``auc_planted_not_learned``: them against the
    negatives, 0.5 = scored like non-memorized prompts). ``planted_*`` keys: the planted convention
    (every planted-family prompt positive), from ``label_planted``."""
    ids = list(ps.ids if isinstance(ps, PromptSet) else ps)
    order = {pid: i for i, pid in enumerate(ids)}
    df = df.assign(_o=df["id"].map(order)).sort_values("_o")
    if df["id"].duplicated().any() or len(df) != len(ids) or df["_o"].isna().any():
        raise RuntimeError(f"per-prompt rows do not match the prompt set: {len(df)} rows for {len(ids)} "
                           "prompts (duplicates or strangers); remove the run folder and rerun")
    pnl = (df["group"] == PLANTED_NOT_LEARNED).to_numpy()
    head = df[~pnl]
    m = _class_metrics(head, head["label"].to_numpy(int), seed)
    m["seconds_per_prompt"] = float(df["seconds"].mean())
    m["unet_evals_per_prompt"] = float(df["unet_evals"].mean())
    m["n_planted_not_learned"] = int(pnl.sum())
    if pnl.any():
        s_all, y_all = df["score"].to_numpy(float), df["label"].to_numpy(int)
        neg = (~pnl) & (y_all == 0)
        m["auc_planted_not_learned"] = roc_auc(np.r_[s_all[pnl], s_all[neg]], np.r_[np.ones(pnl.sum()), np.zeros(neg.sum())])
    if "label_planted" in df and not df["label_planted"].isna().any():
        yp = df["label_planted"].to_numpy(int)
        if not np.array_equal(yp, df["label"].to_numpy(int)) or pnl.any():
            pm = _class_metrics(df, yp, seed)
            for k in ("auc", "auc_ci_low", "auc_ci_high", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr", "n_pos", "n_neg"):
                m[f"planted_{k}"] = pm[k]
            m["planted_per_family_auc"] = pm["per_family_auc"]
    return m


def _class_metrics(df: pd.DataFrame, y: np.ndarray, seed: int) -> dict:
    s = df["score"].to_numpy(float)
    m = detection_metrics(s, y, seed=seed)
    pos = y == 1
    groups = df["group"].to_numpy()
    m["per_group_auc"] = {g: roc_auc(np.r_[s[pos], s[groups == g]], np.r_[y[pos], y[groups == g]])
                          for g in dict.fromkeys(groups[~pos])}
    fam = df["family"].fillna("").to_numpy()
    m["per_family_auc"] = {f: roc_auc(np.r_[s[pos & (fam == f)], s[~pos]], np.r_[y[pos & (fam == f)], y[~pos]])
                           for f in dict.fromkeys(fam[pos]) if f}
    return m
