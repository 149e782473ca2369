"""One sampling pass for many detector configurations (``make bench-detect-full``).

Every noise-magnitude (n, k) configuration and every generation-density (n) configuration that share a
seed, a guidance scale and a DDIM schedule read the SAME trajectories: generation j of a prompt starts
from seed + j whatever the detector, and THE sampling loop is deterministic per seed whatever the batch
composition. So one pass with N = max n seeds, run for K steps (K = the largest k, or the whole
schedule with decoding when a density configuration is present) gives every configuration's score:

- noise magnitude (n, k): the per-step norms of generations 0..n-1 and steps 0..k-1, aggregated
  exactly as ``NoiseMagnitude.score`` (mean over generations, then over steps);
- density (n, space): the first n generations' images; the similarity matrix of the N images is
  computed once per (space, embedder settings) and each configuration reads its leading n x n block
  (pairwise similarities do not depend on the other images).

Each configuration still gets its own run folder, with the same config (hence the same folder name) as
``bench.run.runner.run_detect`` would write, so fused and plain runs resume each other. Scores agree with
the plain runs to float round-off (tested). Cost columns: ``unet_evals`` per prompt are the
configuration's own (2 n k, or 2 n x steps), not the pass's; ``seconds`` are APPORTIONED from the pass,
recorded as such in the manifest (``timing``): the pass's sampling seconds x the configuration's share
of the pass's UNet rows, plus for density its space's similarity seconds x n / N. Wall times measured
per configuration come from plain runs (``make bench-detect``).
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.run.io import RunFolder, releases_locks
from bench.run.leaderboard import rebuild_leaderboard
from bench.core.model import weights_sha256
from bench.run.registry import CONF, config_id, instantiate
from bench.run.runner import (build_model, build_task, detect_result, detect_row, detect_run_config, labels_protocol,
                              partial_fields)
from bench.core.sampling import StepInfo, sample
from bench.run.validate import check_config

TIMING = ("apportioned from a fused pass: pass sampling seconds x (this configuration's UNet rows / the pass's "
          "UNet rows) [+ density: similarity seconds of its space x n / N]")


def _is_noise(det) -> bool:
    """A per-step noise-magnitude detector (``fuse = "noise"``, ``bench.contracts.Detector``)."""
    return getattr(det, "fuse", None) == "noise"


def _is_density(det) -> bool:
    """A generation-density detector (``fuse = "density"``): ``similarity`` of decoded images, ``reduce``d."""
    return getattr(det, "fuse", None) == "density"


def _schedule(det) -> tuple[int, float]:
    if _is_noise(det):
        return det.total_steps, det.guidance
    if _is_density(det):
        return det.steps, det.guidance
    raise TypeError(f"{type(det).__name__} cannot join a fused pass (only detectors with fuse = 'noise' or "
                    "'density': NoiseMagnitude and GenerationDensity)")


def _sim_key(det) -> tuple:
    return (det.space, det.grid, det.sscd_resize)


def fused_scores(model, prompts: list[str], dets: list, *, seed: int, batch_size: int = 256) -> dict:
    """{index in dets: scores [P]} from one pass, plus timing: {"sample_seconds", "sim_seconds": {key: s},
    "rows": UNet rows of the pass}."""
    sched = {_schedule(d) for d in dets}
    if len(sched) != 1:
        raise ValueError(f"fused detectors must share the DDIM schedule and guidance; got {sorted(sched)}")
    total, guidance = sched.pop()
    N = max(d.n_gen for d in dets)
    dens = [d for d in dets if _is_density(d)]
    K = total if dens else max(d.steps for d in dets)
    K_nm = max([d.steps for d in dets if _is_noise(d)], default=0)
    P = len(prompts)
    norms = torch.zeros(P * N, max(K_nm, 1), dtype=torch.float64)
    rows, steps, values = [], [], []

    def on_step(s: StepInfo) -> None:
        if s.i < K_nm:
            rows.append(s.sample_idx)
            steps.append(s.i)
            values.append((s.eps_text.float() - s.eps_uncond.float()).flatten(1).norm(dim=1))

    r0, t0 = model.counter.rows, time.perf_counter()
    res = sample(model, prompts, [seed + j for j in range(N)], steps=total, guidance=guidance,
                 on_step=on_step if K_nm else None, stop_after=K, batch_size=batch_size, decode=bool(dens))
    timing = {"sample_seconds": time.perf_counter() - t0, "rows": model.counter.rows - r0, "sim_seconds": {}}
    if values:
        flat = torch.cat(values).double().cpu()
        norms[torch.cat(rows), torch.tensor(steps).repeat_interleave(torch.tensor([len(r) for r in rows]))] = flat
    nv = norms.view(P, N, -1).numpy()
    out: dict[int, np.ndarray] = {}
    sims: dict[tuple, np.ndarray] = {}
    if dens:
        imgs = res.images.float().cpu().numpy().reshape(P, N, *res.images.shape[1:])
    for i, d in enumerate(dets):
        if _is_noise(d):
            out[i] = nv[:, : d.n_gen, : d.steps].mean(axis=1).mean(axis=1)
            continue
        key = _sim_key(d)
        if key not in sims:
            t1 = time.perf_counter()
            sims[key] = d.similarity(imgs)                       # [P, N, N]
            timing["sim_seconds"][key] = time.perf_counter() - t1
        out[i] = np.array([d.reduce(m[: d.n_gen, : d.n_gen]) for m in sims[key]])
    return {"scores": out, **timing}


def _rows_of(det, n_prompts: int = 1) -> int:
    total, _ = _schedule(det)
    k = det.steps if _is_noise(det) else total
    return 2 * det.n_gen * k * n_prompts


@releases_locks
def run_detect_fused(cfgs: list[dict], *, model=None, progress: bool = True) -> list[dict]:
    """``run_detect`` for several detector configurations at once (same task, model, seed)."""
    if not cfgs:
        raise ValueError("run_detect_fused needs at least one detect config")
    common = {k: v for k, v in cfgs[0].items() if k != "detector"}
    for c in cfgs[1:]:
        other = {k: v for k, v in c.items() if k != "detector"}
        if other != common:
            diff = sorted(k for k in set(other) | set(common) if other.get(k) != common.get(k))
            raise ValueError(f"fused detect configs must differ only in the detector; they differ in {diff}")
    for c in cfgs:                                  # before any model load
        check_config("detect-fused", c)
    if common.get("shard"):
        raise ValueError("the fused pass does not shard; run shards with `diffmem detect shard=i/n`")
    cfg = cfgs[0]
    torch.set_num_threads(int(cfg.get("threads") or torch.get_num_threads()))
    t_load = time.perf_counter()
    model = model or build_model(cfg["model"])
    load_seconds = time.perf_counter() - t_load
    weights = weights_sha256(model)             # once for every configuration: keys their run folders
    ps = build_task(cfg["task"], cfg["model"], model, weights)
    seed = int(cfg.get("seed", 0))
    dets = [instantiate(c["detector"]) for c in cfgs]
    ids = [config_id("detector", c["detector"]) or d.name for c, d in zip(cfgs, dets)]
    runs = []
    for c, d, det_id in zip(cfgs, dets, ids):
        run_cfg = detect_run_config(c, ps.sha256, model, weights)
        run = RunFolder(c.get("runs_dir", "results/runs"), "detect", c["task"]["name"], model.name, det_id,
                        run_cfg).lock()
        if c.get("rerun") and run.complete:
            run.reset()
        result_fields = {"kind": "detect", "task": c["task"]["name"], "model": model.name, "detector": det_id,
                         "params": json.dumps(d.params(), sort_keys=True, default=str),
                         "n_gen": d.n_gen, "steps": d.steps, "timing": "apportioned (fused pass)",
                         **labels_protocol(ps), **partial_fields(ps)}
        run.write_manifest(seeds={"seed": seed}, prompt_set={"name": ps.name, "sha256": ps.sha256, "n": len(ps),
                           "sources": list(ps.sources)}, model=model.fingerprint(), model_weights_sha256=weights,
                           params=d.params(), model_load_seconds=load_seconds, result_fields=result_fields,
                           **partial_fields(ps), base_run=run.base_name, shard=None, fused_with=ids, timing=TIMING,
                           finished=None)
        runs.append((run, run_cfg))
    done = [run.done_ids(repair=bool(cfg.get("repair"))) for run, _ in runs]
    todo = [i for i, pid in enumerate(ps.ids) if any(pid not in d for d in done)]
    bs = int(cfg.get("batch_prompts", 64))
    bar = tqdm(total=len(ps), initial=len(ps) - len(todo), desc=f"detect fused x{len(dets)}", disable=not progress)
    for b0 in range(0, len(todo), bs):
        idx = todo[b0:b0 + bs]
        got = fused_scores(model, [ps.prompts[i] for i in idx], dets, seed=seed,
                           batch_size=int(getattr(dets[0], "batch_size", 256)))
        rows_pass = got["rows"] / len(idx)
        for k, ((run, _), d, det_id) in enumerate(zip(runs, dets, ids)):
            s = np.asarray(got["scores"][k], np.float64)
            if s.shape != (len(idx),) or not np.isfinite(s).all():
                raise FloatingPointError(f"detector {det_id} returned {s.shape} scores with "
                                         f"{int((~np.isfinite(s)).sum())} non-finite for prompts "
                                         f"{[ps.ids[i] for i in idx][:5]}...; nothing of this batch was written")
            own = _rows_of(d)
            sec = got["sample_seconds"] / len(idx) * own / rows_pass
            if _is_density(d):
                sec += got["sim_seconds"][_sim_key(d)] / len(idx) * d.n_gen / max(x.n_gen for x in dets)
            run.append_rows([detect_row(ps, i, v, sec, own) for i, v in zip(idx, s) if ps.ids[i] not in done[k]])
        bar.update(len(idx))
    bar.close()
    out = []
    for run, run_cfg in runs:
        metrics = detect_result(run.read_rows(), ps.ids, run_cfg, run.manifest())
        run.write_metrics(metrics)
        run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        run.release()
        out.append(metrics)
    if cfg.get("leaderboard"):
        rebuild_leaderboard(runs[0][0].path.parent, cfg["leaderboard"], "detect")
    return out


def compose(detectors: list[str], overrides: list[str]) -> list[dict]:
    """The detect config (conf/detect.yaml) for each detector, with the same other overrides."""
    from hydra import compose as hy_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return [OmegaConf.to_container(hy_compose("detect", [f"detector={d}", *overrides]), resolve=True)
                for d in detectors]


def main(argv: list[str]) -> None:
    """``diffmem detect-fused detectors=a,b,c [overrides]``."""
    dets = [a.split("=", 1)[1] for a in argv if a.startswith("detectors=")]
    if not dets or not dets[0]:
        raise SystemExit("usage: diffmem detect-fused detectors=nm_n32_k50,density_sscd_n32,... [hydra overrides]")
    rest = [a for a in argv if not a.startswith("detectors=")]
    cfgs = compose([d for d in dets[0].split(",") if d], rest)
    for c, m in zip(cfgs, run_detect_fused(cfgs)):
        print(f"diffmem detect-fused: {m['detector']}: AUC {m['auc']:.3f}  TPR@1%FPR {m['tpr_at_1pct_fpr']:.3f}  "
              f"s/prompt {m['seconds_per_prompt']:.3f} (apportioned) -> {c.get('runs_dir', 'results/runs')}/{m['run']}",
              flush=True)
