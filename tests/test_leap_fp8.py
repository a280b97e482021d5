"""FP8 teacher linears (leap_kernels/ops/fp8_linear.py) and ``--teacher-precision fp8``.

On CPU every layer runs the emulated path; the tests check it against float64 references of the
same quantization, the quantization itself against an e4m3 rounding written out in float64, and
(where this torch build has a CPU ``torch._scaled_mm``) the real kernel's calling convention.
The ``gpu`` test compares ``torch._scaled_mm`` on the GPU with the emulated path.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from test_leap_train import read_log, records, tiny_config
from tolerances import relative_error
from torch import nn

from leap.cka import linear_cka_reference
from leap.cli import build_parser, main
from leap.cli.distill import config_from_args
from leap.config import CHOICES, TrainConfig
from leap.errors import ConfigError
from leap.models import build_model
from leap.precision import TEACHER_PRECISIONS
from leap.run.loop import Trainer
from leap.teacher import TruncatedTeacher
from leap_kernels.ops.fp8_linear import (
    E4M3_MAX,
    Fp8Linear,
    _probe_scaled_mm,
    convert_teacher_linears,
    dequantize_rows,
    describe_paths,
    emulation_warning,
    fp8_linear_reference,
    fp8_linears,
    quantize_rows,
    row_scales,
    shape_reasons,
    supported_reasons,
)

F8 = torch.float8_e4m3fn
# Round to nearest on 3 mantissa bits: relative error <= half an ulp = 2^-4 for normal values.
E4M3_REL = 2.0**-4
# Emulated path vs the float64 product of the same quantized operands: the bf16 output rounding
# (2^-9 per element) plus fp32 accumulation.
GEMM_REL = 2.0**-8


@pytest.fixture(autouse=True)
def _fast_cpu(monkeypatch, one_thread):
    monkeypatch.setenv("LEAP_KERNELS_BACKEND", "torch")


def rows_of_mixed_magnitude(m: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """``(m, k)`` normal values, row i scaled by 10^(-3 .. 3): per-row scales matter."""
    mag = 10.0 ** torch.linspace(-3, 3, m).unsqueeze(1)
    return (torch.randn(m, k) * mag).to(dtype)


def e4m3_round_reference(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round float64 ``v`` (already divided by its scale, |v| <= 448) to the nearest e4m3 value, ties
    to even. Returns ``(rounded, near_tie)``; ``near_tie`` marks values a float32 division could
    have put on the other side of a tie."""
    a = v.abs()
    e = torch.floor(torch.log2(a.clamp_min(2.0**-30))).clamp_min(-6)  # subnormals share 2^-6's step
    step = 2.0 ** (e - 3)
    units = a / step
    frac = units - torch.floor(units)
    rounded = (torch.round(units) * step).clamp_max(E4M3_MAX)
    return torch.where(a == 0, a, rounded) * v.sign(), (frac - 0.5).abs() < 1e-5


def make_linear(k: int, n: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(std=k**-0.5)
        if bias:
            lin.bias.normal_(std=0.5)
    return lin


# ---------------------------------------------------------------------- quantization helpers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [100, 192, 384])
def test_row_scales_match_float64(dtype, width):
    x = rows_of_mixed_magnitude(13, width, dtype)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    scale = row_scales(x.view(13, 1, width))
    assert scale.shape == (13, 1, 1) and scale.dtype == torch.float32
    expected = x.double().abs().amax(dim=-1) / E4M3_MAX
    assert torch.allclose(scale.double().view(13), expected, rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("width", [100, 192, 384])
def test_quantize_is_round_to_nearest_e4m3(width):
    x = rows_of_mixed_magnitude(197, width)
    q, scale = quantize_rows(x)
    assert q.dtype == F8 and q.shape == x.shape and scale.shape == (197, 1)
    expected, near_tie = e4m3_round_reference(x.double() / scale.double())
    mismatch = q.double() != expected
    assert not (mismatch & ~near_tie).any(), f"{int((mismatch & ~near_tie).sum())} values off the e4m3 grid"
    # Each row's largest magnitude lands on +-448 exactly: the full e4m3 range is used.
    top = x.abs().argmax(dim=1, keepdim=True)
    assert torch.equal(q.double().gather(1, top).abs(), torch.full((197, 1), E4M3_MAX, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(dtype):
    # |x - deq(q(x))| <= 2^-4 |x| (3 mantissa bits, round to nearest) + 2^-10 s (half the
    # smallest subnormal step, for |x| < 2^-6 s) + fp32 rounding of the division and product.
    x = rows_of_mixed_magnitude(261, 192).clamp(-6e4, 6e4).to(dtype)
    q, scale = quantize_rows(x)
    back = dequantize_rows(q, scale, torch.float64)
    x64, s64 = x.double(), scale.double()
    err = (back - x64).abs()
    bound = E4M3_REL * x64.abs() + 2.0**-10 * s64 + 2.0**-20 * x64.abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3e}"
    # The bound is tight: normal-range values do get errors near 2^-4 (an e4m3 grid, not a finer one).
    normal = x64.abs() >= 2.0**-6 * s64
    rel = (err / x64.abs())[normal]
    assert rel.max().item() > 0.9 * E4M3_REL
    assert dequantize_rows(q, scale, dtype).dtype == dtype


def test_per_row_scales_keep_small_rows():
    x = rows_of_mixed_magnitude(64, 100)
    q, scale = quantize_rows(x)
    back = dequantize_rows(q, scale, torch.float64)
    per_row = (back - x.double()).norm(dim=1) / x.double().norm(dim=1)
    assert per_row.max().item() < E4M3_REL
    # One scale for the whole tensor would flush the 1e-3 rows to zero: what per-row scaling avoids.
    q_t, s_t = quantize_rows(x.reshape(1, -1))
    flat = dequantize_rows(q_t, s_t, torch.float64).reshape(64, 100)
    assert ((flat - x.double()).norm(dim=1) / x.double().norm(dim=1)).max().item() > 0.5


def test_zero_rows_quantize_to_zero():
    x = torch.randn(5, 100)
    x[2] = 0
    q, scale = quantize_rows(x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[2].float(), torch.zeros(100))
    assert torch.equal(dequantize_rows(q, scale)[2], torch.zeros(100))


def test_quantize_nan_and_inf_rows():
    x = torch.randn(4, 100)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    x[3, 0] = -float("inf")
    q, scale = quantize_rows(x)
    back = dequantize_rows(q, scale)
    assert torch.isfinite(back[0]).all()
    for row in (1, 2, 3):  # NaN/inf rows come back non-finite, never as silently finite values
        assert torch.isnan(back[row]).any(), row


def test_quantize_bad_input():
    with pytest.raises(ValueError, match="x must be a float"):
        quantize_rows(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(\.\.\., K\)"):
        quantize_rows(torch.ones(3, 0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        row_scales([1.0, 2.0])
    q, s = quantize_rows(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"scale must have shape \(3, 1\)"):
        dequantize_rows(q, s.view(1, 3))
    with pytest.raises(ValueError, match="q must be a float8_e4m3fn"):
        dequantize_rows(q.float(), s)


# ---------------------------------------------------------------------- Fp8Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,k,n", [(197, 100, 384), (257, 192, 100), (261, 384, 192)])
def test_fp8_linear_matches_float64_reference(dtype, tokens, k, n):
    lin = make_linear(k, n)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(2, tokens, k).to(dtype)
    with torch.no_grad():
        out = layer(x)
        exact = lin.double()(x.double())
    assert out.dtype == dtype and out.shape == (2, tokens, n)
    assert relative_error(out, fp8_linear_reference(x, lin.weight, lin.bias)) <= GEMM_REL
    # Against the unquantized linear: FP8's own error, well above bf16's and below a broken scale's.
    err = relative_error(out, exact)
    assert 2.0**-7 < err < E4M3_REL, err


def test_fp8_linear_noncontiguous_input_and_no_bias():
    lin = make_linear(100, 192, bias=False)
    layer = Fp8Linear.from_linear(lin)
    base = torch.randn(100, 3, 197)
    x = base.permute(1, 2, 0)  # (3, 197, 100), not contiguous
    assert not x.is_contiguous()
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, layer(x.contiguous()))
    assert layer.bias is None
    assert relative_error(out, fp8_linear_reference(x, lin.weight)) <= GEMM_REL


def test_fp8_linear_zero_rows_give_the_bias():
    lin = make_linear(100, 48)
    with torch.no_grad():
        lin.weight[5] = 0  # an output channel with amax = 0
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(7, 100)
    x[3] = 0  # a token with amax = 0
    with torch.no_grad():
        out = layer(x)
    bias_bf16 = lin.bias.detach().to(torch.bfloat16).float()
    assert torch.isfinite(out).all()
    assert torch.equal(out[3], bias_bf16)
    assert torch.equal(out[:, 5], bias_bf16[5].expand(7))


def test_fp8_linear_nan_and_inf_propagate():
    lin = make_linear(100, 48)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(6, 100)
    with torch.no_grad():
        clean = layer(x)
        x[1, 10] = float("nan")
        x[4, 20] = float("inf")
        out = layer(x)
    assert torch.isnan(out[1]).all() and torch.isnan(out[4]).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(out[keep], clean[keep])  # rows are quantized independently

    bad = make_linear(100, 48)
    with torch.no_grad():
        bad.weight[9, 3] = float("nan")
    with torch.no_grad():
        out = Fp8Linear.from_linear(bad)(torch.randn(4, 100))
    assert torch.isnan(out[:, 9]).all()
    assert torch.isfinite(out[:, [c for c in range(48) if c != 9]]).all()


def test_fp8_linear_ignores_autocast():
    lin = make_linear(192, 96)
    layer = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 33, 192)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


def test_dtype_casts_keep_the_quantized_state():
    lin = make_linear(100, 48)
    layer = Fp8Linear.from_linear(lin)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        cast(layer)
        assert layer.weight_fp8.dtype == F8 and layer.weight_scale.dtype == torch.float32
        assert layer.bias.dtype == torch.float32
        for k, v in layer.state_dict().items():
            assert torch.equal(v.float(), state[k].float()), k
    fresh = Fp8Linear(100, 48)
    fresh.load_state_dict(state)
    x = torch.randn(5, 100)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_fp8_linear_bad_input():
    layer = Fp8Linear.from_linear(make_linear(100, 48))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 100\), got \(3, 99\)"):
        layer(torch.randn(3, 99))
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16, got torch.int64"):
        layer(torch.ones(3, 100, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([0.0] * 100)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(3, 100, requires_grad=True))
    with torch.no_grad():
        assert layer(torch.randn(3, 100, requires_grad=True)).shape == (3, 48)
    with pytest.raises(ValueError, match="backend must be one of auto, scaled_mm, emulated, got 'fast'"):
        layer.backend = "fast"
    with pytest.raises(TypeError, match="expected a torch.nn.Linear, got Conv1d"):
        Fp8Linear.from_linear(nn.Conv1d(3, 4, 1))
    with pytest.raises(ValueError, match="meta device"):
        Fp8Linear.from_linear(nn.Linear(16, 16, device="meta"))
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        Fp8Linear(0, 4)


def _cpu_scaled_mm_error() -> str | None:
    try:
        a = torch.ones(16, 16).to(F8)
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.skipif(
    _cpu_scaled_mm_error() is not None,
    reason=f"this torch build has no CPU row-wise torch._scaled_mm: {_cpu_scaled_mm_error()}",
)
def test_cpu_scaled_mm_matches_emulated():
    # The real path's calling convention (column-major weight, (M, 1) and (1, N) scales, bf16
    # bias), checked against the emulated path on the CPU kernel where torch has one.
    lin = make_linear(192, 96)
    x = torch.randn(257, 192)
    emulated = Fp8Linear.from_linear(lin, backend="emulated")
    real = Fp8Linear.from_linear(lin, backend="scaled_mm")
    with torch.no_grad():
        a, b = real(x), emulated(x)
    assert relative_error(a, b) <= 2.0**-8
    assert _probe_scaled_mm("cpu") is None  # the self-check supported_reasons runs on a GPU passes here


def test_supported_reasons_on_cpu():
    reasons = supported_reasons("cpu")
    assert reasons and "not a CUDA GPU" in reasons[0]
    assert shape_reasons(100, 48) and "in_features = 100" in shape_reasons(100, 48)[0]
    assert shape_reasons(96, 48) == []
    layer = Fp8Linear.from_linear(make_linear(96, 48))
    assert layer.path("cpu") == "emulated"
    layer.backend = "scaled_mm"
    assert layer.path("cpu") == "scaled_mm"  # forced: the caller asked for the kernel


# ---------------------------------------------------------------------- the teacher


def small_teacher(embed_dim: int = 100, depth: int = 4) -> nn.Module:
    """Random ViT whose blocks matter: O(1) residual updates (LayerScale 1, weights ~ 1/sqrt(fan_in)),
    so a wrong scale shows in the tokens. 28 px / patch 2 -> 196 patch tokens + CLS = 197."""
    model = build_model(
        "vit_small_patch14_dinov2", img_size=28, depth=depth, embed_dim=embed_dim, num_heads=2, patch_size=2
    )
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(std=mod.in_features**-0.5)
                mod.bias.normal_(std=0.1)
            if hasattr(mod, "gamma"):
                mod.gamma.fill_(1.0)
    return model


def test_convert_teacher_linears_replaces_block_linears_only():
    model = small_teacher(depth=3)
    names = convert_teacher_linears(model)
    assert names == [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert len(fp8_linears(model)) == 12
    assert not isinstance(model.patch_embed.proj, Fp8Linear)
    assert convert_teacher_linears(model) == []  # already converted
    counts, reasons = describe_paths(model, "cpu")
    assert counts == {"scaled_mm": 0, "emulated": 12} and "not a CUDA GPU" in reasons[0]
    assert "12 of 12 linear layers run the emulated FP8 path" in emulation_warning(model, "cpu")
    with pytest.raises(TypeError, match="VisionTransformer with .blocks"):
        convert_teacher_linears(nn.Linear(3, 3))


def test_fp8_teacher_tracks_the_fp32_teacher():
    model = small_teacher()
    ref = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float32)
    fp8 = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float32, precision="fp8")
    broken = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float32, precision="fp8")
    for _, layer in fp8_linears(broken.model):  # the scale of the neighbouring channel: a layout bug
        layer.weight_scale.copy_(layer.weight_scale.roll(1, 0))
    assert fp8.precision == "fp8" and ref.precision == "auto" and len(fp8_linears(fp8.model)) == 16
    x = torch.randn(3, 3, 28, 28)
    patches_ref, _ = ref.collect(x, [1, 2, 3, 4])
    patches_fp8, cls_fp8 = fp8.collect(x, [1, 2, 3, 4])
    patches_bad, _ = broken.collect(x, [1, 2, 3, 4])
    assert patches_fp8.shape == (4, 3, 196, 100) and patches_fp8.dtype == torch.float32
    for i in range(4):
        err = relative_error(patches_fp8[i], patches_ref[i])
        cka = linear_cka_reference(patches_fp8[i], patches_ref[i]).item()
        assert err < 0.12 and cka > 0.995, (i + 1, err, cka)
        bad_err = relative_error(patches_bad[i], patches_ref[i])
        bad_cka = linear_cka_reference(patches_bad[i], patches_ref[i]).item()
        assert bad_err > 0.2 and bad_cka < 0.995, (i + 1, bad_err, bad_cka)
    # forward / collect / scan run the same converted blocks
    patch3, cls3 = fp8(x, 3)
    assert torch.equal(patch3, patches_fp8[2]) and torch.equal(cls3, cls_fp8[2])
    scores = fp8.scan(x, lambda k, p, c: relative_error(p, patches_ref[k - 1]))
    assert torch.allclose(scores, torch.tensor([relative_error(patches_fp8[i], patches_ref[i]) for i in range(4)]))


def test_fp8_teacher_in_bf16_keeps_bf16_outputs():
    model = small_teacher(embed_dim=96, depth=2)
    ref = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float32)
    fp8 = TruncatedTeacher(copy.deepcopy(model), dtype=torch.bfloat16, precision="fp8")
    layer = fp8_linears(fp8.model)[0][1]
    assert layer.weight_fp8.dtype == F8 and layer.weight_scale.dtype == torch.float32
    assert fp8.model.norm.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 28, 28)
    patch, cls = fp8(x, 2)
    assert patch.dtype == cls.dtype == torch.bfloat16
    assert relative_error(patch, ref(x, 2)[0]) < 0.12


def test_teacher_precision_validated():
    assert TEACHER_PRECISIONS == CHOICES["teacher_precision"] == ("auto", "fp8")
    with pytest.raises(ValueError, match="precision: expected one of auto, fp8, got 'fp4'"):
        TruncatedTeacher(small_teacher(depth=1), precision="fp4")


# ---------------------------------------------------------------------- config, CLI and a run


def test_teacher_precision_option(capsys):
    assert TrainConfig(teacher="t", student="s").teacher_precision == "auto"
    assert TrainConfig(teacher="t", student="s", teacher_precision="fp8").validate().teacher_precision == "fp8"
    with pytest.raises(ConfigError, match=r"--teacher-precision: invalid choice 'int8' \(choose from auto, fp8\)"):
        TrainConfig(teacher="t", student="s", teacher_precision="int8").validate()
    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--teacher-precision", "fp8"])
    assert config_from_args(args).teacher_precision == "fp8"
    from_file = TrainConfig.from_dict({"teacher": "t", "student": "s", "teacher-precision": "fp8"})
    assert from_file.teacher_precision == "fp8"
    assert main(["distill", "--help"]) == 0
    assert "--teacher-precision {auto,fp8}" in capsys.readouterr().out


def test_distill_run_with_fp8_teacher(tmp_path, caplog):
    kw = dict(start_block=2, tau=0.0, max_steps=3)
    with caplog.at_level(logging.WARNING, logger="leap.train"):
        trainer = Trainer(tiny_config(tmp_path / "fp8", teacher_precision="fp8", **kw))
        assert len(fp8_linears(trainer.teacher.model)) == 4 * 4
        assert not any(isinstance(m, Fp8Linear) for m in trainer.module.modules())  # student + head unchanged
        summary = trainer.fit()
    assert any("emulated FP8 path" in r.getMessage() for r in caplog.records)
    steps = records(read_log(tmp_path / "fp8"), "step")
    assert [r["block"] for r in steps] == [2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["cka"] <= 1.0 + 1e-6 for r in steps)
    assert records(read_log(tmp_path / "fp8"), "config")[0]["config"]["teacher_precision"] == "fp8"

    auto = Trainer(tiny_config(tmp_path / "auto", **kw)).fit()
    assert summary["flops"] == auto["flops"]  # same FLOPs whatever the teacher's precision
    assert summary["teacher_blocks_run"] == auto["teacher_blocks_run"]


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_scaled_mm_matches_emulated():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    reasons = supported_reasons("cuda")
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(0)
    # ViT-g block shapes (D = 1536, qkv 4608, SwiGLU fc1 8192 / fc2 4096), 2 images of 257 tokens.
    for k, n in ((1536, 4608), (1536, 1536), (1536, 8192), (4096, 1536)):
        lin = make_linear(k, n).cuda()
        x = torch.randn(2, 257, k, device="cuda", dtype=torch.bfloat16)
        real = Fp8Linear.from_linear(lin)
        emulated = Fp8Linear.from_linear(lin, backend="emulated")
        assert real.path(x.device) == "scaled_mm"
        with torch.no_grad():
            a, b = real(x), emulated(x)
        assert a.dtype == torch.bfloat16 and a.shape == (2, 257, n)
        assert relative_error(a, b) <= 2.0**-7, (k, n, relative_error(a, b))
        assert relative_error(a, fp8_linear_reference(x, lin.weight, lin.bias)) <= 2.0**-7
    # A converted teacher: every layer on the kernel, close to the emulated teacher.
    model = small_teacher(embed_dim=128, depth=2).cuda()
    real_t = TruncatedTeacher(copy.deepcopy(model), dtype=torch.bfloat16, precision="fp8")
    emu_t = TruncatedTeacher(copy.deepcopy(model), dtype=torch.bfloat16, precision="fp8")
    for _, layer in fp8_linears(emu_t.model):
        layer.backend = "emulated"
    assert describe_paths(real_t.model, "cuda")[0] == {"scaled_mm": 8, "emulated": 0}
    images = torch.randn(4, 3, 28, 28, device="cuda")
    assert relative_error(real_t(images, 2)[0], emu_t(images, 2)[0]) <= 2.0**-5


# ---------------------------------------------------------------------- tools/fp8_teacher.py


def test_fp8_teacher_bench_runs_on_cpu(tmp_path, capsys):
    import csv
    import os
    import sys

    # The committed Fashion-MNIST sample (tests/data): nothing is read from a system dataset.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import fp8_teacher

    out = tmp_path / "fp8.csv"
    assert fp8_teacher.main(["--images", "4", "--batch", "4", "--device", "cpu", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["k"]) for r in rows] == list(range(1, 9))  # the demo teacher's 8 blocks
    for r in rows:
        assert 0 < float(r["fp8_vs_fp32_rel_err"]) < 0.1 and float(r["fp8_vs_fp32_cka"]) > 0.99
        assert 0 < float(r["bf16_vs_fp32_rel_err"]) < float(r["fp8_vs_fp32_rel_err"])
        assert r["bf16_ms"] == r["fp8_ms"] == "not measured" and r["fp8_path"] == "emulated"
    assert "| k | fp8_vs_bf16_rel_err |" in capsys.readouterr().out
