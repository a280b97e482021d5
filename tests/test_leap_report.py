"""Tests for leap.apps.report on synthetic run logs."""

from __future__ import annotations

import json
import math

import pytest

from leap.apps import report as R
from leap.apps.report import PNG_MAGIC, load_run, make_report
from leap.cli import main as leap_main
from leap.cli.report import main as main_report

L = 4  # teacher depth of the synthetic runs


def synthetic_records(with_config=True, epoch_flops=False, with_cka=True):
    """Two epochs of 4 steps on a 4-block teacher: blocks 1,1,2,2 | 3,4,4,4."""
    recs = []
    if with_config:
        recs.append(
            {
                "type": "config",
                "config": {
                    "teacher": "vit_giant_patch14_reg4_dinov2",
                    "student": "vit_small_patch14_dinov2",
                    "img_size": 224,
                    "teacher_overrides": {"depth": L},
                    "student_overrides": {},
                    "batch_size": 8,
                    "tau": 0.5,
                    "curriculum": "cka",
                },
                "dims": {"teacher_blocks": L, "world_size": 1},
                "resolved": {"global_batch": 8},
            }
        )
    recs.append(
        {
            "type": "calibration",
            "step": 1,
            "epoch": 0,
            "scores": [0.1, 0.05, 0.0, 0.0],
            "start_block": 1,
            "teacher_blocks_run": L,
        }
    )
    blocks = [1, 1, 2, 2, 3, 4, 4, 4]
    for i, b in enumerate(blocks):
        step, epoch = i + 1, i // 4
        rec = {
            "type": "step",
            "step": step,
            "epoch": epoch,
            "loss": 2.0 / step,
            "block": b,
            "lr": 0.1,
            "teacher_blocks_run": b,
        }
        if with_cka:
            rec["cka"] = 0.1 * step
        recs.append(rec)
        if step in (2, 4, 5):
            recs.append(
                {
                    "type": "level_up",
                    "step": step,
                    "epoch": epoch,
                    "from_block": b,
                    "to_block": b + 1,
                    "reason": "cka" if step != 4 else "timeout",
                }
            )
        if step % 4 == 0:
            ep = {
                "type": "epoch",
                "epoch": epoch,
                "steps": 4,
                "mean_loss": sum(2.0 / s for s in range(step - 3, step + 1)) / 4,
                "block": blocks[min(i + 1, 7)],
                "mean_block": sum(blocks[i - 3 : i + 1]) / 4,
                "time_s": 30.0,
                "step": step,
            }
            if epoch_flops:
                ep["teacher_flops"] = 100.0 * sum(blocks[i - 3 : i + 1])
                ep["baseline_teacher_flops"] = 100.0 * 4 * L
            recs.append(ep)
    recs.append({"type": "checkpoint", "step": 8, "path": "x"})
    recs.append({"type": "something_new", "value": 1})
    return recs


def write_run(tmp_path, records, extra_lines=""):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n" + extra_lines)
    return run


def assert_png(path):
    data = open(path, "rb").read()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC


def test_report_with_cost_model(tmp_path):
    run = write_run(tmp_path, synthetic_records(), extra_lines='{"type": "step", "step": 9, "lo')
    res = make_report(run)
    out = run / "report"
    assert res["report"] == str(out / "report.md")
    assert set(res["plots"]) == {"loss", "cka", "blocks", "flops"}
    for p in res["plots"].values():
        assert_png(p)
    md = (out / "report.md").read_text()
    # blocks trajectory, final loss, FLOPs saved, time
    assert "`vit_giant_patch14_reg4_dinov2` -> `vit_small_patch14_dinov2`" in md
    assert "start block: 1, final block: 4, mean target block: 2.625" in md
    assert "block at the end of each epoch: 3, 4" in md
    assert "level-ups: 3 (2 cka, 1 timeout)" in md
    assert "final step loss: 0.25" in md
    # teacher-only: 1 - 2.625 / 4
    assert "= **34.4%**" in md
    assert "training time: 1:00" in md
    assert "1 unreadable line(s)" in md
    assert "CostModel" in res["flops_source"]
    assert "![flops](flops.png)" in md
    # FLOPs from the cost model: 8 images per step; the calibration scan (L blocks at step 1) is
    # reported apart, so the saving is the same number `leap flops` gives for this trajectory.
    from leap.cost import CostModel, savings

    cm = CostModel("vit_giant_patch14_reg4_dinov2", "vit_small_patch14_dinov2", teacher_overrides={"depth": L})
    emb, blk = cm.embed_macs, cm.block_macs
    blocks_run = sum([1, 1, 2, 2, 3, 4, 4, 4])
    expected = 1 - (8 * emb + blocks_run * blk) / (8 * (emb + L * blk))
    assert expected == pytest.approx(savings([1, 1, 2, 2, 3, 4, 4, 4], cost_model=cm)["teacher_saving"])
    assert "calibration scan (once, first step)" in md
    assert res["saved_fraction"] == pytest.approx(expected)
    assert 0 < res["total_saved_fraction"] < res["saved_fraction"]


def test_report_without_models_uses_block_counts(tmp_path):
    run = write_run(tmp_path, synthetic_records(with_config=False, with_cka=False))
    out = tmp_path / "out"
    res = make_report(run, out)
    assert "cka" not in res["plots"]  # no CKA logged: no CKA plot
    for name in ("loss", "blocks", "flops"):
        assert_png(out / f"{name}.png")
    # L falls back to the largest block seen (4); the calibration scan is reported apart, not in the saving
    assert res["saved_fraction"] == pytest.approx(1 - 21 / 4 / 8)
    md = (out / "report.md").read_text()
    assert "calibration scan (once, first step): 4 teacher blocks, 12.50% of the baseline teacher cost" in md
    assert "full teacher passes" in md and "teacher depth L: 4" in md


def test_report_uses_logged_epoch_flops(tmp_path):
    run = write_run(tmp_path, synthetic_records(epoch_flops=True))
    res = make_report(run, tmp_path / "o")
    assert res["flops_source"].startswith("per-epoch teacher_flops")
    assert res["saved_fraction"] == pytest.approx(1 - (6 + 15) / 32)


def test_resumed_run_deduplicates(tmp_path):
    recs = synthetic_records(with_config=False)
    # a crash after step 6 and a resume from step 4 re-logs steps 5-6 (with other losses)
    redo = [dict(r, loss=r["loss"] + 1) for r in recs if r.get("type") == "step" and r["step"] in (5, 6)]
    run = write_run(tmp_path, recs[:-2] + [{"type": "resume", "step": 4}] + redo + recs[-2:])
    log = load_run(run)
    assert [r["step"] for r in log.steps] == list(range(1, 9))
    assert log.steps[4]["loss"] == pytest.approx(2.0 / 5 + 1)
    assert log.unknown_types["something_new"] == 1 and "resume" not in log.unknown_types  # a known type


def test_epoch_only_log(tmp_path):
    recs = [{"type": "epoch", "epoch": e, "block": b, "mean_loss": 1.0 / (e + 1)} for e, b in enumerate([2, 3, 4])]
    run = write_run(tmp_path, recs)
    res = make_report(run, tmp_path / "o", use_cost_model=False)
    assert {"loss", "blocks", "flops"} <= set(res["plots"])
    assert res["saved_fraction"] == pytest.approx(1 - 9 / 12)
    assert math.isclose(res["saved_fraction"], 0.25)


def test_missing_log_names_path(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "log.jsonl")):
        make_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "log.jsonl").write_text('{"type": "config"}\n')
    with pytest.raises(ValueError, match="no step or epoch records"):
        make_report(tmp_path)
    assert leap_main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_main_report_cli(tmp_path, capsys):
    run = write_run(tmp_path, synthetic_records())
    assert main_report([str(run), "--out", str(tmp_path / "rep"), "--no-cost-model"]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "teacher FLOPs saved" in out
    assert (tmp_path / "rep" / "report.md").is_file()
    assert_png(tmp_path / "rep" / "blocks.png")
    assert R.DEFAULT_OUT_SUBDIR == "report"
