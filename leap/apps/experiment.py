"""``leap experiment CONFIG`` (``make experiment``, ``make experiment-fair``): a seeded comparison of methods.

One YAML file describes an experiment (:mod:`leap.apps.experiment_config`): a teacher checkpoint, a student,
the training recipe every run shares, the methods (each a few :class:`~leap.config.TrainConfig` overrides,
e.g. ``curriculum: off`` for the last-block baseline, ``curriculum: one-to-one``, LEAP at some ``tau``), the
seeds, the evaluation, and optionally the pre-registered metrics and a search. The runner only composes
the project's own pieces:

1. with a ``search`` section, :func:`leap.apps.experiment_search.run_search`: the searched method's grid on a
   validation split carved from the training images, the choice, and a check that the file holds it;
2. the teacher's block-to-block linear CKA on held-out images (how distinct the targets are);
3. for every (method, seed): :func:`leap.run.loop.train` into ``RUNS_DIR/<method>/seed<k>``, then the
   evaluations of :mod:`leap.apps.experiment_runs` (records in the run's ``eval.jsonl``) and
   :func:`leap.apps.report.make_report`;
4. one record per run read back from the run's own files -- never from memory -- written as
   ``OUT/raw/<method>-seed<k>.json``;
5. ``OUT/results.md`` (:mod:`leap.apps.experiment_results`): the pre-registered comparison, mean +- std
   over seeds, the paired differences to the baseline with 95% Student-t intervals and win counts, plots
   (:mod:`leap.apps.experiment_plots`), and ``OUT/results.json`` with everything.

A finished run whose stored config matches is reused (``--fresh`` retrains), so an interrupted
experiment continues where it stopped. Same seed = same student init and data order for every method.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from ..errors import InputNotFoundError
from ..runlog import read_json, write_json
from .experiment_config import ExperimentConfig, load_experiment, run_config, run_dir_of, teacher_meta
from .experiment_report import (
    METRICS,
    aggregate,
    contrasts,
    environment,
    format_value,
    paired_interval,
    results_table,
    t_quantile_975,
)
from .experiment_results import render_results
from .experiment_runs import collect_run, finished, sha256, teacher_block_cka, train_and_evaluate

__all__ = [
    "ExperimentConfig",
    "load_experiment",
    "run_experiment",
    "run_config",
    "collect_run",
    "teacher_block_cka",
    "RAW_DIR",
    # re-exported from leap.apps.experiment_report
    "METRICS",
    "aggregate",
    "format_value",
    "paired_interval",
    "render_results",
    "results_table",
    "t_quantile_975",
]

#: The folder of the per-run JSON records under the results folder.
RAW_DIR = "raw"


def _student_params(cfg: ExperimentConfig, img_size: int) -> int:
    from ..models import build_model

    model = build_model(cfg.student, img_size=img_size, **cfg.student_overrides)
    return sum(p.numel() for p in model.parameters())


def _teacher_cka(cfg: ExperimentConfig, out: str) -> dict[str, Any] | None:
    """The teacher's block-to-block CKA, cached next to the results (it depends on the teacher, the data and
    the image count only)."""
    if not cfg.teacher_cka.get("images", 1000):
        return None
    cka_path = os.path.join(out, "teacher_cka.json")
    key = {
        "teacher_sha256": sha256(cfg.teacher),
        "data": cfg.data,
        "requested": int(cfg.teacher_cka.get("images", 1000)),
    }
    old = read_json(cka_path) if os.path.isfile(cka_path) else None
    if old and all(old.get(k) == v for k, v in key.items()):
        return old
    print(f"teacher block-to-block CKA on {key['requested']} test images", flush=True)
    cka = {**teacher_block_cka(cfg, key["requested"]), **key}
    write_json(cka_path, cka)
    return cka


def run_experiment(
    cfg: ExperimentConfig,
    out: str,
    *,
    fresh: bool = False,
    progress: bool = True,
    table_only: bool = False,
    search: bool = True,
) -> dict[str, Any]:
    """Run the search (when the file has one and ``search``), train and evaluate every (method, seed) not
    finished yet, then write ``out``'s results.

    ``table_only``: no training; rebuild the results from the finished runs (missing ones are an error).
    ``search=False``: trust the file's searched settings without running or checking the search (e.g. to
    rerun one method into a fresh folder); a ``search/search.json`` already in ``out`` is still shown.
    Returns ``{"records", "aggregate", "results_md", "search"}``.
    """
    import torch

    from .. import data as leap_data
    from .demo import FASHION_MNIST_HELP
    from .experiment_search import SEARCH_DIR, run_search

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.data_source == "fashion-mnist" and leap_data.FashionMNIST.find_files(cfg.data, "train") is None:
        raise InputNotFoundError(FASHION_MNIST_HELP)
    teacher = teacher_meta(cfg)
    start = time.time()
    os.makedirs(os.path.join(out, RAW_DIR), exist_ok=True)
    searched = None
    if cfg.search and search:
        searched = run_search(cfg, out, fresh=fresh, progress=progress, table_only=table_only)
    elif cfg.search and os.path.isfile(os.path.join(out, SEARCH_DIR, "search.json")):
        searched = read_json(os.path.join(out, SEARCH_DIR, "search.json"))
    jobs = [(m, s) for m in cfg.methods for s in cfg.seeds]
    for i, (method, seed) in enumerate(jobs, 1):
        run_dir = run_dir_of(cfg, method, seed)
        if not fresh and finished(cfg, method, seed, run_dir):
            print(f"[{i}/{len(jobs)}] {method} seed {seed}: finished earlier, reused ({run_dir})", flush=True)
            continue
        if table_only:
            raise InputNotFoundError(f"{method} seed {seed}: no finished run in {run_dir} (run without --table-only)")
        print(f"[{i}/{len(jobs)}] {method} seed {seed}: training and evaluating -> {run_dir}", flush=True)
        t0 = time.time()
        train_and_evaluate(cfg, method, seed, progress)
        print(f"[{i}/{len(jobs)}] {method} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)

    base = [collect_run(run_dir_of(cfg, cfg.baseline, s), method=cfg.baseline, seed=s) for s in cfg.seeds]
    baseline_flops = {k: statistics.fmean(r["flops"][k] for r in base) for k in ("teacher_flops", "step_flops")}
    records = [collect_run(run_dir_of(cfg, m, s), method=m, seed=s, baseline_flops=baseline_flops) for m, s in jobs]
    for rec in records:
        write_json(os.path.join(out, RAW_DIR, f"{rec['method']}-seed{rec['seed']}.json"), rec)
    agg = aggregate(records, cfg.baseline)
    cka = _teacher_cka(cfg, out)

    from .experiment_plots import write_plots

    pre = cfg.preregistered
    keys = pre["primary"] if pre else ("linear_cls_best", "knn_cls")
    arrival = (cfg.search or {}).get("arrival")
    plots = write_plots(records, cka, out, keys=keys, mark=(sum(arrival) / 2 if arrival else None))
    env = environment()
    wall = time.time() - start
    info = {
        "teacher": teacher,
        "student_params": _student_params(cfg, teacher["img_size"]),
        "cka": cka,
        "plots": plots,
        "env": env,
        "wall_s": wall,
        "search": searched,
    }
    text = render_results(cfg, records, agg, info)
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
            "preregistered": cfg.preregistered,
            "aggregate": agg,
            "contrasts": contrasts(agg, cfg.contrasts, [m.key for m in METRICS if m.compare]),
            "runs": records,
            "teacher_cka": cka,
        },
    )
    print(f"\nresults: {os.path.join(out, 'results.md')}\n")
    print("\n".join(results_table(agg)))
    return {"records": records, "aggregate": agg, "results_md": text, "search": searched}
