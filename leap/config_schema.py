"""How a config dataclass becomes options: typed field specs, value coercion, config files.

A config dataclass (:class:`leap.config.TrainConfig`) declares each option once, as a field with
``help``/``group``/``metavar``/``min``/``show_default`` metadata. This module reads those fields
into :class:`FieldSpec` records (what the CLI generates its flags from), converts values read from
YAML/JSON files or the command line to each field's type, and checks the keys of a mapping. It
knows nothing of any particular option: :mod:`leap.config` binds it to ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, InputNotFoundError

__all__ = [
    "FieldSpec",
    "coerce",
    "dataclass_fields",
    "field_specs",
    "load_config_file",
    "normalize_key",
    "normalize_mapping",
    "parse_json_object",
]


@dataclass(frozen=True)
class FieldSpec:
    """What an option is, read from a config dataclass field and its metadata.

    ``kind`` is the value type (``bool``, ``int``, ``float``, ``str`` or ``dict``), from the
    field's annotation; ``optional`` is True when ``None`` is allowed.
    """

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    group: str
    metavar: str | None
    choices: tuple[str, ...] | None
    min: float | None
    show_default: bool

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def dataclass_fields(cls: type) -> dict[str, dataclasses.Field]:
    """Fields of the dataclass ``cls`` by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _kind(annotation: Any) -> tuple[type, bool]:
    """``(value type, optional)`` of an annotation such as ``int | None`` or ``dict[str, Any]``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported option annotation {annotation!r}")
        return _kind(inner[0])[0], type(None) in args
    origin = typing.get_origin(annotation) or annotation
    if origin not in (bool, int, float, str, dict):
        raise TypeError(f"unsupported option annotation {annotation!r}")
    return origin, False


def field_specs(cls: type, choices: Mapping[str, tuple[str, ...]]) -> dict[str, FieldSpec]:
    """:class:`FieldSpec` of every field of the dataclass ``cls``, in declaration order.

    ``choices`` gives the allowed values of the string options that have a fixed set.
    """
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        m = f.metadata
        specs[f.name] = FieldSpec(
            f.name,
            kind,
            optional,
            default,
            m["help"],
            m["group"],
            m["metavar"],
            choices.get(f.name),
            m["min"],
            m["show_default"],
        )
    return specs


def normalize_key(key: str) -> str:
    """``"max-epochs-per-block"`` / ``"--tau"`` -> snake_case field name."""
    return key.strip().lstrip("-").replace("-", "_")


def normalize_mapping(specs: Mapping[str, FieldSpec], values: Any, *, source: str = "config") -> dict[str, Any]:
    """Check the keys of a config mapping against ``specs`` and coerce its values; no cross-field validation.

    Keys may be snake_case or kebab-case; ``no_<flag>: true`` mirrors a ``--no-<flag>`` boolean.
    Raises :class:`ConfigError` naming *all* unknown keys (with a close match when there is one)
    or the first bad value.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    clean: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = normalize_key(str(key))
        if name not in specs and name.startswith("no_") and name[3:] in specs and specs[name[3:]].kind is bool:
            clean[name[3:]] = not coerce(specs[name[3:]], value, source)
            continue
        if name not in specs:
            unknown.append(str(key))
            continue
        clean[name] = coerce(specs[name], value, source)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(normalize_key(k), list(specs), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(specs)}")
    return clean


def parse_json_object(text: str, where: str) -> dict[str, Any]:
    """A JSON object from ``text`` (e.g. ``--student-overrides``); an empty string is ``{}``.

    Raises:
        ConfigError: invalid JSON, or JSON that is not an object (``where`` names the option).
    """
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON ({e.msg} at position {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON object such as '{{\"depth\": 2}}', got {text!r}")
    return value


def coerce(spec: FieldSpec, value: Any, source: str) -> Any:
    """Convert a file/CLI value to the type of ``spec`` (YAML reads ``1e-3`` as a string, etc.).

    Raises:
        ConfigError: the value does not convert (names ``source`` and the field).
    """
    kind = spec.kind
    where = f"{source}: {spec.name}"
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where}: null is not allowed")
    if kind is dict:
        if isinstance(value, str):
            value = parse_json_object(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object / mapping, got {value!r}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file into a dict.

    Other extensions are parsed as YAML (a superset of JSON). The file must hold one
    mapping. Keys are not checked here (:func:`normalize_mapping` does that).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/json raise several types
        raise ConfigError(f"could not parse config file {path}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of options at the top level, got {type(data).__name__}"
        )
    return data
