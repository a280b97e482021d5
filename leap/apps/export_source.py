"""The source of an export (:mod:`leap.apps.export`): which checkpoint of a run, its content and hash,
the student built from it, and how timm rebuilds that student.

``--checkpoint last`` is ``RUN_DIR/checkpoint.pt``; ``best`` is, of ``checkpoint.pt`` and the kept
``checkpoint-stepN.pt``, the one whose ``eval.jsonl`` records score highest (:func:`best_checkpoint`);
anything else is the path of a ``leap distill`` checkpoint. The checkpoint's recipe is untrusted input:
its model arguments are filtered as the evaluation filters them
(:func:`leap.evaluation.features.sanitize_model_kwargs`).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_finite_weights
from ..errors import CheckpointError, ConfigError, InputNotFoundError, LeapError
from ..evaluation.features import sanitize_model_kwargs
from ..evaluation.records import EVAL_LOG, read_records
from ..hub import is_hub_name, model_config
from ..models import _EXTRA_MODELS, build_model  # the leap-only names and their timm base models
from ..runlog import CHECKPOINT_NAME, run_file

__all__ = [
    "ExportError",
    "Source",
    "select_checkpoint",
    "best_checkpoint",
    "read_source",
    "student_recipe",
    "build_student",
    "timm_recipe",
    "sha256_file",
]

#: Protocols that can rank checkpoints for ``--checkpoint best``, best first.
_RANKING = ("linear", "knn", "retrieval")


class ExportError(LeapError, RuntimeError):
    """An export that cannot be done or did not pass its check (nothing was written)."""


@dataclass
class Source:
    """The checkpoint an export reads: where it is, its content and the SHA-256 of those bytes."""

    path: str
    sha256: str
    checkpoint: dict[str, Any]
    run_dir: str | None
    selected: str  # "last", "best" or "path"
    why: str = ""  # for "best": which record chose it


# ----------------------------------------------------------------------------- the source checkpoint


def _kept(run_dir: str) -> list[str]:
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint-step") and n.endswith(".pt"))
    return [os.path.join(run_dir, n) for n in names]


def sha256_file(path: str) -> str:
    """SHA-256 (hex) of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _score(record: dict[str, Any]) -> float | None:
    """The number a record ranks by: the best linear-probe top-1 (best epoch) or kNN top-1 over its
    feature kinds, or the mean retrieval mAP of the medium and hard settings."""
    numbers = record.get("numbers")
    if not isinstance(numbers, dict):
        return None
    if record.get("protocol") == "linear":
        values = [v.get("best_top1") for v in numbers.values() if isinstance(v, dict)]
    elif record.get("protocol") == "knn":
        values = list(numbers.values())
    elif record.get("protocol") == "retrieval":
        maps = [numbers.get(s, {}).get("mAP") for s in ("medium", "hard") if isinstance(numbers.get(s), dict)]
        values = [sum(maps) / len(maps)] if maps and all(isinstance(m, (int, float)) for m in maps) else []
    else:
        return None
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(values) if values else None


def best_checkpoint(run_dir: str) -> tuple[str, str]:
    """``(path, why)``: of the run's checkpoints (``checkpoint.pt`` and the kept ``checkpoint-stepN.pt``),
    the one whose ``eval.jsonl`` records score highest.

    Records are matched to a checkpoint by its SHA-256, and count only when they evaluated the whole
    student (not a ``--block`` cut). The protocol used is the first of linear (best top-1), knn (top-1)
    and retrieval (mean medium/hard mAP) that scores any of them; a tie goes to the later checkpoint.

    Raises:
        ExportError: no ``eval.jsonl`` record scores any checkpoint of the run (the message says how to
            make one, or to use ``last``).
    """
    candidates = [p for p in [run_file(run_dir, CHECKPOINT_NAME), *_kept(run_dir)] if os.path.isfile(p)]
    digests = {sha256_file(p): p for p in candidates}
    records = read_records(run_dir)
    depths: dict[str, Any] = {}
    for protocol in _RANKING:
        scored = []
        for rec in records:
            model = rec.get("model") if isinstance(rec.get("model"), dict) else {}
            path = digests.get(model.get("checkpoint_sha256"))
            score = _score(rec) if rec.get("protocol") == protocol else None
            if path is None or score is None:
                continue
            if path not in depths:
                depths[path] = _student_depth(path)
            if model.get("block") in (None, depths[path]):
                scored.append((score, _step_of(path), path))
        if scored:
            score, _, path = max(scored)
            return path, f"highest {protocol} score in {EVAL_LOG}: {score:.4f}"
    raise ExportError(
        f"--checkpoint best: no record in {run_file(run_dir, EVAL_LOG)} scores a checkpoint of {run_dir} "
        f"(checkpoint.pt or a kept checkpoint-stepN.pt); evaluate one first (e.g. `leap eval knn --model "
        f"{run_dir} --data DATA`), or export --checkpoint last"
    )


def _student_depth(path: str) -> int | None:
    """The student's block count from a checkpoint's ``dims`` (memory-mapped: only that entry is read)."""
    try:
        dims = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("dims") or {}
    except Exception:  # noqa: BLE001 - an unreadable candidate ranks nothing; reading it for export says why
        return None
    return dims.get("student_blocks")


def _step_of(path: str) -> int:
    """The step in a kept checkpoint's name; ``checkpoint.pt`` (the newest) ranks above every kept one."""
    name = os.path.basename(path)
    if name.startswith("checkpoint-step") and name[len("checkpoint-step") : -3].isdigit():
        return int(name[len("checkpoint-step") : -3])
    return 1 << 62


def select_checkpoint(run: str | os.PathLike, checkpoint: str = "last") -> tuple[str, str | None, str, str]:
    """``(path, run_dir, selected, why)`` of the checkpoint to export.

    Args:
        run: a run directory (or a checkpoint file, then ``checkpoint`` must be ``last``).
        checkpoint: ``last`` (``RUN_DIR/checkpoint.pt``), ``best`` (:func:`best_checkpoint`) or a path.

    Raises:
        InputNotFoundError: no such run directory or file, or the run has no checkpoint.
        ExportError: ``best`` without a scoring record.
    """
    run = os.fspath(run)
    if checkpoint not in ("last", "best"):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise InputNotFoundError(f"--checkpoint {path}: no such checkpoint file")
        return path, run if os.path.isdir(run) else None, "path", ""
    if os.path.isfile(run):
        if checkpoint == "best":
            raise ConfigError(f"--checkpoint best needs a run directory, got the file {run}")
        return run, os.path.dirname(os.path.abspath(run)), "path", ""
    if not os.path.isdir(run):
        raise InputNotFoundError(f"{run}: no such run directory")
    if checkpoint == "best":
        path, why = best_checkpoint(run)
        return path, run, "best", why
    path = run_file(run, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise InputNotFoundError(
            f"{run} has no {CHECKPOINT_NAME}: the run wrote no checkpoint yet (train it with `leap distill "
            f"--out {run}`, or give --checkpoint PATH)"
        )
    return path, run, "last", ""


def read_source(path: str, run_dir: str | None, selected: str = "path", why: str = "") -> Source:
    """Read and check a ``leap distill`` checkpoint; the SHA-256 is of the bytes that were loaded.

    Raises:
        CheckpointError: unreadable, not a ``leap distill`` checkpoint, or without student weights.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        raise CheckpointError(
            f"could not read checkpoint {path}: corrupt, truncated, not a PyTorch file or holding Python "
            f"objects ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by `leap distill` (no format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r} is not supported")
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("student"), dict):
        raise CheckpointError(f"{path}: a leap distill checkpoint without config or student weights")
    return Source(path, hashlib.sha256(data).hexdigest(), ckpt, run_dir, selected, why)


# ----------------------------------------------------------------------------- the student and its timm recipe


def student_recipe(source: Source) -> tuple[str, dict[str, Any], int]:
    """``(name, overrides, img_size)`` of the student (the overrides are untrusted input: filtered as the
    evaluation filters them)."""
    cfg, where = source.checkpoint["config"], f"checkpoint {source.path}"
    name = cfg.get("student")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise CheckpointError(f"{where}: no student model name in its config")
    try:
        overrides = sanitize_model_kwargs(cfg.get("student_overrides"), where)
    except LeapError as e:
        raise CheckpointError(str(e)) from None
    size = cfg.get("img_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 8192:
        raise CheckpointError(f"{where}: img_size {size!r} is not an image size")
    return name, overrides, size


def build_student(source: Source) -> nn.Module:
    """The checkpoint's student backbone: built from its recipe, weights loaded strictly, fp32, eval mode.

    Raises:
        CheckpointError: weights that do not fit the recipe, or NaN/Inf weights.
    """
    name, overrides, size = student_recipe(source)
    net = build_model(name, img_size=size, **overrides)
    try:
        net.load_state_dict(source.checkpoint["student"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source.path}: student weights do not fit {name}: {str(e).splitlines()[0]}") from None
    check_finite_weights(net.state_dict(), source.path, "student weights")
    return net.float().eval()


def timm_recipe(student_name: str, overrides: dict[str, Any], img_size: int) -> dict[str, Any]:
    """How timm rebuilds the student: ``{"model_name", "kwargs", "pretrained_cfg_overlay"}``.

    ``model_name`` is a timm registry name (a ``leap`` model such as ``vit_tiny_patch14_dinov2`` becomes its
    timm base model, a Hub name the architecture of its ``config.json``); ``kwargs`` hold the model
    arguments (the base model's, the Hub config's, then the run's overrides), ``num_classes=0`` and
    ``img_size``. ``pretrained_cfg_overlay`` (plus ``file=PATH``) has ``num_classes=0``, so timm keeps its
    ``strict=True`` load whatever classifier the name's pretrained config has.
    """
    base = student_name.partition(".")[0]
    if is_hub_name(student_name):
        model_name, args = model_config(student_name)
        kwargs = {**args, **overrides}
    elif base in _EXTRA_MODELS:
        model_name, extra = _EXTRA_MODELS[base]
        kwargs = {**extra, **overrides}
    else:
        model_name, kwargs = student_name, dict(overrides)
    kwargs.update(num_classes=0, img_size=img_size)
    return {"model_name": model_name, "kwargs": kwargs, "pretrained_cfg_overlay": {"num_classes": 0}}
