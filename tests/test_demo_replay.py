"""The demo's interleaved replay of a baseline run's and a LEAP run's training steps
(:func:`leap.run.timing.replay_step_times`), its wiring into ``leap demo`` and its table column."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from leap.apps import demo
from leap.apps.pretrain import read_teacher_meta
from leap.cli import main as leap_main
from leap.errors import ConfigError
from leap.models import build_model, load_teacher_weights
from leap.run import timing

STUDENT = "vit_small_patch14_dinov2"
TINY = {"patch_size": 7, "embed_dim": 32, "num_heads": 1}


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")  # no Triton interpreter: fast


def tiny_pair(teacher_depth: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher = build_model(STUDENT, img_size=28, depth=teacher_depth, **TINY)
    student = build_model(STUDENT, img_size=28, depth=2, **TINY)
    return teacher, student


def test_replay_times_every_block_and_the_baseline():
    teacher, student = tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    res = timing.replay_step_times(teacher, student, [1, 1, 3, 2, 3], 4, batch_size=4, rounds=3, warmup=1)
    assert sorted(res["leap_step_times_s"]) == [1, 2, 3]
    assert all(t > 0 for t in res["leap_step_times_s"].values()) and res["baseline_step_time_s"] > 0
    r = res["leap_step_ratios"]
    assert sorted(r) == [1, 2, 3] and all(v > 0 for v in r.values())
    assert res["leap_time_s"] == pytest.approx(res["baseline_step_time_s"] * (2 * r[1] + r[2] + 2 * r[3]))
    assert res["baseline_time_s"] == pytest.approx(4 * res["baseline_step_time_s"])
    assert res["saving"] == pytest.approx(1 - res["leap_time_s"] / res["baseline_time_s"])
    assert (res["num_blocks"], res["leap_steps"], res["baseline_steps"], res["batch_size"]) == (3, 5, 4, 4)
    assert (res["rounds"], res["warmup"], res["device"]) == (3, 1, "cpu") and res["elapsed_s"] > 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # original untouched
    assert torch.equal(torch.get_rng_state(), rng)  # the fixed-seed inputs leave the caller's random state alone


class FakeClock:
    """Stands in for the step: records what runs, returns a scripted time per (k, CKA) and round."""

    # Per round: a median unlike the mean, so a mean in place of the median fails the checks.
    FACTORS = (1.0, 5.0, 2.0, 1.5, 9.0)

    def __init__(self):
        self.warmup: list[tuple[int, bool]] = []
        self.timed: list[tuple[int, bool]] = []

    @staticmethod
    def base(k: int, cka: bool) -> float:
        return 0.01 * k + (0.001 if cka else 0.0)

    def install(self, monkeypatch):
        clock = self

        def run(rig, k, include_cka):
            clock.warmup.append((k, include_cka))

        def time(rig, k, include_cka):
            n = sum(1 for c in clock.timed if c == (k, include_cka))
            clock.timed.append((k, include_cka))
            return clock.base(k, include_cka) * clock.FACTORS[n]

        monkeypatch.setattr(timing._TrainerStep, "run", run)
        monkeypatch.setattr(timing._TrainerStep, "time", time)

    def median(self, k: int, cka: bool, rounds: int) -> float:
        return statistics.median(self.base(k, cka) * f for f in self.FACTORS[:rounds])


def test_replay_arithmetic_and_interleaving(monkeypatch):
    clock = FakeClock()
    clock.install(monkeypatch)
    teacher, student = tiny_pair(teacher_depth=4)
    blocks, steps = [1, 3, 3, 4, 4, 4], 7
    res = timing.replay_step_times(teacher, student, blocks, steps, batch_size=4, rounds=5, warmup=2)
    # Warm-up: every kind of step twice, the baseline without the CKA, LEAP with it.
    kinds = [(4, False), (1, True), (3, True), (4, True)]
    assert clock.warmup == [kind for kind in kinds for _ in range(2)]
    # Rounds: baseline first, then LEAP's blocks ascending; the next round the reverse.
    assert clock.timed == (kinds + kinds[::-1]) * 2 + kinds
    medians = {k: clock.median(k, True, 5) for k in (1, 3, 4)}
    assert res["leap_step_times_s"] == pytest.approx(medians)
    assert res["baseline_step_time_s"] == pytest.approx(clock.median(4, False, 5))
    leap = medians[1] + 2 * medians[3] + 3 * medians[4]
    base = steps * clock.median(4, False, 5)
    assert res["leap_time_s"] == pytest.approx(leap)
    assert res["baseline_time_s"] == pytest.approx(base)
    assert res["saving"] == pytest.approx(1 - leap / base)
    assert res["leap_steps"] == 6 and res["baseline_steps"] == steps


def test_replay_compares_steps_within_rounds(monkeypatch):
    # Load slows round 1 as a whole (reversed order: LEAP first) and, in round 2, only the LEAP step
    # (it began after the baseline step): per-arm medians would say LEAP costs 1.5x the baseline;
    # within rounds it costs half.
    times = iter([1.0, 0.5, 1.5, 3.0, 1.0, 1.5])  # (baseline, k=1), (k=1, baseline), (baseline, k=1)
    monkeypatch.setattr(timing._TrainerStep, "run", lambda rig, k, cka: None)
    monkeypatch.setattr(timing._TrainerStep, "time", lambda rig, k, cka: next(times))
    teacher, student = tiny_pair(teacher_depth=2)
    res = timing.replay_step_times(teacher, student, [1, 1], 2, batch_size=4, rounds=3, warmup=0)
    assert res["leap_step_times_s"] == {1: pytest.approx(1.5)} and res["baseline_step_time_s"] == pytest.approx(1.0)
    assert res["leap_step_ratios"] == {1: pytest.approx(0.5)}
    assert res["leap_time_s"] == pytest.approx(2 * 0.5 * 1.0)
    assert res["saving"] == pytest.approx(0.5)


def test_saving_interval_from_the_rounds():
    # Constant ratios: nothing to resample, the interval is the point.
    assert timing._saving_interval({1: [0.5] * 8, 2: [1.0] * 8}, [1, 2, 2], [1, 1, 1], 3) == (
        pytest.approx(1 - 2.5 / 3),
        pytest.approx(1 - 2.5 / 3),
    )
    # Ratios that vary over the rounds: an interval around the median's saving, reproducible (fixed seed).
    per_round = {1: [0.4, 0.5, 0.6, 0.45, 0.55, 0.5, 0.42, 0.58]}
    low, high = timing._saving_interval(per_round, [1], [1], 1)
    assert 1 - 0.6 <= low < 1 - statistics.median(per_round[1]) < high <= 1 - 0.4
    assert timing._saving_interval(per_round, [1], [1], 1) == (low, high)


def test_replay_epoch_means_weighted_by_steps(monkeypatch):
    clock = FakeClock()
    clock.install(monkeypatch)
    teacher, student = tiny_pair(teacher_depth=4)
    res = timing.replay_step_times(
        teacher, student, [1.5, 4.0], 10, batch_size=4, leap_steps_per_block=[4, 6], rounds=3, warmup=0
    )
    assert clock.warmup == []
    t = {k: clock.median(k, True, 3) for k in (1, 2, 4)}  # 1.5 is timed at both neighbours
    assert res["leap_step_times_s"] == pytest.approx(t)
    assert res["leap_time_s"] == pytest.approx(4 * (t[1] + t[2]) / 2 + 6 * t[4])
    assert res["leap_steps"] == 10 and timing.replay_blocks([1.5, 4.0, 4]) == [1, 2, 4]


@pytest.mark.parametrize(
    ("blocks", "kwargs", "message"),
    [
        ([], {}, "leap_blocks is empty"),
        ([0, 1], {}, "leap_blocks must lie in 1..3"),
        ([1, 4], {}, "leap_blocks must lie in 1..3"),
        ([1, 2], {"leap_steps_per_block": [1]}, "leap_steps_per_block has 1 entries"),
        ([1, 2], {"leap_steps_per_block": [0, 0]}, "leap_steps_per_block must be >= 0"),
        ([1], {"rounds": 0}, "rounds must be >= 1"),
        ([1], {"warmup": -1}, "warmup must be >= 0"),
        ([1], {"baseline_steps": 0}, "baseline_steps must be an integer >= 1"),
        ([1], {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_replay_rejects_bad_arguments(blocks, kwargs, message):
    teacher, student = tiny_pair()
    kwargs = {"baseline_steps": 2, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        timing.replay_step_times(teacher, student, blocks, **kwargs)


# --------------------------------------------------------------------------------------
# leap demo: the LEAP run's blocks, the replay's wiring, the table, the option
# --------------------------------------------------------------------------------------


def write_log(run_dir, step_blocks, epochs):
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"type": "step", "step": i + 1, "block": b} for i, b in enumerate(step_blocks)]
    records += [
        {"type": "epoch", "epoch": e, "mean_block": m, "block": m, "steps": n} for e, (m, n) in enumerate(epochs)
    ]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_leap_step_blocks_per_step_else_epoch_means(tmp_path):
    write_log(tmp_path / "full", [1, 2, 2, 3], [(1.5, 2), (2.5, 2)])
    assert demo.leap_step_blocks(str(tmp_path / "full"), 4) == ([1, 2, 2, 3], None, "steps")
    write_log(tmp_path / "part", [1, 2], [(1.5, 2), (2.5, 2)])  # a step record missing per epoch
    assert demo.leap_step_blocks(str(tmp_path / "part"), 4) == ([1.5, 2.5], [2.0, 2.0], "epochs")


def test_demo_replays_with_the_runs_recipe(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / "leap", [1, 3, 8], [(4.0, 3)])
    calls = []

    def fake_replay(teacher, student, blocks, baseline_steps, **kwargs):
        calls.append((teacher, student, blocks, baseline_steps, kwargs))
        return {"baseline_time_s": 3.0, "leap_time_s": 2.0, "saving": 1 / 3, "elapsed_s": 1.0}

    monkeypatch.setattr(timing, "replay_step_times", fake_replay)
    meta = read_teacher_meta(demo.DEFAULT_TEACHER)
    config = {
        "teacher": meta["model"],
        "teacher_weights": demo.DEFAULT_TEACHER,
        "teacher_overrides": meta["model_overrides"],
        "teacher_pos_embed": "auto",
        "student": STUDENT,
        "student_overrides": {"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 1},
        "img_size": meta["img_size"],
        "batch_size": 16,
        "loss": "token-mse",
        "cls_weight": 0.25,
    }
    results = {
        "baseline": {"summary": {"steps": 5}},
        "leap": {
            "summary": {
                "steps": 3,
                "run_dir": str(tmp_path / "leap"),
                "resolved": {"device": "cpu", "precision": "fp32"},
                "config": config,
            }
        },
    }
    replay = demo._replay_steps(results, 4, True)
    (teacher, student, blocks, baseline_steps, kwargs) = calls[0]
    assert len(teacher.blocks) == meta["model_overrides"]["depth"] and len(student.blocks) == 1
    # The bundled teacher's weights are loaded (a fresh build would not match them).
    expected = build_model(meta["model"], img_size=meta["img_size"], **meta["model_overrides"])
    load_teacher_weights(expected, demo.DEFAULT_TEACHER)
    assert torch.equal(teacher.blocks[0].attn.qkv.weight, expected.blocks[0].attn.qkv.weight)
    assert blocks == [1, 3, 8] and baseline_steps == 5 and replay["leap_blocks_from"] == "steps"
    assert kwargs == {
        "batch_size": 16,
        "device": "cpu",
        "dtype": torch.float32,
        "leap_steps_per_block": None,
        "rounds": 4,
        "cls_weight": 0.25,
        "normalize": True,
    }
    out = capsys.readouterr().out
    assert "4 rounds" in out and "blocks 1, 3, 8" in out and "saving 33.3%" in out


def summary(blocks_run: int, time_s: float, cpu_s: float) -> dict:
    return {
        "teacher_blocks_run": blocks_run,
        "teacher_blocks_full": 24,
        "flops": {"saved_fraction": 1 - blocks_run / 24},
        "train_time_s": time_s,
        "train_cpu_time_s": cpu_s,
    }


def table_results() -> dict:
    run = {"knn_cls": 0.5, "knn_patch": 0.6, "linear": {}}
    return {
        "baseline": {**run, "summary": summary(24, 30.0, 50.0), "epoch_blocks": [4.0, 4.0]},
        "leap": {**run, "summary": summary(18, 27.0, 46.0), "epoch_blocks": [2.0, 4.0]},
    }


def test_table_shows_the_replay_column():
    replay = {
        "baseline_time_s": 12.34,
        "leap_time_s": 10.5,
        "saving": 1 - 10.5 / 12.34,
        "batch_size": 128,
        "device": "cpu",
        "rounds": 15,
        "num_blocks": 4,
        "baseline_steps": 6,
        "leap_steps": 6,
    }
    meta = {"test_accuracy": 0.8}
    table = demo.format_table(table_results(), 0.7, meta, 100, None, None, replay)
    lines = table.split("\n")
    header = lines[0].split("|")
    column = header.index(" training steps' time, replayed interleaved ")
    assert header[column - 1] == " training time: wall / CPU "
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines[2:4]}
    assert all(len(r) == len(header) for r in rows.values()) and len(lines[1].split("|")) == len(header)
    assert rows["baseline"][column] == " 12.3 s "
    assert rows["leap"][column] == " 10.5 s (-14.9%) "
    assert "each of 15 rounds times one baseline step (teacher to block 4)" in table
    assert "over the same round's baseline step" in table
    assert "Data loading, the calibration scan and evaluation are not included" in table
    assert "epochs' mean blocks" not in table
    epochs = demo.format_table(table_results(), 0.7, meta, 100, None, None, {**replay, "leap_blocks_from": "epochs"})
    assert "LEAP's blocks are its epochs' mean blocks, weighted by their steps" in epochs
    # Without a replay the table keeps its columns and says nothing about one.
    plain = demo.format_table(table_results(), 0.7, meta, 100, None)
    assert "replayed" not in plain and len(plain.split("\n")[0].split("|")) == len(header) - 1


def test_demo_replay_rounds_option(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw))
    assert leap_main(["demo", "--replay-rounds", "0"]) == 0 and seen["replay_rounds"] == 0
    assert leap_main(["demo"]) == 0 and seen["replay_rounds"] == demo.DEFAULT_REPLAY_ROUNDS
    assert leap_main(["demo", "--replay-rounds", "-1"]) == 2
    assert "--replay-rounds: expected an integer >= 0, got -1" in capsys.readouterr().err


def test_demo_refuses_negative_replay_rounds(tmp_path):
    with pytest.raises(ConfigError, match="replay_rounds must be >= 0"):  # before any run starts
        demo.run_demo(out=str(tmp_path / "demo"), replay_rounds=-1)
    assert not (tmp_path / "demo").exists()
