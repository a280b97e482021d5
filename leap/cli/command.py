"""The one shape of a ``leap`` command, and how a command runs.

A command is a module of :mod:`leap.cli` with::

    NAME = "flops"                                  # the word after `leap`
    HELP = "..."                                    # its line in `leap --help`
    def add_parser(subparsers) -> ArgumentParser    # its parser, as a sub-command of `leap`
    def run(args: argparse.Namespace) -> int        # do it; the exit code
    def main(argv=None) -> int:                     # the command alone (tests, library use)
        return run_alone(NAME, add_parser, run, argv)

and an entry in :data:`leap.cli.COMMANDS`. Parsing and errors are handled here for every
command alike (:func:`execute`): ``--help`` exits 0; a usage error is argparse's message and
exit 2; a :class:`leap.errors.LeapError` (or a missing module of the ``train`` extra) is one line
``leap: error: NAME: ...`` (no ``NAME:`` for ``distill``) with the error's exit code; Ctrl-C is
``leap: error: interrupted`` with 130; any other exception propagates with its traceback. The
exit codes are those of :mod:`leap.errors`.

Commands import their heavy dependencies (torch, timm) inside :func:`run`, so building the
``leap`` parser, ``leap --help`` and option errors stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, LeapError, MissingDependencyError

__all__ = ["PROG", "TRAIN_EXTRA_MODULES", "error", "execute", "run_alone"]

PROG = "leap"

#: Modules of the ``train`` extra (``pip install "leap-kernels[train]"``).
TRAIN_EXTRA_MODULES = ("timm", "torchvision", "PIL", "safetensors", "yaml", "tqdm", "matplotlib")

#: The command whose errors carry no ``NAME:`` prefix and whose interruption hints at ``--resume``.
_TRAINING_COMMAND = "distill"


def error(msg: str, code: int) -> int:
    """Print ``leap: error: msg`` on stderr; return ``code``."""
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _missing_dependency(e: ModuleNotFoundError) -> MissingDependencyError | None:
    """A user-facing error for a missing module of the ``train`` extra, else None."""
    top = (e.name or "").split(".")[0]
    if top not in TRAIN_EXTRA_MODULES:
        return None
    return MissingDependencyError(
        f"the trainer needs the package providing {top!r}, which is not installed; install the trainer's "
        f'dependencies with: pip install "leap-kernels[train]"'
    )


def _exit_status(e: SystemExit) -> int:
    """argparse's exit (``--help``: 0, a usage error: 2, its message already printed) as a status."""
    if e.code is None:
        return EXIT_OK
    return e.code if isinstance(e.code, int) else error(str(e.code), EXIT_USAGE)


def execute(name: str | None, call: Callable[[], int]) -> int:
    """Run ``call()`` (parse and run one command) and map what it raises to an exit code.

    Args:
        name: the command (for the message prefix and the interruption hint), or None.
        call: returns the exit code; may raise SystemExit (argparse), LeapError, KeyboardInterrupt.
    """
    try:
        try:
            try:
                return int(call() or EXIT_OK)
            except SystemExit as e:
                return _exit_status(e)
        except ModuleNotFoundError as e:
            missing = _missing_dependency(e)
            if missing is None:
                raise
            raise missing from e
    except KeyboardInterrupt:
        hint = "; continue the run with --resume auto" if name == _TRAINING_COMMAND else ""
        return error(f"interrupted{hint}", EXIT_INTERRUPTED)
    except LeapError as e:
        prefix = f"{name}: " if name and name != _TRAINING_COMMAND else ""
        return error(prefix + (str(e) or type(e).__name__), e.exit_code)


def parse_and_run(
    parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int], argv: Sequence[str]
) -> int:
    """``run(parser.parse_args(argv))``."""
    return run(parser.parse_args(list(argv)))


def run_alone(
    name: str,
    add_parser: Callable[[Any], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Run one command from ``argv`` (the arguments after ``leap NAME``) as ``leap NAME`` would."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    return execute(name, lambda: parse_and_run(add_parser(sub), run, argv))
