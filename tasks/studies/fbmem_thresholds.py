"""FB-Mem thresholds of an organism's world (``python -m tasks.studies.fbmem_thresholds``): calibrated once
per world on its exact masks and stored by its sha256 (``bench.measure.fbmem.thresholds_for``), with
diagnostics; shows the stored ones when present."""
from __future__ import annotations

import json
from dataclasses import asdict

from bench.measure.fbmem import THRESHOLD_DIR, thresholds_for
from tasks.organism import DEFAULT_VERSION, organism_config, organism_world


def main(argv: list[str] | None = None) -> None:
    """Calibrate (or show the stored) FB-Mem thresholds of an organism's world, with diagnostics."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description="FB-Mem thresholds of a world (exact masks), stored by its sha256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--version", default=None, help="organism version (default: the committed default)")
    ap.add_argument("--store-dir", default=str(THRESHOLD_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    world = organism_world(organism_config(args.version or DEFAULT_VERSION))
    thr = thresholds_for(world, store_dir=args.store_dir)
    print(json.dumps(asdict(thr), indent=2))


if __name__ == "__main__":
    main()
