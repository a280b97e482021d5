"""Training configuration: the :class:`TrainConfig` dataclass, its validation, and
:class:`TeacherTrainConfig` (the recipe of ``leap train-teacher``). Fields become options and config
file keys through :mod:`leap.config_schema`.

Every field of :class:`TrainConfig` carries its documentation in its metadata (``help``,
``group``, ``metavar``, ``choices``, ``min``), which is the single source of the
``leap distill`` options (:func:`leap.cli.options.add_config_options` generates them:
``field_name`` -> ``--field-name``; booleans ``augment``/``mixup``/``progress`` are
``--no-augment``/``--no-mixup``/``--no-progress``), of the options other commands share
with it, and of the keys of a ``--config`` YAML/JSON file. Keys in a file may be written
``snake_case`` or ``kebab-case`` (``no_mixup: true`` also works); unknown keys are an error.

Why this module is long: every option of ``leap distill`` is declared here once, with its help
text; the field declarations are most of the module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from .config_checks import check_kernel_environment, check_model_overrides
from .config_schema import FieldSpec, dataclass_fields
from .config_schema import coerce as _coerce_to_spec
from .config_schema import field_specs as _specs_of
from .config_schema import normalize_mapping as _normalize_with_specs
from .errors import ConfigError
from .runlog import CHECKPOINT_NAME, run_file

__all__ = [
    "TrainConfig",
    "TeacherTrainConfig",
    "CHOICES",
    "DATA_SOURCES",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "config_fields",
    "field_spec",
    "field_specs",
    "coerce",
    "normalize_mapping",
]

#: How ``--data`` is read (:func:`leap.data.build_dataset`).
DATA_SOURCES = ("auto", "folder", "fashion-mnist", "synthetic")

#: Allowed values of the string options.
CHOICES: dict[str, tuple[str, ...]] = {
    "data_source": DATA_SOURCES,
    "optimizer": ("lars", "adamw"),
    "loss": ("mse", "token-mse"),
    "curriculum": ("cka", "off", "fixed", "one-to-one"),
    "lr_reset": ("none", "peak", "envelope", "current"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "teacher_dtype": ("auto", "fp32", "bf16", "fp16"),
    "teacher_precision": ("auto", "fp8"),
    "teacher_pos_embed": ("auto", "bicubic", "bicubic-antialias", "bicubic-offset"),
    "curriculum_sync": ("mean", "per-rank"),
    "curriculum_metric": ("cka", "cosine"),
    "data_pipeline": ("cpu", "device"),
}

#: Default ``--lr`` per optimizer: LARS 6.0 (the paper's base lr, before sqrt batch scaling), AdamW 5e-4.
DEFAULT_LR = {"lars": 6.0, "adamw": 5e-4}
#: Default weight decay per optimizer: LARS 1e-6 (the paper), AdamW 0.05.
DEFAULT_WEIGHT_DECAY = {"lars": 1e-6, "adamw": 0.05}


def _opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    group: str,
    metavar: str | None = None,
    min: float | None = None,
    default_factory: Any = dataclasses.MISSING,
    show_default: bool = True,
) -> Any:
    """A dataclass field with its option metadata (``choices`` come from :data:`CHOICES`)."""
    meta = {"help": help, "group": group, "metavar": metavar, "min": min, "show_default": show_default}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of one distillation run (defaults = the paper's ViT-S recipe where it has one).

    Each field's meaning is in its ``help`` metadata (``leap distill --help`` prints it).
    """

    # models
    teacher: str = _opt(
        "",
        "teacher model name (timm ViT, e.g. vit_giant_patch14_reg4_dinov2); required",
        group="models",
        metavar="NAME",
    )
    teacher_weights: str | None = _opt(
        None,
        "local teacher checkpoint (.pth/.pt/.bin/.safetensors; official DINOv2, Hugging Face or timm "
        "layout). Without it the teacher is random (smoke tests only)",
        group="models",
        metavar="FILE",
    )
    student: str = _opt(
        "",
        "student model name (e.g. vit_small_patch14_dinov2, vit_tiny_patch14_dinov2); random init; required",
        group="models",
        metavar="NAME",
    )
    teacher_overrides: dict[str, Any] = _opt(
        help='JSON object of extra model arguments for the teacher, e.g. \'{"depth": 4, "embed_dim": 48}\'',
        group="models",
        metavar="JSON",
        default_factory=dict,
    )
    student_overrides: dict[str, Any] = _opt(
        help="JSON object of extra model arguments for the student",
        group="models",
        metavar="JSON",
        default_factory=dict,
    )
    img_size: int = _opt(
        224, "input resolution; teacher and student must give the same patch grid", group="models", metavar="PX", min=1
    )
    teacher_pos_embed: str = _opt(
        "auto",
        "how a teacher position embedding stored for another grid is resampled: auto = the "
        "source model's own rule (official DINOv2: bicubic-offset without registers, bicubic-antialias "
        "with; Hugging Face Dinov2: bicubic, with registers bicubic-antialias; timm: bicubic-antialias)",
        group="models",
    )
    # data
    data: str | None = _opt(
        None,
        "dataset path: a folder of class folders (optionally under train/), or a folder with Fashion-MNIST idx files",
        group="data",
        metavar="PATH",
    )
    data_source: str = _opt(
        "auto", "how to read --data; auto picks fashion-mnist for idx files, else folder", group="data"
    )
    synthetic_size: int = _opt(1024, "number of images for --data-source synthetic", group="data", metavar="N", min=1)
    limit_images: int | None = _opt(
        None, "train on the first N images of the source only (quick runs)", group="data", metavar="N", min=1
    )
    augment: bool = _opt(
        True, "DINO-style augmentation (random resized crop, flip, color jitter, grayscale)", group="data"
    )
    mixup: bool = _opt(True, "batch mixup, one lambda per batch, same images to teacher and student", group="data")
    workers: int | None = _opt(
        None,
        "DataLoader worker processes per GPU/process (default: from the CPU count)",
        group="data",
        metavar="N",
        min=0,
    )
    data_pipeline: str = _opt(
        "cpu",
        "where images are decoded and augmented: cpu = PIL in the DataLoader workers; device = the workers only "
        "read the files, --device decodes (nvjpeg on CUDA) and augments each batch (image folders only)",
        group="data",
    )
    # schedule
    epochs: int = _opt(100, "number of epochs", group="schedule", metavar="N", min=1)
    batch_size: int = _opt(
        64, "batch size per process (global batch = this x number of processes)", group="schedule", metavar="N", min=1
    )
    global_batch: int | None = _opt(
        None, "the per-process batch is N / processes (replaces --batch-size)", group="schedule", metavar="N", min=1
    )
    max_steps: int | None = _opt(
        None,
        "stop after N optimizer steps in total (the lr schedule still follows "
        "--epochs, so the run can be resumed exactly)",
        group="schedule",
        metavar="N",
        min=1,
    )
    # optimization
    optimizer: str = _opt("lars", "LARS (paper) or AdamW", group="optimization")
    lr: float | None = _opt(
        None,
        "base learning rate; LARS: peak = lr * sqrt(global_batch/1536), default 6.0; AdamW: peak = lr, default 5e-4",
        group="optimization",
        metavar="LR",
    )
    weight_decay: float | None = _opt(
        None,
        "weight decay (default: 1e-6 for LARS, 0.05 for AdamW); never applied to biases, norms, "
        "cls/register tokens, position embeddings or LayerScale",
        group="optimization",
        metavar="WD",
    )
    momentum: float = _opt(0.9, "LARS momentum", group="optimization", metavar="BETA")
    trust_coefficient: float = _opt(0.001, "LARS trust coefficient (eta)", group="optimization", metavar="ETA")
    warmup_epochs: float | None = _opt(
        None, "linear warmup epochs (fractions allowed); min(10, epochs/10)", group="optimization", metavar="EPOCHS"
    )
    min_lr_ratio: float = _opt(
        0.001, "final lr of the cosine decay, as a fraction of the peak", group="optimization", metavar="RATIO"
    )
    clip_grad: float = _opt(
        1.0, "clip the global gradient norm to this value (0 = off)", group="optimization", metavar="NORM"
    )
    precision: str = _opt(
        "auto",
        "auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = the reference's precision: "
        "fp16 autocast with a GradScaler, TF32 matmuls, teacher weights fp32 (CUDA only)",
        group="optimization",
    )
    teacher_dtype: str = _opt(
        "auto",
        "teacher weight dtype: auto = fp32 for --precision fp32 and fp16 (run under "
        "the step's autocast, as the reference does), bf16 for --precision bf16",
        group="optimization",
    )
    teacher_precision: str = _opt(
        "auto",
        "teacher block linears (qkv, proj, fc1, fc2): auto = in the teacher dtype; fp8 = FP8 e4m3 weights "
        "and inputs with per-row scales (FP8 tensor cores on NVIDIA GPUs of compute capability 8.9+; elsewhere, "
        "e.g. on a CPU, an emulated path with the same numerics that is slower than auto, with a warning)",
        group="optimization",
    )
    teacher_offload: bool = _opt(
        False,
        "keep the teacher blocks past the deepest target block reached so far in pinned CPU memory until a "
        "level-up needs them (a ViT-7B teacher is 13.4 GB in bf16); no effect on a CPU device",
        group="optimization",
    )
    # loss
    loss: str = _opt(
        "mse",
        "mse = the paper's MSE on projected features; token-mse = MSE of per-token "
        "normalized features (no loss jump when the target block changes)",
        group="loss",
    )
    cls_weight: float = _opt(
        0.05, "weight of the CLS-token loss (same head as the patch tokens)", group="loss", metavar="W"
    )
    # curriculum
    curriculum: str = _opt(
        "cka",
        "cka = LEAP adaptive target block; off = baseline, always the last teacher block; fixed = always "
        "--start-block K; one-to-one = ablation baseline: student block i (0-indexed) aligned to teacher "
        "block round((i+1)*L_t/L_s), each through its own projector",
        group="curriculum",
    )
    curriculum_metric: str = _opt(
        "cka",
        "similarity that drives calibration and level-ups: cka = linear CKA "
        "(--tau), cosine = mean per-token cosine (--cosine-tau)",
        group="curriculum",
    )
    curriculum_sync: str = _opt(
        "mean",
        "DDP: mean = every rank uses the rank-mean score and all target the same "
        "block; per-rank = the reference's behaviour: each rank calibrates, measures and "
        "levels up on its own batch",
        group="curriculum",
    )
    tau: float = _opt(
        0.85,
        "CKA threshold for moving to the next teacher block (paper: 0.85 ImageNet-100, 0.80 ImageNet-1K)",
        group="curriculum",
        metavar="TAU",
    )
    alpha: float = _opt(1.0, "EMA weight of each new CKA value (1 = no smoothing)", group="curriculum", metavar="A")
    max_epochs_per_block: float = _opt(
        5, "move on after M epochs on a block (fractions: in steps; 0 = never)", group="curriculum", metavar="M", min=0
    )
    cosine_tau: float = _opt(0.6, "threshold of --curriculum-metric cosine", group="curriculum", metavar="TAU")
    cka_every: int | None = _opt(
        None,
        "measure CKA (and maybe level up) every N steps; default 1 for LEAP, "
        "never for the baselines (set it to log CKA there)",
        group="curriculum",
        metavar="N",
        min=1,
        show_default=False,
    )
    start_block: int | None = _opt(
        None, "start at teacher block K (1-indexed), no CKA calibration", group="curriculum", metavar="K", min=1
    )
    snap_to_last: int | None = _opt(
        None, "once the target reaches block S, jump to the last (lr restart)", group="curriculum", metavar="S", min=1
    )
    lr_reset: str = _opt(
        "none", "at level-ups after warmup: restart a cosine from the peak, envelope or current lr", group="curriculum"
    )
    reset_head_on_level_up: bool = _opt(
        False, "re-initialise the head and its optimizer state at every level-up (ablation)", group="curriculum"
    )
    concat_teacher_last: bool = _opt(
        False, "target [t_k ; t_L] via one Linear(D_s -> 2 D_t); the teacher runs to L", group="curriculum"
    )
    # run
    out: str = _opt(
        "runs/leap", "run directory (log.jsonl, checkpoint.pt, summary.json)", group="run", metavar="RUN_DIR"
    )
    ckpt_every: int = _opt(
        1000, "also checkpoint every N steps (0 = only at epoch ends)", group="run", metavar="N", min=0
    )
    keep_checkpoints: int = _opt(
        2,
        "checkpoints kept: checkpoint.pt plus the N-1 before it (checkpoint-stepS.pt), so --resume can go back",
        group="run",
        metavar="N",
        min=1,
    )
    save_every_epochs: int = _opt(
        0, "keep every Nth epoch's checkpoint, and the last, as checkpoint-epochE.pt", group="run", metavar="N", min=0
    )
    divergence_factor: float = _opt(
        100.0,
        "stop (without checkpointing) when the loss exceeds this many times the "
        "median of the recent steps, or the weight norm this many times its start "
        "value (0 = off; NaN/Inf always stop)",
        group="run",
        metavar="X",
        min=0,
    )
    log_every: int = _opt(
        100,
        "without a terminal (nohup, SLURM, a log file): print a progress line every N "
        "steps and at each epoch end (0 = epoch ends only)",
        group="run",
        metavar="N",
        min=0,
    )
    resume: str | None = _opt(
        None,
        "continue a run from a checkpoint file, or 'auto' = RUN_DIR/checkpoint.pt if it exists",
        group="run",
        metavar="PATH|auto",
    )
    seed: int = _opt(0, "random seed (model init, data order, augmentation, mixup)", group="run", metavar="N")
    device: str = _opt(
        "auto", "auto, cpu, cuda or cuda:N (under torchrun: the GPU of LOCAL_RANK)", group="run", metavar="DEVICE"
    )
    progress: bool = _opt(True, "tqdm progress bar per epoch (only on a terminal)", group="run")
    tensorboard: bool = _opt(
        False,
        "also write log.jsonl's loss, lr, target block, CKA, teacher FLOPs and step time as TensorBoard "
        "events in RUN_DIR/tensorboard (needs the tensorboard package)",
        group="run",
    )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping (keys snake_ or kebab-case), coercing simple types, then validate.

        Raises:
            ConfigError: unknown keys (all named, with suggestions), or invalid values.
        """
        cfg = cls(**normalize_mapping(values, source=source))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ validation

    def validate(self) -> TrainConfig:
        """Check every value; raise :class:`ConfigError` naming the option. Returns self."""

        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"--{name.replace('_', '-')}: {msg}")

        for name in ("teacher", "student"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise bad(name, "a model name is required (e.g. vit_small_patch14_dinov2)")
        for name, allowed in CHOICES.items():
            v = getattr(self, name)
            if v not in allowed:
                raise bad(name, f"invalid choice {v!r} (choose from {', '.join(allowed)})")
        for name in ("teacher_overrides", "student_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, f"expected a JSON object, got {getattr(self, name)!r}")
            check_model_overrides(getattr(self, name), "--" + name.replace("_", "-"))
        for name, spec in field_specs().items():
            v = getattr(self, name)
            if spec.min is not None and v is not None and v < spec.min:
                raise bad(name, f"must be >= {spec.min:g}, got {v}")
        non_negative = ("max_epochs_per_block", "clip_grad", "cls_weight", "momentum")
        for name in non_negative:
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise bad(name, f"must be a finite number >= 0, got {v}")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise bad(name, f"must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise bad("lr", "must be > 0")
        if not 0 < self.trust_coefficient < math.inf:
            raise bad("trust_coefficient", f"must be > 0, got {self.trust_coefficient}")
        if not 0 <= self.momentum < 1:
            raise bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not math.isfinite(self.tau):
            raise bad("tau", f"must be finite, got {self.tau}")
        if self.tau < 0:  # CKA is in [0, 1]; a value > 1 means "never by CKA" (only --max-epochs-per-block)
            raise bad("tau", f"must be in [0, 1] (or > 1: never level up by CKA), got {self.tau}")
        if not math.isfinite(self.divergence_factor):
            raise bad("divergence_factor", f"must be a finite number >= 0, got {self.divergence_factor}")
        if not math.isfinite(self.cosine_tau):
            raise bad("cosine_tau", f"must be finite, got {self.cosine_tau}")
        if self.curriculum_sync == "per-rank":
            # Both would change the shared weights or lr on one rank only: the replicas would diverge.
            for name in ("snap_to_last", "reset_head_on_level_up", "lr_reset"):
                if getattr(self, name) not in (None, False, "none"):
                    raise bad(
                        name,
                        "cannot be combined with --curriculum-sync per-rank (ranks level up at "
                        "different steps, so the lr/head would differ between DDP replicas)",
                    )
        if not 0 < self.alpha <= 1:
            raise bad("alpha", f"must be in (0, 1], got {self.alpha}")
        if self.curriculum != "cka":  # the baselines have no curriculum: the value would be ignored silently
            for name in ("start_block", "snap_to_last", "lr_reset", "concat_teacher_last"):
                fixed_start = name == "start_block" and self.curriculum == "fixed"
                if getattr(self, name) not in (None, False, "none") and not fixed_start:
                    raise bad(name, f"applies to --curriculum cka only (the run has --curriculum {self.curriculum})")
        if self.curriculum == "fixed" and self.start_block is None:
            raise bad("start_block", "--curriculum fixed needs the block to train against, e.g. --start-block 6")
        if self.data_source == "synthetic" and self.data is not None:
            raise bad(
                "data",
                f"{self.data!r} is not read with --data-source synthetic (generated images); drop --data, or "
                "choose --data-source auto, folder or fashion-mnist to train on it",
            )
        if not self.out:
            raise bad("out", "a run directory is required")
        check_kernel_environment()
        return self

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_lr(self) -> float:
        """``lr`` or the optimizer's default base lr (before LARS batch scaling)."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]

    @property
    def resolved_cka_every(self) -> int | None:
        """Steps between curriculum measurements: ``cka_every``, or 1 for LEAP and None (never)
        for the baselines, which need none (the reference baseline computes no CKA)."""
        if self.cka_every is not None:
            return self.cka_every
        return 1 if self.curriculum == "cka" else None

    @property
    def resolved_threshold(self) -> float:
        """Level-up threshold of ``curriculum_metric``: ``tau`` (CKA) or ``cosine_tau``."""
        return self.cosine_tau if self.curriculum_metric == "cosine" else self.tau

    @property
    def resume_path(self) -> str | None:
        """The checkpoint to resume from (``"auto"`` -> ``out/checkpoint.pt``), or None."""
        if self.resume is None:
            return None
        if self.resume == "auto":
            return run_file(self.out, CHECKPOINT_NAME)
        return self.resume


# ---------------------------------------------------------------------- the option schema of TrainConfig


def config_fields() -> dict[str, dataclasses.Field]:
    """Fields of :class:`TrainConfig` by name, in declaration order."""
    return dataclass_fields(TrainConfig)


@cache
def field_specs() -> dict[str, FieldSpec]:
    """:class:`FieldSpec` of every :class:`TrainConfig` field, in declaration order."""
    return _specs_of(TrainConfig, CHOICES)


def field_spec(name: str) -> FieldSpec:
    """The :class:`FieldSpec` of one :class:`TrainConfig` field."""
    return field_specs()[name]


def coerce(name: str, value: Any, source: str) -> Any:
    """A file/CLI value converted to the type of :class:`TrainConfig` field ``name``."""
    return _coerce_to_spec(field_spec(name), value, source)


def normalize_mapping(values: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Check the keys of a :class:`TrainConfig` mapping and coerce its values (no cross-field checks)."""
    return _normalize_with_specs(field_specs(), values, source=source)


@dataclasses.dataclass
class TeacherTrainConfig:
    """The recipe of ``leap train-teacher`` (:func:`leap.apps.pretrain.train_teacher`); its defaults are
    the command's option defaults."""

    model: str = "vit_small_patch14_dinov2"
    model_overrides: dict = dataclasses.field(
        default_factory=lambda: {"patch_size": 7, "depth": 8, "embed_dim": 128, "num_heads": 2}
    )
    img_size: int = 28
    data: str | None = None
    data_source: str = "fashion-mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    limit_train: int | None = None  # use only the first N training images (tests, quick tries)
    limit_test: int | None = None
    workers: int = 1
    seed: int = 0
    threads: int | None = None
    out: str = "teacher.pth"
    progress: bool = True
