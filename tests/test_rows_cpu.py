"""The CPU rows kernel of leap_kernels._C (csrc/cpu/rows_kernel.cpp) beyond tests/test_extension.py:
fixed-block determinism (any thread count), the one-sweep statistics' fallback for a row whose
first element is far from its mean, the large-output path (non-temporal stores, huge pages), the
16-bit rows read and written in place (against converted copies), and the bias added inside the kernel
by the chunk loop."""

import pytest
import torch
from tolerances import assert_close_rel

from leap_kernels import _ext

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"cpp backend: {_ext.load_error()}")
OPS = torch.ops.leap_kernels


def _reference(x, t, normalize, eps, row_scale):
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    if normalize:
        e = torch.nn.functional.layer_norm(x64, x64.shape[-1:], eps=eps) - torch.nn.functional.layer_norm(
            t64, t64.shape[-1:], eps=eps
        )
    else:
        e = x64 - t64
    loss = e.square().sum(-1)
    gx, gt = torch.autograd.grad((loss * row_scale.double()).sum(), (x64, t64))
    return loss, gx, gt


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("m,d", [(197, 384), (257, 100), (261, 1536), (1000, 192)])
def test_rows_kernel_bit_identical_across_runs_and_thread_counts(normalize, m, d):
    # Row counts not divisible by the 64-row blocks; results must not depend on the split.
    x, t = 2 * torch.randn(m, d) + 1, torch.randn(m, d)
    scale = torch.rand(m)

    def run():
        return OPS.rows_loss_grad(x, t, normalize, 1e-6, scale, True, True, True)

    first = run()
    for other in (run(), _with_threads(1, run)):
        for a, b in zip(first, other):
            assert torch.equal(a, b)
    ref = _reference(x, t, normalize, 1e-6, scale)
    for got, want, tol in zip(first, ref, (1e-5, 1e-4, 1e-4)):
        assert_close_rel(got, want, tol)


@needs_ext
def test_chunk_loop_bias_gradient_identical_for_any_thread_count():
    s, w, b, t = torch.randn(3001, 64), torch.randn(256, 64) / 8, torch.randn(256), torch.randn(3001, 256)

    def run():
        return OPS.feature_loss_chunks(s, w, b, t, True, 1e-6, True, None, 1024)

    # The row losses, the student gradient and the bias gradient come from the rows kernel's fixed
    # blocks; the weight gradient is an ATen GEMM, whose split over threads is its own.
    (loss, grad_s, _, grad_b), (loss1, grad_s1, _, grad_b1) = run(), _with_threads(1, run)
    assert grad_b.numel() == 256
    for a, c in ((loss, loss1), (grad_s, grad_s1), (grad_b, grad_b1)):
        assert torch.equal(a, c)


@needs_ext
@pytest.mark.parametrize("d", [100, 1536])
def test_statistics_with_an_outlier_first_element(d):
    # The one-sweep variance shifts by the row's first element; an outlier there (or a large
    # common offset with a small spread) must not cost accuracy.
    m = 64
    x = torch.randn(m, d) * 0.01 + 1000.0
    x[:, 0] = torch.randn(m) * 50.0  # far from the row mean
    t = torch.randn(m, d)
    t[::2, 0] = 1e4
    scale = torch.ones(m)
    loss, gx, gt = OPS.rows_loss_grad(x, t, True, 1e-6, scale, True, True, True)
    ref_loss, ref_gx, ref_gt = _reference(x, t, True, 1e-6, scale)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(gx, ref_gx, 1e-4, "grad x")
    assert_close_rel(gt, ref_gt, 1e-4, "grad t")


@needs_ext
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("m,d", [(2800, 1536), (42100, 100)], ids=["aligned-rows", "unaligned-rows"])
def test_large_outputs(normalize, m, d):
    # >= 32 MB of gradients: non-temporal stores (32-byte aligned rows only) and huge pages.
    x, t = torch.randn(m, d), torch.randn(m, d)
    scale = torch.rand(m)
    loss, gx, gt = OPS.rows_loss_grad(x, t, normalize, 1e-6, scale, True, True, True)
    ref_loss, ref_gx, ref_gt = _reference(x, t, normalize, 1e-6, scale)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(gx, ref_gx, 1e-4, "grad x")
    assert_close_rel(gt, ref_gt, 1e-4, "grad t")


@needs_ext
def test_nan_in_the_shift_element_stays_in_its_row():
    x, t = torch.randn(5, 192), torch.randn(5, 192)
    x[3, 0] = float("nan")  # the element the statistics shift by
    for normalize in (False, True):
        loss, gx, _ = OPS.rows_loss_grad(x, t, normalize, 1e-6, None, True, True, False)
        assert loss.isnan().tolist() == [False, False, False, True, False]
        assert gx[3].isnan().any() and torch.isfinite(gx[[0, 1, 2, 4]]).all()


@needs_ext
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("want_grads", [False, True])
def test_chunk_loop_bias_in_the_rows_kernel(normalize, want_grads):
    # The CPU loop adds the bias inside the rows kernel: a strided bias, several chunks with a short
    # last one, against float64.
    m, k, n = 261, 48, 100
    s = torch.randn(m, k)
    w = torch.randn(n, k) / 7
    b = torch.randn(2 * n)[::2]
    t = torch.randn(m, n)
    loss, gs, gw, gb = OPS.feature_loss_chunks(s, w, b, t, normalize, 1e-6, want_grads, None, 100)
    s64, w64, b64 = (v.double().requires_grad_() for v in (s, w, b))
    p = s64 @ w64.T + b64
    ref_loss, *grads = _reference(p, t, normalize, 1e-6, torch.ones(m))
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    if want_grads:
        p = s64 @ w64.T + b64
        if normalize:
            e = torch.nn.functional.layer_norm(p, (n,), eps=1e-6) - torch.nn.functional.layer_norm(
                t.double(), (n,), eps=1e-6
            )
        else:
            e = p - t.double()
        rs, rw, rb = torch.autograd.grad(e.square().sum(), (s64, w64, b64))
        assert_close_rel(gs, rs, 1e-4, "grad student")
        assert_close_rel(gw, rw, 1e-4, "grad weight")
        assert_close_rel(gb, rb, 1e-4, "grad bias")


def _strided_copy(x):
    """``x`` as a view with a column stride of 2: the kernel reads such rows through converted copies."""
    out = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype)[:, ::2]
    out.copy_(x)
    return out


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize(
    "m,d",
    [(197, 384), (261, 100), (257, 1536), (16387, 1024)],
    ids=["197x384", "261x100", "257x1536", "streamed-16387x1024"],  # the last: >= 32 MB of gradients
)
def test_16bit_rows_in_place_equal_converted_copies(dtype, normalize, m, d):
    # Contiguous 16-bit rows are swept in place (converted in registers); strided ones through fp32 copies.
    # The arithmetic is the same, so the results are bit-identical; and both match float64.
    x = (3.0 * torch.randn(m, d) + 5.0 * torch.randn(m, 1)).to(dtype)
    t = (0.5 * torch.randn(m, d) - 2.0 * torch.randn(m, 1)).to(dtype)
    scale = torch.rand(m)
    in_place = OPS.rows_loss_grad(x, t, normalize, 1e-6, scale, True, True, True)
    copied = OPS.rows_loss_grad(_strided_copy(x), _strided_copy(t), normalize, 1e-6, scale, True, True, True)
    for name, a, b in zip(("loss", "grad x", "grad t"), in_place, copied):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ref_loss, ref_gx, ref_gt = _reference(x, t, normalize, 1e-6, scale)
    assert_close_rel(in_place[0], ref_loss, 1e-5, "loss")
    assert_close_rel(in_place[1], ref_gx, 1e-2, "grad x")
    assert_close_rel(in_place[2], ref_gt, 1e-2, "grad t")
