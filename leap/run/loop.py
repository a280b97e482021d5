"""The LEAP training loop (spec sections 2-4): one step function for the baseline and LEAP.

Library use: ``summary = train(TrainConfig(teacher=..., teacher_weights=..., student=..., data=...))``
(:class:`leap.config.TrainConfig`).

One step (:meth:`Trainer.train_step`), identical for ``curriculum="cka"`` (LEAP) and
``curriculum="off"`` (baseline, whose controller is simply pinned to the last block):

1. mixup (one lambda per batch); the same mixed images go to teacher and student;
2. first step only: calibration -- project the random student's patch features, score
   every teacher block with linear CKA in one ``teacher.scan`` pass, start at the argmax
   (skipped for the baseline or when ``start_block`` is set);
3. teacher forward up to ``k = curriculum.block`` only (early exit), no grad;
4. student forward (autocast), loss = fused projection+MSE on the patch tokens
   ``+ cls_weight *`` the same on the CLS token, through one shared head
   (:class:`leap.objective.DistillModule`);
5. backward, grad-norm clipping, optimizer + lr-schedule step;
6. every ``cka_every`` steps (LEAP: every step; the baselines: only when ``--cka-every`` is
   given): CKA (or ``--curriculum-metric cosine``) of the detached projected student vs the
   target, ``curriculum.step_end`` (may level up for the next step; ``--snap-to-last`` and
   ``--reset-head-on-level-up`` act through :class:`leap.curriculum.LevelUpEffects`).

Run directory (rank 0 writes it, through :mod:`leap.runlog`): ``log.jsonl``,
``checkpoint.pt`` (layout in :mod:`leap.checkpoint`), ``summary.json``.

DDP (:mod:`leap.distributed`): launched by ``torchrun``, NCCL on CUDA and gloo on CPU. The
student and head live in one :class:`~leap.objective.DistillModule` wrapped in DDP; every
rank calls the curriculum at the same points (it all-reduces the CKA), so all ranks always
target the same block (``--curriculum-sync per-rank``: each rank decides on its own batch, as
the reference does; :class:`leap.curriculum.RankSync`). :func:`train` owns the process group for the whole run; a
:class:`Trainer` built without one joins it itself and leaves it in :meth:`Trainer.close`
(which :meth:`Trainer.fit` calls: a trainer runs once).

Why this module is long: :class:`Trainer` is the loop and the state it owns (the step, epoch
ends, the summary); its parts are built in :mod:`leap.run.build`, resumed and saved by
:mod:`leap.run.resume` (file layout: :mod:`leap.checkpoint`), statistics typed in
:mod:`leap.run.stats`, the progress display in :mod:`leap.run.progress`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cka import similarity_fn
from ..config import TrainConfig
from ..curriculum import Curriculum, LevelUp, LevelUpEffects, RankSync
from ..data import mixup, set_loader_epoch
from ..distributed import ProcessGroup, resolve_device
from ..errors import ConfigError, NonFiniteLossError
from ..objective import teacher_targets
from ..precision import amp_dtype, configure_matmul_precision, resolve_precision, teacher_autocast
from ..runlog import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME, JsonlWriter, run_file, write_json
from .build import build_data, build_models, build_optimization, resolve_config
from .guard import RunGuard, config_warnings
from .progress import Progress
from .readback import PendingStep, StepReadback, step_values
from .resume import (
    keep_epoch_checkpoint,
    kernel_backend,
    merge_decode_failures,
    read_resume_checkpoint,
    resume_from,
    resume_log,
    save_checkpoint,
    worker_lost,
)
from .stats import EpochStats, RunStats, StepResult, run_summary
from .tensorboard import open_log

__all__ = ["Trainer", "train"]

# The logger keeps the trainer's historical name (users filter on it).
log = logging.getLogger("leap.train")


def _resolve_precision(pref: str, device: torch.device) -> str:
    precision = resolve_precision(pref, device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return precision


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit` (once).

    Attributes of interest after construction: ``module`` (the :class:`DistillModule`,
    unwrapped), ``teacher``, ``curriculum``, ``optimizer``, ``scheduler``, ``loader``,
    ``step`` (steps done), ``epoch`` (epoch in progress), ``stats`` (:class:`RunStats`),
    ``block_history`` (target block of every step run by this process), ``run_dir``.
    """

    def __init__(self, config: TrainConfig | dict[str, Any], group: ProcessGroup | None = None):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.cfg = config.validate()
        # Without a group, the trainer joins (or creates) one itself and leaves it in close().
        self.group = ProcessGroup(self.cfg.device) if group is None else group
        self._owns_group = group is None
        self._closed = False
        self._log_file = JsonlWriter(None)
        self._progress: Progress | None = None
        # Run-directory lock, stop signals, kept checkpoints, divergence stops (leap.run.guard).
        self._guard = RunGuard(
            self.cfg.out,
            is_main=self.group.is_main,
            keep_checkpoints=self.cfg.keep_checkpoints,
            divergence_factor=self.cfg.divergence_factor,
            on_error=self._log,
        )
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        group = self.group
        cfg = self.cfg = resolve_config(self.cfg, group.world_size)  # warmup, per-process batch: saved resolved
        self.device = resolve_device(cfg.device, group)
        self.precision = _resolve_precision(cfg.precision, self.device)
        self.amp_dtype = amp_dtype(self.precision)
        self.tf32 = configure_matmul_precision(self.precision, self.device)
        self.run_dir = cfg.out
        self.ckpt_path = run_file(cfg.out, CHECKPOINT_NAME)
        self._guard.start(group, self.device)
        for warning in config_warnings(cfg):
            self._info(warning, level=logging.WARNING)

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        # Cheap checks first, so bad input fails before a large teacher is built.
        resume = read_resume_checkpoint(self)
        self.dataset, self.loader = build_data(cfg, group, self.device)
        self.steps_per_epoch = len(self.loader)
        self.global_batch = cfg.batch_size * group.world_size
        self._info(f"global batch {self.global_batch} ({cfg.batch_size} per process x {group.world_size} process(es))")
        models = build_models(cfg, self.device, self.precision, info=self._info)
        self.teacher, self.module, self.flops = models.teacher, models.module, models.flops
        self.num_blocks = self.teacher.num_blocks
        self._progress = Progress(
            cfg.progress and group.is_main, cfg.epochs, self.steps_per_epoch, self.num_blocks, cfg.log_every, log
        )
        self.module.train()
        if group.enabled:
            ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model: nn.Module = nn.parallel.DistributedDataParallel(self.module, **ddp_kw)
        else:
            self.model = self.module
        self.dims = {**models.dims, "world_size": group.world_size}
        opt = build_optimization(cfg, self.module, self.steps_per_epoch, self.global_batch, self.device, self.precision)
        self.optimizer, self.scheduler, self.scaler = opt.optimizer, opt.scheduler, opt.scaler
        self.peak_lr, self.total_steps, self.warmup_steps = opt.peak_lr, opt.total_steps, opt.warmup_steps
        self.params = [p for p in self.module.parameters() if p.requires_grad]

        # ---- curriculum (baseline = disabled controller: pinned to the last block)
        self.curriculum = Curriculum.from_config(cfg, self.num_blocks, self.steps_per_epoch)  # fixed: pinned
        # Similarity of the curriculum (--curriculum-metric) and its cadence (None: never measured).
        self.score_fn, self.cka_every = similarity_fn(cfg.curriculum_metric), cfg.resolved_cka_every
        self.effects = LevelUpEffects.from_config(cfg, self.module, self.optimizer, self.scheduler)
        self.rank_sync = RankSync(cfg.curriculum_sync, group.rank, group.world_size)
        self._step_extra: dict[str, Any] = {}
        # Steps whose statistics stay on the device until the next read point (leap.run.readback).
        self.readback = StepReadback(distributed=group.enabled)
        self._read_every = max(1, cfg.log_every or self.steps_per_epoch)
        # Mixup draws from its own CPU generator (no device sync), different per rank.
        self.mixup_gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + group.rank * 7919 + 17) % 2**63)

        # ---- run state
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.stats = RunStats()
        self.block_history: list[int] = []
        self.last_good: str | None = None
        self._last_saved_step = -1
        self.resolved = {
            "device": str(self.device),
            "precision": self.precision,
            "world_size": group.world_size,
            "global_batch": self.global_batch,
            "lr": cfg.resolved_lr,
            "peak_lr": self.peak_lr,
            "weight_decay": cfg.resolved_weight_decay,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "teacher_dtype": str(self.teacher.dtype).replace("torch.", ""),
            "tf32": self.tf32,
            "cka_every": self.cka_every,
            "max_steps_per_block": self.curriculum.max_steps_per_block,  # a fractional --max-epochs-per-block
            "teacher_precision": self.teacher.precision,
            "kernel_backend": kernel_backend(self.device),  # a resume under another one warns
        }
        if self.teacher.precision == "fp8":
            from leap_kernels.ops.fp8_linear import describe_paths

            # How many block linears run on torch._scaled_mm and how many are emulated (and why).
            self.resolved["fp8_paths"], self.resolved["fp8_emulated_reasons"] = describe_paths(
                self.teacher.model, self.device
            )

        if resume is not None:
            resume_from(self, *resume)
        if group.is_main:
            if resume is not None:  # steps after the checkpoint run again: logged once; no stale summary
                warning = resume_log(cfg.out, resume[0], self.step)
                if warning:
                    self._info(warning, level=logging.WARNING)
            self._log_file = open_log(cfg, run_file(cfg.out, LOG_NAME), truncate=resume is None)  # + --tensorboard
        if resume is None:
            self._log({"type": "config", "config": cfg.to_dict(), "resolved": self.resolved, "dims": self.dims})
        else:
            self._log(
                {
                    "type": "resume",
                    "checkpoint": resume[0],
                    "step": self.step,
                    "epoch": self.epoch,
                    "step_in_epoch": self.step_in_epoch,
                }
            )
        self._guard.set_reference(self.params)

    # ------------------------------------------------------------------ small utilities

    def _info(self, msg: str, level: int = logging.INFO) -> None:
        if self.group.is_main:
            log.log(level, msg)

    def _log(self, record: dict[str, Any]) -> None:
        self._log_file.write(record)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _last_good_text(self) -> str:
        return self.last_good if self.last_good else "none (no checkpoint was written yet)"

    def _stop(self, msg: str, step: int) -> NonFiniteLossError:
        self._log({"type": "error", "step": step, "epoch": self.epoch, "message": msg})
        return NonFiniteLossError(msg)

    def close(self) -> None:
        """Close the log and progress bar; leave the process group if this trainer created it."""
        if self._progress is not None:
            self._progress.close()
        self._guard.close(failed_early=self._log_file.path is None)
        self._log_file.close()
        if self._owns_group:
            self.group.close()
        self._closed = True

    # ------------------------------------------------------------------ the step

    def _calibrate(self, images: torch.Tensor) -> None:
        """First step: pick the start block from the CKA of every teacher block (no grad)."""
        cur = self.curriculum
        scores = None
        scan_blocks = 0
        if cur.enabled and cur.start_block is None:
            with torch.no_grad(), self._autocast():
                s_patch, _ = self.module.features(images)
                s_proj = self.module.project(s_patch)
            before = self.teacher.blocks_run
            with teacher_autocast(self.device, self.amp_dtype, self.teacher.dtype):
                scores = self.teacher.scan(images, lambda k, patch, cls: self.score_fn(s_proj, patch))
            scan_blocks = self.teacher.blocks_run - before
        start = cur.calibrate(scores, step=self.step + 1, epoch=self.epoch)
        for record in self.effects.apply(cur.level_ups):  # a snap at calibration restarts the lr
            self._log(record)
        self.stats.add_calibration(start, scan_blocks)
        if scan_blocks:
            self.flops.add_teacher_blocks(scan_blocks, images.shape[0] * self.group.world_size)
        self._log(
            {
                "type": "calibration",
                "step": self.step + 1,
                "epoch": self.epoch,
                "scores": cur.calibration_scores,
                "start_block": start,
                "teacher_blocks_run": scan_blocks,
            }
        )
        self._info(f"calibration: start at teacher block {start}/{self.num_blocks}")

    def train_step(self, images: torch.Tensor) -> StepResult:
        """One optimizer step on a batch ``images (B, 3, H, W)``.

        Shared by baseline and LEAP: only the curriculum's ``block`` differs.

        Raises:
            NonFiniteLossError: non-finite loss (or gradient norm outside fp16 loss scaling),
                checked on the rank-averaged value *before* the optimizer step, so the weights
                stay finite.
        """
        cfg, cur = self.cfg, self.curriculum
        step = self.step + 1  # 1-based number of this step
        images = images.to(self.device, non_blocking=True)
        images, lam = mixup(images, generator=self.mixup_gen, enabled=cfg.mixup)
        if not cur.calibrated:
            self._calibrate(images)

        k = cur.block
        before = self.teacher.blocks_run
        with teacher_autocast(self.device, self.amp_dtype, self.teacher.dtype):
            t_patch, t_cls = teacher_targets(self.teacher, self.module, images, k)  # blocks 1..k only, no grad
        blocks_run = self.teacher.blocks_run - before
        self.flops.add_step(blocks_run, images.shape[0] * self.group.world_size)

        with self._autocast():
            loss, patch_loss, cls_loss, s_patch = self.model(images, t_patch, t_cls)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

        cka_t = None
        if self.cka_every and step % self.cka_every == 0:
            # Detached projected student (head before this step's update) vs the current target.
            with torch.no_grad():
                cka_t = self.score_fn(self.module.project(s_patch), self.module.final_target(t_patch))

        grad_norm_t = None
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm_t = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"]
        pending = PendingStep(
            StepResult(step, self.epoch, math.nan, math.nan, math.nan, k, lr, blocks_run, lam),
            step_values(loss, patch_loss, cls_loss, grad_norm_t, cka_t),
            has_grad_norm=grad_norm_t is not None,
            has_score=cka_t is not None,
            per_rank=self.rank_sync.inputs(cka_t, k, self.device),
        )
        self.readback.add(pending)
        if cka_t is not None or self.readback.distributed:
            # The controller decides on this step's score before the next step (the reference's order):
            # one host read, which also checks this step's loss before its update is applied.
            self._read_back()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        pending.applied = True

        result = pending.result
        score = None
        if pending.read:  # per-rank sync: this rank's own score; DDP: the per-rank fields of the record
            score, pending.extra = self.rank_sync.outputs(result.cka, pending.gathered)
        n_before = len(cur.level_ups)
        cur.step_end(step=step, epoch=self.epoch, score=score if cka_t is not None else None)  # + step timeout
        result.cka = cur.last_cka if cka_t is not None else None
        result.level_ups = cur.level_ups[n_before:]
        pending.effect_records = self.effects.apply(result.level_ups)
        return result

    # ------------------------------------------------------------------ loop

    def _read_back(self) -> None:
        """One host read of the pending steps' values; stops the run at the first non-finite one."""
        bad = self.readback.read(self.scaler.is_enabled())
        if bad is None:
            return
        self._publish(self.readback.take(before=bad))  # the good steps before it, in order
        r = bad.result
        if bad.applied:
            when = (
                f"its update was applied before the read at step {self.step}, and nothing after step "
                f"{self._last_saved_step} was saved"
            )
        else:
            when = "training stopped before applying it"
        raise self._stop(
            f"{bad.nonfinite(self.scaler.is_enabled())} at step {r.step} (epoch {r.epoch + 1}); {when}. "
            f"Last good checkpoint: {self._last_good_text()}. Try a lower --lr, --precision fp32, "
            f"or --clip-grad, then --resume from that checkpoint.",
            r.step,
        )

    def flush_steps(self) -> None:
        """Read back and publish every pending step (before a checkpoint, an epoch record or the summary)."""
        self._read_back()
        self._publish(self.readback.take())

    def _publish(self, steps: list[PendingStep]) -> None:
        """Log, check and count read steps, in order: the divergence check, the step record, its
        level-ups and their effects, the run statistics and the progress display."""
        for p in steps:
            r = p.result
            self._guard.check_step(r.loss, r.step, self._guard.last_good_text(self.last_good), block=r.block)
            self._log({**r.record(), **p.extra})
            self._log_level_ups(r.level_ups, r.cka)
            for record in p.effect_records:  # lr restart / head reset of this step's level-ups
                self._log(record)
            self._step_extra = p.extra
            self.stats.add_step(r, self.global_batch, p.dt, p.cpu_dt)
            self._progress.show(r, r.step, p.step_in_epoch)

    def _log_level_ups(self, level_ups: list[LevelUp], cka: float | None) -> None:
        for u in level_ups:
            self._log(u.record(cka))
            self._info(f"step {u.step}: target block {u.from_block} -> {u.to_block} ({u.reason})")

    def _max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _run_epoch(self) -> bool:
        """Train the rest of ``self.epoch``. False if stopped early by ``max_steps``."""
        cfg = self.cfg
        set_loader_epoch(self.loader, self.epoch, start_batch=self.step_in_epoch)
        self._progress.start_epoch(self.epoch, self.step_in_epoch)
        t_last, cpu_last = time.perf_counter(), time.process_time()
        try:
            for images, _labels in self.loader:
                result = self.train_step(images)
                self.step += 1
                self.step_in_epoch += 1
                self.block_history.append(result.block)
                self._progress.tick()
                end = self.step_in_epoch >= self.steps_per_epoch
                checkpoint_due = bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0
                read_point = (
                    end
                    or checkpoint_due
                    or self.step % self._read_every == 0
                    or self._max_steps_reached()
                    or bool(self._guard.signal)
                )
                if read_point:
                    self._read_back()  # before the clock: a step that waits for the device pays for it
                # Host time between step ends: on a GPU a step between read points shows the time to queue
                # it, and a read point the wait for the queue; their sum is the run's time.
                now, cpu_now = time.perf_counter(), time.process_time()
                pending = self.readback.last
                pending.dt, t_last = now - t_last, now
                pending.cpu_dt, cpu_last = cpu_now - cpu_last, cpu_now
                pending.step_in_epoch = self.step_in_epoch
                result.images_per_s = self.global_batch / pending.dt if pending.dt > 0 else None
                if read_point:
                    self._publish(self.readback.take())

                if end:
                    continue  # the epoch end (below) checkpoints
                self._stop_if_signalled()
                if checkpoint_due:
                    self.save_checkpoint()
                if self._max_steps_reached():
                    return False
        finally:
            self._progress.close()
        self._end_epoch()
        return True

    def _end_epoch(self) -> None:
        self.flush_steps()
        cur, ep, tot = self.curriculum, self.stats.epoch, self.stats.total
        n_before = len(cur.level_ups)
        cur.epoch_end(epoch=self.epoch, step=self.step)
        self._log_level_ups(cur.level_ups[n_before:], None)
        for record in self.effects.apply(cur.level_ups[n_before:]):
            self._log(record)

        merge_decode_failures(self)  # found by any rank or the start-up probe, each file counted once per run
        new_failures = ep.decode_failures
        mean_loss = ep.mean(ep.loss_sum)
        record = ep.record(
            self.epoch,
            self.step,
            self.optimizer.param_groups[0]["lr"],
            cur,
            self.num_blocks,
            (new_failures, tot.decode_failures),
        )
        record.update({k: v for k, v in self.flops.epoch_summary().items() if k not in ("steps", "images")})
        self._log(record)
        if new_failures:
            self._info(
                f"epoch {self.epoch + 1}: {new_failures} image(s) could not be decoded and were skipped",
                level=logging.WARNING,
            )
        tot.last_epoch_mean_loss = mean_loss
        self.epoch += 1
        self.step_in_epoch = 0
        self.stats.epoch = EpochStats()
        self.save_checkpoint()
        keep_epoch_checkpoint(self)  # --save-every-epochs: learning curves (leap eval --all-checkpoints)

    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` (or ``max_steps``); return the summary (also in summary.json).

        Closes the trainer (log, process group) when done or on error: a trainer runs once.
        """
        if self._closed:
            raise RuntimeError("this Trainer has already run (or was closed); build a new one to train again")
        try:
            status = "completed"
            self._guard.catch_signals()
            while self.epoch < self.cfg.epochs:
                if self._max_steps_reached() or not self._run_epoch():
                    status = "stopped_at_max_steps"
                    break
                self._stop_if_signalled()
            self.flush_steps()
            if self._last_saved_step != self.step:
                self.save_checkpoint()
            summary = self.summary(status)
            if self.group.is_main:
                write_json(run_file(self.run_dir, SUMMARY_NAME), summary)
            self._log({"type": "summary", **{k: v for k, v in summary.items() if k != "config"}})
            return summary
        except RuntimeError as e:  # a DataLoader worker killed (e.g. by the OOM killer): one line, an error record
            lost = worker_lost(self, e)
            if lost is None:
                raise
            raise lost from None
        finally:
            self.close()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        """Write ``RUN_DIR/checkpoint.pt`` atomically (rank 0): :func:`leap.run.resume.save_checkpoint`."""
        return save_checkpoint(self)

    # ------------------------------------------------------------------ signals (leap.run.guard)

    def _stop_if_signalled(self) -> None:
        """After SIGTERM/SIGINT (agreed by every rank): checkpoint, log, raise RunInterrupted."""
        signum = self._guard.stop_requested(self.group, self.device)
        if not signum:
            return
        if self._last_saved_step != self.step:
            self.save_checkpoint()
        self._log(
            {
                "type": "interrupted",
                "signal": int(signum),
                "step": self.step,
                "epoch": self.epoch,
                "checkpoint": self.ckpt_path,
            }
        )
        raise self._guard.interrupted(signum, self.step, self.ckpt_path)

    # ------------------------------------------------------------------ summary

    def summary(self, status: str) -> dict[str, Any]:
        """The run's ``summary.json`` (:func:`leap.run.stats.run_summary`)."""
        return run_summary(self, status)


def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Run one distillation from a :class:`TrainConfig` (or a dict of its fields).

    Returns the summary dict (also written to ``RUN_DIR/summary.json`` by rank 0).
    Under ``torchrun`` every process calls this; the process group is created from the
    environment and destroyed at the end.
    """
    cfg = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    group = ProcessGroup(cfg.device)
    try:
        return Trainer(cfg, group).fit()
    finally:
        group.close()
