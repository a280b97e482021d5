"""TensorBoard events of a run (``leap distill --tensorboard``), fed from the records of ``log.jsonl``.

No second bookkeeping: the trainer writes its records through one writer (:func:`open_log`); with
``--tensorboard`` that writer is a :class:`TensorBoardLog`, which appends each record to ``log.jsonl``
first and then turns it into scalars (:class:`ScalarFeed`) in ``RUN_DIR/tensorboard/``:

==============================  ===================================================================
tag                             from (``log.jsonl`` record, field)
==============================  ===================================================================
``train/loss``                  step ``loss`` (also ``train/patch_loss``, ``train/cls_loss``)
``train/lr``                    step ``lr``; ``train/grad_norm`` step ``grad_norm``
``curriculum/target_block``     step ``block``; ``curriculum/cka`` step ``cka`` (when measured);
                                ``curriculum/start_block`` calibration ``start_block``;
                                ``curriculum/level_up`` level_up ``to_block``
``teacher/flops``               teacher FLOPs of the training steps so far: the sum over steps of
                                ``global_batch x CostModel.teacher_flops(teacher_blocks_run)``, the
                                counter of the epoch records' ``cumulative_teacher_flops``;
                                ``teacher/flops_saved_fraction`` against the same steps at full depth
``perf/step_time_s``            ``global_batch / images_per_s`` of the step (its wall time);
                                ``perf/images_per_s``
``epoch/*``                     epoch ``mean_loss``, ``mean_block``, ``mean_cka``, ``saved_fraction``,
                                ``time_s`` (at the epoch's last step)
==============================  ===================================================================

The x axis is the optimizer step. A resumed run reads the records it kept back into the feed (the
FLOP counter goes on from where the checkpoint was) and drops the events after the checkpoint's step
(``purge_step``), as :func:`leap.run.guard.truncate_log` drops their records.

The writer is ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard`` package
(``pip install "leap-kernels[tensorboard]"``); without it :func:`require` raises
:class:`~leap.errors.MissingDependencyError` before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import LeapError, MissingDependencyError
from ..runlog import JsonlWriter, number, read_jsonl, run_file

__all__ = ["TENSORBOARD_DIR", "require", "open_log", "ScalarFeed", "TensorBoardLog"]

log = logging.getLogger("leap.train")

#: The folder of the events, inside the run directory.
TENSORBOARD_DIR = "tensorboard"


def require() -> Callable[..., Any]:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        MissingDependencyError: the ``tensorboard`` package is not installed (names the extra).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependencyError(
            "--tensorboard needs the tensorboard package, which is not installed; install it with: "
            'pip install "leap-kernels[tensorboard]" (or run without --tensorboard: log.jsonl has the same records)'
        ) from None
    return SummaryWriter


def open_log(cfg: Any, path: str, *, truncate: bool) -> JsonlWriter:
    """The writer of a run's ``log.jsonl``: a :class:`~leap.runlog.JsonlWriter`, or with
    ``cfg.tensorboard`` a :class:`TensorBoardLog` writing to ``cfg.out/tensorboard`` too.

    Raises:
        MissingDependencyError: ``cfg.tensorboard`` without the ``tensorboard`` package (checked before
            ``path`` is created).
    """
    if not getattr(cfg, "tensorboard", False):
        return JsonlWriter(path, truncate=truncate)
    writer_class = require()
    return TensorBoardLog(path, run_file(cfg.out, TENSORBOARD_DIR), writer_class, truncate=truncate)


class ScalarFeed:
    """Turns ``log.jsonl`` records into TensorBoard scalars ``(tag, value, step)``; keeps the running
    teacher-FLOP counter and the global batch (from the ``config`` record)."""

    def __init__(self) -> None:
        self.global_batch: int | None = None
        self.teacher_flops = 0.0
        self.baseline_teacher_flops = 0.0
        self.last_step = 0
        self._cost: Any = None
        self._cost_failed = False

    def _config(self, record: dict[str, Any]) -> None:
        resolved, cfg = record.get("resolved") or {}, record.get("config") or {}
        gb = number(resolved.get("global_batch"))
        self.global_batch = int(gb) if gb else None
        self._cost, self._cost_failed = None, False
        try:  # the analytic per-image FLOPs of the run's teacher (models built on the meta device)
            from ..cost import CostModel

            self._cost = CostModel(
                cfg["teacher"],
                cfg["student"],
                img_size=int(cfg["img_size"]),
                teacher_overrides=cfg.get("teacher_overrides"),
                student_overrides=cfg.get("student_overrides"),
            )
        except (LeapError, KeyError, TypeError, ValueError) as e:
            self._cost_failed = True
            log.warning("tensorboard: no teacher/flops scalars (the cost model of the run failed: %s)", e)

    def feed(self, record: dict[str, Any]) -> list[tuple[str, float, int]]:
        """The scalars of one record (an empty list for records without any)."""
        kind = record.get("type")
        if kind == "config":
            self._config(record)
            return []
        step = number(record.get("step"))
        if step is None:
            return []
        step_i = int(step)
        out: list[tuple[str, float, int]] = []

        def add(tag: str, value: Any) -> None:
            v = number(value)
            if v is not None:
                out.append((tag, v, step_i))

        if kind == "step":
            self.last_step = max(self.last_step, step_i)
            for key in ("loss", "patch_loss", "cls_loss", "lr", "grad_norm"):
                add(f"train/{key}", record.get(key))
            add("curriculum/target_block", record.get("block"))
            add("curriculum/cka", record.get("cka"))
            ips = number(record.get("images_per_s"))
            add("perf/images_per_s", ips)
            if ips and self.global_batch:
                add("perf/step_time_s", self.global_batch / ips)
            blocks = number(record.get("teacher_blocks_run"))
            if self._cost is not None and blocks is not None and self.global_batch:
                self.teacher_flops += self.global_batch * self._cost.teacher_flops(blocks)
                self.baseline_teacher_flops += self.global_batch * self._cost.baseline_teacher_flops()
                add("teacher/flops", self.teacher_flops)
                add("teacher/flops_saved_fraction", 1.0 - self.teacher_flops / self.baseline_teacher_flops)
        elif kind == "calibration":
            add("curriculum/start_block", record.get("start_block"))
        elif kind == "level_up":
            add("curriculum/level_up", record.get("to_block"))
        elif kind == "epoch":
            for key in ("mean_loss", "mean_block", "mean_cka", "saved_fraction", "time_s"):
                add(f"epoch/{key}", record.get(key))
        return out


class TensorBoardLog(JsonlWriter):
    """A :class:`~leap.runlog.JsonlWriter` that also writes each record's scalars as TensorBoard events.

    Args:
        path: ``log.jsonl``.
        log_dir: the events folder.
        writer_class: ``SummaryWriter`` (from :func:`require`).
        truncate: a new run (True) or a resumed one (False: the kept records are fed back first and the
            events after the last kept step are dropped).
    """

    def __init__(self, path: str, log_dir: str, writer_class: Callable[..., Any], *, truncate: bool):
        kept = read_jsonl(path)[0] if (not truncate and os.path.isfile(path)) else []
        super().__init__(path, truncate=truncate)
        self.feed = ScalarFeed()
        for record in kept:
            self.feed.feed(record)
        self.log_dir = log_dir
        self._tb = writer_class(log_dir=log_dir, purge_step=self.feed.last_step + 1 if kept else None)

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if self._tb is not None:
            for tag, value, step in self.feed.feed(record):
                self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if getattr(self, "_tb", None) is not None:
            self._tb.close()
            self._tb = None
        super().close()
