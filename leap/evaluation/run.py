"""The evaluations end to end: load the model, extract (or read cached) features, score, append a record
to ``RUN_DIR/eval.jsonl``. The ``leap eval`` sub-commands call these; so can code (e.g. the demo). Linear,
kNN and retrieval are here; :func:`evaluate_robustness` (:mod:`.robustness`) and :func:`evaluate_segmentation`
(:mod:`.segmentation`) are re-exported, so every protocol is an ``evaluate_NAME`` of this module.

``model_options`` are the keyword arguments of :func:`leap.evaluation.features.load_model`
(``{"model": RUN_DIR}``, ``{"teacher": NAME, "teacher_weights": FILE, "block": K}``, ``{"pixels": True}``).
Each function returns the record it wrote (see :mod:`leap.evaluation.records`), with the path of the
log under ``"log"`` (``None`` when no run directory is known and none was given).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from .common import begin, feature_kinds
from .errors import EvaluationError
from .features import extract_features
from .robustness import evaluate_robustness
from .segmentation import evaluate_segmentation

__all__ = [
    "evaluate_linear",
    "evaluate_retrieval",
    "evaluate_knn",
    "evaluate_robustness",
    "evaluate_segmentation",
    "feature_kinds",
]


def _by_index(features: dict[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls (n, D), missing (n,) bool)``: the CLS features placed at their labels (image indices);
    zeros, and ``missing``, where an image was skipped."""
    cls = features["cls"].float()
    full = torch.zeros(n, cls.shape[1])
    missing = torch.ones(n, dtype=torch.bool)
    full[features["labels"]] = cls
    missing[features["labels"]] = False
    return full, missing


def evaluate_linear(
    model_options: dict[str, Any],
    data: str | None,
    *,
    features: str = "both",
    data_source: str = "auto",
    epochs: int = 100,
    probe_batch_size: int = 256,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    no_cache: bool = False,
    run_dir: str | None = None,
    write_record: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The paper's linear probe (:mod:`leap.evaluation.linear`) of a model on ``data``.

    ``numbers`` of the record: per feature kind (``cls``, ``patch``) ``best_top1`` (best validation
    top-1 over epochs, the paper's number), ``best_epoch``, ``last_top1`` (after the last epoch).
    """
    from .linear import ProbeOptions, labelled_features, train_probes

    kinds = feature_kinds(features)
    ev = begin(model_options, cache_dir, no_cache, run_dir, write_record)
    if ev.loaded.identity["kind"] == "pixels":
        kinds = ("cls",)  # both "features" of the pixel baseline are the pixels: one probe, under "cls"
    extraction = ev.extraction(batch_size, workers, device, precision, progress)
    found = labelled_features(ev.loaded, data, data_source, (limit_train, limit_val), extraction)
    probe = ProbeOptions(epochs, probe_batch_size, lr, momentum, weight_decay, seed)
    probes = train_probes(found, kinds, probe, device, progress)
    numbers = {
        kind: {"best_top1": r.best_top1, "best_epoch": r.best_epoch, "last_top1": r.last_top1, "history": r.history}
        for kind, r in probes.items()
    }
    return ev.write(
        "linear",
        data=found.record_data(data),
        settings={
            "features": list(kinds),
            **probe.record(init="zeros"),
            "precision": precision,
            "reported": "best_top1 = best validation top-1 over epochs (paper protocol); "
            "last_top1 = after the last epoch",
        },
        numbers=numbers,
        feature_cache_hits=ev.cache_hits,
    )


def evaluate_knn(
    model_options: dict[str, Any],
    data: str | None,
    *,
    features: str = "cls",
    k: int = 20,
    temperature: float = 0.07,
    data_source: str = "auto",
    limit_train: int | None = None,
    limit_val: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    no_cache: bool = False,
    run_dir: str | None = None,
    write_record: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Weighted cosine kNN top-1 (DINO's: ``k`` neighbours, weights ``exp(sim / T)``) on the same cached
    features as the linear probe; ``numbers`` = ``{kind: top1}``."""
    from .knn import knn_accuracy
    from .linear import labelled_features

    kinds = feature_kinds(features)
    if k < 1 or not temperature > 0:
        raise EvaluationError(f"kNN: expected k >= 1 and temperature > 0, got {k} and {temperature}")
    ev = begin(model_options, cache_dir, no_cache, run_dir, write_record)
    extraction = ev.extraction(batch_size, workers, device, precision, progress)
    found = labelled_features(ev.loaded, data, data_source, (limit_train, limit_val), extraction)
    train_f, val_f = found.train, found.val
    norm = torch.nn.functional.normalize
    numbers = {
        kind: knn_accuracy(
            norm(train_f[kind].float(), dim=1),
            train_f["labels"],
            norm(val_f[kind].float(), dim=1),
            val_f["labels"],
            k=k,
            temperature=temperature,
        )
        for kind in kinds
    }
    return ev.write(
        "knn",
        data=found.record_data(data, classes=False),
        settings={"features": list(kinds), "k": k, "temperature": temperature, "precision": precision},
        numbers=numbers,
    )


def evaluate_retrieval(
    model_options: dict[str, Any],
    data: str,
    dataset: str,
    *,
    gnd: str | None = None,
    img_size: int | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str = "auto",
    precision: str = "auto",
    cache_dir: str | None = None,
    no_cache: bool = False,
    run_dir: str | None = None,
    write_record: bool = True,
    progress: bool = True,
    kappas: Sequence[int] = (1, 5, 10),
    transform: str = "center-crop",
) -> dict[str, Any]:
    """Revisitop retrieval (:mod:`leap.evaluation.retrieval`): ``numbers`` = ``{"easy"|"medium"|"hard":
    {"mAP", "mP@1", "mP@5", "mP@10", "skipped", "queries"}}`` (fractions; ``skipped`` = queries without
    positives in that setting). ``transform``: ``center-crop`` (Resize 256 -> CenterCrop 224, the paper's)
    or ``keep-aspect`` (:func:`leap.evaluation.retrieval.retrieval_transform`)."""
    from .retrieval import (
        RETRIEVAL_TRANSFORMS,
        RevisitopImages,
        find_dataset,
        load_ground_truth,
        rank_database,
        retrieval_transform,
        revisitop_scores,
    )

    if transform not in RETRIEVAL_TRANSFORMS:
        raise EvaluationError(f"--transform: expected one of {', '.join(RETRIEVAL_TRANSFORMS)}, got {transform!r}")
    if transform == "keep-aspect" and model_options.get("pixels"):
        raise EvaluationError("--pixels needs --transform center-crop (keep-aspect images differ in size)")
    start = time.time()
    folder, gnd_path = find_dataset(data, dataset, gnd)
    gt = load_ground_truth(gnd_path)
    options = dict(model_options)
    if img_size is not None:
        options["img_size"] = img_size
    ev = begin(options, cache_dir, no_cache, run_dir, write_record, start, dynamic_size=transform == "keep-aspect")
    loaded = ev.loaded
    image_transform, transform_id = retrieval_transform(loaded.img_size, loaded.patch_size, transform)
    db = RevisitopImages(folder, gt.imlist, image_transform)
    queries = RevisitopImages(folder, gt.qimlist, image_transform, bbxs=[g["bbx"] for g in gt.gnd])
    from .cache import file_sha256

    data_id = {
        "kind": "revisitop",
        "dataset": dataset,
        "root": os.path.realpath(folder),
        "gnd_sha256": file_sha256(gnd_path),
    }
    extraction = ev.extraction(batch_size, workers, device, precision, progress)
    common = dict(dataset_id=data_id, transform_id=transform_id, **extraction)
    db_f = extract_features(loaded, db, split="database", desc="features (database)", **common)
    q_f = extract_features(loaded, queries, split="queries-bbx", desc="features (queries)", **common)
    # Undecodable images were dropped by the extraction (the labels are the images' indices): database
    # images without a feature rank last, queries without one have no positives (left out, "skipped").
    db_cls, db_missing = _by_index(db_f, len(db))
    q_cls, q_missing = _by_index(q_f, len(queries))
    ranks = rank_database(q_cls, db_cls, exclude=db_missing)
    if q_missing.any():
        gnd = [{**g, "easy": [], "hard": []} if bad else g for g, bad in zip(gt.gnd, q_missing.tolist())]
        gt = dataclasses.replace(gt, gnd=gnd)
    scores = revisitop_scores(ranks, gt, kappas)
    numbers = {s: {k: v for k, v in r.items() if k != "aps"} for s, r in scores.items()}
    return ev.write(
        "retrieval",
        data={
            "path": os.path.abspath(folder),
            "dataset": dataset,
            "gnd": os.path.abspath(gnd_path),
            "database_images": len(db),
            "queries": len(queries),
            "skipped_images": {"database": db_f["skipped"], "queries": q_f["skipped"]},
            "transform": transform_id,
        },
        settings={
            "features": "cls, L2-normalized",
            "scales": [1.0],
            "transform": transform,
            "query_crop": "bbx",
            "ranking": "cosine",
            "precision": precision,
            "feature_storage": "fp16",
        },
        numbers=numbers,
    )
