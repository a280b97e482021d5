"""What every evaluation protocol does alike (:mod:`.run`, :mod:`.robustness`, :mod:`.segmentation`):
open the feature cache, load the model, check the record's directory before any work (:func:`begin`),
make and append the record (:meth:`Evaluation.write`), and list a run's checkpoints for ``--all-checkpoints``."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ..errors import LeapError
from ..run.resume import epoch_checkpoints
from ..runlog import CHECKPOINT_NAME, check_writable_dir
from . import records
from .cache import FeatureCache, default_cache_dir
from .errors import EvaluationError
from .features import LoadedModel, load_model

__all__ = [
    "Evaluation",
    "begin",
    "feature_kinds",
    "open_cache",
    "writable",
    "check_record_dir",
    "finish",
    "load",
    "run_checkpoints",
]

_KINDS = {"cls": ("cls",), "patch": ("patch",), "both": ("cls", "patch")}


def feature_kinds(features: str) -> tuple[str, ...]:
    """``cls`` | ``patch`` | ``both`` -> the feature kinds to evaluate."""
    if features not in _KINDS:
        raise EvaluationError(f"--features: expected cls, patch or both, got {features!r}")
    return _KINDS[features]


def open_cache(cache_dir: str | None, no_cache: bool) -> FeatureCache:
    """The feature cache (``FeatureCache(None)`` with ``no_cache``), its directory checked for writability."""
    if no_cache:
        return FeatureCache(None)
    directory = cache_dir or default_cache_dir()
    where = "LEAP_CACHE_DIR" if not cache_dir and os.environ.get("LEAP_CACHE_DIR") else "--cache-dir"
    writable(directory, where + " (or --no-cache)")
    return FeatureCache(directory)


def writable(directory: str, what: str) -> None:
    """Refuse an unwritable directory before the evaluation runs (not after it)."""
    try:
        check_writable_dir(directory, what)
    except LeapError as e:
        raise EvaluationError(str(e)) from None


def check_record_dir(loaded: LoadedModel, run_dir: str | None, write: bool) -> None:
    """The run directory the record goes to must be writable: checked before the features are extracted."""
    if write and (run_dir or loaded.run_dir):
        writable(run_dir or loaded.run_dir, "--run-dir (or --no-record)")


def finish(record: dict[str, Any], loaded: LoadedModel, run_dir: str | None, write: bool) -> dict[str, Any]:
    """Append ``record`` to the run's ``eval.jsonl`` (when there is one and ``write``); the record with ``log``."""
    target = run_dir or loaded.run_dir
    log = records.append_record(target, record) if (write and target) else None
    return {**record, "log": log}


def load(model_options: dict[str, Any], cache_dir: str | None, **extra) -> LoadedModel:
    """:func:`leap.evaluation.features.load_model` with the cache directory for the checkpoint hashes."""
    return load_model(**model_options, cache_dir=cache_dir, **extra)


@dataclasses.dataclass
class Evaluation:
    """One protocol's evaluation under way (:func:`begin`): the model, the feature cache, where the record
    goes and when the evaluation started."""

    loaded: LoadedModel
    cache: FeatureCache
    run_dir: str | None
    write_record: bool
    start: float
    hits_before: int  # the cache's hits when the evaluation started

    def extraction(self, batch_size: int, workers: int, device: str, precision: str, progress: bool) -> dict[str, Any]:
        """The keyword arguments of an extraction pass but the data's (``dataset_id``, ``transform_id``)."""
        return {
            "batch_size": batch_size,
            "workers": workers,
            "device": device,
            "precision": precision,
            "cache": self.cache,
            "progress": progress,
        }

    @property
    def cache_hits(self) -> int:
        """The feature-cache hits of this evaluation."""
        return self.cache.hits - self.hits_before

    def write(self, protocol: str, *, data: dict, settings: dict, numbers: Any, **extra: Any) -> dict[str, Any]:
        """Make the record (:func:`leap.evaluation.records.make_record`, then ``extra`` fields) and append it
        to the run's ``eval.jsonl`` (:func:`finish`); the record with ``log``."""
        record = records.make_record(
            protocol,
            model=self.loaded.record_info(),
            data=data,
            settings=settings,
            numbers=numbers,
            elapsed_s=time.time() - self.start,
        )
        record.update(extra)
        return finish(record, self.loaded, self.run_dir, self.write_record)


def begin(
    model_options: dict[str, Any],
    cache_dir: str | None,
    no_cache: bool,
    run_dir: str | None,
    write_record: bool,
    start: float | None = None,
    **load_extra: Any,
) -> Evaluation:
    """Start an evaluation: open the feature cache (:func:`open_cache`), load the model (:func:`load`, with
    ``load_extra``) and check the record's directory (:func:`check_record_dir`), before any other work.
    ``start``: when the evaluation started (default: now)."""
    start = time.time() if start is None else start
    cache = open_cache(cache_dir, no_cache)
    loaded = load(model_options, cache.directory, **load_extra)
    check_record_dir(loaded, run_dir, write_record)
    return Evaluation(loaded, cache, run_dir, write_record, start, cache.hits)


def run_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints of a ``leap distill`` run to evaluate one by one (``--all-checkpoints``), oldest first:
    the kept per-epoch ``checkpoint-epochE.pt`` by epoch, then ``checkpoint.pt`` unless it is the same file
    as the last of them (they are hard links until the next write).

    Raises:
        EvaluationError: ``run_dir`` is not a run directory, or holds no checkpoint.
    """
    if not os.path.isdir(run_dir):
        raise EvaluationError(f"--all-checkpoints: expected --model RUN_DIR (a run directory), got {run_dir!r}")
    paths = [p for _, p in epoch_checkpoints(run_dir)]
    last = os.path.join(run_dir, CHECKPOINT_NAME)
    if os.path.isfile(last) and not (paths and os.path.samefile(paths[-1], last)):
        paths.append(last)
    if not paths:
        raise EvaluationError(
            f"--all-checkpoints: {run_dir} holds no checkpoint-epochE.pt nor checkpoint.pt "
            "(train with --save-every-epochs N to keep one per epoch)"
        )
    return paths
