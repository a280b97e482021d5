"""fused_feature_loss against a float64 evaluation of the plain PyTorch reference."""

import math

import pytest
import torch
from tolerances import BACKENDS, RELATIVE_TOLERANCE, assert_close_rel

import leap_kernels
from leap_kernels import fused_feature_loss, use_backend
from leap_kernels.ops.naive import fused_feature_loss_reference

# (M tokens as leading dims, D_s, D_t): every M in {1, 7, 197, 514}, D_s in {64, 192, 384},
# D_t in {100, 256, 1536} appears; 514 = 2 x 257 tokens.
SHAPES = [
    ((1,), 64, 100),
    ((7,), 192, 256),
    ((197,), 384, 100),
    ((2, 257), 64, 1536),
    ((197,), 192, 1536),
    ((2, 257), 384, 256),
    ((1, 7), 384, 1536),
]


def make_inputs(lead, d_s, d_t, dtype, *, bias=True, weight_dtype=None):
    student = torch.randn(*lead, d_s).to(dtype).requires_grad_()
    weight = (torch.randn(d_t, d_s) / math.sqrt(d_s)).to(weight_dtype or dtype).requires_grad_()
    b = (0.1 * torch.randn(d_t)).to(weight_dtype or dtype).requires_grad_() if bias else None
    # Teacher-like targets: nonzero per-token mean and scale, so normalization matters.
    target = (2.0 * torch.randn(*lead, d_t) + torch.randn(*lead, 1)).to(dtype)
    return student, weight, b, target


def random_grad_output(loss):
    # Not only 1: the backward must rescale by grad_output.
    return torch.randn_like(loss) if loss.dim() else torch.randn(()).abs() + 0.5


def reference_loss_and_grads(student, weight, bias, target, grad_out, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (student, weight) + ((bias,) if bias is not None else ())]
    b64 = leaves[2] if bias is not None else None
    loss = fused_feature_loss_reference(leaves[0], leaves[1], b64, target.detach().double(), **kw)
    grads = torch.autograd.grad(loss, leaves, grad_out.double())
    return loss, grads


def check_against_reference(student, weight, bias, target, *, dtype, **kw):
    loss = fused_feature_loss(student, weight, bias, target, **kw)
    assert loss.dtype == torch.float32
    grad_out = random_grad_output(loss)
    inputs = [student, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, inputs, grad_out)
    ref_loss, ref_grads = reference_loss_and_grads(student, weight, bias, target, grad_out, **kw)
    loss_tol, grad_tol = RELATIVE_TOLERANCE[dtype]
    assert_close_rel(loss, ref_loss, loss_tol, "loss")
    for name, g, r, x in zip(("student", "weight", "bias"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype, f"grad {name} dtype {g.dtype} != {x.dtype}"
        assert_close_rel(g, r, grad_tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{math.prod(s[0])}-Ds{s[1]}-Dt{s[2]}")
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_reference(backend, shape, normalize, reduction):
    lead, d_s, d_t = shape
    student, weight, bias, target = make_inputs(lead, d_s, d_t, torch.float32)
    with use_backend(backend):
        check_against_reference(
            student, weight, bias, target, dtype=torch.float32, normalize=normalize, reduction=reduction
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=["M7", "M514-Dt1536", "M514-Dt256"])
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_matches_reference(backend, dtype, shape, normalize, reduction):
    # bf16 through the interpreter is exact here because the kernels upcast their dot
    # operands when interpreted; on GPU the same kernels run native 16-bit tensor-core dots.
    lead, d_s, d_t = shape
    student, weight, bias, target = make_inputs(lead, d_s, d_t, dtype)
    with use_backend(backend):
        check_against_reference(student, weight, bias, target, dtype=dtype, normalize=normalize, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_autocast_style_mixed_dtypes(backend, normalize):
    # bf16 activations and targets with fp32 master parameters: grads come back in each dtype.
    student, weight, bias, target = make_inputs((3, 61), 192, 256, torch.bfloat16, weight_dtype=torch.float32)
    with use_backend(backend):
        check_against_reference(student, weight, bias, target, dtype=torch.bfloat16, normalize=normalize)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_and_no_bias(backend, normalize, reduction, clean_backend_env):
    # A chunk size that does not divide M exercises the chunk loop and its tail.
    clean_backend_env.setenv("LEAP_KERNELS_CHUNK_TOKENS", "64")
    student, weight, bias, target = make_inputs((261,), 64, 100, torch.float32, bias=False)
    with use_backend(backend):
        check_against_reference(
            student, weight, None, target, dtype=torch.float32, normalize=normalize, reduction=reduction
        )


@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(normalize, reduction):
    # Finite differences on the op itself (float64 runs the torch backend).
    student, weight, bias, target = make_inputs((2, 5), 6, 7, torch.float64)

    def fn(s, w, b):
        return fused_feature_loss(s, w, b, target, normalize=normalize, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (student, weight, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_non_contiguous_inputs(backend, normalize):
    d_s, d_t = 64, 100
    student = torch.randn(197, 2, d_s).transpose(0, 1).requires_grad_()  # (2, 197, 64), strided
    weight_t = (torch.randn(d_s, d_t) / 8).requires_grad_()
    weight = weight_t.T  # (100, 64), transposed view
    bias = (0.1 * torch.randn(2 * d_t))[::2].detach().requires_grad_()
    target = torch.randn(2, 197, d_t + 28)[..., 3 : d_t + 3]  # sliced channels
    assert not (student.is_contiguous() or weight.is_contiguous() or target.is_contiguous())
    with use_backend(backend):
        loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
        grads = torch.autograd.grad(loss, (student, weight_t, bias))
    ref = fused_feature_loss_reference(
        student.double(), weight.double(), bias.double(), target.double(), normalize=normalize
    )
    ref_grads = torch.autograd.grad(ref, (student, weight_t, bias))
    assert_close_rel(loss, ref, 1e-5, "loss")
    for g, r in zip(grads, ref_grads):
        assert_close_rel(g, r, 1e-4, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("where", ["student", "target", "weight"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_and_inf_propagate(backend, normalize, where):
    student, weight, bias, target = make_inputs((7,), 64, 100, torch.float32)
    student, weight, target = student.detach().clone(), weight.detach().clone(), target.clone()
    {"student": student, "target": target, "weight": weight}[where][0, 3] = float("nan")
    with use_backend(backend):
        loss = fused_feature_loss(student.requires_grad_(), weight, bias, target, normalize=normalize)
        assert torch.isnan(loss), f"NaN in {where} gave {loss.item()}"
        target[0, 3] = float("inf")
        student = student.detach().nan_to_num_(0.0)
        weight = weight.detach().nan_to_num_(0.0)
        loss = fused_feature_loss(student, weight, bias, target, normalize=normalize, reduction="none")
        assert not torch.isfinite(loss[0]), "inf target must not give a finite loss for its token"
        assert torch.isfinite(loss[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend):
    student, weight, bias, target = make_inputs((197,), 64, 256, torch.float32)
    with use_backend(backend):
        with_grad = fused_feature_loss(student, weight, bias, target)
        with torch.no_grad():
            without = fused_feature_loss(student, weight, bias, target)
    assert not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backends_agree_bitwise_close(backend):
    student, weight, bias, target = make_inputs((2, 257), 192, 1536, torch.float32)
    out = {}
    for name in ("torch", backend):
        with use_backend(name):
            out[name] = fused_feature_loss(student, weight, bias, target, normalize=True, reduction="none")
    torch.testing.assert_close(out[backend], out["torch"], rtol=1e-5, atol=1e-6)


def test_module_front_end():
    head = leap_kernels.FeatureDistillationHead(64, 100, normalize=True)
    assert head.weight.shape == (100, 64) and torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.2)
    student = torch.randn(3, 11, 64, requires_grad=True)
    target = torch.randn(3, 11, 100)
    loss = head(student, target)
    ref = fused_feature_loss_reference(student, head.weight, head.bias, target, normalize=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None and student.grad is not None
    assert head.project(student).shape == (3, 11, 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_kept_gradients_do_not_overflow(backend):
    # |P - T| ~ 1e3 on every channel and a projection whose columns add up coherently: the student
    # gradient of sum(row_loss), 2 (P - T) W, reaches ~1.5e5 and overflowed fp16 (inf) when kept
    # unscaled; the loss's own gradient (mean) is ~0.5 and fits.
    d_s, d_t = 64, 1536
    student = torch.randn(197, d_s).half().requires_grad_()
    weight = (0.05 + 0.01 * torch.randn(d_t, d_s)).half().requires_grad_()
    bias = torch.zeros(d_t).half().requires_grad_()
    with torch.no_grad():
        projection = student.float() @ weight.float().T
    target = (projection - 1e3 + 50.0 * torch.randn(197, d_t)).half()
    with use_backend(backend):
        check_against_reference(student, weight, bias, target, dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_small_residuals_keep_their_precision(backend):
    # The other side of the kept scale: residuals ~1e-2 (a converged head) must not push the kept
    # student gradient into fp16's subnormals.
    student, weight, bias, target = make_inputs((197,), 192, 1536, torch.float16)
    with torch.no_grad():
        projection = student.float() @ weight.float().T + bias.float()
    target = (projection + 1e-2 * torch.randn_like(projection)).half()
    with use_backend(backend):  # "sum": the returned fp16 gradients are in the normal range themselves
        check_against_reference(student, weight, bias, target, dtype=torch.float16, reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_gradient_split_over_tokens(backend, normalize, reduction, clean_backend_env):
    # Several token splits per chunk and several chunks: the Triton loop accumulates each split's
    # weight/bias gradient across chunks and backward adds the splits; the other backends hand over
    # their one gradient in the same layout.
    from leap_kernels.ops.feature_loss import loops

    clean_backend_env.setattr(loops, "MIN_ROWS_PER_SPLIT", 64)
    clean_backend_env.setattr(loops, "DEFAULT_TRITON_CHUNK_TOKENS", 200)
    clean_backend_env.setattr(loops, "INTERPRETED", True)  # splits on CPU for every backend, as on a GPU
    assert loops.weight_grad_splits(261, torch.device("cpu")) == 4
    student, weight, bias, target = make_inputs((261,), 64, 100, torch.float32)
    with use_backend(backend):
        check_against_reference(
            student, weight, bias, target, dtype=torch.float32, normalize=normalize, reduction=reduction
        )


@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_split_weight_gradient_is_deterministic(normalize, clean_backend_env):
    from leap_kernels.ops.feature_loss import loops

    clean_backend_env.setattr(loops, "MIN_ROWS_PER_SPLIT", 64)
    clean_backend_env.setattr(loops, "DEFAULT_TRITON_CHUNK_TOKENS", 200)
    student, weight, bias, target = make_inputs((261,), 64, 100, torch.float32)
    runs = []
    for _ in range(2):
        with use_backend("triton"):
            loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
            runs.append(torch.autograd.grad(loss, (student, weight, bias)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_autotune_keys_bucket_the_token_count():
    from leap_kernels.ops import _triton_common
    from leap_kernels.ops import feature_loss as fl

    assert [_triton_common.m_bucket(m) for m in (1, 7, 197, 8192, 16384, 10**6)] == [1, 8, 256, 8192, 16384, 65536]
    for kernel in (fl._projection_loss_kernel, fl._grad_weight_kernel):
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys, kernel.keys


def test_token_normalized_projection_in_bf16_adds_little_error():
    # The Triton loop stores the projection in the compute dtype (bf16 here) before normalizing; the
    # torch backend keeps it in fp32. Both against float64: the extra error stays within bf16's own.
    student, weight, bias, target = make_inputs((2, 257), 384, 1536, torch.bfloat16)
    errors = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            loss = fused_feature_loss(student, weight, bias, target, normalize=True)
        ref, _ = reference_loss_and_grads(student, weight, bias, target, torch.ones(()), normalize=True)
        errors[backend] = abs(loss.item() - ref.item()) / ref.item()
    assert errors["triton"] <= RELATIVE_TOLERANCE[torch.bfloat16][0] / 4, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_rescale_and_strided_op(backend):
    ops = torch.ops.leap_kernels
    gs, gw, gb = torch.randn(7, 5).half(), torch.randn(3, 6, 5), torch.randn(3, 6)
    with use_backend(backend):
        for need in ([True, True, True], [True, False, False], [False, True, False]):
            torch.library.opcheck(
                ops.feature_loss_rescale.default,
                (gs, gw, gb, torch.tensor(0.7), 0.01, torch.float32, torch.bfloat16, need),
            )
        torch.library.opcheck(
            ops.feature_loss_rescale.default,
            (gs, gw, torch.empty(0), None, 2.0, torch.float16, torch.float16, [True, True, True]),
        )
        student = torch.randn(2, 9, 16, requires_grad=True)[:, 2:]  # (2, 7, 16) token slice
        target = torch.randn(2, 9, 24)[:, 2:]
        weight, bias = torch.randn(24, 16, requires_grad=True), torch.randn(24, requires_grad=True)
        torch.library.opcheck(
            ops.fused_feature_loss.default, (student, weight, bias, target, True, "mean", 1e-6, True, backend)
        )


@pytest.mark.parametrize("backend", ["torch", BACKENDS[2]])
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_bf16_cpu_gemm_paths_match_reference(backend, normalize, monkeypatch):
    """bf16 on CPU: GEMMs in bf16 (CPUs with native bf16 dot products) or on fp32 copies (the others).

    Both paths run here whatever the CPU (oneDNN emulates bf16 where it must), each against the float64
    reference; they round differently, so their results must differ, which shows the switch is honoured.
    """
    from leap_kernels.ops.feature_loss import loops

    lead, d_s, d_t = (2, 257), 192, 1536
    student, weight, bias, target = make_inputs(lead, d_s, d_t, torch.bfloat16)
    results = []
    for native in (False, True):
        monkeypatch.setattr(loops, "_cpu_has_bf16_dot", lambda native=native: native)
        assert loops.cpu_16bit_gemm(student) is native
        with use_backend(backend):
            check_against_reference(student, weight, bias, target, dtype=torch.bfloat16, normalize=normalize)
            loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
            results.append((loss.detach(), torch.autograd.grad(loss, student)[0]))
    (loss32, grad32), (loss16, grad16) = results
    assert not (torch.equal(loss32, loss16) and torch.equal(grad32, grad16)), "the bf16 GEMM switch changed nothing"
