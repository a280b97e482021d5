"""GPU correctness check of every op on CUDA tensors, against a float64 evaluation of
the plain PyTorch reference (the CPU test suite covers the same through the Triton
interpreter). Prints one line per case and exits non-zero on any failure.

    python bench/gpu_check.py                  # every op
    python bench/gpu_check.py attention        # only the named ops (feature_loss, token_mse, attention)
"""

from __future__ import annotations

import sys

import torch

import leap_kernels
from leap_kernels.ops.naive import (
    fused_feature_loss_reference,
    teacher_attention_reference,
    token_normalized_mse_reference,
)

TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 5e-3)}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_feature_loss(m, d_s, d_t, dtype, normalize, reduction, backend):
    torch.manual_seed(m + d_s + d_t)
    s = torch.randn(m, d_s, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(d_t, d_s, device="cuda") / d_s ** 0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(d_t, device="cuda")).to(dtype).requires_grad_()
    t = (2 * torch.randn(m, d_t, device="cuda") + torch.randn(m, 1, device="cuda")).to(dtype)
    with leap_kernels.use_backend(backend):
        loss = leap_kernels.fused_feature_loss(s, w, b, t, normalize=normalize, reduction=reduction)
    go = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, (s, w, b), go)
    leaves = [x.detach().double().requires_grad_() for x in (s, w, b)]
    ref = fused_feature_loss_reference(*leaves[:2], leaves[2], t.double(), normalize=normalize, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    errs = [rel(loss, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    lt, gt = TOL[dtype]
    ok = errs[0] <= lt and all(e <= gt for e in errs[1:])
    return ok, errs


def check_token_mse(m, d, dtype, backend):
    torch.manual_seed(m + d)
    x = (3 * torch.randn(m, d, device="cuda") + 5 * torch.randn(m, 1, device="cuda")).to(dtype).requires_grad_()
    t = torch.randn(m, d, device="cuda").to(dtype).requires_grad_()
    with leap_kernels.use_backend(backend):
        loss = leap_kernels.token_normalized_mse(x, t, reduction="none")
    go = torch.randn_like(loss)
    gx, gt = torch.autograd.grad(loss, (x, t), go)
    x64, t64 = (a.detach().double().requires_grad_() for a in (x, t))
    ref = token_normalized_mse_reference(x64, t64, reduction="none")
    rx, rt = torch.autograd.grad(ref, (x64, t64), go.double())
    errs = [rel(loss, ref), rel(gx, rx), rel(gt, rt)]
    lt, gtol = TOL[dtype]
    return errs[0] <= lt and all(e <= gtol for e in errs[1:]), errs


def attention_cases():
    """(op, backend, (B, H, N, d, dtype, layout)) for :func:`check_attention`."""
    cases = []
    for backend in ("triton", "torch"):
        for n in (1, 5, 197, 257, 261, 577, 1025, 1370):
            for d in (64, 128):
                for dtype in (torch.bfloat16, torch.float16):
                    cases.append(("attention", backend, (2, 3, n, d, dtype, "packed")))
        for layout in ("batch-slice", "padded-rows"):
            cases.append(("attention", backend, (3, 6, 261, 64, torch.bfloat16, layout)))
        cases.append(("attention", backend, (128, 24, 261, 64, torch.bfloat16, "packed")))  # ViT-g/14 reg4 @224
        cases.append(("attention", backend, (32, 24, 1025, 64, torch.bfloat16, "packed")))  # ViT-g/14 @448
        cases.append(("attention", backend, (4, 16, 261, 32, torch.float16, "packed")))
    cases.append(("attention", "auto", (2, 3, 261, 64, torch.float32, "packed")))  # fp32 -> torch backend
    cases.append(("attention", "auto", (2, 3, 261, 48, torch.bfloat16, "packed")))  # d = 48 -> torch backend
    return cases


def check_attention(b, h, n, d, dtype, layout, backend):
    """teacher_attention on CUDA vs a float64 evaluation of the reference on the same inputs."""
    torch.manual_seed(b * 7 + h * 5 + n + d)
    c = 3 * h * d
    if layout == "packed":
        qkv = torch.randn(b, n, c, device="cuda").to(dtype)
    elif layout == "batch-slice":  # storage offset, batch stride of the full tensor
        qkv = torch.randn(b + 1, n, c, device="cuda").to(dtype)[1:]
    else:  # "padded-rows": token stride c + 40, channel stride 1
        qkv = torch.randn(b, n, c + 40, device="cuda").to(dtype)[..., 8:8 + c]
    with torch.no_grad(), leap_kernels.use_backend(backend):
        out = leap_kernels.teacher_attention(qkv, h)
    ref = teacher_attention_reference(qkv.double(), h)
    err = rel(out, ref)
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype][0]
    return err <= tol and out.shape == ref.shape and out.dtype == dtype, [err]


def main(argv=None) -> int:
    known = ("feature_loss", "token_mse", "attention")
    ops = set((sys.argv[1:] if argv is None else argv) or known)
    if ops - set(known):
        print(f"unknown op(s) {sorted(ops - set(known))}; expected some of {known}")
        return 2
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(leap_kernels.backends())
    failures = 0
    cases = []
    for backend in ("triton", "torch") if ops & {"feature_loss", "token_mse"} else ():
        for m, d_s, d_t in [(1, 64, 100), (197, 384, 1536), (2 * 261, 192, 256), (128 * 256, 384, 1536), (8193, 100, 1536)]:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for normalize in (False, True):
                    for reduction in ("mean", "none"):
                        if backend == "torch" and m > 8192 and dtype != torch.bfloat16:
                            continue
                        if "feature_loss" in ops:
                            cases.append(("feature_loss", backend, (m, d_s, d_t, dtype, normalize, reduction)))
        for m, d in [(1, 100), (257, 1536), (128 * 256, 1536), (261, 384)]:
            for dtype in (torch.bfloat16, torch.float32):
                if "token_mse" in ops:
                    cases.append(("token_mse", backend, (m, d, dtype)))
    if "attention" in ops:
        cases += attention_cases()
    torch.backends.cuda.matmul.allow_tf32 = False
    for op, backend, params in cases:
        try:
            if op == "feature_loss":
                ok, errs = check_feature_loss(*params, backend)
            elif op == "attention":
                ok, errs = check_attention(*params, backend)
            else:
                ok, errs = check_token_mse(*params, backend)
        except Exception as exc:
            ok, errs = False, [f"{type(exc).__name__}: {exc}"]
        failures += not ok
        shown = ", ".join(f"{e:.2e}" if isinstance(e, float) else e for e in errs)
        print(f"{'ok  ' if ok else 'FAIL'} {op} {backend} {params}: {shown}", flush=True)
    print(f"{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
