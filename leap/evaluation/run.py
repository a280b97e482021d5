"""The three evaluations end to end: load the model, extract (or read cached) features, score,
append a record to ``RUN_DIR/eval.jsonl``. The ``leap eval`` sub-commands call these; so can code
(e.g. the demo).

``model_options`` are the keyword arguments of :func:`leap.evaluation.features.load_model`
(``{"model": RUN_DIR}``, ``{"teacher": NAME, "teacher_weights": FILE, "block": K}``, ``{"pixels": True}``).
Each function returns the record it wrote (see :mod:`leap.evaluation.records`), with the path of the
log under ``"log"`` (``None`` when no run directory is known and none was given).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import resolve_device
from . import records
from .cache import FeatureCache, default_cache_dir
from .errors import EvaluationError
from .features import LoadedModel, extract_features, load_model

__all__ = ["evaluate_linear", "evaluate_retrieval", "evaluate_knn", "feature_kinds"]

_KINDS = {"cls": ("cls",), "patch": ("patch",), "both": ("cls", "patch")}


def feature_kinds(features: str) -> tuple[str, ...]:
    """``cls`` | ``patch`` | ``both`` -> the feature kinds to evaluate."""
    if features not in _KINDS:
        raise EvaluationError(f"--features: expected cls, patch or both, got {features!r}")
    return _KINDS[features]


def _cache(cache_dir: str | None, no_cache: bool) -> FeatureCache:
    return FeatureCache(None if no_cache else (cache_dir or default_cache_dir()))


def _finish(record: dict[str, Any], loaded: LoadedModel, run_dir: str | None, write: bool) -> dict[str, Any]:
    target = run_dir or loaded.run_dir
    log = records.append_record(target, record) if (write and target) else None
    return {**record, "log": log}


def _load(model_options: dict[str, Any], cache_dir: str | None, **extra) -> LoadedModel:
    return load_model(**model_options, cache_dir=cache_dir, **extra)


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
    from .linear import limit, open_splits, train_linear_probe

    kinds = feature_kinds(features)
    start = time.time()
    cache = _cache(cache_dir, no_cache)
    loaded = _load(model_options, cache.directory)
    if loaded.identity["kind"] == "pixels":
        kinds = ("cls",)  # both "features" of the pixel baseline are the pixels: one probe, under "cls"
    splits = open_splits(data, loaded.img_size, source=data_source)
    train_ds, val_ds = limit(splits.train, limit_train), limit(splits.val, limit_val)
    common = dict(
        dataset_id={**splits.identity, "limit": [limit_train, limit_val]},
        transform_id=splits.transform_id,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        cache=cache,
        progress=progress,
    )
    hits_before = cache.hits
    train_f = extract_features(loaded, train_ds, split="train", **common)
    val_f = extract_features(loaded, val_ds, split=splits.val_split, **common)
    dev = resolve_device(device)
    numbers = {}
    for kind in kinds:
        res = train_linear_probe(
            train_f[kind],
            train_f["labels"],
            val_f[kind],
            val_f["labels"],
            num_classes=len(splits.classes),
            epochs=epochs,
            batch_size=probe_batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            device=dev,
            progress=progress,
            desc=f"linear probe ({kind})",
        )
        numbers[kind] = {
            "best_top1": res.best_top1,
            "best_epoch": res.best_epoch,
            "last_top1": res.last_top1,
            "history": res.history,
        }
    record = records.make_record(
        "linear",
        model=loaded.record_info(),
        data={
            "path": None if data is None else os.path.abspath(data),
            "kind": splits.kind,
            "val_split": splits.val_split,
            "train_images": len(train_ds),
            "val_images": len(val_ds),
            "classes": len(splits.classes),
            "transform": splits.transform_id,
        },
        settings={
            "features": list(kinds),
            "epochs": epochs,
            "batch_size": probe_batch_size,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "schedule": "cosine",
            "init": "zeros",
            "seed": seed,
            "precision": precision,
            "reported": "best_top1 = best validation top-1 over epochs (paper protocol); "
            "last_top1 = after the last epoch",
        },
        numbers=numbers,
        elapsed_s=time.time() - start,
    )
    record["feature_cache_hits"] = cache.hits - hits_before
    return _finish(record, loaded, run_dir, write_record)


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
    from .linear import limit, open_splits

    kinds = feature_kinds(features)
    if k < 1 or not temperature > 0:
        raise EvaluationError(f"kNN: expected k >= 1 and temperature > 0, got {k} and {temperature}")
    start = time.time()
    cache = _cache(cache_dir, no_cache)
    loaded = _load(model_options, cache.directory)
    splits = open_splits(data, loaded.img_size, source=data_source)
    train_ds, val_ds = limit(splits.train, limit_train), limit(splits.val, limit_val)
    common = dict(
        dataset_id={**splits.identity, "limit": [limit_train, limit_val]},
        transform_id=splits.transform_id,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        cache=cache,
        progress=progress,
    )
    train_f = extract_features(loaded, train_ds, split="train", **common)
    val_f = extract_features(loaded, val_ds, split=splits.val_split, **common)
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
    record = records.make_record(
        "knn",
        model=loaded.record_info(),
        data={
            "path": None if data is None else os.path.abspath(data),
            "kind": splits.kind,
            "val_split": splits.val_split,
            "train_images": len(train_ds),
            "val_images": len(val_ds),
            "transform": splits.transform_id,
        },
        settings={"features": list(kinds), "k": k, "temperature": temperature, "precision": precision},
        numbers=numbers,
        elapsed_s=time.time() - start,
    )
    return _finish(record, loaded, run_dir, write_record)


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
) -> dict[str, Any]:
    """Revisitop retrieval (:mod:`leap.evaluation.retrieval`): ``numbers`` = ``{"easy"|"medium"|"hard":
    {"mAP", "mP@1", "mP@5", "mP@10", "skipped", "queries"}}`` (fractions; ``skipped`` = queries without
    positives in that setting)."""
    from .retrieval import (
        RevisitopImages,
        find_dataset,
        load_ground_truth,
        rank_database,
        retrieval_transform,
        revisitop_scores,
    )

    start = time.time()
    folder, gnd_path = find_dataset(data, dataset, gnd)
    gt = load_ground_truth(gnd_path)
    cache = _cache(cache_dir, no_cache)
    options = dict(model_options)
    if img_size is not None:
        options["img_size"] = img_size
    loaded = _load(options, cache.directory, dynamic_size=not options.get("pixels"))
    transform, transform_id = retrieval_transform(loaded.img_size, loaded.patch_size)
    db = RevisitopImages(folder, gt.imlist, transform)
    queries = RevisitopImages(folder, gt.qimlist, transform, bbxs=[g["bbx"] for g in gt.gnd])
    from .cache import file_sha256

    data_id = {
        "kind": "revisitop",
        "dataset": dataset,
        "root": os.path.realpath(folder),
        "gnd_sha256": file_sha256(gnd_path),
    }
    common = dict(
        dataset_id=data_id,
        transform_id=transform_id,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        cache=cache,
        progress=progress,
    )
    db_f = extract_features(loaded, db, split="database", desc="features (database)", **common)
    q_f = extract_features(loaded, queries, split="queries-bbx", desc="features (queries)", **common)
    ranks = rank_database(q_f["cls"], db_f["cls"])
    scores = revisitop_scores(ranks, gt, kappas)
    numbers = {s: {k: v for k, v in r.items() if k != "aps"} for s, r in scores.items()}
    record = records.make_record(
        "retrieval",
        model=loaded.record_info(),
        data={
            "path": os.path.abspath(folder),
            "dataset": dataset,
            "gnd": os.path.abspath(gnd_path),
            "database_images": len(db),
            "queries": len(queries),
            "transform": transform_id,
        },
        settings={
            "features": "cls, L2-normalized",
            "scales": [1.0],
            "query_crop": "bbx",
            "ranking": "cosine",
            "precision": precision,
            "feature_storage": "fp16",
        },
        numbers=numbers,
        elapsed_s=time.time() - start,
    )
    return _finish(record, loaded, run_dir, write_record)
