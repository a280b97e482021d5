"""torch.library registration: opcheck, torch.compile(fullgraph=True), backends and dispatch."""

import pytest
import torch
from tolerances import BACKENDS

import leap_kernels
from leap_kernels import fused_feature_loss, token_normalized_mse, use_backend
from leap_kernels.ops import _triton_common
from leap_kernels.ops.naive import fused_feature_loss_reference, token_normalized_mse_reference

OPS = torch.ops.leap_kernels


def _feature_args(m=13, d_s=16, d_t=24, bias=True, dtype=torch.float32):
    s = torch.randn(m, d_s, dtype=dtype, requires_grad=True)
    w = torch.randn(d_t, d_s, dtype=dtype, requires_grad=True)
    b = torch.randn(d_t, dtype=dtype, requires_grad=True) if bias else None
    t = torch.randn(m, d_t, dtype=dtype)
    return s, w, b, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fused_feature_loss(backend, normalize, reduction, bias):
    s, w, b, t = _feature_args(bias=bias)
    compute_grads = reduction != "none"
    with use_backend(backend):  # the ops run the backend they are given; the rescale in backward dispatches
        torch.library.opcheck(
            OPS.fused_feature_loss.default, (s, w, b, t, normalize, reduction, 1e-6, compute_grads, backend)
        )
        row_scale = torch.rand(s.shape[0])
        torch.library.opcheck(
            OPS.fused_feature_loss_backward.default,
            (row_scale, s.detach(), w.detach(), b.detach() if b is not None else None, t, normalize, 1e-6, backend),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck_token_normalized_mse(backend, reduction):
    x = torch.randn(11, 40, requires_grad=True)
    t = torch.randn(11, 40, requires_grad=True)
    with use_backend(backend):
        torch.library.opcheck(OPS.token_normalized_mse.default, (x, t, reduction, 1e-6))
        torch.library.opcheck(
            OPS.token_normalized_mse_backward.default, (torch.rand(11), x.detach(), t.detach(), 1e-6, True, True)
        )


@pytest.mark.parametrize("backend", [BACKENDS[-1]])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_opcheck_token_normalized_mse_with_grads(backend, reduction):
    x = torch.randn(11, 40, requires_grad=True)
    t = torch.randn(11, 40, requires_grad=True)
    with use_backend(backend):
        torch.library.opcheck(OPS.token_normalized_mse_with_grads.default, (x, t, reduction, 1e-6, True, True))
        torch.library.opcheck(
            OPS.token_normalized_mse_with_grads.default, (x, t.detach(), reduction, 1e-6, True, False)
        )


@pytest.mark.parametrize("normalize", [False, True])
def test_torch_compile_fullgraph(normalize):
    torch._dynamo.reset()
    s, w, b, t = _feature_args(m=2 * 9, d_s=16, d_t=24)
    s3 = s.detach().reshape(2, 9, 16).requires_grad_()
    t3 = t.reshape(2, 9, 24)

    def step(student, weight, bias, target):
        projected_loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
        cls_loss = fused_feature_loss(student[:, 0], weight, bias, target[:, 0], normalize=normalize)
        extra = token_normalized_mse(student, student.detach() * 2 + 1)
        return projected_loss + 0.05 * cls_loss + extra

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(s3, w, b, t3)
    grads = torch.autograd.grad(loss, (s3, w, b))
    s64, w64, b64 = (x.detach().double().requires_grad_() for x in (s3, w, b))
    ref = (
        fused_feature_loss_reference(s64, w64, b64, t3.double(), normalize=normalize)
        + 0.05 * fused_feature_loss_reference(s64[:, 0], w64, b64, t3[:, 0].double(), normalize=normalize)
        + token_normalized_mse_reference(s64, s64.detach() * 2 + 1)
    )
    ref_grads = torch.autograd.grad(ref, (s64, w64, b64))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_torch_compile_inductor_forward():
    torch._dynamo.reset()
    s, w, b, t = _feature_args()
    compiled = torch.compile(lambda *a: fused_feature_loss(*a, normalize=True), fullgraph=True)
    with torch.no_grad():
        out = compiled(s, w, b, t)
    ref = fused_feature_loss_reference(s.double(), w.double(), b.double(), t.double(), normalize=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- backends


def test_backends_lists_reasons(clean_backend_env):
    status = leap_kernels.backends("cpu")
    assert list(status) == ["cuda", "triton", "cpp", "torch"]
    assert status["torch"].usable and status["torch"].reasons == ()
    assert not status["cuda"].usable and any("cpu" in r for r in status["cuda"].reasons)
    assert status["cpp"].usable == leap_kernels._ext.available()
    assert status["triton"].usable  # the test suite runs with TRITON_INTERPRET=1
    clean_backend_env.setenv("TRITON_INTERPRET", "0")
    status = leap_kernels.backends("cpu")
    assert not status["triton"].usable
    assert any("TRITON_INTERPRET" in r for r in status["triton"].reasons)


def test_auto_dispatch_falls_back_to_torch_without_interpreter(clean_backend_env):
    clean_backend_env.setenv("TRITON_INTERPRET", "0")
    s, w, b, t = _feature_args()
    loss = fused_feature_loss(s, w, b, t)  # auto: triton cannot run on CPU, torch does
    ref = fused_feature_loss_reference(s.double(), w.double(), b.double(), t.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_forced_backend_that_cannot_run_raises_with_reason(clean_backend_env):
    clean_backend_env.setenv("LEAP_KERNELS_BACKEND", "triton")
    s, w, b, t = _feature_args(dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"backend 'triton' was forced.*float64"):
        fused_feature_loss(s, w, b, t)
    clean_backend_env.setenv("TRITON_INTERPRET", "0")
    s, w, b, t = _feature_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_feature_loss(s, w, b, t)


def test_env_switch_selects_and_validates(clean_backend_env):
    from leap_kernels._backends import select_backend

    x = torch.randn(3, 8)
    clean_backend_env.setenv("LEAP_KERNELS_BACKEND", "torch")
    assert select_backend("fused_feature_loss", [x]) == "torch"
    clean_backend_env.setenv("LEAP_KERNELS_BACKEND", "triton")
    assert select_backend("fused_feature_loss", [x]) == "triton"
    with pytest.raises(RuntimeError, match="the triton backend has no op kernel"):
        select_backend("op", [x])
    clean_backend_env.setenv("LEAP_KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="LEAP_KERNELS_BACKEND"):
        select_backend("op", [x])
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("nope"):
            pass
    clean_backend_env.delenv("LEAP_KERNELS_BACKEND")
    # Automatic order on CPU: cpp, torch (the interpreted Triton only when forced); an op no
    # compiled kernel exists for runs on torch.
    expected = "cpp" if leap_kernels._ext.available() else "torch"
    assert select_backend("fused_feature_loss", [x]) == expected
    assert select_backend("op", [x]) == "torch"
    with use_backend("torch"):
        assert select_backend("fused_feature_loss", [x]) == "torch"
    with use_backend("triton"):
        assert select_backend("fused_feature_loss", [x]) == "triton"


def test_chunk_env_validated(clean_backend_env):
    clean_backend_env.setenv("LEAP_KERNELS_CHUNK_TOKENS", "zero")
    s, w, b, t = _feature_args()
    with pytest.raises(ValueError, match="LEAP_KERNELS_CHUNK_TOKENS"):
        fused_feature_loss(s, w, b, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_rescale_keeps_the_factor_in_fp32(backend, dtype):
    # A mean over many elements gives a factor like 1/(M*D_t) ~ 2e-8: it underflows to 0 in fp16
    # and loses up to 0.4% in bf16 if rounded before the multiply.
    x = torch.full((1000,), 96.0, dtype=dtype)
    factor = torch.tensor(1.0 / (32768 * 1536) * 1.003)
    kept_weight, kept_bias = torch.zeros(1, 1, 1), torch.zeros(1, 1)  # only the student gradient is asked for
    with use_backend(backend):
        out, _, _ = OPS.feature_loss_rescale(
            x, kept_weight, kept_bias, factor, 1.0, torch.float32, torch.float32, [True, False, False]
        )
    expected = (x.double() * factor.double()).to(dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out != 0).all()


def test_unverified_cuda_kernels_are_never_chosen_automatically(clean_backend_env):
    from leap_kernels._backends import _BACKENDS, dispatch_order

    cuda = _BACKENDS["cuda"]
    meta = torch.empty(4, 8, device="meta")
    # The declaration, not this machine: every CUDA kernel carries the "not verified" reason in
    # automatic dispatch, none when forced.
    for op in ("fused_feature_loss", "token_normalized_mse", "teacher_attention"):
        assert not cuda.ops[op].verified
        auto = cuda.not_supported_reasons(op, [meta], auto=True)
        forced = cuda.not_supported_reasons(op, [meta], auto=False)
        assert any("not yet verified on a GPU" in r and "LEAP_KERNELS_BACKEND=cuda" in r for r in auto), auto
        assert not any("not yet verified" in r for r in forced)
    assert dispatch_order("cpu") == ("cpp", "torch")
    assert dispatch_order("meta")[-1] == "torch"


def test_backend_declarations_give_reasons():
    from leap_kernels._backends import _BACKENDS

    x64 = torch.randn(3, 8, dtype=torch.float64)
    reasons = _BACKENDS["cpp"].not_supported_reasons("fused_feature_loss", [x64])
    assert any("float64" in r for r in reasons)
    reasons = _BACKENDS["cpp"].not_supported_reasons("teacher_attention", [torch.randn(1, 2, 6)])
    assert reasons and "no teacher_attention kernel" in reasons[-1]
    reasons = _BACKENDS["triton"].not_supported_reasons("token_normalized_mse", [torch.randn(2, 4)], row_width=20000)
    assert any("row width 20000" in r for r in reasons)


def test_forced_backend_reaches_other_threads(clean_backend_env):
    # Autograd runs CUDA backward ops on its own threads: a forced backend must be seen there too.
    import threading

    from leap_kernels import _backends

    seen = []
    with leap_kernels.use_backend("torch"):
        worker = threading.Thread(target=lambda: seen.append(_backends._requested_backend()))
        worker.start()
        worker.join()
    seen.append(_backends._requested_backend())
    assert seen == ["torch", "auto"]


@pytest.mark.skipif(not _triton_common.HAS_TRITON or not _triton_common.INTERPRETED, reason="Triton interpreter only")
def test_interpreter_runtime_ints_bound_range_loops():
    # Triton < 3.7's interpreter converts runtime ints (1-element arrays) with int(), which NumPy >= 2.4
    # refuses; leap_kernels squeezes them first so kernels keep runtime loop bounds on every Triton.
    import numpy as np
    from triton.runtime import interpreter

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Handle:
        data = np.array([261], dtype=np.int32)

    class FakeTensor:
        handle = Handle()

    interpreter._patch_lang_tensor(FakeTensor, Scope())
    assert list(range(0, FakeTensor(), 100)) == [0, 100, 200]
