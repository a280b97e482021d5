"""One result format for every evaluation: a JSON record per line in ``RUN_DIR/eval.jsonl``.

A record (all values plain JSON)::

    {"type": "eval", "protocol": "linear" | "retrieval" | "knn" | "robustness" | "segmentation",
     "time": "2026-12-01T06:00:00Z",        # UTC, when the evaluation finished
     "elapsed_s": 12.3,                      # wall time of the evaluation
     "model": {"description": ..., "source": ..., "checkpoint_sha256": ..., "block": ...,
               "training": {"epoch": ..., "step": ..., "teacher_flops": ...}},  # distill checkpoints
     "data": {...},                          # path, splits, image counts
     "settings": {...},                      # protocol parameters
     "numbers": {...}}                       # the results (fractions in [0, 1])

:func:`append_record` appends one line (the file is created if needed; each record is one
``write`` of a complete line, flushed and fsynced, so a reader never sees half a record
except after a crash, and :func:`read_records` skips such a line).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

__all__ = [
    "EVAL_LOG",
    "make_record",
    "append_record",
    "read_records",
    "summary_line",
    "report_lines",
    "curve_metrics",
]

EVAL_LOG = "eval.jsonl"


def _plain(value: Any) -> Any:
    """JSON-safe copy: tuples -> lists, numpy/torch scalars -> Python numbers, NaN -> None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def make_record(
    protocol: str, *, model: dict, data: dict, settings: dict, numbers: dict, elapsed_s: float
) -> dict[str, Any]:
    """The record of one evaluation (see the module docstring); non-finite numbers become ``null``."""
    return _plain(
        {
            "type": "eval",
            "protocol": protocol,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "elapsed_s": round(float(elapsed_s), 3),
            "model": model,
            "data": data,
            "settings": settings,
            "numbers": numbers,
        }
    )


def append_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> str:
    """Append ``record`` as one line to ``run_dir/eval.jsonl``; returns the file's path."""
    from ..runlog import JsonlWriter

    path = os.path.join(os.fspath(run_dir), EVAL_LOG)
    with JsonlWriter(path, fsync=True) as w:
        w.write(_plain(record))
    return path


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The evaluation records of a run, oldest first (``[]`` without ``eval.jsonl``).

    Lines that are not complete JSON objects (a crash mid-write) are skipped.
    """
    from ..runlog import read_jsonl

    path = os.path.join(os.fspath(run_dir), EVAL_LOG)
    if not os.path.isfile(path):
        return []
    return [rec for rec in read_jsonl(path)[0] if rec.get("type") == "eval"]


def _pct(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) else f"{100 * x:.2f}%"


def summary_line(record: dict[str, Any]) -> str:
    """One human line for a record, e.g. ``linear probe (CLS): best 84.10% (epoch 37), last 83.90%``."""
    p, n = record.get("protocol"), record.get("numbers", {})
    if p == "linear":
        parts = [
            f"{kind}: best {_pct(r.get('best_top1'))} (epoch {r.get('best_epoch')}), last {_pct(r.get('last_top1'))}"
            for kind, r in n.items()
        ]
        head = "linear probe top-1"
    elif p == "retrieval":
        parts = [f"{s} {_pct(n.get(s, {}).get('mAP'))}" for s in ("easy", "medium", "hard")]
        head = f"retrieval mAP {record.get('data', {}).get('dataset', '')}".rstrip()
    elif p == "knn":
        parts = [f"{kind}: {_pct(v)}" for kind, v in n.items()]
        head = f"kNN top-1 (k={record.get('settings', {}).get('k')})"
    elif p == "robustness":
        s = record.get("settings", {})
        parts = [f"{kind}: {_pct(r.get('mean_top1'))} (clean {_pct(r.get('clean_top1'))})" for kind, r in n.items()]
        grid = f"{len(s.get('corruptions', []))} corruptions x {len(s.get('severities', []))} severities"
        head = f"corruption top-1 ({grid})"
    elif p == "segmentation":
        parts = [f"mIoU {_pct(n.get('mIoU'))}", f"aAcc {_pct(n.get('aAcc'))}", f"mAcc {_pct(n.get('mAcc'))}"]
        head = f"linear segmentation ({record.get('data', {}).get('layout', '?')})"
    else:
        head, parts = str(p), [json.dumps(n)]
    return f"{head}: " + "; ".join(parts)


def report_lines(run_dir: str | os.PathLike) -> list[str]:
    """Markdown lines for a run's ``report.md``: one bullet per evaluation record."""
    lines = []
    for rec in read_records(run_dir):
        model = rec.get("model", {})
        block = f", block {model['block']}" if model.get("block") else ""
        data = rec.get("data", {})
        where = data.get("path") or (f"{data['kind']} (default location)" if data.get("kind") else "?")
        lines.append(
            f"- {rec.get('time', '?')}: {summary_line(rec)} [{model.get('description', '?')}{block}; data {where}]"
        )
    return lines


def curve_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a record by name, for learning curves: ``linear top-1 (cls)`` (best over the
    probe's epochs), ``kNN top-1 (cls)``, ``roxford5k mAP (medium)``, ``corruption top-1 (cls)`` (the mean),
    ``segmentation mIoU``; numbers that are missing or not finite are left out."""
    p, n = record.get("protocol"), record.get("numbers") or {}
    out: dict[str, Any] = {}
    if p == "linear":
        out = {f"linear top-1 ({k})": r.get("best_top1") for k, r in n.items() if isinstance(r, dict)}
    elif p == "knn":
        out = {f"kNN top-1 ({k})": v for k, v in n.items()}
    elif p == "retrieval":
        dataset = record.get("data", {}).get("dataset", "retrieval")
        out = {f"{dataset} mAP (medium)": (n.get("medium") or {}).get("mAP")}
    elif p == "robustness":
        out = {f"corruption top-1 ({k})": r.get("mean_top1") for k, r in n.items() if isinstance(r, dict)}
    elif p == "segmentation":
        out = {"segmentation mIoU": n.get("mIoU")}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}
