"""Tests for leap.cost (analytic FLOPs vs FlopCounterMode, cost model, savings), leap.run.timing and
`leap flops` (leap.cli.flops)."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.utils.flop_counter
from torch import nn

from leap import cost as C
from leap.cka import linear_cka
from leap.cli import main as leap_main
from leap.cli.flops import main as main_flops
from leap.models import build_model
from leap.run import timing
from leap.runlog import load_trajectory

GIANT = "vit_giant_patch14_reg4_dinov2"
SMALL = "vit_small_patch14_dinov2"
TINY = "vit_tiny_patch14_dinov2"

# Tiny random models covering the layouts we need (all at 56 px -> 4x4 patches).
TINY_MODELS = {
    "vit-mlp": (SMALL, dict(depth=2, embed_dim=32, num_heads=2)),
    # the giant's layout: 4 registers, packed SwiGLU (GluMlp, fc1 = D -> 2H), LayerScale
    "dinov2-reg4-swiglu-packed": (GIANT, dict(depth=2, embed_dim=48, num_heads=3)),
    # timm's unpacked SwiGLU (fc1_g, fc1_x)
    "swiglu-unpacked": (
        SMALL,
        dict(depth=2, embed_dim=48, num_heads=3, mlp_layer=timm.layers.SwiGLU, act_layer=nn.SiLU),
    ),
    "vit-tiny-dinov2": (TINY, dict(depth=3)),
}


def counted_flops(
    model: nn.Module, x: torch.Tensor | None = None, *, backward: bool = False, blocks: int | None = None
) -> int:
    """FLOPs of a real forward (and backward) as counted by ``FlopCounterMode``, per batch.

    Runs ``patch_embed -> _pos_embed -> blocks[:blocks] -> norm`` (``forward_features`` when
    ``blocks`` is None). Fused attention (``F.scaled_dot_product_attention``) is switched off
    for the call -- the CPU SDPA kernel is not in FlopCounterMode's registry, so fused
    attention would be silently uncounted -- which makes the count the same on every device.
    ``x`` defaults to one random image at the model's size. Meant for checks on small models.
    """
    from torch.utils.flop_counter import FlopCounterMode

    vit = C.unwrap_vit(model)
    if x is None:
        p = next(vit.parameters())
        h, w = C.pair(vit.patch_embed.img_size)
        x = torch.randn(1, 3, h, w, device=p.device, dtype=p.dtype)
    saved = [(m, m.fused_attn) for m in vit.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            if blocks is None:
                out = vit.forward_features(x)
            else:
                h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
                for blk in list(vit.blocks)[:blocks]:
                    h = blk(h)
                out = vit.norm(h)
            if backward:
                out.float().square().mean().backward()
        return int(counter.get_total_flops())
    finally:
        for m, v in saved:
            m.fused_attn = v


def tiny(key: str, img_size: int = 56) -> nn.Module:
    name, kw = TINY_MODELS[key]
    return build_model(name, img_size=img_size, **kw)


def meta(name: str, img_size: int = 224, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, img_size=img_size, **kw)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------------------
# Analytic counts vs FlopCounterMode on real modules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_forward_flops_match_flop_counter(key):
    m = tiny(key)
    x = torch.randn(2, 3, 56, 56)
    counted = counted_flops(m, x) / 2  # per image
    assert rel(2 * C.vit_cost(m).forward_macs(), counted) < 0.02
    # truncated forward (the teacher's early exit) and one block
    c1 = counted_flops(m, x, blocks=1) / 2
    assert rel(2 * C.vit_cost(m).forward_macs(1), c1) < 0.02
    depth = len(m.blocks)
    assert rel(2 * C.vit_cost(m).block_macs[0], (counted - c1) / (depth - 1)) < 0.02
    # patch embed alone
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        m.patch_embed(x)
    assert rel(2 * C.vit_cost(m).patch_embed_macs, fc.get_total_flops() / 2) < 0.02


def test_vit_cost_reads_config():
    c = C.vit_cost(tiny("dinov2-reg4-swiglu-packed"))
    assert (c.num_prefix_tokens, c.num_patches, c.tokens) == (5, 16, 21)
    assert c.mlp_kind == "glu-packed" and c.mlp_hidden == int(48 * 2.66667 * 2) // 2
    assert c.block_breakdown["attn_scores"] == c.block_breakdown["attn_values"] == 21 * 21 * 48
    u = C.vit_cost(tiny("swiglu-unpacked"))
    assert u.mlp_kind == "glu" and u.num_prefix_tokens == 1
    p = C.vit_cost(tiny("vit-mlp"))
    assert p.mlp_kind == "mlp" and p.mlp_hidden == 4 * 32
    # explicit block formula for the plain MLP model: N = 17, D = 32, H = 128
    n, d, h = 17, 32, 128
    assert C.vit_cost(tiny("vit-mlp")).block_macs[0] == n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * h


def test_counted_flops_restores_fused_attention():
    m = tiny("vit-mlp")
    flags = [blk.attn.fused_attn for blk in m.blocks]
    counted_flops(m)
    assert [blk.attn.fused_attn for blk in m.blocks] == flags


def test_student_step_is_three_forwards():
    # fwd+bwd = 3x forward, except that the image needs no gradient (patch-embed input grad)
    m = tiny("vit-mlp")
    x = torch.randn(2, 3, 56, 56)
    counted = counted_flops(m, x, backward=True) / 2
    assert counted == pytest.approx(2 * (3 * C.vit_cost(m).forward_macs() - C.vit_cost(m).patch_embed_macs), rel=1e-9)
    # the real ViT-T at 224 px (meta device: FlopCounterMode only needs shapes): 3x is within 2%
    t = meta(TINY)
    counted = counted_flops(t, torch.empty(1, 3, 224, 224, device="meta"), backward=True)
    assert rel(6 * C.vit_cost(t).forward_macs(), counted) < 0.02


@pytest.mark.parametrize("name", [GIANT, SMALL])
def test_paper_models_match_flop_counter_on_meta(name):
    m = meta(name)
    x = torch.empty(1, 3, 224, 224, device="meta")
    assert rel(2 * C.vit_cost(m).forward_macs(), counted_flops(m, x)) < 0.02
    assert rel(2 * C.vit_cost(m).forward_macs(3), counted_flops(m, x, blocks=3)) < 0.02


def test_head_and_cka_flops_match_flop_counter():
    head = nn.Linear(24, 40)
    s = torch.randn(3, 17, 24)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        head(s)
    assert 2 * C.head_macs(24, 40, 3 * 17) == fc.get_total_flops()
    n, d = 1024, 64
    x, y = torch.randn(n, d), torch.randn(n, d)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as fc:
        linear_cka(x, y)
    # counted: the three Gram products; ours adds centering + norms (< 2%)
    assert fc.get_total_flops() == 2 * 3 * n * d * d
    assert rel(2 * C.cka_macs(n, d), fc.get_total_flops()) < 0.02
    assert C.cka_macs(n, d) == 3 * n * d * d + 2 * n * d + 3 * d * d


# --------------------------------------------------------------------------------------
# The paper's models, on the meta device
# --------------------------------------------------------------------------------------


def test_paper_per_image_costs_and_savings():
    g, s, t = meta(GIANT), meta(SMALL), meta(TINY)
    assert all(p.device.type == "meta" for p in g.parameters())
    gc = C.vit_cost(g)
    assert (gc.depth, gc.embed_dim, gc.tokens, gc.mlp_hidden, gc.mlp_kind) == (40, 1536, 261, 4096, "glu-packed")
    assert rel(C.vit_cost(g).block_macs[0], 7.6e9) < 0.05
    assert rel(C.vit_cost(g).forward_macs(), 304e9) < 0.05
    assert rel(C.vit_cost(s).forward_macs(), 6.1e9) < 0.05
    assert rel(C.vit_cost(t).forward_macs(), 1.7e9) < 0.05
    assert rel(C.cka_macs(256, 1536), 1.8e9) < 0.05

    # mean target block 30 of 40 (e.g. the paper's ViT-S run)
    traj = [24] * 20 + [30] * 40 + [36] * 20 + [30] * 20
    res = C.savings(traj, g, s)
    assert res["mean_block"] == 30 and res["num_blocks"] == 40
    assert res["teacher_only_saving"] == pytest.approx(0.25, abs=1e-12)
    assert res["teacher_saving"] == pytest.approx(0.25, abs=1e-3)  # embed is 0.08% of the teacher
    assert res["total_saving"] == pytest.approx(0.234, abs=0.002)
    assert res["total_saving"] < res["teacher_saving"]
    # names work too (built on the meta device)
    cm = C.CostModel(GIANT, SMALL)
    assert C.savings(traj, cost_model=cm)["total_saving"] == pytest.approx(res["total_saving"])


# --------------------------------------------------------------------------------------
# Cost model and savings on hand-made numbers
# --------------------------------------------------------------------------------------


def hand_costs():
    """A 4-block teacher (width 3) and a 2-block student (width 2), 2x2 patches."""
    common = dict(
        patch_size=(1, 1),
        img_size=(2, 2),
        grid=(2, 2),
        num_prefix_tokens=1,
        num_patches=4,
        tokens=5,
        mlp_hidden=0,
        mlp_kind="mlp",
        num_heads=1,
    )
    teacher = C.ViTCost(depth=4, embed_dim=3, patch_embed_macs=10, block_macs=(100,) * 4, **common)
    student = C.ViTCost(depth=2, embed_dim=2, patch_embed_macs=10, block_macs=(20, 20), **common)
    return teacher, student


def test_cost_model_components_by_hand():
    cm = C.CostModel(*hand_costs())
    assert (cm.d_t, cm.d_s, cm.tokens_per_image, cm.num_blocks) == (3, 2, 4, 4)
    assert cm.head_forward_macs == 5 * 2 * 3  # T + 1 = 5 tokens (patches + CLS)
    assert cm.student_step_macs == 3 * (50 + 30)
    # CKA on 4 tokens at width 3: 4*27 + centering 4*6 + norms 27, + re-projection 4*2*3
    assert cm.cka_macs == 4 * 27 + 4 * 6 + 27 + 24 == 183
    assert cm.step_macs(2) == 10 + 200 + 240 + 183
    assert cm.step_flops(2) == 2 * cm.step_macs(2)
    assert C.CostModel(*hand_costs(), include_cka=False).cka_macs == 0


def test_savings_hand_made_trajectory():
    cm = C.CostModel(*hand_costs())
    traj = [1, 2, 2, 3, 4, 4, 4, 4]  # per epoch; mean 3
    res = C.savings(traj, cost_model=cm)
    # C(k) = 10 + 100 k + 240 + 183 = 433 + 100 k ; teacher T(k) = 10 + 100 k
    assert res["mean_block"] == 3
    assert res["teacher_only_saving"] == pytest.approx(1 - 3 / 4)
    assert res["teacher_saving"] == pytest.approx(1 - 310 / 410)
    assert res["total_saving"] == pytest.approx(1 - 733 / 833)
    assert res["teacher_flops"] == 2 * 310 and res["baseline_step_flops"] == 2 * 833
    # weights (e.g. steps per epoch): mean = (1*3 + 4*1) / 4 = 1.75
    w = C.savings([1, 4], cost_model=cm, weights=[3, 1])
    assert w["mean_block"] == pytest.approx(1.75)
    assert w["total_saving"] == pytest.approx(1 - (433 + 175) / 833)
    with pytest.raises(ValueError, match="outside"):
        C.savings([5], cost_model=cm)
    with pytest.raises(ValueError, match="empty"):
        C.savings([], cost_model=cm)


def test_teacher_flops_tracker():
    cm = C.CostModel(*hand_costs())
    tr = C.TeacherFlopsTracker(cm)
    tr.add_step(1, 8)
    tr.add_step(3, 8)
    e = tr.epoch_summary()
    assert e["teacher_flops"] == 8 * 2 * (110 + 310)
    assert e["baseline_teacher_flops"] == 8 * 2 * 2 * 410
    assert e["saved_fraction"] == pytest.approx(1 - 420 / 820)
    assert e["total_saved_fraction"] == pytest.approx(1 - (533 + 733) / (2 * 833))
    assert (e["steps"], e["images"]) == (2, 16)
    tr.add_step(4, 8)
    e2 = tr.epoch_summary()
    assert e2["saved_fraction"] == 0.0 and e2["steps"] == 1
    assert e2["cumulative_teacher_flops"] == 8 * 2 * (110 + 310 + 410)
    assert e2["cumulative_saved_fraction"] == pytest.approx(1 - 830 / 1230)
    assert tr.totals()["steps"] == 3
    # state round trip
    tr2 = C.TeacherFlopsTracker(cm)
    tr2.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    assert tr2.totals() == tr.totals()


# --------------------------------------------------------------------------------------
# Trajectory files
# --------------------------------------------------------------------------------------


def test_load_trajectory_formats(tmp_path):
    (tmp_path / "t.txt").write_text("# blocks per epoch\n2, 12 12\n\n24,30 # tail\n")
    assert load_trajectory(tmp_path / "t.txt").blocks == [2, 12, 12, 24, 30]
    (tmp_path / "t.json").write_text("[1, 2, 3]")
    assert load_trajectory(tmp_path / "t.json").blocks == [1, 2, 3]
    (tmp_path / "d.json").write_text('{"blocks": [4, 5]}')
    assert load_trajectory(tmp_path / "d.json").blocks == [4, 5]

    run = tmp_path / "run"
    run.mkdir()
    recs = [
        {"type": "config", "config": {"teacher": "x"}},
        {"type": "step", "step": 1, "epoch": 0, "block": 2},
        {"type": "epoch", "epoch": 0, "block": 3, "mean_block": 2.5, "steps": 10},
        {"type": "level_up", "step": 5},
        {"type": "epoch", "epoch": 1, "block": 4, "steps": 30},
    ]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{half a line")
    tr = load_trajectory(run)
    assert tr.blocks == [2.5, 4] and tr.weights == [10, 30]
    assert tr.mean() == pytest.approx((25 + 120) / 40)
    steps_only = tmp_path / "steps.jsonl"
    steps_only.write_text(
        "\n".join(json.dumps({"type": "step", "step": i, "block": b}) for i, b in enumerate([1, 1, 2]))
    )
    assert load_trajectory(steps_only).blocks == [1, 1, 2]


def test_load_trajectory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_trajectory(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        load_trajectory(tmp_path)
    (tmp_path / "bad.txt").write_text("1, 2, x3")
    with pytest.raises(ValueError, match=r"bad.txt, line 1: 'x3'"):
        load_trajectory(tmp_path / "bad.txt")
    (tmp_path / "obj.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="blocks"):
        load_trajectory(tmp_path / "obj.json")


# --------------------------------------------------------------------------------------
# Step times
# --------------------------------------------------------------------------------------


def test_wall_clock_savings_interpolates():
    times = {10: 1.0, 20: 1.5, 40: 2.5}
    res = timing.wall_clock_savings([10, 20, 30, 40], times)
    assert res["num_blocks"] == 40 and res["interpolated"] == [30.0]
    assert res["mean_step_time_s"] == pytest.approx((1.0 + 1.5 + 2.0 + 2.5) / 4)
    assert res["saving"] == pytest.approx(1 - 1.75 / 2.5)
    # extrapolation below the first point follows the least-squares line (exactly linear here)
    assert timing.wall_clock_savings([0], times, 40)["mean_step_time_s"] == pytest.approx(0.5)


def test_measure_step_times_cpu(monkeypatch):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")  # no Triton interpreter: fast
    teacher = build_model(GIANT, img_size=28, depth=3, embed_dim=48, num_heads=3)
    student = tiny("vit-mlp", img_size=28)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    times = timing.measure_step_times(teacher, student, [3, 1, 1], batch_size=2, device="cpu", warmup=1, repeats=2)
    assert sorted(times) == [1, 3] and all(v > 0 for v in times.values())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # original untouched
    res = timing.wall_clock_savings([1, 3], times)
    assert res["baseline_step_time_s"] == times[3]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def test_cli_paper_case(tmp_path, capsys):
    traj = tmp_path / "traj.txt"
    traj.write_text(" ".join(["30"] * 10))
    assert main_flops(["--teacher", GIANT, "--student", SMALL, "--trajectory", str(traj)]) == 0
    out = capsys.readouterr().out
    assert "teacher block (one)" in out and "7.599" in out
    assert "25.00%" in out and "23.38%" in out

    assert main_flops(["--teacher", GIANT, "--student", SMALL, "--trajectory", str(traj), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["savings"]["teacher_only_saving"] == 0.25
    assert res["costs_macs"]["teacher_block_macs"] == C.vit_cost(meta(GIANT)).block_macs[0]


def test_cli_errors(tmp_path, capsys):
    # Bad input: one line on stderr, exit status 2, no traceback.
    for argv, expect in [
        (["--trajectory", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--teacher-overrides", "{depth: 2}"], "--teacher-overrides"),
        (["--teacher", "vit_nonexistent"], "vit_nonexistent"),
    ]:
        full = ["flops", "--teacher", GIANT, "--student", SMALL, *argv]
        assert leap_main(full) == 2, argv
        err = capsys.readouterr().err
        assert expect in err and "leap" in err and "Traceback" not in err, err


def test_cli_measure_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")
    traj = tmp_path / "traj.json"
    traj.write_text("[1, 2, 2]")
    argv = [
        "--teacher",
        GIANT,
        "--student",
        SMALL,
        "--img-size",
        "28",
        "--trajectory",
        str(traj),
        "--teacher-overrides",
        '{"depth": 2, "embed_dim": 48, "num_heads": 3}',
        "--student-overrides",
        '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
        "--measure",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--repeats",
        "1",
    ]
    assert main_flops(argv) == 0
    out = capsys.readouterr().out
    assert "k =   1" in out and "k =   2" in out and "wall-clock saving" in out
    assert math.isfinite(float(out.split("wall-clock saving")[1].split(":")[1].strip().rstrip("%")))


def test_docs_quote_the_cost_model_numbers():
    """docs/trainer.md's per-image numbers are the ones `leap flops` prints (one formula, CostModel)."""
    import pathlib
    import re

    text = " ".join((pathlib.Path(__file__).resolve().parents[1] / "docs" / "trainer.md").read_text().split())
    cm = C.CostModel(GIANT, "vit_small_patch14_dinov2", img_size=224)
    tiny = C.CostModel(GIANT, "vit_tiny_patch14_dinov2", img_size=224)
    quoted = {
        "CKA per step": cm.cka_macs,
        "ViT-T": tiny.student_forward_macs,
        "ViT-S forward": cm.student_forward_macs,
        "full ViT-g": cm.teacher_macs(cm.num_blocks),
    }
    for label, macs in quoted.items():
        m = re.search(re.escape(label) + r" ([\d.]+) GMACs", text)
        assert m, f"docs/trainer.md quotes no '{label} ... GMACs'"
        decimals = len(m.group(1).partition(".")[2])  # compare at the precision quoted
        assert float(m.group(1)) == round(macs / 1e9, decimals), (label, m.group(1), macs / 1e9)
