"""Tests for leap.runlog: the JSONL writer/reader, atomic JSON, the typed log view."""

from __future__ import annotations

import json
import math

import pytest

from leap.curriculum import LevelUp
from leap.errors import InputNotFoundError, RunLogError
from leap.runlog import (
    LOG_NAME,
    SUMMARY_NAME,
    JsonlWriter,
    append_jsonl,
    load_run,
    read_json,
    read_jsonl,
    run_file,
    write_json,
)


def test_jsonl_round_trip_skips_partial_lines_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "sub" / "eval.jsonl"  # any record file of a run directory, directory created
    with JsonlWriter(path, truncate=True) as w:
        w.write({"type": "a", "x": 1.5, "bad": math.nan, "nested": {"inf": math.inf, "t": (1, 2)}})
    append_jsonl(path, {"type": "b"})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"type": "half-written"')  # a job still running
    records, skipped = read_jsonl(path)
    assert records == [{"type": "a", "x": 1.5, "bad": None, "nested": {"inf": None, "t": [1, 2]}}, {"type": "b"}]
    assert skipped == 1
    with JsonlWriter(path, truncate=True) as w:  # truncate starts over
        w.write({"type": "c"})
    assert read_jsonl(path) == ([{"type": "c"}], 0)
    JsonlWriter(None).write({"type": "ignored"})  # the no-op writer of ranks > 0
    with pytest.raises(InputNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_write_json_is_strict_and_atomic(tmp_path):
    path = tmp_path / SUMMARY_NAME
    write_json(path, {"a": math.nan, "b": [1.0]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0]} == read_json(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUMMARY_NAME]  # no temp file left
    path.write_text("{not json")
    with pytest.raises(RunLogError, match="invalid JSON"):
        read_json(path)


def test_load_run_and_trajectory(tmp_path):
    ups = [LevelUp(3, 0, 1, 2, "cka"), LevelUp(5, 1, 2, 3, "timeout")]
    with JsonlWriter(run_file(tmp_path, LOG_NAME), truncate=True) as w:
        w.write(
            {
                "type": "config",
                "config": {"teacher": "t", "batch_size": 4},
                "dims": {"teacher_blocks": 3, "world_size": 2},
            }
        )
        for s, b in enumerate([1, 1, 2, 2, 3, 3], 1):
            w.write({"type": "step", "step": s, "epoch": (s - 1) // 3, "block": b, "loss": 1.0 / s})
        w.write(ups[0].record(cka=0.9))
        w.write(ups[1].record(cka=0.9))
        w.write({"type": "epoch", "epoch": 0, "steps": 3, "block": 2, "mean_block": 4 / 3})
        w.write({"type": "epoch", "epoch": 1, "steps": 3, "block": 3, "mean_block": 8 / 3})
    run = load_run(tmp_path)
    assert run.num_blocks == 3 and run.images_per_step == 8 and run.config["teacher"] == "t"
    assert run.step_blocks() == [1, 1, 2, 2, 3, 3] and run.epoch_blocks() == [2, 3]
    assert run.epoch_mean_blocks() == pytest.approx([4 / 3, 8 / 3])
    assert [u["reason"] for u in run.level_ups] == ["cka", "timeout"]
    assert "cka" in run.level_ups[0] and "cka" not in run.level_ups[1]  # CKA only on a level-up by CKA
    traj = run.trajectory()
    assert traj.weights == [3.0, 3.0] and traj.mean() == pytest.approx(2.0)
    with pytest.raises(InputNotFoundError, match="nowhere"):
        load_run(tmp_path / "nowhere")
