"""Which user error ends a ``diffmem`` command with which exit code (the codes: ``bench/errors.py``)."""
from __future__ import annotations

from bench.errors import (EXIT_BAD_ROWS, EXIT_CALIBRATION, EXIT_CONFIG, EXIT_INPUT, EXIT_LOCKED, EXIT_MODEL,
                          EXIT_OUTPUT_CONFLICT, ConfigError, GroundTruthError, PromptFileError)


def user_error_code(err: BaseException) -> int | None:
    """The exit code of a user error, or None for anything else (a bug: keep the traceback)."""
    from hydra.errors import InstantiationException

    from bench.measure.calibration import CalibrationError
    from bench.run.explain import ExplainInputError
    from bench.measure.fbmem import FBMemThresholdError
    from bench.run.io import RunLockedError
    from bench.run.merge import ShardSetError
    from bench.core.model import ModelLoadError, PromptError
    from bench.run.rows import CorruptRowsError
    from bench.run.screen import OutputConflictError

    table = [(ConfigError, EXIT_CONFIG), (InstantiationException, EXIT_CONFIG), (ModelLoadError, EXIT_MODEL), (GroundTruthError, EXIT_INPUT),
             (PromptFileError, EXIT_INPUT), (PromptError, EXIT_INPUT), (ExplainInputError, EXIT_INPUT),
             (CalibrationError, EXIT_CALIBRATION), (FBMemThresholdError, EXIT_CALIBRATION),
             (OutputConflictError, EXIT_OUTPUT_CONFLICT), (ShardSetError, EXIT_OUTPUT_CONFLICT),
             (RunLockedError, EXIT_LOCKED), (CorruptRowsError, EXIT_BAD_ROWS)]
    for cls, code in table:          # ModelLoadError before GroundTruthError: both are FileNotFoundErrors
        if isinstance(err, cls):
            return code
    return None
