"""The exception types of the ``leap`` package.

:class:`LeapError` marks an error the user can fix (bad options, missing or unreadable
files, unknown model names, incompatible checkpoints, a missing optional dependency):
the ``leap`` command prints its message on one line and exits with status 2.
:class:`TrainingError` is a run that started but cannot continue (a NaN loss): one line,
exit status 1. Any other exception is a defect: the command lets it propagate, so the
traceback is printed (exit status 1).

Each type also derives from the matching built-in exception (``ValueError``,
``FileNotFoundError``, ...), so code that catches those keeps working.

This module imports nothing else from ``leap``; every module may import it.
"""

from __future__ import annotations

__all__ = [
    "LeapError",
    "ConfigError",
    "InputNotFoundError",
    "DataError",
    "ModelError",
    "CheckpointError",
    "RunLogError",
    "MissingDependencyError",
    "TrainingError",
    "NonFiniteLossError",
    "RunInterrupted",
]


class LeapError(Exception):
    """Base of the errors caused by the user's input (exit status 2 in the ``leap`` command)."""

    exit_code = 2


class ConfigError(LeapError, ValueError):
    """An invalid option value, config file or config key."""


class InputNotFoundError(LeapError, FileNotFoundError):
    """A file or folder named by the user does not exist (data, weights, run directory, ...)."""


class DataError(LeapError, ValueError):
    """A data source that cannot be read: an empty folder, a malformed IDX file, undecodable images."""


class ModelError(LeapError, ValueError):
    """A model that cannot be built or paired: unknown name, bad arguments, mismatched patch grids."""


class CheckpointError(LeapError, RuntimeError):
    """A checkpoint could not be read, or does not fit the model or the run."""


class RunLogError(LeapError, ValueError):
    """A run directory's records cannot be used (e.g. a log without step or epoch records)."""


class MissingDependencyError(LeapError, ImportError):
    """An optional dependency of the trainer is not installed (the message names the extra)."""


class TrainingError(LeapError, RuntimeError):
    """Training started but cannot continue (the message says why and what to do)."""

    exit_code = 1


class NonFiniteLossError(TrainingError):
    """The loss (or the gradients / weights) became NaN or Inf."""


class RunInterrupted(TrainingError):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; ``exit_code`` is
    ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), the shell's convention."""

    def __init__(self, message: str, exit_code: int = 143):
        super().__init__(message)
        self.exit_code = exit_code
