"""A run's checkpoints: refusing to overwrite a run, resuming one, and saving one.

Functions of the :class:`~leap.run.loop.Trainer` whose state they read and write (``self`` is the
trainer, typed ``Any`` so that this module does not import the loop that calls it); the file layout
is :mod:`leap.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
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
    state_tensors,
)
from ..errors import CheckpointError, ConfigError, InputNotFoundError, RunDirError, TrainingError
from ..runlog import CHECKPOINT_NAME, LOG_NAME, SUMMARY_NAME, atomic_write, describe_write_failure, run_file
from .guard import kept_checkpoints, truncate_log

__all__ = [
    "log_has_steps",
    "resume_log",
    "previous_run_files",
    "read_resume_checkpoint",
    "resume_from",
    "save_checkpoint",
    "kernel_backend",
    "merge_decode_failures",
    "worker_lost",
    "EPOCH_CHECKPOINT_RE",
    "epoch_checkpoints",
    "keep_epoch_checkpoint",
]

#: The per-epoch checkpoints of ``--save-every-epochs N`` (never pruned, never resumed from automatically).
EPOCH_CHECKPOINT_RE = re.compile(r"^checkpoint-epoch(\d+)\.pt$")


def log_has_steps(path: str) -> bool:
    """True if the JSON-lines log ``path`` holds a ``step`` record (a run trained in it)."""
    import json

    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"step"' not in line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("type") == "step":
                return True
    return False


def resume_log(run_dir: str | os.PathLike, checkpoint: str, step: int) -> str | None:
    """Make the run directory's records agree with a resume from ``checkpoint`` (at ``step``).

    - ``summary.json`` is removed: the run is no longer completed (or stopped) until it ends again;
    - a run branched into a new ``--out`` (the checkpoint lies in another directory) starts its
      ``log.jsonl`` with the parent run's records up to ``step`` (from the ``log.jsonl`` beside the
      checkpoint), so ``leap report`` and ``leap flops`` count the same steps as ``summary.json``;
    - the records after ``step`` are dropped (:func:`truncate_log`).

    Returns a warning when the parent run's log is not found (the report then covers this
    directory's steps only), else None.
    """
    run_dir = os.fspath(run_dir)
    log_path, summary = run_file(run_dir, LOG_NAME), run_file(run_dir, SUMMARY_NAME)
    if os.path.lexists(summary) and not os.path.isdir(summary):
        os.unlink(summary)
    warning = None
    parent_dir = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.realpath(parent_dir) != os.path.realpath(run_dir) and not log_has_steps(log_path):
        parent_log = run_file(parent_dir, LOG_NAME)
        if os.path.isfile(parent_log):
            with open(parent_log, encoding="utf-8", errors="replace") as f:
                lines = [line for line in f if line.endswith("\n")]
            atomic_write(log_path, lambda f: f.write("".join(lines)), binary=False)
        else:
            warning = (
                f"branching from {checkpoint}: no log.jsonl beside it, so this run's log starts at step {step}; "
                "leap report and leap flops count the logged steps only, summary.json the whole run"
            )
    truncate_log(log_path, step)
    return warning


def previous_run_files(run_dir: str) -> list[str]:
    """The files of an earlier run in ``run_dir`` that a new run would overwrite or orphan: its
    checkpoint, kept checkpoints, summary, and a log that holds training steps."""
    found = [p for p in (run_file(run_dir, CHECKPOINT_NAME), run_file(run_dir, SUMMARY_NAME)) if os.path.lexists(p)]
    found += [p for _, p in kept_checkpoints(run_dir)] + [p for _, p in epoch_checkpoints(run_dir)]
    log_path = run_file(run_dir, LOG_NAME)
    if log_has_steps(log_path):
        found.append(log_path)
    return found


def _newest_kept(self: Any, run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest kept checkpoint of ``run_dir`` that loads and validates, as ``(path, checkpoint)``."""
    for _, path in kept_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            self._info(f"not resuming from {path}: {e}", level=logging.WARNING)
    return None


def read_resume_checkpoint(self: Any) -> tuple[str, dict[str, Any]] | None:
    """Load ``--resume`` (if any) as ``(path, checkpoint)``; refuse to silently overwrite a run.

    ``--resume auto`` (or ``--resume RUN_DIR``) takes ``checkpoint.pt``, else the newest valid kept
    ``checkpoint-stepN.pt``; without ``--resume``, a run directory holding an earlier run is refused.
    """
    cfg = self.cfg
    path = cfg.resume_path
    if path is None:
        previous = previous_run_files(cfg.out)
        if previous:
            what = "a checkpoint" if os.path.lexists(self.ckpt_path) else "a previous run"
            raise ConfigError(
                f"{cfg.out} already holds {what} ({', '.join(os.path.basename(p) for p in previous)}); pass "
                "--resume auto to continue that run, or choose another --out"
            )
        return None
    auto = cfg.resume == "auto"
    if os.path.isdir(path):  # --resume RUN_DIR: that run's checkpoint
        auto, run_dir, path = True, path, run_file(path, CHECKPOINT_NAME)
    else:
        run_dir = os.path.dirname(path) or "."
    if auto and not os.path.exists(path):
        kept = _newest_kept(self, run_dir)
        if kept is not None:
            self._info(f"no {path}: resuming from the newest kept checkpoint {kept[0]}", level=logging.WARNING)
            return kept
        if cfg.resume != "auto":
            raise InputNotFoundError(f"--resume {cfg.resume}: the run directory holds no checkpoint")
        previous = previous_run_files(cfg.out)
        if previous:
            raise ConfigError(
                f"--resume auto: {cfg.out} holds a previous run ({', '.join(os.path.basename(p) for p in previous)}) "
                "but no checkpoint that loads; start the new run in another --out (or remove those files)"
            )
        self._info(f"--resume auto: no checkpoint at {path} yet, starting a new run")
        return None
    return path, load_checkpoint(path)


def kernel_backend(device: Any) -> str:
    """The kernel backend that runs the fused loss on ``device`` now (the forced one, or the automatic
    choice): recorded in the run's ``resolved`` settings, compared on resume."""
    import torch

    from leap_kernels._backends import select_backend

    try:
        return select_backend("fused_feature_loss", [torch.empty(1, 1, device=device)])
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"no kernel backend can run the loss on {device}: {e}") from None


def resume_from(self: Any, path: str, ckpt: dict[str, Any]) -> None:
    """Continue from the checkpoint ``ckpt`` read from ``path``."""
    cfg = self.cfg
    extra = check_resume_compatible(path, ckpt["config"], cfg.to_dict(), ckpt["dims"], self.dims)
    changes = ", ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in extra)
    saved_backend = (ckpt.get("resolved") or {}).get("kernel_backend")
    if saved_backend is not None and saved_backend != self.resolved.get("kernel_backend"):
        # Another backend rounds differently: the run continues, but not bit for bit.
        changes += (
            ", " if changes else ""
        ) + f"kernel backend: {saved_backend!r} -> {self.resolved['kernel_backend']!r}"
    if changes:
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
    try:
        self.scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {path}: a malformed scheduler state ({e})") from None
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
        try:
            restore_rng_state(mine, {"mixup": self.mixup_gen})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot resume from {path}: a malformed RNG state ({type(e).__name__}: {e})"
            ) from None
        if cfg.curriculum_sync == "per-rank" and len(rng) == self.group.world_size and "curriculum" in mine:
            with warnings.catch_warnings():  # changed settings are named in one line above
                warnings.filterwarnings("ignore", message="Curriculum.load_state_dict: config differs")
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
    self.flush_steps()  # every checkpoint is a read point: a non-finite or diverged step is never saved
    if not all_finite(self.params) or not all_finite(t for _, t in state_tensors(self.optimizer.state_dict()["state"])):
        raise self._stop(
            f"student/head weights became non-finite by step {self.step} (epoch {self.epoch + 1}); "
            f"the checkpoint was NOT overwritten. Last good checkpoint: {self._last_good_text()}.",
            self.step,
        )
    self._guard.check_weights(self.params, self.step, self._guard.last_good_text(self.last_good))
    merge_decode_failures(self)  # files found bad so far travel in the checkpoint: counted once after a resume
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
        try:
            atomic_save(ckpt, self.ckpt_path)
        except (OSError, RuntimeError) as e:  # a full disk, ulimit -f, a read-only remount, ...
            if isinstance(e, RuntimeError) and not any(s in str(e) for s in _TORCH_WRITE_FAILURES):
                raise  # not a write failure (e.g. a DataLoader worker died meanwhile)
            raise _write_failure(self, e) from None
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


#: How torch.save reports a write that failed under it (the zip writer's own wording).
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def _write_failure(self: Any, error: BaseException) -> RunDirError:
    """One line for a checkpoint that could not be written: why, the free space, what survived (and an
    ``error`` record, when the log can still be written)."""
    text = str(error) if isinstance(error, RunDirError) else describe_write_failure(self.ckpt_path, error)
    msg = (
        f"{text}; the previous checkpoint is intact: {self._last_good_text()}. Free space (or raise the limit), "
        "then continue with --resume auto"
    )
    try:
        self._log({"type": "error", "step": self.step, "epoch": self.epoch, "message": msg})
    except RunDirError:
        pass
    return RunDirError(msg)


def worker_lost(self: Any, error: RuntimeError) -> TrainingError | None:
    """For a DataLoader worker that died (killed by the out-of-memory killer, or crashed): the error to
    stop with (one line: what happened, the last good checkpoint, how to resume), after logging an
    ``error`` record. None for any other error."""
    text = str(error)
    if "DataLoader worker (pid" not in text:
        return None
    msg = (
        f"a DataLoader worker died during step {self.step + 1} ({text.splitlines()[0].strip()}): it was probably "
        f"killed by the out-of-memory killer. Last good checkpoint: {self._last_good_text()}. Continue with "
        "--resume auto, with fewer --workers or a smaller --batch-size if memory is short"
    )
    self._log({"type": "error", "step": self.step + 1, "epoch": self.epoch, "message": msg})
    return TrainingError(msg)


def merge_decode_failures(self: Any) -> int:
    """Merge the undecodable files found so far (by any rank's workers, the start-up probe included) into
    the run's statistics; every rank must call it (one gather under DDP). Returns how many are new."""
    found = self.dataset.failed_indices() if hasattr(self.dataset, "failed_indices") else []
    if self.group.enabled:
        found = [i for part in self.group.all_gather_object(found) for i in part]
    return self.stats.add_decode_failures(found)


def epoch_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """``[(epoch, path), ...]`` of the per-epoch checkpoints of a run (``checkpoint-epochE.pt``), oldest first."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = ((EPOCH_CHECKPOINT_RE.match(n), n) for n in names)
    return sorted((int(m.group(1)), os.path.join(os.fspath(run_dir), n)) for m, n in found if m)


def keep_epoch_checkpoint(self: Any) -> str | None:
    """After the checkpoint of an epoch end: keep it as ``checkpoint-epochE.pt`` (E = epochs done; a hard link,
    no copy) when ``--save-every-epochs N`` asks for E (every Nth, and the last), and print the disk cost
    (rank 0). Returns the kept path, or ``None``."""
    every, epoch = self.cfg.save_every_epochs, self.epoch
    if not every or not self.group.is_main or not (epoch % every == 0 or epoch == self.cfg.epochs):
        return None
    target = run_file(self.run_dir, f"checkpoint-epoch{epoch:04d}.pt")
    if not os.path.exists(target):
        try:
            os.link(self.ckpt_path, target)
        except OSError:  # no hard links on this filesystem
            shutil.copyfile(self.ckpt_path, target)
    size = os.path.getsize(target)
    kept = epoch_checkpoints(self.run_dir)
    planned = len({e for e in range(every, self.cfg.epochs + 1, every)} | {self.cfg.epochs})
    self._info(
        f"kept {os.path.basename(target)} ({size / 2**20:.1f} MiB); {len(kept)} epoch checkpoint(s), "
        f"{sum(os.path.getsize(p) for _, p in kept) / 2**20:.1f} MiB in all, about {planned * size / 2**20:.1f} MiB "
        f"for the {planned} of this run (--save-every-epochs {every})"
    )
    return target
