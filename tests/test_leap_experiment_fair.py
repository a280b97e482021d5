"""The fair Fashion-MNIST experiment (experiments/fashion-mnist-fair/): every cell of its committed results.md
recomputed from the committed raw records with plain json; the file's pre-registration and search choice;
the search's rules (validation split carved from the training images, selection, the equal-FLOP budget) on
the committed sample; and a tiny end-to-end run with a search, learning curves and the CKA to the teacher."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from leap.apps import experiment as ex
from leap.apps import experiment_search as es
from leap.apps.experiment_report import METRIC_BY_KEY, column_label, format_value
from leap.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FAIR = ROOT / "experiments" / "fashion-mnist-fair"
SAMPLE = str(ROOT / "tests" / "data" / "fashion-mnist-sample")
TEACHER = str(ROOT / "leap" / "assets" / "teacher_fashion_mnist.pth")
ARMS = ["last-block", "one-to-one", "leap", "fixed-schedule", "last-block-equal-flops"]
#: Two-sided 95% Student-t quantiles by degrees of freedom (the tables' intervals).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


# --------------------------------------------------------------------------------- plain-json helpers


def _tables(md: str) -> dict[str, list[list[str]]]:
    """The Markdown tables of a document by the heading (or line) above them, as rows of cells."""
    out: dict[str, list[list[str]]] = {}
    title, current = "", []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r"-+", c) for c in cells):
                current.append(cells)
            continue
        if current:
            out[title] = current
            current = []
        if line.strip():
            title = line.strip()
    if current:
        out[title] = current
    return out


def _table(md: str, starts: str) -> list[list[str]]:
    found = [rows for title, rows in _tables(md).items() if title.startswith(starts)]
    assert len(found) == 1, (starts, list(_tables(md)))
    return found[0]


def _load_raw(folder: Path) -> dict[tuple[str, int], dict]:
    runs = {}
    for path in sorted((folder / "raw").glob("*.json")):
        rec = json.loads(path.read_text())
        runs[(rec["method"], rec["seed"])] = rec
    return runs


def _mean_std(values: list[float], unit: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    text = format_value(statistics.fmean(values), unit)
    return text if len(values) < 2 else f"{text} ± {format_value(statistics.stdev(values), unit)}"


def _diff(arm: list[float], base: list[float], unit: str, better: str | None, wins: bool) -> str:
    diffs = [a - b for a, b in zip(arm, base)]
    mean = statistics.fmean(diffs)
    half = T975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    s = lambda v: format_value(v, unit, signed=True)  # noqa: E731
    text = f"{s(mean)} [{s(mean - half)}, {s(mean + half)}]"
    if wins:
        won = sum(1 for d in diffs if (d > 0 if better == "higher" else d < 0))
        text += f" ({won}/{len(diffs)})"
    return text


def _own_metrics(rec: dict, base_teacher: float, base_step: float) -> dict[str, float | None]:
    """The metrics a raw record must hold, recomputed from its own fields (FLOPs, level-ups)."""
    m = dict(rec["metrics"])
    m["teacher_tflops"] = rec["flops"]["teacher_flops"] / 1e12
    m["teacher_saved_vs_baseline"] = 1 - rec["flops"]["teacher_flops"] / base_teacher
    m["total_saved_vs_baseline"] = 1 - rec["flops"]["step_flops"] / base_step
    top = rec["num_blocks"]
    ups = [u["step"] for u in rec["level_ups"] if u["to_block"] == top]
    m["last_block_at"] = 0.0 if rec["start_block"] == top else (ups[0] / rec["steps"] if ups else None)
    return m


def _check_results(
    folder: Path, methods: list[str], seeds: list[int], baseline: str, prereg: dict | None, contrasts=()
) -> int:
    """Recompute every cell of folder/results.md's tables from folder/raw with plain json; the number checked."""
    md = (folder / "results.md").read_text()
    raw = _load_raw(folder)
    assert sorted(raw) == sorted((m, s) for m in methods for s in seeds)
    base_teacher = statistics.fmean(raw[(baseline, s)]["flops"]["teacher_flops"] for s in seeds)
    base_step = statistics.fmean(raw[(baseline, s)]["flops"]["step_flops"] for s in seeds)
    own = {k: _own_metrics(r, base_teacher, base_step) for k, r in raw.items()}
    for k, rec in raw.items():  # the record's metrics are its own fields' (up to float rounding)
        for key, value in own[k].items():
            got = rec["metrics"][key]
            assert (got is None) == (value is None) and (value is None or math.isclose(got, value, rel_tol=1e-9)), key
    checked = 0
    main = _table(md, "## Results (mean ± std over seeds)")
    header = main[0]
    assert [row[0] for row in main[1:]] == methods
    for row in main[1:]:
        assert row[1] == str(len(seeds))
        for label, cell in zip(header[2:], row[2:]):
            metric = next(m for m in METRIC_BY_KEY.values() if column_label(m) == label)
            assert cell == _mean_std([own[(row[0], s)][metric.key] for s in seeds], metric.unit), (row[0], label)
            checked += 1
    tables = [("## Difference to the baseline", False)]
    if prereg:
        tables += [("### Primary", True)] + ([("### Secondary", True)] if prereg["secondary"] else [])
    if contrasts:
        rows = _table(md, "The same statistics for the pairs in config.yaml's `contrasts`")
        assert [row[0] for row in rows[1:]] == [f"{a} - {b}" for a, b in contrasts]
        for row in rows[1:]:
            a, b = row[0].split(" - ")
            for label, cell in zip(rows[0][1:], row[1:]):
                metric = next(m for m in METRIC_BY_KEY.values() if column_label(m) == label)
                arm, other = ([own[(x, s)][metric.key] for s in seeds] for x in (a, b))
                assert cell == _diff(arm, other, metric.unit, metric.better, True), (row[0], label)
                checked += 1
    for title, with_wins in tables:
        rows = _table(md, title)
        assert [row[0] for row in rows[1:]] == [m for m in methods if m != baseline]
        for row in rows[1:]:
            for label, cell in zip(rows[0][1:], row[1:]):
                metric = next(m for m in METRIC_BY_KEY.values() if column_label(m) == label)
                arm = [own[(row[0], s)][metric.key] for s in seeds]
                base = [own[(baseline, s)][metric.key] for s in seeds]
                assert cell == _diff(arm, base, metric.unit, metric.better, with_wins), (title, row[0], label)
                checked += 1
        if title == "### Primary":
            assert [column_label(METRIC_BY_KEY[k]) for k in prereg["primary"]] == rows[0][1:]
    arrivals = _table(md, "Start block, and when the target first reached")
    for row in arrivals[1:]:
        for s, cell in zip(seeds, row[1:]):
            rec, at = raw[(row[0], s)], own[(row[0], s)]["last_block_at"]
            assert cell == f"{rec['start_block']} -> " + ("never" if at is None else f"{at * 100:.1f}"), (row[0], s)
            checked += 1
    epochs = _table(md, "## Target block per epoch")
    for row in epochs[1:]:
        per_seed = [raw[(row[0], s)]["trajectory"]["epoch_mean_blocks"] for s in seeds]
        n = min(len(e) for e in per_seed)
        assert row[1] == " ".join(f"{statistics.fmean(e[i] for e in per_seed):.1f}" for i in range(n))
        checked += 1
    if any(r.get("curve") for r in raw.values()):
        curve = _table(md, "kNN patch top-1 (%) of every epoch checkpoint")
        for row in curve[1:]:
            for label, cell in zip(curve[0][1:], row[1:]):
                e = float(label.split()[1])
                vals = [p["knn_patch"] for s in seeds for p in raw[(row[0], s)]["curve"] if round(p["epoch"], 2) == e]
                assert cell == (format_value(statistics.fmean(vals), "%") if vals else "n/a")
                checked += 1
    return checked


def _check_search_table(folder: Path) -> dict:
    """The search table of results.md against search/search.json and search/raw (plain json)."""
    md = (folder / "results.md").read_text()
    search = json.loads((folder / "search" / "search.json").read_text())
    rows = [t for t in _tables(md).values() if t[0][0] == "point"]
    assert len(rows) == 1
    rows = rows[0]
    assert len(rows) == len(search["points"]) + 1
    for row, p in zip(rows[1:], search["points"]):
        rec = json.loads((folder / "search" / "raw" / f"{p['name']}-seed{search['settings']['seed']}.json").read_text())
        assert row[0].strip("*") == p["name"]
        assert (row[0].startswith("**")) == (p["name"] == search["chosen"])
        ups = rec["level_ups"]
        assert p["cka_level_ups"] == sum(u["reason"] == "cka" for u in ups)
        assert p["timeout_level_ups"] == sum(u["reason"] == "timeout" for u in ups)
        assert math.isclose(
            p["teacher_fraction"], rec["flops"]["teacher_flops"] / rec["flops"]["baseline_teacher_flops"]
        )
        fixed = (rec["num_blocks"] - rec["start_block"]) * rec["resolved"]["max_steps_per_block"] / rec["steps"]
        assert math.isclose(p["fixed_arrival"], fixed)
        assert p["metric"] == rec["metrics"][search["settings"]["metric"]]
        assert row[5] == ("never" if p["arrival"] is None else f"{p['arrival'] * 100:.1f}")
        assert row[6] == f"{fixed * 100:.1f}"
        assert row[7] == f"{p['cka_level_ups']} / {p['timeout_level_ups']}"
        assert row[9] == format_value(p["metric"], "%")
    return search


# --------------------------------------------------------------------------------- the committed experiment

committed = pytest.mark.skipif(not (FAIR / "results.md").is_file(), reason="the fair experiment has not been run")


def test_committed_config_is_preregistered_and_consistent():
    cfg = ex.load_experiment(str(FAIR / "config.yaml"))
    assert list(cfg.methods) == ARMS and cfg.baseline == "last-block" and len(cfg.seeds) == 5
    assert cfg.preregistered["primary"] == ["knn_patch", "linear_patch_last"]
    assert {"cka_last_block", "teacher_tflops", "train_time_s", "knn_cls", "linear_cls_last"} <= set(
        cfg.preregistered["secondary"]
    )
    leap, fixed, eq = cfg.methods["leap"], cfg.methods["fixed-schedule"], cfg.methods["last-block-equal-flops"]
    assert fixed["max_epochs_per_block"] == leap["max_epochs_per_block"] < 1  # a step timeout
    assert fixed["tau"] > 1 and fixed["curriculum"] == leap["curriculum"] == "cka"
    assert "start_block" not in fixed and "start_block" not in leap  # both start where the calibration says
    assert eq["curriculum"] == "off" and eq["max_steps"] < cfg.train["epochs"] * 64
    assert cfg.search["method"] == "leap" and cfg.search["seed"] not in cfg.seeds
    assert cfg.teacher == str(ROOT / "experiments" / "fashion-mnist" / "teacher.pth")


@committed
def test_committed_results_recomputed_from_raw_records():
    cfg = ex.load_experiment(str(FAIR / "config.yaml"))
    checked = _check_results(FAIR, ARMS, cfg.seeds, cfg.baseline, cfg.preregistered, cfg.contrasts)
    assert checked > 150
    search = _check_search_table(FAIR)
    chosen = next(p for p in search["points"] if p["name"] == search["chosen"])
    es.check_config(cfg, chosen)  # the file holds what the committed search chose
    assert search["expected"] == es.expected_settings(cfg, chosen)


@committed
def test_committed_trajectories_reach_the_last_block_before_the_end():
    raw = _load_raw(FAIR)
    seeds = sorted({s for _, s in raw})
    for s in seeds:
        leap, fixed = raw[("leap", s)], raw[("fixed-schedule", s)]
        assert leap["start_block"] == fixed["start_block"]  # the same calibration
        assert fixed["metrics"]["last_block_at"] is not None and fixed["metrics"]["last_block_at"] < 1
        assert leap["metrics"]["last_block_at"] <= fixed["metrics"]["last_block_at"]
        assert all(u["reason"] == "timeout" for u in fixed["level_ups"])
        assert raw[("last-block-equal-flops", s)]["steps"] < raw[("last-block", s)]["steps"]
    arrivals = [raw[("leap", s)]["metrics"]["last_block_at"] for s in seeds]
    assert 0.8 <= statistics.fmean(arrivals) <= 0.97


# --------------------------------------------------------------------------------- the search's rules


def test_carve_validation_holds_out_the_last_training_images(tmp_path):
    from leap.data import FashionMNIST

    stamp = es.carve_validation(SAMPLE, str(tmp_path / "carved"), 100)
    src = FashionMNIST(SAMPLE, "train")
    train, held = FashionMNIST(str(tmp_path / "carved"), "train"), FashionMNIST(str(tmp_path / "carved"), "test")
    assert len(train) == len(src) - 100 and len(held) == 100 == stamp["validation_images"]
    assert (held.images == src.images[-100:]).all() and (held.labels == src.labels[-100:]).all()
    assert (train.images == src.images[:-100]).all()
    test = FashionMNIST(SAMPLE, "test")  # the test split is a different set of images, never copied
    assert not any((held.images == t).all(axis=(1, 2)).any() for t in test.images[:20])
    again = es.carve_validation(SAMPLE, str(tmp_path / "carved"), 100)
    assert again == stamp
    with pytest.raises(ConfigError, match="validation_images"):
        es.carve_validation(SAMPLE, str(tmp_path / "other"), len(src))


def _point(name, arrival, fixed, cka_ups, metric, tau=0.9, timeout=0.4):
    return {
        "name": name,
        "tau": tau,
        "max_epochs_per_block": timeout,
        "arrival": arrival,
        "fixed_arrival": fixed,
        "cka_level_ups": cka_ups,
        "metric": metric,
        "steps": 320,
        "steps_per_epoch": 64,
        "teacher_fraction": 0.58,
    }


def test_select_applies_each_rule():
    rules = {"arrival": [0.85, 0.95], "fixed_by": 0.97, "min_cka_level_ups": 1}
    points = [
        _point("early", 0.80, 0.95, 3, 0.90),  # best metric, but reaches the last block too early
        _point("no-cka", 0.93, 0.93, 0, 0.89),  # the fixed schedule itself
        _point("fixed-late", 0.90, 0.99, 2, 0.88),  # its fixed schedule would arrive too late
        _point("ok-low", 0.88, 0.96, 1, 0.70),
        _point("ok-high", 0.91, 0.96, 1, 0.75),
    ]
    best, reasons = es.select(points, rules)
    assert best["name"] == "ok-high"
    assert reasons == [
        "arrival outside the window",
        "no level-up by CKA: the fixed schedule itself",
        "the fixed schedule would not reach the last block in time",
        "admissible",
        "admissible",
    ]
    tie = [_point("a", 0.86, 0.9, 1, 0.7), _point("b", 0.91, 0.9, 1, 0.7)]
    assert es.select(tie, rules)[0]["name"] == "b"  # same metric: the arrival closest to 90%
    with pytest.raises(ConfigError, match="no admissible grid point.*early: arrival 0.8"):
        es.select(points[:3], rules)


def _config(tmp: Path, **changes) -> Path:
    cfg = {
        "name": "tiny-fair",
        "teacher": TEACHER,
        "student": "vit_small_patch14_dinov2",
        "student_overrides": {"patch_size": 7, "depth": 2, "embed_dim": 32, "num_heads": 1},
        "data": SAMPLE,
        "data_source": "fashion-mnist",
        "seeds": [0, 1],
        "baseline": "base",
        "threads": 2,
        "train": {
            "epochs": 2,
            "limit_images": 128,
            "batch_size": 32,
            "optimizer": "adamw",
            "lr": 1e-3,
            "warmup_epochs": 0,
            "ckpt_every": 0,
            "workers": 0,
            "save_every_epochs": 1,
        },
        "methods": {
            "base": {"curriculum": "off"},
            "leap": {"curriculum": "cka", "tau": 0.3, "max_epochs_per_block": 0.25},
            "fixed": {"curriculum": "cka", "tau": 2.0, "max_epochs_per_block": 0.25},
            "eq": {"curriculum": "off", "epochs": 1, "max_steps": 4},
        },
        "eval": {"probe_epochs": 2, "knn_k": 5, "cka_images": 32, "curve_train": 64, "curve_test": 32},
        "teacher_cka": {"images": 32},
        "preregistered": {
            "primary": ["knn_patch", "linear_patch_last"],
            "secondary": ["cka_last_block", "teacher_tflops"],
        },
        "search": {
            "method": "leap",
            "same_timeout": ["fixed"],
            "equal_flops": "eq",
            "validation_images": 128,
            "knn_train": 128,
            "grid": {"tau": [0.3, 0.99], "max_epochs_per_block": [0.25]},
            "arrival": [0.3, 1.0],
            "fixed_by": 1.0,
        },
        "contrasts": [["leap", "fixed"], ["leap", "eq"]],
        "runs_dir": "runs",
    }
    cfg.update(changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_expected_settings_and_check_config(tmp_path):
    cfg = ex.load_experiment(str(_config(tmp_path)))
    best = _point("tau0.3-M0.25", 0.9, 0.9, 2, 0.5, tau=0.3, timeout=0.25)
    want = es.expected_settings(cfg, best)
    # 58% of 320 steps = 185.6 -> 186 steps, which need 3 epochs of 64 (the cosine follows those 3 epochs).
    assert want == {
        "leap": {"tau": 0.3, "max_epochs_per_block": 0.25},
        "fixed": {"max_epochs_per_block": 0.25},
        "eq": {"max_steps": 186, "epochs": 3},
    }
    with pytest.raises(ConfigError, match=r"methods.eq.max_steps: 4, the search gives 186.*methods.eq.epochs: 1"):
        es.check_config(cfg, best)
    methods = {**cfg.all_methods, "eq": {"curriculum": "off", "epochs": 3, "max_steps": 186}}
    es.check_config(ex.load_experiment(str(_config(tmp_path, methods=methods))), best)
    bad = {**methods, "fixed": {"curriculum": "cka", "tau": 0.9, "max_epochs_per_block": 0.25}}
    with pytest.raises(ConfigError, match="methods.fixed: expected curriculum cka with tau > 1"):
        es.check_config(ex.load_experiment(str(_config(tmp_path, methods=bad))), best)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"preregistered": {"primary": ["knn_pach"]}}, "unknown metric 'knn_pach' \\(did you mean 'knn_patch'\\?\\)"),
        ({"preregistered": {"primary": ["mean_block"]}}, "no better direction"),
        ({"preregistered": {"primary": []}}, "at least one metric"),
        (
            {"search": {"method": "nope", "grid": {"tau": [0.9], "max_epochs_per_block": [0.4]}}},
            "search.method: 'nope'",
        ),
        ({"search": {"method": "base", "grid": {"tau": [0.9], "max_epochs_per_block": [0.4]}}}, "curriculum cka"),
        ({"search": {"method": "leap", "grid": {"tau": [0.9]}}}, "search.grid: expected"),
        (
            {"search": {"method": "leap", "grid": {"tau": [0.9], "max_epochs_per_block": [2]}}},
            "fractions in \\(0, 1\\)",
        ),
        ({"search": {"method": "leap", "grd": {}}}, "unknown key 'grd' \\(did you mean 'grid'\\?\\)"),
        ({"eval": {"curve_train": 10, "curve_test": 0}}, "go together"),
        ({"train": {"epochs": 1}, "eval": {"curve_train": 10, "curve_test": 10}}, "save_every_epochs"),
        ({"discussion": "missing.md"}, "discussion file not found"),
        ({"contrasts": [["leap", "leap"]]}, "pairs of two different methods"),
        ({"contrasts": [["leap", "nope"]]}, "contrasts: 'nope' is not one of the methods"),
    ],
)
def test_config_errors_name_the_key(tmp_path, changes, message):
    from leap.errors import LeapError

    with pytest.raises(LeapError, match=message):
        ex.load_experiment(str(_config(tmp_path, **changes)))


# --------------------------------------------------------------------------------- a tiny end-to-end run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_fair_experiment_end_to_end(tmp_path, monkeypatch):
    (tmp_path / "discussion.md").write_text("## What this supports\n\nhand-written words\n")
    wrong = ex.load_experiment(str(_config(tmp_path, discussion="discussion.md")))
    out = tmp_path / "out"
    # The search runs first; the file's equal-FLOP arm disagrees with it, so no arm is trained.
    with pytest.raises(ConfigError, match="disagrees with its search.*methods.eq.max_steps: 4, the search gives"):
        ex.run_experiment(wrong, str(out), progress=False)
    assert not (tmp_path / "runs" / "base").exists()
    search = json.loads((out / "search" / "search.json").read_text())
    assert search["carved"]["validation_images"] == 128 and len(search["points"]) == 2
    methods = {m: {**o, **search["expected"].get(m, {})} for m, o in wrong.all_methods.items()}
    cfg = ex.load_experiment(str(_config(tmp_path, methods=methods, discussion="discussion.md")))
    result = ex.run_experiment(cfg, str(out), progress=False)
    methods_run = list(cfg.methods)
    assert _check_results(out, methods_run, cfg.seeds, "base", cfg.preregistered, cfg.contrasts) > 60
    _check_search_table(out)
    md = result["results_md"]
    assert "hand-written words" in md and "## Pre-registered metrics" in md
    for name in ("trajectories.png", "accuracy_vs_flops.png", "learning_curves.png", "teacher_cka.png"):
        assert (out / name).is_file(), name
    rec = json.loads((out / "raw" / "leap-seed0.json").read_text())
    assert [p["epoch"] for p in rec["curve"]] == [1, 2] and 0 < rec["metrics"]["cka_last_block"] <= 1
    eq_curve = json.loads((out / "raw" / "eq-seed0.json").read_text())["curve"]  # stopped inside epoch 2
    assert [p["step"] for p in eq_curve] == [4, search["expected"]["eq"]["max_steps"]]
    spent = [p["teacher_flops"] for p in rec["curve"]]
    assert 0 < spent[0] < spent[1] and math.isclose(spent[1], rec["flops"]["teacher_flops"], rel_tol=0.05)
    # The final kNN is the full evaluation, not a learning-curve point on the same (last) checkpoint.
    assert rec["knn_settings"]["k"] == 5 and rec["eval_data"]["knn"]["val_images"] == 128
    eq = json.loads((out / "raw" / "eq-seed0.json").read_text())
    assert eq["steps"] == search["expected"]["eq"]["max_steps"] and eq["status"] == "stopped_at_max_steps"

    # Finished runs (and the search's) are reused: nothing trains again.
    import leap.run.loop

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(leap.run.loop, "train", no_training)
    again = ex.run_experiment(cfg, str(tmp_path / "out2"), progress=False, table_only=True)
    strip = lambda text: re.sub(r"Runs: .*\n", "", text)  # noqa: E731 - the wall time and date differ
    assert strip(again["results_md"]) == strip(md)
