"""The tiny runs of the trainer tests: a random ViT teacher (width 48) and student (2 blocks, width 32), 28 px
images with patch 7 (a 4 x 4 grid), synthetic data; as ``TrainConfig`` keyword arguments, a ``TrainConfig``
or ``leap distill`` command-line options. Tests that differ from these pass their own values."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

MODEL = "vit_small_patch14_dinov2"
TEACHER_DEPTH = 4  # the default teacher depth of the tiny runs
STUDENT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 7}


def teacher_overrides(depth: int = TEACHER_DEPTH) -> dict[str, Any]:
    """The tiny teacher's shape: ``depth`` blocks of width 48 (3 heads), patch 7."""
    return {"depth": depth, "embed_dim": 48, "num_heads": 3, "patch_size": 7}


TEACHER = teacher_overrides()


def tiny_models(teacher_depth: int = TEACHER_DEPTH) -> dict[str, Any]:
    """The tiny teacher and student at 28 px, as ``TrainConfig`` keyword arguments."""
    return dict(
        teacher=MODEL,
        student=MODEL,
        teacher_overrides=teacher_overrides(teacher_depth),
        student_overrides=dict(STUDENT),
        img_size=28,
    )


def tiny_options(*, teacher_depth: int = TEACHER_DEPTH, **kw: Any) -> dict[str, Any]:
    """:func:`tiny_models` with 16 synthetic images, batch 4 (4 steps per epoch), one epoch, no worker
    processes, no progress bar, half an epoch of warmup; ``kw`` adds or replaces options."""
    return {
        **tiny_models(teacher_depth),
        "data_source": "synthetic",
        "synthetic_size": 16,
        "batch_size": 4,
        "epochs": 1,
        "workers": 0,
        "progress": False,
        "warmup_epochs": 0.5,
        **kw,
    }


def tiny_config(out, **kw: Any):
    """The ``TrainConfig`` of :func:`tiny_options` writing to ``out``, checkpointing only at epoch ends."""
    from leap.config import TrainConfig  # imported on use: DDP workers set their environment first

    return TrainConfig(**tiny_options(**{"out": str(out), "ckpt_every": 0, **kw}))


def as_argv(**options: Any) -> list[str]:
    """``leap distill`` options of ``TrainConfig`` keyword arguments: ``--name value`` (a dict as JSON),
    ``--name`` for ``True``, ``--no-name`` for ``False``."""
    argv = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def tiny_argv(*, teacher_depth: int = TEACHER_DEPTH, batch_size: int = 4, **kw: Any) -> list[str]:
    """``leap distill`` options of the tiny models with ``--batch-size``, no worker processes and no progress
    bar, then ``kw`` (:func:`as_argv`)."""
    return as_argv(**tiny_models(teacher_depth), batch_size=batch_size, workers=0, progress=False, **kw)


def read_log(run_dir) -> list[dict]:
    """The records of ``run_dir/log.jsonl``."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def records(log: list[dict], kind: str) -> list[dict]:
    """The records of one ``type`` of a log."""
    return [r for r in log if r["type"] == kind]


@contextlib.contextmanager
def fast_cpu() -> Iterator[None]:
    """One torch CPU thread and the torch backend of leap_kernels, for a module-scoped fixture's tiny run (the
    tests' function-scoped ``one_thread`` and ``_fast_cpu`` fixtures do not reach it)."""
    import pytest
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LEAP_KERNELS_BACKEND", "torch")
            yield
    finally:
        torch.set_num_threads(threads)
