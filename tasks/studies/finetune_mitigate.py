"""Mitigation benchmark of the training-time mitigators on the fine-tuning protocol (``tasks.finetune_world``).

    python -m tasks.studies.finetune_mitigate build      # make finetunes: every fine-tune of the grid, cached
    python -m tasks.studies.finetune_mitigate calibrate  # tau calibration -> results/finetune_tau_calibration_<model>.json
    python -m tasks.studies.finetune_mitigate run        # run folders of kind mitigate (bench/report/mitigate_board.py)

Unlike ``bench.run.mitigate.run_mitigate`` (the world's evaluation prompts on the organism as trained),
the memorized prompts here are the NEW planted set's prompts, which only the fine-tunes saw, and
the ``none`` reference is plain fine-tuning (``train_none``). The task is ``organism_finetune`` and
the protocol (hence ``protocol_hash``) includes the fine-tuning config. Per image the measures are
``bench.measure.copyscore.CopyJudge``'s over the fine-tuning world (copy criterion and SSCD against the new
targets; nearest neighbours over every image the model was trained on). Metrics add the training
cost: ``train_cost_ratio`` (CPU seconds of the method's fine-tune / plain fine-tune's),
``fit_seconds`` (this run's fit: a cache load, or the build), and the build's CPU and wall seconds.

Any other mitigator (``ON_PLAIN``: prompt rewrites, GNI, embed-opt, NeMo, NeMo-C, pruning) runs here
on the plain fine-tune (``baselines.mitigators.train_time.OnPlainFinetune``), against the same ``none``:
the FB-Mem study (``make fbmem-study``, ``bench/report/fbmem_study.py``) needs a model whose foreground-local
family is memorized, and only the fine-tune has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bench.contracts import GenSpec
from bench.core.atomic import atomic_write_json
from bench.run.io import RunFolder, config_hash, releases_locks

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TASK = "organism_finetune"
GRID = ("train_none", "train_filter", "train_random_token", "train_cluster_augment")
# every mitigator of part 1 and the model-side ones, applied to the plain fine-tune (the FB-Mem study)
ON_PLAIN = ("rta", "rna", "cwr", "gni", "embed_opt", "nemo", "nemo_c", "pruning")


def load_conf(path: Path | None = None) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path or CONF / "finetune.yaml"), resolve=True)


def mitigator_conf(mid: str) -> dict:
    f = CONF / "mitigator" / f"{mid}.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"no mitigator config {f}; the training-time grid is {', '.join(GRID)}")
    return OmegaConf.to_container(OmegaConf.load(f), resolve=True)


def make_mitigator(mcfg: dict, strength: float, finetune: dict, cache_dir: str = ""):
    """A training-time mitigator (``FinetuneMitigator``), or any other one wrapped to act on the plain
    fine-tune (``OnPlainFinetune``)."""
    from hydra.utils import get_class

    from baselines.mitigators.train_time import FinetuneMitigator, OnPlainFinetune
    from tasks.finetune_world import WorldFinetuner

    kw = {k: v for k, v in mcfg.items() if k not in ("_target_", "id", "strengths", "strength")}
    cls = get_class(mcfg["_target_"])
    if issubclass(cls, FinetuneMitigator):
        return cls(strength=float(strength), finetune=dict(finetune), cache_dir=cache_dir, finetuner=WorldFinetuner(),
                   **kw)
    return OnPlainFinetune(inner=cls(strength=float(strength), **kw), finetune=dict(finetune), cache_dir=cache_dir,
                           finetuner=WorldFinetuner())


def strengths(mcfg: dict) -> list[float]:
    s = mcfg.get("strengths")
    return [float(x) for x in (s if s is not None else [mcfg.get("strength", 0.0)])]


@releases_locks
def run_finetune_mitigate(cfg: dict, mcfg: dict, *, model=None, judge=None, progress: bool = True) -> list[dict]:
    """One training-time mitigator over its strengths; one run folder per strength."""
    from bench.run.mitigate import aggregate, check_rows, generate_and_measure, resume_batches
    from bench.run.registry import config_id, instantiate
    from bench.run.runner import build_model, model_key
    from tasks.finetune_world import finetune_config_from_dict, finetune_world
    from tasks.organism_task import world_for

    torch.set_num_threads(int(cfg.get("threads") or 1))
    t0 = time.perf_counter()
    model = model or build_model(cfg["model"])
    load_seconds = time.perf_counter() - t0
    fcfg = finetune_config_from_dict(cfg.get("finetune") or {})
    base = world_for(None, model)
    world = finetune_world(base, fcfg)
    prompts = list(world.eval_prompts)
    # model-side methods' non-memorized reference prompts (NeMo's statistics): as bench.run.mitigate does
    reference = [e.prompt for e in base.eval_prompts if e.group == "ordinary_seen"]
    seed = int(cfg.get("seed", 0))
    seeds = [seed + j for j in range(int(cfg["n_seeds"]))]
    spec = GenSpec(int(cfg["steps"]), float(cfg["guidance"]), int(cfg.get("batch_images", 64)))
    if judge is None:                          # conf/judge/organism.yaml, as bench.run.mitigate
        judge = instantiate(OmegaConf.to_container(OmegaConf.load(CONF / "judge" / "organism.yaml")),
                            plain_errors=True, world=world, model=model, threads=int(cfg.get("threads") or 1))
    task = {"name": cfg.get("task_name", TASK), "source": "organism_finetune"}
    # keyed by what determines the numbers (model_key: weights sha256, no folder path), computed once
    protocol = {"task": task, "seed": seed, "n_seeds": len(seeds), "steps": spec.steps,
                "guidance": spec.guidance, "finetune": dataclasses.asdict(fcfg), **model_key(cfg["model"], model)}
    protocol_hash = config_hash(protocol)
    mid = config_id("mitigator", mcfg)
    results = []
    for strength in strengths(mcfg):
        mit = make_mitigator(mcfg, strength, cfg.get("finetune") or {}, cfg.get("cache_dir", ""))
        method = f"{mid or mit.name}@{strength:g}"
        run_cfg = {"kind": "mitigate", **protocol, "mitigator": {**{k: v for k, v in mcfg.items() if k != "strengths"},
                                                                 "strength": strength},
                   "world_sha256": world.sha256}
        run = RunFolder(cfg.get("runs_dir", "results/runs"), "mitigate", task["name"], model.name, method,
                        run_cfg).lock()
        if cfg.get("rerun") and run.complete:
            run.reset()
        t_fit, rows0 = time.perf_counter(), model.counter.rows
        mit.fit(model, memorized=[e.prompt for e in prompts if e.label == 1], reference=reference, seed=seed)
        fit_seconds, fit_rows = time.perf_counter() - t_fit, model.counter.rows - rows0
        run.write_manifest(seeds={"seed": seed, "generation_seeds": seeds}, params=mit.params(), protocol=protocol,
                           protocol_hash=protocol_hash, judge=judge.protocol(), prompt_ids=[e.id for e in prompts],
                           model=model.fingerprint(), model_load_seconds=load_seconds, fit_report=mit.fit_report)
        done = run.done_ids(repair=bool(cfg.get("repair")))   # resume per (prompt, seed), as bench.run.mitigate
        for batch in resume_batches(prompts, seeds, done, int(cfg.get("batch_prompts", 16))):
            rows = generate_and_measure(mit, model, judge, batch, seeds, spec, seed=seed, what=method)
            run.append_rows([r for r in rows if r["id"] not in done])
        rows = run.read_rows()
        check_rows(rows, [e.id for e in prompts], seeds, where=str(run.path))
        metrics = aggregate(rows)
        fr = mit.fit_report
        metrics.update({"kind": "mitigate", "task": task["name"], "model": model.name, "mitigator": mid or mit.name,
                        "strength": strength, "strength_unit": mit.strength_unit,
                        "params": json.dumps(mit.params(), sort_keys=True, default=str),
                        "fit_seconds": fit_seconds, "fit_unet_evals": fit_rows, "n_seeds": len(seeds),
                        "train_cost_ratio": fr["train_cost_ratio"], "train_wall_ratio": fr["train_wall_ratio"],
                        "finetune_cpu_seconds": fr["finetune_cpu_seconds"],
                        "finetune_wall_seconds": fr["finetune_wall_seconds"], "finetune_cached": fr["finetune_cached"],
                        "kept_fraction": fr["kept_fraction"], "finetune_key": fr["finetune_key"],
                        "protocol_hash": protocol_hash, "run": run.name,
                        "git_sha": json.loads((run.path / "manifest.json").read_text())["git_sha"]})
        for h in fr["hook_report"]:
            for g, v in h.get("kept_share", {}).items():
                metrics[f"kept_share_{g}"] = v
        run.write_metrics(metrics)
        run.write_manifest(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        run.release()
        results.append(metrics)
    return results


def build_all(cfg: dict, grid: list[str], *, model=None, only: list[float] | None = None) -> list[dict]:
    """Fit (build or load) every fine-tune of the grid, plain first; returns one record per fine-tune."""
    from bench.run.runner import build_model

    torch.set_num_threads(int(cfg.get("threads") or 1))
    model = model or build_model(cfg["model"])
    out = []
    for mid in grid:
        mcfg = mitigator_conf(mid)
        for s in strengths(mcfg):
            if only is not None and s not in only:
                continue
            mit = make_mitigator(mcfg, s, cfg.get("finetune") or {}, cfg.get("cache_dir", ""))
            t0 = time.perf_counter()
            mit.fit(model, seed=int(cfg.get("seed", 0)))
            rec = {"mitigator": mid, "strength": s, "fit_seconds": time.perf_counter() - t0,
                   **{k: v for k, v in mit.fit_report.items() if not isinstance(v, (dict, list))}}
            print(json.dumps(rec), flush=True)
            out.append(rec)
    return out


def calibrate_tau(cfg: dict, *, n_per_group: int = 512, model=None, out: str | Path | None = None) -> dict:
    """Distribution of Wen's training-time magnitude m for ordinary vs duplicated pairs, on the base
    organism (its own planted MV pairs are the memorized ones) and on the plain fine-tune (the new
    set); quantiles -> candidate taus. Written to ``out`` (JSON; the CLI's default names the base model)."""
    from baselines.mitigators.train_filter import noise_magnitudes
    from baselines.mitigators.train_time import PlainFinetune
    from bench.run.runner import build_model
    from tasks.finetune_world import WorldFinetuner, finetune_config_from_dict, finetune_world
    from tasks.organism_task import world_for

    torch.set_num_threads(int(cfg.get("threads") or 1))
    model = model or build_model(cfg["model"])
    base = world_for(None, model)
    ftw = finetune_world(base, finetune_config_from_dict(cfg.get("finetune") or {}))

    def groups(w, names):
        return {n: [i for i, g in enumerate(w.pair_group) if g == n] for n in names}

    plain = PlainFinetune(finetune=cfg.get("finetune") or {}, cache_dir=cfg.get("cache_dir", ""),
                          finetuner=WorldFinetuner())
    plain.fit(model, seed=int(cfg.get("seed", 0)))
    q = (0.5, 0.9, 0.95, 0.99)
    res = {"model": model.name, "finetune_config": cfg.get("finetune") or {},
           "protocol": "m = ||eps(x_t, e_p) - eps(x_t, e_empty)||_2 per sample, t ~ U{0..999}, fresh noise, "
                       "pairs drawn by duplication weight, no caption dropout", "n_per_group": n_per_group,
           "quantiles": list(q), "seed": int(cfg.get("seed", 0))}
    for tag, m, w, names in (("base_organism", model, base, ("ordinary", "MV", "RV", "FG", "BG")),
                             ("base_organism_on_new_set", model, ftw, ("ordinary", "FT_MV", "FT_FG", "FT_BG")),
                             ("plain_finetune", plain.finetuned, ftw, ("ordinary", "FT_MV", "FT_FG", "FT_BG"))):
        mags = noise_magnitudes(m, w, groups(w, names), n_per_group, seed=int(cfg.get("seed", 0)))
        res[tag] = {g: {"mean": float(v.mean()), **{f"q{int(x * 100)}": float(np.quantile(v, x)) for x in q}}
                    for g, v in mags.items()}
    if out:
        atomic_write_json(out, res, sort_keys=False)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="training-time mitigators on the fine-tuning protocol")
    ap.add_argument("command", choices=("build", "calibrate", "run"))
    ap.add_argument("--mitigators", default=",".join(GRID),
                    help=f"comma list of conf/mitigator ids (default {','.join(GRID)}; also {','.join(ON_PLAIN)}, "
                         "applied to the plain fine-tune)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--conf", default=str(CONF / "finetune.yaml"))
    ap.add_argument("--rerun", action="store_true", help="re-measure finished runs (fine-tunes stay cached)")
    ap.add_argument("--repair", action="store_true", help="move bad per-prompt rows aside and rescore them")
    ap.add_argument("--out", default="", help="calibrate: output JSON (default "
                    "results/finetune_tau_calibration_<base model name>.json)")
    ap.add_argument("--strengths", default="", help="comma list: only these strengths of each mitigator (default: all)")
    a = ap.parse_args(argv)
    cfg = load_conf(Path(a.conf))
    cfg["threads"], cfg["rerun"], cfg["repair"] = a.threads, a.rerun, a.repair
    grid = [m for m in a.mitigators.split(",") if m]
    only = [float(x) for x in a.strengths.split(",") if x] or None
    t0 = time.perf_counter()
    if a.command == "build":
        build_all(cfg, grid, only=only)
        print(f"finetune_mitigate build: {time.perf_counter() - t0:.1f} s wall")
        return
    from bench.run.runner import build_model
    model = build_model(cfg["model"])
    if a.command == "calibrate":
        out = a.out or f"results/finetune_tau_calibration_{model.name}.json"
        print(json.dumps(calibrate_tau(cfg, model=model, out=out), indent=2))
    else:
        for mid in grid:
            mcfg = mitigator_conf(mid)
            if only is not None:
                mcfg["strengths"] = [x for x in strengths(mcfg) if x in only]
            for m in run_finetune_mitigate(cfg, mcfg, model=model):
                print(f"{m['mitigator']}@{m['strength']:g}: copy_rate {m['copy_rate']:.3f} "
                      f"train_cost_ratio {m['train_cost_ratio']:.2f} fit_seconds {m['fit_seconds']:.1f}", flush=True)
    print(f"finetune_mitigate {a.command}: {time.perf_counter() - t0:.1f} s wall")


if __name__ == "__main__":
    main()
