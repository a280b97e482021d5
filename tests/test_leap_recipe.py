"""The recipe defaults and ablation modes of issue 23 (items 2, 3, 4, 8, 9, 10): the reference's warmup
rule, the fractional curriculum timeout (resumed bit-exactly mid-block), ``--global-batch``, the fixed
teacher block, the lr-reset variants at level-ups and the concatenated target ``[t_k ; t_L]``, with
their cost-model, ``leap flops`` and ``leap report`` accounting. Tiny random ViTs on synthetic data
(CPU, fp32)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import torch
from spawn import free_port, run_processes, set_ddp_env
from tiny import STUDENT, TEACHER, TEACHER_DEPTH, as_argv, fast_cpu, read_log, records, tiny_config, tiny_models

from leap.checkpoint import load_checkpoint
from leap.cli import main
from leap.config import CHOICES, TrainConfig
from leap.cost import CostModel, head_macs, savings
from leap.curriculum import LR_RESETS, Curriculum, block_timeout
from leap.errors import ConfigError, RunInterrupted
from leap.models import build_model
from leap.objective import ConcatDistillModule, CountingTeacher, DistillModule, teacher_targets
from leap.optim import RESTART_STARTS, WarmupCosine
from leap.run.build import resolve_config
from leap.run.loop import Trainer, train
from leap_kernels import FeatureDistillationHead

L = TEACHER_DEPTH  # teacher depth of the tiny runs


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def final_params(run_dir) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    return {**{f"s.{k}": v for k, v in ckpt["student"].items()}, **{f"h.{k}": v for k, v in ckpt["head"].items()}}


def assert_same_run(dir_a, dir_b) -> None:
    """Bit-identical parameters, losses, lrs, blocks and level-ups."""
    a, b = final_params(dir_a), final_params(dir_b)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "parameters differ"
    log_a, log_b = read_log(dir_a), read_log(dir_b)
    for key in ("loss", "lr", "block"):
        assert [r[key] for r in records(log_a, "step")] == [r[key] for r in records(log_b, "step")], key
    ups = [{k: v for k, v in u.items() if k != "cka"} for u in records(log_a, "level_up")]
    assert ups == [{k: v for k, v in u.items() if k != "cka"} for u in records(log_b, "level_up")]


# ----------------------------------------------------------------------------- 2: warmup


def test_warmup_defaults_to_the_reference_rule_and_is_saved(tmp_path):
    cfg = TrainConfig(teacher="t", student="s")
    assert cfg.warmup_epochs is None
    for epochs, warmup in ((100, 10.0), (20, 2.0), (5, 0.5), (300, 10.0)):
        assert resolve_config(TrainConfig(teacher="t", student="s", epochs=epochs), 1).warmup_epochs == warmup
    assert resolve_config(TrainConfig(teacher="t", student="s", epochs=20, warmup_epochs=7), 1).warmup_epochs == 7
    assert resolve_config(TrainConfig(teacher="t", student="s", epochs=20, warmup_epochs=0), 1).warmup_epochs == 0

    # 10 epochs of 4 steps: warmup min(10, 1) = 1 epoch = 4 steps; the resolved value is what the run saves.
    summary = train(tiny_config(tmp_path, epochs=10, warmup_epochs=None, max_steps=2))
    assert summary["resolved"]["warmup_steps"] == 4
    assert summary["config"]["warmup_epochs"] == 1.0
    (config_record,) = records(read_log(tmp_path), "config")
    assert config_record["config"]["warmup_epochs"] == 1.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["warmup_epochs"] == 1.0
    peak = summary["resolved"]["peak_lr"]
    assert [r["lr"] for r in records(read_log(tmp_path), "step")] == pytest.approx([peak / 4, peak / 2])
    # Resuming without --warmup-epochs resolves the same value: no "config differs" warning for it.
    resumed = train(tiny_config(tmp_path, epochs=10, warmup_epochs=None, max_steps=3, resume="auto"))
    assert resumed["config"]["warmup_epochs"] == 1.0 and resumed["steps"] == 3


def test_warmup_option_and_nonsense():
    assert main(["distill", "--teacher", "t", "--student", "s", "--warmup-epochs", "nan"]) == 2
    with pytest.raises(ConfigError, match="--warmup-epochs"):
        TrainConfig(teacher="t", student="s", warmup_epochs=-1).validate()


# ----------------------------------------------------------------------------- 3: fractional timeout


def test_block_timeout_forms():
    assert block_timeout(5, 40) == (5, None)  # whole epochs: the reference's epoch-end count
    assert block_timeout(5.0, 40) == (5, None) and isinstance(block_timeout(5.0, 40)[0], int)
    assert block_timeout(2.5, 4) == (None, 10)
    assert block_timeout(0.75, 4) == (None, 3)
    assert block_timeout(0.01, 4) == (None, 1)  # at least one step
    assert block_timeout(0, 4) == (None, None) and block_timeout(None, 4) == (None, None)
    with pytest.raises(ValueError, match="max_epochs_per_block"):
        block_timeout(float("nan"), 4)
    with pytest.raises(ConfigError, match="--max-epochs-per-block"):
        TrainConfig(teacher="t", student="s", max_epochs_per_block=float("inf")).validate()


def test_step_timeout_in_the_controller():
    cur = Curriculum(6, tau=2.0, max_epochs_per_block=None, max_steps_per_block=3, start_block=1)
    cur.calibrate()
    blocks = []
    for step in range(1, 11):
        blocks.append(cur.block)
        cur.step_end(step=step, epoch=0, score=0.5 if step % 2 else None)  # scored or not, the steps count
    assert blocks == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert [(u.step, u.reason) for u in cur.level_ups] == [(3, "timeout"), (6, "timeout"), (9, "timeout")]
    assert cur.steps_on_block == 1 and cur.state_dict()["steps_on_block"] == 1
    # An epoch end neither counts steps nor resets them; a level-up by CKA does.
    cur.epoch_end(epoch=0)
    assert cur.steps_on_block == 1
    cur.tau = 0.4
    cur.step_end(step=11, epoch=1, score=0.5)
    assert cur.level_ups[-1].reason == "cka" and cur.steps_on_block == 0
    # Without a step timeout, an unscored step checks nothing (tau = 0 would otherwise level up).
    plain = Curriculum(6, tau=0.0, start_block=1)
    plain.calibrate()
    assert plain.step_end(step=1, epoch=0) == [] and plain.block == 1
    assert plain.step_end(step=2, epoch=0, score=0.1) == [(1, 2)]
    with pytest.raises(ValueError, match="max_steps_per_block"):
        Curriculum(6, max_steps_per_block=0)


def test_whole_epoch_timeout_keeps_the_epoch_end_semantics(tmp_path):
    # M = 1 (given as a float, as the CLI parses it): the target moves at epoch ends only.
    train(tiny_config(tmp_path, start_block=1, tau=2.0, max_epochs_per_block=1.0, epochs=3))
    log = read_log(tmp_path)
    assert [r["block"] for r in records(log, "step")] == [1] * 4 + [2] * 4 + [3] * 4
    assert [(u["step"], u["reason"]) for u in records(log, "level_up")] == [
        (4, "timeout"),
        (8, "timeout"),
        (12, "timeout"),
    ]


# 4 steps per epoch, M = 0.75 epochs = 3 steps on a block; tau > 1: the timeout alone moves the target.
FRACTION_KW = dict(start_block=1, tau=2.0, max_epochs_per_block=0.75, epochs=3, ckpt_every=1, lr_reset="current")
FRACTION_BLOCKS = [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


@pytest.fixture(scope="module")
def fraction_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fraction")
    with fast_cpu():
        summary = train(tiny_config(run_dir, warmup_epochs=0.25, **FRACTION_KW))
    return run_dir, summary


def test_fractional_timeout_counts_steps(fraction_run):
    run_dir, summary = fraction_run
    log = read_log(run_dir)
    assert [r["block"] for r in records(log, "step")] == FRACTION_BLOCKS
    assert [(u["step"], u["reason"]) for u in summary["level_ups"]] == [(3, "timeout"), (6, "timeout"), (9, "timeout")]
    assert summary["resolved"]["max_steps_per_block"] == 3
    assert [e["steps_on_block"] for e in records(log, "epoch")] == [1, 2, 3]
    assert [e["epochs_on_block"] for e in records(log, "epoch")] == [1, 1, 1]  # counted, but no epoch timeout
    # --lr-reset current restarted the cosine at every level-up (warmup: 1 step).
    assert [r["step"] for r in records(log, "lr_restart")] == [3, 6, 9]


@pytest.mark.parametrize("stop_at", [2, 4, 5, 7], ids=["block1", "epoch-end", "block2", "after-restarts"])
def test_fractional_timeout_resumes_bit_exactly_mid_block(tmp_path, fraction_run, stop_at):
    straight_dir, straight = fraction_run
    kw = dict(warmup_epochs=0.25, **FRACTION_KW)
    first = train(tiny_config(tmp_path, max_steps=stop_at, **kw))
    assert first["steps"] == stop_at
    state = load_checkpoint(tmp_path / "checkpoint.pt")["curriculum"]
    assert state["steps_on_block"] == [2, 1, 2, 1][[2, 4, 5, 7].index(stop_at)]  # stopped inside a block
    resumed = train(tiny_config(tmp_path, resume="auto", **kw))
    assert resumed["steps"] == straight["steps"] == 12
    assert resumed["level_ups"] == straight["level_ups"]
    assert_same_run(straight_dir, tmp_path)


def test_fractional_timeout_resumes_after_a_signal(tmp_path, fraction_run, monkeypatch):
    straight_dir, _ = fraction_run
    original = Trainer.train_step

    def step_then_sigterm(self, images):
        result = original(self, images)
        if result.step == 5:  # the second step on block 2
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    kw = dict(warmup_epochs=0.25, **FRACTION_KW)
    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    with pytest.raises(RunInterrupted):
        Trainer(tiny_config(tmp_path, **kw)).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["curriculum"]["steps_on_block"] == 2
    train(tiny_config(tmp_path, resume="auto", **kw))
    assert_same_run(straight_dir, tmp_path)


# ----------------------------------------------------------------------------- 4: global batch


def test_global_batch_sets_the_per_process_batch(tmp_path, caplog):
    assert resolve_config(TrainConfig(teacher="t", student="s", global_batch=256), 4).batch_size == 64
    assert resolve_config(TrainConfig(teacher="t", student="s", global_batch=256), 1).batch_size == 256
    assert resolve_config(TrainConfig(teacher="t", student="s", batch_size=32), 4).batch_size == 32  # unchanged
    with pytest.raises(ConfigError, match=r"--global-batch 10: not divisible by the 4 processes"):
        resolve_config(TrainConfig(teacher="t", student="s", global_batch=10), 4)
    with pytest.raises(ConfigError, match="--global-batch"):
        TrainConfig(teacher="t", student="s", global_batch=0).validate()

    with caplog.at_level(logging.INFO, logger="leap.train"):
        summary = train(tiny_config(tmp_path, batch_size=64, global_batch=8))
    assert any("global batch 8 (8 per process x 1 process(es))" in r.message for r in caplog.records)
    assert summary["steps"] == 2  # 16 images / 8
    assert summary["resolved"]["global_batch"] == 8 and summary["config"]["batch_size"] == 8
    assert summary["resolved"]["peak_lr"] == pytest.approx(6.0 * math.sqrt(8 / 1536))  # LARS: the global batch


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    set_ddp_env(rank, world, port)
    cfg = tiny_config(os.path.join(tmp, "run"), batch_size=64, global_batch=8, device="cpu", curriculum="off")
    summary = Trainer(cfg).fit()
    torch.save({"summary": summary}, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.mark.slow
def test_global_batch_under_ddp(tmp_path):
    run_processes(_ddp_worker, (2, free_port(), str(tmp_path)), 2, timeout_s=180)
    for rank in range(2):
        summary = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["summary"]
        assert summary["config"]["batch_size"] == 4 and summary["resolved"]["global_batch"] == 8
        assert summary["steps"] == 2 and summary["resolved"]["peak_lr"] == pytest.approx(6.0 * math.sqrt(8 / 1536))


# ----------------------------------------------------------------------------- 8: fixed teacher block


def test_fixed_block_for_the_whole_run(tmp_path):
    # tau = 0 would level up at every step under --curriculum cka; fixed never moves.
    summary = train(tiny_config(tmp_path, curriculum="fixed", start_block=2, tau=0.0, epochs=2))
    log = read_log(tmp_path)
    steps = records(log, "step")
    assert all(r["block"] == 2 == r["teacher_blocks_run"] for r in steps) and len(steps) == 8
    assert not records(log, "level_up") and not records(log, "calibration")[0]["scores"]
    assert summary["mode"] == "fixed" and summary["start_block"] == summary["final_block"] == 2
    assert summary["teacher_block_savings"] == pytest.approx(0.5) and summary["cka_computed"] is False
    # It resumes at its block; the controller refuses a checkpoint at another one.
    assert train(tiny_config(tmp_path, curriculum="fixed", start_block=2, epochs=3, resume="auto"))["steps"] == 12
    cur = Curriculum(6, enabled=False, start_block=3)
    assert cur.block == 3 == cur.calibrate(torch.rand(6)) and "fixed" in repr(cur)
    with pytest.raises(ValueError, match="always block 3"):
        cur.load_state_dict(Curriculum(6, enabled=False).state_dict())


def test_fixed_block_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--start-block: --curriculum fixed needs"):
        TrainConfig(teacher="t", student="s", curriculum="fixed").validate()
    with pytest.raises(ConfigError, match="--snap-to-last: applies to --curriculum cka only"):
        TrainConfig(teacher="t", student="s", curriculum="fixed", start_block=2, snap_to_last=3).validate()
    with pytest.raises(ConfigError, match="--start-block: applies to --curriculum cka only"):
        TrainConfig(teacher="t", student="s", curriculum="off", start_block=2).validate()
    with pytest.raises(ConfigError, match="the teacher .* has 4 blocks"):
        Trainer(tiny_config(tmp_path, curriculum="fixed", start_block=5))


# ----------------------------------------------------------------------------- 9: lr reset at level-ups


def _schedule(**kw) -> WarmupCosine:
    return WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), **kw)


def test_restart_from_peak_envelope_and_current():
    r, T = 0.01, 20

    def cosine(f0, i, at):
        return r + (f0 - r) * 0.5 * (1 + math.cos(math.pi * (i - at) / (T - at)))

    base = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
    env = [base.factor(i) for i in range(T)]
    assert env == [base.envelope(i) for i in range(T)]
    for start, f0 in (("peak", 1.0), ("envelope", env[8]), ("current", env[8])):
        s = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
        for _ in range(8):
            s.step()
        s.restart(start=start)
        assert s.restart_from == f0
        assert [s.factor(i) for i in range(8, T)] == pytest.approx([cosine(f0, i, 8) for i in range(8, T)])
        assert s.get_last_lr()[0] == pytest.approx(2.0 * f0)
    # A second restart: "current" starts from the restarted cosine, "envelope" from the plain schedule.
    firsts = {}
    for start in ("envelope", "current"):
        s = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
        s.restart(step=6, start="peak")
        s.restart(step=12, start=start)
        firsts[start] = s.restart_from
        state = s.state_dict()
        again = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
        again.load_state_dict(state)
        assert again.restart_from == s.restart_from and again.get_last_lr() == s.get_last_lr()
    assert firsts == pytest.approx({"envelope": env[12], "current": cosine(1.0, 12, 6)})
    assert firsts["current"] > firsts["envelope"]
    # The peak restart is the formula the snap restart always used, bit for bit.
    s = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
    s.restart(step=5)
    assert s.factor(9) == r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, 4 / 15)))
    with pytest.raises(ValueError, match="start must be one of"):
        s.restart(start="middle")
    legacy = {k: v for k, v in s.state_dict().items() if k != "restart_from"}  # a checkpoint before --lr-reset
    again = _schedule(warmup_steps=4, total_steps=T, min_lr_ratio=r)
    again.load_state_dict(legacy)
    assert again.restart_from == 1.0


@pytest.mark.parametrize("mode", ["none", "peak", "envelope", "current"])
def test_lr_reset_at_level_ups_in_the_trainer(tmp_path, mode):
    # tau = 0: level-ups after steps 1, 2, 3 (blocks 1 -> 4); warmup 1 step; 8 steps in all.
    summary = train(tiny_config(tmp_path, start_block=1, tau=0.0, epochs=2, warmup_epochs=0.25, lr_reset=mode))
    log = read_log(tmp_path)
    lrs = [r["lr"] for r in records(log, "step")]
    peak, T, r = summary["resolved"]["peak_lr"], 8, 0.001
    plain = _schedule(warmup_steps=1, total_steps=T, min_lr_ratio=r)
    env = [plain.factor(i) for i in range(T)]
    restarts = records(log, "lr_restart")
    if mode == "none":
        assert not restarts and lrs == pytest.approx([peak * f for f in env])
        return
    assert [(x["step"], x["from_step"], x["start"]) for x in restarts] == [(i, i, mode) for i in (1, 2, 3)]
    ref = _schedule(warmup_steps=1, total_steps=T, min_lr_ratio=r)
    expected = [ref.factor(0)]
    for i in range(1, T):
        ref.step()
        if i in (1, 2, 3):
            ref.restart(start=mode)
        expected.append(ref.factor(i))
    assert lrs == pytest.approx([peak * f for f in expected])
    assert [x["lr"] for x in restarts] == pytest.approx([peak * expected[i] for i in (1, 2, 3)])
    if mode == "peak":
        assert lrs[1:4] == pytest.approx([peak] * 3)
    else:  # both start at the schedule's value at the restart step; only "current" follows earlier restarts
        assert lrs[1] == pytest.approx(peak * env[1])
        assert (lrs[3] == pytest.approx(peak * env[3])) == (mode == "envelope")


def test_lr_reset_waits_for_the_end_of_warmup_and_is_checked(tmp_path):
    # Warmup 4 steps: the level-ups after steps 1-3 restart nothing.
    train(tiny_config(tmp_path, start_block=1, tau=0.0, warmup_epochs=1.0, lr_reset="peak"))
    assert not records(read_log(tmp_path), "lr_restart")
    with pytest.raises(ConfigError, match="--lr-reset: applies to --curriculum cka only"):
        TrainConfig(teacher="t", student="s", curriculum="off", lr_reset="peak").validate()
    with pytest.raises(ConfigError, match="--lr-reset: cannot be combined with --curriculum-sync per-rank"):
        TrainConfig(teacher="t", student="s", curriculum_sync="per-rank", lr_reset="envelope").validate()
    with pytest.raises(ConfigError, match="--lr-reset: invalid choice"):
        TrainConfig(teacher="t", student="s", lr_reset="sometimes").validate()
    TrainConfig(teacher="t", student="s", curriculum_sync="per-rank").validate()  # "none" is no reset
    assert CHOICES["lr_reset"] == LR_RESETS and RESTART_STARTS == LR_RESETS[1:]  # one set of names


# ----------------------------------------------------------------------------- 10: concat target


def _tiny_models():
    teacher = build_model("vit_small_patch14_dinov2", img_size=28, **TEACHER).eval()
    student = build_model("vit_small_patch14_dinov2", img_size=28, **STUDENT)
    return CountingTeacher(teacher, dtype=torch.float32), student


def test_concat_module_and_targets():
    teacher, student = _tiny_models()
    module = ConcatDistillModule(student, FeatureDistillationHead(32, 2 * 48), cls_weight=0.05)
    images = torch.randn(2, 3, 28, 28)
    before = teacher.blocks_run
    t_patch, t_cls = teacher_targets(teacher, module, images, 2)
    assert teacher.blocks_run - before == L  # one pass, to the last block
    k_patch, k_cls = teacher(images, 2)
    l_patch, l_cls = teacher(images, L)
    torch.testing.assert_close(t_patch, torch.cat([k_patch, l_patch], -1))
    torch.testing.assert_close(t_cls, torch.cat([k_cls, l_cls], -1))
    assert t_patch.shape == (2, 16, 96)

    loss, patch_loss, cls_loss, s_patch = module(images, t_patch, t_cls)
    s = student.forward_features(images).double()
    w, b = module.head.weight.double(), module.head.bias.double()

    def half_mses(x, t):  # the paper's MSE of each half through its half of the one head
        return [((x @ w[h].T + b[h] - t.double()[..., h]) ** 2).mean() for h in (slice(0, 48), slice(48, 96))]

    exp_patch = sum(half_mses(s[:, 1:], t_patch)) / 2
    exp_cls = sum(half_mses(s[:, 0], t_cls)) / 2
    torch.testing.assert_close(patch_loss.double(), exp_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_loss.double(), exp_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), exp_patch + 0.05 * exp_cls, rtol=1e-5, atol=1e-6)
    # The curriculum sees the block-k half only.
    torch.testing.assert_close(module.project(s_patch), module.head.project(s_patch)[..., :48])
    assert torch.equal(module.final_target(t_patch), k_patch)
    plain = DistillModule(student, FeatureDistillationHead(32, 48), cls_weight=0.05)
    assert torch.equal(plain.project(s_patch), plain.head.project(s_patch))


def test_concat_run_counts_the_full_teacher(tmp_path):
    summary = train(tiny_config(tmp_path, concat_teacher_last=True, start_block=1, tau=2.0, epochs=1))
    log = read_log(tmp_path)
    steps = records(log, "step")
    assert all(r["block"] == 1 and r["teacher_blocks_run"] == L for r in steps)
    assert all(0.0 <= r["cka"] <= 1.0 + 1e-6 for r in steps)  # the block-k half vs t_k
    assert summary["teacher_block_savings"] == 0.0
    (epoch,) = records(log, "epoch")
    assert epoch["teacher_flops"] == epoch["baseline_teacher_flops"] and epoch["saved_fraction"] == 0.0
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["head"]["weight"].shape == (2 * 48, 32) and ckpt["dims"]["target"] == "concat"
    cm = CostModel(*_tiny_models(), concat_teacher_last=True)
    assert epoch["step_flops"] == pytest.approx(16 * cm.step_flops(L))
    assert epoch["step_flops"] == epoch["baseline_step_flops"]  # the whole step, at full depth, both ways
    # A plain run cannot resume a concat checkpoint (its head is half as wide).
    with pytest.raises(Exception, match="target"):
        Trainer(tiny_config(tmp_path, start_block=1, tau=2.0, epochs=2, resume="auto"))
    with pytest.raises(ConfigError, match="--concat-teacher-last: applies to --curriculum cka only"):
        TrainConfig(teacher="t", student="s", curriculum="off", concat_teacher_last=True).validate()


def test_cost_model_of_the_concat_target(tmp_path, capsys):
    teacher, student = _tiny_models()
    plain, concat = CostModel(teacher, student), CostModel(teacher, student, concat_teacher_last=True)
    T = plain.tokens_per_image
    assert concat.head_forward_macs == head_macs(32, 96, T + 1) == 2 * plain.head_forward_macs
    assert concat.cka_macs == plain.cka_macs  # measured on the block-k half
    for k in (1, 2.5, L):
        assert concat.teacher_macs(k) == plain.teacher_macs(L)
    assert concat.step_macs(1) == plain.step_macs(L) + 3 * (concat.head_forward_macs - plain.head_forward_macs)
    result = savings([1, 2, 3, 4], cost_model=concat)
    assert result["teacher_only_saving"] == result["teacher_saving"] == 0.0 and result["total_saving"] == 0.0
    assert savings([1, 2, 3, 4], cost_model=plain)["teacher_only_saving"] == pytest.approx(1 - 2.5 / 4)

    # `leap flops --concat-teacher-last` and `leap report` of a concat run say the same.
    traj = tmp_path / "blocks.txt"
    traj.write_text("1 2 3 4\n")
    argv = ["flops", *as_argv(**tiny_models())]
    assert main([*argv, "--trajectory", str(traj), "--json", "--concat-teacher-last"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["savings"]["teacher_only_saving"] == 0.0
    assert out["costs_macs"]["head_forward_macs"] == concat.head_forward_macs
    assert main([*argv, "--trajectory", str(traj), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["savings"]["teacher_only_saving"] == pytest.approx(0.375)

    run = tmp_path / "run"
    train(tiny_config(run, concat_teacher_last=True, start_block=1, tau=2.0))
    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "the teacher ran to the last block at every step" in report and "saved **0.0%**" in report
    assert "teacher-only saving" not in report
