"""``diffmem <command> [hydra overrides]``: thin Hydra entry points over bench.runner.

Commands: detect (one detector; add -m and a list to sweep), leaderboard (rebuild CSVs and plots
from run folders), organism (build the organism), groundtruth (measure the organism's copies),
explain (per-token significance of a prompt or a prompt file).
"""
from __future__ import annotations

import sys
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")
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
  speed         detection speed vs its cost floor -> results/speed.csv (python -m bench.speed --help)
  repair        move the bad rows of a run folder's per_prompt.csv (garbage, duplicates, non-numeric scores,
                non-UTF-8 bytes) to per_prompt.rejected.csv; the next run rescores them [RUN_FOLDER...]
                (or add repair=true to the detect / mitigate command)
  merge         merge complete shard sets (runs with shard=i/n) into whole runs [RUNS_DIR | SHARD_DIR...]
  organism      build (train) the memorization organism
  groundtruth   measure which organism prompts reproduce training images (writes its manifest)
  explain       per-token significance of 'prompt="..."' or prompts=file -> CSV + bar charts in
                results/explain/<name>/ (quote prompts holding commas or brackets)
"""


def _hydra(config_name: str, fn, argv: list[str]) -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(config_path=CONF, config_name=config_name, version_base="1.3")
    def _main(cfg) -> None:
        fn(OmegaConf.to_container(cfg, resolve=True))

    flags = [a for a in argv if a in ("-m", "--multirun")]      # Hydra wants -m before the overrides
    sys.argv = [f"diffmem {config_name}", *flags, *[a for a in argv if a not in flags]]
    _main()


EXIT_NO_GROUNDTRUTH = 3   # the organism's weights have no measured ground truth (run `make groundtruth`)


def _guarded(command: str, fn):
    """Run ``fn(cfg)``; a locked run folder (another process runs it: EXIT_LOCKED) or bad per-prompt rows
    (EXIT_BAD_ROWS) print one clear message and exit with their code."""
    from bench.io import EXIT_LOCKED, RunLockedError
    from bench.rows import EXIT_BAD_ROWS, CorruptRowsError

    def run(cfg: dict) -> None:
        try:
            fn(cfg)
        except RunLockedError as e:
            print(f"diffmem {command}: {e}", file=sys.stderr)
            raise SystemExit(EXIT_LOCKED) from None
        except CorruptRowsError as e:
            print(f"diffmem {command}: {e}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_ROWS) from None
    return run


def _detect(cfg: dict) -> None:
    from bench.runner import run_detect
    from tasks.groundtruth import GroundTruthError

    try:
        _guarded("detect", run_detect)(cfg)
    except GroundTruthError as e:
        print(f"diffmem detect: {e}", file=sys.stderr)
        raise SystemExit(EXIT_NO_GROUNDTRUTH) from None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "detect" and any(a.lstrip("+").startswith("prompts=") for a in rest):
        from bench.screen import cli as screen_cli        # a user's prompt file: screening
        _hydra("screen", lambda cfg: screen_cli("screen", cfg), rest)
    elif cmd in ("calibrate", "calibrate-check"):
        from bench.screen import cli as screen_cli
        _hydra("screen", lambda cfg: screen_cli(cmd, cfg), rest)
    elif cmd == "report":
        from bench.report import main as report_main
        report_main(rest)
    elif cmd == "detect-fused":
        from bench.detect_fused import main as fused_main
        _guarded("detect-fused", fused_main)(rest)
    elif cmd == "detect":
        _hydra("detect", _detect, rest)
    elif cmd == "mitigate":
        from bench.mitigate import run_mitigate
        _hydra("mitigate", _guarded("mitigate", run_mitigate), rest)
    elif cmd == "speed":
        from bench.speed import main as speed_main
        speed_main(rest)
    elif cmd == "leaderboard":
        from bench.mitigate_board import rebuild_mitigate
        from bench.plots import rebuild_all
        rebuild_all(*(rest[:1] or ["results"]))
        rebuild_mitigate(*(rest[:1] or ["results"]))
    elif cmd == "repair":
        from bench.rows import main as repair_main
        repair_main(rest)
    elif cmd == "merge":
        from bench.merge import main as merge_main
        merge_main(rest)
    elif cmd == "organism":
        from tasks.organism import main as organism_main
        organism_main(rest)
    elif cmd == "groundtruth":
        from tasks.groundtruth import main as gt_main
        gt_main(rest)
    elif cmd == "explain":
        from bench.explain import run_explain
        _hydra("explain", run_explain, rest)
    else:
        print(f"diffmem: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
