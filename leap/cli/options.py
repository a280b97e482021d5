"""argparse options generated from :class:`leap.config.TrainConfig` field metadata.

Every command that takes an option of the training configuration (``--teacher``,
``--batch-size``, ``--data``, ...) adds it with :func:`add_config_options`, so its type,
choices, bounds, metavar and help text are those of the field and cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import ConfigError, field_spec, field_specs
from ..config_schema import FieldSpec, parse_json_object

__all__ = ["Formatter", "add_config_options", "config_groups", "option_type"]


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help layout shared by the ``leap`` commands."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=100)


def option_type(spec: FieldSpec):
    """argparse ``type=`` for a field: the field's type, its lower bound, JSON objects for dicts."""
    if spec.kind is dict:

        def parse_dict(text: str) -> dict[str, Any]:
            try:
                return parse_json_object(text, spec.flag)
            except ConfigError as e:
                raise argparse.ArgumentTypeError(str(e).removeprefix(f"{spec.flag}: ")) from None

        return parse_dict
    if spec.kind in (int, float):
        word = "an integer" if spec.kind is int else "a number"

        def parse_number(text: str):
            try:
                v = spec.kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None
            if spec.min is not None and v < spec.min:
                raise argparse.ArgumentTypeError(f"expected {word} >= {spec.min:g}, got {v:g}")
            return v

        return parse_number
    return str


def _default_text(default: Any) -> str:
    if default is None or default == "" or default == {}:
        return ""
    if isinstance(default, dict):
        default = json.dumps(default)
    return f" (default: {default})"


def add_config_options(
    parser: argparse.ArgumentParser | Any,
    names: Iterable[str],
    *,
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
    required: Iterable[str] = (),
) -> None:
    """Add the options of the :class:`~leap.config.TrainConfig` fields ``names`` to ``parser``
    (a parser or an argument group).

    Args:
        defaults: per-field defaults of this command (default: the field's default). A parser
            built with ``argument_default=argparse.SUPPRESS`` omits unset options instead.
        help: per-field help text replacing the field's.
        required: fields this command requires.
    """
    defaults, help, required = dict(defaults or {}), dict(help or {}), set(required)
    suppress = getattr(parser, "argument_default", None) == argparse.SUPPRESS
    for name in names:
        spec = field_spec(name)
        default = defaults.get(name, spec.default)
        text = help.get(name, spec.help)
        kw: dict[str, Any] = {"dest": name}
        if not suppress:
            kw["default"] = default
        if spec.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            text += f" (default: {'on' if default else 'off'})"
        else:
            kw["type"] = option_type(spec)
            if spec.choices:
                kw["choices"] = spec.choices
            if spec.metavar:
                kw["metavar"] = spec.metavar
            if spec.show_default and name not in required:
                text += _default_text(default)
        if name in required:
            kw["required"] = True
        parser.add_argument(spec.flag, help=text, **kw)


def config_groups(parser: argparse.ArgumentParser, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Add every :class:`~leap.config.TrainConfig` field to ``parser``, one argument group per
    field ``group`` (in declaration order); returns the groups by name."""
    exclude = set(exclude)
    groups: dict[str, Any] = {}
    for name, spec in field_specs().items():
        if name in exclude:
            continue
        if spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        add_config_options(groups[spec.group], [name])
    return groups
