"""Tests for the LEAP trainer (leap/run/loop.py), checkpoints (leap/checkpoint.py) and
optimizers (leap/optim.py), on tiny random ViTs and synthetic data (CPU, fp32)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from tiny import TEACHER_DEPTH, fast_cpu, read_log, records, tiny_config
from torch import nn

from leap.checkpoint import atomic_save, load_checkpoint
from leap.config import TrainConfig
from leap.errors import CheckpointError, ConfigError, InputNotFoundError, NonFiniteLossError
from leap.objective import DistillModule
from leap.optim import LARS, WarmupCosine, build_optimizer, param_groups, peak_lr
from leap.run.loop import Trainer, train


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    # conftest turns on the Triton CPU interpreter for the kernel tests; the trainer tests
    # only need the loss values, so use the (fast) torch backend of leap_kernels. Tiny
    # models: one intra-op thread is faster (no OpenMP wake-ups) and immune to a busy CPU.
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def final_params(run_dir) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    return {
        **{f"student.{k}": v for k, v in ckpt["student"].items()},
        **{f"head.{k}": v for k, v in ckpt["head"].items()},
    }


def assert_params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different}"


# --------------------------------------------------------------------------------------
# Curriculum in the loop
# --------------------------------------------------------------------------------------


def test_leap_levels_up_and_teacher_exits_early(tmp_path):
    # tau = 0 -> every CKA observation levels up: blocks 1, 2, 3, 4, 4, ...
    summary = train(tiny_config(tmp_path, start_block=1, tau=0.0, epochs=2))
    log = read_log(tmp_path)
    steps = records(log, "step")
    assert [r["block"] for r in steps] == [1, 2, 3, 4, 4, 4, 4, 4]
    # Early exit: the teacher ran exactly `block` blocks on every step (counted per block call).
    assert all(r["teacher_blocks_run"] == r["block"] for r in steps)
    assert all(0.0 <= r["cka"] <= 1.0 + 1e-6 for r in steps)
    for key in ("step", "epoch", "loss", "patch_loss", "cls_loss", "lr", "images_per_s"):
        assert all(key in r for r in steps), key
    ups = records(log, "level_up")
    assert [(u["from_block"], u["to_block"], u["reason"]) for u in ups] == [(1, 2, "cka"), (2, 3, "cka"), (3, 4, "cka")]
    # loss = patch + 0.05 * cls
    assert all(math.isclose(r["loss"], r["patch_loss"] + 0.05 * r["cls_loss"], rel_tol=1e-5) for r in steps)

    epochs = records(log, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[0]["teacher_blocks_run_total"] == 1 + 2 + 3 + 4
    assert epochs[0]["decode_failures"] == 0 and "time_s" in epochs[0] and "mean_loss" in epochs[0]
    assert summary["final_block"] == TEACHER_DEPTH and summary["steps"] == 8
    assert summary["teacher_blocks_run"] == 1 + 2 + 3 + 4 * 5
    assert summary["teacher_block_savings"] == pytest.approx(1 - 26 / 32)
    assert len(summary["level_ups"]) == 3
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8


def test_calibration_scans_all_blocks_once(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, tau=2.0, max_epochs_per_block=0, max_steps=2))
    summary = trainer.fit()
    log = read_log(tmp_path)
    (cal,) = records(log, "calibration")
    assert len(cal["scores"]) == TEACHER_DEPTH
    assert cal["teacher_blocks_run"] == TEACHER_DEPTH  # one pass through the teacher for all scores
    best = max(range(TEACHER_DEPTH), key=lambda i: cal["scores"][i]) + 1
    assert cal["start_block"] == best == summary["start_block"]
    assert trainer.block_history == [best, best]  # tau > 1: no level-up
    assert summary["status"] == "stopped_at_max_steps"
    with pytest.raises(RuntimeError, match="already run"):  # a trainer runs once
        trainer.fit()


def test_baseline_and_leap_share_the_step(tmp_path):
    base = train(tiny_config(tmp_path / "base", curriculum="off"))
    log = read_log(tmp_path / "base")
    steps = records(log, "step")
    assert all(r["block"] == TEACHER_DEPTH == r["teacher_blocks_run"] for r in steps)
    assert not records(log, "calibration")[0]["scores"]  # no CKA scan for the baseline
    assert base["mode"] == "baseline" and base["teacher_block_savings"] == 0.0

    # LEAP pinned at the last block (no calibration scan, no level-up possible) takes
    # exactly the same steps as the baseline: same step function, same numbers.
    leap = train(tiny_config(tmp_path / "leap", curriculum="cka", start_block=TEACHER_DEPTH))
    assert leap["mode"] == "leap"
    assert_params_equal(final_params(tmp_path / "base"), final_params(tmp_path / "leap"))
    assert [r["loss"] for r in steps] == [r["loss"] for r in records(read_log(tmp_path / "leap"), "step")]


def test_token_mse_adamw_cka_every(tmp_path):
    summary = train(
        tiny_config(
            tmp_path,
            loss="token-mse",
            optimizer="adamw",
            cka_every=2,
            start_block=2,
            tau=2.0,
            mixup=False,
            augment=False,
        )
    )
    steps = records(read_log(tmp_path), "step")
    assert ["cka" in r for r in steps] == [False, True, False, True]
    assert all(r["mixup_lambda"] == 1.0 for r in steps)
    assert summary["resolved"]["peak_lr"] == 5e-4  # AdamW: lr is not batch-scaled
    assert all(math.isfinite(r["loss"]) for r in steps)


# --------------------------------------------------------------------------------------
# Checkpoint / resume
# --------------------------------------------------------------------------------------


# LEAP with calibration, level-ups, mixup, augmentation and LARS momentum: everything
# that carries state across steps must come back from the checkpoint.
RESUME_KW = dict(tau=0.0, epochs=2, ckpt_every=3)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted 8-step reference run: (run_dir, summary)."""
    run_dir = tmp_path_factory.mktemp("straight")
    with fast_cpu():
        summary = train(tiny_config(run_dir, **RESUME_KW))
    return run_dir, summary


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_bit_identical(tmp_path, straight_run, stop_at):
    kw = RESUME_KW
    straight_dir, straight = straight_run

    first = train(tiny_config(tmp_path / "b", max_steps=stop_at, **kw))
    assert first["status"] == "stopped_at_max_steps" and first["steps"] == stop_at
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert ckpt["step"] == stop_at
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == ((0, 3) if stop_at == 3 else (1, 0))
    resumed = train(tiny_config(tmp_path / "b", resume="auto", **kw))

    assert resumed["status"] == "completed" and resumed["steps"] == straight["steps"] == 8
    assert_params_equal(final_params(straight_dir), final_params(tmp_path / "b"))
    assert resumed["level_ups"] == straight["level_ups"]
    log_a, log_b = read_log(straight_dir), read_log(tmp_path / "b")
    assert [r["loss"] for r in records(log_a, "step")] == [r["loss"] for r in records(log_b, "step")]
    assert records(log_b, "resume")[0]["step"] == stop_at
    # The epoch summaries agree too (running sums are part of the checkpoint).
    assert [e["mean_loss"] for e in records(log_a, "epoch")] == [e["mean_loss"] for e in records(log_b, "epoch")]


def test_checkpoint_contents_and_atomic_write(tmp_path):
    train(tiny_config(tmp_path, max_steps=2, precision="fp32"))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in (
        "student",
        "head",
        "optimizer",
        "scheduler",
        "scaler",
        "curriculum",
        "rng",
        "epoch",
        "step",
        "step_in_epoch",
        "config",
        "resolved",
        "dims",
    ):
        assert key in ckpt, key
    assert set(ckpt["rng"][0]) >= {"python", "numpy", "torch", "cuda", "generators"}
    assert "mixup" in ckpt["rng"][0]["generators"]
    assert ckpt["config"]["teacher"] == "vit_small_patch14_dinov2"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left behind


def test_fresh_run_refuses_existing_checkpoint(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match="already holds a checkpoint.*--resume auto"):
        Trainer(tiny_config(tmp_path, max_steps=1))


def test_incompatible_resume_names_the_keys(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    cfg = tiny_config(
        tmp_path,
        resume="auto",
        loss="token-mse",
        student_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 7},
    )
    with pytest.raises(CheckpointError) as err:
        Trainer(cfg)
    msg = str(err.value)
    assert "incompatible" in msg
    for key in ("loss", "student_overrides", "student_dim"):
        assert key in msg
    assert "teacher:" not in msg  # only the differing keys are listed


def test_corrupt_and_foreign_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(garbage)

    foreign = tmp_path / "teacher.pth"
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(3)}}, foreign)
    with pytest.raises(CheckpointError, match="not a LEAP training checkpoint.*--teacher-weights"):
        load_checkpoint(foreign)

    with pytest.raises(InputNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")

    # A truncated real checkpoint, through the trainer's --resume.
    run = tmp_path / "run"
    train(tiny_config(run, max_steps=1))
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(tiny_config(run, resume="auto"))


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ck.pt"]


# --------------------------------------------------------------------------------------
# Non-finite loss
# --------------------------------------------------------------------------------------


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = DistillModule.forward

    def poisoned(self, *args):
        loss, patch_loss, cls_loss, s_patch = original(self, *args)
        calls["n"] += 1
        if calls["n"] == 3:  # the third training step
            loss = loss * float("nan")
        return loss, patch_loss, cls_loss, s_patch

    monkeypatch.setattr(DistillModule, "forward", poisoned)
    ckpt_path = str(tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_config(tmp_path, ckpt_every=1, epochs=2))
    msg = str(err.value)
    assert "step 3" in msg and ckpt_path in msg

    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["step"] == 2  # the good state before the bad step
    assert all(torch.isfinite(v).all() for v in {**ckpt["student"], **ckpt["head"]}.values())
    errors = records(read_log(tmp_path), "error")
    assert errors and errors[0]["step"] == 3


def test_nonfinite_weights_never_overwrite_a_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    good = trainer.save_checkpoint()
    before = open(good, "rb").read()
    with torch.no_grad():
        trainer.module.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=f"NOT overwritten.*{good}"):
        trainer.save_checkpoint()
    trainer.close()
    assert open(good, "rb").read() == before


# --------------------------------------------------------------------------------------
# Optimizers and schedule
# --------------------------------------------------------------------------------------


def test_param_groups_exclusions():
    from leap.models import build_model

    m = build_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, embed_dim=32, num_heads=2, patch_size=7)
    groups = {g["name"]: g for g in param_groups(m.named_parameters(), 1e-6)}
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    for n in (
        "cls_token",
        "reg_token",
        "pos_embed",
        "blocks.0.ls1.gamma",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.bias",
        "norm.bias",
    ):
        assert n in no_decay, n
    assert decay == {
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
    }
    assert groups["no_decay"]["weight_decay"] == 0.0 and not groups["no_decay"]["lars"]


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1, "lars": True}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
        trust_coefficient=0.01,
        eps=0.0,
    )
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2
    b.grad = torch.tensor([2.0])
    opt.step()
    ratio = 0.01 * 5 / (2 + 0.1 * 5)
    d = (torch.tensor([[0.0, 2.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])) * ratio
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * d)
    assert torch.allclose(b.detach(), torch.tensor([0.0]))  # plain SGD: 1 - 0.5 * 2
    # second step: momentum buffer
    w_before = w.detach().clone()
    w.grad = torch.tensor([[0.0, 2.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2 + 2)]))
    assert not torch.equal(w.detach(), w_before)


def test_build_optimizer_and_lr_scaling():
    m = nn.Linear(4, 3)
    opt = build_optimizer("adamw", m.named_parameters(), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert peak_lr("lars", 6.0, 256) == pytest.approx(6.0 * math.sqrt(256 / 1536))  # ~2.449
    assert peak_lr("adamw", 1e-3, 256) == 1e-3
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", m.named_parameters(), lr=1.0, weight_decay=0.0)


def test_warmup_cosine_schedule():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.001)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear warmup reaches the peak
    assert lrs[4] == pytest.approx(2.0)  # cosine starts at the peak
    assert lrs[9] == pytest.approx(2.0 * (0.001 + 0.999 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.001)  # floor after total_steps
    state = sched.state_dict()
    sched2 = WarmupCosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.001)
    sched2.load_state_dict(state)
    assert sched2.last_step == sched.last_step


def test_config_validation():
    with pytest.raises(ConfigError, match="--tau"):
        TrainConfig(teacher="a", student="b", tau=float("nan")).validate()
    with pytest.raises(ConfigError, match="--optimizer: invalid choice 'sgd'"):
        TrainConfig(teacher="a", student="b", optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="unknown key.*'batchsize'.*did you mean 'batch_size'"):
        TrainConfig.from_dict({"teacher": "a", "student": "b", "batchsize": 3})
    cfg = TrainConfig.from_dict(
        {"teacher": "a", "student": "b", "min-lr-ratio": "1e-3", "teacher_overrides": '{"depth": 2}'}
    )
    assert cfg.min_lr_ratio == 1e-3 and cfg.teacher_overrides == {"depth": 2}
    cfg = TrainConfig.from_dict({"teacher": "a", "student": "b", "no-mixup": True, "augment": "false"})
    assert (cfg.mixup, cfg.augment) == (False, False)


def test_bad_models_fail_cleanly(tmp_path):
    with pytest.raises(ValueError, match="unknown ViT model name"):
        Trainer(tiny_config(tmp_path, student="vit_smal_patch14_dinov2"))
    # student patch 14 at 28 px -> 2x2 grid, teacher patch 7 -> 4x4 grid
    with pytest.raises(ValueError, match="patch grid"):
        Trainer(tiny_config(tmp_path, student_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2}))


def test_folder_data_reports_decode_failures(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    summary = train(tiny_config(tmp_path / "run", data=str(root), data_source="folder", batch_size=3, epochs=2))
    epochs = records(read_log(tmp_path / "run"), "epoch")
    # 9 files, 3 batches of 3 per epoch: the broken file is met (and skipped) in epoch 0 only.
    assert [(e["decode_failures"], e["decode_failures_total"]) for e in epochs] == [(1, 1), (0, 1)]
    assert summary["decode_failures"] == 1


def test_bf16_autocast_on_cpu(tmp_path):
    summary = train(tiny_config(tmp_path, precision="bf16", max_steps=2, start_block=1, tau=0.0))
    assert summary["resolved"]["precision"] == "bf16" and summary["resolved"]["teacher_dtype"] == "bfloat16"
    assert math.isfinite(summary["final_loss"]) and summary["final_block"] == 3
