"""``leap train-teacher``: train a small ViT teacher classifier (:mod:`leap.apps.pretrain`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import TeacherTrainConfig
from ..config_schema import parse_json_object
from .command import run_alone
from .options import Formatter, add_config_options

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "train-teacher"
HELP = "train a small ViT teacher classifier (e.g. on Fashion-MNIST)"

# Options shared with `leap distill` (help and checks from leap.config.TrainConfig).
_CONFIG_OPTIONS = [
    "img_size",
    "data",
    "data_source",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "workers",
    "seed",
    "out",
    "progress",
]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    defaults = TeacherTrainConfig()
    parser = sub.add_parser(
        NAME,
        help=HELP,
        formatter_class=Formatter,
        description="Train a small ViT teacher classifier (default: on Fashion-MNIST) and save it for distillation.",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help=f"timm ViT name (see leap.models.build_model) (default: {defaults.model})",
    )
    parser.add_argument(
        "--model-overrides",
        default=json.dumps(defaults.model_overrides),
        help="JSON dict of timm kwargs (depth, embed_dim, num_heads, patch_size, ...) "
        f"(default: {json.dumps(defaults.model_overrides)})",
    )
    add_config_options(
        parser,
        _CONFIG_OPTIONS,
        defaults={n: getattr(defaults, n) for n in _CONFIG_OPTIONS},
        help={
            "data": "data folder (default: the Debian dataset-fashion-mnist path)",
            "out": "checkpoint path (a .json with the recipe goes beside it)",
            "lr": "AdamW peak learning rate",
            "weight_decay": "AdamW weight decay",
            "progress": "progress bar per epoch (only on a terminal)",
        },
    )
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N training images only")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..apps.pretrain import train_teacher

    overrides = parse_json_object(args.model_overrides, "--model-overrides")
    cfg = TeacherTrainConfig(
        model=args.model,
        model_overrides=overrides,
        img_size=args.img_size,
        data=args.data,
        data_source=args.data_source,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        workers=args.workers,
        threads=args.threads,
        seed=args.seed,
        out=args.out,
        progress=args.progress,
    )
    train_teacher(cfg)
    return 0


def main(argv=None) -> int:
    """``leap train-teacher`` from ``argv`` (the arguments after ``train-teacher``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
