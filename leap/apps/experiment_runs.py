"""One run of ``leap experiment``: train, evaluate, and read its record back from its own files.

For every (method, seed): :func:`leap.run.loop.train` into the run folder, then, on the frozen student,
the kNN and linear probe of :mod:`leap.evaluation` (records in the run's ``eval.jsonl``), optionally kNN
learning curves on the per-epoch checkpoints (records tagged ``"purpose": "learning-curve"``) and the
student's linear CKA to the teacher's last block on test images (a ``"teacher-cka"`` record).
:func:`collect_run` reads all of it back from ``summary.json``, ``eval.jsonl`` and ``log.jsonl`` --
never from memory -- with the SHA-256 of each file.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time
from typing import Any

from ..errors import InputNotFoundError, LeapError
from ..runlog import read_json, read_jsonl
from .experiment_config import ExperimentConfig, run_config, run_dir_of, teacher_meta
from .export_source import sha256_file as sha256

__all__ = [
    "SUMMARY_FILE",
    "EVAL_FILE",
    "CURVE_PURPOSE",
    "CKA_PROTOCOL",
    "sha256",
    "collect_run",
    "finished",
    "train_and_evaluate",
    "teacher_block_cka",
    "last_block_at",
]

SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.jsonl"
#: Statuses of a run that trained its whole budget (``epochs``, or ``max_steps`` when set).
DONE = ("completed", "stopped_at_max_steps")
#: The tag of the learning-curve records in ``eval.jsonl`` (kNN on subsets, per epoch checkpoint).
CURVE_PURPOSE = "learning-curve"
#: The protocol name of the student-to-teacher CKA record.
CKA_PROTOCOL = "teacher-cka"


def _latest_eval(records: list[dict[str, Any]], protocol: str, checkpoint_sha: str | None) -> dict[str, Any] | None:
    """The last ``protocol`` record of ``eval.jsonl`` for this checkpoint (its SHA-256 when recorded);
    learning-curve records (kNN on subsets) never count as the final evaluation."""
    for rec in reversed(records):
        if rec.get("protocol") != protocol or rec.get("purpose") == CURVE_PURPOSE:
            continue
        sha = (rec.get("model") or {}).get("checkpoint_sha256")
        if checkpoint_sha and sha and sha != checkpoint_sha:
            continue
        return rec
    return None


def last_block_at(summary: dict[str, Any]) -> float | None:
    """Fraction of the run's steps done when the target first became the teacher's last block: 0 for a run
    that starts there, ``level-up step / steps`` otherwise, None when it never got there."""
    blocks, steps = summary.get("num_blocks"), summary.get("steps")
    if not blocks or not steps:
        return None
    if summary.get("start_block") == blocks:
        return 0.0
    for up in summary.get("level_ups") or []:
        if up.get("to_block") == blocks:
            return up["step"] / steps
    return None


def _curve(records: list[dict[str, Any]], steps_per_epoch: int | None) -> list[dict[str, Any]]:
    """The learning-curve points (newest record per checkpoint step), oldest first; ``epoch`` = steps done /
    steps per epoch (a run stopped by ``max_steps`` ends inside an epoch)."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.get("purpose") != CURVE_PURPOSE or rec.get("protocol") != "knn":
            continue
        training = (rec.get("model") or {}).get("training") or {}
        if training.get("step") is None or not steps_per_epoch:
            continue
        by_step[int(training["step"])] = {
            "epoch": round(training["step"] / steps_per_epoch, 4),
            "step": training["step"],
            "teacher_flops": training.get("teacher_flops"),
            "knn_cls": rec["numbers"].get("cls"),
            "knn_patch": rec["numbers"].get("patch"),
            "train_images": (rec.get("data") or {}).get("train_images"),
            "test_images": (rec.get("data") or {}).get("val_images"),
        }
    return [by_step[k] for k in sorted(by_step)]


def collect_run(
    run_dir: str,
    *,
    method: str,
    seed: int,
    baseline_flops: dict[str, float] | None = None,
    need: tuple[str, ...] = ("linear", "knn"),
) -> dict[str, Any]:
    """One run's record, read from its own files only.

    ``metrics`` (see :data:`leap.apps.experiment_report.METRICS`) come from ``summary.json`` (FLOPs, wall
    time, mean block, when the last block was reached) and the newest ``linear``/``knn``/``teacher-cka``
    records of ``eval.jsonl`` for the final checkpoint; ``trajectory`` (target block per step and per epoch)
    from ``log.jsonl``; ``curve`` from the learning-curve records; ``sources`` names each file with its
    SHA-256. ``baseline_flops`` = ``{"teacher_flops", "step_flops"}`` of the baseline (mean over seeds) for
    the "saved vs baseline" metrics; without it they are None. ``need``: the protocols that must be there
    (``linear``, ``knn``, ``teacher-cka``, ``curve``).

    Raises:
        InputNotFoundError: the run has no summary or lacks a record of ``need``.
    """
    from ..runlog import load_run

    summary_path = os.path.join(run_dir, SUMMARY_FILE)
    eval_path = os.path.join(run_dir, EVAL_FILE)
    if not os.path.isfile(summary_path):
        raise InputNotFoundError(f"{run_dir}: no {SUMMARY_FILE} (the run did not finish)")
    summary = read_json(summary_path)
    records, _ = read_jsonl(eval_path) if os.path.isfile(eval_path) else ([], 0)
    ckpt = summary.get("checkpoint")
    ckpt_sha = sha256(ckpt) if ckpt and os.path.isfile(ckpt) else None
    found = {p: _latest_eval(records, p, ckpt_sha) for p in ("linear", "knn", CKA_PROTOCOL)}
    curve = _curve(records, (summary.get("resolved") or {}).get("steps_per_epoch"))
    for p in need:
        if (p == "curve" and not curve) or (p != "curve" and found.get(p) is None):
            raise InputNotFoundError(f"{run_dir}: {EVAL_FILE} has no {p} record for the final checkpoint")
    linear, knn, cka = found["linear"], found["knn"], found[CKA_PROTOCOL]
    lin = (linear or {}).get("numbers") or {}
    kn = (knn or {}).get("numbers") or {}
    flops = summary.get("flops") or {}
    metrics: dict[str, float | None] = {
        "linear_cls_best": (lin.get("cls") or {}).get("best_top1"),
        "linear_patch_best": (lin.get("patch") or {}).get("best_top1"),
        "linear_cls_last": (lin.get("cls") or {}).get("last_top1"),
        "linear_patch_last": (lin.get("patch") or {}).get("last_top1"),
        "knn_cls": kn.get("cls"),
        "knn_patch": kn.get("patch"),
        "cka_last_block": ((cka or {}).get("numbers") or {}).get("last_block"),
        "teacher_tflops": flops["teacher_flops"] / 1e12 if flops.get("teacher_flops") is not None else None,
        "teacher_saved_vs_baseline": None,
        "total_saved_vs_baseline": None,
        "train_time_s": summary.get("train_time_s"),
        "mean_block": summary.get("mean_block"),
        "last_block_at": last_block_at(summary),
    }
    if baseline_flops and flops.get("teacher_flops") is not None:
        metrics["teacher_saved_vs_baseline"] = 1.0 - flops["teacher_flops"] / baseline_flops["teacher_flops"]
        metrics["total_saved_vs_baseline"] = 1.0 - flops["step_flops"] / baseline_flops["step_flops"]
    run = load_run(run_dir)
    used = [r for r in (linear, knn, cka) if r]
    resolved = summary.get("resolved") or {}
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
                "calibration_flops",
            )
        },
        "steps": summary.get("steps"),
        "resolved": {k: resolved.get(k) for k in ("steps_per_epoch", "total_steps", "max_steps_per_block")},
        "num_blocks": summary.get("num_blocks"),
        "start_block": summary.get("start_block"),
        "final_block": summary.get("final_block"),
        "level_ups": summary.get("level_ups"),
        "trajectory": {"step_blocks": run.step_blocks(), "epoch_mean_blocks": run.epoch_mean_blocks()},
        "curve": curve,
        "eval_elapsed_s": sum(r.get("elapsed_s") or 0.0 for r in used)
        + sum(r.get("elapsed_s") or 0.0 for r in records if r.get("purpose") == CURVE_PURPOSE),
        "linear_settings": (linear or {}).get("settings"),
        "knn_settings": (knn or {}).get("settings"),
        "cka_settings": (cka or {}).get("settings"),
        "eval_data": {"linear": (linear or {}).get("data"), "knn": (knn or {}).get("data")},
        "sources": {
            SUMMARY_FILE: sha256(summary_path),
            EVAL_FILE: sha256(eval_path) if os.path.isfile(eval_path) else None,
            "checkpoint": ckpt_sha,
            "linear_record_time": (linear or {}).get("time"),
            "knn_record_time": (knn or {}).get("time"),
        },
        "config": summary.get("config"),
    }


def needed(ev: dict[str, Any]) -> tuple[str, ...]:
    """The records a finished run must hold under the evaluation settings ``ev``."""
    need = ["knn"]
    if ev["probe_epochs"]:
        need.append("linear")
    if ev["cka_images"]:
        need.append(CKA_PROTOCOL)
    if ev["curve_train"]:
        need.append("curve")
    return tuple(need)


def finished(cfg: ExperimentConfig, method: str, seed: int, run_dir: str, ev: dict[str, Any] | None = None) -> bool:
    """A run that completed with the same training config and has every evaluation record."""
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
    if not same or summary.get("status") not in DONE:
        return False
    try:
        collect_run(run_dir, method=method, seed=seed, need=needed(ev or cfg.eval_settings))
    except LeapError:
        return False
    return True


_TEACHER_TOKENS: dict[tuple, Any] = {}


def _test_images(cfg: ExperimentConfig, img_size: int, count: int):
    """The first ``count`` held-out images, ``(count, 3, img_size, img_size)``, with the evaluation transform."""
    import torch

    from ..evaluation.linear import open_splits

    val = open_splits(cfg.data, img_size, source=cfg.data_source).val
    return torch.stack([val[i][0] for i in range(min(count, len(val)))])


def _patch_tokens(extractor: Any, images: Any, batch_size: int = 250):
    """Patch tokens after the final norm, pooled over images: ``(N * patches, D)`` in float64."""
    import torch

    with torch.no_grad():
        parts = [extractor.patch_tokens(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    tokens = torch.cat(parts)
    return tokens.reshape(-1, tokens.shape[-1]).double()


def student_teacher_cka(cfg: ExperimentConfig, run_dir: str, checkpoint: str, images: int) -> dict[str, Any]:
    """Linear CKA between the student's patch tokens (after its final norm, no head) and the teacher's
    last-block patch tokens (after its final norm) on the first ``images`` held-out images, tokens of all
    images pooled; appended to the run's ``eval.jsonl`` as a ``teacher-cka`` record (returned)."""
    from ..cka import linear_cka
    from ..evaluation import records
    from ..evaluation.features import load_model

    start = time.time()
    img_size = teacher_meta(cfg)["img_size"]
    key = (cfg.teacher, sha256(cfg.teacher), cfg.data, cfg.data_source, images)
    if key not in _TEACHER_TOKENS:
        teacher = load_model(teacher_weights=cfg.teacher)
        x = _test_images(cfg, img_size, images)
        _TEACHER_TOKENS.clear()
        _TEACHER_TOKENS[key] = (x, _patch_tokens(teacher.extractor, x))
    x, t_tokens = _TEACHER_TOKENS[key]
    student = load_model(checkpoint)
    value = float(linear_cka(_patch_tokens(student.extractor, x), t_tokens))
    record = records.make_record(
        CKA_PROTOCOL,
        model=student.record_info(),
        data={"path": cfg.data and os.path.abspath(cfg.data), "split": "test", "images": len(x)},
        settings={
            "student": "patch tokens after the final norm (no projection head)",
            "teacher": "last-block patch tokens after the final norm",
            "pooling": "tokens of all images pooled as rows",
            "teacher_checkpoint_sha256": key[1],
        },
        numbers={"last_block": value},
        elapsed_s=time.time() - start,
    )
    records.append_record(run_dir, record)
    return record


def _learning_curve(cfg: ExperimentConfig, run_dir: str, ev: dict[str, Any], common: dict[str, Any]) -> None:
    """kNN on every kept ``checkpoint-epochE.pt`` and the final checkpoint (bank and test subsets), records
    tagged as the curve's."""
    from ..evaluation import records
    from ..evaluation.common import run_checkpoints
    from ..evaluation.run import evaluate_knn

    for path in run_checkpoints(run_dir):
        rec = evaluate_knn(
            {"model": path},
            cfg.data,
            k=ev["knn_k"],
            **{**common, "limit_train": ev["curve_train"], "limit_val": ev["curve_test"], "write_record": False},
        )
        rec.pop("log", None)
        records.append_record(run_dir, {**rec, "purpose": CURVE_PURPOSE})


def _evaluate_run(cfg: ExperimentConfig, run_dir: str, checkpoint: str, progress: bool, ev: dict[str, Any]) -> None:
    from ..evaluation.run import evaluate_knn, evaluate_linear

    common = dict(
        data_source=cfg.data_source,
        features="both",
        cache_dir=os.path.join(cfg.runs_dir, "feature-cache"),
        workers=0,
        device="cpu",
        progress=progress,
        batch_size=ev["batch_size"],
        run_dir=run_dir,
        write_record=True,
    )
    if ev["curve_train"]:  # first, so the final evaluation's records are the newest
        _learning_curve(cfg, run_dir, ev, common)
    limits = {"limit_train": ev["probe_train"], "limit_val": ev["probe_test"]}
    evaluate_knn({"model": checkpoint}, cfg.data, k=ev["knn_k"], **common, **limits)
    if ev["probe_epochs"]:
        evaluate_linear({"model": checkpoint}, cfg.data, epochs=ev["probe_epochs"], **common, **limits)
    if ev["cka_images"]:
        student_teacher_cka(cfg, run_dir, checkpoint, ev["cka_images"])


def train_and_evaluate(
    cfg: ExperimentConfig,
    method: str,
    seed: int,
    progress: bool,
    ev: dict[str, Any] | None = None,
    report: bool = True,
) -> None:
    """Train ``method`` with ``seed`` into its run folder (a stale one is removed first) and evaluate it."""
    from ..run import loop

    ev = ev or cfg.eval_settings
    run_dir = run_dir_of(cfg, method, seed)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # never resume a stale or different run: every run starts from its seed
    summary = loop.train({**run_config(cfg, method, seed, run_dir), "progress": progress})
    # Free the finished run's DataLoader iterators now: a worker forked later would otherwise inherit them and
    # print "can only test a child process" when its garbage collector runs their __del__.
    gc.collect()
    if summary.get("status") not in DONE:
        raise LeapError(f"{method} seed {seed}: training ended with status {summary.get('status')!r}")
    # The evaluation's bars only on a terminal (in a log file they would be one line per update).
    _evaluate_run(cfg, run_dir, summary["checkpoint"], progress and sys.stderr.isatty(), ev)
    if not report:
        return
    try:
        from .report import make_report

        make_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the plots are a convenience; the records stand without them
        print(f"  (report for {run_dir} failed: {exc})")


def teacher_block_cka(cfg: ExperimentConfig, images: int = 1000, batch_size: int = 250) -> dict[str, Any]:
    """Linear CKA between the teacher's (final-normed) patch tokens after every pair of blocks.

    Computed on the first ``images`` held-out images with the evaluation transform; the tokens of all
    images are pooled (N = images x patches rows). Returns ``{"blocks", "images", "matrix"}``.
    """
    import torch

    from ..cka import linear_cka
    from ..models import build_model, load_teacher_weights
    from ..teacher import TruncatedTeacher

    meta = teacher_meta(cfg)
    model = build_model(meta["model"], img_size=meta["img_size"], **meta["model_overrides"])
    load_teacher_weights(model, cfg.teacher)
    teacher = TruncatedTeacher(model, dtype=torch.float32)
    blocks = list(range(1, teacher.num_blocks + 1))
    x_all = _test_images(cfg, meta["img_size"], images)
    feats: list[list[torch.Tensor]] = [[] for _ in blocks]
    for start in range(0, len(x_all), batch_size):
        patch, _ = teacher.collect(x_all[start : start + batch_size], blocks)
        for b in range(len(blocks)):
            feats[b].append(patch[b].reshape(-1, patch.shape[-1]).double())
    stacked = [torch.cat(f) for f in feats]
    matrix = [[float(linear_cka(stacked[i], stacked[j])) for j in range(len(blocks))] for i in range(len(blocks))]
    return {"blocks": blocks, "images": len(x_all), "matrix": matrix}
