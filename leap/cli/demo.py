"""``leap demo``: baseline vs LEAP on Fashion-MNIST with the bundled teacher (:mod:`leap.apps.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..apps import demo
from .command import run_alone
from .options import Formatter, add_config_options

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "demo"
HELP = "baseline vs LEAP on Fashion-MNIST with the bundled teacher (make demo)"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(NAME, help=HELP, description=demo.__doc__, formatter_class=Formatter)
    add_config_options(
        parser,
        ["data"],
        help={"data": "folder with the Fashion-MNIST idx files (default: /usr/share/datasets/fashion-mnist)"},
    )
    parser.add_argument(
        "--teacher", default=demo.DEFAULT_TEACHER, help="a `leap train-teacher` checkpoint (default: the bundled one)"
    )
    add_config_options(
        parser,
        ["out", "epochs"],
        defaults={"out": "runs/demo", "epochs": 6},
        help={"out": "run directory (baseline/, leap/, results.md)"},
    )
    parser.add_argument(
        "--limit-images", type=int, default=20000, help="training images used, 0 = all 60000 (default: 20000)"
    )
    add_config_options(
        parser,
        ["batch_size", "lr", "tau", "max_epochs_per_block", "loss", "workers", "progress"],
        defaults={"batch_size": 128, "lr": 1e-3, "tau": 0.97, "max_epochs_per_block": 1},
        help={
            "lr": "AdamW peak learning rate",
            "tau": "CKA threshold of the curriculum (the small teacher's blocks are alike: CKA is high)",
        },
    )
    parser.add_argument(
        "--knn-train", type=int, default=10000, help="training images in the kNN memory bank (default: 10000)"
    )
    parser.add_argument("--knn-test", type=int, default=None, help="test images evaluated (default: all 10000)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--replay-rounds",
        type=_rounds,
        default=demo.DEFAULT_REPLAY_ROUNDS,
        metavar="N",
        help="after both runs, time their training steps again interleaved (load falls on both alike) in N "
        f"rounds; 0 = no replay (default: {demo.DEFAULT_REPLAY_ROUNDS})",
    )
    return parser


def _rounds(text: str) -> int:
    """argparse ``type=`` of ``--replay-rounds``: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    demo.run_demo(
        data=args.data,
        teacher=args.teacher,
        out=args.out,
        epochs=args.epochs,
        limit_images=args.limit_images or None,
        batch_size=args.batch_size,
        lr=args.lr,
        tau=args.tau,
        max_epochs_per_block=args.max_epochs_per_block,
        knn_train=args.knn_train,
        knn_test=args.knn_test,
        loss=args.loss,
        workers=args.workers,
        progress=args.progress,
        threads=args.threads,
        replay_rounds=args.replay_rounds,
    )
    return 0


def main(argv=None) -> int:
    """``leap demo`` from ``argv`` (the arguments after ``demo``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
