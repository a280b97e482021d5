"""GPU correctness check of every op on CUDA tensors, against a float64 evaluation of
the plain PyTorch reference (the CPU test suite covers the same through the Triton
interpreter). Prints one line per case and exits non-zero on any failure.

    python bench/gpu_check.py
"""

from __future__ import annotations

import sys

import torch

import leap_kernels
from leap_kernels.ops.naive import fused_feature_loss_reference, token_normalized_mse_reference

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


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(leap_kernels.backends())
    failures = 0
    cases = []
    for backend in ("triton", "torch"):
        for m, d_s, d_t in [(1, 64, 100), (197, 384, 1536), (2 * 261, 192, 256), (128 * 256, 384, 1536), (8193, 100, 1536)]:
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for normalize in (False, True):
                    for reduction in ("mean", "none"):
                        if backend == "torch" and m > 8192 and dtype != torch.bfloat16:
                            continue
                        cases.append(("feature_loss", backend, (m, d_s, d_t, dtype, normalize, reduction)))
        for m, d in [(1, 100), (257, 1536), (128 * 256, 1536), (261, 384)]:
            for dtype in (torch.bfloat16, torch.float32):
                cases.append(("token_mse", backend, (m, d, dtype)))
    torch.backends.cuda.matmul.allow_tf32 = False
    for op, backend, params in cases:
        try:
            if op == "feature_loss":
                ok, errs = check_feature_loss(*params, backend)
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
