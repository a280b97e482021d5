"""The error type of :mod:`leap.evaluation`."""

from __future__ import annotations

from ..errors import LeapError

__all__ = ["EvaluationError", "LeapError"]


class EvaluationError(LeapError, ValueError):
    """Bad input to an evaluation (options, model, data, ground truth), with a one-line message.

    A :class:`ValueError`, so callers that catch that keep working; the ``leap`` command prints
    the message and exits with status 2.
    """
