"""Every op on a CUDA GPU, for every backend, against a float64 evaluation of the plain PyTorch
reference (leap_kernels.ops.naive), at the paper's shapes and at odd ones.

Marked ``gpu``: skipped unless selected with ``-m gpu`` and a CUDA device is present
(``tools/gpu_check.sh`` runs them with ``TRITON_INTERPRET=0``). The backends come from
``leap_kernels.backends("cuda")`` at collection time, so a new backend is tested without editing
this file; each case forces one with ``leap_kernels.use_backend`` and is skipped, with the
backend's reasons, when that backend cannot run the inputs (e.g. ``cpp`` on CUDA tensors, a
``cuda`` backend whose extension was not built). The tolerances are those of the CPU suite
(``tests/tolerances.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tolerances import RELATIVE_TOLERANCE, assert_close_rel, relative_error

import leap_kernels
from leap_kernels import fused_feature_loss, teacher_attention, token_normalized_mse, use_backend
from leap_kernels.ops.naive import (
    fused_feature_loss_reference,
    teacher_attention_reference,
    token_normalized_mse_reference,
)

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def _backend_names() -> list[str]:
    try:
        return list(leap_kernels.backends("cuda"))
    except Exception:  # a registry that cannot describe CUDA here still names its backends
        return list(leap_kernels.backends())


# Every registered backend, forced, and "auto" (what users get: automatic dispatch on CUDA tensors).
BACKENDS = _backend_names() + ["auto"]
FORCED_BUT_CANNOT = "was forced but cannot run"

# The paper's per-GPU step: 128 images x 256 patch tokens, ViT-S (384) -> ViT-g (1536).
PAPER = ((128, 256), 384, 1536)
# Odd shapes: one token with odd widths, three ViT-B/16 images, a chunk boundary (8192 + 1 tokens) with
# D_s = 100; bf16 on all of them, fp32 on the first.
ODD = [((1,), 64, 100, "bf16"), ((1,), 64, 100, "fp32"), ((3, 197), 192, 1536, "bf16"), ((8193,), 100, 1536, "bf16")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _compiled_kernels_no_tf32():
    """The GPU checks test the compiled kernels in full fp32 (TF32 off, as the tolerances assume)."""
    from leap_kernels.ops._triton_common import INTERPRETED

    if INTERPRETED:
        pytest.fail(
            "TRITON_INTERPRET is on: the GPU tests would run the Triton interpreter, not the compiled "
            "kernels. Run them with TRITON_INTERPRET=0 (tools/gpu_check.sh does)."
        )
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def forced(backend):
    """``use_backend(backend)`` and ``LEAP_KERNELS_BACKEND=backend``: ``use_backend`` holds for the current
    thread only, and autograd runs the backward of CUDA tensors on its own device threads."""
    previous = os.environ.get(leap_kernels.ENV_BACKEND)
    os.environ[leap_kernels.ENV_BACKEND] = backend
    try:
        with use_backend(backend):
            yield
    finally:
        if previous is None:
            os.environ.pop(leap_kernels.ENV_BACKEND, None)
        else:
            os.environ[leap_kernels.ENV_BACKEND] = previous


def run_forced(backend, fn, *args, **kwargs):
    """``fn`` with ``backend`` forced; skips (with the backend's reasons) if it cannot run these inputs."""
    try:
        with forced(backend):
            return fn(*args, **kwargs)
    except RuntimeError as exc:
        if FORCED_BUT_CANNOT in str(exc):
            pytest.skip(f"{backend}: {exc}")
        raise


def _ids(shape):
    lead, d_s, d_t, dtype = shape
    return f"M{math.prod(lead)}-Ds{d_s}-Dt{d_t}-{dtype}"


# ----------------------------------------------------------------------------- fused_feature_loss


def feature_inputs(lead, d_s, d_t, dtype, *, param_dtype=None):
    param_dtype = param_dtype or dtype
    student = torch.randn(*lead, d_s, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(d_t, d_s, device="cuda") / math.sqrt(d_s)).to(param_dtype).requires_grad_()
    bias = (0.1 * torch.randn(d_t, device="cuda")).to(param_dtype).requires_grad_()
    # Teacher-like targets: a per-token mean and scale, so the normalization matters.
    target = (2.0 * torch.randn(*lead, d_t, device="cuda") + torch.randn(*lead, 1, device="cuda")).to(dtype)
    return student, weight, bias, target


def check_feature_loss(backend, lead, d_s, d_t, dtype, normalize, reduction, *, param_dtype=None):
    student, weight, bias, target = feature_inputs(lead, d_s, d_t, dtype, param_dtype=param_dtype)
    loss = run_forced(
        backend, fused_feature_loss, student, weight, bias, target, normalize=normalize, reduction=reduction
    )
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    grad_out = torch.randn_like(loss) if loss.dim() else torch.rand((), device="cuda") + 0.5
    inputs = (student, weight, bias)
    with forced(backend):
        grads = torch.autograd.grad(loss, inputs, grad_out)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    ref = fused_feature_loss_reference(*leaves, target.double(), normalize=normalize, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    loss_tol, grad_tol = RELATIVE_TOLERANCE[dtype]
    assert_close_rel(loss, ref, loss_tol, f"{backend} loss")
    for name, g, r, x in zip(("student", "weight", "bias"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype, f"{backend} grad {name}: dtype {g.dtype} != {x.dtype}"
        assert_close_rel(g, r, grad_tol, f"{backend} grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_feature_loss_paper_shape(backend, dtype, normalize, reduction):
    lead, d_s, d_t = PAPER
    check_feature_loss(backend, lead, d_s, d_t, DTYPES[dtype], normalize, reduction)


# ----------------------------------------------------------------------------- teacher_attention


def make_qkv(b, n, h, d, dtype, layout="packed", spread=1.0):
    c = 3 * h * d
    if layout == "packed":
        qkv = torch.randn(b, n, c, device="cuda")
    elif layout == "batch-slice":  # a storage offset and the batch stride of the full tensor
        qkv = torch.randn(b + 1, n, c, device="cuda")[1:]
    elif layout == "padded-rows":  # token stride c + 40, channel stride 1
        qkv = torch.randn(b, n, c + 40, device="cuda")[..., 8 : 8 + c]
    else:
        raise ValueError(layout)
    return (spread * qkv).to(dtype)


def check_attention(backend, qkv, h, dtype, scale=None):
    with torch.no_grad():
        out = run_forced(backend, teacher_attention, qkv, h, scale=scale)
    ref = teacher_attention_reference(qkv.double(), h, scale=scale)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == ref.shape
    assert_close_rel(out, ref, RELATIVE_TOLERANCE[dtype][0], f"{backend} attention")


# Each new (N, d, dtype) is a new autotuning session of the Triton kernel (five compiles on a fresh
# machine), so the odd shapes mix head dims and dtypes instead of crossing them.
ATTENTION_CASES = [
    # (B, H, N, d, dtype, layout): ViT-g/14 reg4 at 224 px (N = 261) and 448 px (N = 1025), d = 128
    (128, 24, 261, 64, "bf16", "packed"),
    (32, 24, 1025, 64, "bf16", "packed"),
    (64, 12, 261, 128, "bf16", "packed"),
    # odd token counts: one key, one partial key tile, ViT-B/16 and ViT-S/14 token counts, long sequences
    (2, 3, 1, 64, "bf16", "packed"),
    (2, 3, 5, 128, "fp16", "packed"),
    (2, 3, 197, 64, "fp16", "packed"),
    (2, 3, 257, 128, "bf16", "packed"),
    (2, 3, 577, 128, "bf16", "packed"),
    (2, 3, 1370, 64, "bf16", "packed"),
    # strided views of qkv, the small head dims
    (3, 6, 261, 64, "bf16", "batch-slice"),
    (3, 6, 261, 64, "fp16", "padded-rows"),
    (4, 16, 261, 32, "fp16", "packed"),
    (2, 4, 100, 16, "bf16", "packed"),
    # inputs only the torch backend takes (fp32; head dim 48): the others skip, auto falls back
    (2, 3, 261, 64, "fp32", "packed"),
    (2, 3, 261, 48, "bf16", "packed"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,h,n,d,dtype,layout", ATTENTION_CASES, ids=lambda v: str(v))
def test_teacher_attention(backend, b, h, n, d, dtype, layout):
    dtype = DTYPES[dtype]
    check_attention(backend, make_qkv(b, n, h, d, dtype, layout), h, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_attention_peaked_softmax_and_scale(backend):
    # Logits with std ~ 30: the running max changes across key tiles.
    qkv = make_qkv(4, 261, 6, 64, torch.bfloat16, spread=3.0)
    check_attention(backend, qkv, 6, torch.bfloat16)
    check_attention(backend, qkv, 6, torch.bfloat16, scale=0.37)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_teacher_attention_kernel_vs_timm(backend):
    """ViT-g/14 reg4 geometry (width 1536, 24 heads of 64, 261 tokens at 224 px), 3 blocks, bf16: the
    teacher with the attention op against timm's own forward, both against the float64 teacher."""
    pytest.importorskip("timm")
    import copy

    from leap.models import build_model
    from leap.teacher import TruncatedTeacher

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model("vit_giant_patch14_reg4_dinov2", img_size=224, depth=3)
    with torch.no_grad():  # LayerScale starts at 1e-5: make the attention branch count
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    truth = TruncatedTeacher(copy.deepcopy(model), dtype=torch.float64, attention_kernel=False)
    teacher = TruncatedTeacher(model, dtype=torch.bfloat16, attention_kernel=True)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        patch, cls = run_forced(backend, teacher, x, 3)
        teacher.attention_kernel = False
        timm_patch, timm_cls = teacher(x, 3)
        ref_patch, ref_cls = truth(x.double(), 3)
    assert patch.dtype == torch.bfloat16 and patch.shape == (8, 256, 1536)
    # Two bf16 paths through three wide blocks: they differ by about their own error against float64.
    assert_close_rel(patch, timm_patch, 2e-2, f"{backend} kernel vs timm, patch tokens")
    assert_close_rel(cls, timm_cls, 3e-2, f"{backend} kernel vs timm, cls")
    for ours, timm_out, ref, what in ((patch, timm_patch, ref_patch, "patch"), (cls, timm_cls, ref_cls, "cls")):
        ours_err, timm_err = relative_error(ours, ref), relative_error(timm_out, ref)
        assert ours_err <= 1.5 * timm_err + 1e-3, f"{backend} {what}: error {ours_err:.2e} vs timm's {timm_err:.2e}"


# ----------------------------------------------------------------------------- token_normalized_mse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,d", [(128 * 256, 1536), (1, 100), (257, 1536), (2 * 261, 384)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_normalized_mse(backend, m, d, dtype, reduction):
    dtype = DTYPES[dtype]
    # Large per-token means: the two-pass statistics must not cancel.
    x = (3 * torch.randn(m, d, device="cuda") + 5 * torch.randn(m, 1, device="cuda")).to(dtype).requires_grad_()
    t = torch.randn(m, d, device="cuda").to(dtype).requires_grad_()
    loss = run_forced(backend, token_normalized_mse, x, t, reduction=reduction)
    assert loss.dtype == torch.float32
    grad_out = torch.randn_like(loss) if loss.dim() else torch.rand((), device="cuda") + 0.5
    with forced(backend):
        gx, gt = torch.autograd.grad(loss, (x, t), grad_out)
    x64, t64 = (a.detach().double().requires_grad_() for a in (x, t))
    ref = token_normalized_mse_reference(x64, t64, reduction=reduction)
    rx, rt = torch.autograd.grad(ref, (x64, t64), grad_out.double())
    loss_tol, grad_tol = RELATIVE_TOLERANCE[dtype]
    assert_close_rel(loss, ref, loss_tol, f"{backend} loss")
    assert_close_rel(gx, rx, grad_tol, f"{backend} grad input")
    assert_close_rel(gt, rt, grad_tol, f"{backend} grad target")


# ----------------------------------------------------------------------------- CUDA graphs

GRAPH_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import leap_kernels

    backend = sys.argv[1]  # also in LEAP_KERNELS_BACKEND (set by the test): autograd's threads see it
    normalize = sys.argv[2] == "1"
    torch.manual_seed(0)
    # The paper's step (two chunks, split weight gradient) on the token slice x[:, 5:] the trainer passes.
    b_, n, prefix, d_s, d_t = 128, 256, 5, 384, 1536
    s_full = torch.randn(b_, n + prefix, d_s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(d_t, d_s, device="cuda") / d_s ** 0.5).requires_grad_()
    b = torch.zeros(d_t, device="cuda", requires_grad=True)
    t_full = torch.randn(b_, n + prefix, d_t, device="cuda", dtype=torch.bfloat16)

    def step():
        with leap_kernels.use_backend(backend):
            loss = leap_kernels.fused_feature_loss(s_full[:, prefix:], w, b, t_full[:, prefix:], normalize=normalize)
            return (loss, *torch.autograd.grad(loss, (s_full, w, b)))

    def report(status, message="", errors=None):
        print("RESULT " + json.dumps({"status": status, "message": message, "errors": errors or {}}))
        sys.exit(0)

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: autotuning, allocator, lazy init
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
    except RuntimeError as exc:
        if "was forced but cannot run" in str(exc):
            report("cannot", str(exc))
        raise
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as exc:
        report("sync", str(exc).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():  # new values in the captured input buffers
        s_full.copy_(torch.randn_like(s_full))
        t_full.copy_(torch.randn_like(t_full))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    errors = {name: ((g.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)).item()
              for name, g, e in zip(("loss", "student", "weight", "bias"), static, eager)}
    report("ok", errors=errors)
""")

# Backends whose fused loss must be capturable (no host sync): the Triton kernels, and what auto picks.
MUST_CAPTURE = ("triton", "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_cuda_graph_capture_fused_loss(backend, normalize):
    """One fused-loss forward+backward at the paper's shape on a token slice, captured in a CUDA graph
    after warm-up, replayed on new inputs copied into the captured buffers, equals an eager step. In a
    subprocess: a failed capture can leave the CUDA context unusable."""
    env = {**os.environ, "TRITON_INTERPRET": "0", leap_kernels.ENV_BACKEND: backend}
    proc = subprocess.run(
        [sys.executable, "-c", GRAPH_SCRIPT, backend, "1" if normalize else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{backend}: capture failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    if result["status"] == "cannot":
        pytest.skip(f"{backend}: {result['message']}")
    if result["status"] == "sync":
        assert backend not in MUST_CAPTURE, f"{backend}: the fused loss synchronizes with the host: {result['message']}"
        pytest.skip(
            f"{backend} synchronizes with the host in the fused loss, so it cannot be captured: {result['message']}"
        )
    # Same kernels, same inputs: a replay differs from eager only by run-to-run reduction order.
    for name, err in result["errors"].items():
        assert err <= 1e-3, f"{backend}: graph replay vs eager, {name}: relative error {err:.2e}"


@pytest.mark.parametrize("normalize,target_mb", [(False, 130), (True, 150)], ids=["mse", "token-mse"])
def test_triton_feature_loss_peak_memory_paper_shape(normalize, target_mb):
    """Peak extra memory of one fwd+bwd at the paper's shape (bf16), as bench/harness.peak_extra_mb
    measures it (MiB above what existed before), within the targets; tests/test_launch_count.py has
    the CPU estimate."""
    lead, d_s, d_t = PAPER
    student, weight, bias, target = feature_inputs(lead, d_s, d_t, torch.bfloat16)

    def step():
        with forced("triton"):
            loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
            torch.autograd.grad(loss, (student, weight, bias))

    step()  # autotuning clones buffers: not part of a training step
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert peak <= target_mb, f"peak extra memory {peak:.1f} MiB > {target_mb} MB"


@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_triton_feature_loss_is_deterministic(normalize):
    # The weight gradient is split over tokens and the splits are added in a fixed order (no atomics).
    lead, d_s, d_t = PAPER
    student, weight, bias, target = feature_inputs(lead, d_s, d_t, torch.bfloat16)
    runs = []
    for _ in range(2):
        with forced("triton"):
            loss = fused_feature_loss(student, weight, bias, target, normalize=normalize)
            runs.append((loss, *torch.autograd.grad(loss, (student, weight, bias))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_loss_fp16_large_residuals(backend):
    # |P - T| ~ 1e3 with coherent columns: the kept student gradient of sum(row_loss) would overflow fp16.
    student = torch.randn(2 * 261, 384, device="cuda").half().requires_grad_()
    weight = (0.05 + 0.01 * torch.randn(1536, 384, device="cuda")).half().requires_grad_()
    bias = torch.zeros(1536, device="cuda").half().requires_grad_()
    with torch.no_grad():
        target = (student.float() @ weight.float().T - 1e3 + 50 * torch.randn(2 * 261, 1536, device="cuda")).half()
    loss = run_forced(backend, fused_feature_loss, student, weight, bias, target)
    with forced(backend):
        grads = torch.autograd.grad(loss, (student, weight, bias))
    leaves = [x.detach().double().requires_grad_() for x in (student, weight, bias)]
    ref = fused_feature_loss_reference(*leaves, target.double())
    ref_grads = torch.autograd.grad(ref, leaves)
    loss_tol, grad_tol = RELATIVE_TOLERANCE[torch.float16]
    assert_close_rel(loss, ref, loss_tol, f"{backend} loss")
    for name, g, r in zip(("student", "weight", "bias"), grads, ref_grads):
        assert_close_rel(g, r, grad_tol, f"{backend} grad {name}")


# ----------------------------------------------------------------------------- odd shapes and inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ODD, ids=_ids)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_feature_loss_odd_shapes(backend, shape, normalize, reduction):
    lead, d_s, d_t, dtype = shape
    check_feature_loss(backend, lead, d_s, d_t, DTYPES[dtype], normalize, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True], ids=["mse", "token-mse"])
def test_feature_loss_bf16_activations_fp32_parameters(backend, normalize):
    # The training setting: bf16 tokens, fp32 head parameters (gradients come back in fp32).
    lead, d_s, d_t = PAPER
    check_feature_loss(backend, lead, d_s, d_t, torch.bfloat16, normalize, "mean", param_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_loss_non_contiguous(backend):
    student, weight, bias, target = feature_inputs((4, 261), 384, 1536, torch.bfloat16)
    student_t = student.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (4, 261) strided
    target_s = torch.randn(4, 261, 2 * 1536, device="cuda").to(torch.bfloat16)[..., ::2]  # channel stride 2
    loss = run_forced(backend, fused_feature_loss, student_t, weight, bias, target_s, normalize=True)
    ref = fused_feature_loss_reference(
        student_t.double(), weight.double(), bias.double(), target_s.double(), normalize=True
    )
    assert_close_rel(loss, ref, RELATIVE_TOLERANCE[torch.bfloat16][0], f"{backend} strided")


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_loss_nan_propagates(backend):
    student, weight, bias, target = feature_inputs((2, 197), 384, 1536, torch.bfloat16)
    target = target.clone()
    target[1, 7, 11] = float("nan")
    loss = run_forced(backend, fused_feature_loss, student, weight, bias, target)
    assert torch.isnan(loss), f"{backend}: NaN in the target gave loss {loss.item()}"
