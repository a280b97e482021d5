"""Supervised training of a small ViT teacher (``leap train-teacher``).

The demo needs a teacher that knows something: this trains a timm ViT classifier
(backbone + linear head on the final-norm CLS token) on a labelled image source,
reports its test accuracy and writes a compact checkpoint that
:func:`leap.models.load_teacher_weights` reads back (timm layout under ``"model"``,
stored in fp16 to keep it small, with the recipe and accuracy under ``"leap_teacher"``).
The accuracy reported is measured after the fp16 round trip, i.e. of the weights
actually saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as leap_data
from ..checkpoint import TEACHER_META_KEY, atomic_save, read_torch_file
from ..config import TeacherTrainConfig
from ..config_checks import check_model_overrides
from ..errors import ConfigError, DataError, InputNotFoundError, NonFiniteLossError
from ..models import build_model
from ..optim import WarmupCosine, build_optimizer
from ..runlog import check_writable_dir, write_json

__all__ = [
    "TEACHER_META_KEY",
    "TeacherTrainConfig",
    "evaluate_accuracy",
    "validate_teacher_config",
    "train_teacher",
    "read_teacher_meta",
]


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))  # timm with num_classes=0 returns the final-norm CLS token


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.to(device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


def validate_teacher_config(cfg: TeacherTrainConfig) -> TeacherTrainConfig:
    """Refuse values that would train nothing or nonsense (``ConfigError`` naming the option)."""
    positive = {"--epochs": cfg.epochs, "--batch-size": cfg.batch_size, "--img-size": cfg.img_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr: expected a finite value > 0, got {cfg.lr!r}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ConfigError(f"--weight-decay: expected a finite value >= 0, got {cfg.weight_decay!r}")
    for name, value in (("--limit-train", cfg.limit_train), ("--limit-test", cfg.limit_test)):
        if value is not None and value < 1:
            raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
    if os.path.isdir(cfg.out):
        raise ConfigError(
            f"--out {cfg.out} is a directory; give the path of the teacher file to write "
            f"(e.g. {os.path.join(cfg.out, 'teacher.pth')})"
        )
    check_model_overrides(cfg.model_overrides, "--model-overrides")
    # Before training, not after it: a whole run would be lost at the save.
    check_writable_dir(os.path.dirname(os.path.abspath(cfg.out)), "--out")
    return cfg


def _held_out_set(cfg: TeacherTrainConfig, train_set):
    """The test split; refused when it would be the training images themselves.

    An image folder without ``test/`` or ``val/`` makes :class:`leap.data.ImageFolderDataset`
    read the class folders of the root for every split: its "test accuracy" would be measured
    on the training images.
    """
    root = train_set.root if isinstance(train_set, leap_data.ImageFolderDataset) else None
    for split in ("test", "val"):
        try:
            test_set = leap_data.build_dataset(cfg.data_source, cfg.data, split, cfg.img_size, augment=False)
        except InputNotFoundError:
            if cfg.data_source == "fashion-mnist" or split == "val":
                raise
            continue
        if root is not None and os.path.realpath(getattr(test_set, "root", "")) == os.path.realpath(root):
            raise DataError(
                f"{cfg.data} has no held-out split (no test/ or val/ folder beside train/): the test accuracy "
                f"would be measured on the training images. Put held-out images in "
                f"{os.path.join(cfg.data, 'test', '<class>')}/ (and the training images in train/<class>/)"
            )
        return test_set
    raise AssertionError("unreachable")  # pragma: no cover


def _check_finite(model: nn.Module, what: str) -> None:
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLossError(
            f"{what}: {len(bad)} weight tensor(s) are NaN/Inf (e.g. {bad[0]}); nothing was saved. Try a lower --lr"
        )


def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Trains, evaluates, saves; returns a summary dict (test accuracy, params, time, path).

    Raises:
        ConfigError: an invalid setting (:func:`validate_teacher_config`).
        DataError: no held-out split (the accuracy would be measured on training images).
        NonFiniteLossError: the loss or the weights became NaN/Inf; nothing is saved.
    """
    validate_teacher_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set = leap_data.build_dataset(
        cfg.data_source,
        cfg.data,
        "train",
        cfg.img_size,
        augment=True,
        crop_scale=(0.5, 1.0),
        color_jitter=False,
        random_grayscale=False,
    )
    test_set = _held_out_set(cfg, train_set)
    data_files = getattr(train_set, "files", []) + getattr(test_set, "files", [])
    if cfg.limit_train is not None:
        train_set = leap_data.FirstN(train_set, cfg.limit_train)
    if cfg.limit_test is not None:
        test_set = leap_data.FirstN(test_set, cfg.limit_test)
    train_loader = leap_data.build_loader(
        train_set, cfg.batch_size, shuffle=True, num_workers=cfg.workers, seed=cfg.seed, drop_last=True
    )
    test_loader = leap_data.build_loader(test_set, 256, shuffle=False, num_workers=cfg.workers, drop_last=False)
    num_classes = len(train_set.classes)

    backbone = build_model(cfg.model, img_size=cfg.img_size, **cfg.model_overrides)
    model = _Classifier(backbone, num_classes).to(device)
    # The trainer's parameter groups (no decay on biases, norms, tokens, position embeddings)
    # and schedule (linear warmup, cosine to 0).
    optimizer = build_optimizer("adamw", model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = WarmupCosine(
        optimizer,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch),
        total_steps=max(1, cfg.epochs * steps_per_epoch),
        min_lr_ratio=0.0,
    )

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    start = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        leap_data.set_loader_epoch(train_loader, epoch)
        bar = (
            tqdm(
                train_loader,
                desc=f"teacher epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=not (cfg.progress and tqdm is not None and sys.stderr.isatty()),
            )
            if tqdm
            else train_loader
        )
        running = 0.0
        for images, labels in bar:
            logits = model(images.to(device))
            loss = F.cross_entropy(logits, labels.to(device), label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"train-teacher: the loss is {loss.item()} at epoch {epoch + 1}; training stopped and nothing was "
                    f"saved. Try a lower --lr (now {cfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item()
            if tqdm and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        print(
            f"teacher epoch {epoch + 1}/{cfg.epochs}: train loss {running / max(1, steps_per_epoch):.4f} "
            f"({time.time() - start:.0f}s)",
            flush=True,
        )

    _check_finite(model, "train-teacher")
    # Save in fp16, then measure the accuracy of exactly what was saved.
    state = {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
        for k, v in model.backbone.state_dict().items()
    }
    classifier = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    model.backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    accuracy = evaluate_accuracy(model, test_loader, device)
    meta = {
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "img_size": cfg.img_size,
        "data_source": cfg.data_source,
        "data_files": data_files,
        "test_split": getattr(test_set, "split", "test"),
        "epochs": cfg.epochs,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "test_accuracy": accuracy,
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "train_time_s": round(time.time() - start, 1),
        "recipe": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "progress")},
    }
    atomic_save({"model": state, "classifier": classifier, TEACHER_META_KEY: meta}, cfg.out)
    write_json(os.path.splitext(cfg.out)[0] + ".json", meta)
    print(
        f"teacher test accuracy {accuracy * 100:.2f}% ({len(test_set)} {meta['test_split']} images); saved {cfg.out} "
        f"({os.path.getsize(cfg.out) / 2**20:.1f} MB)"
    )
    return {**meta, "path": cfg.out}


def read_teacher_meta(path: str) -> dict | None:
    """The recipe stored by ``train-teacher`` (model name, overrides, img size), or None."""
    obj = read_torch_file(path, "teacher checkpoint")
    return obj.get(TEACHER_META_KEY) if isinstance(obj, dict) else None
