"""The LEAP training loop (spec sections 2-4): one step function for the baseline and LEAP.

Library use::

    from leap.train import TrainConfig, train
    summary = train(TrainConfig(teacher="vit_giant_patch14_reg4_dinov2",
                                teacher_weights="dinov2_vitg14_reg4.pth",
                                student="vit_small_patch14_dinov2",
                                data="/data/imagenet100", epochs=100, batch_size=64))

One step (:meth:`Trainer.train_step`), identical for ``curriculum="cka"`` (LEAP) and
``curriculum="off"`` (baseline, whose controller is simply pinned to the last block):

1. mixup (one lambda per batch); the same mixed images go to teacher and student;
2. first step only: calibration -- project the random student's patch features, score
   every teacher block with linear CKA in one ``teacher.scan`` pass, start at the argmax
   (skipped for the baseline or when ``start_block`` is set);
3. teacher forward up to ``k = curriculum.block`` only (early exit), no grad;
4. student forward (autocast), loss = fused projection+MSE on the patch tokens
   ``+ cls_weight *`` the same on the CLS token, through one shared head;
5. backward, grad-norm clipping, optimizer + lr-schedule step;
6. every ``cka_every`` steps: CKA of the detached projected student vs the target,
   ``curriculum.observe`` (may level up for the next step).

Run directory (rank 0 writes it): ``log.jsonl`` (step / epoch / level_up / calibration /
checkpoint / resume records), ``checkpoint.pt`` (atomic), ``summary.json``.

DDP: launched by ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment),
NCCL on CUDA and gloo on CPU. The student and head live in one :class:`DistillModule`
wrapped in DDP; every rank calls the curriculum at the same points (it all-reduces the
CKA), so all ranks always target the same block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from leap_kernels import FeatureDistillationHead

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    all_finite,
    atomic_save,
    capture_rng_state,
    check_resume_compatible,
    load_checkpoint,
    restore_rng_state,
)
from .config import ConfigError, TrainConfig
from .curriculum import Curriculum, linear_cka
from .data import FirstN, build_dataset, build_loader, mixup, set_loader_epoch
from .flops import CostModel, TeacherFlopsTracker
from .models import build_model, check_compatible, load_teacher_weights
from .optim import WarmupCosine, build_optimizer, peak_lr
from .teacher import TruncatedTeacher

__all__ = [
    "TrainConfig",
    "ConfigError",
    "TrainingError",
    "NonFiniteLossError",
    "DistillModule",
    "Trainer",
    "train",
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "SUMMARY_NAME",
]

log = logging.getLogger("leap.train")

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"


class TrainingError(RuntimeError):
    """Training cannot continue (the message says why and what to do)."""


class NonFiniteLossError(TrainingError):
    """The loss (or the gradients / weights) became NaN or Inf."""


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class DistillModule(nn.Module):
    """Student + projection head in one module (the unit DDP wraps).

    ``forward(images (B,3,H,W), target_patch (B,N,D_t), target_cls (B,D_t))`` returns
    ``(loss, patch_loss, cls_loss, student_patch (B,N,D_s) detached)``; the losses are fp32
    0-d tensors from :func:`leap_kernels.fused_feature_loss` (through the head), with
    ``loss = patch_loss + cls_weight * cls_loss``.

    Args:
        student: timm ViT; its final-norm output is split into CLS (token 0) and patches
            (after ``num_prefix_tokens``).
        head: :class:`leap_kernels.FeatureDistillationHead` ``(D_s -> D_t)``, shared by
            patch tokens and CLS.
        cls_weight: weight of the CLS term (paper: 0.05).
        compute_dtype: under autocast, the student features are cast to this dtype before
            the fused loss, as autocast would do for a Linear (LayerNorm outputs fp32).
    """

    def __init__(self, student: nn.Module, head: FeatureDistillationHead, cls_weight: float,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.student = student
        self.head = head
        self.cls_weight = float(cls_weight)
        self.compute_dtype = compute_dtype
        self.num_prefix_tokens = int(student.num_prefix_tokens)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student ``(patch (B, N, D_s), cls (B, D_s))`` after its final norm."""
        x = self.student.forward_features(images)
        if self.compute_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.compute_dtype)
        return x[:, self.num_prefix_tokens:], x[:, 0]

    def forward(self, images: torch.Tensor, target_patch: torch.Tensor, target_cls: torch.Tensor):
        s_patch, s_cls = self.features(images)
        patch_loss = self.head(s_patch, target_patch)
        cls_loss = self.head(s_cls, target_cls)
        loss = patch_loss + self.cls_weight * cls_loss
        return loss, patch_loss, cls_loss, s_patch.detach()


class _CountingTeacher(TruncatedTeacher):
    """TruncatedTeacher that counts the blocks it actually runs (a host-side int, no sync)."""

    blocks_run: int = 0

    def block_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.blocks_run += 1
        return super().block_forward(block, x)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


@dataclass
class _DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_pref: str) -> _DistInfo:
    """Join (or create from the torchrun environment) the default process group."""
    if dist.is_available() and dist.is_initialized():
        return _DistInfo(dist.get_rank(), dist.get_world_size(),
                         int(os.environ.get("LOCAL_RANK", dist.get_rank())), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and not device_pref.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _DistInfo(rank, world, local_rank, owns_group=True)


def _resolve_device(pref: str, info: _DistInfo) -> torch.device:
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as e:
        raise ConfigError(f"--device: invalid device {pref!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {pref}: CUDA is not available on this machine; use --device cpu")
        if info.enabled:  # one GPU per rank, chosen by LOCAL_RANK
            device = torch.device("cuda", info.local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _resolve_precision(pref: str, device: torch.device) -> str:
    if pref == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if pref == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return pref


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sanitize(value: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


class _JsonlLog:
    """Append-only JSON-lines log, flushed per record (rank 0 only; no-op elsewhere)."""

    def __init__(self, path: str | None, *, truncate: bool):
        self.path = path
        self._f = open(path, "w" if truncate else "a", encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(_sanitize(record), allow_nan=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _new_epoch_stats() -> dict[str, float]:
    return {"steps": 0, "loss_sum": 0.0, "patch_loss_sum": 0.0, "cls_loss_sum": 0.0, "block_sum": 0,
            "teacher_blocks_run": 0, "images": 0, "time_s": 0.0, "cka_sum": 0.0, "cka_count": 0}


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`fit`.

    Attributes of interest after construction: ``module`` (the :class:`DistillModule`,
    unwrapped), ``teacher``, ``curriculum``, ``optimizer``, ``scheduler``, ``loader``,
    ``step`` (steps done), ``epoch`` (epoch in progress), ``block_history`` (target block of
    every step run by this process), ``run_dir``.

    Under DDP (``WORLD_SIZE`` > 1 in the environment) the constructor joins the process
    group; :meth:`fit` leaves it (destroying it if the trainer created it).
    """

    def __init__(self, config: TrainConfig):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.cfg = config.validate()
        self.dist = _init_distributed(self.cfg.device)
        self._log_file: _JsonlLog | None = None
        self._bar = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg, info = self.cfg, self.dist
        self.device = _resolve_device(cfg.device, info)
        self.precision = _resolve_precision(cfg.precision, self.device)
        self.amp_dtype = _DTYPES[self.precision] if self.precision != "fp32" else None
        self.run_dir = cfg.out
        self.ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)

        # Cheap checks first, so bad input fails before a large teacher is built.
        self._resume_ckpt = self._read_resume_checkpoint()
        # ---- data
        data_kw = {"num_images": cfg.synthetic_size, "seed": cfg.seed} if cfg.data_source == "synthetic" else {}
        self.dataset = build_dataset(cfg.data_source, cfg.data, "train", cfg.img_size, augment=cfg.augment,
                                     **data_kw)
        if cfg.limit_images is not None:
            self.dataset = FirstN(self.dataset, cfg.limit_images)
        self.loader = build_loader(
            self.dataset, cfg.batch_size, shuffle=True, num_workers=cfg.workers, seed=cfg.seed,
            distributed=info.enabled, drop_last=True, pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader)
        self.global_batch = cfg.batch_size * info.world_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(self.dataset)} images, fewer than one global batch "
                f"({cfg.batch_size} x {info.world_size} rank(s)); lower --batch-size"
            )

        # ---- models
        teacher_model = build_model(cfg.teacher, img_size=cfg.img_size, **cfg.teacher_overrides)
        if cfg.teacher_weights:
            fmt = load_teacher_weights(teacher_model, cfg.teacher_weights)
            self._info(f"loaded teacher weights from {cfg.teacher_weights} ({fmt} layout)")
        else:
            self._info("no --teacher-weights given: the teacher keeps random weights (smoke runs/tests only)",
                       level=logging.WARNING)
        student = build_model(cfg.student, img_size=cfg.img_size, **cfg.student_overrides)
        check_compatible(teacher_model, student)
        if getattr(student, "cls_token", None) is None:
            raise ConfigError(f"--student {cfg.student}: the student needs a CLS token (class_token=True)")

        # Teacher precision: bf16 whenever mixed precision is on (bf16's range is safe for a
        # 40-block teacher even when the student runs fp16); fp32 otherwise.
        teacher_dtype = torch.float32 if self.precision == "fp32" else torch.bfloat16
        self.teacher = _CountingTeacher(teacher_model.to(self.device), dtype=teacher_dtype)
        self.num_blocks = self.teacher.num_blocks

        head = FeatureDistillationHead(int(student.embed_dim), self.teacher.embed_dim,
                                       normalize=cfg.loss == "token-mse")
        self.module = DistillModule(student, head, cfg.cls_weight, compute_dtype=self.amp_dtype).to(self.device)
        # Analytic FLOPs of what the run spends vs the full-depth baseline (logged per epoch).
        self.flops = TeacherFlopsTracker(CostModel(teacher_model, student))
        self.module.train()
        if info.enabled:
            ddp_kw = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model: nn.Module = nn.parallel.DistributedDataParallel(self.module, **ddp_kw)
        else:
            self.model = self.module

        self.dims = {
            "teacher_blocks": self.num_blocks,
            "teacher_dim": self.teacher.embed_dim,
            "student_blocks": len(student.blocks),
            "student_dim": int(student.embed_dim),
            "patch_grid": list(self.teacher.patch_grid),
            "world_size": info.world_size,
        }

        # ---- optimization
        self.peak_lr = peak_lr(cfg.optimizer, cfg.resolved_lr, self.global_batch)
        self.optimizer = build_optimizer(
            cfg.optimizer, self.module.named_parameters(), lr=self.peak_lr,
            weight_decay=cfg.resolved_weight_decay, momentum=cfg.momentum,
            trust_coefficient=cfg.trust_coefficient,
        )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = WarmupCosine(self.optimizer, warmup_steps=self.warmup_steps,
                                      total_steps=self.total_steps, min_lr_ratio=cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.params = [p for p in self.module.parameters() if p.requires_grad]

        # ---- curriculum (baseline = disabled controller: pinned to the last block)
        self.curriculum = Curriculum(
            self.num_blocks, tau=cfg.tau, alpha=cfg.alpha,
            max_epochs_per_block=cfg.max_epochs_per_block or None,
            start_block=cfg.start_block, snap_to_last=cfg.snap_to_last,
            enabled=cfg.curriculum == "cka",
        )
        # Mixup draws from its own CPU generator (no device sync), different per rank.
        self.mixup_gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + info.rank * 7919 + 17) % 2**63)

        # ---- run state
        self.epoch = 0
        self.step = 0
        self.step_in_epoch = 0
        self.epoch_stats = _new_epoch_stats()
        self.totals: dict[str, Any] = {"teacher_blocks_run": 0, "block_sum": 0, "images": 0, "time_s": 0.0,
                                       "decode_failures": 0, "start_block": None, "last_loss": None,
                                       "last_epoch_mean_loss": None}
        self.block_history: list[int] = []
        self.last_good: str | None = None
        self._last_saved_step = -1
        self._decode_seen = 0
        self.resolved = {
            "device": str(self.device), "precision": self.precision, "world_size": info.world_size,
            "global_batch": self.global_batch, "lr": cfg.resolved_lr, "peak_lr": self.peak_lr,
            "weight_decay": cfg.resolved_weight_decay, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "teacher_dtype": str(teacher_dtype).replace("torch.", ""),
        }

        resumed_from = self._maybe_resume()
        if info.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            self._log_file = _JsonlLog(os.path.join(cfg.out, LOG_NAME), truncate=resumed_from is None)
        else:
            self._log_file = _JsonlLog(None, truncate=False)
        if resumed_from is None:
            self._log({"type": "config", "config": cfg.to_dict(), "resolved": self.resolved, "dims": self.dims})
        else:
            self._log({"type": "resume", "checkpoint": resumed_from, "step": self.step, "epoch": self.epoch,
                       "step_in_epoch": self.step_in_epoch})

    def _read_resume_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
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

    def _maybe_resume(self) -> str | None:
        """Apply the checkpoint read by :meth:`_read_resume_checkpoint`; return its path (or None)."""
        cfg = self.cfg
        if self._resume_ckpt is None:
            return None
        path, ckpt = self._resume_ckpt
        self._resume_ckpt = None  # free the host copy of the weights once applied
        extra = check_resume_compatible(path, ckpt["config"], cfg.to_dict(), ckpt["dims"], self.dims)
        if extra:
            changes = ", ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in extra)
            self._info(f"resuming with changed settings ({changes}); the run will not match an "
                       "uninterrupted one", level=logging.WARNING)
        try:
            self.module.student.load_state_dict(ckpt["student"])
            self.module.head.load_state_dict(ckpt["head"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.curriculum.load_state_dict(ckpt["curriculum"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {path}: {e}") from None
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
        self.epoch_stats = {**_new_epoch_stats(), **ckpt.get("epoch_stats", {})}
        self.totals.update(ckpt.get("totals", {}))
        if "flops" in ckpt:
            self.flops.load_state_dict(ckpt["flops"])
        if self.step_in_epoch > self.steps_per_epoch:
            raise CheckpointError(
                f"cannot resume from {path}: it is {self.step_in_epoch} batches into epoch {self.epoch}, "
                f"but an epoch now has only {self.steps_per_epoch} (did the dataset change?)"
            )
        rng = ckpt.get("rng")
        if rng:
            mine = rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0]
            restore_rng_state(mine, {"mixup": self.mixup_gen})
        self.last_good = path
        self._last_saved_step = self.step
        self._info(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1}, batch {self.step_in_epoch}), "
                   f"target block {self.curriculum.block}/{self.num_blocks}")
        return path

    # ------------------------------------------------------------------ small utilities

    def _info(self, msg: str, level: int = logging.INFO) -> None:
        if self.dist.is_main:
            log.log(level, msg)

    def _log(self, record: dict[str, Any]) -> None:
        if self._log_file is not None:
            self._log_file.write(record)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.dist.world_size
        return t

    def _last_good_text(self) -> str:
        return self.last_good if self.last_good else "none (no checkpoint was written yet)"

    def close(self) -> None:
        """Close the log and progress bar; leave the process group if this trainer created it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._log_file is not None:
            self._log_file.close()
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.dist.owns_group = False

    # ------------------------------------------------------------------ the step

    def _calibrate(self, images: torch.Tensor) -> None:
        """First step: pick the start block from the CKA of every teacher block (no grad)."""
        cur = self.curriculum
        scores = None
        scan_blocks = 0
        if cur.enabled and cur.start_block is None:
            with torch.no_grad(), self._autocast():
                s_patch, _ = self.module.features(images)
                s_proj = self.module.head.project(s_patch)
            before = self.teacher.blocks_run
            scores = self.teacher.scan(images, lambda k, patch, cls: linear_cka(s_proj, patch))
            scan_blocks = self.teacher.blocks_run - before
        start = cur.calibrate(scores, step=self.step + 1, epoch=self.epoch)
        self.totals["start_block"] = start
        self.totals["teacher_blocks_run"] += scan_blocks
        if scan_blocks:
            self.flops.add_teacher_blocks(scan_blocks, images.shape[0] * self.dist.world_size)
        self.epoch_stats["teacher_blocks_run"] += scan_blocks
        self._log({"type": "calibration", "step": self.step + 1, "epoch": self.epoch,
                   "scores": cur.calibration_scores, "start_block": start, "teacher_blocks_run": scan_blocks})
        self._info(f"calibration: start at teacher block {start}/{self.num_blocks}")

    def train_step(self, images: torch.Tensor) -> dict[str, Any]:
        """One optimizer step on a batch ``images (B, 3, H, W)``; returns the step record.

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
        t_patch, t_cls = self.teacher(images, k)  # blocks 1..k only, no grad
        blocks_run = self.teacher.blocks_run - before
        self.flops.add_step(blocks_run, images.shape[0] * self.dist.world_size)

        with self._autocast():
            loss, patch_loss, cls_loss, s_patch = self.model(images, t_patch, t_cls)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

        want_cka = step % cfg.cka_every == 0
        cka_t = None
        if want_cka:
            # Detached projected student (head before this step's update) vs the current target.
            with torch.no_grad():
                cka_t = linear_cka(self.module.head.project(s_patch), t_patch)

        grad_norm_t = None
        if cfg.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm_t = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        stats = [loss.detach(), patch_loss.detach(), cls_loss.detach()]
        if grad_norm_t is not None:
            stats.append(grad_norm_t.detach().to(torch.float32))
        if cka_t is not None:
            stats.append(cka_t.detach().reshape(()).to(torch.float32))
        # One small all-reduce + one host read per step, CKA included: the logged loss is the
        # global mean, a NaN on any rank is seen by all ranks, which then stop together, and
        # every rank hands the curriculum the same rank-mean CKA.
        values = self._all_reduce_mean(torch.stack([s.float() for s in stats])).tolist()
        loss_v, patch_v, cls_v = values[:3]
        grad_norm = values[3] if grad_norm_t is not None else None
        cka_v = values[-1] if cka_t is not None else None
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm) and not self.scaler.is_enabled()
        if not math.isfinite(loss_v) or bad_grad:
            what = f"loss is {loss_v}" if not math.isfinite(loss_v) else f"gradient norm is {grad_norm}"
            msg = (f"{what} at step {step} (epoch {self.epoch + 1}); training stopped before applying it. "
                   f"Last good checkpoint: {self._last_good_text()}. Try a lower --lr, --precision fp32, "
                   f"or --clip-grad, then --resume from that checkpoint.")
            self._log({"type": "error", "step": step, "epoch": self.epoch, "message": msg})
            raise NonFiniteLossError(msg)

        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        record: dict[str, Any] = {
            "type": "step", "step": step, "epoch": self.epoch, "loss": loss_v, "patch_loss": patch_v,
            "cls_loss": cls_v, "block": k, "lr": lr, "teacher_blocks_run": blocks_run,
            "mixup_lambda": lam,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if cka_t is not None:
            n_before = len(cur.level_ups)
            cur.observe(cka_v, step=step, epoch=self.epoch, already_reduced=True)
            record["cka"] = cur.last_cka
            record["_level_ups"] = cur.level_ups[n_before:]
        return record

    # ------------------------------------------------------------------ loop

    def _log_level_ups(self, entries, cka: float | None) -> None:
        for s, e, a, b, reason in entries:
            rec = {"type": "level_up", "step": s, "epoch": e, "from_block": a, "to_block": b, "reason": reason}
            if cka is not None and reason == "cka":
                rec["cka"] = cka
            self._log(rec)
            self._info(f"step {s}: target block {a} -> {b} ({reason})")

    def _progress_bar(self):
        from tqdm import tqdm

        enabled = self.cfg.progress and self.dist.is_main and sys.stderr.isatty()
        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, disable=not enabled,
                    desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", unit="step", dynamic_ncols=True,
                    leave=True, file=sys.stderr)

    def _max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _run_epoch(self) -> bool:
        """Train the rest of ``self.epoch``. False if stopped early by ``max_steps``."""
        cfg = self.cfg
        set_loader_epoch(self.loader, self.epoch, start_batch=self.step_in_epoch)
        self._decode_seen = self.dataset.decode_failures
        self._bar = self._progress_bar()
        t_last = time.perf_counter()
        try:
            for images, _labels in self.loader:
                record = self.train_step(images)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                self.step += 1
                self.step_in_epoch += 1
                record["images_per_s"] = self.global_batch / dt if dt > 0 else None
                level_ups = record.pop("_level_ups", [])
                self._log(record)
                self._log_level_ups(level_ups, record.get("cka"))
                self._account(record, dt)
                self._bar.update(1)
                post = {"loss": f"{record['loss']:.4g}", "block": f"{record['block']}/{self.num_blocks}"}
                if "cka" in record:
                    post["cka"] = f"{record['cka']:.3f}"
                if record["images_per_s"]:
                    post["img/s"] = f"{record['images_per_s']:.0f}"
                self._bar.set_postfix(post, refresh=False)

                at_epoch_end = self.step_in_epoch >= self.steps_per_epoch
                if at_epoch_end:
                    continue  # the epoch end (below) checkpoints
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                if self._max_steps_reached():
                    return False
        finally:
            self._bar.close()
            self._bar = None
        self._end_epoch()
        return True

    def _account(self, record: dict[str, Any], dt: float) -> None:
        st, tot = self.epoch_stats, self.totals
        st["steps"] += 1
        st["loss_sum"] += record["loss"]
        st["patch_loss_sum"] += record["patch_loss"]
        st["cls_loss_sum"] += record["cls_loss"]
        st["block_sum"] += record["block"]
        st["teacher_blocks_run"] += record["teacher_blocks_run"]
        st["images"] += self.global_batch
        st["time_s"] += dt
        if "cka" in record and record["cka"] is not None and math.isfinite(record["cka"]):
            st["cka_sum"] += record["cka"]
            st["cka_count"] += 1
        tot["teacher_blocks_run"] += record["teacher_blocks_run"]
        tot["block_sum"] += record["block"]
        tot["images"] += self.global_batch
        tot["time_s"] += dt
        tot["last_loss"] = record["loss"]
        self.block_history.append(record["block"])

    def _end_epoch(self) -> None:
        cur, st = self.curriculum, self.epoch_stats
        n_before = len(cur.level_ups)
        cur.epoch_end(epoch=self.epoch, step=self.step)
        self._log_level_ups(cur.level_ups[n_before:], None)

        # Each rank's dataset counts the bad files of its own shard: sum over ranks.
        new_failures = self.dataset.decode_failures - self._decode_seen
        if self.dist.enabled:
            t = torch.tensor([new_failures], dtype=torch.float32, device=self.device)  # NCCL: device tensor
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            new_failures = int(t.item())
        self.totals["decode_failures"] += new_failures
        steps = max(1, st["steps"])
        mean_loss = st["loss_sum"] / steps if st["steps"] else None
        record = {
            "type": "epoch", "epoch": self.epoch, "steps": st["steps"], "mean_loss": mean_loss,
            "mean_patch_loss": st["patch_loss_sum"] / steps if st["steps"] else None,
            "mean_cls_loss": st["cls_loss_sum"] / steps if st["steps"] else None,
            "mean_cka": st["cka_sum"] / st["cka_count"] if st["cka_count"] else None,
            "block": cur.block, "mean_block": st["block_sum"] / steps if st["steps"] else None,
            "epochs_on_block": cur.epochs_on_block,
            "decode_failures": new_failures, "decode_failures_total": self.totals["decode_failures"],
            "teacher_blocks_run_total": st["teacher_blocks_run"],
            "teacher_block_savings": 1.0 - st["teacher_blocks_run"] / (steps * self.num_blocks),
            "time_s": st["time_s"], "images_per_s": st["images"] / st["time_s"] if st["time_s"] > 0 else None,
            "lr": self.optimizer.param_groups[0]["lr"], "step": self.step,
        }
        record.update({k: v for k, v in self.flops.epoch_summary().items() if k not in ("steps", "images")})
        self._log(record)
        if new_failures:
            self._info(f"epoch {self.epoch + 1}: {new_failures} image(s) could not be decoded and were skipped",
                       level=logging.WARNING)
        self.totals["last_epoch_mean_loss"] = mean_loss
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_stats = _new_epoch_stats()
        self.save_checkpoint()

    def fit(self) -> dict[str, Any]:
        """Train until ``epochs`` (or ``max_steps``); return the summary (also in summary.json)."""
        try:
            status = "completed"
            while self.epoch < self.cfg.epochs:
                if self._max_steps_reached() or not self._run_epoch():
                    status = "stopped_at_max_steps"
                    break
            if self._last_saved_step != self.step:
                self.save_checkpoint()
            summary = self.summary(status)
            if self.dist.is_main:
                atomic_json(summary, os.path.join(self.run_dir, SUMMARY_NAME))
            self._log({"type": "summary", **{k: v for k, v in summary.items() if k != "config"}})
            return summary
        finally:
            self.close()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> str:
        """Write ``RUN_DIR/checkpoint.pt`` atomically (rank 0), after checking the weights are finite.

        Every rank must call it (the RNG states of all ranks are gathered into the file).

        Raises:
            NonFiniteLossError: the weights hold NaN/Inf; nothing is written, the last good
                checkpoint stays on disk.
        """
        if not all_finite(self.params):
            msg = (f"student/head weights became non-finite by step {self.step} (epoch {self.epoch + 1}); "
                   f"the checkpoint was NOT overwritten. Last good checkpoint: {self._last_good_text()}.")
            self._log({"type": "error", "step": self.step, "epoch": self.epoch, "message": msg})
            raise NonFiniteLossError(msg)
        rng = capture_rng_state({"mixup": self.mixup_gen})
        if self.dist.enabled:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        if self.dist.is_main:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "student": self.module.student.state_dict(),
                "head": self.module.head.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "curriculum": self.curriculum.state_dict(),
                "rng": rng_all,
                "epoch": self.epoch,
                "step": self.step,
                "step_in_epoch": self.step_in_epoch,
                "epoch_stats": dict(self.epoch_stats),
                "totals": dict(self.totals),
                "flops": self.flops.state_dict(),
                "config": self.cfg.to_dict(),
                "resolved": dict(self.resolved),
                "dims": dict(self.dims),
            }
            atomic_save(ckpt, self.ckpt_path)
            self._log({"type": "checkpoint", "step": self.step, "epoch": self.epoch,
                       "step_in_epoch": self.step_in_epoch, "path": self.ckpt_path})
        self.last_good = self.ckpt_path
        self._last_saved_step = self.step
        return self.ckpt_path

    # ------------------------------------------------------------------ summary

    def summary(self, status: str) -> dict[str, Any]:
        tot, cur = self.totals, self.curriculum
        steps = self.step
        full = steps * self.num_blocks
        return _sanitize({
            "status": status,
            "mode": "leap" if cur.enabled else "baseline",
            "run_dir": self.run_dir,
            "checkpoint": self.last_good,
            "steps": steps,
            "epochs": self.cfg.epochs,
            "epochs_completed": self.epoch,
            "num_blocks": self.num_blocks,
            "start_block": tot["start_block"],
            "final_block": cur.block,
            "mean_block": tot["block_sum"] / steps if steps else None,
            "level_ups": [{"step": s, "epoch": e, "from_block": a, "to_block": b, "reason": r}
                          for s, e, a, b, r in cur.level_ups],
            "calibration_scores": cur.calibration_scores,
            "teacher_blocks_run": tot["teacher_blocks_run"],
            "teacher_blocks_full": full,
            "teacher_block_savings": 1.0 - tot["teacher_blocks_run"] / full if full else None,
            "final_loss": tot["last_loss"],
            "last_epoch_mean_loss": tot["last_epoch_mean_loss"],
            "images_seen": tot["images"],
            "train_time_s": tot["time_s"],
            "images_per_s": tot["images"] / tot["time_s"] if tot["time_s"] > 0 else None,
            "decode_failures": tot["decode_failures"],
            "mean_step_time_s": tot["time_s"] / steps if steps else None,
            "flops": {k: v for k, v in self.flops.totals().items() if k not in ("steps", "images")},
            "resolved": self.resolved,
            "config": self.cfg.to_dict(),
        })


def atomic_json(obj: Any, path: str) -> None:
    """Write JSON to ``path`` via a temp file + ``os.replace``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Run one distillation from a :class:`TrainConfig` (or a dict of its fields).

    Returns the summary dict (also written to ``RUN_DIR/summary.json`` by rank 0).
    Under ``torchrun`` every process calls this; the process group is created from the
    environment and destroyed at the end.
    """
    return Trainer(config).fit()
