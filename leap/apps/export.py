"""``leap export``: a run's student backbone as a file a deployment reads, with a model card beside it.

A ``leap distill`` checkpoint holds the trainer's state (student, projection head, optimizer, curriculum).
:func:`export_run` writes the student backbone only, in one of :data:`FORMATS`:

- ``timm`` (``.pth``, a ``torch.save`` state dict) and ``safetensors``: the state dict that
  ``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH, num_classes=0),
  **KWARGS)`` loads with ``strict=True`` (the card's ``student.timm`` gives NAME and KWARGS: the student's
  timm name, its overrides, ``num_classes=0`` and the image size). Checked right after writing: timm
  loads the file that way and its features equal the student's exactly;
- ``onnx``: :mod:`leap.apps.export_onnx` (dynamo exporter, dynamic batch, checked with onnxruntime).

The model card (``PATH.json``) holds the student's name, overrides and timm recipe, the input size and
normalization, the teacher and its block trajectory, the recipe (the run's configuration), every
``eval.jsonl`` record of the run and the source checkpoint's SHA-256 (of the bytes that were exported).

``checkpoint`` picks the source (:mod:`leap.apps.export_source`): ``last`` (``RUN_DIR/checkpoint.pt``),
``best`` (of ``checkpoint.pt`` and the kept ``checkpoint-stepN.pt``, the one whose ``eval.jsonl`` records
score highest) or the path of a checkpoint file. Every file is written into a temporary folder beside the
destination and renamed into place once complete and checked (:func:`staging`, :func:`publish`): a
failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import vit
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, LeapError, ModelError
from ..evaluation.features import eval_transform
from ..evaluation.records import read_records
from ..runlog import LOG_NAME, load_run, run_file
from .export_source import (
    ExportError,
    Source,
    best_checkpoint,
    build_student,
    read_source,
    select_checkpoint,
    sha256_file,
    student_recipe,
    timm_recipe,
)

__all__ = [
    "FORMATS",
    "CARD_FORMAT",
    "ExportError",
    "ExportResult",
    "Source",
    "select_checkpoint",
    "best_checkpoint",
    "read_source",
    "build_student",
    "timm_recipe",
    "timm_load_call",
    "resolve_out",
    "model_card",
    "card_path",
    "export_run",
]

log = logging.getLogger("leap.export")

#: The export formats and the file suffix each gets by default.
FORMATS = {"timm": ".pth", "safetensors": ".safetensors", "onnx": ".onnx"}
CARD_FORMAT = "leap-model-card"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote and measured: ``path`` (the export), ``card`` (its path) and the
    card's content; ``files`` lists every file written (e.g. the int8 model)."""

    path: str
    card_path: str
    card: dict[str, Any]
    files: list[str] = field(default_factory=list)


def timm_load_call(recipe: dict[str, Any], file: str) -> str:
    """The Python line that loads an exported state dict with timm (for the card and the docs)."""
    overlay = ", ".join(f"{k}={v!r}" for k, v in {"file": file, **recipe["pretrained_cfg_overlay"]}.items())
    kwargs = "".join(f", {k}={v!r}" for k, v in recipe["kwargs"].items())
    head = f"timm.create_model({recipe['model_name']!r}, pretrained=True"
    return f"{head}, pretrained_cfg_overlay=dict({overlay}){kwargs})"


@contextlib.contextmanager
def _quiet_timm() -> Iterator[None]:
    """timm logs every weight load at INFO; the export says what it checked itself."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_timm_load(path: str, recipe: dict[str, Any], student: nn.Module) -> dict[str, Any]:
    """Load ``path`` the way the card says (timm, ``strict=True``) and compare features with the student.

    Raises:
        ExportError: timm cannot load it strictly, or its features differ from the student's.
    """
    import timm

    strict_calls: list[bool] = []
    original = nn.Module.load_state_dict

    def recording(module, state_dict, strict=True, **kw):  # timm's own load, observed
        strict_calls.append(bool(strict))
        return original(module, state_dict, strict=strict, **kw)

    overlay = {**recipe["pretrained_cfg_overlay"], "file": path}
    try:
        with _quiet_timm(), _patched(nn.Module, "load_state_dict", recording):
            loaded = timm.create_model(
                recipe["model_name"], pretrained=True, pretrained_cfg_overlay=overlay, **recipe["kwargs"]
            )
    except Exception as e:  # noqa: BLE001 - timm raises several types; the export must not be left behind
        raise ExportError(f"timm could not load the exported state dict ({type(e).__name__}: {e})") from None
    if not strict_calls or not all(strict_calls):
        raise ExportError(f"timm loaded the exported state dict with strict={strict_calls}, not strictly")
    gen = torch.Generator().manual_seed(0)
    size = recipe["kwargs"]["img_size"]
    x = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        same = torch.equal(loaded.eval().forward_features(x), student.forward_features(x))
    if not same:
        raise ExportError("the model timm loads from the exported state dict gives other features than the student")
    return {"strict": True, "features_equal": True, "inputs": [2, 3, size, size]}


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


# ----------------------------------------------------------------------------- the model card


def _trajectory(source: Source) -> dict[str, Any]:
    """The teacher's target blocks up to the exported step: start, level-ups, final, per-epoch means."""
    ckpt = source.checkpoint
    cur = ckpt.get("curriculum") if isinstance(ckpt.get("curriculum"), dict) else {}
    level_ups = [
        dict(zip(("step", "epoch", "from_block", "to_block", "reason"), e))
        for e in cur.get("level_ups") or []
        if isinstance(e, (list, tuple)) and len(e) == 5
    ]
    totals = ckpt.get("totals") if isinstance(ckpt.get("totals"), dict) else {}
    out: dict[str, Any] = {
        "num_blocks": cur.get("num_blocks"),
        "start_block": totals.get("start_block", level_ups[0]["from_block"] if level_ups else cur.get("block")),
        "final_block": cur.get("block"),
        "level_ups": level_ups,
        "calibration_scores": cur.get("calibration_scores"),
    }
    if source.run_dir and os.path.isfile(run_file(source.run_dir, LOG_NAME)):
        try:
            run = load_run(source.run_dir, require_records=False)
            epochs = [e for e in run.epochs if isinstance(e.get("step"), int) and e["step"] <= ckpt.get("step", 0)]
            out["epoch_mean_blocks"] = [e.get("mean_block") for e in epochs]
        except LeapError:
            pass
    return out


def model_card(source: Source, student: nn.Module, recipe: dict[str, Any], export: dict[str, Any]) -> dict[str, Any]:
    """The JSON model card of an export (see the module docstring); ``export`` is its format part."""
    from leap_kernels import __version__

    cfg = source.checkpoint["config"]
    name, overrides, size = student_recipe(source)
    prefix = vit.num_prefix_tokens(student)
    grid = vit.patch_grid(student)
    return {
        "format": CARD_FORMAT,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "leap_version": __version__,
        "export": export,
        "student": {
            "name": name,
            "overrides": overrides,
            "timm": recipe,
            "embed_dim": int(getattr(student, "embed_dim", 0)),
            "depth": len(vit.blocks(student)),
            "num_prefix_tokens": prefix,
            "patch_grid": list(grid),
            "parameters": sum(p.numel() for p in student.parameters()),
            "features": f"forward_features(images) -> tokens (B, {prefix} + N, D) after the final norm; "
            f"cls = tokens[:, 0], patch = tokens[:, {prefix}:].mean(1) (as `leap eval`)",
        },
        "input": {
            "img_size": size,
            "channels": 3,
            "range": "RGB in [0, 1], then normalized: (x - mean) / std",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "eval_transform": {  # leap eval's, by the kind of images
                "image folders": eval_transform(size)[1],
                "small images (e.g. Fashion-MNIST)": eval_transform(size, small_images=True)[1],
            },
        },
        "teacher": {
            "name": cfg.get("teacher"),
            "overrides": cfg.get("teacher_overrides"),
            "weights": cfg.get("teacher_weights"),
            "trajectory": _trajectory(source),
        },
        "recipe": cfg,
        "resolved": source.checkpoint.get("resolved"),
        "evaluations": read_records(source.run_dir) if source.run_dir else [],
        "source": {
            "run_dir": os.path.abspath(source.run_dir) if source.run_dir else None,
            "checkpoint": os.path.abspath(source.path),
            "checkpoint_sha256": source.sha256,
            "selected": source.selected,
            "why": source.why or None,
            "step": source.checkpoint.get("step"),
            "epoch": source.checkpoint.get("epoch"),
        },
    }


def card_path(out: str) -> str:
    """The model card of an export: ``OUT.json`` beside it."""
    return out + ".json"


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def staging(out: str) -> Iterator[str]:
    """A temporary folder beside ``out`` (same filesystem: the final renames are atomic), removed with
    whatever is left in it when the block ends, also on an error."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: list[tuple[str, str]]) -> None:
    """Rename each complete, checked ``(temp, final)`` file into place (the card last), readable as a file
    the process created is (some writers create theirs private)."""
    umask = os.umask(0)
    os.umask(umask)
    for tmp, final in staged:
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)


def _file_info(path: str, name: str) -> dict[str, Any]:
    return {"file": name, "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def _write_state_dict(student: nn.Module, path: str, fmt: str, card_json: str) -> None:
    state = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ModuleNotFoundError:  # the train extra has it; say so in the leap way
            from ..errors import MissingDependencyError

            raise MissingDependencyError(
                '--format safetensors needs the safetensors package: pip install "leap-kernels[train]"'
            ) from None
        save_file(state, path, metadata={"format": "pt", "leap_model_card": card_json})
    else:
        torch.save(state, path)


def resolve_out(out: str | os.PathLike, fmt: str) -> str:
    """The export's path: ``out``, or ``out/student.EXT`` for a folder; the suffix must fit the format.

    Raises:
        ConfigError: an unknown format, or a suffix timm would read in another format.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    out = os.fspath(out)
    if not out:
        raise ConfigError("--out: a file path is required")
    if os.path.isdir(out) or out.endswith(os.sep):
        out = os.path.join(out, "student" + FORMATS[fmt])
    suffix = os.path.splitext(out)[1].lower()
    if fmt == "safetensors" and suffix != ".safetensors":
        raise ConfigError(f"--out {out}: a safetensors export must end in .safetensors (timm reads it by the suffix)")
    if fmt == "timm" and suffix == ".safetensors":
        raise ConfigError(f"--out {out}: timm reads a .safetensors file as safetensors: use --format safetensors")
    if fmt == "onnx" and suffix != ".onnx":
        raise ConfigError(f"--out {out}: an ONNX export must end in .onnx")
    return out


def export_run(
    run: str | os.PathLike,
    format: str,
    out: str | os.PathLike,
    *,
    checkpoint: str = "last",
    int8: bool = False,
    eval_data: str | None = None,
    eval_data_source: str = "auto",
    eval_limit: int | None = None,
    verify_batches: tuple[int, ...] = (1, 3),
) -> ExportResult:
    """Export a run's student backbone (see the module docstring).

    Args:
        run: a run directory (or a ``leap distill`` checkpoint file).
        format: ``timm``, ``safetensors`` or ``onnx``.
        out: the file to write (a folder: ``out/student.pth|.safetensors|.onnx``); the card is ``out.json``.
        checkpoint: ``last``, ``best`` or a checkpoint path (:func:`select_checkpoint`).
        int8: ONNX only: also write ``OUT-stem.int8.onnx`` (onnxruntime dynamic quantization).
        eval_data, eval_data_source, eval_limit: ONNX ``int8`` only: a labelled set (as for ``leap eval
            knn``) on which the kNN top-1 of the fp32 student and of the int8 model are compared;
            ``eval_limit`` caps the images of each split.
        verify_batches: the batch sizes of the ONNX check (two sizes show the batch is dynamic).

    Returns:
        :class:`ExportResult`.

    Raises:
        ConfigError: bad options; InputNotFoundError: no run or checkpoint; CheckpointError: a bad
        checkpoint; MissingDependencyError: the ``export`` extra is missing (ONNX); ExportError: the
        check after writing failed (nothing was written).
    """
    out = resolve_out(out, format)
    if format != "onnx" and (int8 or eval_data is not None):
        raise ConfigError("--int8 and --eval-data apply to --format onnx only")
    if eval_data is not None and not int8:
        raise ConfigError("--eval-data measures the int8 model: add --int8")
    if format == "onnx":
        from .export_onnx import require_onnx

        require_onnx(int8=int8)  # before any work
    path, run_dir, selected, why = select_checkpoint(run, checkpoint)
    source = read_source(path, run_dir, selected, why)
    student = build_student(source)
    name, overrides, size = student_recipe(source)
    try:
        recipe = timm_recipe(name, overrides, size)
    except ModelError as e:
        raise ExportError(f"no timm recipe for the student {name!r}: {e}") from None
    card_file = card_path(out)
    with staging(out) as tmp:
        staged_out = os.path.join(tmp, os.path.basename(out))
        if format == "onnx":
            from .export_onnx import export_onnx_files

            export, extra = export_onnx_files(
                student,
                staged_out,
                size,
                int8=int8,
                eval_data=eval_data,
                eval_data_source=eval_data_source,
                eval_limit=eval_limit,
                verify_batches=verify_batches,
            )
        else:
            export = {"format": format, "load": timm_load_call(recipe, os.path.basename(out))}
            extra = []
            # The card rides in the safetensors header too; it is written before the file's own hash exists.
            preview = model_card(source, student, recipe, dict(export))
            _write_state_dict(student, staged_out, format, json.dumps(preview, allow_nan=False))
            export["check"] = _check_timm_load(staged_out, recipe, student)
        export.update(_file_info(staged_out, os.path.basename(out)))
        card = model_card(source, student, recipe, export)
        staged_card = os.path.join(tmp, os.path.basename(card_file))
        with open(staged_card, "w", encoding="utf-8") as f:
            json.dump(card, f, indent=2, allow_nan=False)
            f.write("\n")
        moves = [(os.path.join(tmp, os.path.basename(p)), os.path.join(os.path.dirname(out) or ".", p)) for p in extra]
        publish([*moves, (staged_out, out), (staged_card, card_file)])
    written = [out, *(os.path.join(os.path.dirname(out) or ".", p) for p in extra), card_file]
    log.info("exported %s (%s) and its model card %s", out, format, card_file)
    return ExportResult(out, card_file, card, written)
