"""`leap experiment`: a tiny run (2 seeds x 2 methods, 3 steps each, the committed Fashion-MNIST sample and
the bundled demo teacher), the structure of results.md, and that every number in its tables comes from
the runs' own records (summary.json, eval.jsonl) -- recomputed here from those files with plain json."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from leap.apps import experiment as ex
from leap.apps.experiment_report import METRIC_BY_KEY, column_label
from leap.apps.experiment_runs import sha256
from leap.errors import ConfigError, InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
TEACHER = str(ROOT / "leap" / "assets" / "teacher_fashion_mnist.pth")
SEEDS = [0, 1]
# The tiny run takes about a minute on 2 idle cores; leave room for a loaded machine.
pytestmark = pytest.mark.timeout(900)
METHODS = {"base": {"curriculum": "off"}, "leap": {"curriculum": "cka", "tau": 0.5}}


def _config(tmp: Path, **changes) -> Path:
    cfg = {
        "name": "tiny",
        "description": "tiny runner check",
        "teacher": TEACHER,
        "student": "vit_small_patch14_dinov2",
        "student_overrides": {"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 1},
        "data": SAMPLE,
        "data_source": "fashion-mnist",
        "seeds": SEEDS,
        "baseline": "base",
        "threads": 2,
        "train": {
            "epochs": 1,
            "max_steps": 3,
            "batch_size": 32,
            "optimizer": "adamw",
            "lr": 1e-3,
            "warmup_epochs": 0,
            "ckpt_every": 0,
            "workers": 0,
        },
        "methods": METHODS,
        "eval": {"probe_epochs": 2, "knn_k": 5},
        "teacher_cka": {"images": 32},
        "runs_dir": "runs",
    }
    cfg.update(changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    cfg = ex.load_experiment(str(_config(tmp)))
    result = ex.run_experiment(cfg, str(tmp / "out"), progress=False)
    return tmp, cfg, result


def _tables(md: str) -> list[list[list[str]]]:
    """The Markdown tables of a document, as rows of cells (separator rows dropped)."""
    tables, current = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _own_records(run_dir: Path) -> dict[str, float | None]:
    """A run's metrics read straight from its files, independently of the runner's code."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    linear = [r for r in evals if r["protocol"] == "linear"][-1]["numbers"]
    knn = [r for r in evals if r["protocol"] == "knn"][-1]["numbers"]
    return {
        "linear_cls_best": linear["cls"]["best_top1"],
        "linear_patch_best": linear["patch"]["best_top1"],
        "linear_cls_last": linear["cls"]["last_top1"],
        "linear_patch_last": linear["patch"]["last_top1"],
        "knn_cls": knn["cls"],
        "knn_patch": knn["patch"],
        "teacher_tflops": summary["flops"]["teacher_flops"] / 1e12,
        "train_time_s": summary["train_time_s"],
        "mean_block": summary["mean_block"],
        "last_block_at": _arrival(summary),
        "_teacher_flops": summary["flops"]["teacher_flops"],
        "_step_flops": summary["flops"]["step_flops"],
    }


def _arrival(summary: dict) -> float | None:
    """When the target first became the last block, as a fraction of the steps (from the level-ups)."""
    if summary["start_block"] == summary["num_blocks"]:
        return 0.0
    ups = [u["step"] for u in summary["level_ups"] if u["to_block"] == summary["num_blocks"]]
    return ups[0] / summary["steps"] if ups else None


#: No CKA to the teacher and no learning curves in the tiny config: those columns are not shown.
SHOWN = [m for m in ex.METRICS if m.key != "cka_last_block"]


def _cell(values: list[float | None], unit: str) -> str:
    values = [v for v in values if v is not None]  # a run that never reached the last block has no arrival
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    text = ex.format_value(mean, unit)
    return text if len(values) < 2 else f"{text} ± {ex.format_value(statistics.stdev(values), unit)}"


def test_results_table_structure(tiny):
    tmp, cfg, result = tiny
    out = tmp / "out"
    md = (out / "results.md").read_text()
    assert md == result["results_md"]
    for name in ("results.json", "trajectories.png", "accuracy_vs_flops.png", "teacher_cka.png"):
        assert (out / name).is_file(), name
    main, diff = _tables(md)[0], _tables(md)[1]
    assert main[0] == ["method", "seeds"] + [column_label(m) for m in SHOWN]
    assert [row[0] for row in main[1:]] == list(METHODS)
    assert all(row[1] == str(len(SEEDS)) for row in main[1:])
    assert all(len(row) == len(main[0]) for row in main)
    compared = [m for m in SHOWN if m.compare]
    assert diff[0] == ["method"] + [column_label(m) for m in compared]
    assert [row[0] for row in diff[1:]] == ["leap"]  # the baseline has no row of its own
    for cell in diff[1][1:]:
        assert re.fullmatch(r"[+-]\d+(\.\d+)? \[[+-]\d+(\.\d+)?, [+-]\d+(\.\d+)?\]", cell), cell
    # One raw record per run, with the run's file hashes.
    raw = sorted(p.name for p in (out / "raw").iterdir())
    assert raw == sorted(f"{m}-seed{s}.json" for m in METHODS for s in SEEDS)
    # The teacher's CKA matrix: one row per block, ones on the diagonal.
    cka = json.loads((out / "teacher_cka.json").read_text())
    assert len(cka["matrix"]) == len(cka["blocks"]) == 8
    assert all(math.isclose(cka["matrix"][i][i], 1.0, rel_tol=1e-6) for i in range(8))


def test_every_number_comes_from_the_runs_records(tiny):
    tmp, cfg, result = tiny
    md = (tmp / "out" / "results.md").read_text()
    main, diff = _tables(md)[0], _tables(md)[1]
    own = {(m, s): _own_records(tmp / "runs" / m / f"seed{s}") for m in METHODS for s in SEEDS}
    base_teacher = statistics.fmean(own[("base", s)]["_teacher_flops"] for s in SEEDS)
    base_step = statistics.fmean(own[("base", s)]["_step_flops"] for s in SEEDS)
    for r in own.values():
        r["teacher_saved_vs_baseline"] = 1 - r["_teacher_flops"] / base_teacher
        r["total_saved_vs_baseline"] = 1 - r["_step_flops"] / base_step
    header = main[0]
    checked = 0
    for row in main[1:]:
        method = row[0]
        for metric in SHOWN:
            cell = row[header.index(column_label(metric))]
            assert cell == _cell([own[(method, s)][metric.key] for s in SEEDS], metric.unit), (method, metric.key)
            checked += 1
    assert checked == len(METHODS) * len(SHOWN)
    # LEAP ran fewer teacher blocks than the baseline in the same steps: the saving is real and positive.
    assert own[("leap", 0)]["teacher_saved_vs_baseline"] > 0.3
    # Differences: paired by seed from the same files.
    dheader = diff[0]
    for metric in (m for m in SHOWN if m.compare):
        diffs = [own[("leap", s)][metric.key] - own[("base", s)][metric.key] for s in SEEDS]
        mean = statistics.fmean(diffs)
        half = 12.706 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        want = (
            f"{ex.format_value(mean, metric.unit, signed=True)} "
            f"[{ex.format_value(mean - half, metric.unit, signed=True)}, "
            f"{ex.format_value(mean + half, metric.unit, signed=True)}]"
        )
        assert diff[1][dheader.index(column_label(metric))] == want, metric.key
    # The raw per-run JSON carries the same numbers and the SHA-256 of the files they came from.
    rec = json.loads((tmp / "out" / "raw" / "leap-seed1.json").read_text())
    assert rec["metrics"]["knn_cls"] == own[("leap", 1)]["knn_cls"]
    assert rec["sources"]["summary.json"] == sha256(str(tmp / "runs" / "leap" / "seed1" / "summary.json"))
    # The baseline starts on the last block; the tiny LEAP run never gets there in 3 steps.
    assert rec["metrics"]["last_block_at"] is None and own[("base", 0)]["last_block_at"] == 0.0
    assert METRIC_BY_KEY["last_block_at"].label.endswith("(% of steps)")


def test_finished_runs_are_reused_without_training(tiny, monkeypatch):
    tmp, cfg, result = tiny
    import leap.run.loop

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(leap.run.loop, "train", no_training)
    again = ex.run_experiment(cfg, str(tmp / "out2"), progress=False, table_only=True)
    strip = lambda md: re.sub(r"Runs: .*\n", "", md)  # noqa: E731 - the wall time and date differ
    assert _tables(strip(again["results_md"]))[:2] == _tables(strip(result["results_md"]))[:2]


def test_a_changed_recipe_is_not_reused(tiny, tmp_path):
    tmp, cfg, _ = tiny
    changed = ex.load_experiment(str(_config(tmp_path, runs_dir=str(tmp / "runs"), train={**cfg.train, "lr": 2e-3})))
    with pytest.raises(InputNotFoundError, match="no finished run"):
        ex.run_experiment(changed, str(tmp_path / "out"), progress=False, table_only=True)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seeds": "0,1"}, "seeds: expected a non-empty list"),
        ({"baseline": "nope"}, "baseline 'nope' is not one of the methods"),
        ({"metods": {}}, "unknown key 'metods' \\(did you mean 'methods'\\?\\)"),
        ({"methods": {"base": {"curriculum": "off", "seed": 3}}}, "'seed' is set by the experiment itself"),
        ({"methods": {"base": {"curriculum": "off", "tau": "high"}}}, "methods.base"),
        ({"eval": {"probe_epoch": 3}}, "did you mean 'probe_epochs'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        ex.load_experiment(str(_config(tmp_path, **changes)))


def test_missing_teacher_is_named(tmp_path):
    with pytest.raises(InputNotFoundError, match="teacher checkpoint not found"):
        ex.load_experiment(str(_config(tmp_path, teacher="missing.pth")))


def test_paired_interval_matches_hand_computation():
    mean, low, high = ex.paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert math.isclose(low, 2.0 - 4.303 / math.sqrt(3), rel_tol=1e-12)
    assert math.isclose(high, 2.0 + 4.303 / math.sqrt(3), rel_tol=1e-12)
    assert ex.paired_interval([0.5]) == (0.5, None, None)
    assert ex.t_quantile_975(200) == 1.96
    with pytest.raises(ValueError):
        ex.t_quantile_975(0)


def test_cli_help_and_bad_file(capsys):
    from leap.cli import main

    assert main(["experiment", "does-not-exist.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["experiment", "--help"]) == 0
    assert "--table-only" in capsys.readouterr().out


def test_committed_experiment_config_is_valid():
    cfg = ex.load_experiment(str(ROOT / "experiments" / "fashion-mnist" / "config.yaml"))
    assert cfg.baseline in cfg.methods and len(cfg.seeds) >= 3
    assert {o.get("curriculum") for o in cfg.methods.values()} == {"off", "one-to-one", "cka"}
    assert sum(o.get("curriculum") == "cka" for o in cfg.methods.values()) >= 2
