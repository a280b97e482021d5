"""teacher_attention: both backends (Triton through the interpreter) against a float64 evaluation
of the reference, strided views, errors and dispatch, opcheck, torch.compile, and the
TruncatedTeacher block path."""

from __future__ import annotations

import pytest
import torch
from tolerances import RELATIVE_TOLERANCE, assert_close_rel, relative_error

import leap_kernels
from leap_kernels import teacher_attention, use_backend
from leap_kernels.ops.naive import teacher_attention_reference
from leap_kernels.ops.teacher_attention import TRITON_HEAD_DIMS, teacher_attention_torch

OPS = torch.ops.leap_kernels


def _qkv(b, n, h, d, dtype, spread=1.0):
    # q, k, v ~ N(0, spread^2): spread > 1 gives peaked softmax rows (the online max must rescale).
    return (spread * torch.randn(b, n, 3 * h * d)).to(dtype)


def _check(qkv, h, dtype, backend, scale=None, what=""):
    with torch.no_grad(), use_backend(backend):
        out = teacher_attention(qkv, h, scale=scale)
    ref = teacher_attention_reference(qkv.double(), h, scale=scale)
    assert out.dtype == qkv.dtype and out.is_contiguous()
    assert_close_rel(out, ref, RELATIVE_TOLERANCE[dtype][0], what)


# The interpreter runs 64 x 64 tiles with 16-row / 16-key tails. N = 1 / 15 / 16 / 17: tail tiles
# only (17: two tail query tiles and two key steps); 197 / 257 / 261 / 1025: full tiles and a 5- or
# 1-token tail (261 = ViT-g/14 reg4 at 224 px, 257 = ViT-S, 1025 = 448 px). Interpreter time grows
# with B*H*N^2, so long sequences get B = H = 1. (N, B, H):
SEQUENCES = [(1, 2, 3), (15, 2, 3), (16, 2, 3), (17, 2, 3), (197, 1, 3), (257, 1, 3), (261, 1, 1), (1025, 1, 1)]
GRID = [(b, n, h, d, dtype) for n, b, h in SEQUENCES for d in (64, 128) for dtype in (torch.float16, torch.bfloat16)]
EXTRA = [
    (1, 128, 2, 64, torch.bfloat16),
    (1, 261, 3, 64, torch.float16),
    (1, 70, 2, 32, torch.float16),
    (3, 24, 2, 16, torch.bfloat16),
]


@pytest.mark.parametrize("b,n,h,d,dtype", GRID + EXTRA, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_matches_float64_reference(b, n, h, d, dtype):
    _check(_qkv(b, n, h, d, dtype), h, dtype, "triton", what=f"triton B={b} N={n} H={h} d={d}")


# Fixed tiles other than the interpreter's autotune config (the GPU configs and more): several
# full key tiles, 1-4 key tail steps, several 16-row tail query tiles (197 % 128 = 69 rows: five),
# N a multiple of every tile (no tails), N below every tile (tails only), 16-row full tiles.
TILES = [
    (77, 32, 32, 64, torch.bfloat16),  # 2 full 32-tiles + 13-token tails
    (120, 16, 64, 64, torch.float16),  # key tail of 56 = 4 steps (last one masked); 16-row full tiles
    (197, 128, 64, 64, torch.bfloat16),  # 1 full query tile + 5 tail query tiles
    (261, 128, 128, 64, torch.float16),  # the GPU's 128 x 128 config at the paper's N
    (261, 64, 32, 128, torch.bfloat16),
    (128, 64, 32, 64, torch.float16),  # no tails
    (40, 64, 128, 64, torch.bfloat16),  # no full tile at all
]


@pytest.mark.parametrize("n,block_m,block_n,d,dtype", TILES, ids=lambda v: str(v).replace("torch.", ""))
def test_triton_fixed_tiles_match_float64_reference(n, block_m, block_n, d, dtype):
    from leap_kernels.ops.teacher_attention import teacher_attention_triton

    h = 2
    qkv = _qkv(2, n, h, d, dtype, spread=2.0)  # peaked rows: the max moves between full tiles and tail steps
    out = torch.full((2, n, h * d), float("nan"), dtype=dtype)  # a row the grid misses stays NaN
    teacher_attention_triton(qkv, h, d**-0.5, out, block_m=block_m, block_n=block_n)
    ref = teacher_attention_reference(qkv.double(), h)
    assert_close_rel(out, ref, RELATIVE_TOLERANCE[dtype][0], f"tiles {block_m}x{block_n} N={n} d={d}")


def test_fixed_tiles_bad_input():
    from leap_kernels.ops.teacher_attention import teacher_attention_triton

    qkv = _qkv(1, 5, 1, 64, torch.bfloat16)
    out = torch.empty(1, 5, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"block_m: expected a power of 2 >= 16.*got 48"):
        teacher_attention_triton(qkv, 1, 0.125, out, block_m=48, block_n=64)
    with pytest.raises(ValueError, match=r"block_n: expected a power of 2 >= 16.*got None"):
        teacher_attention_triton(qkv, 1, 0.125, out, block_m=64)


def test_tail_tiles_bound_the_masked_work():
    # Computed (query, key) pairs per (batch, head): full tiles plus 16-token tails. At the paper's
    # N the masked fraction is what one 16-token tail costs (it was a whole 64/128-token tile).
    from leap_kernels.ops.teacher_attention import computed_pairs, query_programs

    assert computed_pairs(261, 64, 64) == 272 * 272 and computed_pairs(261, 128, 128) == 272 * 272
    assert computed_pairs(1025, 128, 64) == 1040 * 1040 and computed_pairs(256, 64, 64) == 256 * 256
    assert computed_pairs(197, 128, 32) == 208 * 208 and computed_pairs(1, 64, 64) == 16 * 16
    for n, worst in ((261, 0.08), (257, 0.11), (1025, 0.03)):
        for bm, bn in ((128, 64), (64, 64), (128, 32), (64, 32), (128, 128)):
            assert 1 - n * n / computed_pairs(n, bm, bn) <= worst, (n, bm, bn)
    assert [query_programs(n, 64) for n in (1, 16, 17, 64, 65, 261)] == [1, 1, 2, 1, 2, 5]
    assert query_programs(197, 128) == 1 + 5


def test_autotune_key_has_grid_size(monkeypatch):
    # A config tuned at one batch size must not be reused for a very different grid: the key holds
    # N and a power-of-2 bucket of B*H besides the head dim.
    from leap_kernels.ops import teacher_attention as ta

    assert ta._teacher_attention_fwd_tuned.keys == ["N", "bh_bucket", "HEAD_DIM"]
    assert [ta.bh_bucket(x) for x in (1, 2, 3, 24, 768, 3072, 4096)] == [1, 2, 4, 32, 1024, 4096, 4096]
    seen = []

    def record(*args, grid, warmup, **kwargs):
        seen.append(dict(zip(ta._teacher_attention_fwd_tuned.arg_names, args)))

    monkeypatch.setattr(ta._teacher_attention_fwd_tuned, "run", record)
    with torch.no_grad(), use_backend("triton"):
        teacher_attention(_qkv(5, 9, 3, 64, torch.bfloat16), 3)
        teacher_attention(_qkv(1, 9, 3, 64, torch.bfloat16), 3)
    assert [(a["N"], a["bh_bucket"]) for a in seen] == [(9, 16), (9, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_matches_float64_reference(dtype):
    qkv = _qkv(2, 37, 3, 64, dtype)
    with torch.no_grad(), use_backend("torch"):
        out = teacher_attention(qkv, 3)
    ref = teacher_attention_reference(qkv.double(), 3)
    tol = 1e-5 if dtype == torch.float32 else RELATIVE_TOLERANCE[dtype][0]
    assert_close_rel(out, ref, tol, f"torch {dtype}")


def test_peaked_softmax_and_scale():
    # Large logits (std ~ 30 in base e): the running max changes across key tiles; scale argument.
    qkv = _qkv(1, 150, 2, 64, torch.bfloat16, spread=3.0)
    _check(qkv, 2, torch.bfloat16, "triton", what="peaked")
    _check(qkv, 2, torch.bfloat16, "triton", scale=0.37, what="scale=0.37")
    # A shifted max lives in a late key tile only: token 140's keys dominate every row.
    qkv = _qkv(1, 150, 1, 64, torch.float16)
    q = qkv[..., :64]
    qkv[0, 140, 64:128] = (8 * q[0].mean(0) / q[0].mean(0).norm()).to(qkv.dtype)
    _check(qkv, 1, torch.float16, "triton", what="late max")


def test_strided_views():
    h, d = 2, 64
    base = _qkv(3, 100, h, d, torch.bfloat16)
    # A slice along the batch (offset storage) and every other token (token stride 2*C).
    _check(base[1:], h, torch.bfloat16, "triton", what="batch slice")
    _check(base[:, ::2], h, torch.bfloat16, "triton", what="token stride")
    # A last-dim-stride-1 view of a wider buffer: rows padded to 3*h*d + 40 channels.
    wide = _qkv(2, 45, h, d, torch.float16).new_zeros(2, 45, 3 * h * d + 40)
    wide[..., 8 : 8 + 3 * h * d] = _qkv(2, 45, h, d, torch.float16)
    view = wide[..., 8 : 8 + 3 * h * d]
    assert not view.is_contiguous()
    _check(view, h, torch.float16, "triton", what="padded rows")
    # Token-major storage (N, B, C) viewed as (B, N, C): batch stride C, token stride B*C.
    tm = _qkv(45, 2, h, d, torch.float16).transpose(0, 1)
    _check(tm, h, torch.float16, "triton", what="token-major")


def test_output_layout_is_what_proj_consumes():
    # timm's Attention: (attn @ v).transpose(1, 2).reshape(B, N, C): compare to SDPA on the views.
    qkv = _qkv(2, 33, 3, 64, torch.float32)
    with torch.no_grad():
        ours = teacher_attention(qkv, 3)
        q, k, v = qkv.reshape(2, 33, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
        timm_out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 33, 192)
    torch.testing.assert_close(ours, timm_out, rtol=1e-5, atol=1e-6)


def test_inference_only():
    qkv = _qkv(1, 5, 1, 64, torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only.*no_grad"):
        teacher_attention(qkv, 1)
    with torch.no_grad():
        assert teacher_attention(qkv, 1).shape == (1, 5, 64)
    with torch.inference_mode():
        assert teacher_attention(qkv.detach(), 1).shape == (1, 5, 64)


@pytest.mark.parametrize(
    "make,heads,kwargs,exc,match",
    [
        (lambda: torch.randn(5, 192), 1, {}, ValueError, r"qkv: expected 3 dims.*\(5, 192\)"),
        (lambda: torch.randn(1, 5, 100), 2, {}, ValueError, r"qkv: .*multiple of 3\*num_heads = 6.*got 100"),
        (lambda: torch.randint(0, 3, (1, 5, 192)), 1, {}, TypeError, r"qkv: expected a floating dtype.*int64"),
        (lambda: torch.randn(1, 5, 192), 0, {}, ValueError, r"num_heads: expected a positive int, got 0"),
        (lambda: torch.randn(1, 5, 192), 1.0, {}, TypeError, r"num_heads: expected an int, got float"),
        (lambda: torch.randn(1, 5, 192), 1, {"scale": "x"}, TypeError, r"scale: expected a float"),
        (lambda: [1.0], 1, {}, TypeError, r"qkv: expected a torch.Tensor, got list"),
    ],
)
def test_bad_input(make, heads, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        teacher_attention(make(), heads, **kwargs)


def test_unsupported_head_dim_dispatch(clean_backend_env):
    qkv = _qkv(1, 9, 2, 48, torch.bfloat16)  # d = 48
    with torch.no_grad():
        with use_backend("triton"), pytest.raises(RuntimeError, match=r"head dim 48.*16, 32, 64, 128"):
            teacher_attention(qkv, 2)
        out = teacher_attention(qkv, 2)  # auto: falls back to the torch backend
    ref = teacher_attention_reference(qkv.double(), 2)
    assert_close_rel(out, ref, RELATIVE_TOLERANCE[torch.bfloat16][0], "fallback")
    assert 48 not in TRITON_HEAD_DIMS and {64, 128} <= set(TRITON_HEAD_DIMS)


def test_float32_runs_on_torch(clean_backend_env):
    qkv = _qkv(1, 9, 1, 64, torch.float32)
    with torch.no_grad():
        with use_backend("triton"), pytest.raises(RuntimeError, match=r"dtype torch.float32.*bfloat16, float16"):
            teacher_attention(qkv, 1)
        torch.testing.assert_close(teacher_attention(qkv, 1), teacher_attention_torch(qkv, 1, 0.125))


def test_nonpositive_scale_runs_on_torch(clean_backend_env):
    qkv = _qkv(1, 20, 1, 64, torch.bfloat16)
    with torch.no_grad():
        with use_backend("triton"), pytest.raises(RuntimeError, match=r"scale > 0"):
            teacher_attention(qkv, 1, scale=-0.1)
        out = teacher_attention(qkv, 1, scale=-0.1)
    assert_close_rel(
        out,
        teacher_attention_reference(qkv.double(), 1, scale=-0.1),
        RELATIVE_TOLERANCE[torch.bfloat16][0],
        "scale < 0",
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_propagates(backend, where):
    # As the reference: a NaN query spoils its own output row (of its head); a NaN key or value
    # spoils every row of its head. torch's CPU SDPA used to return zeros for the query case.
    h, d = 2, 64
    qkv = _qkv(1, 9, h, d, torch.bfloat16)
    channel = {"q": 0, "k": h * d, "v": 2 * h * d}[where] + 5  # head 0
    qkv[0, 3, channel] = float("nan")
    with torch.no_grad(), use_backend(backend):
        out = teacher_attention(qkv, h)
    ref = teacher_attention_reference(qkv.double(), h)
    head0, head1 = out[0, :, :d], out[0, :, d:]
    assert torch.equal(head0.isnan().any(-1), ref[0, :, :d].isnan().any(-1)), (where, head0.isnan().any(-1))
    assert head0.isnan().any(-1)[3]
    assert torch.isfinite(head1).all()


def test_empty_batch():
    with torch.no_grad():
        assert teacher_attention(torch.randn(0, 5, 192, dtype=torch.bfloat16), 1).shape == (0, 5, 64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    # Non-requires-grad inputs: the op has no autograd formula (inference only); opcheck's
    # autograd-registration test then checks that nothing claims a gradient.
    qkv = _qkv(2, 13, 2, 64, torch.bfloat16)
    with use_backend(backend):
        torch.library.opcheck(OPS.teacher_attention.default, (qkv, 2, 0.125))
        torch.library.opcheck(OPS.teacher_attention.default, (qkv[:, 1:], 2, 0.3))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qkv = _qkv(2, 11, 2, 64, torch.bfloat16)
    proj = torch.nn.Linear(128, 128).to(torch.bfloat16)

    def f(t):
        return proj(teacher_attention(t, 2)) + 1

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(qkv), f(qkv))


# ----------------------------------------------------------------------------- teacher integration


def _tiny_teacher(dtype, attention_kernel):
    from leap.models import build_model
    from leap.teacher import TruncatedTeacher

    torch.manual_seed(0)
    m = build_model("vit_small_patch14_dinov2", img_size=56, depth=2, embed_dim=128, num_heads=2)  # d = 64
    with torch.no_grad():  # LayerScale init is 1e-5: make the attention branch count
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return TruncatedTeacher(m, dtype=dtype, attention_kernel=attention_kernel)


def test_teacher_kernel_switch():
    from leap.teacher import kernel_block_supported

    t = _tiny_teacher(torch.float32, None)
    x = torch.zeros(1, 3, 56, 56)
    assert t.attention_kernel is None and not t.uses_attention_kernel(x)  # auto: off on CPU
    t.attention_kernel = True
    assert t.uses_attention_kernel(x)
    assert all(kernel_block_supported(b) for b in t.model.blocks)
    with pytest.raises(TypeError, match="attention_kernel"):
        _tiny_teacher(torch.float32, "yes")


def test_teacher_kernel_path_fp32_exact():
    # fp32 runs the op's torch backend: checks the block wiring (norms, LayerScale, proj, MLP).
    t = _tiny_teacher(torch.float32, attention_kernel=True)
    x = torch.randn(2, 3, 56, 56)
    patch, cls = t(x, 2)
    t.attention_kernel = False
    ref_patch, ref_cls = t(x, 2)
    torch.testing.assert_close(patch, ref_patch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-5, atol=1e-5)


def test_teacher_kernel_path_bf16_triton():
    import copy

    from leap.teacher import TruncatedTeacher

    t = _tiny_teacher(torch.bfloat16, attention_kernel=True)
    truth = TruncatedTeacher(copy.deepcopy(t.model), dtype=torch.float64, attention_kernel=False)  # same weights
    x = torch.randn(2, 3, 56, 56)  # N = 16 patches + CLS = 17 tokens
    with use_backend("triton"):
        patch, cls = t(x, 2)
    t.attention_kernel = False
    timm_patch, timm_cls = t(x, 2)
    ref_patch, ref_cls = truth(x.double(), 2)
    assert patch.dtype == torch.bfloat16 and patch.shape == (2, 16, 128)
    assert_close_rel(patch, timm_patch, 1e-2, "kernel vs timm, patch tokens")
    assert_close_rel(cls, timm_cls, 2e-2, "kernel vs timm, cls")
    # As accurate as timm's bf16 path, measured against the float64 teacher.
    for ours, timm_out, ref, what in ((patch, timm_patch, ref_patch, "patch"), (cls, timm_cls, ref_cls, "cls")):
        assert relative_error(ours, ref) <= 1.5 * relative_error(timm_out, ref) + 1e-3, what


def test_teacher_falls_back_for_qk_norm():
    from leap.teacher import kernel_block_supported

    t = _tiny_teacher(torch.float32, attention_kernel=True)
    block = t.model.blocks[0]
    block.attn.q_norm = torch.nn.LayerNorm(64)
    assert not kernel_block_supported(block)
    x = torch.randn(1, 17, 128)
    with torch.no_grad():
        torch.testing.assert_close(t.block_forward(block, x), block(x))


def test_exported():
    assert leap_kernels.teacher_attention is teacher_attention
    assert "teacher_attention" in leap_kernels.__all__ and "teacher_attention_reference" in leap_kernels.__all__


# ----------------------------------------------------------------------------- benchmark smoke


def test_bench_attention_smoke(tmp_path, capsys, monkeypatch):
    import csv
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import bench_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU: "ours" runs the torch backend
    out = tmp_path / "attn.csv"
    assert bench_attention.main(["--smoke", "--device", "cpu", "--iters", "2", "--warmup", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {"eager", "ours"}
    assert all(r["device"] == "cpu" and r["git_sha"] and r["error"] == "" and float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["rel_err"]) < 1e-5 for r in rows), rows
    out = tmp_path / "teacher.csv"
    assert (
        bench_attention.main(
            ["--smoke", "--teacher", "--device", "cpu", "--iters", "1", "--warmup", "1", "--out", str(out)]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert {r["variant"] for r in rows} == {"timm", "ours"} and all(r["error"] == "" for r in rows), rows
    assert "| case | variant |" in capsys.readouterr().out


def test_gpu_autotune_configs():
    # The GPU config list (the interpreter sees only one): pruned for d = 128, never emptied.
    from leap_kernels.ops import teacher_attention as ta

    configs = ta._attention_configs(False)
    assert len(configs) > 1 and len(ta._attention_configs(True)) == 1
    for d in TRITON_HEAD_DIMS:
        kept = ta._prune_configs(configs, {}, HEAD_DIM=d)
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in kept if d == 128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs} >= {(128, 64), (64, 64)}
