"""``leap experiment CONFIG`` (``make experiment``): a seeded comparison of distillation methods.

One YAML file describes an experiment: a teacher checkpoint, a student, the training recipe every
run shares, the methods (each a few :class:`~leap.config.TrainConfig` overrides, e.g.
``curriculum: off`` for the last-block baseline, ``curriculum: one-to-one``, LEAP at several
``tau``), the seeds and the evaluation. The runner only composes the project's own pieces:

1. the teacher's block-to-block linear CKA on held-out images (how distinct the targets are);
2. for every (method, seed): :func:`leap.run.loop.train` into ``RUNS_DIR/<method>/seed<k>``, then the
   linear probe and kNN of :mod:`leap.evaluation` on the frozen student (records in the run's
   ``eval.jsonl``) and :func:`leap.apps.report.make_report`;
3. one record per run read back from the run's own files (``summary.json``, ``eval.jsonl``,
   ``log.jsonl``) -- never from memory -- written as ``OUT/raw/<method>-seed<k>.json``;
4. ``OUT/results.md``: mean +- std over seeds per method and metric, the paired difference to the
   baseline with a 95% Student-t interval, plots, and ``OUT/results.json`` with everything.

A finished run whose stored config matches is reused (``--fresh`` retrains), so an interrupted
experiment continues where it stopped. Same seed = same student init and data order for every method.

Why this module is long: the experiment file's schema (checked key by key, with its errors) and the
runner share the rule of when a finished run is reused; the tables and plots are in
:mod:`leap.apps.experiment_report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, InputNotFoundError, LeapError
from ..runlog import read_json, read_jsonl, write_json
from .experiment_report import (
    METRICS,
    aggregate,
    environment,
    format_value,
    paired_interval,
    render_results,
    results_table,
    t_quantile_975,
    write_plots,
)

__all__ = [
    "ExperimentConfig",
    "load_experiment",
    "run_experiment",
    "run_config",
    "collect_run",
    "teacher_block_cka",
    # re-exported from leap.apps.experiment_report
    "METRICS",
    "aggregate",
    "format_value",
    "paired_interval",
    "render_results",
    "results_table",
    "t_quantile_975",
]

SUMMARY_FILE = "summary.json"
#: Statuses of a run that trained its whole budget (``epochs``, or ``max_steps`` when set).
_DONE = ("completed", "stopped_at_max_steps")
EVAL_FILE = "eval.jsonl"
#: The folder of the per-run JSON records under the results folder.
RAW_DIR = "raw"

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
}
_EVAL_KEYS = {"knn_k", "probe_epochs", "probe_train", "probe_test", "batch_size"}
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

    @property
    def eval_settings(self) -> dict[str, Any]:
        return {
            "knn_k": 20,
            "probe_epochs": 100,
            "probe_train": None,
            "probe_test": None,
            "batch_size": 256,
            **self.eval,
        }


def _closest(key: str, options: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


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
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}{_closest(unknown[0], sorted(_TOP_KEYS))}; "
            f"expected some of {sorted(_TOP_KEYS)}"
        )
    for key in ("name", "teacher", "student", "methods", "seeds", "baseline", "train"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r}")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str | None) -> str | None:
        return None if p is None else (p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)))

    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise ConfigError(f"{path}: methods: expected a mapping of method name -> training overrides")
    all_methods = {str(k): dict(v or {}) for k, v in raw["methods"].items()}
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
    bad = sorted(set(eval_cfg) - _EVAL_KEYS)
    if bad:
        raise ConfigError(f"{path}: eval: unknown key {bad[0]!r}{_closest(bad[0], sorted(_EVAL_KEYS))}")
    train = dict(raw["train"] or {})
    for where, overrides in [("train", train), *((f"methods.{m}", o) for m, o in all_methods.items())]:
        clash = sorted({k.replace("-", "_") for k in overrides} & _RUNNER_KEYS)
        if clash:
            raise ConfigError(
                f"{path}: {where}: {clash[0]!r} is set by the experiment itself (top-level keys "
                "teacher/student/data/seeds), not per run"
            )
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
    )
    if not os.path.isfile(cfg.teacher):
        raise InputNotFoundError(f"{path}: teacher checkpoint not found: {cfg.teacher}")
    for method in cfg.methods:
        try:
            TrainConfig.from_dict(run_config(cfg, method, cfg.seeds[0], "unused"))
        except LeapError as exc:
            raise ConfigError(f"{path}: methods.{method}: {exc}") from None
    return cfg


def _teacher_meta(cfg: ExperimentConfig) -> dict[str, Any]:
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
    return {
        **cfg.train,
        **cfg.methods[method],
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


# --------------------------------------------------------------------------------- one run


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _latest_eval(records: list[dict[str, Any]], protocol: str, checkpoint_sha: str | None) -> dict[str, Any] | None:
    """The last ``protocol`` record of ``eval.jsonl`` for this checkpoint (its SHA-256 when recorded)."""
    for rec in reversed(records):
        if rec.get("protocol") != protocol:
            continue
        sha = (rec.get("model") or {}).get("checkpoint_sha256")
        if checkpoint_sha and sha and sha != checkpoint_sha:
            continue
        return rec
    return None


def collect_run(
    run_dir: str, *, method: str, seed: int, baseline_flops: dict[str, float] | None = None
) -> dict[str, Any]:
    """One run's record, read from its own files only.

    ``metrics`` (see :data:`METRICS`) come from ``summary.json`` (FLOPs, wall time, mean block) and the
    newest ``linear``/``knn`` records of ``eval.jsonl``; ``trajectory`` (target block per step and per
    epoch) from ``log.jsonl``; ``sources`` names each file with its SHA-256. ``baseline_flops`` =
    ``{"teacher_flops", "step_flops"}`` of the baseline (mean over seeds) for the "saved vs baseline"
    metrics; without it they are None.

    Raises:
        InputNotFoundError: the run has no summary or no linear/kNN record.
    """
    from ..runlog import load_run

    summary_path = os.path.join(run_dir, SUMMARY_FILE)
    eval_path = os.path.join(run_dir, EVAL_FILE)
    if not os.path.isfile(summary_path):
        raise InputNotFoundError(f"{run_dir}: no {SUMMARY_FILE} (the run did not finish)")
    summary = read_json(summary_path)
    records, _ = read_jsonl(eval_path) if os.path.isfile(eval_path) else ([], 0)
    ckpt = summary.get("checkpoint")
    ckpt_sha = _sha256(ckpt) if ckpt and os.path.isfile(ckpt) else None
    linear = _latest_eval(records, "linear", ckpt_sha)
    knn = _latest_eval(records, "knn", ckpt_sha)
    if linear is None or knn is None:
        raise InputNotFoundError(
            f"{run_dir}: {EVAL_FILE} has no {'linear' if linear is None else 'knn'} record for the final checkpoint"
        )
    flops = summary.get("flops") or {}
    lin, kn = linear["numbers"], knn["numbers"]
    metrics: dict[str, float | None] = {
        "linear_cls_best": lin["cls"]["best_top1"],
        "linear_patch_best": lin["patch"]["best_top1"],
        "linear_cls_last": lin["cls"]["last_top1"],
        "linear_patch_last": lin["patch"]["last_top1"],
        "knn_cls": kn["cls"],
        "knn_patch": kn["patch"],
        "teacher_tflops": flops["teacher_flops"] / 1e12 if flops.get("teacher_flops") is not None else None,
        "teacher_saved_vs_baseline": None,
        "total_saved_vs_baseline": None,
        "train_time_s": summary.get("train_time_s"),
        "mean_block": summary.get("mean_block"),
    }
    if baseline_flops and flops.get("teacher_flops") is not None:
        metrics["teacher_saved_vs_baseline"] = 1.0 - flops["teacher_flops"] / baseline_flops["teacher_flops"]
        metrics["total_saved_vs_baseline"] = 1.0 - flops["step_flops"] / baseline_flops["step_flops"]
    run = load_run(run_dir)
    return {
        "method": method,
        "seed": seed,
        "run_dir": os.path.abspath(run_dir),
        "mode": summary.get("mode"),
        "status": summary.get("status"),
        "metrics": metrics,
        "flops": {
            k: flops.get(k)
            for k in (
                "teacher_flops",
                "baseline_teacher_flops",
                "saved_fraction",
                "step_flops",
                "baseline_step_flops",
                "total_saved_fraction",
            )
        },
        "steps": summary.get("steps"),
        "num_blocks": summary.get("num_blocks"),
        "start_block": summary.get("start_block"),
        "final_block": summary.get("final_block"),
        "level_ups": summary.get("level_ups"),
        "trajectory": {"step_blocks": run.step_blocks(), "epoch_mean_blocks": run.epoch_mean_blocks()},
        "eval_elapsed_s": (linear.get("elapsed_s") or 0.0) + (knn.get("elapsed_s") or 0.0),
        "linear_settings": linear.get("settings"),
        "knn_settings": knn.get("settings"),
        "eval_data": {"linear": linear.get("data"), "knn": knn.get("data")},
        "sources": {
            SUMMARY_FILE: _sha256(summary_path),
            EVAL_FILE: _sha256(eval_path),
            "checkpoint": ckpt_sha,
            "linear_record_time": linear.get("time"),
            "knn_record_time": knn.get("time"),
        },
        "config": summary.get("config"),
    }


def _finished(cfg: ExperimentConfig, method: str, seed: int, run_dir: str) -> bool:
    """A run that completed with the same training config and has both evaluation records."""
    from ..config import TrainConfig

    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return False
    try:
        summary = read_json(path)
        want = TrainConfig.from_dict(run_config(cfg, method, seed, run_dir)).to_dict()
        got = dict(summary.get("config") or {})
    except Exception:  # noqa: BLE001 - an unreadable summary means: run again
        return False
    ignore = {"progress", "log_every"}
    same = {k: v for k, v in want.items() if k not in ignore} == {k: v for k, v in got.items() if k not in ignore}
    if not same or summary.get("status") not in _DONE:
        return False
    try:
        collect_run(run_dir, method=method, seed=seed)
    except LeapError:
        return False
    return True


def _evaluate_run(cfg: ExperimentConfig, run_dir: str, checkpoint: str, progress: bool) -> None:
    from ..evaluation.run import evaluate_knn, evaluate_linear

    ev = cfg.eval_settings
    common = dict(
        data_source=cfg.data_source,
        features="both",
        cache_dir=os.path.join(cfg.runs_dir, "feature-cache"),
        workers=0,
        device="cpu",
        progress=progress,
        limit_train=ev["probe_train"],
        limit_val=ev["probe_test"],
        batch_size=ev["batch_size"],
        run_dir=run_dir,
        write_record=True,
    )
    evaluate_knn({"model": checkpoint}, cfg.data, k=ev["knn_k"], **common)
    evaluate_linear({"model": checkpoint}, cfg.data, epochs=ev["probe_epochs"], **common)


def _train_and_evaluate(cfg: ExperimentConfig, method: str, seed: int, progress: bool) -> None:
    from ..run import loop

    run_dir = run_dir_of(cfg, method, seed)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # never resume a stale or different run: every run starts from its seed
    summary = loop.train({**run_config(cfg, method, seed, run_dir), "progress": progress})
    if summary.get("status") not in _DONE:
        raise LeapError(f"{method} seed {seed}: training ended with status {summary.get('status')!r}")
    # The evaluation's bars only on a terminal (in a log file they would be one line per update).
    _evaluate_run(cfg, run_dir, summary["checkpoint"], progress and sys.stderr.isatty())
    try:
        from .report import make_report

        make_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the plots are a convenience; the records stand without them
        print(f"  (report for {run_dir} failed: {exc})")


# --------------------------------------------------------------------------------- teacher CKA


def teacher_block_cka(cfg: ExperimentConfig, images: int = 1000, batch_size: int = 250) -> dict[str, Any]:
    """Linear CKA between the teacher's (final-normed) patch tokens after every pair of blocks.

    Computed on the first ``images`` held-out images with the evaluation transform; the tokens of all
    images are pooled (N = images x patches rows). Returns ``{"blocks", "images", "matrix"}``.
    """
    import torch

    from ..cka import linear_cka
    from ..evaluation.linear import open_splits
    from ..models import build_model, load_teacher_weights
    from ..teacher import TruncatedTeacher

    meta = _teacher_meta(cfg)
    model = build_model(meta["model"], img_size=meta["img_size"], **meta["model_overrides"])
    load_teacher_weights(model, cfg.teacher)
    teacher = TruncatedTeacher(model, dtype=torch.float32)
    blocks = list(range(1, teacher.num_blocks + 1))
    val = open_splits(cfg.data, meta["img_size"], source=cfg.data_source).val
    count = min(images, len(val))
    feats: list[list[torch.Tensor]] = [[] for _ in blocks]
    for start in range(0, count, batch_size):
        x = torch.stack([val[i][0] for i in range(start, min(count, start + batch_size))])
        patch, _ = teacher.collect(x, blocks)
        for b in range(len(blocks)):
            feats[b].append(patch[b].reshape(-1, patch.shape[-1]).double())
    stacked = [torch.cat(f) for f in feats]
    matrix = [[float(linear_cka(stacked[i], stacked[j])) for j in range(len(blocks))] for i in range(len(blocks))]
    return {"blocks": blocks, "images": count, "matrix": matrix}


def _student_params(cfg: ExperimentConfig, img_size: int) -> int:
    from ..models import build_model

    model = build_model(cfg.student, img_size=img_size, **cfg.student_overrides)
    return sum(p.numel() for p in model.parameters())


def run_experiment(
    cfg: ExperimentConfig, out: str, *, fresh: bool = False, progress: bool = True, table_only: bool = False
) -> dict[str, Any]:
    """Train and evaluate every (method, seed) not finished yet, then write ``out``'s results.

    ``table_only``: no training; rebuild the results from the finished runs (missing ones are an error).
    Returns ``{"records", "aggregate", "results_md"}``.
    """
    import torch

    from .. import data as leap_data
    from .demo import FASHION_MNIST_HELP

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.data_source == "fashion-mnist" and leap_data.FashionMNIST.find_files(cfg.data, "train") is None:
        raise InputNotFoundError(FASHION_MNIST_HELP)
    teacher = _teacher_meta(cfg)
    start = time.time()
    os.makedirs(os.path.join(out, RAW_DIR), exist_ok=True)
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    for i, (method, seed) in enumerate(jobs, 1):
        run_dir = run_dir_of(cfg, method, seed)
        if not fresh and _finished(cfg, method, seed, run_dir):
            print(f"[{i}/{len(jobs)}] {method} seed {seed}: finished earlier, reused ({run_dir})", flush=True)
            continue
        if table_only:
            raise InputNotFoundError(f"{method} seed {seed}: no finished run in {run_dir} (run without --table-only)")
        print(f"[{i}/{len(jobs)}] {method} seed {seed}: training and evaluating -> {run_dir}", flush=True)
        t0 = time.time()
        _train_and_evaluate(cfg, method, seed, progress)
        print(f"[{i}/{len(jobs)}] {method} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)

    base = [collect_run(run_dir_of(cfg, cfg.baseline, s), method=cfg.baseline, seed=s) for s in cfg.seeds]
    baseline_flops = {k: statistics.fmean(r["flops"][k] for r in base) for k in ("teacher_flops", "step_flops")}
    records = [collect_run(run_dir_of(cfg, m, s), method=m, seed=s, baseline_flops=baseline_flops) for m, s in jobs]
    for rec in records:
        write_json(os.path.join(out, RAW_DIR, f"{rec['method']}-seed{rec['seed']}.json"), rec)
    agg = aggregate(records, cfg.baseline)

    cka_path = os.path.join(out, "teacher_cka.json")
    cka = None
    if cfg.teacher_cka.get("images", 1000):
        # Cached next to the results: it depends only on the teacher, the data and the image count.
        key = {
            "teacher_sha256": _sha256(cfg.teacher),
            "data": cfg.data,
            "requested": int(cfg.teacher_cka.get("images", 1000)),
        }
        old = read_json(cka_path) if os.path.isfile(cka_path) else None
        if old and all(old.get(k) == v for k, v in key.items()):
            cka = old
        else:
            print(f"teacher block-to-block CKA on {key['requested']} test images", flush=True)
            cka = {**teacher_block_cka(cfg, key["requested"]), **key}
            write_json(cka_path, cka)
    plots = write_plots(records, agg, cka, out)
    env = environment()
    wall = time.time() - start
    text = render_results(cfg, records, agg, teacher, _student_params(cfg, teacher["img_size"]), cka, plots, env, wall)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    write_json(
        os.path.join(out, "results.json"),
        {
            "name": cfg.name,
            "config": os.path.relpath(cfg.path),
            "environment": env,
            "wall_s": wall,
            "teacher": {k: teacher.get(k) for k in ("model", "model_overrides", "img_size", "params", "test_accuracy")},
            "aggregate": agg,
            "runs": records,
            "teacher_cka": cka,
        },
    )
    print(f"\nresults: {os.path.join(out, 'results.md')}\n")
    print("\n".join(results_table(agg)))
    return {"records": records, "aggregate": agg, "results_md": text}
