"""``diffmem calibrate`` and ``diffmem calibrate-check`` (p-value calibrations of screening), and the CLI
wrapper of the screening commands (``bench/cli.py`` maps their user errors to one line and an exit code)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bench.core.atomic import atomic_write_json

from bench.run.io import git_info
from bench.run.prompt_file import load_prompt_file
from bench.run.screen import ScreenResult, _file_sha256, _required_prompts, run_screen, setup
from bench.run.validate import check_config


# ---------------------------------------------------------------------- calibration commands
def run_calibrate(cfg: dict, *, model=None, progress: bool = True) -> Path:
    """``diffmem calibrate prompts=ref.jsonl``: score a non-memorized reference file (strict: a bad
    reference line is an error) and save the calibration of this model + detector + seed."""
    from bench.measure.calibration import calibrate, default_path

    check_config("calibrate", cfg)                  # before any model load
    prompts = _required_prompts(cfg)
    pf = load_prompt_file(prompts, cfg.get("column", "prompt"), cfg.get("format"), strict=True)
    s = setup(cfg, model)
    cal = calibrate(s.model, s.detector, s.detector_id, pf.prompts, seed=s.seed, reference_name=str(prompts),
                    batch_prompts=int(cfg.get("batch_prompts", 64)), weights=s.weights,
                    notes={"reference_file_sha256": _file_sha256(prompts), "column": pf.column})
    spec = cfg.get("calibration", "auto")
    path = Path(spec) if spec not in (None, "auto", "none") else \
        default_path(cfg.get("calibration_dir", "results/calibration"), s.model.name, s.detector_id, s.key)
    cal.save(path)
    print(f"calibration of {s.model.name} / {s.detector_id} on {cal.n} reference prompts -> {path}")
    return path


def run_calibrate_check(cfg: dict, *, model=None, progress: bool = True) -> dict:
    """``diffmem calibrate-check``: on the organism, split its non-memorized evaluation prompts into a
    calibration half and a held-out half (seeded), save the calibration of the first half (the default
    ``calibration=auto`` of the organism), and measure flag rates of the held-out half and of the
    memorized prompts at each alpha. Writes ``<calibration_dir>/heldout__<model>__<detector>.json``."""
    from bench.measure.calibration import calibrate, default_path, heldout_check, repeated_splits
    from omegaconf import OmegaConf

    from bench.run.registry import CONF
    from bench.run.runner import PLANTED_NOT_LEARNED, build_task, build_task_object

    check_config("calibrate-check", cfg)            # before any model load
    labels = str(cfg.get("labels", "measured"))      # measured: the ground truth of these weights
    tcfg = {**OmegaConf.to_container(OmegaConf.load(Path(CONF) / "task" / "organism.yaml")), "labels": labels}
    task = build_task_object(tcfg)                   # a bad labels= stops here, before the model loads
    s = setup(cfg, model)
    ps = build_task(tcfg, cfg["model"], s.model, task=task)   # refused for a model not of the organism's world
    bs = int(cfg.get("batch_prompts", 64))
    scores = np.concatenate([s.detector.score(s.model, ps.prompts[i:i + bs], seed=s.seed)
                             for i in tqdm(range(0, len(ps), bs), desc="calibrate-check", disable=not progress)])
    split_seed = int(cfg.get("split_seed", 0))
    pnl = np.array([g == PLANTED_NOT_LEARNED for g in ps.groups])
    neg, pos = np.flatnonzero((ps.labels == 0) & ~pnl), np.flatnonzero(ps.labels == 1)
    perm = neg[np.random.default_rng(split_seed).permutation(neg.size)]
    cal_idx, held_idx = np.sort(perm[: neg.size // 2]), np.sort(perm[neg.size // 2:])
    cal = calibrate(s.model, s.detector, s.detector_id, [ps.prompts[i] for i in cal_idx], seed=s.seed,
                    reference_name=f"{ps.name} non-memorized, calibration half (split_seed={split_seed})",
                    scores=scores[cal_idx], weights=s.weights,
                    notes={"split_seed": split_seed, "ids": [ps.ids[i] for i in cal_idx]})
    cal_path = cal.save(default_path(cfg.get("calibration_dir", "results/calibration"), s.model.name,
                                     s.detector_id, s.key))
    alphas = [float(a) for a in cfg.get("check_alphas", [0.01, 0.05])]
    rows = heldout_check(cal, scores[held_idx], alphas, positive_scores=scores[pos])
    p_pos = cal.pvalues(scores[pos])
    fams = np.array(ps.extra["family"])[pos]
    per_family = {f: {"n": int((fams == f).sum()), "median_p": float(np.median(p_pos[fams == f])),
                      **{f"flag_rate_at_{a:g}": float((p_pos[fams == f] <= a).mean()) for a in alphas}}
                  for f in dict.fromkeys(fams)}
    held_groups = np.array(ps.groups)[held_idx]
    p_held = cal.pvalues(scores[held_idx])
    per_group = {g: {"n": int((held_groups == g).sum()),
                     **{f"flag_rate_at_{a:g}": float((p_held[held_groups == g] <= a).mean()) for a in alphas}}
                 for g in dict.fromkeys(held_groups)}
    repeats = repeated_splits(scores[neg], alphas, int(cfg.get("split_repeats", 1000)), split_seed)
    p_pnl = cal.pvalues(scores[pnl]) if pnl.any() else np.array([])
    report = {"model": s.model.name, "detector": s.detector_id, "seed": s.seed, "split_seed": split_seed,
              "label_source": labels, "n_memorized": int(pos.size), "n_planted_not_learned": int(pnl.sum()),
              "planted_not_learned_flag_rates": {f"flag_rate_at_{a:g}": float((p_pnl <= a).mean())
                                                 for a in alphas} if pnl.any() else {},
              "calibration_file": str(cal_path), "alphas": rows, "repeated_splits": repeats,
              "memorized_median_p": float(np.median(p_pos)),
              "memorized_per_family": per_family, "heldout_per_group": per_group, "git": git_info()}
    out = Path(cfg.get("calibration_dir", "results/calibration")) / f"heldout__{s.model.name}__{s.detector_id}.json"
    atomic_write_json(out, report)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"over {repeats[0]['repeats']} random half splits (the guarantee is marginal over the split):")
    print(pd.DataFrame(repeats).to_string(index=False))
    print(f"memorized prompts: median p-value {report['memorized_median_p']:.4g}; per family:")
    print(pd.DataFrame(per_family).T.to_string())
    print(f"-> {out}")
    return report


# ---------------------------------------------------------------------- CLI wrappers (exit codes)
def cli(command: str, cfg: dict) -> None:
    """Run a command from Hydra (bench/cli.py maps its user errors to one line and the EXIT_* codes)."""
    fn = {"screen": run_screen, "calibrate": run_calibrate, "calibrate-check": run_calibrate_check}[command]
    res = fn(cfg)
    if isinstance(res, ScreenResult):
        trunc = f", {res.n_truncated} truncated" if res.n_truncated else ""
        print(f"diffmem detect: scored {res.n_scored} prompts, flagged {res.n_flagged}{trunc} -> {res.out}")
        if res.n_rejected:
            print(f"diffmem detect: {res.n_rejected} line(s) rejected, listed in {res.rejected_file}; "
                  f"every other line was scored (exit code {res.exit_code})", file=sys.stderr)
        if res.exit_code:
            raise SystemExit(res.exit_code)
