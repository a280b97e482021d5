"""``leap report RUN_DIR``: plots and ``report.md`` of a training run (:mod:`leap.apps.report`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..apps.report import DEFAULT_OUT_SUBDIR
from ..runlog import LOG_NAME
from .command import run_alone
from .options import Formatter, add_config_options

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "report"
HELP = "plots and a Markdown summary of a run directory"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """``leap report RUN_DIR [--out DIR] [--compare RUN_DIR ...] [--teacher NAME --student NAME] [--img-size N]
    [--no-cost-model]``."""
    p = sub.add_parser(
        NAME,
        help=HELP,
        formatter_class=Formatter,
        description="Plot a LEAP run (loss, CKA, target block, teacher FLOPs) and "
        f"write a Markdown summary from RUN_DIR/{LOG_NAME}.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"run directory holding {LOG_NAME} (or the log file)")
    p.add_argument("--out", help=f"output directory (default: RUN_DIR/{DEFAULT_OUT_SUBDIR})")
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="other runs drawn beside this one in the learning curves (their leap eval --all-checkpoints records)",
    )
    add_config_options(
        p,
        ["teacher", "student", "img_size"],
        defaults={"teacher": None, "student": None, "img_size": None},
        help={
            "teacher": "teacher model name for FLOPs, if the run config lacks it",
            "student": "student model name for FLOPs, if the run config lacks it",
            "img_size": "image size for FLOPs (default: from the config, else 224)",
        },
    )
    p.add_argument(
        "--no-cost-model", action="store_true", help="do not build models for FLOPs; count teacher blocks only"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report; print what was written.

    Raises:
        LeapError: no run directory / log, or a log without step and epoch records.
    """
    from ..apps.report import make_report

    res = make_report(
        args.run_dir,
        args.out,
        teacher=args.teacher,
        student=args.student,
        img_size=args.img_size,
        use_cost_model=not args.no_cost_model,
        compare=args.compare,
    )
    print(f"wrote {res['report']}")
    for path in res["plots"].values():
        print(f"wrote {path}")
    if res["saved_fraction"] is not None:
        print(f"teacher FLOPs saved: {100 * res['saved_fraction']:.1f}%")
    return 0


def main(argv=None) -> int:
    """``leap report`` from ``argv`` (the arguments after ``report``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
