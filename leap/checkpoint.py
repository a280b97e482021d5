"""Training checkpoints: atomic writes, validated loads, RNG state capture, resume checks.

A LEAP training checkpoint is one ``torch.save`` file holding a dict::

    {
      "format": "leap-train-checkpoint", "version": 1,
      "student": state_dict, "head": state_dict,
      "optimizer": state_dict, "scheduler": state_dict, "scaler": state_dict | None,
      "curriculum": Curriculum.state_dict(),
      "rng": [per-rank RNG state, ...],          # see capture_rng_state
      "epoch": int,          # epoch in progress (0-based)
      "step": int,           # optimizer steps done in total
      "step_in_epoch": int,  # batches of `epoch` already trained on
      "config": TrainConfig.to_dict(),
      "resolved": {...},     # derived values: world size, peak lr, steps per epoch, ...
      "dims": {...},         # model dimensions, checked on resume
      "epoch_stats": {...},  # counters of the epoch in progress
      "totals": {...},       # running counters for the summary
      "flops": {...},        # TeacherFlopsTracker state
    }

:func:`build_checkpoint` builds this dict and :func:`restore_modules` loads its module
states back; the trainer restores the positions and counters. Everything in it is
loadable with ``torch.load(weights_only=True)`` (tensors and plain Python types), so a
resume never unpickles arbitrary objects.

A ``leap train-teacher`` checkpoint (:mod:`leap.apps.pretrain`) is told apart by its
:data:`TEACHER_META_KEY` entry (the model recipe and accuracy).
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, InputNotFoundError
from .runlog import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TEACHER_META_KEY",
    "STRICT_RESUME_KEYS",
    "atomic_save",
    "read_torch_file",
    "check_finite_weights",
    "check_float_weights",
    "load_checkpoint",
    "validate_checkpoint",
    "state_tensors",
    "build_checkpoint",
    "restore_modules",
    "all_finite",
    "capture_rng_state",
    "restore_rng_state",
    "check_resume_compatible",
]

CHECKPOINT_FORMAT = "leap-train-checkpoint"
CHECKPOINT_VERSION = 1
#: The key of a ``leap train-teacher`` checkpoint holding its recipe (model, overrides, img size).
TEACHER_META_KEY = "leap_teacher"

_REQUIRED_KEYS = (
    "student",
    "head",
    "optimizer",
    "scheduler",
    "curriculum",
    "epoch",
    "step",
    "step_in_epoch",
    "config",
    "dims",
)

#: Config keys that must match to resume: they change the models, the loss, the optimizer
#: state layout or the meaning of "batches done in this epoch".
STRICT_RESUME_KEYS = (
    "teacher",
    "student",
    "teacher_overrides",
    "student_overrides",
    "img_size",
    "loss",
    "curriculum",
    "optimizer",
    "batch_size",
)

#: Config keys that may differ on resume without comment (they do not affect the result,
#: or are expected to change: --resume itself, --max-steps, ...).
_SILENT_KEYS = (
    "resume",
    "max_steps",
    "progress",
    "workers",
    "out",
    "device",
    "ckpt_every",
    "keep_checkpoints",
    "divergence_factor",
    "log_every",
    "save_every_epochs",
    "tensorboard",
)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`leap.runlog.atomic_write`: a crash mid-write leaves the
    previous file at ``path`` intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    ``weights_only`` means a file never unpickles arbitrary objects.

    Raises:
        InputNotFoundError: no file at ``path`` (the message starts with ``what``).
        CheckpointError: a corrupt or truncated file, or one holding arbitrary Python objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's warnings about pickle protocols: the verdict below is ours
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on bad files
        text = str(e)
        # torch's wording differs between versions ("Unsupported global: GLOBAL x.y was not an allowed
        # global", "Trying to load unsupported GLOBAL x.y whose module x is blocked"); only the one
        # line of the verdict is shown, never torch's multi-line advice to disable weights_only.
        found = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
        if found:  # a valid pickle, but of arbitrary Python objects
            why = (
                f"refused: it holds Python objects (e.g. {found.group(1)}), not only tensors and plain values; "
                "it was not written by leap and may be malicious: do not load it elsewhere unless you trust "
                "its source"
            )
        elif "weights only load failed" in text.lower() and _starts_like_pickle(path):  # refused by the safe unpickler
            why = (
                "refused: it is a raw Python pickle (not written by torch.save), which can hold Python objects; leap "
                "reads only torch.save files of tensors and plain values (where you trust the file, re-save it with "
                "torch.save(state_dict, path))"
            )
        else:
            why = "the file is corrupt, truncated or not a PyTorch checkpoint (write it again, or check the path)"
        raise CheckpointError(f"could not read {what} {path}: {why} ({type(e).__name__})") from None


def _starts_like_pickle(path: str) -> bool:
    """True if the file begins as a pickle of protocol 2 or later (``torch.save`` writes a zip archive)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def check_finite_weights(state: dict[str, Any], path: str | os.PathLike, what: str = "weights") -> None:
    """Refuse a state dict holding NaN/Inf (e.g. a teacher saved after a diverged run).

    Raises:
        CheckpointError: names the file, how many tensors are affected and one of them.
    """
    bad = [
        k
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CheckpointError(
            f"{what} {os.fspath(path)}: {len(bad)} of {len(state)} tensors hold NaN/Inf (e.g. {bad[0]!r}); the file "
            "comes from a diverged run: retrain it (e.g. with a lower --lr)"
        )


def check_float_weights(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a state dict whose tensors are integers (e.g. int8) where the model's are floating point:
    ``load_state_dict`` would cast them silently into garbage weights.

    Raises:
        CheckpointError: names the file, the dtype, how many tensors and one of them.
    """
    bad = [
        k
        for k, v in expected.items()
        if k in state and isinstance(v, torch.Tensor) and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if bad:
        raise CheckpointError(
            f"teacher checkpoint {os.fspath(path)}: {len(bad)} weight tensor(s) are {state[bad[0]].dtype}, not "
            f"floating point (e.g. {bad[0]!r}): a quantized checkpoint in no format leap reads; give the float weights "
            "(fp32/bf16/fp16; --teacher-precision fp8 quantizes them itself)"
        )


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load (on the CPU) and validate a LEAP training checkpoint.

    Raises:
        InputNotFoundError: no file at ``path``.
        CheckpointError: unreadable/corrupt file, or a file that is not a LEAP training
            checkpoint (e.g. teacher weights, which go to ``--teacher-weights``).
    """
    path = os.fspath(path)
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a LEAP training checkpoint (no format={CHECKPOINT_FORMAT!r} entry; found "
            f"{found}). To start from teacher weights use --teacher-weights; --resume takes a "
            f"checkpoint.pt written by `leap distill`"
        )
    version = ckpt.get("version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {version!r} is not supported (this leap reads version {CHECKPOINT_VERSION})"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    validate_checkpoint(ckpt, path)
    return ckpt


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def state_tensors(tree: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor in nested dicts/lists (a state dict, an optimizer state)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from state_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from state_tensors(v, f"{prefix}[{i}]")


def validate_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Check the type and range of every field of a LEAP training checkpoint, and that its weights
    and optimizer state are finite: a tampered or damaged file is refused with one line, before
    anything is restored from it.

    Raises:
        CheckpointError: ``PATH: FIELD ... (expected ..., got ...)``.
    """
    path = os.fspath(path)

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is damaged or was not written by leap distill")

    for key in ("student", "head", "optimizer", "scheduler", "curriculum", "config", "dims"):
        if not isinstance(ckpt.get(key), dict):
            raise refuse(f"{key!r} is {type(ckpt.get(key)).__name__}, expected a dict")
    for key in ("block_heads", "resolved", "flops", "epoch_stats", "totals"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise refuse(f"{key!r} is {type(ckpt[key]).__name__}, expected a dict")
    if ckpt.get("scaler") is not None and not isinstance(ckpt["scaler"], dict):
        raise refuse(f"'scaler' is {type(ckpt['scaler']).__name__}, expected a dict or None")
    for key in ("epoch", "step", "step_in_epoch"):
        if not (_is_int(ckpt[key]) and ckpt[key] >= 0):
            raise refuse(f"{key!r} is {ckpt[key]!r}, expected an integer >= 0")
    epochs = ckpt["config"].get("epochs")
    if _is_int(epochs) and ckpt["epoch"] > epochs:
        raise refuse(f"'epoch' is {ckpt['epoch']}, beyond the run's {epochs} epochs")
    per_epoch = (ckpt.get("resolved") or {}).get("steps_per_epoch")
    if _is_int(per_epoch) and ckpt["step_in_epoch"] > per_epoch:
        raise refuse(f"'step_in_epoch' is {ckpt['step_in_epoch']}, beyond the {per_epoch} steps of an epoch")
    if ckpt["step_in_epoch"] > ckpt["step"]:
        raise refuse(f"'step_in_epoch' {ckpt['step_in_epoch']} is larger than 'step' {ckpt['step']}")
    sched = ckpt["scheduler"]
    restart = sched.get("restart_step")
    if not (_is_int(sched.get("last_step")) and sched["last_step"] >= 0) or not (
        restart is None or (_is_int(restart) and restart >= 0)
    ):
        raise refuse(f"'scheduler' holds {sched!r}, expected last_step and restart_step as integers >= 0")
    rng = ckpt.get("rng")
    if rng is not None and not (isinstance(rng, list) and all(isinstance(r, dict) for r in rng)):
        raise refuse(f"'rng' is {type(rng).__name__}, expected a list of per-rank RNG states")
    for key in ("epoch_stats", "totals"):
        for name, value in (ckpt.get(key) or {}).items():
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            ok = ok or (isinstance(value, list) and all(_is_int(v) for v in value))
            if not ok:
                raise refuse(f"{key}.{name} is {value!r}, expected a number")
    for key in ("student", "head", "block_heads", "optimizer"):
        bad = [
            name
            for name, t in state_tensors(ckpt.get(key))
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise CheckpointError(
                f"{path}: {len(bad)} tensor(s) of the {key} hold NaN/Inf (e.g. {bad[0]!r}): the run had diverged when "
                "it was written; resume from an earlier checkpoint (checkpoint-stepN.pt) with a lower --lr"
            )


def build_checkpoint(
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    curriculum: Any,
    rng: list[dict[str, Any]],
    epoch: int,
    step: int,
    step_in_epoch: int,
    stats: dict[str, dict[str, Any]],
    flops: dict[str, Any],
    config: dict[str, Any],
    resolved: dict[str, Any],
    dims: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict of the layout above, from the trainer's parts.

    ``module`` is the :class:`leap.objective.DistillModule` (``.student``, ``.head``);
    ``stats`` is ``RunStats.state_dict()`` (``epoch_stats`` and ``totals``).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "student": module.student.state_dict(),
        "head": module.head.state_dict(),
        # --curriculum one-to-one: the projectors of the other student blocks.
        **({"block_heads": module.block_heads.state_dict()} if hasattr(module, "block_heads") else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "curriculum": curriculum.state_dict(),
        "rng": rng,
        "epoch": epoch,
        "step": step,
        "step_in_epoch": step_in_epoch,
        **stats,
        "flops": flops,
        "config": config,
        "resolved": dict(resolved),
        "dims": dict(dims),
    }


def restore_modules(
    path: str,
    ckpt: dict[str, Any],
    *,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    curriculum: Any,
) -> None:
    """Load the student, head, optimizer, grad scaler and curriculum states of ``ckpt``.

    Raises:
        CheckpointError: a state that does not fit (names ``path`` and the reason).
    """
    try:
        module.student.load_state_dict(ckpt["student"])
        module.head.load_state_dict(ckpt["head"])
        if hasattr(module, "block_heads"):
            module.block_heads.load_state_dict(ckpt["block_heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        with warnings.catch_warnings():
            # A changed --tau/--alpha/...: the trainer names every changed setting in one line already.
            warnings.filterwarnings("ignore", message="Curriculum.load_state_dict: config differs")
            curriculum.load_state_dict(ckpt["curriculum"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[:3]) or type(e).__name__
        raise CheckpointError(f"cannot resume from {path}: {why}") from None


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every floating tensor is free of NaN/Inf (one host sync in total)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    if not flags:
        return True
    return bool(torch.stack(flags).all().item())


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """RNG states of this process: python, numpy, torch CPU, CUDA (all devices) and ``generators``.

    The numpy state is stored as plain ints so the checkpoint stays ``weights_only``-loadable.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only if the device count matches)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"checkpoint holds CUDA RNG states for {len(cuda)} device(s) but "
                f"{torch.cuda.device_count()} are visible; CUDA RNG not restored",
                stacklevel=2,
            )
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name in saved:
            g.set_state(saved[name])


# --------------------------------------------------------------------------------------
# Resume compatibility
# --------------------------------------------------------------------------------------


def check_resume_compatible(
    path: str, saved_config: dict[str, Any], config: dict[str, Any], saved_dims: dict[str, Any], dims: dict[str, Any]
) -> list[str]:
    """Compare a checkpoint's config/dims with the current run.

    Raises:
        CheckpointError: a strict key (:data:`STRICT_RESUME_KEYS`) or a model dimension
            differs; the message lists every differing key as ``key: checkpoint X, now Y``.

    Returns:
        The other config keys that differ (the caller warns about them).
    """
    diffs = [
        f"{k}: checkpoint {saved_config.get(k)!r}, now {config.get(k)!r}"
        for k in STRICT_RESUME_KEYS
        if saved_config.get(k) != config.get(k)
    ]
    diffs += [
        f"{k}: checkpoint {saved_dims.get(k)!r}, now {dims.get(k)!r}"
        for k in sorted(set(saved_dims) | set(dims))
        if saved_dims.get(k) != dims.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the run configuration is incompatible with the checkpoint:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the same settings, or start a new run in another --out directory."
        )
    return [
        k
        for k in sorted(set(saved_config) | set(config))
        if k not in STRICT_RESUME_KEYS and k not in _SILENT_KEYS and saved_config.get(k) != config.get(k)
    ]
