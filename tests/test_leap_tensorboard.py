"""``leap distill --tensorboard`` (leap/run/tensorboard.py): the events are the records of log.jsonl, a
resumed run continues them, and a missing tensorboard package is a one-line error."""

from __future__ import annotations

import os
import sys

import pytest
from tiny import as_argv, read_log, tiny_models, tiny_options

from leap.config import TrainConfig
from leap.errors import MissingDependencyError
from leap.run.loop import train
from leap.run.tensorboard import ScalarFeed, require

TINY = tiny_options(teacher_depth=3, epochs=2, ckpt_every=0, tau=0.0, tensorboard=True)


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the run's events, as TensorBoard reads them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_events_are_the_log_records(tmp_path):
    pytest.importorskip("tensorboard")
    summary = train(TrainConfig(**TINY, out=str(tmp_path)))
    log = read_log(tmp_path)
    steps = [r for r in log if r["type"] == "step"]
    tb = scalars(tmp_path)
    assert [s for s, _ in tb["train/loss"]] == [r["step"] for r in steps] == list(range(1, 9))
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
    assert [v for _, v in tb["curriculum/target_block"]] == [r["block"] for r in steps]
    assert [v for _, v in tb["curriculum/cka"]] == pytest.approx([r["cka"] for r in steps], rel=1e-6)
    # Step time: the wall time of each step, from the record's throughput and the global batch.
    assert [v for _, v in tb["perf/step_time_s"]] == pytest.approx([4 / r["images_per_s"] for r in steps], rel=1e-6)
    # Teacher FLOPs so far: the trainer's own counter, at every epoch end and at the end of the run.
    flops = dict(tb["teacher/flops"])
    for e in (r for r in log if r["type"] == "epoch"):
        assert flops[e["step"]] == pytest.approx(e["cumulative_teacher_flops"], rel=1e-6)
    assert tb["teacher/flops"][-1][1] == pytest.approx(summary["flops"]["teacher_flops"], rel=1e-6)
    assert [s for s, _ in tb["curriculum/level_up"]] == [r["step"] for r in log if r["type"] == "level_up"]
    assert [s for s, _ in tb["epoch/mean_loss"]] == [4, 8]


def test_a_resumed_run_continues_the_events(tmp_path):
    pytest.importorskip("tensorboard")
    straight = train(TrainConfig(**TINY, out=str(tmp_path / "a")))
    first = train(TrainConfig(**TINY, out=str(tmp_path / "b"), max_steps=3))
    assert first["steps"] == 3
    resumed = train(TrainConfig(**TINY, out=str(tmp_path / "b"), resume="auto"))
    assert resumed["steps"] == 8
    a, b = scalars(tmp_path / "a"), scalars(tmp_path / "b")
    assert [s for s, _ in b["train/loss"]] == list(range(1, 9))  # each step once (purged after the checkpoint)
    assert [v for _, v in b["train/loss"]] == pytest.approx([v for _, v in a["train/loss"]], rel=1e-6)
    # The FLOP counter goes on from the kept records: the same totals as the run without interruption.
    assert [v for _, v in b["teacher/flops"]] == pytest.approx([v for _, v in a["teacher/flops"]], rel=1e-6)
    assert b["teacher/flops"][-1][1] == pytest.approx(straight["flops"]["teacher_flops"], rel=1e-6)


def test_without_the_option_no_events(tmp_path):
    train(TrainConfig(**{**TINY, "tensorboard": False, "epochs": 1}, out=str(tmp_path), max_steps=1))
    assert not os.path.exists(tmp_path / "tensorboard")


def test_missing_tensorboard_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(MissingDependencyError, match=r"leap-kernels\[tensorboard\]"):
        require()
    from leap.cli import main

    options = dict(tensorboard=True, data_source="synthetic", synthetic_size=8, batch_size=4, workers=0)
    argv = ["distill", *as_argv(**tiny_models(teacher_depth=3), **options, out=tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leap-kernels[tensorboard]" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_scalar_feed_without_a_config_record_skips_flops():
    feed = ScalarFeed()
    out = feed.feed({"type": "step", "step": 3, "loss": 1.5, "block": 2, "teacher_blocks_run": 2, "lr": 0.1})
    tags = {t for t, _, _ in out}
    assert {"train/loss", "train/lr", "curriculum/target_block"} <= tags and "teacher/flops" not in tags
    assert feed.feed({"type": "summary"}) == [] and feed.last_step == 3
