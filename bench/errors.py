"""User errors and the exit codes every ``diffmem`` command maps them to.

A user error (a bad option, an unusable prompt file, a model folder that is missing or holds ``.bin``
weights, an organism that was never built, ...) ends the command with ONE line on stderr,
``diffmem <command>: error: <what, where, how to fix>``, and the exit code below; anything else is a
bug and keeps its traceback (exit code 1).

    0  success
    1  unexpected error (a bug: please report it with the traceback); Hydra also exits 1 when an override
       names a config that does not exist (``detector=nope``: its message lists the available ones)
    2  EXIT_CONFIG        a bad option or config value (NaN guidance, n_gen=0, shard=3/2, a missing model.path,
                          a ``_target_`` that cannot be imported or instantiated, ...)
    3  EXIT_INPUT         the prompts or labels given are unusable: prompt file missing / empty / no such column /
                          no valid line, an empty prompt list, or no measured ground truth for the organism's
                          weights (``make groundtruth``); EXIT_NO_GROUNDTRUTH is this code
    4  EXIT_CALIBRATION   no calibration, or one made for another detector configuration, model or world
                          (p-value calibrations, FB-Mem thresholds)
    5  EXIT_OUTPUT_CONFLICT  the output path holds a run of another input or configuration, or a shard set
                          is inconsistent
    6  EXIT_LINES_REJECTED   screening: every good line was scored, but some lines were rejected
    7  EXIT_MODEL         the model cannot be loaded: folder missing or incomplete, weights not safetensors,
                          text-encoder package missing, or an organism version that is not built
                          (``make organism ORGANISM_VERSION=...``)
    8  EXIT_LOCKED        another process holds the run folder or screening output (its pid is named); nothing
                          was written
    9  EXIT_BAD_ROWS      a run folder's per_prompt.csv holds bad rows (file and line named); ``repair=true``
                          moves them aside and regenerates them

Which error class maps to which code: ``bench.run.exit_codes.user_error_code``. This module imports nothing
from the package, so every layer may raise its errors.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_CONFIG = 2
EXIT_INPUT = 3
EXIT_NO_GROUNDTRUTH = EXIT_INPUT
EXIT_CALIBRATION = 4
EXIT_OUTPUT_CONFLICT = 5
EXIT_LINES_REJECTED = 6
EXIT_MODEL = 7
EXIT_LOCKED = 8
EXIT_BAD_ROWS = 9


class ConfigError(ValueError):
    """A config value or option is unusable; the message names the key, the value and the allowed range."""


class PromptFileError(ValueError):
    """A prompt file (or a shipped data file) is missing, malformed or fails its checksum (exit code 3)."""


class GroundTruthError(FileNotFoundError):
    """No measured ground truth for these weights (or one measured on other weights): exit code 3."""
