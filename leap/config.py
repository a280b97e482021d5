"""Training configuration: the :class:`TrainConfig` dataclass, config files, validation.

Every field of :class:`TrainConfig` is also a ``leap distill`` option (``field_name`` ->
``--field-name``; booleans ``augment``/``mixup``/``progress`` are ``--no-augment``/
``--no-mixup``/``--no-progress``) and a key of a ``--config`` YAML/JSON file. Keys in a
file may be written ``snake_case`` or ``kebab-case`` (``no_mixup: true`` also works);
unknown keys are an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "TrainConfig",
    "CHOICES",
    "config_fields",
    "load_config_file",
    "normalize_key",
    "normalize_mapping",
]


class ConfigError(ValueError):
    """An invalid option value, config file or config key."""


#: Allowed values of the string options.
CHOICES: dict[str, tuple[str, ...]] = {
    "data_source": ("auto", "folder", "fashion-mnist", "synthetic"),
    "optimizer": ("lars", "adamw"),
    "loss": ("mse", "token-mse"),
    "curriculum": ("cka", "off"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
}


@dataclass
class TrainConfig:
    """All settings of one distillation run (defaults = the paper's ViT-S recipe where it has one).

    Models
        teacher, student: model names for :func:`leap.models.build_model`.
        teacher_weights: local teacher checkpoint (official DINOv2 / HF / timm layout);
            ``None`` keeps random weights (tests and smoke runs only).
        teacher_overrides, student_overrides: extra ``build_model`` kwargs, e.g.
            ``{"depth": 2, "embed_dim": 32}``.
        img_size: square input size; teacher and student must give the same patch grid.
    Data
        data: dataset path (folder of class folders, or Fashion-MNIST idx files).
        data_source: "auto", "folder", "fashion-mnist" or "synthetic".
        synthetic_size: number of images of the synthetic source.
        limit_images: train on the first N images of the source only (quick runs).
        augment: DINO-style augmentation; mixup: batch mixup (one lambda per batch).
        workers: DataLoader worker processes per rank (``None``: from the CPU count).
    Schedule
        epochs; batch_size (per process; global batch = batch_size * world size);
        max_steps: stop after this many steps in total (counted across resumes). The lr
        schedule still follows ``epochs``, so a stopped run resumes exactly.
    Optimization
        optimizer: "lars" or "adamw". lr: base lr; LARS peak = lr * sqrt(global_batch/1536)
        (default 6.0), AdamW peak = lr (default 5e-4). weight_decay: default 1e-6 (LARS) /
        0.05 (AdamW). momentum, trust_coefficient: LARS only.
        warmup_epochs (linear, may be fractional), min_lr_ratio (cosine floor),
        clip_grad (max grad norm, 0 = off), precision ("auto": bf16 on CUDA, fp32 on CPU).
    Loss
        loss: "mse" (paper) or "token-mse" (token-normalized); cls_weight.
    Curriculum
        curriculum: "cka" (LEAP) or "off" (baseline: always the last teacher block).
        tau, alpha, max_epochs_per_block (0 = no timeout), cka_every, start_block,
        snap_to_last: see :class:`leap.curriculum.Curriculum`.
    Run
        out: run directory; ckpt_every: checkpoint every N steps (0: only at epoch ends);
        resume: checkpoint path or "auto"; seed; device ("auto", "cpu", "cuda", "cuda:1");
        progress: tqdm bar (only on a TTY).
    """

    # models
    teacher: str = ""
    student: str = ""
    teacher_weights: str | None = None
    teacher_overrides: dict[str, Any] = field(default_factory=dict)
    student_overrides: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    # data
    data: str | None = None
    data_source: str = "auto"
    synthetic_size: int = 1024
    limit_images: int | None = None
    augment: bool = True
    mixup: bool = True
    workers: int | None = None
    # schedule
    epochs: int = 100
    batch_size: int = 64
    max_steps: int | None = None
    # optimization
    optimizer: str = "lars"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.001
    clip_grad: float = 1.0
    precision: str = "auto"
    # loss
    loss: str = "mse"
    cls_weight: float = 0.05
    # curriculum
    curriculum: str = "cka"
    tau: float = 0.85
    alpha: float = 1.0
    max_epochs_per_block: int = 5
    cka_every: int = 1
    start_block: int | None = None
    snap_to_last: int | None = None
    # run
    out: str = "runs/leap"
    ckpt_every: int = 1000
    resume: str | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
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

    def validate(self) -> "TrainConfig":
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
        positive = ("img_size", "synthetic_size", "epochs", "batch_size", "cka_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        non_negative = ("ckpt_every", "max_epochs_per_block", "warmup_epochs", "clip_grad", "cls_weight",
                        "momentum")
        for name in non_negative:
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise bad(name, f"must be a finite number >= 0, got {v}")
        if self.limit_images is not None and self.limit_images < 1:
            raise bad("limit_images", f"must be >= 1, got {self.limit_images}")
        for name in ("workers",):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise bad(name, f"must be >= 0, got {v}")
        for name in ("max_steps", "start_block", "snap_to_last"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, f"must be >= 1, got {v}")
        for name in ("lr", "weight_decay"):
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
        if not 0 < self.alpha <= 1:
            raise bad("alpha", f"must be in (0, 1], got {self.alpha}")
        if not self.out:
            raise bad("out", "a run directory is required")
        return self

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_lr(self) -> float:
        """``lr`` or the optimizer's default base lr (before LARS batch scaling)."""
        from .optim import default_lr

        return self.lr if self.lr is not None else default_lr(self.optimizer)

    @property
    def resolved_weight_decay(self) -> float:
        from .optim import default_weight_decay

        return self.weight_decay if self.weight_decay is not None else default_weight_decay(self.optimizer)

    @property
    def resume_path(self) -> str | None:
        """The checkpoint to resume from (``"auto"`` -> ``out/checkpoint.pt``), or None."""
        if self.resume is None:
            return None
        if self.resume == "auto":
            return os.path.join(self.out, "checkpoint.pt")
        return self.resume


def normalize_mapping(values: dict[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Check the keys of a config mapping and coerce its values; no cross-field validation.

    Keys may be snake_case or kebab-case. Raises :class:`ConfigError` naming *all*
    unknown keys (with a close match when there is one) or the first bad value.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    known = config_fields()
    clean: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = normalize_key(str(key))
        if name not in known and name.startswith("no_") and _field_kind(known.get(name[3:])) == "bool":
            # `no_mixup: true` mirrors the --no-mixup flag
            clean[name[3:]] = not _coerce(name[3:], value, known[name[3:]], source)
            continue
        if name not in known:
            unknown.append(str(key))
            continue
        clean[name] = _coerce(name, value, known[name], source)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(normalize_key(k), list(known), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(known)}")
    return clean


def config_fields() -> dict[str, dataclasses.Field]:
    """Fields of :class:`TrainConfig` by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def normalize_key(key: str) -> str:
    """``"max-epochs-per-block"`` / ``"--tau"`` -> snake_case field name."""
    return key.strip().lstrip("-").replace("-", "_")


def _field_kind(f: dataclasses.Field | None) -> str:
    if f is None:
        return ""
    t = str(f.type)
    for kind in ("dict", "bool", "float", "int", "str"):
        if kind in t:
            return kind
    return "str"


def _coerce(name: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Convert a file/CLI value to the field's type (YAML reads ``1e-3`` as a string, etc.)."""
    kind = _field_kind(f)
    optional = "None" in str(f.type)
    where = f"{source}: {name}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    try:
        if kind == "dict":
            if isinstance(value, str):
                value = json.loads(value) if value.strip() else {}
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a JSON object / mapping, got {value!r}")
            return dict(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if kind == "float":
            if isinstance(value, bool):
                raise ConfigError(f"{where}: expected a number, got {value!r}")
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON ({e.msg} at position {e.pos}): {value!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file into a dict.

    Other extensions are parsed as YAML (a superset of JSON). The file must hold one
    mapping. Keys are not checked here (:meth:`TrainConfig.from_dict` does that).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/json raise several types
        raise ConfigError(f"could not parse config file {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of options at the top level, "
                          f"got {type(data).__name__}")
    return data
