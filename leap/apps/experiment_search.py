"""The ``search:`` section of a ``leap experiment`` file: choose LEAP's ``tau`` and timeout on a validation
split carved from the training images, never on the test split, and check the file holds the choice.

What it does, in order:

1. **Carve** (:func:`carve_validation`): the last ``validation_images`` Fashion-MNIST *training* images
   become the held-out split of a folder under ``RUNS_DIR/search/data`` (written as idx files: its
   ``train`` files = the other training images in their order, its ``t10k`` files = the held-out ones). The
   runs train on the first ``limit_images`` of its ``train`` files, i.e. on the same images as the
   experiment's own runs; the test split is never read.
2. **Train** the searched method once per grid point (``tau`` x ``max_epochs_per_block``) with the search
   seed, and score each student by kNN (``metric``) with the first ``knn_train`` images as the bank and
   the held-out images as queries.
3. **Select** (:func:`select`): a grid point is admissible when its target reaches the teacher's last
   block within ``arrival`` (fractions of the training steps), at least ``min_cka_level_ups`` of its
   level-ups came from CKA (else it *is* the fixed schedule), and the timeout-only schedule from the same
   start block with the same timeout ((blocks - start) x steps per block) reaches the last block by
   ``fixed_by``. Among the admissible points the highest validation ``metric`` wins (ties: the arrival
   closest to the middle of ``arrival``).
4. **Check** (:func:`check_config`): the searched method holds the chosen ``tau`` and timeout; the
   ``same_timeout`` methods the same timeout with ``tau`` > 1 (timeout only) and the same start rule;
   the ``equal_flops`` method the baseline's curriculum with the chosen run's teacher FLOP budget as steps:
   ``max_steps = round(f x steps)`` with ``f`` = its teacher FLOPs / the last-block teacher FLOPs of the
   same steps, and ``epochs = ceil(max_steps / steps per epoch)`` (so the lr schedule ends within an epoch
   of the stop). A file that disagrees is an error that names the values to write.

Records: ``OUT/search/raw/<point>-seed<k>.json`` per grid point and ``OUT/search/search.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from typing import Any

from ..errors import ConfigError, InputNotFoundError
from ..runlog import read_json, write_json
from .experiment_config import ExperimentConfig, close, run_dir_of
from .experiment_runs import collect_run, finished, sha256, train_and_evaluate

__all__ = ["carve_validation", "point_name", "run_search", "select", "expected_settings", "check_config"]

SEARCH_DIR = "search"


def point_name(tau: float, timeout: float) -> str:
    """The name of a grid point, e.g. ``tau0.9-M0.44``."""
    return f"tau{tau:g}-M{timeout:g}"


def _write_idx(path: str, array: Any, magic: int) -> None:
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(array.astype("uint8").tobytes())
    os.replace(tmp, path)


def carve_validation(data: str | None, folder: str, count: int) -> dict[str, Any]:
    """Write ``folder``'s idx files: ``train`` = Fashion-MNIST training images ``[0, N - count)``, ``t10k`` =
    training images ``[N - count, N)`` (held out), labels alike. Reused when the files are there and match.

    Returns ``{"source", "source_sha256", "train_images", "validation_images", "files"}`` (file SHA-256s).

    Raises:
        InputNotFoundError: no Fashion-MNIST training files under ``data`` (or the system folder).
        ConfigError: ``count`` leaves no training images.
    """
    from ..data import FashionMNIST

    found = FashionMNIST.find_files(data, "train")
    if found is None:
        raise InputNotFoundError(f"search: no Fashion-MNIST training files under {data or 'the system folder'}")
    source = {os.path.basename(p): sha256(str(p)) for p in found}
    stamp_path = os.path.join(folder, "carved.json")
    if os.path.isfile(stamp_path):
        stamp = read_json(stamp_path)
        files_ok = all(
            os.path.isfile(os.path.join(folder, n)) and sha256(os.path.join(folder, n)) == h
            for n, h in (stamp.get("files") or {}).items()
        )
        if stamp.get("source_sha256") == source and stamp.get("validation_images") == count and files_ok:
            return stamp
    train = FashionMNIST(str(found[0].parent), "train")
    n = len(train)
    if not 0 < count < n:
        raise ConfigError(f"search.validation_images: expected 1..{n - 1} (the training split has {n}), got {count}")
    os.makedirs(folder, exist_ok=True)
    cut = n - count
    parts = {
        "train-images-idx3-ubyte": (train.images[:cut], 0x00000803),
        "train-labels-idx1-ubyte": (train.labels[:cut], 0x00000801),
        "t10k-images-idx3-ubyte": (train.images[cut:], 0x00000803),
        "t10k-labels-idx1-ubyte": (train.labels[cut:], 0x00000801),
    }
    for name, (array, magic) in parts.items():
        _write_idx(os.path.join(folder, name), array, magic)
    stamp = {
        "source": [str(p) for p in found],
        "source_sha256": source,
        "train_images": cut,
        "validation_images": count,
        "held_out": f"training images {cut}..{n - 1} (0-indexed), never the test split",
        "files": {name: sha256(os.path.join(folder, name)) for name in parts},
    }
    write_json(stamp_path, stamp)
    return stamp


def _search_cfg(cfg: ExperimentConfig, data_folder: str) -> ExperimentConfig:
    s = cfg.search or {}
    base = cfg.all_methods[s["method"]]
    points = {
        point_name(t, m): {**base, "tau": t, "max_epochs_per_block": m}
        for t in s["grid"]["tau"]
        for m in s["grid"]["max_epochs_per_block"]
    }
    return dataclasses.replace(
        cfg,
        data=data_folder,
        data_source="fashion-mnist",
        methods=points,
        all_methods=points,
        runs_dir=os.path.join(cfg.runs_dir, SEARCH_DIR),
        seeds=[s["seed"]],
    )


def _eval_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    s = cfg.search or {}
    return {
        **cfg.eval_settings,
        "probe_epochs": 0,
        "probe_train": s["knn_train"],
        "probe_test": None,
        "cka_images": 0,
        "curve_train": 0,
        "curve_test": 0,
    }


def _point(rec: dict[str, Any], tau: float, timeout: float, metric: str) -> dict[str, Any]:
    """The search's view of one grid point's run record."""
    blocks, start, steps = rec["num_blocks"], rec["start_block"], rec["steps"]
    per_block = rec["resolved"]["max_steps_per_block"]
    fixed_steps = (blocks - start) * per_block if per_block else None
    ups = rec["level_ups"] or []
    flops = rec["flops"]
    return {
        "name": point_name(tau, timeout),
        "tau": tau,
        "max_epochs_per_block": timeout,
        "steps": steps,
        "steps_per_epoch": rec["resolved"]["steps_per_epoch"],
        "max_steps_per_block": per_block,
        "start_block": start,
        "arrival": rec["metrics"]["last_block_at"],
        "fixed_arrival": None if fixed_steps is None else fixed_steps / steps,
        "cka_level_ups": sum(1 for u in ups if u.get("reason") == "cka"),
        "timeout_level_ups": sum(1 for u in ups if u.get("reason") == "timeout"),
        "teacher_fraction": flops["teacher_flops"] / flops["baseline_teacher_flops"],
        "metric": rec["metrics"][metric],
    }


def select(points: list[dict[str, Any]], search: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The chosen grid point and, per point, why it is or is not admissible (module docstring, step 3).

    Raises:
        ConfigError: no point is admissible (the message lists each point's arrival).
    """
    lo, hi = search["arrival"]
    reasons, admissible = [], []
    for p in points:
        why = []
        if p["arrival"] is None or not lo <= p["arrival"] <= hi:
            why.append("arrival outside the window")
        if p["cka_level_ups"] < search["min_cka_level_ups"]:
            why.append("no level-up by CKA: the fixed schedule itself")
        if p["fixed_arrival"] is None or p["fixed_arrival"] > search["fixed_by"]:
            why.append("the fixed schedule would not reach the last block in time")
        reasons.append("; ".join(why) or "admissible")
        if not why:
            admissible.append(p)
    if not admissible:
        listed = ", ".join(f"{p['name']}: arrival {p['arrival']}, {r}" for p, r in zip(points, reasons))
        raise ConfigError(f"search: no admissible grid point ({listed}); widen search.grid")
    mid = (lo + hi) / 2
    best = max(admissible, key=lambda p: (p["metric"], -abs(p["arrival"] - mid)))
    return best, reasons


def expected_settings(cfg: ExperimentConfig, best: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: {key: value}}`` the file must hold for the chosen point (module docstring, step 4)."""
    s = cfg.search or {}
    out: dict[str, dict[str, Any]] = {
        s["method"]: {"tau": best["tau"], "max_epochs_per_block": best["max_epochs_per_block"]}
    }
    for m in s["same_timeout"]:
        out[m] = {"max_epochs_per_block": best["max_epochs_per_block"]}
    if s["equal_flops"]:
        steps = round(best["teacher_fraction"] * best["steps"])
        out[s["equal_flops"]] = {"max_steps": steps, "epochs": math.ceil(steps / best["steps_per_epoch"])}
    return out


def check_config(cfg: ExperimentConfig, best: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` when a method of the file disagrees with the search's choice."""
    s = cfg.search or {}
    wrong = []
    for method, want in expected_settings(cfg, best).items():
        have = cfg.all_methods[method]
        for key, value in want.items():
            got = have.get(key, cfg.train.get(key))
            if got is None or not close(got, value):
                wrong.append(f"methods.{method}.{key}: {got!r}, the search gives {value!r}")
    lead = cfg.all_methods[s["method"]]
    for m in s["same_timeout"]:
        have = cfg.all_methods[m]
        if have.get("curriculum", cfg.train.get("curriculum", "cka")) != "cka" or not have.get("tau", 0) > 1:
            wrong.append(f"methods.{m}: expected curriculum cka with tau > 1 (level-ups by timeout only)")
        if have.get("start_block") != lead.get("start_block"):
            wrong.append(f"methods.{m}.start_block: expected {lead.get('start_block')!r}, the searched method's")
    if s["equal_flops"] and cfg.all_methods[s["equal_flops"]].get("curriculum") != cfg.all_methods[cfg.baseline].get(
        "curriculum"
    ):
        wrong.append(f"methods.{s['equal_flops']}.curriculum: expected the baseline's")
    if wrong:
        raise ConfigError(f"{cfg.path}: the file disagrees with its search (chose {best['name']}): " + "; ".join(wrong))


def run_search(
    cfg: ExperimentConfig, out: str, *, fresh: bool = False, progress: bool = True, table_only: bool = False
) -> dict[str, Any]:
    """Carve, train and score every grid point (finished ones are reused), select, write the records, check
    the file. Returns the ``search.json`` content: ``{"settings", "carved", "points", "chosen", "expected"}``."""
    s = cfg.search or {}
    carved = carve_validation(cfg.data, os.path.join(cfg.runs_dir, SEARCH_DIR, "data"), s["validation_images"])
    scfg = _search_cfg(cfg, os.path.join(cfg.runs_dir, SEARCH_DIR, "data"))
    ev = _eval_settings(cfg)
    seed = s["seed"]
    grid = [(t, m) for t in s["grid"]["tau"] for m in s["grid"]["max_epochs_per_block"]]
    os.makedirs(os.path.join(out, SEARCH_DIR, "raw"), exist_ok=True)
    points, records = [], []
    for i, (tau, timeout) in enumerate(grid, 1):
        name = point_name(tau, timeout)
        run_dir = run_dir_of(scfg, name, seed)
        if fresh or not finished(scfg, name, seed, run_dir, ev):
            if table_only:
                raise InputNotFoundError(f"search {name}: no finished run in {run_dir} (run without --table-only)")
            print(f"[search {i}/{len(grid)}] {s['method']} {name} seed {seed} on the validation split", flush=True)
            train_and_evaluate(scfg, name, seed, progress, ev, report=False)
        rec = collect_run(run_dir, method=name, seed=seed, need=("knn",))
        write_json(os.path.join(out, SEARCH_DIR, "raw", f"{name}-seed{seed}.json"), rec)
        records.append(rec)
        points.append(_point(rec, tau, timeout, s["metric"]))
    best, reasons = select(points, s)
    for p, why in zip(points, reasons):
        p["verdict"] = why
    result = {
        "settings": s,
        "carved": carved,
        "evaluation": {"knn_k": ev["knn_k"], "bank": s["knn_train"], "queries": carved["validation_images"]},
        "points": points,
        "chosen": best["name"],
        "expected": expected_settings(cfg, best),
    }
    write_json(os.path.join(out, SEARCH_DIR, "search.json"), result)
    check_config(cfg, best)
    return result
