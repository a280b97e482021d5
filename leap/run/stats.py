"""Typed results of a training run: :class:`StepResult` (one optimizer step, turned into the
``step`` record of ``log.jsonl``) and :class:`RunStats` (the epoch's and the run's running
counters, saved in checkpoints as ``epoch_stats`` / ``totals``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..curriculum import LevelUp
from ..runlog import sanitize

__all__ = ["StepResult", "EpochStats", "RunTotals", "RunStats", "run_summary"]


@dataclass
class StepResult:
    """What one optimizer step produced (rank-averaged values, read back once per step)."""

    step: int  # 1-based number of this step
    epoch: int  # 0-based epoch
    loss: float
    patch_loss: float
    cls_loss: float
    block: int  # teacher target block of this step
    lr: float  # lr the step was taken with
    teacher_blocks_run: int  # teacher blocks run by this step (calibration excluded)
    mixup_lambda: float
    grad_norm: float | None = None  # before clipping; None when clipping is off
    cka: float | None = None  # None on steps without a CKA check
    level_ups: list[LevelUp] = field(default_factory=list)  # moves decided by this step's CKA
    images_per_s: float | None = None

    def record(self) -> dict[str, Any]:
        """The ``step`` record of ``log.jsonl``."""
        rec: dict[str, Any] = {
            "type": "step",
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "patch_loss": self.patch_loss,
            "cls_loss": self.cls_loss,
            "block": self.block,
            "lr": self.lr,
            "teacher_blocks_run": self.teacher_blocks_run,
            "mixup_lambda": self.mixup_lambda,
        }
        if self.grad_norm is not None:
            rec["grad_norm"] = self.grad_norm
        if self.cka is not None:
            rec["cka"] = self.cka
        rec["images_per_s"] = self.images_per_s
        return rec


@dataclass
class EpochStats:
    """Counters of the epoch in progress (saved in checkpoints, so a resumed epoch adds up)."""

    steps: int = 0
    loss_sum: float = 0.0
    patch_loss_sum: float = 0.0
    cls_loss_sum: float = 0.0
    block_sum: int = 0
    teacher_blocks_run: int = 0
    images: int = 0
    time_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (all its threads): robust to other jobs on the machine
    cka_sum: float = 0.0
    cka_count: int = 0
    decode_failures: int = 0  # undecodable files new to the run found in this epoch

    def mean(self, total: float) -> float | None:
        return total / self.steps if self.steps else None

    def record(
        self, epoch: int, step: int, lr: float, curriculum: Any, num_blocks: int, decode_failures: tuple[int, int]
    ) -> dict[str, Any]:
        """The ``epoch`` record of ``log.jsonl`` (without the FLOP counters, which the trainer adds).

        ``curriculum``: the controller (its block and epochs on it); ``decode_failures``: the
        undecodable images of this epoch and of the run.
        """
        return {
            "type": "epoch",
            "epoch": epoch,
            "steps": self.steps,
            "mean_loss": self.mean(self.loss_sum),
            "mean_patch_loss": self.mean(self.patch_loss_sum),
            "mean_cls_loss": self.mean(self.cls_loss_sum),
            "mean_cka": self.cka_sum / self.cka_count if self.cka_count else None,
            "block": curriculum.block,
            "mean_block": self.mean(self.block_sum),
            "epochs_on_block": curriculum.epochs_on_block,
            "steps_on_block": curriculum.steps_on_block,
            "decode_failures": decode_failures[0],
            "decode_failures_total": decode_failures[1],
            "teacher_blocks_run_total": self.teacher_blocks_run,
            "teacher_block_savings": 1.0 - self.teacher_blocks_run / (max(1, self.steps) * num_blocks),
            "time_s": self.time_s,
            "cpu_time_s": self.cpu_s,
            "images_per_s": self.images / self.time_s if self.time_s > 0 else None,
            "lr": lr,
            "step": step,
        }


@dataclass
class RunTotals:
    """Counters of the whole run, for the summary."""

    teacher_blocks_run: int = 0  # training steps only (the calibration scan is counted apart)
    calibration_blocks: int = 0  # teacher blocks run by the one-off calibration scan
    block_sum: int = 0
    images: int = 0
    time_s: float = 0.0
    cpu_s: float = 0.0  # the training process's CPU time of the steps (DataLoader workers not included)
    decode_failures: int = 0  # distinct undecodable files of the run (all ranks, across resumes)
    failed_images: list[int] = field(default_factory=list)  # their dataset indices, sorted
    start_block: int | None = None
    last_loss: float | None = None
    last_epoch_mean_loss: float | None = None

    def summary(self, steps: int, num_blocks: int) -> dict[str, Any]:
        """The totals' part of ``summary.json`` after ``steps`` steps with an ``num_blocks``-block teacher."""
        full = steps * num_blocks
        return {
            "teacher_blocks_run": self.teacher_blocks_run,
            "calibration_blocks": self.calibration_blocks,  # apart from the savings (add_calibration)
            "teacher_blocks_full": full,
            "teacher_block_savings": 1.0 - self.teacher_blocks_run / full if full else None,
            "final_loss": self.last_loss,
            "last_epoch_mean_loss": self.last_epoch_mean_loss,
            "images_seen": self.images,
            "train_time_s": self.time_s,
            "images_per_s": self.images / self.time_s if self.time_s > 0 else None,
            "decode_failures": self.decode_failures,
            "mean_step_time_s": self.time_s / steps if steps else None,
            "train_cpu_time_s": self.cpu_s,
            "mean_step_cpu_time_s": self.cpu_s / steps if steps else None,
        }


@dataclass
class RunStats:
    """Running statistics of a run: this epoch's and the whole run's."""

    epoch: EpochStats = field(default_factory=EpochStats)
    total: RunTotals = field(default_factory=RunTotals)

    def add_step(self, result: StepResult, images: int, dt: float, cpu_dt: float = 0.0) -> None:
        """Account one step on ``images`` images (global batch) that took ``dt`` seconds (``cpu_dt`` seconds
        of this process's CPU time)."""
        ep, tot = self.epoch, self.total
        ep.steps += 1
        ep.loss_sum += result.loss
        ep.patch_loss_sum += result.patch_loss
        ep.cls_loss_sum += result.cls_loss
        ep.block_sum += result.block
        ep.teacher_blocks_run += result.teacher_blocks_run
        ep.images += images
        ep.time_s += dt
        ep.cpu_s += cpu_dt
        if result.cka is not None and math.isfinite(result.cka):
            ep.cka_sum += result.cka
            ep.cka_count += 1
        tot.teacher_blocks_run += result.teacher_blocks_run
        tot.block_sum += result.block
        tot.images += images
        tot.time_s += dt
        tot.cpu_s += cpu_dt
        tot.last_loss = result.loss

    def add_calibration(self, start_block: int, scan_blocks: int) -> None:
        """The calibration scan: its blocks are counted apart from the training steps', so every
        "saved" number of a run (summary, epoch records, report, ``leap flops``) has one meaning:
        training steps vs. the same steps at full depth (see :mod:`leap.cost`)."""
        self.total.start_block = start_block
        self.total.calibration_blocks += scan_blocks

    def add_decode_failures(self, indices: list[int]) -> int:
        """Merge the dataset indices of the files found undecodable (by any rank, the start-up probe
        included); returns how many are new to the run (also added to this epoch's count). A file is
        counted once per run, however often it is met again, after a resume too (the indices travel in
        the checkpoint: the trainer merges them before every checkpoint)."""
        tot = self.total
        known = set(tot.failed_images)
        new = {int(i) for i in indices} - known
        if new:
            tot.failed_images = sorted(known | new)
            tot.decode_failures += len(new)
            self.epoch.decode_failures += len(new)
        return len(new)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The ``epoch_stats`` and ``totals`` entries of a checkpoint."""
        return {"epoch_stats": dataclasses.asdict(self.epoch), "totals": dataclasses.asdict(self.total)}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(EpochStats)}
        self.epoch = EpochStats(**{k: v for k, v in ckpt.get("epoch_stats", {}).items() if k in names})
        names = {f.name for f in dataclasses.fields(RunTotals)}
        self.total = RunTotals(**{k: v for k, v in ckpt.get("totals", {}).items() if k in names})


def run_summary(self: Any, status: str) -> dict[str, Any]:
    """The summary of a run (``summary.json``) from its trainer ``self`` (:class:`leap.run.loop.Trainer`)."""
    tot, cur = self.stats.total, self.curriculum
    steps = self.step
    return sanitize(
        {
            "status": status,
            "mode": {"cka": "leap", "off": "baseline"}.get(self.cfg.curriculum, self.cfg.curriculum),
            # Whether the per-step CKA (or cosine) was computed: the baselines skip it unless --cka-every.
            "cka_computed": self.cka_every is not None,
            "curriculum_sync": self.cfg.curriculum_sync,
            "blocks_per_rank": self._step_extra.get("blocks_per_rank"),
            "run_dir": self.run_dir,
            "checkpoint": self.last_good,
            "steps": steps,
            "epochs": self.cfg.epochs,
            "epochs_completed": self.epoch,
            "num_blocks": self.num_blocks,
            "start_block": tot.start_block,
            "final_block": cur.block,
            "mean_block": tot.block_sum / steps if steps else None,
            "level_ups": [{k: v for k, v in u.record().items() if k != "type"} for u in cur.level_ups],
            "calibration_scores": cur.calibration_scores,
            **tot.summary(steps, self.num_blocks),
            "flops": {k: v for k, v in self.flops.totals().items() if k not in ("steps", "images")},
            "resolved": self.resolved,
            "config": self.cfg.to_dict(),
        }
    )
