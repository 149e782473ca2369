"""``diffmem <command> [hydra overrides]``: thin Hydra entry points over bench.runner.

Commands: detect (one detector; add -m and a list to sweep), leaderboard (rebuild CSVs and plots
from run folders), organism (build the organism), groundtruth (measure the organism's copies).
"""
from __future__ import annotations

import sys
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")
USAGE = """usage: diffmem <command> [options]

commands:
  detect        score a task's prompts with a detector (Hydra overrides, e.g. detector=nm_n4_k1;
                -m detector=nm_n1_k1,nm_n4_k1 sweeps)
  leaderboard   rebuild results/*_leaderboard.csv and plots from results/runs
  organism      build (train) the memorization organism
  groundtruth   measure which organism prompts reproduce training images (writes its manifest)
"""


def _hydra(config_name: str, fn, argv: list[str]) -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(config_path=CONF, config_name=config_name, version_base="1.3")
    def _main(cfg) -> None:
        fn(OmegaConf.to_container(cfg, resolve=True))

    sys.argv = [f"diffmem {config_name}", *argv]
    _main()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "detect":
        from bench.runner import run_detect
        _hydra("detect", run_detect, rest)
    elif cmd == "leaderboard":
        from bench.plots import rebuild_all
        rebuild_all(*(rest[:1] or ["results"]))
    elif cmd == "organism":
        from tasks.organism import main as organism_main
        organism_main(rest)
    elif cmd == "groundtruth":
        from tasks.groundtruth import main as gt_main
        gt_main(rest)
    else:
        print(f"diffmem: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
