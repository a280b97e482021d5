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

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import data as leap_data
from .checkpoint import atomic_save
from .models import build_model

TEACHER_META_KEY = "leap_teacher"


@dataclasses.dataclass
class TeacherTrainConfig:
    model: str = "vit_small_patch14_dinov2"
    model_overrides: dict = dataclasses.field(
        default_factory=lambda: {"patch_size": 7, "depth": 8, "embed_dim": 128, "num_heads": 2})
    img_size: int = 28
    data: Optional[str] = None
    data_source: str = "fashion-mnist"
    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    limit_train: Optional[int] = None  # use only the first N training images (tests, quick tries)
    limit_test: Optional[int] = None
    workers: int = 1
    seed: int = 0
    threads: Optional[int] = None
    out: str = "teacher.pth"
    progress: bool = True


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


def train_teacher(cfg: TeacherTrainConfig) -> dict:
    """Trains, evaluates, saves; returns a summary dict (test accuracy, params, time, path)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set = leap_data.build_dataset(
        cfg.data_source, cfg.data, "train", cfg.img_size, augment=True,
        crop_scale=(0.5, 1.0), color_jitter=False, random_grayscale=False)
    test_set = leap_data.build_dataset(cfg.data_source, cfg.data, "test", cfg.img_size, augment=False)
    if cfg.limit_train is not None:
        train_set = leap_data.FirstN(train_set, cfg.limit_train)
    if cfg.limit_test is not None:
        test_set = leap_data.FirstN(test_set, cfg.limit_test)
    train_loader = leap_data.build_loader(train_set, cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                                          seed=cfg.seed, drop_last=True)
    test_loader = leap_data.build_loader(test_set, 256, shuffle=False, num_workers=cfg.workers, drop_last=False)
    num_classes = len(train_set.classes)

    backbone = build_model(cfg.model, img_size=cfg.img_size, **cfg.model_overrides)
    model = _Classifier(backbone, num_classes).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_at(step):
        if step < warmup_steps:
            return cfg.lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    start = time.time()
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        leap_data.set_loader_epoch(train_loader, epoch)
        bar = tqdm(train_loader, desc=f"teacher epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and tqdm is not None and sys.stderr.isatty())) if tqdm else train_loader
        running = 0.0
        for images, labels in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits = model(images.to(device))
            loss = F.cross_entropy(logits, labels.to(device), label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item()
            step += 1
            if tqdm and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"teacher epoch {epoch + 1}/{cfg.epochs}: train loss {running / max(1, steps_per_epoch):.4f} "
              f"({time.time() - start:.0f}s)", flush=True)

    # Save in fp16, then measure the accuracy of exactly what was saved.
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
             for k, v in model.backbone.state_dict().items()}
    classifier = {k: v.detach().cpu() for k, v in model.head.state_dict().items()}
    model.backbone.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    accuracy = evaluate_accuracy(model, test_loader, device)
    meta = {
        "model": cfg.model,
        "model_overrides": cfg.model_overrides,
        "img_size": cfg.img_size,
        "data_source": cfg.data_source,
        "epochs": cfg.epochs,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "test_accuracy": accuracy,
        "params": sum(p.numel() for p in model.backbone.parameters()),
        "train_time_s": round(time.time() - start, 1),
        "recipe": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "progress")},
    }
    atomic_save({"model": state, "classifier": classifier, TEACHER_META_KEY: meta}, cfg.out)
    with open(os.path.splitext(cfg.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print(f"teacher test accuracy {accuracy * 100:.2f}% ({len(test_set)} images); saved {cfg.out} "
          f"({os.path.getsize(cfg.out) / 2**20:.1f} MB)")
    return {**meta, "path": cfg.out}


def read_teacher_meta(path: str) -> Optional[dict]:
    """The recipe stored by ``train-teacher`` (model name, overrides, img size), or None."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get(TEACHER_META_KEY) if isinstance(obj, dict) else None


def main_train_teacher(argv=None) -> int:
    defaults = TeacherTrainConfig()
    parser = argparse.ArgumentParser(
        prog="leap train-teacher",
        description="Train a small ViT teacher classifier (default: on Fashion-MNIST) and save it for distillation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=defaults.model, help="timm ViT name (see leap.models.build_model)")
    parser.add_argument("--model-overrides", default=json.dumps(defaults.model_overrides),
                        help="JSON dict of timm kwargs (depth, embed_dim, num_heads, patch_size, ...)")
    parser.add_argument("--img-size", type=int, default=defaults.img_size)
    parser.add_argument("--data", default=None, help="data folder (default: the Debian dataset-fashion-mnist path)")
    parser.add_argument("--data-source", default=defaults.data_source, choices=leap_data.SOURCES)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N training images only")
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="checkpoint path (a .json with the recipe goes beside it)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.model_overrides)
    except json.JSONDecodeError as exc:
        parser.error(f"--model-overrides: not valid JSON ({exc})")
    cfg = TeacherTrainConfig(
        model=args.model, model_overrides=overrides, img_size=args.img_size, data=args.data,
        data_source=args.data_source, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, limit_train=args.limit_train, limit_test=args.limit_test,
        workers=args.workers, threads=args.threads, seed=args.seed, out=args.out, progress=not args.no_progress)
    train_teacher(cfg)
    return 0
