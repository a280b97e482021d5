"""Per-token (row) loss and gradient helpers shared by the fused feature loss and the
token-normalized MSE: the Triton row kernel, the plain PyTorch rows, the compiled rows
(``leap_kernels._C``), and the reductions between per-token losses and the op's loss.

Row contract, every backend: for ``x, t (M, D)``, ``row_loss[i] = sum_j e_ij^2`` with
``e = x - t`` (plain) or ``e = LN(x) - LN(t)`` (token-normalized: LN over ``D``, no affine, ``eps``
inside the square root, fp32 two-pass statistics), and the gradients of
``sum_i row_scale[i] * row_loss[i]``.
"""

from __future__ import annotations

import dataclasses

import torch

from ._triton_common import HAS_TRITON, INTERPRETED, next_power_of_2

if HAS_TRITON:
    from ._triton_common import _row_offsets

# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_norm_mse_rows_kernel(  # type: ignore[no-untyped-def]
        X,
        T,
        ROW_SCALE,
        LOSS,
        GX,
        GT,
        M,
        D,
        stride_xm,
        stride_xd,
        stride_tm,
        stride_td,
        stride_gxm,
        stride_gtm,
        eps,
        loss_scale,
        T_ROW0,
        T_TOKENS,
        stride_tb,
        HAS_ROW_SCALE: tl.constexpr,
        WRITE_LOSS: tl.constexpr,
        WRITE_GX: tl.constexpr,
        WRITE_GT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program owns BLOCK_M whole rows: the statistics need the full channel dim. It loads
        # its rows completely before storing anything, so GX may be X (G overwrites P in place).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < D)[None, :]
        rows64 = rows.to(tl.int64)
        t_rows = _row_offsets(T_ROW0 + rows, T_TOKENS, stride_tb, stride_tm)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + t_rows[:, None] + cols[None, :] * stride_td, mask=mask, other=0.0).to(tl.float32)
        inv_d = 1.0 / D
        # Two-pass mean/variance in registers: no cancellation for large-mean tokens.
        x_centered = tl.where(mask, x - (tl.sum(x, axis=1) * inv_d)[:, None], 0.0)
        t_centered = tl.where(mask, t - (tl.sum(t, axis=1) * inv_d)[:, None], 0.0)
        rstd_x = 1.0 / tl.sqrt(tl.sum(x_centered * x_centered, axis=1) * inv_d + eps)
        rstd_t = 1.0 / tl.sqrt(tl.sum(t_centered * t_centered, axis=1) * inv_d + eps)
        x_hat = x_centered * rstd_x[:, None]
        t_hat = t_centered * rstd_t[:, None]
        diff = x_hat - t_hat
        if WRITE_LOSS:
            tl.store(LOSS + rows, tl.sum(diff * diff, axis=1) * loss_scale, mask=row_mask)
        if WRITE_GX or WRITE_GT:
            if HAS_ROW_SCALE:
                scale = 2.0 * tl.load(ROW_SCALE + rows, mask=row_mask, other=0.0).to(tl.float32)
                g = diff * scale[:, None]
            else:
                g = 2.0 * diff
            g_mean = tl.sum(g, axis=1) * inv_d
            if WRITE_GX:
                gx_proj = tl.sum(g * x_hat, axis=1) * inv_d
                gx = rstd_x[:, None] * (g - g_mean[:, None] - x_hat * gx_proj[:, None])
                tl.store(GX + rows64[:, None] * stride_gxm + cols[None, :], gx.to(GX.dtype.element_ty), mask=mask)
            if WRITE_GT:
                gt_proj = tl.sum(g * t_hat, axis=1) * inv_d
                gt = -rstd_t[:, None] * (g - g_mean[:, None] - t_hat * gt_proj[:, None])
                tl.store(GT + rows64[:, None] * stride_gtm + cols[None, :], gt.to(GT.dtype.element_ty), mask=mask)


def _row_block_config(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): about 4K elements per program on GPU, more in the interpreter."""
    block_d = max(16, next_power_of_2(d))
    budget = 65536 if INTERPRETED else 4096
    block_m = max(1, min(64, budget // block_d))
    num_warps = 4 if block_d * block_m <= 2048 else 8
    return block_m, block_d, num_warps


@dataclasses.dataclass(frozen=True, eq=False)
class RowBuffers:
    """The outputs :func:`token_norm_rows_triton` writes (None: not computed): ``row_loss (M,)``
    fp32, ``grad_x`` and ``grad_t`` ``(M, D)`` with a unit channel stride."""

    row_loss: torch.Tensor | None = None
    grad_x: torch.Tensor | None = None
    grad_t: torch.Tensor | None = None


def token_norm_rows_triton(
    x: torch.Tensor,
    t: torch.Tensor,
    eps: float,
    out: RowBuffers,
    *,
    row_scale: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    t_rows: tuple[int, int, int, int] | None = None,
) -> None:
    """Per-token loss and/or gradients for 2-D ``x, t (M, D)``; writes into the buffers of ``out``.

    ``out.row_loss (M,)`` fp32 gets ``loss_scale * sum_c (x_hat - t_hat)^2``; ``out.grad_x``/``out.grad_t``
    ``(M, D)`` (unit channel stride) get the gradient of ``sum_rows row_scale * (that sum)``
    (``row_scale`` = 1 if None, ``loss_scale`` not included). ``out.grad_x`` may be ``x`` itself.

    ``t_rows = (row0, tokens, stride_b, stride_n)`` reads row ``i`` of ``t`` from token row ``row0 + i``
    of a ``(B, tokens, D)`` view with those strides instead (``t`` is then that tensor; used by the
    fused feature loss to read a chunk of a strided teacher tensor in place).
    """
    m, d = x.shape
    row_loss, grad_x, grad_t = out.row_loss, out.grad_x, out.grad_t
    if t_rows is None:
        t_rows = (0, m, 0, t.stride(0))
    row0, tokens, stride_tb, stride_tm = t_rows
    block_m, block_d, num_warps = _row_block_config(d)
    dummy = row_loss if row_loss is not None else (grad_x if grad_x is not None else grad_t)
    _token_norm_mse_rows_kernel[(triton.cdiv(m, block_m),)](
        x,
        t,
        row_scale if row_scale is not None else dummy,
        row_loss if row_loss is not None else dummy,
        grad_x if grad_x is not None else dummy,
        grad_t if grad_t is not None else dummy,
        m,
        d,
        x.stride(0),
        x.stride(1),
        stride_tm,
        t.stride(-1),
        grad_x.stride(0) if grad_x is not None else 0,
        grad_t.stride(0) if grad_t is not None else 0,
        eps,
        loss_scale,
        row0,
        tokens,
        stride_tb,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_LOSS=row_loss is not None,
        WRITE_GX=grad_x is not None,
        WRITE_GT=grad_t is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------- torch backend


def layer_norm_rows(x: torch.Tensor, eps: float, acc_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Rows of ``x (M, D)`` normalized over ``D`` without affine, in ``acc_dtype``: ATen's fused layer
    norm, the kernel ``F.layer_norm`` runs (statistics in ``acc_dtype``).

    Returns ``(x_hat (M, D), mean (M, 1), rstd (M, 1))``; :func:`layer_norm_rows_backward` takes them.
    """
    x = x.to(acc_dtype)
    return torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)


def layer_norm_rows_backward(g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``dL/dx (M, D)`` of the affine-free row normalization from ``g = dL/dx_hat``, in ``g``'s dtype:
    ``rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` per row, ATen's fused layer-norm backward."""
    grads = torch.ops.aten.native_layer_norm_backward(
        g, x.to(g.dtype), (x.shape[-1],), mean, rstd, None, None, [True, False, False]
    )
    return grads[0]


# ----------------------------------------------------------------------------- compiled rows (leap_kernels._C)


def token_norm_rows_compiled(
    x: torch.Tensor,
    t: torch.Tensor,
    eps: float,
    *,
    normalize: bool = True,
    row_scale: torch.Tensor | None = None,
    want_loss: bool = False,
    want_grad_x: bool = False,
    want_grad_t: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++/CUDA rows kernel (``leap_kernels::rows_loss_grad``) on ``x, t (M, D)``.

    Returns ``(row_loss (M,) fp32, grad_x (M, D) in x's dtype, grad_t (M, D) in t's dtype)``; an
    output not asked for is an empty ``(0,)`` tensor. Gradients are those of
    ``sum_rows row_scale * row_loss`` (``row_scale`` = 1 if None).
    """
    return torch.ops.leap_kernels.rows_loss_grad(
        x, t, normalize, float(eps), row_scale, want_loss, want_grad_x, want_grad_t
    )


# ----------------------------------------------------------------------------- reductions


def reduce_rows(row_loss: torch.Tensor, reduction: str, d: int) -> torch.Tensor:
    if reduction == "mean":
        return row_loss.sum() / (row_loss.numel() * d)
    if reduction == "sum":
        return row_loss.sum()
    return row_loss / d


def row_grad_scale(grad: torch.Tensor, reduction: str, m: int, d: int) -> torch.Tensor:
    """Per-token weight of ``row_loss`` in the upstream gradient, shape ``(M,)``."""
    if reduction == "mean":
        return (grad.float() / (m * d)).expand(m).contiguous()
    if reduction == "sum":
        return grad.float().expand(m).contiguous()
    return grad.float() / d
