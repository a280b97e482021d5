"""token_normalized_mse against a float64 evaluation of the plain PyTorch reference."""

import pytest
import torch
from tolerances import BACKENDS, RELATIVE_TOLERANCE, assert_close_rel

from leap_kernels import token_normalized_mse, use_backend
from leap_kernels.ops.naive import token_normalized_mse_reference

SHAPES = [(1, 100), (7, 192), (197, 384), (2, 257, 1536), (261, 100), (3, 5, 64)]


def make_pair(shape, dtype):
    # Per-token offsets and scales, as teacher features have.
    x = (3.0 * torch.randn(shape) + 5.0 * torch.randn(*shape[:-1], 1)).to(dtype).requires_grad_()
    t = (0.5 * torch.randn(shape) - 2.0 * torch.randn(*shape[:-1], 1)).to(dtype).requires_grad_()
    return x, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_with_both_gradients(backend, shape, dtype, reduction):
    x, t = make_pair(shape, dtype)
    with use_backend(backend):
        loss = token_normalized_mse(x, t, reduction=reduction)
        grad_out = torch.randn_like(loss) if loss.dim() else torch.randn(()).abs() + 0.5
        if reduction == "mean":
            # As a loss scaler would: mean-reduced fp16 gradients are otherwise subnormal.
            grad_out = grad_out * x.numel()
        gx, gt = torch.autograd.grad(loss, (x, t), grad_out)
    x64, t64 = (a.detach().double().requires_grad_() for a in (x, t))
    ref = token_normalized_mse_reference(x64, t64, reduction=reduction)
    rx, rt = torch.autograd.grad(ref, (x64, t64), grad_out.double())
    loss_tol, grad_tol = RELATIVE_TOLERANCE[dtype]
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ref, loss_tol, "loss")
    assert gx.dtype == dtype and gt.dtype == dtype
    assert_close_rel(gx, rx, grad_tol, "grad input")
    assert_close_rel(gt, rt, grad_tol, "grad target")


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_input_requires_grad(backend):
    x, t = make_pair((197, 100), torch.float32)
    t = t.detach()
    with use_backend(backend):
        loss = token_normalized_mse(x, t)
    loss.backward()
    ref_x = x.detach().double().requires_grad_()
    token_normalized_mse_reference(ref_x, t.double()).backward()
    assert_close_rel(x.grad, ref_x.grad, 1e-4, "grad input")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    x, t = make_pair((4, 9), torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: token_normalized_mse(a, b, reduction=reduction), (x, t), eps=1e-6, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    base = torch.randn(100, 3, 64)
    x = base.transpose(0, 1).requires_grad_()  # (3, 100, 64), strided rows
    t = torch.randn(3, 100, 128)[..., ::2]  # strided channels
    with use_backend(backend):
        loss = token_normalized_mse(x, t)
    ref = token_normalized_mse_reference(x.double(), t.double())
    assert_close_rel(loss, ref, 1e-5, "loss")
    (gx,) = torch.autograd.grad(loss, x)
    (rx,) = torch.autograd.grad(ref, x)
    assert_close_rel(gx, rx, 1e-4, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_per_token(backend):
    x, t = make_pair((5, 100), torch.float32)
    x = x.detach().clone()
    x[2, 7] = float("nan")
    with use_backend(backend):
        per_token = token_normalized_mse(x, t.detach(), reduction="none")
        total = token_normalized_mse(x, t.detach())
    assert torch.isnan(per_token[2]) and torch.isfinite(per_token[[0, 1, 3, 4]]).all()
    assert torch.isnan(total)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_tokens_are_finite(backend):
    # A constant token has zero variance: eps keeps it finite (LN of it is 0).
    x = torch.ones(4, 64, requires_grad=True)
    t = torch.randn(4, 64)
    with use_backend(backend):
        loss = token_normalized_mse(x, t, reduction="none")
        (gx,) = torch.autograd.grad(loss.sum(), x)
    ref = token_normalized_mse_reference(x.double(), t.double(), reduction="none")
    assert_close_rel(loss, ref, 1e-5, backend)
    assert torch.isfinite(gx).all()


# ----------------------------------------------------------------------------- cpp: gradients written by the forward

CPP = BACKENDS[-1]


def _reference_grads(x, t, reduction, upstream):
    x64, t64 = (a.detach().double().requires_grad_() for a in (x, t))
    ref = token_normalized_mse_reference(x64, t64, reduction=reduction)
    return ref, torch.autograd.grad(ref, (x64, t64), torch.tensor(upstream, dtype=torch.float64))


@pytest.mark.parametrize("backend", [CPP])
@pytest.mark.parametrize(
    "dtype, reduction",
    [
        (torch.float32, "mean"),
        (torch.float32, "sum"),
        (torch.bfloat16, "mean"),
        (torch.bfloat16, "sum"),
        (torch.float16, "sum"),  # a mean's fp16 gradients at this size are subnormal
    ],
    ids=["fp32-mean", "fp32-sum", "bf16-mean", "bf16-sum", "fp16-sum"],
)
@pytest.mark.parametrize("upstream", [1.0, 2.5], ids=["unit", "scaled"])
def test_cpp_forward_written_gradients(backend, dtype, reduction, upstream):
    """An upstream gradient of 1 gets the forward's buffer; another one rescales (fp32) or recomputes (16-bit)."""
    x, t = make_pair((3, 261, 100), dtype)
    with use_backend(backend):
        loss = token_normalized_mse(x, t, reduction=reduction)
    gx, gt = torch.autograd.grad(loss, (x, t), torch.tensor(upstream), retain_graph=True)
    again_x, again_t = torch.autograd.grad(loss, (x, t), torch.tensor(upstream))  # recomputed: the buffer was given
    ref, (rx, rt) = _reference_grads(x, t, reduction, upstream)
    loss_tol, grad_tol = RELATIVE_TOLERANCE[dtype]
    assert_close_rel(loss, ref, loss_tol, "loss")
    for name, got, want in [("x", gx, rx), ("t", gt, rt), ("x again", again_x, rx), ("t again", again_t, rt)]:
        assert got.dtype == dtype, name
        assert_close_rel(got, want, grad_tol, f"grad {name}")


@pytest.mark.parametrize("backend", [CPP])
def test_cpp_unit_upstream_returns_the_forward_buffer(backend):
    x = torch.randn(197, 384, requires_grad=True)
    t = torch.randn(197, 384)
    with use_backend(backend):
        loss = token_normalized_mse(x, t)
    kept_input, kept_target = loss.grad_fn.kept
    assert kept_target is None  # the target needs no gradient: none was written
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.data_ptr() == kept_input.data_ptr()
    assert loss.grad_fn.kept == (None, None)  # handed on, not held


@pytest.mark.parametrize("backend", [CPP])
def test_cpp_no_gradient_written_without_grad_mode(backend):
    x = torch.randn(64, 100, requires_grad=True)
    with use_backend(backend), torch.no_grad():
        loss = token_normalized_mse(x, torch.randn(64, 100))
    assert loss.grad_fn is None


@pytest.mark.parametrize("backend", [CPP])
def test_cpp_compiled_takes_the_recomputing_path(backend):
    torch._dynamo.reset()
    x, t = make_pair((2, 197, 100), torch.float32)
    compiled = torch.compile(lambda a, b: token_normalized_mse(a, b), fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        loss = compiled(x, t)
    gx, gt = torch.autograd.grad(loss, (x, t))
    ref, (rx, rt) = _reference_grads(x, t, "mean", 1.0)
    assert_close_rel(loss, ref, 1e-5, "loss")
    assert_close_rel(gx, rx, 1e-4, "grad x")
    assert_close_rel(gt, rt, 1e-4, "grad t")
