"""What a training run is built from, in the order that fixes its random state: the data
(:func:`build_data`), the teacher, student, head and cost model (:func:`build_models`), and the
optimizer, lr schedule and grad scaler (:func:`build_optimization`).

:class:`leap.run.loop.Trainer` calls them once, after seeding; keeping the order keeps a run's
initial weights identical for a given ``--seed``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from leap_kernels import FeatureDistillationHead
from leap_kernels.ops.fp8_linear import emulation_warning, fp8_linears

from ..config import TrainConfig
from ..cost import CostModel, TeacherFlopsTracker
from ..data import DeviceBatchLoader, FirstN, build_dataset, build_device_loader, build_loader
from ..distributed import ProcessGroup
from ..errors import ConfigError, ModelError
from ..models import build_model, check_compatible, load_teacher_weights
from ..objective import ConcatDistillModule, CountingTeacher, DistillModule, OneToOneDistillModule
from ..optim import WarmupCosine, build_optimizer, peak_lr
from ..precision import amp_dtype, resolve_teacher_dtype

__all__ = ["Models", "Optimization", "build_data", "build_models", "build_optimization", "resolve_config"]


def resolve_config(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` with the values that follow from others filled in, as the run saves them: ``warmup_epochs``
    (unset: the reference's ``min(10, epochs / 10)``) and ``batch_size`` (``--global-batch`` / ``world_size``).

    Raises:
        ConfigError: ``--global-batch`` is not a multiple of ``world_size``.
    """
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else min(10.0, cfg.epochs / 10)
    batch = cfg.batch_size
    if cfg.global_batch is not None:
        if cfg.global_batch % world_size:
            raise ConfigError(
                f"--global-batch {cfg.global_batch}: not divisible by the {world_size} processes of the run; "
                f"give a multiple of {world_size} (e.g. {world_size * max(1, cfg.global_batch // world_size)})"
            )
        batch = cfg.global_batch // world_size
    return dataclasses.replace(cfg, warmup_epochs=warmup, batch_size=batch)


def build_data(
    cfg: TrainConfig, group: ProcessGroup, device: torch.device
) -> tuple[Dataset, DataLoader | DeviceBatchLoader]:
    """The training set and its loader (sharded over the ranks under DDP, whole batches only); with
    ``--data-pipeline device`` a :class:`~leap.data.DeviceBatchLoader` that yields augmented batches on ``device``.

    Raises:
        ConfigError: the dataset holds fewer images than one global batch.
    """
    data_kw = {"num_images": cfg.synthetic_size, "seed": cfg.seed} if cfg.data_source == "synthetic" else {}
    dataset = build_dataset(cfg.data_source, cfg.data, "train", cfg.img_size, augment=cfg.augment, **data_kw)
    if cfg.limit_images is not None:
        dataset = FirstN(dataset, cfg.limit_images)
    loader_kw = {"shuffle": True, "num_workers": cfg.workers, "seed": cfg.seed, "distributed": group.enabled}
    if cfg.data_pipeline == "device":  # workers read the files; decode + augmentation run on `device`
        kw = {"img_size": cfg.img_size, "augment": cfg.augment, "drop_last": True, **loader_kw}
        loader: DataLoader | DeviceBatchLoader = build_device_loader(dataset, cfg.batch_size, device, **kw)
    else:
        loader = build_loader(dataset, cfg.batch_size, drop_last=True, pin_memory=device.type == "cuda", **loader_kw)
    if len(loader) == 0:
        raise ConfigError(
            f"the dataset has {len(dataset)} images, fewer than one global batch "
            f"({cfg.batch_size} x {group.world_size} rank(s)); lower --batch-size"
        )
    return dataset, loader


@dataclass
class Models:
    """The frozen teacher, the trained student + head, and the run's FLOP counters."""

    teacher: CountingTeacher
    module: DistillModule
    flops: TeacherFlopsTracker
    dims: dict[str, Any]  # model dimensions, checked on resume


def build_models(
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    info: Callable[..., None] = lambda msg, level=logging.INFO: None,
) -> Models:
    """Teacher (weights loaded, truncatable, counting its blocks), student and projection head.

    The teacher's weights are in ``--teacher-dtype`` (:func:`leap.precision.resolve_teacher_dtype`:
    by default bf16 for bf16 runs, fp32 for fp32 and fp16 runs, the latter under the step's autocast).
    ``--teacher-precision fp8`` puts the teacher's block linears in FP8 (:mod:`leap_kernels.ops.fp8_linear`), with a
    warning where they run the emulated path (no FP8 tensor cores on ``device``).
    ``--curriculum one-to-one`` builds a :class:`~leap.objective.OneToOneDistillModule`.

    Raises:
        ModelError: unknown models, mismatched patch grids, a student without a CLS token.
        CheckpointError, InputNotFoundError: unreadable or missing ``--teacher-weights``.
    """
    teacher_model = build_model(cfg.teacher, img_size=cfg.img_size, **cfg.teacher_overrides)
    depth = len(teacher_model.blocks)
    for name in ("start_block", "snap_to_last"):  # blocks are 1..depth: a larger one would never be reached
        if getattr(cfg, name) is not None and getattr(cfg, name) > depth:
            raise ConfigError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)}: the teacher {cfg.teacher} has {depth} blocks; "
                f"give a block in 1..{depth}"
            )
    if cfg.teacher_weights:
        fmt = load_teacher_weights(teacher_model, cfg.teacher_weights, pos_embed_interpolation=cfg.teacher_pos_embed)
        info(f"loaded teacher weights from {cfg.teacher_weights} ({fmt} layout)")
    else:
        info(
            "no --teacher-weights given: the teacher keeps random weights (smoke runs/tests only)",
            level=logging.WARNING,
        )
    student = build_model(cfg.student, img_size=cfg.img_size, **cfg.student_overrides)
    check_compatible(teacher_model, student)
    if getattr(student, "cls_token", None) is None:
        raise ModelError(f"--student {cfg.student}: the student needs a CLS token (class_token=True)")

    # Analytic FLOPs of what the run spends vs the full-depth baseline (logged per epoch); the
    # per-step CKA only counts when the run measures it (the baselines by default do not). Read
    # before the teacher is built: --teacher-precision fp8 replaces its nn.Linear layers, and the
    # FLOPs are the same whatever the precision.
    flops = TeacherFlopsTracker(
        CostModel(
            teacher_model,
            student,
            include_cka=cfg.resolved_cka_every is not None,
            concat_teacher_last=cfg.concat_teacher_last,
        )
    )

    teacher_dtype = resolve_teacher_dtype(cfg.teacher_dtype, precision)
    if cfg.teacher_offload and device.type != "cpu":
        # Only the embedding, tokens and final norm move now; blocks follow the deepest target reached.
        teacher = CountingTeacher(
            teacher_model, dtype=teacher_dtype, precision=cfg.teacher_precision, offload=True, device=device
        )
        info(f"teacher offload: blocks stay in pinned CPU memory until a target block reaches them on {device}")
    else:
        teacher = CountingTeacher(teacher_model.to(device), dtype=teacher_dtype, precision=cfg.teacher_precision)
    if teacher.precision == "fp8":
        warning = emulation_warning(teacher.model, device)
        if warning is not None:
            info(warning, level=logging.WARNING)
        else:
            info(f"FP8 teacher: {len(fp8_linears(teacher.model))} block linears on torch._scaled_mm")
    width = teacher.embed_dim * (2 if cfg.concat_teacher_last else 1)  # the concat target [t_k ; t_L]: 2 D_t
    head = FeatureDistillationHead(int(student.embed_dim), width, normalize=cfg.loss == "token-mse")
    if cfg.concat_teacher_last:
        module: DistillModule = ConcatDistillModule(student, head, cfg.cls_weight, compute_dtype=amp_dtype(precision))
    elif cfg.curriculum == "one-to-one":
        module = OneToOneDistillModule(
            student, head, cfg.cls_weight, amp_dtype(precision), teacher_blocks=teacher.num_blocks
        )
    else:
        module = DistillModule(student, head, cfg.cls_weight, compute_dtype=amp_dtype(precision))
    module = module.to(device)
    dims = {
        "teacher_blocks": teacher.num_blocks,
        "teacher_dim": teacher.embed_dim,
        "student_blocks": len(student.blocks),
        "student_dim": int(student.embed_dim),
        "patch_grid": list(teacher.patch_grid),
        **({"target": "concat"} if cfg.concat_teacher_last else {}),  # the head is 2 D_t wide: no resume across
    }
    return Models(teacher, module, flops, dims)


@dataclass
class Optimization:
    """Optimizer over the student + head, its per-step schedule and the fp16 grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler
    peak_lr: float
    total_steps: int
    warmup_steps: int


def build_optimization(
    cfg: TrainConfig,
    module: torch.nn.Module,
    steps_per_epoch: int,
    global_batch: int,
    device: torch.device,
    precision: str,
) -> Optimization:
    """LARS or AdamW at the peak lr of ``global_batch``, warmup-cosine over ``epochs`` epochs."""
    peak = peak_lr(cfg.optimizer, cfg.resolved_lr, global_batch)
    optimizer = build_optimizer(
        cfg.optimizer,
        module.named_parameters(),
        lr=peak,
        weight_decay=cfg.resolved_weight_decay,
        momentum=cfg.momentum,
        trust_coefficient=cfg.trust_coefficient,
    )
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))  # resolved (resolve_config)
    scheduler = WarmupCosine(
        optimizer, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return Optimization(optimizer, scheduler, scaler, peak, total_steps, warmup_steps)
