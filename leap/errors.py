"""The exception types of the ``leap`` package.

:class:`LeapError` marks an error the user can fix (bad options, missing or unreadable
files, unknown model names, incompatible checkpoints, a missing optional dependency):
the ``leap`` command prints its message on one line and exits with status 2.
:class:`TrainingError` is a run that started but cannot continue (a NaN loss): one line,
exit status 1. Any other exception is a defect: the command lets it propagate, so the
traceback is printed (exit status 1).

Each type also derives from the matching built-in exception (``ValueError``,
``FileNotFoundError``, ...), so code that catches those keeps working.

The exit codes of the ``leap`` command are defined here, once: :data:`EXIT_OK`,
:data:`EXIT_FAILURE`, :data:`EXIT_USAGE`, :data:`EXIT_INTERRUPTED`; an error's ``exit_code``
is one of them.

This module imports nothing else from ``leap``; every module may import it.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "LeapError",
    "ConfigError",
    "InputNotFoundError",
    "DataError",
    "ModelError",
    "CheckpointError",
    "RunLogError",
    "MissingDependencyError",
    "RunDirError",
    "TrainingError",
    "NonFiniteLossError",
    "RunInterrupted",
]

#: Exit status: success (``--help`` included).
EXIT_OK = 0
#: Exit status: a training failure (one line) or a defect (the traceback is printed).
EXIT_FAILURE = 1
#: Exit status: bad input (options, files, data, models, checkpoints, a missing optional dependency).
EXIT_USAGE = 2
#: Exit status: interrupted by Ctrl-C (SIGINT) outside a training run, ``128 + 2`` as shells do.
EXIT_INTERRUPTED = 130
#: Base of a run stopped by a signal: ``128 + signal number`` (:class:`RunInterrupted`).
_EXIT_SIGNAL_BASE = 128


class LeapError(Exception):
    """Base of the errors caused by the user's input (exit status 2 in the ``leap`` command)."""

    exit_code = EXIT_USAGE


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


class RunDirError(LeapError, OSError):
    """A file could not be written (a full disk or quota, a file-size limit, a read-only file system,
    missing permissions): the message names the file, the reason and the free space. Exit status 1:
    the input was fine, the machine was not."""

    exit_code = EXIT_FAILURE


class TrainingError(LeapError, RuntimeError):
    """Training started but cannot continue (the message says why and what to do)."""

    exit_code = EXIT_FAILURE


class NonFiniteLossError(TrainingError):
    """The loss (or the gradients / weights) became NaN or Inf."""


class RunInterrupted(TrainingError):
    """The run stopped on SIGTERM/SIGINT after writing a checkpoint; ``exit_code`` is
    ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), the shell's convention."""

    def __init__(self, message: str, exit_code: int = _EXIT_SIGNAL_BASE + 15):
        super().__init__(message)
        self.exit_code = exit_code

    @staticmethod
    def exit_code_of(signum: int) -> int:
        """``128 + signum``: the exit status of a run stopped by signal ``signum``."""
        return _EXIT_SIGNAL_BASE + int(signum)
