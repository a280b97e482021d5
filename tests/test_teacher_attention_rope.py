"""teacher_attention with rotary position embedding (DINOv3): the torch reference against timm's
EvaAttention, the torch and Triton (interpreter) backends against a float64 evaluation of the
reference at DINOv3 sequence lengths and odd grids, strided views and timm's table views, fixed
tiles, errors and dispatch, NaN/inf, opcheck, torch.compile; and the torch backend keeping
infinities (it returned finite values on CPU in bf16/fp16)."""

from __future__ import annotations

import pytest
import torch
from tolerances import RELATIVE_TOLERANCE, assert_close_rel

import leap_kernels
from leap_kernels import _backends, teacher_attention, use_backend
from leap_kernels.ops.naive import rope_half_reference, teacher_attention_reference
from leap_kernels.ops.teacher_attention import teacher_attention_torch, teacher_attention_triton

OPS = torch.ops.leap_kernels
PREFIX = 5  # DINOv3: CLS + 4 storage tokens, not rotated


def _qkv(b, n, h, d, dtype, spread=1.0):
    return (spread * torch.randn(b, n, 3 * h * d)).to(dtype)


def _tables(rows, d, scale=6.0):
    """Random per-pair angles -> (sin, cos), each (rows, d/2), fp32."""
    angles = scale * torch.rand(rows, d // 2) - scale / 2
    return angles.sin(), angles.cos()


def _dinov3_rope(grid, head_dim):
    """timm's DINOv3 rotary embedding for a (rows, cols) patch grid: (rows*cols, 2d) [sin | cos], half layout."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    return RotaryEmbeddingDinoV3(head_dim, temperature=100, feat_shape=list(grid), rotate_half=True).get_embed()


def _reference(qkv, h, tables, prefix, scale=None):
    sin, cos = tables
    return teacher_attention_reference(
        qkv.double(), h, scale=scale, rope=(sin.double(), cos.double()), rope_prefix=prefix
    )


def _check(qkv, h, tables, prefix, backend, what="", scale=None):
    with torch.no_grad(), use_backend(backend):
        out = teacher_attention(qkv, h, scale=scale, rope=tables, rope_prefix=prefix)
    assert out.dtype == qkv.dtype and out.is_contiguous() and out.shape == qkv.shape[:2] + (qkv.shape[2] // 3,)
    tol = 1e-5 if qkv.dtype == torch.float32 else RELATIVE_TOLERANCE[qkv.dtype][0]
    assert_close_rel(out, _reference(qkv, h, tables, prefix, scale), tol, what)
    return out


# ----------------------------------------------------------------------------- the reference vs timm


def _eva_attention(dim, heads, prefix, dtype):
    from timm.models.eva import EvaAttention

    attn = EvaAttention(
        dim, num_heads=heads, qkv_bias=True, num_prefix_tokens=prefix, scale_norm=False, rotate_half=True
    )
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    return attn.eval().to(dtype)


# (grid, heads, head dim): N = 201 (ViT/16 at 224 px), 261 (256 px), 1029 (512 px), odd grids 7x9, 3x5.
EVA_CASES = [((14, 14), 2, 64), ((16, 16), 1, 64), ((32, 32), 1, 64), ((7, 9), 3, 32), ((3, 5), 2, 128)]


@pytest.mark.parametrize("grid,heads,d", EVA_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_timm_eva_attention(grid, heads, d, dtype):
    # timm: x -> qkv (+ q/v bias) -> rotate q, k of the patch tokens -> SDPA -> proj. The reference
    # takes the packed qkv and the per-pair tables read from timm's own rotary embedding; evaluated in
    # float64 on the same (rounded) weights and inputs, it is what timm computes in each dtype. The op
    # (its torch backend: the automatic choice on CPU) between the same layers matches it too.
    import copy

    from leap.vit import rope_tables

    n = PREFIX + grid[0] * grid[1]
    attn = _eva_attention(heads * d, heads, PREFIX, dtype)
    attn64 = copy.deepcopy(attn).double()
    rope = _dinov3_rope(grid, d)
    x = torch.randn(2, n, heads * d).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else RELATIVE_TOLERANCE[dtype][0]
    with torch.no_grad():
        timm_out = attn(x, rope=rope)
        bias64 = torch.cat((attn64.q_bias, attn64.k_bias, attn64.v_bias))
        qkv64 = torch.nn.functional.linear(x.double(), attn64.qkv.weight, bias64)
        ref = attn64.proj(
            teacher_attention_reference(qkv64, heads, rope=rope_tables(rope.double(), d), rope_prefix=PREFIX)
        )
        assert_close_rel(timm_out, ref, tol, f"timm {dtype} vs the float64 reference")
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias64.to(dtype))
        ours = attn.proj(teacher_attention(qkv, heads, rope=rope_tables(rope, d), rope_prefix=PREFIX))
        assert_close_rel(ours, ref, tol, f"the op in {dtype} vs the float64 reference")
        if dtype == torch.float32:  # the reference itself, in fp32, against timm in fp32
            mine = attn.proj(teacher_attention_reference(qkv, heads, rope=rope_tables(rope, d), rope_prefix=PREFIX))
            assert_close_rel(mine, timm_out.double(), 1e-5, "fp32 reference vs timm")


def test_rope_half_reference_is_timms_rotation():
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    x = torch.randn(2, 3, 21, 64, dtype=torch.float64)
    rope = _dinov3_rope((4, 4), 64).double()
    timm_rot = torch.cat([x[:, :, :PREFIX], apply_rot_embed_cat(x[:, :, PREFIX:], rope, half=True)], dim=2)
    ours = rope_half_reference(x, rope[:, :32], rope[:, 64:96], PREFIX)
    torch.testing.assert_close(ours, timm_rot, rtol=0, atol=1e-14)
    assert torch.equal(ours[:, :, :PREFIX], x[:, :, :PREFIX])  # the prefix tokens are not rotated


# ----------------------------------------------------------------------------- the backends


# (B, N, H, d, prefix, dtype): DINOv3 lengths, odd grids (7x9 + 5 = 68, 3x4 + 5 = 17), no prefix,
# one prefix token, N == prefix (nothing rotated); long sequences get B = H = 1 (interpreter time).
GRID = [
    (1, 201, 2, 64, PREFIX, torch.bfloat16),
    (1, 201, 1, 128, PREFIX, torch.float16),
    (1, 261, 1, 64, PREFIX, torch.float16),
    (2, 68, 3, 32, PREFIX, torch.bfloat16),
    (2, 17, 2, 64, PREFIX, torch.float16),
    (1, 37, 2, 64, 0, torch.bfloat16),
    (1, 30, 2, 32, 1, torch.float16),
    (2, 5, 2, 64, PREFIX, torch.bfloat16),
]


@pytest.mark.parametrize("b,n,h,d,prefix,dtype", GRID, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_match_float64_reference(backend, b, n, h, d, prefix, dtype):
    qkv = _qkv(b, n, h, d, dtype)
    _check(qkv, h, _tables(n - prefix, d), prefix, backend, f"{backend} B={b} N={n} H={h} d={d} P={prefix}")


@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.float16)])
def test_triton_long_sequence(d, dtype):
    # N = 1029: a 32 x 32 grid (512 px) + 5 prefix tokens; 16 full key tiles and a 5-key tail.
    n = 1029
    _check(_qkv(1, n, 1, d, dtype), 1, _tables(n - PREFIX, d), PREFIX, "triton", f"N={n} d={d}")


def test_timm_tables_as_views_and_strided_qkv():
    # The tables as the teacher passes them: column slices of timm's (N - P, 2d) embedding (row stride
    # 2d); qkv as a token-strided view. Both backends.
    from leap.vit import rope_tables

    h, d, grid = 2, 64, (5, 7)
    n = PREFIX + grid[0] * grid[1]
    tables = rope_tables(_dinov3_rope(grid, d), d)
    assert not tables[0].is_contiguous() and tables[0].stride() == (2 * d, 1)
    base = _qkv(2, 2 * n, h, d, torch.bfloat16)
    view = base[:, ::2]
    for backend in ("torch", "triton"):
        _check(view, h, tables, PREFIX, backend, f"{backend} strided")


# Fixed tiles with rope: full tiles and 16-token tails on both axes, tails only, no tails.
TILES = [(77, 32, 32, 64), (201, 128, 64, 64), (120, 16, 64, 32), (40, 64, 128, 128), (128, 64, 32, 64)]


@pytest.mark.parametrize("n,block_m,block_n,d", TILES, ids=lambda v: str(v))
def test_triton_fixed_tiles(n, block_m, block_n, d):
    h, dtype = 2, torch.bfloat16
    qkv = _qkv(2, n, h, d, dtype, spread=2.0)
    tables = _tables(n - PREFIX, d)
    out = torch.full((2, n, h * d), float("nan"), dtype=dtype)  # a row the grid misses stays NaN
    teacher_attention_triton(qkv, h, d**-0.5, out, rope=tables, rope_prefix=PREFIX, block_m=block_m, block_n=block_n)
    assert_close_rel(out, _reference(qkv, h, tables, PREFIX), RELATIVE_TOLERANCE[dtype][0], f"{block_m}x{block_n}")


def test_identity_rotation_is_plain_attention():
    # sin = 0, cos = 1: the rope path computes plain attention (Q K^T split over the channel halves).
    qkv = _qkv(2, 45, 2, 64, torch.float16)
    with torch.no_grad(), use_backend("triton"):
        plain = teacher_attention(qkv, 2)
        rotated = teacher_attention(qkv, 2, rope=(torch.zeros(40, 32), torch.ones(40, 32)), rope_prefix=PREFIX)
    torch.testing.assert_close(rotated, plain, rtol=2e-3, atol=2e-4)


def test_rotation_changes_the_output():
    # The tables are used: another rotation gives another attention (a kernel ignoring them would fail).
    qkv = _qkv(1, 21, 1, 64, torch.bfloat16)
    with torch.no_grad(), use_backend("triton"):
        a = teacher_attention(qkv, 1, rope=_tables(16, 64), rope_prefix=PREFIX)
        b = teacher_attention(qkv, 1, rope=_tables(16, 64), rope_prefix=PREFIX)
    assert (a.float() - b.float()).abs().max() > 1e-2


# ----------------------------------------------------------------------------- errors and dispatch


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(rope=(torch.zeros(15, 32), torch.ones(16, 32))),
            ValueError,
            r"rope\[0\] \(sin\): expected shape.*\(16, 32\).*got \(15, 32\)",
        ),
        (dict(rope=(torch.zeros(16, 32), torch.ones(16, 64))), ValueError, r"rope\[1\] \(cos\): expected shape"),
        (dict(rope=torch.zeros(16, 32)), TypeError, r"rope: expected a \(sin, cos\) pair"),
        (
            dict(rope=(torch.zeros(16, 32), torch.ones(16, 32)), rope_prefix=22),
            ValueError,
            r"rope_prefix: expected 0 <= rope_prefix <= N = 21",
        ),
        (
            dict(rope=(torch.zeros(16, 32), torch.ones(16, 32)), rope_prefix=True),
            TypeError,
            r"rope_prefix: expected an int",
        ),
        (dict(rope_prefix=5), ValueError, r"rope_prefix: only meaningful with rope"),
        (
            dict(rope=(torch.zeros(16, 32, dtype=torch.int32), torch.ones(16, 32))),
            TypeError,
            r"rope\[0\] \(sin\): expected a floating dtype",
        ),
    ],
)
def test_bad_rope_input(kwargs, exc, match):
    qkv = _qkv(1, 21, 2, 64, torch.bfloat16)
    kwargs.setdefault("rope_prefix", PREFIX)
    with torch.no_grad(), pytest.raises(exc, match=match):
        teacher_attention(qkv, 2, **kwargs)


def test_odd_head_dim_refused():
    qkv = _qkv(1, 8, 1, 15, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"head dim must be even.*d = 15"):
        teacher_attention(qkv, 1, rope=(torch.zeros(8, 7), torch.ones(8, 7)))


def test_head_dim_16_runs_on_torch(clean_backend_env):
    # Q K^T over halves of 8 channels is below a tensor-core dot: Triton declines, auto falls back.
    qkv = _qkv(2, 21, 2, 16, torch.bfloat16)
    tables = _tables(16, 16)
    with torch.no_grad():
        with (
            use_backend("triton"),
            pytest.raises(RuntimeError, match=r"teacher_attention_rope: head dim 16.*32, 64, 128"),
        ):
            teacher_attention(qkv, 2, rope=tables, rope_prefix=PREFIX)
        out = teacher_attention(qkv, 2, rope=tables, rope_prefix=PREFIX)
    assert_close_rel(out, _reference(qkv, 2, tables, PREFIX), RELATIVE_TOLERANCE[torch.bfloat16][0], "fallback")
    assert _backends.TRITON_ROPE_HEAD_DIMS == (32, 64, 128) and 16 in _backends.TRITON_HEAD_DIMS


def test_backends_declare_the_rope_op():
    triton_support = _backends._BACKENDS["triton"].ops["teacher_attention_rope"]
    cuda_support = _backends._BACKENDS["cuda"].ops["teacher_attention_rope"]
    assert triton_support.dtypes == _backends.HALF_DTYPES and triton_support.positive_scale
    assert cuda_support.ext_op == "teacher_attention_rope_fwd" and not cuda_support.verified
    assert "teacher_attention_rope" not in _backends._BACKENDS["cpp"].ops  # CPU attention is the torch backend's


@pytest.mark.skipif(not leap_kernels._ext.available(), reason="needs leap_kernels._C")
def test_backend_reports_a_missing_compiled_op(monkeypatch):
    # A backend whose kernel lives in an op the loaded extension lacks (built from older sources)
    # says so instead of failing at the call.
    class Declares(_backends.Backend):
        name = "test"
        ops = {"op": _backends.OpSupport(("cpu",), ext_op="no_such_op_in_the_extension")}

    reasons = Declares().not_supported_reasons("op", [torch.zeros(2)])
    assert any("leap_kernels._C has no no_such_op_in_the_extension kernel" in r for r in reasons), reasons
    ok = type("Has", (Declares,), {"ops": {"op": _backends.OpSupport(("cpu",), ext_op="rows_loss_grad")}})()
    assert ok.not_supported_reasons("op", [torch.zeros(2)]) == []


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["q", "k", "v", "prefix-q"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_propagates(backend, where):
    h, d, n = 2, 64, 21
    qkv = _qkv(1, n, h, d, torch.bfloat16)
    token = 1 if where == "prefix-q" else 9  # a prefix token (not rotated) or a patch token
    channel = {"q": 0, "prefix-q": 0, "k": h * d, "v": 2 * h * d}[where] + 40  # head 0, second channel half
    qkv[0, token, channel] = float("nan")
    tables = _tables(n - PREFIX, d)
    with torch.no_grad(), use_backend(backend):
        out = teacher_attention(qkv, h, rope=tables, rope_prefix=PREFIX)
    ref = _reference(qkv, h, tables, PREFIX)
    assert torch.equal(out[0, :, :d].isnan().any(-1), ref[0, :, :d].isnan().any(-1)), where
    assert out[0, token, :d].isnan().any() and torch.isfinite(out[0, :, d:]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    qkv = _qkv(2, 13, 2, 64, torch.bfloat16)
    sin, cos = _tables(8, 64)
    with use_backend(backend):
        torch.library.opcheck(OPS.teacher_attention_rope.default, (qkv, 2, 0.125, sin, cos, PREFIX))
        torch.library.opcheck(OPS.teacher_attention_rope.default, (qkv[:, 1:], 2, 0.3, sin[1:], cos[1:], PREFIX))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(3, 201, 3 * 6 * 64, dtype=torch.bfloat16)
        out = teacher_attention(qkv, 6, rope=(torch.empty(196, 32), torch.empty(196, 32)), rope_prefix=PREFIX)
        assert out.shape == (3, 201, 384) and out.dtype == torch.bfloat16


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qkv = _qkv(2, 13, 2, 64, torch.bfloat16)
    tables = _tables(8, 64)
    proj = torch.nn.Linear(128, 128).to(torch.bfloat16)

    def f(t, sin, cos):
        return proj(teacher_attention(t, 2, rope=(sin, cos), rope_prefix=PREFIX)) + 1

    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(qkv, *tables), f(qkv, *tables))


def test_inference_only():
    qkv = _qkv(1, 9, 1, 64, torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        teacher_attention(qkv, 1, rope=_tables(4, 64), rope_prefix=PREFIX)


# ----------------------------------------------------------------------------- infinities on the torch backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["k", "q", "v"])
def test_torch_backend_keeps_infinities(dtype, value, where):
    # One +-inf in a key, query or value: the outputs that the float64 reference makes non-finite are
    # non-finite here too, and no others. torch's CPU SDPA returned all-finite outputs for an infinite
    # key in bf16/fp16 (thousands of non-finite outputs in the reference).
    b, n, h, d = 2, 37, 3, 64
    qkv = _qkv(b, n, h, d, dtype)
    qkv[0, 3, {"q": 0, "k": h * d, "v": 2 * h * d}[where] + 5] = value
    with torch.no_grad(), use_backend("torch"):
        out = teacher_attention(qkv, h)
        rotated = teacher_attention(qkv, h, rope=_tables(n - PREFIX, d), rope_prefix=PREFIX)
    ref = teacher_attention_reference(qkv.double(), h)
    assert (~torch.isfinite(ref)).sum() > 0
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert (~torch.isfinite(rotated)).sum() > 0  # rotation spreads the infinity, it does not lose it


def test_torch_backend_finite_inputs_take_sdpa(monkeypatch):
    # The reference-style path is for non-finite CPU inputs only; finite ones keep SDPA.
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: (calls.append(1), sdpa(*a, **k))[1]
    )
    qkv = _qkv(1, 9, 1, 64, torch.bfloat16)
    teacher_attention_torch(qkv, 1, 0.125)
    assert calls == [1]
    qkv[0, 2, 70] = float("inf")
    teacher_attention_torch(qkv, 1, 0.125)
    assert calls == [1]


# ----------------------------------------------------------------------------- GPU checks


# DINOv3 shapes on the GPU: ViT-S/16 and ViT-7B/16 heads at 224 px (N = 201) and 512 px (N = 1029).
GPU_CASES = [(8, 201, 6, 64), (4, 201, 32, 128), (2, 1029, 16, 64), (2, 1029, 32, 128), (3, 68, 2, 32)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,n,h,d", GPU_CASES, ids=lambda v: str(v))
def test_gpu_rope_kernels_match_float64_reference(backend, dtype, b, n, h, d):
    if backend == "cuda" and d not in _backends.CUDA_HEAD_DIMS:
        pytest.skip(f"the CUDA kernel takes head dims {_backends.CUDA_HEAD_DIMS}")
    qkv = _qkv(b, n, h, d, dtype).cuda()
    tables = tuple(t.cuda() for t in _tables(n - PREFIX, d))
    with torch.no_grad(), use_backend(backend):
        out = teacher_attention(qkv, h, rope=tables, rope_prefix=PREFIX)
    ref = _reference(qkv.cpu(), h, tuple(t.cpu() for t in tables), PREFIX)
    assert_close_rel(out.cpu(), ref, RELATIVE_TOLERANCE[dtype][0], f"{backend} {dtype} B={b} N={n} H={h} d={d}")
