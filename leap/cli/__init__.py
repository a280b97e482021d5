"""The ``leap`` command (also ``python -m leap``): ``leap distill``, ``leap flops``,
``leap report``, ``leap train-teacher``, ``leap eval``, ``leap demo``, ``leap experiment``.

Exit codes: 0 success; 2 bad input (an error of :mod:`leap.errors` other than a training
failure: options, config file, data, models, checkpoints, a missing optional dependency),
printed as one line ``leap: error: ...``; 1 a training failure (NaN/Inf loss, one line) or
a defect (any other exception: the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from ..errors import LeapError, MissingDependencyError
from .options import Formatter

__all__ = ["main", "build_parser", "TRAIN_EXTRA_MODULES"]

PROG = "leap"

#: Modules of the ``train`` extra (``pip install "leap-kernels[train]"``).
TRAIN_EXTRA_MODULES = ("timm", "torchvision", "PIL", "safetensors", "yaml", "tqdm", "matplotlib")

# Commands with their own argparse parser: name -> (module, function(argv) -> int, help).
_DELEGATED = {
    "flops": ("leap.cli.flops", "main_flops", "per-image FLOPs of teacher/student and the savings of a block trajectory"),
    "report": ("leap.report", "main_report", "plots and a Markdown summary of a run directory"),
    "train-teacher": ("leap.pretrain", "main_train_teacher", "train a small ViT teacher classifier (e.g. on Fashion-MNIST)"),
    "eval": ("leap.evaluation.cli", "main",
             "evaluate frozen features: linear probe, revisitop retrieval mAP, kNN (`leap eval PROTOCOL --help`)"),
    "demo": ("leap.demo", "main_demo", "baseline vs LEAP on Fashion-MNIST with the bundled teacher (make demo)"),
    "experiment": ("leap.experiment", "main_experiment",
                   "a seeded comparison of methods from a YAML file: train, evaluate, tables (make experiment)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``leap`` parser with its ``distill`` subcommand (the others parse their own arguments)."""
    from .distill import DESCRIPTION, add_parser

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, formatter_class=Formatter)
    # The version is looked up only when asked for: it imports leap_kernels (and torch), which would
    # otherwise delay every option error by seconds.
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser(sub)
    for name, (_, _, help_text) in _DELEGATED.items():
        # Parsed by the command's own parser (``leap NAME --help``).
        sub.add_parser(name, help=help_text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    return parser


class _VersionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")
        parser.exit()


def _version() -> str:
    import leap

    return leap.__version__


class _BarSafeHandler(logging.StreamHandler):
    """Log lines go above an active tqdm progress bar (``tqdm.write``) instead of being glued to it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm_module = sys.modules.get("tqdm")
        bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
        if bars:
            try:
                tqdm_module.tqdm.write(self.format(record), file=self.stream)
                return
            except Exception:  # noqa: BLE001 - fall back to a plain line
                pass
        super().emit(record)


def _error(msg: str, code: int) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _missing_dependency(e: ModuleNotFoundError) -> MissingDependencyError | None:
    """A user-facing error for a missing module of the ``train`` extra, else None."""
    top = (e.name or "").split(".")[0]
    if top not in TRAIN_EXTRA_MODULES:
        return None
    return MissingDependencyError(
        f"the trainer needs the package providing {top!r}, which is not installed; install the trainer's "
        f"dependencies with: pip install \"leap-kernels[train]\"")


def _run(argv: list[str]) -> int:
    if argv and argv[0] in _DELEGATED:
        module_name, function, _ = _DELEGATED[argv[0]]
        try:
            return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
        except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
            return e.code if isinstance(e.code, int) else _error(str(e.code), 2)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .distill import main_distill

    return main_distill(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (``--help`` returns 0).

    Only :class:`leap.errors.LeapError` (and a missing module of the ``train`` extra) become
    a one-line message; any other exception propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])
    command = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        try:
            return _run(argv)
        except ModuleNotFoundError as e:
            missing = _missing_dependency(e)
            if missing is None:
                raise
            raise missing from e
    except KeyboardInterrupt:
        hint = "; continue the run with --resume auto" if command == "distill" else ""
        return _error(f"interrupted{hint}", 130)
    except LeapError as e:
        prefix = f"{command}: " if command and command != "distill" else ""
        return _error(prefix + (str(e) or type(e).__name__), e.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
