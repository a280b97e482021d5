"""Reliability of the trainer's inputs and run directory: data paths that do not hold the data,
missing held-out splits, NaN teachers, symlink loops, undecodable folders, run-directory locking,
temp-file cleanup, symlinked run files, one log record per step after a resume, kept checkpoints,
divergence stops, SIGTERM/SIGINT, and one-line errors for nonsense options.

Each test failed before the corresponding fix (issue "Reliability").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from tiny import read_log

import leap.data as D
from leap.cli import main
from leap.config import TrainConfig
from leap.errors import (
    ConfigError,
    DataError,
    InputNotFoundError,
    NonFiniteLossError,
    RunInterrupted,
    RunLogError,
    TrainingError,
)
from leap.run.guard import LOCK_NAME, RunDirLock, RunGuard, clean_stale_temp_files, kept_checkpoints, truncate_log
from leap.run.loop import Trainer

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "fashion-mnist-sample")


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def tiny_config(out, **kw) -> TrainConfig:
    """The tiny run without the curriculum, measuring CKA every step."""
    return tiny.tiny_config(out, **{"cka_every": 1, "curriculum": "off", **kw})


def image_folder(root, classes=("a", "b"), per_class=3, bad=False):
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, c, f"{i}.png")
            if bad:
                with open(path, "wb") as f:
                    f.write(b"not an image")
            else:
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
    return str(root)


# ----------------------------------------------------------------------------- data paths (1, 2, 5, 14)


def test_wrong_fashion_mnist_path_is_an_error_not_the_system_copy(tmp_path, monkeypatch):
    # The "system" copy exists; a --data that does not hold the files must not fall back to it.
    monkeypatch.setattr(D.datasets, "FASHION_MNIST_DEFAULT_ROOTS", (SAMPLE,))
    assert len(D.FashionMNIST(None, "train")) == 384  # no --data: the default location
    for data in (tmp_path / "typo", tmp_path):  # missing, and an existing folder without the files
        with pytest.raises(InputNotFoundError, match="not found in any of"):
            D.FashionMNIST(data, "train")
        with pytest.raises(InputNotFoundError):
            D.build_dataset("fashion-mnist", data, "train", 28)
    ds = D.FashionMNIST(SAMPLE, "train")
    assert ds.files[0].startswith(SAMPLE)  # the files it read are known (and logged)


def test_train_teacher_refuses_a_folder_without_held_out_split(tmp_path):
    from leap.apps.pretrain import TeacherTrainConfig, train_teacher

    data = image_folder(tmp_path / "data")  # class folders only: no train/ test/
    out = tmp_path / "t.pth"
    with pytest.raises(DataError, match="no held-out split"):
        train_teacher(
            TeacherTrainConfig(data=data, data_source="folder", epochs=1, out=str(out), workers=0, progress=False)
        )
    assert not out.exists()


def test_train_teacher_nonsense_options_and_nan_loss(tmp_path, capsys):
    from leap.apps.pretrain import TeacherTrainConfig, train_teacher

    out = tmp_path / "t.pth"
    assert main(["train-teacher", "--data", SAMPLE, "--epochs", "0", "--out", str(out)]) == 2
    assert "--epochs: expected an integer >= 1" in capsys.readouterr().err
    for bad in (dict(epochs=0), dict(epochs=-1), dict(lr=float("nan")), dict(limit_train=0)):
        with pytest.raises(ConfigError):
            train_teacher(TeacherTrainConfig(data=SAMPLE, out=str(out), **bad))
    with pytest.raises(ConfigError, match="--out .* is a directory"):
        train_teacher(TeacherTrainConfig(data=SAMPLE, out=str(tmp_path)))
    with pytest.raises(NonFiniteLossError, match="nothing was saved"):
        train_teacher(
            TeacherTrainConfig(
                data=SAMPLE,
                epochs=1,
                lr=1e30,
                batch_size=64,
                limit_train=128,
                limit_test=64,
                workers=0,
                model_overrides={"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 1},
                out=str(out),
                progress=False,
            )
        )
    assert not out.exists()


def test_symlink_loops_in_image_folders(tmp_path):
    root = image_folder(tmp_path / "data", per_class=4)
    os.symlink(os.path.join(root, "a"), os.path.join(root, "a", "loop"))  # a/loop -> a
    ds = D.ImageFolderDataset(root, "train")
    assert len(ds) == 8 and ds.targets.count(0) == 4
    # Two loops (a <-> nested) and a link into another class: each real folder listed once.
    os.makedirs(os.path.join(root, "b", "sub"))
    os.symlink(os.path.join(root, "b"), os.path.join(root, "b", "sub", "up"))
    os.symlink(os.path.join(root, "b"), os.path.join(root, "a", "other"))
    ds = D.ImageFolderDataset(root, "train")
    assert len(ds) == 8 and ds.targets.count(0) == 4 and ds.targets.count(1) == 4


def test_undecodable_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    data = image_folder(tmp_path / "data" / "train", bad=True)
    out = tmp_path / "run"
    code = main(
        [
            "distill",
            "--teacher",
            "vit_small_patch14_dinov2",
            "--student",
            "vit_small_patch14_dinov2",
            "--teacher-overrides",
            '{"depth": 2, "embed_dim": 16, "num_heads": 1, "patch_size": 7}',
            "--student-overrides",
            '{"depth": 1, "embed_dim": 16, "num_heads": 1, "patch_size": 7}',
            "--img-size",
            "28",
            "--data",
            os.path.dirname(data),
            "--data-source",
            "folder",
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("leap: error")]
    assert len(lines) == 1 and "could be decoded" in lines[0] and "Traceback" not in err
    assert not out.exists()  # no log.jsonl, no lock file, no empty run directory


# ----------------------------------------------------------------------------- run directory (9, 10, 11, 12)


def test_second_run_on_the_same_out_is_refused(tmp_path):
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    try:
        with pytest.raises(ConfigError, match=rf"in use by another leap run \(pid {os.getpid()} on host"):
            Trainer(tiny_config(tmp_path / "run"))
        assert not (tmp_path / "run" / "log.jsonl").exists()
    finally:
        lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_lock_and_temp_files_are_cleaned(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # A lock file of a process that is gone (no flock held) and the temp file of an interrupted write.
    (run / LOCK_NAME).write_text(f"999999999 {socket.gethostname()} 0\n")
    (run / ".checkpoint.pt.ab_cd123.tmp").write_bytes(b"x" * 100)
    (run / "keep.tmp").write_text("not ours")
    summary = Trainer(tiny_config(run, max_steps=1)).fit()
    assert summary["steps"] == 1
    assert not (run / ".checkpoint.pt.ab_cd123.tmp").exists() and (run / "keep.tmp").exists()
    assert not (run / LOCK_NAME).exists()  # released at the end
    assert clean_stale_temp_files(tmp_path / "missing") == []


def test_symlinked_log_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, run / "log.jsonl")
    with pytest.raises(RunLogError, match="symbolic link"):
        Trainer(tiny_config(run))
    assert victim.read_text() == "precious\n"


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        Trainer(tiny_config(target))


def test_log_has_each_step_once_after_resume(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, ckpt_every=2, max_steps=3)).fit()  # checkpoint at step 3 (end), 2 (ckpt_every)
    # A crash after step 3 but before its checkpoint: simulate by resuming from the step-2 checkpoint.
    kept = dict(kept_checkpoints(run))
    assert 2 in kept, kept
    with open(run / "log.jsonl", "a") as f:
        f.write('{"type": "step", "step": 4, "loss"')  # half-written line of a killed run
    Trainer(tiny_config(run, ckpt_every=2, resume=kept[2])).fit()
    steps = [r["step"] for r in read_log(run) if r["type"] == "step"]
    assert steps == [1, 2, 3, 4], steps


def test_truncate_log_unit(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"type": "config"}\n{"type": "step", "step": 1}\n{"type": "step", "step": 2}\n'
        '{"type": "epoch", "step": 2}\n{"type": "step", "step": 3}\n'
    )
    assert truncate_log(path, 2) == 1
    assert [json.loads(x).get("step") for x in path.read_text().splitlines()] == [None, 1, 2, 2]


# ----------------------------------------------------------------------------- checkpoints and divergence (4)


def test_keep_checkpoints_and_resume_from_the_previous_one(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, ckpt_every=1, keep_checkpoints=3)).fit()
    assert [s for s, _ in kept_checkpoints(run)] == [3, 2]  # checkpoint.pt is step 4
    run1 = tmp_path / "run1"
    Trainer(tiny_config(run1, ckpt_every=1, keep_checkpoints=1)).fit()
    assert kept_checkpoints(run1) == []
    # Going back one: the kept step-3 checkpoint resumes.
    summary = Trainer(
        tiny_config(run, ckpt_every=1, keep_checkpoints=3, resume=dict(kept_checkpoints(run))[3], epochs=2)
    ).fit()
    assert summary["steps"] == 8


def test_weight_blow_up_stops_without_overwriting(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, epochs=2, ckpt_every=2))
    trainer.save_checkpoint()
    before = (run / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        for p in trainer.params:
            p.mul_(1e3)  # finite, but diverged
    with pytest.raises(TrainingError, match="parameter norm .* diverged") as e:
        trainer.save_checkpoint()
    assert "Last good checkpoint" in str(e.value)
    assert (run / "checkpoint.pt").read_bytes() == before
    trainer.close()
    assert read_log(run)[-1]["type"] == "error"


def test_loss_spike_stops():
    guard = RunGuard("unused", divergence_factor=100)
    for step in range(1, 12):
        guard.check_step(1.0 + 0.01 * step, step, "")
    guard.check_step(50.0, 12, "")  # a level-up sized jump passes
    with pytest.raises(TrainingError, match="loss jumped"):
        guard.check_step(1e6, 13, "Last good checkpoint: x.")
    RunGuard("unused", divergence_factor=0).check_step(1e30, 1, "")  # 0 = off


# ----------------------------------------------------------------------------- signals (8)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_and_exits_with_the_convention(tmp_path, monkeypatch, signum, code):
    run = tmp_path / "run"
    original = Trainer.train_step

    def step_then_signal(self, images):
        result = original(self, images)
        if result.step == 2:
            os.kill(os.getpid(), signum)  # arrives mid-run; the step finishes first
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted, match="continue with --resume auto") as e:
        Trainer(tiny_config(run, epochs=2)).fit()
    assert e.value.exit_code == code
    assert signal.getsignal(signum) is before  # handlers restored
    log = read_log(run)
    assert log[-1]["type"] == "interrupted" and log[-1]["step"] == 2
    assert [r["step"] for r in log if r["type"] == "checkpoint"] == [2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(Trainer, "train_step", original)
    assert Trainer(tiny_config(run, epochs=2, resume="auto")).fit()["steps"] == 8


# ----------------------------------------------------------------------------- options and the eval command


def test_config_nonsense(tmp_path, caplog):
    with pytest.raises(ConfigError, match="--tau"):
        tiny_config(tmp_path, tau=-0.1).validate()
    with pytest.raises(ConfigError, match="--keep-checkpoints"):
        tiny_config(tmp_path, keep_checkpoints=0).validate()
    with caplog.at_level(logging.WARNING, logger="leap.train"):
        Trainer(tiny_config(tmp_path / "run", epochs=1, warmup_epochs=10, max_steps=1)).fit()
    assert any("never reaches its peak" in r.message for r in caplog.records)


def test_eval_is_the_evaluation_suite(tmp_path, capsys):
    assert main(["eval", "knn", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--features" in out and "--teacher-overrides" in out and "--test-split" not in out
    data = image_folder(tmp_path / "data")  # no train/ val/ split
    assert (
        main(["eval", "knn", "--pixels", "--data", data, "--data-source", "folder", "--no-progress", "--no-cache"]) == 2
    )
    err = capsys.readouterr().err
    assert "held-out" in err or "val/" in err, err
    assert main(["eval", "knn", "--pixels", "--data", SAMPLE, "--temperature", "0", "--no-cache"]) == 2
    assert "temperature" in capsys.readouterr().err


# ----------------------------------------------------------------------------- messages (3, 16)


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_malicious_pickle_is_called_so_and_corrupt_is_corrupt(tmp_path):
    from leap.checkpoint import read_torch_file
    from leap.errors import CheckpointError

    evil, bad = tmp_path / "evil.pt", tmp_path / "bad.pt"
    torch.save({"m": _Evil()}, evil)
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"refused: it holds Python objects \(e\.g\. (posix|os)\.system\)") as e:
        read_torch_file(evil)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        read_torch_file(bad)


def test_non_finite_weights_name_the_file(tmp_path):
    from leap.checkpoint import check_finite_weights
    from leap.errors import CheckpointError

    check_finite_weights({"w": torch.ones(2), "step": 3}, "ok.pth")
    with pytest.raises(CheckpointError, match=r"t\.pth: 1 of 2 tensors hold NaN/Inf \(e\.g\. 'b'\)"):
        check_finite_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "t.pth", "teacher")


# ----------------------------------------------------------------------------- one saving (7)


def test_one_definition_of_savings(tmp_path):
    from leap.apps.report import make_report
    from leap.cost import CostModel, savings
    from leap.runlog import load_run

    run = tmp_path / "run"
    summary = Trainer(tiny_config(run, curriculum="cka", tau=2.0, max_epochs_per_block=0, epochs=1)).fit()
    assert summary["calibration_blocks"] == 4  # the scan ran once, over the 4 teacher blocks
    blocks = load_run(run).step_blocks()
    cfg = summary["config"]
    cm = CostModel(
        cfg["teacher"],
        cfg["student"],
        img_size=28,
        teacher_overrides=cfg["teacher_overrides"],
        student_overrides=cfg["student_overrides"],
    )
    expected = savings(blocks, cost_model=cm)
    flops = summary["flops"]
    assert flops["saved_fraction"] == pytest.approx(expected["teacher_saving"])  # leap flops' number
    assert summary["teacher_block_savings"] == pytest.approx(expected["teacher_only_saving"])
    assert flops["calibration_fraction"] == pytest.approx(flops["calibration_flops"] / flops["baseline_teacher_flops"])
    assert flops["calibration_fraction"] > 0
    res = make_report(run)
    assert res["saved_fraction"] == pytest.approx(flops["saved_fraction"])  # leap report's number
    assert "calibration scan (once, first step): 4 teacher blocks" in (run / "report" / "report.md").read_text()


# ----------------------------------------------------------------------------- clear errors, progress (14, 18)


def test_flops_bad_shape_is_one_line(capsys):
    code = main(
        [
            "flops",
            "--teacher",
            "vit_small_patch14_dinov2",
            "--student",
            "vit_small_patch14_dinov2",
            "--teacher-overrides",
            '{"embed_dim": 50, "num_heads": 3}',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "divisible by num_heads" in err and len(err.strip().splitlines()) == 1, err


def test_progress_lines_without_a_terminal(tmp_path, caplog):
    # pytest's stderr is not a terminal: no bar, but a line every --log-every steps and at the epoch end.
    with caplog.at_level(logging.INFO, logger="leap.train"):
        Trainer(tiny_config(tmp_path / "run", progress=True, log_every=2, epochs=1)).fit()
    lines = [r.message for r in caplog.records if r.message.startswith("epoch 1/1 step")]
    assert [ln.split(" (")[0] for ln in lines] == ["epoch 1/1 step 2/4", "epoch 1/1 step 4/4"], lines
    assert lines[-1].endswith("[epoch end]") and "loss" in lines[0]


def test_eval_refuses_a_nan_teacher_file(tmp_path, capsys):
    from leap.apps.pretrain import TEACHER_META_KEY
    from leap.models import build_model

    overrides = {"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 1}
    net = build_model("vit_small_patch14_dinov2", img_size=28, **overrides)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "nan_teacher.pth"
    torch.save(
        {
            "model": state,
            TEACHER_META_KEY: {"model": "vit_small_patch14_dinov2", "model_overrides": overrides, "img_size": 28},
        },
        path,
    )
    assert main(["eval", "knn", "--model", str(path), "--data", SAMPLE, "--no-cache", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "NaN/Inf" in err, err


def test_option_errors_do_not_wait_for_torch():
    import subprocess
    import sys

    code = (
        "import sys; from leap.cli import main; "
        "rc = main(['distill', '--teacher', 'a', '--student', 'b', '--tau', '-1']); "
        "print(rc, 'torch' in sys.modules)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "--tau" in proc.stderr


def test_log_lines_go_above_a_progress_bar(monkeypatch):
    import io

    from tqdm import tqdm

    from leap.cli import _BarSafeHandler

    stream = io.StringIO()
    handler = _BarSafeHandler(stream)
    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None: written.append(s)))
    bar = tqdm(total=3, file=io.StringIO())
    try:
        handler.emit(logging.LogRecord("leap", logging.INFO, __file__, 1, "level up", None, None))
    finally:
        bar.close()
    assert written == ["level up"] and stream.getvalue() == ""
    handler.emit(logging.LogRecord("leap", logging.INFO, __file__, 1, "plain", None, None))
    assert stream.getvalue() == "plain\n"


def test_loss_spike_reference_restarts_on_a_new_target_block():
    guard = RunGuard("unused", divergence_factor=100)
    for step in range(1, 12):
        guard.check_step(0.01, step, "", block=3)
    guard.check_step(5.0, 12, "", block=4)  # a new target: its loss may be far higher, no stop
    for step in range(13, 23):
        guard.check_step(5.0, step, "", block=4)
    with pytest.raises(TrainingError, match="loss jumped"):
        guard.check_step(5000.0, 23, "", block=4)


def test_distill_refuses_a_nan_teacher_file_naming_it(tmp_path):
    from leap.errors import CheckpointError
    from leap.models import build_model, load_teacher_weights

    small = dict(depth=1, embed_dim=32, num_heads=2)
    teacher = build_model("vit_small_patch14_dinov2", img_size=28, **small)
    state = teacher.state_dict()
    state["blocks.0.attn.qkv.weight"] = torch.full_like(state["blocks.0.attn.qkv.weight"], float("nan"))
    path = tmp_path / "nan_teacher.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="nan_teacher.pth.*NaN/Inf"):
        load_teacher_weights(build_model("vit_small_patch14_dinov2", img_size=28, **small), path)


def test_embed_dim_not_divisible_by_heads_is_a_model_error():
    from leap.errors import ModelError
    from leap.models import build_model

    with pytest.raises(ModelError, match="embed_dim"):
        build_model("vit_small_patch14_dinov2", img_size=28, depth=1, embed_dim=30, num_heads=4)
