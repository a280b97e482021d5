"""The ``leap`` command (also ``python -m leap``): ``leap distill``, ``leap flops``,
``leap report``, ``leap train-teacher``, ``leap eval``, ``leap export``, ``leap demo``,
``leap experiment``.

Every command is a module of this package of the one shape :mod:`leap.cli.command` describes
(``NAME``, ``HELP``, ``add_parser(subparsers)``, ``run(args) -> int``), listed in
:data:`COMMANDS`; :func:`main` picks the command and runs it through
:func:`leap.cli.command.execute`, which maps errors to the exit codes of :mod:`leap.errors`.

Exit codes: 0 success; 2 bad input (an error of :mod:`leap.errors` other than a training
failure: options, config file, data, models, checkpoints, a missing optional dependency),
printed as one line ``leap: error: ...``; 1 a training failure (NaN/Inf loss, one line) or
a defect (any other exception: the traceback is printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..errors import EXIT_USAGE
from . import demo, distill, evaluate, experiment, export, flops, report, train_teacher
from .command import PROG, TRAIN_EXTRA_MODULES, execute, parse_and_run
from .options import Formatter

__all__ = ["main", "build_parser", "COMMANDS", "TRAIN_EXTRA_MODULES"]

#: The commands, in the order ``leap --help`` lists them.
COMMANDS = (distill, flops, report, train_teacher, evaluate, export, demo, experiment)


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``leap`` parser and, by command name, each command's parser (a subparser of it)."""
    parser = argparse.ArgumentParser(prog=PROG, description=distill.DESCRIPTION, formatter_class=Formatter)
    # The version is looked up only when asked for: it imports leap_kernels (and torch), which would
    # otherwise delay every option error by seconds.
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser, {c.NAME: c.add_parser(sub) for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The ``leap`` parser with every command as a subcommand."""
    return _parsers()[0]


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


def _run_top_level(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """``leap`` without a command: ``--help``, ``--version``, or a usage error."""
    args = parser.parse_args(argv)  # exits for --help, --version, an unknown command
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return 0  # pragma: no cover - a command is dispatched before parsing reaches here


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (``--help`` returns 0).

    A known command word first: that command's own parser reads the rest of ``argv`` and its
    :func:`run` runs (:func:`leap.cli.command.execute`). Only :class:`leap.errors.LeapError` (and a
    missing module of the ``train`` extra) become a one-line message; any other exception
    propagates with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])
    commands = {c.NAME: c for c in COMMANDS}
    name = argv[0] if argv and argv[0] in commands else None
    parser, parsers = _parsers()
    if name is None:
        return execute(None, lambda: _run_top_level(parser, argv))
    return execute(name, lambda: parse_and_run(parsers[name], commands[name].run, argv[1:]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
