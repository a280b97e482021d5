"""The experiment file of ``leap experiment``: its schema, checked key by key, and the training config of each run.

One YAML file describes an experiment (see ``experiments/*/config.yaml``): a teacher checkpoint, a student,
the training recipe every run shares (``train``), the methods (each a few :class:`~leap.config.TrainConfig`
overrides), the seeds, the evaluation (``eval``), and optionally

- ``preregistered``: the primary and secondary metrics, fixed before the runs (``primary``, ``secondary``:
  metric keys of :data:`leap.apps.experiment_report.METRICS`; ``note``: free text);
- ``search``: a documented search of one method's ``tau`` and ``max_epochs_per_block`` on a validation
  split carved from the training images (:mod:`leap.apps.experiment_search`);
- ``discussion``: a Markdown file written after the runs, included in ``results.md``;
- ``contrasts``: pairs ``[a, b]`` of methods whose paired difference ``a - b`` is tabled too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, InputNotFoundError, LeapError

__all__ = [
    "ExperimentConfig",
    "EVAL_DEFAULTS",
    "SEARCH_DEFAULTS",
    "load_experiment",
    "run_config",
    "run_dir_of",
    "teacher_meta",
    "close",
]

_TOP_KEYS = {
    "name",
    "description",
    "teacher",
    "student",
    "student_overrides",
    "data",
    "data_source",
    "seeds",
    "baseline",
    "train",
    "methods",
    "eval",
    "teacher_cka",
    "runs_dir",
    "threads",
    "preregistered",
    "search",
    "discussion",
    "contrasts",
}
#: ``eval``: kNN and linear probe of the final student (``probe_train``/``probe_test``: the first N images,
#: None = all); ``cka_images``: the student's linear CKA to the teacher's last block on the first N test
#: images (0 = not measured); ``curve_train``/``curve_test``: kNN on every ``checkpoint-epochE.pt`` of the
#: run (needs ``train.save_every_epochs``) with these bank and test sizes (0 = no learning curves).
EVAL_DEFAULTS: dict[str, Any] = {
    "knn_k": 20,
    "probe_epochs": 100,
    "probe_train": None,
    "probe_test": None,
    "batch_size": 256,
    "cka_images": 0,
    "curve_train": 0,
    "curve_test": 0,
}
_PREREG_KEYS = {"primary", "secondary", "note"}
#: ``search`` keys and defaults (:mod:`leap.apps.experiment_search` says what each means).
SEARCH_DEFAULTS: dict[str, Any] = {
    "method": None,
    "same_timeout": [],
    "equal_flops": None,
    "seed": 100,
    "validation_images": 5000,
    "knn_train": 10000,
    "grid": None,
    "arrival": [0.85, 0.95],
    "fixed_by": 0.97,
    "min_cka_level_ups": 1,
    "metric": "knn_patch",
}
# Set by the runner for each run: a method or the shared recipe may not set them.
_RUNNER_KEYS = {
    "seed",
    "out",
    "teacher",
    "teacher_weights",
    "teacher_overrides",
    "student",
    "student_overrides",
    "img_size",
    "data",
    "data_source",
    "resume",
    "progress",
}


@dataclasses.dataclass
class ExperimentConfig:
    """An experiment file, validated. Paths are resolved against the file's folder."""

    name: str
    teacher: str  # a `leap train-teacher` checkpoint
    student: str
    student_overrides: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    baseline: str
    train: dict[str, Any]
    description: str = ""
    data: str | None = None  # None: Fashion-MNIST from /usr/share/datasets/fashion-mnist
    data_source: str = "fashion-mnist"
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_cka: dict[str, Any] = dataclasses.field(default_factory=dict)
    runs_dir: str = ""
    threads: int | None = None
    path: str = ""  # the file it came from
    preregistered: dict[str, Any] | None = None
    search: dict[str, Any] | None = None  # with SEARCH_DEFAULTS filled in
    discussion: str | None = None  # a Markdown file, resolved
    contrasts: list[list[str]] = dataclasses.field(default_factory=list)  # [a, b]: a - b, paired by seed
    all_methods: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # before --methods

    @property
    def eval_settings(self) -> dict[str, Any]:
        return {**EVAL_DEFAULTS, **self.eval}


def _closest(key: str, options: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _unknown(path: str, where: str, given: dict[str, Any], known: Sequence[str]) -> None:
    bad = sorted(set(given) - set(known))
    if bad:
        raise ConfigError(
            f"{path}: {where}unknown key {bad[0]!r}{_closest(bad[0], sorted(known))}; expected some of {sorted(known)}"
        )


def _check_preregistered(path: str, raw: Any) -> dict[str, Any] | None:
    from .experiment_report import METRIC_BY_KEY

    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: preregistered: expected a mapping with primary and secondary metric lists")
    _unknown(path, "preregistered: ", raw, _PREREG_KEYS)
    out: dict[str, Any] = {"note": str(raw.get("note", "")).strip()}
    for role in ("primary", "secondary"):
        keys = raw.get(role) or []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{path}: preregistered.{role}: expected a list of metric names, got {keys!r}")
        for k in keys:
            if k not in METRIC_BY_KEY:
                raise ConfigError(
                    f"{path}: preregistered.{role}: unknown metric {k!r}{_closest(k, sorted(METRIC_BY_KEY))}; "
                    f"expected some of {sorted(METRIC_BY_KEY)}"
                )
            if METRIC_BY_KEY[k].better is None:
                raise ConfigError(f"{path}: preregistered.{role}: {k!r} has no better direction to compare")
        out[role] = list(keys)
    if not out["primary"]:
        raise ConfigError(f"{path}: preregistered.primary: expected at least one metric")
    return out


def _check_search(path: str, raw: Any, methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: search: expected a mapping (method, grid, ...)")
    _unknown(path, "search: ", raw, SEARCH_DEFAULTS)
    s = {**SEARCH_DEFAULTS, **raw}

    def arm(key: str, value: Any) -> None:
        if value not in methods:
            raise ConfigError(f"{path}: search.{key}: {value!r} is not one of the methods {sorted(methods)}")

    arm("method", s["method"])
    if methods[s["method"]].get("curriculum", "cka") != "cka":
        raise ConfigError(f"{path}: search.method: {s['method']!r} must use curriculum cka (it is searched over tau)")
    if not isinstance(s["same_timeout"], list):
        raise ConfigError(f"{path}: search.same_timeout: expected a list of methods, got {s['same_timeout']!r}")
    for m in s["same_timeout"]:
        arm("same_timeout", m)
    if s["equal_flops"] is not None:
        arm("equal_flops", s["equal_flops"])
    grid = s["grid"]
    if not isinstance(grid, dict) or set(grid) != {"tau", "max_epochs_per_block"}:
        raise ConfigError(f"{path}: search.grid: expected {{tau: [...], max_epochs_per_block: [...]}}, got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"{path}: search.grid.{key}: expected a non-empty list of numbers, got {values!r}")
        if key == "max_epochs_per_block" and not all(0 < v < 1 for v in values):
            raise ConfigError(f"{path}: search.grid.max_epochs_per_block: expected fractions in (0, 1), got {values}")
    lo_hi = s["arrival"]
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1):
        raise ConfigError(f"{path}: search.arrival: expected [low, high] with 0 <= low < high <= 1, got {lo_hi!r}")
    if not (isinstance(s["fixed_by"], (int, float)) and 0 < s["fixed_by"] <= 1):
        raise ConfigError(f"{path}: search.fixed_by: expected a fraction in (0, 1], got {s['fixed_by']!r}")
    for key in ("seed", "validation_images", "knn_train", "min_cka_level_ups"):
        if (
            not isinstance(s[key], int)
            or isinstance(s[key], bool)
            or s[key] < (1 if key in ("validation_images", "knn_train") else 0)
        ):
            raise ConfigError(f"{path}: search.{key}: expected an integer >= 0, got {s[key]!r}")
    if s["metric"] not in ("knn_patch", "knn_cls"):
        raise ConfigError(f"{path}: search.metric: expected knn_patch or knn_cls, got {s['metric']!r}")
    return s


def _check_contrasts(path: str, raw: Any, methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    pairs = raw or []
    if not isinstance(pairs, list):
        raise ConfigError(f"{path}: contrasts: expected a list of [method, method] pairs, got {pairs!r}")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]):
            raise ConfigError(f"{path}: contrasts: expected pairs of two different methods, got {pair!r}")
        for m in pair:
            if m not in methods:
                raise ConfigError(f"{path}: contrasts: {m!r} is not one of the methods {sorted(methods)}")
    return [list(p) for p in pairs]


def load_experiment(
    path: str,
    *,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    runs_dir: str | None = None,
    data: str | None = None,
) -> ExperimentConfig:
    """Read and check an experiment YAML file; ``seeds``/``methods``/``runs_dir``/``data`` override the file's.

    Raises:
        InputNotFoundError: the file or the teacher checkpoint is missing.
        ConfigError: an unknown or missing key, a method that is not a valid training config.
    """
    from ..config import TrainConfig
    from ..config_schema import load_config_file

    raw = load_config_file(path)
    _unknown(path, "", raw, _TOP_KEYS)
    for key in ("name", "teacher", "student", "methods", "seeds", "baseline", "train"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str | None) -> str | None:
        return None if p is None else (p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))

    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise ConfigError(f"{path}: methods: expected a mapping of method name -> training overrides")
    all_methods = {str(k): dict(v or {}) for k, v in raw["methods"].items()}
    every_method = dict(all_methods)
    if raw["baseline"] not in all_methods:
        raise ConfigError(f"{path}: baseline {raw['baseline']!r} is not one of the methods {sorted(all_methods)}")
    if methods:
        missing = [m for m in methods if m not in all_methods]
        if missing:
            raise ConfigError(f"--methods: unknown method {missing[0]!r}; the file defines {sorted(all_methods)}")
        chosen = list(dict.fromkeys([raw["baseline"], *methods]))  # the baseline is always run
        all_methods = {m: all_methods[m] for m in chosen}
    file_seeds = raw["seeds"]
    if not isinstance(file_seeds, list) or not file_seeds or not all(isinstance(s, int) for s in file_seeds):
        raise ConfigError(f"{path}: seeds: expected a non-empty list of integers, got {file_seeds!r}")
    eval_cfg = dict(raw.get("eval") or {})
    _unknown(path, "eval: ", eval_cfg, EVAL_DEFAULTS)
    train = dict(raw["train"] or {})
    for where, overrides in [("train", train), *((f"methods.{m}", o) for m, o in every_method.items())]:
        clash = sorted({k.replace("-", "_") for k in overrides} & _RUNNER_KEYS)
        if clash:
            raise ConfigError(
                f"{path}: {where}: {clash[0]!r} is set by the experiment itself (top-level keys "
                "teacher/student/data/seeds), not per run"
            )
    discussion = resolve(raw.get("discussion"))
    if discussion is not None and not os.path.isfile(discussion):
        raise InputNotFoundError(f"{path}: discussion file not found: {discussion}")
    cfg = ExperimentConfig(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        teacher=resolve(raw["teacher"]),
        student=str(raw["student"]),
        student_overrides=dict(raw.get("student_overrides") or {}),
        methods=all_methods,
        seeds=list(seeds) if seeds else list(file_seeds),
        baseline=str(raw["baseline"]),
        train=train,
        data=data or resolve(raw.get("data")),
        data_source=str(raw.get("data_source", "fashion-mnist")),
        eval=eval_cfg,
        teacher_cka=dict(raw.get("teacher_cka") or {}),
        runs_dir=runs_dir or resolve(raw.get("runs_dir")) or os.path.join("runs", "experiments", str(raw["name"])),
        threads=raw.get("threads"),
        path=os.path.abspath(path),
        preregistered=_check_preregistered(path, raw.get("preregistered")),
        search=_check_search(path, raw.get("search"), every_method),
        discussion=discussion,
        contrasts=_check_contrasts(path, raw.get("contrasts"), every_method),
        all_methods=every_method,
    )
    ev = cfg.eval_settings
    for key in ("cka_images", "curve_train", "curve_test"):
        if not isinstance(ev[key], int) or isinstance(ev[key], bool) or ev[key] < 0:
            raise ConfigError(f"{path}: eval.{key}: expected an integer >= 0, got {ev[key]!r}")
    if bool(ev["curve_train"]) != bool(ev["curve_test"]):
        raise ConfigError(f"{path}: eval: curve_train and curve_test go together (both 0, or both > 0)")
    if ev["curve_train"] and not train.get("save_every_epochs"):
        raise ConfigError(f"{path}: eval.curve_train: learning curves need train.save_every_epochs (e.g. 1)")
    if not os.path.isfile(cfg.teacher):
        raise InputNotFoundError(f"{path}: teacher checkpoint not found: {cfg.teacher}")
    for method in every_method:
        try:
            TrainConfig.from_dict(run_config(cfg, method, cfg.seeds[0], "unused"))
        except LeapError as exc:
            raise ConfigError(f"{path}: methods.{method}: {exc}") from None
    return cfg


def teacher_meta(cfg: ExperimentConfig) -> dict[str, Any]:
    """The recipe stored beside the ``leap train-teacher`` checkpoint (model, overrides, img_size, ...)."""
    from ..errors import CheckpointError
    from .pretrain import read_teacher_meta

    meta = read_teacher_meta(cfg.teacher)
    if meta is None:
        raise CheckpointError(
            f"{cfg.teacher} has no train-teacher recipe; an experiment needs a `leap train-teacher` checkpoint"
        )
    return meta


def run_config(cfg: ExperimentConfig, method: str, seed: int, run_dir: str) -> dict[str, Any]:
    """The :class:`~leap.config.TrainConfig` fields of one run: shared recipe < method < runner keys."""
    from .pretrain import read_teacher_meta

    meta = read_teacher_meta(cfg.teacher) or {}
    overrides = cfg.methods.get(method, cfg.all_methods.get(method))
    if overrides is None:
        raise ConfigError(f"unknown method {method!r}; the file defines {sorted(cfg.all_methods)}")
    return {
        **cfg.train,
        **overrides,
        "teacher": meta.get("model", ""),
        "teacher_weights": cfg.teacher,
        "teacher_overrides": meta.get("model_overrides", {}),
        "img_size": meta.get("img_size", 224),
        "student": cfg.student,
        "student_overrides": cfg.student_overrides,
        "data": cfg.data,
        "data_source": cfg.data_source,
        "seed": seed,
        "out": run_dir,
    }


def run_dir_of(cfg: ExperimentConfig, method: str, seed: int) -> str:
    return os.path.join(cfg.runs_dir, method, f"seed{seed}")


def close(a: float, b: float) -> bool:
    """Two config numbers equal up to float noise (a YAML ``0.44`` and a computed 0.44)."""
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
