"""``leap experiment CONFIG``: a seeded comparison of methods from a YAML file (:mod:`leap.apps.experiment`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .command import run_alone
from .options import Formatter

__all__ = ["NAME", "HELP", "add_parser", "run", "main"]

NAME = "experiment"
HELP = "a seeded comparison of methods from a YAML file: search, train, evaluate, tables (make experiment)"


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME,
        help=HELP,
        formatter_class=Formatter,
        description="Run a seeded comparison of distillation methods from a YAML file (see "
        "experiments/fashion-mnist/config.yaml and experiments/fashion-mnist-fair/config.yaml): run the file's "
        "search of LEAP's tau and timeout on a validation split carved from the training images (if it has "
        "one), train every method with every seed, evaluate the students (linear probe, kNN, CKA to the "
        "teacher, learning curves), write results.md with the pre-registered metrics, mean ± std, paired "
        "differences to the baseline with 95% intervals and win counts, plots and the raw per-run JSON.",
    )
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument("--out", default=None, help="results folder (default: the config file's folder)")
    parser.add_argument(
        "--runs-dir",
        default=None,
        help="where the training runs go (default: the file's runs_dir, else runs/experiments/NAME)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="dataset folder instead of the file's (for Fashion-MNIST: the folder of the idx files)",
    )
    parser.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds instead of the file's")
    parser.add_argument(
        "--methods",
        type=lambda s: [m for m in s.split(",") if m],
        default=None,
        help="comma-separated subset of the methods (the baseline is always included)",
    )
    parser.add_argument("--fresh", action="store_true", help="retrain runs that finished earlier")
    parser.add_argument(
        "--table-only", action="store_true", help="no training: rebuild results.md from the finished runs"
    )
    parser.add_argument(
        "--no-search",
        dest="search",
        action="store_false",
        help="use the file's searched settings without running or checking its search (e.g. to rerun one "
        "method and seed into a fresh --runs-dir)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars or progress lines"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from ..apps.experiment import load_experiment, run_experiment

    cfg = load_experiment(args.config, seeds=args.seeds, methods=args.methods, runs_dir=args.runs_dir, data=args.data)
    out = args.out or os.path.dirname(os.path.abspath(args.config))
    # The trainer shows a bar on a terminal and a line every --log-every steps otherwise.
    run_experiment(cfg, out, fresh=args.fresh, progress=args.progress, table_only=args.table_only, search=args.search)
    return 0


def main(argv=None) -> int:
    """``leap experiment`` from ``argv`` (the arguments after ``experiment``); the exit code."""
    return run_alone(NAME, add_parser, run, argv)
