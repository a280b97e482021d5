"""A run's checkpoints: refusing to overwrite a run, resuming one, and saving one.

Functions of the :class:`~leap.run.loop.Trainer` whose state they read and write (``self`` is the
trainer, typed ``Any`` so that this module does not import the loop that calls it); the file layout
is :mod:`leap.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..checkpoint import (
    all_finite,
    atomic_save,
    build_checkpoint,
    capture_rng_state,
    check_resume_compatible,
    load_checkpoint,
    restore_modules,
    restore_rng_state,
)
from ..errors import CheckpointError, ConfigError

__all__ = ["read_resume_checkpoint", "resume_from", "save_checkpoint"]


def read_resume_checkpoint(self: Any) -> tuple[str, dict[str, Any]] | None:
    """Load ``--resume`` (if any) as ``(path, checkpoint)``; refuse to silently overwrite a run."""
    cfg = self.cfg
    path = cfg.resume_path
    if path is None:
        if os.path.exists(self.ckpt_path):
            raise ConfigError(
                f"{cfg.out} already holds a checkpoint ({self.ckpt_path}); pass --resume auto to continue "
                "that run, or choose another --out"
            )
        return None
    if cfg.resume == "auto" and not os.path.exists(path):
        self._info(f"--resume auto: no checkpoint at {path} yet, starting a new run")
        return None
    return path, load_checkpoint(path)


def resume_from(self: Any, path: str, ckpt: dict[str, Any]) -> None:
    """Continue from the checkpoint ``ckpt`` read from ``path``."""
    cfg = self.cfg
    extra = check_resume_compatible(path, ckpt["config"], cfg.to_dict(), ckpt["dims"], self.dims)
    if extra:
        changes = ", ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in extra)
        self._info(
            f"resuming with changed settings ({changes}); the run will not match an uninterrupted one",
            level=logging.WARNING,
        )
    restore_modules(
        path, ckpt, module=self.module, optimizer=self.optimizer, scaler=self.scaler, curriculum=self.curriculum
    )
    # optimizer.load_state_dict restored the saved hyperparameters; the current config's win
    # (identical values on a plain resume, so this only matters when they were changed).
    for group in self.optimizer.param_groups:
        group["peak_lr"] = self.peak_lr
        if group.get("name") == "decay":
            group["weight_decay"] = cfg.resolved_weight_decay
        if cfg.optimizer == "lars":
            group["momentum"] = cfg.momentum
            group["trust_coefficient"] = cfg.trust_coefficient
    self.scheduler.load_state_dict(ckpt["scheduler"])
    self.epoch = int(ckpt["epoch"])
    self.step = int(ckpt["step"])
    self.step_in_epoch = int(ckpt["step_in_epoch"])
    self.stats.load_state_dict(ckpt)
    if "flops" in ckpt:
        self.flops.load_state_dict(ckpt["flops"])
    if self.step_in_epoch > self.steps_per_epoch:
        raise CheckpointError(
            f"cannot resume from {path}: it is {self.step_in_epoch} batches into epoch {self.epoch}, "
            f"but an epoch now has only {self.steps_per_epoch} (did the dataset change?)"
        )
    rng = ckpt.get("rng")
    if rng:
        mine = rng[self.group.rank] if len(rng) == self.group.world_size else rng[0]
        restore_rng_state(mine, {"mixup": self.mixup_gen})
        if cfg.curriculum_sync == "per-rank" and len(rng) == self.group.world_size and "curriculum" in mine:
            self.curriculum.load_state_dict(mine["curriculum"])  # this rank's own block, not rank 0's
    self.last_good = path
    self._last_saved_step = self.step
    self._info(
        f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, batch {self.step_in_epoch}), "
        f"target block {self.curriculum.block}/{self.num_blocks}"
    )


def save_checkpoint(self: Any) -> str:
    """Write ``RUN_DIR/checkpoint.pt`` atomically (rank 0), after checking the weights are finite.

    Every rank must call it (the RNG states of all ranks are gathered into the file).

    Raises:
        NonFiniteLossError: the weights hold NaN/Inf; nothing is written, the last good
            checkpoint stays on disk.
    """
    if not all_finite(self.params):
        raise self._stop(
            f"student/head weights became non-finite by step {self.step} (epoch {self.epoch + 1}); "
            f"the checkpoint was NOT overwritten. Last good checkpoint: {self._last_good_text()}.",
            self.step,
        )
    self._guard.check_weights(self.params, self.step, self._guard.last_good_text(self.last_good))
    # Every rank's controller travels with its RNG state: under --curriculum-sync per-rank they differ.
    rng_all = self.group.all_gather_object(
        {**capture_rng_state({"mixup": self.mixup_gen}), "curriculum": self.curriculum.state_dict()}
    )
    if self.group.is_main:
        ckpt = build_checkpoint(
            module=self.module,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            curriculum=self.curriculum,
            rng=rng_all,
            epoch=self.epoch,
            step=self.step,
            step_in_epoch=self.step_in_epoch,
            stats=self.stats.state_dict(),
            flops=self.flops.state_dict(),
            config=self.cfg.to_dict(),
            resolved=self.resolved,
            dims=self.dims,
        )
        self._guard.keep_previous(self.ckpt_path, self._last_saved_step)
        atomic_save(ckpt, self.ckpt_path)
        self._log(
            {
                "type": "checkpoint",
                "step": self.step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "path": self.ckpt_path,
            }
        )
    self.last_good = self.ckpt_path
    self._last_saved_step = self.step
    return self.ckpt_path
