"""Reliability, round 2 (issue 27): run state and checkpoints. One savings number for a branched run,
the kernel backend recorded and compared on resume, earlier runs never overwritten (kept checkpoints
resume), a lock that dies with its run, no stale summary, NaN and tampered checkpoints refused, a full
disk, an int8 teacher, a killed DataLoader worker, file modes, --resume RUN_DIR, a changed --tau.

Each test failed before its fix (the item numbers are the issue's).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from test_reliability2_data import read_log, tiny_config

import leap.checkpoint as C
from leap.errors import CheckpointError, ConfigError, RunDirError, TrainingError
from leap.run.guard import RunDirLock, kept_checkpoints
from leap.run.loop import Trainer
from leap.runlog import atomic_write, load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


# ----------------------------------------------------------------------------- 12: one saving for a branched run


def test_a_branched_run_has_one_savings_number(tmp_path):
    from leap.apps.report import make_report
    from leap.runlog import load_trajectory

    parent, branch = tmp_path / "parent", tmp_path / "branch"
    leap = dict(curriculum="cka", start_block=1, tau=0.0, epochs=2)  # blocks 1, 2, 3, 4 then 4: epochs differ
    Trainer(tiny_config(parent, max_steps=4, **leap)).fit()
    summary = Trainer(tiny_config(branch, resume=str(parent / "checkpoint.pt"), **leap)).fit()
    saved = summary["flops"]["saved_fraction"]
    assert saved == pytest.approx(make_report(branch, use_cost_model=False)["saved_fraction"])
    assert [r["step"] for r in read_log(branch) if r["type"] == "step"] == list(range(1, 9))
    assert load_trajectory(str(branch)).mean() == pytest.approx(summary["mean_block"])


# ----------------------------------------------------------------------------- 13, 34: changed settings on resume


def test_kernel_backend_is_recorded_and_a_change_warns(tmp_path, monkeypatch, caplog):
    import leap_kernels

    if not leap_kernels.backends("cpu")["cpp"].usable:
        pytest.skip("needs the cpp backend (leap_kernels._C)")
    run = tmp_path / "run"
    Trainer(tiny_config(run, epochs=2, max_steps=2)).fit()
    assert read_log(run)[0]["resolved"]["kernel_backend"] == "torch"
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "cpp")
    with caplog.at_level(logging.WARNING, logger="leap.train"):
        Trainer(tiny_config(run, epochs=2, max_steps=3, resume="auto")).fit()
    assert "kernel backend: 'torch' -> 'cpp'" in caplog.text


def test_changed_tau_is_one_line_not_a_raw_warning(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(tiny_config(run, epochs=2, max_steps=2, curriculum="cka")).fit()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="leap.train"):
        warnings.simplefilter("always")
        Trainer(tiny_config(run, epochs=2, max_steps=3, curriculum="cka", tau=0.5, resume="auto")).fit()
    assert not [w for w in caught if "config differs" in str(w.message)]
    assert "tau: 0.85 -> 0.5" in caplog.text


# ----------------------------------------------------------------------------- 14, 35: earlier runs, --resume RUN_DIR


def test_a_previous_run_without_checkpoint_pt_is_not_overwritten(tmp_path, caplog):
    run = tmp_path / "run"
    Trainer(tiny_config(run, epochs=2, max_steps=6, ckpt_every=1, keep_checkpoints=3)).fit()
    os.unlink(run / "checkpoint.pt")  # lost; checkpoint-step000000004.pt and -5.pt are kept
    lines = len(read_log(run))
    with pytest.raises(ConfigError, match=r"already holds a previous run \(summary\.json, checkpoint-step0+5\.pt"):
        Trainer(tiny_config(run, epochs=2))
    assert len(read_log(run)) == lines  # nothing was overwritten
    with caplog.at_level(logging.WARNING, logger="leap.train"):
        summary = Trainer(tiny_config(run, epochs=2, ckpt_every=1, keep_checkpoints=3, resume="auto")).fit()
    assert "resuming from the newest kept checkpoint" in caplog.text and "checkpoint-step000000005.pt" in caplog.text
    assert summary["steps"] == 8
    assert [r["step"] for r in read_log(run) if r["type"] == "step"] == list(range(1, 9))


def test_resume_accepts_a_run_directory(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, epochs=2, max_steps=2)).fit()
    assert Trainer(tiny_config(run, epochs=2, resume=str(run))).fit()["steps"] == 8


# ----------------------------------------------------------------------------- 15: the lock dies with its run

_HOLD_LOCK = """
import os, subprocess, sys, time
from leap.run.guard import RunDirLock
lock = RunDirLock(sys.argv[1])
lock.acquire()
if sys.argv[2] == "fork":  # a DataLoader worker: forked, outlives the killed run
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
else:  # a child that inherited the descriptor across exec
    pid = subprocess.Popen(["sleep", "120"], pass_fds=[lock._fd]).pid
print(pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_lock_of_a_killed_run_is_not_held_by_its_children(tmp_path, how):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run), how], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    child = None
    try:
        child = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)  # kill -9 of the run; its child lives on
        proc.wait(timeout=30)
        lock = RunDirLock(run)
        lock.acquire()  # refused before: "in use by pid N"
        lock.release()
    finally:
        if proc.poll() is None:
            proc.kill()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- 16: no stale summary


def test_extending_a_run_invalidates_its_summary(tmp_path, monkeypatch):
    run = tmp_path / "run"
    Trainer(tiny_config(run)).fit()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    original = Trainer.train_step

    def killed(self, images):
        if self.step == 5:
            raise KeyboardInterrupt  # the extension dies before it completes
        return original(self, images)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(run, epochs=3, resume="auto")).fit()
    assert not (run / "summary.json").exists()
    assert load_run(run).summary.get("status") != "completed"
    assert not [r for r in read_log(run) if r["type"] == "summary"]


# ----------------------------------------------------------------------------- 17, 18: NaN and tampered checkpoints


def _checkpoint(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(run, epochs=2, max_steps=2)).fit()
    return run, torch.load(run / "checkpoint.pt", weights_only=True)


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path):
    run, ckpt = _checkpoint(tmp_path)
    name = next(iter(ckpt["student"]))
    ckpt["student"][name] = torch.full_like(ckpt["student"][name], float("nan"))
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=rf"tensor\(s\) of the student hold NaN/Inf \(e\.g\. '{name}'\)"):
        Trainer(tiny_config(run, epochs=2, resume="auto"))


def test_non_finite_optimizer_state_is_never_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=2, max_steps=1))
    trainer.fit()
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=2, max_steps=2, resume="auto"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    for state in trainer.optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.is_floating_point():
                value.fill_(float("inf"))
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.save_checkpoint()
    trainer.close()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("step", "abc", r"'step' is 'abc', expected an integer >= 0"),
        ("epoch", 99, "'epoch' is 99, beyond the run's 2 epochs"),
        ("rng", [{"python": "junk"}], "malformed RNG state"),
        ("scheduler", {"last_step": "x"}, "'scheduler' holds"),
        ("totals", {"images": "many"}, "totals.images is 'many'"),
    ],
)
def test_tampered_checkpoints_are_one_line(tmp_path, field, value, why):
    run, ckpt = _checkpoint(tmp_path)
    ckpt[field] = value
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=why) as e:
        Trainer(tiny_config(run, epochs=2, resume="auto")).fit()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- 22, 36: writes


@pytest.mark.parametrize(
    "failure", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("[enforce fail] unexpected pos 64 vs 0")]
)
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, epochs=2))
    trainer.save_checkpoint()
    before = (run / "checkpoint.pt").read_bytes()

    def full(obj, f):
        f.write(b"PK\x03\x04partial")
        raise failure

    monkeypatch.setattr(C.torch, "save", full)
    with pytest.raises(RunDirError, match=r"could not write .*checkpoint\.pt: no space left .*MiB free") as e:
        trainer.fit()
    assert "previous checkpoint is intact" in str(e.value) and "--resume auto" in str(e.value)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "summary.json", lambda f: f.write(b"{}"))
        assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == 0o644  # mkstemp's 0600 before
        os.umask(0o027)
        atomic_write(tmp_path / "checkpoint.pt", lambda f: f.write(b"x"))
        assert os.stat(tmp_path / "checkpoint.pt").st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- 8: a quantized teacher file


def test_an_int8_teacher_is_refused(tmp_path):
    from leap.models import build_model, load_teacher_weights

    small = dict(depth=1, embed_dim=32, num_heads=2, patch_size=7)
    state = build_model("vit_small_patch14_dinov2", img_size=28, **small).state_dict()
    path = tmp_path / "int8.pth"
    torch.save({k: (v * 100).to(torch.int8) for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"int8.pth: \d+ weight tensor\(s\) are torch.int8, not floating point"):
        load_teacher_weights(build_model("vit_small_patch14_dinov2", img_size=28, **small), path)


# ----------------------------------------------------------------------------- 30: a killed DataLoader worker


def test_a_killed_dataloader_worker_is_one_line_with_the_last_good_checkpoint(tmp_path, monkeypatch):
    from torch.utils.data import get_worker_info

    from leap.data import SyntheticDataset

    original = SyntheticDataset._load

    def oom_killed(self, index):
        if get_worker_info() is not None and getattr(self, "_served", 0) >= 24:
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        self._served = getattr(self, "_served", 0) + 1
        return original(self, index)

    monkeypatch.setattr(SyntheticDataset, "_load", oom_killed)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="DataLoader worker died during step .* out-of-memory killer") as e:
        Trainer(tiny_config(run, epochs=2, workers=1, ckpt_every=1)).fit()
    assert "Last good checkpoint: " in str(e.value) and "--resume auto" in str(e.value)
    assert "checkpoint.pt" in str(e.value)
    assert read_log(run)[-1]["type"] == "error"
    assert kept_checkpoints(run) or (run / "checkpoint.pt").exists()
