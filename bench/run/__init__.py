"""Runs: the one config->object site (``registry``), the detect / fused / mitigate / explain runners, screening
and calibration commands, run folders and locks (``io``), per-prompt row checks, shards and their merge,
leaderboards, prompt files, config validation and exit codes.

May import: the rest of the engine (``bench.core``, ``bench.measure``, ``bench.contracts``, ``bench.errors``);
never ``baselines/`` or ``tasks/``: models, tasks, detectors, mitigators and judges come from config.
"""
