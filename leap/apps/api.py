"""The Python API: ``leap.distill``, ``leap.evaluate``, ``leap.export`` (the ``leap`` package exposes these
three functions lazily, so ``import leap`` stays light).

::

    import leap

    summary = leap.distill(teacher="vit_giant_patch14_reg4_dinov2", student="vit_small_patch14_dinov2",
                           data="/data/imagenet100", out="runs/vits", teacher_weights="dinov2_vitg14_reg4.pth")
    record = leap.evaluate("runs/vits", "knn", "/data/imagenet100")
    path = leap.export("runs/vits", "onnx", "vits.onnx")

Each is the code path of its command: ``leap distill`` and ``leap export`` call :func:`distill` and
:func:`export`; :func:`evaluate` calls the function of :mod:`leap.evaluation.run` that ``leap eval PROTOCOL``
calls. Options are those of the command under their Python names (``batch_size=64``), checked the same
way, with the same errors (:class:`leap.errors.LeapError` subclasses naming the option).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from ..config import TrainConfig, normalize_mapping
from ..config_schema import load_config_file
from ..errors import ConfigError

__all__ = ["distill", "evaluate", "export", "protocols", "train_config"]


def _plain(value: Any) -> Any:
    """Paths as strings (the options are typed ``str``)."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def train_config(config: TrainConfig | dict[str, Any] | str | os.PathLike | None = None, **options: Any) -> TrainConfig:
    """A validated :class:`~leap.config.TrainConfig`: defaults <- ``config`` <- ``options``.

    Args:
        config: a :class:`TrainConfig`, a mapping of options, or the path of a YAML/JSON file (``--config``).
        **options: :class:`TrainConfig` fields by name (``snake_case``; ``None`` = not given).

    Raises:
        ConfigError: unknown options (all named, with suggestions), values of the wrong type, invalid values.
        InputNotFoundError: no such config file.
    """
    values: dict[str, Any] = {}
    if isinstance(config, TrainConfig):
        values = config.to_dict()
    elif isinstance(config, dict):
        values = normalize_mapping({k: _plain(v) for k, v in config.items()}, source="config")
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        values = normalize_mapping(load_config_file(path), source=f"config file {path}")
    elif config is not None:
        raise ConfigError(f"config: expected a TrainConfig, a dict or a file path, got {type(config).__name__}")
    given = {k: _plain(v) for k, v in options.items() if v is not None}
    values.update(normalize_mapping(given, source="leap.distill"))
    return TrainConfig(**values).validate()


def distill(
    teacher: str | None = None,
    student: str | None = None,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    *,
    config: TrainConfig | dict[str, Any] | str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Distill ``teacher`` into ``student`` on ``data``, writing the run to ``out`` (``leap distill``).

    Args:
        teacher, student: model names (timm ViT names, ``hf-hub:ORG/NAME`` or ``timm/NAME``).
        data: the training images (``--data``).
        out: the run directory (``--out``; default ``runs/leap``).
        config: a :class:`~leap.config.TrainConfig`, a dict of options or a YAML/JSON file (``--config``);
            the other arguments win over it.
        **options: every other option of ``leap distill`` by its field name, e.g. ``teacher_weights=``,
            ``epochs=``, ``batch_size=``, ``curriculum="off"``, ``tensorboard=True``.

    Returns:
        The run's summary (also ``out/summary.json``): status, steps, target blocks, teacher FLOPs saved, ...

    Raises:
        ConfigError: an unknown option or a bad value (the same checks and messages as the command);
        MissingDependencyError: ``tensorboard=True`` without the tensorboard package; the other
        :class:`~leap.errors.LeapError` types of a run (data, models, checkpoints, a NaN loss).

    Example: ``leap.distill(teacher="vit_small_patch14_dinov2", student="vit_tiny_patch14_dinov2",
    data="images/", out="runs/tiny", epochs=10)``.
    """
    cfg = train_config(config, teacher=teacher, student=student, data=data, out=out, **options)
    if cfg.tensorboard:  # refuse before the (possibly large) teacher is built
        from ..run.tensorboard import require

        require()
    from ..run import loop

    return loop.train(cfg)


def protocols() -> dict[str, Callable[..., dict[str, Any]]]:
    """The evaluation protocols, ``{name: function}``: each ``evaluate_NAME`` of :mod:`leap.evaluation.run`."""
    from ..evaluation import run as evaluation

    return {
        name[len("evaluate_") :]: fn
        for name, fn in vars(evaluation).items()
        if name.startswith("evaluate_") and callable(fn)
    }


def _model_options(model_or_run: Any) -> dict[str, Any]:
    if isinstance(model_or_run, (str, os.PathLike)):
        return {"model": os.fspath(model_or_run)}
    if isinstance(model_or_run, dict):
        return {k: _plain(v) for k, v in model_or_run.items()}
    raise ConfigError(
        "model_or_run: expected a run directory or checkpoint path, or a dict of model options "
        f"(e.g. {{'teacher': NAME, 'teacher_weights': FILE, 'block': K}} or {{'pixels': True}}), got "
        f"{type(model_or_run).__name__}"
    )


def _bind(fn: Callable[..., Any], what: str, *args: Any, **options: Any) -> None:
    """Refuse keyword options ``fn`` does not take, as :class:`ConfigError` naming them and the valid ones."""
    try:
        inspect.signature(fn).bind(*args, **options)
    except TypeError as e:
        params = [p for p in inspect.signature(fn).parameters if p not in ("model_options", "data")]
        raise ConfigError(f"{what}: {e} (options: {', '.join(params)})") from None


def evaluate(
    model_or_run: str | os.PathLike | dict[str, Any],
    protocol: str,
    data: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate frozen features (``leap eval PROTOCOL``) and append the record to the run's ``eval.jsonl``.

    Args:
        model_or_run: a run directory or checkpoint file (``--model``), or a dict of the model options of
            :func:`leap.evaluation.features.load_model` (``{"teacher": NAME, "teacher_weights": FILE,
            "block": K}``, ``{"pixels": True}``).
        protocol: ``linear``, ``knn``, ``retrieval``, ``robustness``, ``segmentation`` (:func:`protocols` lists them).
        data: the labelled images (``--data``).
        **options: the protocol's options by name, e.g. ``k=20``, ``features="both"``, ``epochs=100``,
            ``dataset="roxford5k"`` (retrieval), ``device="cuda"``.

    Returns:
        The evaluation record (``numbers`` holds the results; ``log`` the ``eval.jsonl`` it went to).

    Raises:
        ConfigError: an unknown protocol or option; the evaluation's own errors (missing data, ...).

    Example: ``leap.evaluate("runs/tiny", "knn", "images/")["numbers"]``.
    """
    table = protocols()
    if protocol not in table:
        raise ConfigError(f"protocol: expected one of {', '.join(sorted(table))}, got {protocol!r}")
    fn = table[protocol]
    model_options = _model_options(model_or_run)
    data = _plain(data)
    options = {k: _plain(v) for k, v in options.items()}
    _bind(fn, f"leap.evaluate({protocol!r})", model_options, data, **options)
    return fn(model_options, data, **options)


def export(run_dir: str | os.PathLike, format: str, out: str | os.PathLike, **options: Any) -> str:
    """Export a run's student backbone (``leap export``): ``timm`` (``.pth``), ``safetensors`` or ``onnx``,
    checked after writing, with a JSON model card at ``out + ".json"`` (:mod:`leap.apps.export`).

    Args:
        run_dir: the run directory (or a ``leap distill`` checkpoint file).
        format: ``timm``, ``safetensors`` or ``onnx``.
        out: the file to write (a folder: ``out/student.pth|.safetensors|.onnx``).
        **options: ``checkpoint="last"|"best"|PATH``, and for ONNX ``int8=True``, ``eval_data=``,
            ``eval_data_source=``, ``eval_limit=``.

    Returns:
        The path of the exported file.

    Raises:
        ConfigError, InputNotFoundError, CheckpointError, MissingDependencyError (the ``export`` extra for
        ONNX), :class:`leap.apps.export.ExportError` (the check after writing failed; nothing was written).

    Example: ``leap.export("runs/tiny", "safetensors", "tiny.safetensors")``.
    """
    from .export import export_run

    options = {k: _plain(v) for k, v in options.items()}
    _bind(export_run, "leap.export", run_dir, format, out, **options)
    return export_run(_plain(run_dir), format, _plain(out), **options).path
