"""``diffmem <command> [hydra overrides]``: thin Hydra entry points over bench.run.runner.

The face of the package: the one engine module that may import the studies (``tasks/studies``: speed,
ground truth) and the organism's construction, so a user reaches every command from here.

Commands: detect (one detector; add -m and a list to sweep), leaderboard (rebuild CSVs and plots
from run folders), organism (build the organism), groundtruth (measure the organism's copies),
explain (per-token significance of a prompt or a prompt file).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.errors import EXIT_NO_GROUNDTRUTH  # noqa: F401 (3; every code: bench/errors.py)

# conf/ of a checkout; an installed wheel ships it as bench/conf (pyproject.toml package-dir)
from bench.run.registry import CONF  # noqa: F401
USAGE = """usage: diffmem <command> [options]

commands:
  detect        score a task's prompts with a detector (Hydra overrides, e.g. detector=nm_n4_k1;
                -m detector=nm_n1_k1,nm_n4_k1 sweeps)
                with prompts=FILE (jsonl/csv/tsv/txt/parquet): screen your own prompts -> score,
                p-value, flag per prompt (conf/screen.yaml; column=, shard=i/n, calibration=, alpha=)
  detect-fused  several noise-magnitude / density configurations from ONE sampling pass, each into its
                own run folder (detectors=nm_n32_k50,density_sscd_n32,... [hydra overrides]); seconds
                per prompt are apportioned from the pass (recorded as such)
  calibrate     save a p-value calibration from a non-memorized reference file: prompts=FILE
  calibrate-check  organism: calibrate on half its non-memorized prompts, test on the other half
  report        one static HTML page over results/ -> results/report.html [RESULTS_DIR]
  mitigate      generate under a mitigator over its strengths and measure copies, FB-Mem and CLIP
                (Hydra overrides, e.g. mitigator=rta; -m mitigator=none,rta,gni sweeps)
  leaderboard   rebuild results/*_leaderboard.csv and plots from results/runs
  speed         detection speed vs its cost floor -> results/speed.csv (python -m tasks.studies.speed --help)
  repair        move the bad rows of a run folder's per_prompt.csv (garbage, duplicates, non-numeric scores,
                non-UTF-8 bytes) to per_prompt.rejected.csv; the next run rescores them [RUN_FOLDER...]
                (or add repair=true to the detect / mitigate command)
  merge         merge complete shard sets (runs with shard=i/n) into whole runs [RUNS_DIR | SHARD_DIR...]
  organism      build (train) the memorization organism
  groundtruth   measure which organism prompts reproduce training images (writes its manifest)
  explain       per-token significance of 'prompt="..."' or prompts=file -> CSV + bar charts in
                results/explain/<name>/ (quote prompts holding commas or brackets)

your own detectors / mitigators: DIFFMEM_INCLUDE=/path/to/folder (its conf/ joins Hydra's search path,
  the folder joins sys.path), or hydra.searchpath=[file:///path/to/conf] (README: "Adding your own detector or mitigator")

exit codes (bench/errors.py): 0 ok; 1 unexpected error (a bug; traceback) or an unknown config name;
  2 bad option or config value; 3 unusable prompts or labels (prompt file; no ground truth: make
  groundtruth); 4 calibration missing or for other weights; 5 output holds another run / inconsistent
  shard set; 6 screening: some lines rejected; 7 model cannot be loaded (missing folder, .bin weights,
  organism not built: make organism); 8 another process holds the run folder / output (pid named);
  9 bad rows in a run's per_prompt.csv (file and line named; repair=true)
"""


def _guarded(command: str, fn, *args):
    """Run ``fn(*args)``; a user error (bench/errors.py) ends the command with one line on stderr and its
    documented exit code instead of a traceback. SystemExit passes through."""
    from bench.run.exit_codes import user_error_code

    try:
        return fn(*args)
    except Exception as e:           # noqa: BLE001 - classified below; bugs are re-raised untouched
        code = user_error_code(e)
        if code is None:
            raise
        print(f"diffmem {command}: error: {e}", file=sys.stderr)
        raise SystemExit(code) from None


INCLUDE_ENV = "DIFFMEM_INCLUDE"   # folders (os.pathsep-separated) of your own configs and code


def include_overrides(argv: list[str]) -> list[str]:
    """``DIFFMEM_INCLUDE=/path/a:/path/b``: each folder goes on sys.path (its modules can be ``_target_``s)
    and its ``conf/`` (or the folder itself when it has no ``conf/``) on Hydra's search path, so
    ``detector=my_det`` finds ``<folder>/conf/detector/my_det.yaml``. Returns the Hydra override
    to add (none when the command line sets hydra.searchpath itself)."""
    folders = [Path(f).expanduser().resolve() for f in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if f]
    for f in folders:
        if not f.is_dir():
            from bench.errors import EXIT_CONFIG
            print(f"diffmem: error: {INCLUDE_ENV} names {str(f)!r}, which is not a folder", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG)
        if str(f) not in sys.path:
            sys.path.insert(0, str(f))
    if not folders or any(a.lstrip("+").startswith("hydra.searchpath=") for a in argv):
        return []
    paths = [f"file://{(f / 'conf') if (f / 'conf').is_dir() else f}" for f in folders]
    return [f"hydra.searchpath=[{','.join(paths)}]"]


def _hydra(config_name: str, fn, argv: list[str], command: str | None = None) -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(config_path=CONF, config_name=config_name, version_base="1.3")
    def _main(cfg) -> None:
        _guarded(command or config_name, fn, OmegaConf.to_container(cfg, resolve=True))

    flags = [a for a in argv if a in ("-m", "--multirun")]      # Hydra wants -m before the overrides
    rest = [a for a in argv if a not in flags]
    sys.argv = [f"diffmem {config_name}", *flags, *include_overrides(rest), *rest]
    _main()


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)


def _detect(cfg: dict) -> None:
    from bench.run.runner import run_detect

    m = run_detect(cfg)
    where = Path(cfg.get("runs_dir", "results/runs")) / m["run"]
    if m.get("kind") == "detect_shard":
        merged = "merged into " + str(where.parent / m["base_run"]) if m["merged"] else "set not complete yet"
        print(f"diffmem detect: shard {m['shard']} scored {m['n']} prompts -> {where} ({merged})")
        return
    print(f"diffmem detect: {m['detector']} on {m['task']} / {m['model']}: AUC {_fmt(m['auc'])}  "
          f"TPR@1%FPR {_fmt(m['tpr_at_1pct_fpr'])}  ({m['n_pos']} positives, {m['n_neg']} negatives)"
          f" -> {where}" + (f" (leaderboard {cfg['leaderboard']})" if cfg.get("leaderboard") else ""))


def _mitigate(cfg: dict) -> None:
    from bench.run.mitigate import run_mitigate

    for m in run_mitigate(cfg):
        where = Path(cfg.get("runs_dir", "results/runs")) / m["run"]
        if m.get("kind") == "mitigate_shard":
            print(f"diffmem mitigate: shard {m['shard']} -> {where}")
            continue
        print(f"diffmem mitigate: {m['mitigator']}@{m['strength']:g}: copy rate {_fmt(m['copy_rate'])}  "
              f"utility CLIP {_fmt(m['general_prompt_clip'])}  -> {where}")


def _explain(cfg: dict) -> None:
    from bench.run.explain import run_explain

    out = run_explain(cfg)
    print(f"diffmem explain: per-token scores -> {out / 'scores.csv'}, bar charts -> {out / 'plots'}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "detect" and any(a.lstrip("+").startswith("prompts=") for a in rest):
        from bench.run.calibrate_cmd import cli as screen_cli        # a user's prompt file: screening
        _hydra("screen", lambda cfg: screen_cli("screen", cfg), rest, "detect")
    elif cmd in ("calibrate", "calibrate-check"):
        from bench.run.calibrate_cmd import cli as screen_cli
        _hydra("screen", lambda cfg: screen_cli(cmd, cfg), rest, cmd)
    elif cmd == "report":
        from bench.report.html_report import main as report_main
        report_main(rest)
    elif cmd == "detect-fused":
        from bench.run.detect_fused import main as fused_main
        _guarded(cmd, fused_main, [*include_overrides(rest), *rest])
    elif cmd == "detect":
        _hydra("detect", _detect, rest)
    elif cmd == "mitigate":
        _hydra("mitigate", _mitigate, rest)
    elif cmd == "speed":
        from tasks.studies.speed import main as speed_main
        speed_main(rest)
    elif cmd == "leaderboard":
        from bench.report.mitigate_board import rebuild_mitigate
        from bench.report.plots import rebuild_all
        rebuild_all(*(rest[:1] or ["results"]))
        rebuild_mitigate(*(rest[:1] or ["results"]))
    elif cmd == "repair":
        from bench.run.rows import main as repair_main
        _guarded(cmd, repair_main, rest)
    elif cmd == "merge":
        from bench.run.merge import main as merge_main
        _guarded(cmd, merge_main, rest)
    elif cmd == "organism":
        from tasks.organism import main as organism_main
        _guarded(cmd, organism_main, rest)
    elif cmd == "groundtruth":
        from tasks.studies.groundtruth import main as gt_main
        _guarded(cmd, gt_main, rest)
    elif cmd == "explain":
        _hydra("explain", _explain, rest)
    else:
        print(f"diffmem: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
