"""``make demo`` / ``leap demo``: baseline vs LEAP on Fashion-MNIST, on a CPU, in minutes.

Distills the bundled teacher (a ViT trained by ``leap train-teacher`` on
Fashion-MNIST, shipped with the package as ``leap/assets/teacher_fashion_mnist.pth``) into a smaller ViT twice with the
same budget: once from the last teacher block only (baseline) and once with the LEAP
curriculum. Then it evaluates both students on frozen features (cosine kNN, k = 20, and the
paper's linear probe, Fashion-MNIST test set; records in each run's ``eval.jsonl``), writes
plots for each run and prints a table: curriculum trajectory, teacher FLOPs saved, wall and CPU
time, the two runs' steps replayed interleaved (a time saving that other jobs' load does not bias),
kNN and linear-probe accuracy.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import time
from typing import Any

from ..errors import CheckpointError, ConfigError, InputNotFoundError
from ..runlog import load_run

# Package data (see pyproject.toml), so `leap demo` works from an installed wheel too.
DEFAULT_TEACHER = str(importlib.resources.files("leap").joinpath("assets").joinpath("teacher_fashion_mnist.pth"))
DEFAULT_STUDENT = "vit_small_patch14_dinov2"
DEFAULT_STUDENT_OVERRIDES = {"patch_size": 7, "depth": 4, "embed_dim": 64, "num_heads": 1}
# Rounds of the interleaved step replay: about 30 s for these models on 2 CPU cores, for a saving known to
# about +-3 points (a 95% interval over the rounds; 15 rounds left +-4).
DEFAULT_REPLAY_ROUNDS = 30
FASHION_MNIST_HELP = (
    "Fashion-MNIST not found. On Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist/), or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz into a folder and pass --data FOLDER."
)


def _evaluate(
    model: dict, data: str | None, out: str, knn_train: int, knn_test: int | None, run_dir: str | None
) -> dict[str, Any]:
    """kNN top-1 (k = 20) and the linear probe of a model's CLS and mean-patch features.

    Both read one cached feature pass (``OUT/feature-cache``, fp16). Returns ``{"knn": {kind: top1},
    "linear": {kind: {"best_top1", "best_epoch", "last_top1"}}}``, kinds ``cls`` and ``patch``.
    """
    from ..evaluation.run import evaluate_knn, evaluate_linear

    common = dict(
        data_source="fashion-mnist",
        features="both",
        cache_dir=os.path.join(out, "feature-cache"),
        workers=0,
        device="cpu",
        progress=False,
        limit_train=knn_train,
        limit_val=knn_test,
        run_dir=run_dir,
        write_record=run_dir is not None,
    )
    knn = evaluate_knn(model, data, k=20, **common)["numbers"]
    linear = evaluate_linear(model, data, **common)["numbers"]
    return {
        "knn": knn,
        "linear": {k: {n: v[n] for n in ("best_top1", "best_epoch", "last_top1")} for k, v in linear.items()},
    }


def run_demo(
    *,
    data: str | None = None,
    teacher: str = DEFAULT_TEACHER,
    out: str = "runs/demo",
    epochs: int = 6,
    limit_images: int | None = 20000,
    batch_size: int = 128,
    lr: float = 1e-3,
    tau: float = 0.97,
    max_epochs_per_block: int = 1,
    knn_train: int = 10000,
    knn_test: int | None = None,
    student: str = DEFAULT_STUDENT,
    student_overrides: dict | None = None,
    loss: str = "mse",
    workers: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    replay_rounds: int = DEFAULT_REPLAY_ROUNDS,
) -> dict[str, Any]:
    """Distill the ``teacher`` (a ``leap train-teacher`` checkpoint) into ``student`` twice, baseline and
    LEAP, evaluate both (and the teacher), write ``OUT/results.md`` / ``results.json``, print the table.

    Args:
        data: folder of the Fashion-MNIST idx files (default: the system copy).
        teacher, out: the teacher checkpoint; the output folder (``baseline/``, ``leap/``, results).
        epochs, limit_images, batch_size, lr, loss, workers, progress: the training recipe of both runs
            (as the ``leap distill`` options; AdamW, ``limit_images=None``: all 60000).
        tau, max_epochs_per_block: the LEAP run's curriculum.
        knn_train, knn_test: training images in the kNN memory bank; test images evaluated (None: all).
        student, student_overrides: the student (default: a 4-block ViT of width 64).
        threads: torch CPU threads (default: torch's).
        replay_rounds: rounds of the interleaved replay of both runs' steps
            (:func:`leap.run.timing.replay_step_times`); 0: no replay.

    Returns:
        ``{"results": {mode: ...}, "replay", "teacher_knn", "teacher_linear", "table"}`` (``replay``:
        None when ``replay_rounds`` is 0).

    Raises:
        InputNotFoundError, CheckpointError: no teacher checkpoint, not a train-teacher file, no data.
        ConfigError: a negative ``replay_rounds``.
    """
    import torch

    from .. import data as leap_data
    from ..run.loop import train
    from ..run.resume import previous_run_files
    from .pretrain import read_teacher_meta

    if replay_rounds < 0:
        raise ConfigError(f"replay_rounds must be >= 0 (0: no replay), got {replay_rounds}")
    if threads:
        torch.set_num_threads(threads)
    if not os.path.isfile(teacher):
        raise InputNotFoundError(f"teacher checkpoint not found: {teacher} (train one with `leap train-teacher`)")
    meta = read_teacher_meta(teacher)
    if meta is None:
        raise CheckpointError(
            f"{teacher} has no train-teacher recipe; the demo needs a `leap train-teacher` checkpoint"
        )
    if leap_data.FashionMNIST.find_files(data, "train") is None:
        raise InputNotFoundError(
            FASHION_MNIST_HELP if data is None else f"no Fashion-MNIST idx files under {data}. " + FASHION_MNIST_HELP
        )
    student_overrides = dict(DEFAULT_STUDENT_OVERRIDES if student_overrides is None else student_overrides)
    print(
        f"teacher: {meta['model']} {meta['model_overrides']} at {meta['img_size']} px "
        f"(test accuracy {meta['test_accuracy'] * 100:.2f}%)"
    )
    print(f"student: {student} {student_overrides}")
    print(f"data: Fashion-MNIST, {limit_images or 'all'} training images, {epochs} epochs, batch {batch_size}\n")

    results = {}
    for mode in ("baseline", "leap"):
        run_dir = os.path.join(out, mode)
        for path in previous_run_files(run_dir):  # a demo always starts fresh (a new run never overwrites one)
            os.remove(path)
        cfg = dict(
            teacher=meta["model"],
            teacher_weights=teacher,
            teacher_overrides=meta["model_overrides"],
            student=student,
            student_overrides=student_overrides,
            img_size=meta["img_size"],
            data=data,
            data_source="fashion-mnist",
            limit_images=limit_images,
            workers=workers,
            epochs=epochs,
            batch_size=batch_size,
            optimizer="adamw",
            lr=lr,
            warmup_epochs=min(1.0, epochs / 4),
            loss=loss,
            curriculum="off" if mode == "baseline" else "cka",
            tau=tau,
            max_epochs_per_block=max_epochs_per_block,
            out=run_dir,
            ckpt_every=0,
            progress=progress,
        )
        print(f"== {mode}: {'last teacher block only' if mode == 'baseline' else 'LEAP curriculum'}")
        start = time.time()
        summary = train(cfg)
        wall = time.time() - start
        ev = _evaluate({"model": summary["checkpoint"]}, data, out, knn_train, knn_test, run_dir)
        try:
            from .report import make_report

            make_report(run_dir)
        except Exception as exc:  # plots are a convenience; the numbers above stand without them
            print(f"(plots for {run_dir} failed: {exc})")
        results[mode] = {
            "summary": summary,
            "wall_s": wall,
            "knn_cls": ev["knn"]["cls"],
            "knn_patch": ev["knn"]["patch"],
            "linear": ev["linear"],
            "epoch_blocks": load_run(run_dir).epoch_mean_blocks(),
        }
        print()

    replay = None
    if replay_rounds:
        with torch.random.fork_rng(devices=[]):  # the evaluation below sees the same random state either way
            replay = _replay_steps(results, replay_rounds, progress)
        print()
    teacher_ev = _evaluate({"model": teacher}, data, out, knn_train, knn_test, None)
    teacher_knn = teacher_ev["knn"]["cls"]
    table = format_table(results, teacher_knn, meta, knn_train, knn_test, teacher_ev["linear"], replay)
    print(table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(
            {m: {k: v for k, v in r.items() if k != "summary"} | {"summary": r["summary"]} for m, r in results.items()}
            | {"teacher_knn_cls": teacher_knn, "teacher_linear": teacher_ev["linear"], "replay": replay},
            f,
            indent=2,
            default=str,
        )
    return {
        "results": results,
        "replay": replay,
        "teacher_knn": teacher_knn,
        "teacher_linear": teacher_ev["linear"],
        "table": table,
    }


def leap_step_blocks(run_dir: str, steps: int) -> tuple[list[float], list[float] | None, str]:
    """The target blocks of a run's ``steps`` training steps, from its ``log.jsonl``.

    Returns ``(blocks, steps_per_block, source)``: one block per step (``steps_per_block`` None,
    source ``"steps"``) when the log holds a step record for every step, else the epochs' mean
    blocks weighted by their steps (source ``"epochs"``).
    """
    run = load_run(run_dir)
    blocks = run.step_blocks()
    if len(blocks) == steps:
        return blocks, None, "steps"
    trajectory = run.trajectory()
    return trajectory.blocks, trajectory.weights, "epochs"


def _replay_steps(results: dict, rounds: int, progress: bool) -> dict[str, Any]:
    """Both runs' training steps replayed interleaved (:func:`leap.run.timing.replay_step_times`) with the
    runs' own recipe, read from the LEAP run's summary: teacher (with its weights), student shape, batch,
    loss, CLS weight, device and precision."""
    from ..models import build_model, load_teacher_weights
    from ..precision import DTYPES
    from ..run.timing import replay_blocks, replay_step_times

    leap_summary, base_summary = results["leap"]["summary"], results["baseline"]["summary"]
    blocks, steps_per_block, source = leap_step_blocks(leap_summary["run_dir"], int(leap_summary["steps"]))
    cfg, resolved = leap_summary["config"], leap_summary.get("resolved") or {}
    teacher = build_model(cfg["teacher"], img_size=cfg["img_size"], **cfg["teacher_overrides"])
    if cfg.get("teacher_weights"):
        load_teacher_weights(
            teacher, cfg["teacher_weights"], pos_embed_interpolation=cfg.get("teacher_pos_embed", "auto")
        )
    # The step time does not depend on the student's weights: a fresh one of the runs' shape.
    student = build_model(cfg["student"], img_size=cfg["img_size"], **cfg["student_overrides"])
    if progress:
        print(
            f"== replaying both runs' steps interleaved: {rounds} rounds of one baseline step and one LEAP step "
            f"at each of its blocks {', '.join(map(str, replay_blocks(blocks)))} ...",
            flush=True,
        )
    replay = replay_step_times(
        teacher,
        student,
        blocks,
        int(base_summary["steps"]),
        batch_size=int(cfg["batch_size"]),
        device=resolved.get("device", "cpu"),
        dtype=DTYPES.get(resolved.get("precision", "")),
        leap_steps_per_block=steps_per_block,
        rounds=rounds,
        cls_weight=float(cfg["cls_weight"]),
        normalize=cfg["loss"] == "token-mse",
    )
    replay["leap_blocks_from"] = source
    print(
        f"replayed steps: baseline {replay['baseline_time_s']:.1f} s, LEAP {replay['leap_time_s']:.1f} s "
        f"(saving {100 * replay['saving']:.1f}%), in {replay['elapsed_s']:.0f} s"
    )
    return replay


def _replay_note(replay: dict | None) -> list[str]:
    """The footnote of the replay column (none without a replay)."""
    if not replay:
        return []
    return [
        "Training steps' time, replayed interleaved: after both runs, their training steps are timed again in one "
        "process (teacher to the target block, student, fused loss, backward, the CKA where LEAP computes it, "
        f"optimizer; random inputs, batch {replay['batch_size']}, {replay['device']}): each of "
        f"{replay['rounds']} rounds times one baseline step (teacher to block {replay['num_blocks']}) and one "
        "LEAP step at each target block it used, the order alternating between rounds. A LEAP step costs the "
        "median over rounds of its time over the same round's baseline step, so other jobs' load, which "
        "scales both, cancels. The baseline's time is its steps times its median step; LEAP's, the baseline's "
        f"median step times the sum of its steps' ratios ({replay['baseline_steps']} baseline, "
        f"{replay['leap_steps']} LEAP steps"
        + (
            "; LEAP's blocks are its epochs' mean blocks, weighted by their steps and interpolated between "
            "neighbouring blocks"
            if replay.get("leap_blocks_from") == "epochs"
            else ""
        )
        + "); in parentheses the change against the baseline and a 95% bootstrap interval of it over the rounds "
        "(steps on a shared CPU vary by several percent). Data loading, the calibration scan and evaluation "
        "are not included.",
        "",
    ]


def _time_cell(summary: dict, baseline: dict) -> str:
    """``wall / CPU`` training time of a run's steps, with each one's saving against the baseline's."""
    cells = []
    for key in ("train_time_s", "train_cpu_time_s"):
        value, base = summary.get(key), baseline.get(key)
        if value is None:
            cells.append("n/a")
            continue
        saving = f" ({100 * (value / base - 1):+.0f}%)" if base and summary is not baseline else ""
        cells.append(f"{value:.0f} s{saving}")
    return " / ".join(cells)


def _seconds(value: float) -> str:
    """Seconds to three significant digits (whole seconds from 100 s)."""
    return f"{value:.0f} s" if value >= 100 else f"{value:.3g} s"


def _replay_cell(mode: str, replay: dict) -> str:
    """A run's replayed step time; the LEAP run's with its change against the baseline's."""
    if mode == "baseline":
        return _seconds(replay["baseline_time_s"])
    if mode == "leap":
        change = f"{-100 * replay['saving']:+.1f}%"
        if replay.get("saving_interval"):
            low, high = replay["saving_interval"]  # of the saving: the change's interval is (-high, -low)
            change += f"; {-100 * high:+.1f}% to {-100 * low:+.1f}%"
        return f"{_seconds(replay['leap_time_s'])} ({change})"
    return "n/a"


def format_table(
    results: dict,
    teacher_knn: float,
    meta: dict,
    knn_train: int,
    knn_test: int | None,
    teacher_linear: dict | None = None,
    replay: dict | None = None,
) -> str:
    """The demo's Markdown table: one row per run, then footnotes (time columns, kNN, FLOPs, linear probe).

    ``replay``: :func:`leap.run.timing.replay_step_times` of the two runs (None: no replay column).
    """

    def pct(x):
        return "n/a" if x is None else f"{x * 100:.2f}%"

    replay_header = " training steps' time, replayed interleaved |" if replay else ""
    lines = [
        "| run | target block per epoch | teacher blocks run | teacher FLOPs saved | training time: wall / CPU |"
        + replay_header
        + " kNN top-1 CLS | kNN top-1 mean-patch | linear top-1 CLS (best epoch) "
        "| linear top-1 mean-patch (best epoch) |",
        "|---|---|---|---|---|" + ("---|" if replay else "") + "---|---|---|---|",
    ]
    base = results.get("baseline", {}).get("summary", {})
    last = []
    for mode, r in results.items():
        s = r["summary"]
        blocks = " ".join(f"{b:.1f}" for b in r["epoch_blocks"])
        saved = s.get("flops", {}).get("saved_fraction")
        lin = r.get("linear") or {}
        probe = [
            f"{pct(lin[k]['best_top1'])} ({lin[k]['best_epoch']})" if k in lin else "n/a" for k in ("cls", "patch")
        ]
        lines.append(
            f"| {mode} | {blocks} | {s['teacher_blocks_run']} / {s['teacher_blocks_full']} | "
            f"{'n/a' if saved is None else f'{saved * 100:.1f}%'} | {_time_cell(s, base)} | "
            + (f"{_replay_cell(mode, replay)} | " if replay else "")
            + f"{r['knn_cls'] * 100:.2f}% | {r['knn_patch'] * 100:.2f}% | {probe[0]} | {probe[1]} |"
        )
        if lin:
            last.append(
                f"{mode} CLS {pct(lin.get('cls', {}).get('last_top1'))}, mean-patch "
                f"{pct(lin.get('patch', {}).get('last_top1'))}"
            )
    n_test = "all" if knn_test is None else knn_test
    lines += [
        "",
        "Training time: the training steps' wall time and the training process's CPU time (all its threads; the "
        "DataLoader workers' not included), in parentheses the change against the baseline. Other jobs on the "
        "machine stretch the wall time most; the CPU time less, but it grows too (waiting threads spin and caches "
        "are shared): compare runs made under the same load.",
        "",
        *_replay_note(replay),
        f"kNN: cosine, k=20, T=0.07, memory bank = first {knn_train} training images, {n_test} test images; "
        f"teacher's own kNN top-1 (CLS): {teacher_knn * 100:.2f}% (its linear-head test accuracy: "
        f"{meta['test_accuracy'] * 100:.2f}%).",
    ]
    calib = [
        (mode, r["summary"].get("flops", {}).get("calibration_fraction"))
        for mode, r in results.items()
        if r["summary"].get("calibration_blocks")
    ]
    if calib:
        lines += [
            "",
            "Teacher FLOPs saved: training steps vs. the same steps at full depth (as `leap flops` and "
            "`leap report`); the one-off calibration scan is not included: "
            + "; ".join(f"{mode} {100 * (f or 0):.2f}% of the baseline teacher FLOPs" for mode, f in calib)
            + ".",
        ]
    if last or teacher_linear:
        teacher = (
            ""
            if not teacher_linear
            else (
                f" Teacher's linear probe (best epoch): CLS {pct(teacher_linear.get('cls', {}).get('best_top1'))}, "
                f"mean-patch {pct(teacher_linear.get('patch', {}).get('best_top1'))}."
            )
        )
        lines += [
            "",
            f"Linear probe (the paper's protocol: zero-initialized linear classifier on the cached frozen "
            f"features, SGD lr 0.1, momentum 0.9, cosine, 100 epochs, batch 256, same images as the kNN): "
            f"the table gives the best validation top-1 over the epochs (epoch in parentheses); "
            f"after the last epoch: {'; '.join(last)}.{teacher} Features are cached as fp16.",
        ]
    return "\n".join(lines)
