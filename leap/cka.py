"""Linear CKA between two feature sets, the statistic of LEAP's curriculum (spec section 3).

:func:`linear_cka` is the feature-space (or Gram-form) linear CKA computed on the device
without a host sync, so the trainer can call it every step on the detached, projected
student patch features and the current teacher target. :func:`linear_cka_reference` is a
plain float64 version for tests.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["linear_cka", "linear_cka_reference", "mean_token_cosine", "similarity_fn"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------
# Linear CKA
# --------------------------------------------------------------------------------------


def _as_2d(t: Any, name: str) -> torch.Tensor:
    """Validate one CKA argument and flatten ``(..., D)`` to ``(N, D)``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"linear_cka: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"linear_cka: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(
            f"linear_cka: {name} must have shape (N, D) or (..., D) (2-D after flattening the "
            f"leading dims), got shape {tuple(t.shape)}"
        )
    t2 = t.reshape(-1, t.shape[-1])
    if t2.shape[0] == 0 or t2.shape[1] == 0:
        raise ValueError(f"linear_cka: {name} is empty (shape {tuple(t.shape)})")
    return t2


def _use_gram_form(n: int, d1: int, d2: int) -> bool:
    """Whether the sample-space (Gram) form is cheaper than the feature-space form.

    Feature form: X^T Y, X^T X, Y^T Y  -> N * (D1*D2 + D1^2 + D2^2) MACs.
    Gram form:    X X^T, Y Y^T, <.,.>  -> N^2 * (D1 + D2 + 1)   MACs.
    Both are exact rewrites of the same quantity, so pick the cheaper one; the Gram form
    also only wins when its N x N buffers are smaller than the D x D ones.
    """
    return n * (d1 + d2 + 1) < d1 * d1 + d1 * d2 + d2 * d2


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Temporarily allow TF32 for fp32 CUDA matmuls, restoring the user's setting after.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision``; mixing it with the
    legacy ``allow_tf32`` flag can make later reads of the legacy flag raise, so we save
    and restore through the new API when it exists (reading it is always allowed) and
    only fall back to ``allow_tf32`` on older versions.
    """
    if not enabled:
        yield
        return
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        prev = m.fp32_precision
        if prev == "tf32":
            yield
            return
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:  # pragma: no cover - torch < 2.9
        prev = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = prev


def _mm(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with the result (and the accumulation) in ``acc_dtype``.

    For bf16/fp16 operands on CUDA the matmul runs in the low dtype with an fp32 output
    (``out_dtype``), so neither the accumulation nor the stored Gram entries are rounded
    to 16 bits (fp16 Gram entries would also overflow at 65504). Elsewhere we upcast:
    16-bit products are exact in fp32, so this gives the same numbers as the CUDA path.
    """
    if a.dtype == acc_dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=acc_dtype)
    return torch.mm(a.to(acc_dtype), b.to(acc_dtype))


def _frobenius_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>_F = sum(a * b)`` as a 0-d tensor, without an elementwise temporary.

    Goes through BLAS ``dot`` rather than ``linalg.vector_norm``: on CPU the fp32 norm
    kernel sums sequentially and loses ~1e-5 relative accuracy over the 1e6 entries of
    a Gram matrix, while ``dot`` keeps ~1e-7.
    """
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _center_unit_rms(t: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Center the columns of ``t`` (N, D) and scale to unit RMS, in ``acc_dtype``.

    Returns ``(t_scaled (N, D), rms (0-d))``. CKA is invariant to isotropic scaling, so
    working at unit RMS costs nothing in accuracy but keeps every Gram entry <= N*D
    (no fp32 overflow for huge activations) and the 16-bit cast of the centered values
    inside the fp16 range. The raw scale is returned so the caller can still apply the
    eps test to the *unscaled* denominator, as the spec defines it.
    """
    t = t.to(acc_dtype)
    t = t - t.mean(dim=0, keepdim=True)  # new buffer: the in-place ops below never touch the input
    rms = torch.linalg.vector_norm(t) / math.sqrt(t.numel())
    # A constant input has rms == 0: leave it at zero (the eps test then returns 0).
    # NaN rms compares False, so NaN stays NaN instead of being hidden.
    safe = torch.where(rms > 0, rms, torch.ones_like(rms))
    # In place saves an (N, D) buffer, but would break autograd (the norm saved t), so
    # only do it when nobody differentiates through the CKA (the usual, detached case).
    t = t / safe if t.requires_grad else t.div_(safe)
    return t, safe


def linear_cka(
    x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-12, allow_tf32: bool = True, form: str = "auto"
) -> torch.Tensor:
    """Feature-space linear CKA between two sets of row-aligned features.

    ``CKA = ||X^T Y||_F^2 / (||X^T X||_F * ||Y^T Y||_F)`` after centering the columns of
    ``X`` and ``Y``; 0 when that denominator is below ``eps``.

    Args:
        x: (N, D1) or (..., D1) floating tensor; leading dims are flattened into N
           (e.g. (B, 256, D) patch tokens pool to N = B*256 rows).
        y: (N, D2) or (..., D2), same N and device as ``x``.
        eps: a denominator (on the original scale of the inputs) below this gives 0.
           Only a genuinely tiny denominator does: NaN/Inf inputs give NaN.
        allow_tf32: for fp32 inputs on CUDA, run the matmuls with TF32 (restoring the
           global setting afterwards). Ignored on CPU, where fp32 stays exact.
        form: "auto" (cheaper of the two), "feature" (D x D products) or "gram"
           (N x N products, ``||X^T Y||_F^2 = <X X^T, Y Y^T>``). Same value either way.

    Returns:
        0-d float32 tensor on the inputs' device. No host synchronisation: no ``.item()``,
        no data-dependent Python branching, so it can run every step.

    Precision: centering happens in fp32 (fp64 for fp64 inputs). If both inputs are
    bf16 (or both fp16) the centered values are cast back to that dtype and the matmuls
    run in it with fp32 accumulation/outputs; otherwise the matmuls run in fp32
    (TF32 on CUDA if allowed) or fp64.
    """
    x2 = _as_2d(x, "x")
    y2 = _as_2d(y, "y")
    if x2.shape[0] != y2.shape[0]:
        raise ValueError(
            f"linear_cka: y has {y2.shape[0]} rows after flattening but x has {x2.shape[0]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)}); rows must be aligned"
        )
    if x2.device != y2.device:
        raise ValueError(f"linear_cka: y is on {y2.device} but x is on {x2.device}")
    if form not in ("auto", "feature", "gram"):
        raise ValueError(f"linear_cka: form must be 'auto', 'feature' or 'gram', got {form!r}")

    acc_dtype = torch.float64 if torch.float64 in (x2.dtype, y2.dtype) else torch.float32
    mm_dtype = x2.dtype if (x2.dtype == y2.dtype and x2.dtype in _LOW_PRECISION) else acc_dtype

    xs, sx = _center_unit_rms(x2, acc_dtype)
    ys, sy = _center_unit_rms(y2, acc_dtype)
    xs = xs.to(mm_dtype)
    ys = ys.to(mm_dtype)

    n, d1, d2 = x2.shape[0], x2.shape[1], y2.shape[1]
    gram = _use_gram_form(n, d1, d2) if form == "auto" else form == "gram"
    tf32 = allow_tf32 and xs.is_cuda and mm_dtype == torch.float32
    with _tf32_matmuls(tf32):
        if gram:
            kx = _mm(xs, xs.T, acc_dtype)  # (N, N)
            ky = _mm(ys, ys.T, acc_dtype)  # (N, N)
            num = _frobenius_inner(kx, ky)  # <K_x, K_y>_F = ||X^T Y||_F^2
            nxx = _frobenius_inner(kx, kx).sqrt()
            nyy = _frobenius_inner(ky, ky).sqrt()
        else:
            xty = _mm(xs.T, ys, acc_dtype)  # (D1, D2)
            xtx = _mm(xs.T, xs, acc_dtype)  # (D1, D1)
            yty = _mm(ys.T, ys, acc_dtype)  # (D2, D2)
            num = _frobenius_inner(xty, xty)
            nxx = _frobenius_inner(xtx, xtx).sqrt()
            nyy = _frobenius_inner(yty, yty).sqrt()

    den = nxx * nyy
    # Denominator on the caller's scale: ||X^T X||_F scales with rms_x^2. If this
    # overflows to inf the answer to "is it tiny?" is still correctly False.
    raw_den = den * (sx.square() * sy.square())
    tiny = raw_den < eps  # NaN < eps is False, so NaN inputs propagate as NaN
    # Safe denominator keeps the discarded branch finite (and gradients NaN-free).
    cka = num / torch.where(tiny, torch.ones_like(den), den)
    cka = torch.where(tiny, torch.zeros_like(cka), cka)
    return cka.to(torch.float32)


def linear_cka_reference(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """Plain float64 CPU linear CKA straight from the formula, for tests.

    x: (..., D1), y: (..., D2) with the same number of rows after flattening.
    Returns a 0-d float64 CPU tensor.
    """
    x = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1])
    y = y.detach().to("cpu", torch.float64).reshape(-1, y.shape[-1])
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    num = torch.linalg.matrix_norm(x.T @ y) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if den < eps:  # NaN < eps is False: NaN stays NaN
        return torch.zeros((), dtype=torch.float64)
    return num / den


def mean_token_cosine(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-token cosine similarity of two row-aligned token sets of the same width.

    The alternative curriculum metric of the paper's ablation (``--curriculum-metric cosine``):
    the projected student tokens are compared with the teacher tokens one by one.

    Args:
        x: (..., D) floating tensor, e.g. projected student patch tokens (B, N, D_t).
        y: (..., D), same shape as ``x``.

    Returns:
        0-d float32 tensor (computed in fp32, fp64 for fp64 inputs); no host sync.
    """
    x2, y2 = _as_2d(x, "x"), _as_2d(y, "y")
    if x2.shape != y2.shape:
        raise ValueError(
            f"mean_token_cosine: x and y must have the same shape after flattening, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    acc = torch.float64 if torch.float64 in (x2.dtype, y2.dtype) else torch.float32
    cos = torch.nn.functional.cosine_similarity(x2.to(acc), y2.to(acc), dim=-1, eps=eps)
    return cos.mean().to(torch.float32)


def similarity_fn(metric: str):
    """The curriculum's similarity ``f(student_projected (..., D), teacher (..., D)) -> 0-d tensor``:
    ``"cka"`` -> :func:`linear_cka`, ``"cosine"`` -> :func:`mean_token_cosine`, always run with
    autocast off (the calibration scan may run under the teacher's autocast, which would otherwise
    push the fp32 Gram products down to 16 bits)."""
    fns = {"cka": linear_cka, "cosine": mean_token_cosine}
    if metric not in fns:
        raise ValueError(f"unknown curriculum metric {metric!r} (expected 'cka' or 'cosine')")
    fn = fns[metric]

    def score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, y)

    score.__name__ = score.__qualname__ = fn.__name__
    score.metric = fn  # type: ignore[attr-defined]
    return score
