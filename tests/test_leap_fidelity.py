"""Fidelity to the LEAP reference code: the baseline's CKA, the reference precision and the
paper's ablation variants (cosine metric, snap-to-last with its lr restart, head reset on
level-up, the one-to-one baseline), each on tiny CPU models.

The ViT-T student is in tests/test_leap_models.py, the per-source position-embedding rules in
tests/test_leap_fidelity_pos_embed.py, the DDP curriculum modes in tests/test_leap_fidelity_ddp.py.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_leap_train import read_log, records, tiny_config

from leap.cka import linear_cka, mean_token_cosine, similarity_fn
from leap.config import TrainConfig
from leap.errors import ConfigError
from leap.models import build_model
from leap.objective import OneToOneDistillModule, one_to_one_pairs, teacher_targets
from leap.optim import WarmupCosine
from leap.precision import resolve_teacher_dtype, teacher_autocast
from leap.run.loop import Trainer, train
from leap.teacher import TruncatedTeacher
from leap_kernels import FeatureDistillationHead

# ----------------------------------------------------------------- defect 3: baseline CKA


def test_baseline_computes_no_cka_unless_asked(tmp_path):
    base = train(tiny_config(tmp_path / "base", curriculum="off"))
    log = read_log(tmp_path / "base")
    assert base["cka_computed"] is False and base["resolved"]["cka_every"] is None
    assert not any("cka" in r for r in records(log, "step"))

    asked = train(tiny_config(tmp_path / "asked", curriculum="off", cka_every=2))
    steps = records(read_log(tmp_path / "asked"), "step")
    assert asked["cka_computed"] is True
    assert [("cka" in r) for r in steps] == [False, True, False, True]
    # The cost model counts the CKA only when it runs (the baseline's saving is not flattered).
    assert asked["flops"]["step_flops"] > base["flops"]["step_flops"]
    assert asked["flops"]["teacher_flops"] == base["flops"]["teacher_flops"]

    leap = train(tiny_config(tmp_path / "leap", start_block=2))
    assert leap["cka_computed"] is True and all("cka" in r for r in records(read_log(tmp_path / "leap"), "step"))


# ----------------------------------------------------------------- 7a: cosine metric


def test_mean_token_cosine_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 197, 100, generator=g), torch.randn(3, 197, 100, generator=g)
    y[0] = 2 * x[0] + 0.1 * y[0]
    ref = F.cosine_similarity(x.double(), y.double(), dim=-1).mean()
    got = mean_token_cosine(x, y)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(got, linear_cka(x, y))  # a different statistic
    assert math.isnan(mean_token_cosine(torch.full_like(x, float("nan")), y).item())
    with pytest.raises(ValueError, match="same shape"):
        mean_token_cosine(x, y[..., :50])
    # The curriculum's wrapper runs with autocast off: same value inside a bf16 autocast region.
    score, cka = similarity_fn("cosine"), linear_cka(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(score(x, y), got)
        assert torch.equal(similarity_fn("cka")(x, y), cka)
        assert not torch.equal(linear_cka(x, y), cka)  # what autocast would have done to it


def test_cosine_metric_drives_the_curriculum(tmp_path):
    # cosine_tau = -1: any cosine passes, so the target climbs one block per step; tau (CKA) = 2
    # would never pass: the level-ups can only come from the cosine threshold.
    cfg = tiny_config(tmp_path, curriculum_metric="cosine", cosine_tau=-1.0, tau=2.0, start_block=1)
    trainer = Trainer(cfg)
    assert trainer.score_fn.metric is mean_token_cosine and trainer.curriculum.tau == -1.0
    summary = trainer.fit()
    assert [u["to_block"] for u in summary["level_ups"]] == [2, 3, 4]
    assert all(-1.0 <= r["cka"] <= 1.0 for r in records(read_log(tmp_path), "step"))
    assert TrainConfig(teacher="t", student="s").resolved_threshold == 0.85
    assert TrainConfig(teacher="t", student="s", curriculum_metric="cosine").resolved_threshold == 0.6


# ----------------------------------------------------------------- 7b: snap-to-last + lr restart


def test_warmup_cosine_restart_is_a_cosine_from_the_peak_without_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=20, min_lr_ratio=0.01)
    for _ in range(2):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 3 / 4)  # still warming up
    sched.restart()
    lrs = []
    for _ in range(18):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    expected = [2.0 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * i / 18))) for i in range(18)]
    assert lrs == pytest.approx(expected)
    state = sched.state_dict()
    again = WarmupCosine(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), warmup_steps=4, total_steps=20, min_lr_ratio=0.01
    )
    again.load_state_dict(state)
    assert again.restart_step == 2 and again.get_last_lr() == sched.get_last_lr()


def test_snap_to_last_jumps_and_restarts_the_lr(tmp_path):
    # 4 steps, warmup 2 epochs (never finished): without the restart every lr is a warmup lr.
    cfg = tiny_config(tmp_path, start_block=1, snap_to_last=2, tau=0.0, warmup_epochs=2.0)
    summary = train(cfg)
    log = read_log(tmp_path)
    steps = records(log, "step")
    assert [r["block"] for r in steps] == [1, 4, 4, 4]
    assert [(u["from_block"], u["to_block"], u["reason"]) for u in summary["level_ups"]] == [
        (1, 2, "cka"),
        (2, 4, "snap"),
    ]
    assert [r["step"] for r in records(log, "lr_restart")] == [1]
    peak = summary["resolved"]["peak_lr"]
    total = summary["resolved"]["total_steps"]
    assert steps[0]["lr"] == pytest.approx(peak / 8)  # warmup step 1 of 8
    r = cfg.min_lr_ratio
    expected = [peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * i / (total - 1)))) for i in range(3)]
    assert [s["lr"] for s in steps[1:]] == pytest.approx(expected)


# ----------------------------------------------------------------- 7c: head reset on level-up


def test_reset_head_on_level_up(tmp_path):
    cfg = tiny_config(tmp_path, start_block=1, tau=0.0, reset_head_on_level_up=True, optimizer="adamw")
    trainer = Trainer(cfg)
    try:
        images, _ = next(iter(trainer.loader))
        result = trainer.train_step(images)
        assert [(u.from_block, u.to_block) for u in result.level_ups] == [(1, 2)]
        head = trainer.module.head
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + 1 * 7919 + 1) % 2**63)
        expected = torch.nn.init.trunc_normal_(torch.empty(head.weight.shape), std=0.02, generator=gen)
        torch.testing.assert_close(head.weight.detach(), expected, rtol=0, atol=0)
        assert torch.count_nonzero(head.bias) == 0
        assert head.weight not in trainer.optimizer.state and head.bias not in trainer.optimizer.state
        student = next(trainer.module.student.parameters())
        assert student in trainer.optimizer.state  # the student keeps its optimizer state
    finally:
        trainer.close()

    plain = Trainer(tiny_config(tmp_path / "plain", start_block=1, tau=0.0, optimizer="adamw"))
    try:
        plain.train_step(images)
        assert plain.module.head.weight in plain.optimizer.state
        assert not torch.equal(plain.module.head.weight, trainer.module.head.weight)
    finally:
        plain.close()


# ----------------------------------------------------------------- 7d: one-to-one baseline


def test_one_to_one_pairs():
    assert one_to_one_pairs(12, 40) == [(i + 1, round((i + 1) * 40 / 12)) for i in range(12)]
    assert one_to_one_pairs(12, 40)[:3] == [(1, 3), (2, 7), (3, 10)] and one_to_one_pairs(12, 40)[-1] == (12, 40)
    assert one_to_one_pairs(2, 4) == [(1, 2), (2, 4)]
    assert one_to_one_pairs(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # round half to even: 0.5 -> 0 -> 1
    with pytest.raises(ValueError):
        one_to_one_pairs(0, 4)


def test_one_to_one_module_loss_by_hand():
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7)
    teacher = TruncatedTeacher(
        build_model("vit_small_patch14_dinov2", depth=4, embed_dim=48, num_heads=3, **kw), dtype=torch.float32
    )
    student = build_model("vit_small_patch14_dinov2", depth=2, embed_dim=32, num_heads=2, **kw)
    module = OneToOneDistillModule(student, FeatureDistillationHead(32, 48), 0.05, teacher_blocks=4)
    assert module.teacher_blocks == [2, 4] and len(module.heads()) == 2
    x = torch.randn(2, 3, 28, 28)
    t_patch, t_cls = teacher_targets(teacher, module, x, k=1)  # k is ignored: every paired block
    assert t_patch.shape == (2, 2, 16, 48) and t_cls.shape == (2, 2, 48)
    torch.testing.assert_close(t_patch[0], teacher(x, 2)[0])
    loss, patch_loss, cls_loss, s_patch = module(x, t_patch, t_cls)

    h = student.norm_pre(student.patch_drop(student._pos_embed(student.patch_embed(x))))
    patch_terms, cls_terms = [], []
    for p, (block, head) in enumerate(zip(student.blocks, module.heads())):
        h = block(h)
        y = student.norm(h)
        patch_terms.append(F.mse_loss(F.linear(y[:, 1:], head.weight, head.bias), t_patch[p]))
        cls_terms.append(F.mse_loss(F.linear(y[:, 0], head.weight, head.bias), t_cls[p]))
    ref_patch, ref_cls = sum(patch_terms) / 2, sum(cls_terms) / 2
    torch.testing.assert_close(patch_loss, ref_patch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cls_loss, ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_patch + 0.05 * ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_patch, student.forward_features(x)[:, 1:])
    assert module.final_target(t_patch) is t_patch[-1] or torch.equal(module.final_target(t_patch), t_patch[-1])
    loss.backward()
    assert all(hd.weight.grad is not None and hd.weight.grad.abs().sum() > 0 for hd in module.heads())


def test_one_to_one_training_run(tmp_path):
    summary = train(tiny_config(tmp_path, curriculum="one-to-one", epochs=4, max_steps=8))
    assert summary["mode"] == "one-to-one" and summary["cka_computed"] is False
    steps = records(read_log(tmp_path), "step")
    assert len(steps) == 8 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["teacher_blocks_run"] == 4 for r in steps)  # the teacher runs to its last paired block
    assert summary["level_ups"] == [] and summary["final_block"] == 4
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ckpt["block_heads"]) == {"0.weight", "0.bias"}  # the other block's projector is saved

    # ... and restored: the rest of the run from the checkpoint matches an uninterrupted run.
    resumed = train(tiny_config(tmp_path, curriculum="one-to-one", epochs=4, resume="auto"))
    full = train(tiny_config(tmp_path / "full", curriculum="one-to-one", epochs=4))
    assert resumed["final_loss"] == full["final_loss"]


# ----------------------------------------------------------------- 6: reference precision


def test_teacher_dtype_resolution():
    assert resolve_teacher_dtype("auto", "fp16") == torch.float32  # the reference: fp32 teacher, fp16 autocast
    assert resolve_teacher_dtype("auto", "bf16") == torch.bfloat16
    assert resolve_teacher_dtype("auto", "fp32") == torch.float32
    assert resolve_teacher_dtype("fp16", "bf16") == torch.float16
    with pytest.raises(ValueError, match="teacher-dtype"):
        resolve_teacher_dtype("int8", "fp32")
    with pytest.raises(ConfigError, match="teacher-dtype"):
        TrainConfig(teacher="t", student="s", teacher_dtype="fp64").validate()


def test_fp32_teacher_runs_under_the_step_autocast():
    torch.manual_seed(0)
    model = build_model("vit_small_patch14_dinov2", img_size=28, patch_size=7, depth=2, embed_dim=48, num_heads=3)
    teacher = TruncatedTeacher(model, dtype=torch.float32)
    x = torch.randn(2, 3, 28, 28)
    plain = teacher(x, 2)[0]
    with teacher_autocast(torch.device("cpu"), torch.bfloat16, teacher.dtype):
        mixed = teacher(x, 2)[0]
    assert next(teacher.parameters()).dtype == torch.float32
    assert not torch.equal(plain, mixed)  # matmuls ran in bf16
    torch.testing.assert_close(mixed.float(), plain, rtol=0.1, atol=0.1)
    with teacher_autocast(torch.device("cpu"), None, teacher.dtype):  # fp32 run: no autocast
        assert torch.equal(teacher(x, 2)[0], plain)


def test_bf16_run_with_fp32_teacher(tmp_path):
    summary = train(tiny_config(tmp_path, precision="bf16", teacher_dtype="fp32", start_block=2))
    assert summary["resolved"]["teacher_dtype"] == "float32" and summary["resolved"]["tf32"] is False
    assert math.isfinite(summary["final_loss"])


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="fp16"):
        Trainer(tiny_config(tmp_path, precision="fp16"))


# ----------------------------------------------------------------- options


def test_new_options_in_help_and_validated():
    out = subprocess.run(
        [sys.executable, "-m", "leap", "distill", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--teacher-pos-embed",
        "--teacher-dtype",
        "--curriculum-metric",
        "--curriculum-sync",
        "--cosine-tau",
        "--cka-every",
        "--snap-to-last",
        "--reset-head-on-level-up",
        "one-to-one",
    ):
        assert flag in out, flag
    with pytest.raises(ConfigError, match="snap-to-last"):
        TrainConfig(teacher="t", student="s", curriculum_sync="per-rank", snap_to_last=3).validate()
    with pytest.raises(ConfigError, match="curriculum-sync"):
        TrainConfig(teacher="t", student="s", curriculum_sync="median").validate()


# ----------------------------------------------------------------- 5: sync modes (single-process logic)


def test_rank_sync_inputs_and_outputs():
    from leap.curriculum import Curriculum, RankSync

    single = RankSync("per-rank", 0, 1)
    assert single.inputs(torch.tensor(0.5), 3, torch.device("cpu")) == []
    assert single.outputs(0.5, []) == (0.5, {})

    per = RankSync("per-rank", 1, 2)
    assert [float(t) for t in per.inputs(torch.tensor(0.5), 3, torch.device("cpu"))] == [0.5, 3.0]
    assert [float(t) for t in per.inputs(None, 3, torch.device("cpu"))] == [3.0]
    score, extra = per.outputs(0.45, [[0.4, 0.5], [2.0, 3.0]])
    assert score == 0.5 and extra == {"cka_per_rank": [0.4, 0.5], "blocks_per_rank": [2, 3]}
    assert per.outputs(None, [[2.0, 3.0]]) == (None, {"blocks_per_rank": [2, 3]})

    mean = RankSync("mean", 1, 2)
    assert len(mean.inputs(torch.tensor(0.5), 3, torch.device("cpu"))) == 1
    score, extra = mean.outputs(0.45, [[0.4, 0.5]])
    assert score == 0.45 and extra["cka_per_rank"] == [0.4, 0.5] and extra["cka_spread"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="sync"):
        RankSync("median", 0, 2)
    with pytest.raises(ValueError, match="sync"):
        Curriculum(4, sync="median")
    assert Curriculum(4, sync="per-rank").state_dict()["config"]["sync"] == "per-rank"
