"""Token-normalized MSE: ``mean((LN(x) - LN(t))^2)``, LN over channels without affine.

Room layout: Triton row kernel -> per-backend host functions -> torch.library ops
(forward, backward) with fake implementations and autograd -> functional API.

Forward reads x and t once and writes one fp32 loss per token; backward reads them
once more and writes the gradients, so nothing of size ``(M, D)`` is saved.

Gradient of one token (``x_hat = (x - mean) * rstd``, ``g = dL/dx_hat``)::

    dL/dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))

and the same with a minus sign on ``g`` for the target.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends, _checks
from ._triton_common import HAS_TRITON, INTERPRETED, accumulation_dtype, next_power_of_2

# ----------------------------------------------------------------------------- Triton kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_norm_mse_rows_kernel(
        X, T, ROW_SCALE, LOSS, GX, GT,
        M, D,
        stride_xm, stride_xd, stride_tm, stride_td, stride_gxm, stride_gtm,
        eps,
        HAS_ROW_SCALE: tl.constexpr,
        WRITE_LOSS: tl.constexpr,
        WRITE_GX: tl.constexpr,
        WRITE_GT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program owns BLOCK_M whole rows: the statistics need the full channel dim.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_mask = rows < M
        mask = row_mask[:, None] & (cols < D)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + rows64[:, None] * stride_tm + cols[None, :] * stride_td, mask=mask, other=0.0).to(tl.float32)
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
            tl.store(LOSS + rows, tl.sum(diff * diff, axis=1), mask=row_mask)
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


def token_norm_rows_triton(
    x: torch.Tensor,
    t: torch.Tensor,
    eps: float,
    *,
    row_scale: Optional[torch.Tensor] = None,
    row_loss: Optional[torch.Tensor] = None,
    grad_x: Optional[torch.Tensor] = None,
    grad_t: Optional[torch.Tensor] = None,
) -> None:
    """Per-token loss and/or gradients for 2-D ``x, t (M, D)``; writes into the given buffers.

    ``row_loss (M,)`` fp32 gets ``sum_c (x_hat - t_hat)^2``; ``grad_x``/``grad_t`` ``(M, D)`` (unit
    channel stride) get the gradient of ``sum_rows row_scale * row_loss`` (``row_scale`` = 1 if None).
    """
    m, d = x.shape
    block_m, block_d, num_warps = _row_block_config(d)
    dummy = row_loss if row_loss is not None else (grad_x if grad_x is not None else grad_t)
    _token_norm_mse_rows_kernel[(triton.cdiv(m, block_m),)](
        x, t,
        row_scale if row_scale is not None else dummy,
        row_loss if row_loss is not None else dummy,
        grad_x if grad_x is not None else dummy,
        grad_t if grad_t is not None else dummy,
        m, d,
        x.stride(0), x.stride(1), t.stride(0), t.stride(1),
        grad_x.stride(0) if grad_x is not None else 0,
        grad_t.stride(0) if grad_t is not None else 0,
        eps,
        HAS_ROW_SCALE=row_scale is not None,
        WRITE_LOSS=row_loss is not None,
        WRITE_GX=grad_x is not None,
        WRITE_GT=grad_t is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


# ----------------------------------------------------------------------------- torch backend


def token_norm_rows_torch(x: torch.Tensor, t: torch.Tensor, eps: float, acc_dtype: torch.dtype):
    """Normalized rows and their per-token statistics in ``acc_dtype``.

    Returns ``(x_hat, rstd_x, t_hat, rstd_t)``; x_hat ``(M, D)``, rstd ``(M, 1)``.
    """
    x = x.to(acc_dtype)
    t = t.to(acc_dtype)
    x_centered = x - x.mean(dim=-1, keepdim=True)
    t_centered = t - t.mean(dim=-1, keepdim=True)
    rstd_x = torch.rsqrt(x_centered.square().mean(dim=-1, keepdim=True) + eps)
    rstd_t = torch.rsqrt(t_centered.square().mean(dim=-1, keepdim=True) + eps)
    return x_centered * rstd_x, rstd_x, t_centered * rstd_t, rstd_t


def token_norm_input_grad(g: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Backward of the affine-free row normalization: ``dL/dx`` from ``g = dL/dx_hat``."""
    g_mean = g.mean(dim=-1, keepdim=True)
    proj = (g * x_hat).mean(dim=-1, keepdim=True)
    return rstd * (g - g_mean - x_hat * proj)


# ----------------------------------------------------------------------------- torch.library ops


def _rows_backend(x: torch.Tensor, t: torch.Tensor) -> str:
    return _backends.select_backend("token_normalized_mse", [x, t], row_width=x.shape[-1])


def _reduce_rows(row_loss: torch.Tensor, reduction: str, d: int) -> torch.Tensor:
    if reduction == "mean":
        return row_loss.sum() / (row_loss.numel() * d)
    if reduction == "sum":
        return row_loss.sum()
    return row_loss / d


def _row_grad_scale(grad: torch.Tensor, reduction: str, m: int, d: int) -> torch.Tensor:
    """Per-token weight of ``row_loss`` in the upstream gradient, shape ``(M,)``."""
    if reduction == "mean":
        return (grad.float() / (m * d)).expand(m).contiguous()
    if reduction == "sum":
        return grad.float().expand(m).contiguous()
    return grad.float() / d


@torch.library.custom_op("leap_kernels::token_normalized_mse", mutates_args=())
def _token_normalized_mse_op(input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    m, d = input.shape
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    if _rows_backend(input, target) == "triton":
        row_loss = torch.empty(m, dtype=torch.float32, device=input.device)
        token_norm_rows_triton(input, target, eps, row_loss=row_loss)
    else:
        x_hat, _, t_hat, _ = token_norm_rows_torch(input, target, eps, acc_dtype)
        row_loss = (x_hat - t_hat).square().sum(dim=-1)
    return _reduce_rows(row_loss.to(acc_dtype), reduction, d)


@_token_normalized_mse_op.register_fake
def _(input, target, reduction, eps):
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    shape = (input.shape[0],) if reduction == "none" else ()
    return input.new_empty(shape, dtype=acc_dtype)


@torch.library.custom_op("leap_kernels::token_normalized_mse_backward", mutates_args=())
def _token_normalized_mse_backward_op(
    row_scale: torch.Tensor, input: torch.Tensor, target: torch.Tensor, eps: float, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else input.new_empty(0)
    grad_target = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0)
    if _rows_backend(input, target) == "triton":
        token_norm_rows_triton(
            input, target, eps,
            row_scale=row_scale.float().contiguous(),
            grad_x=grad_input if need_input else None,
            grad_t=grad_target if need_target else None,
        )
        return grad_input, grad_target
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    x_hat, rstd_x, t_hat, rstd_t = token_norm_rows_torch(input, target, eps, acc_dtype)
    g = 2.0 * (x_hat - t_hat) * row_scale.to(acc_dtype)[:, None]
    if need_input:
        grad_input.copy_(token_norm_input_grad(g, x_hat, rstd_x))
    if need_target:
        grad_target.copy_(token_norm_input_grad(-g, t_hat, rstd_t))
    return grad_input, grad_target


@_token_normalized_mse_backward_op.register_fake
def _(row_scale, input, target, eps, need_input, need_target):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else input.new_empty(0)
    grad_target = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0)
    return grad_input, grad_target


def _setup_context(ctx, inputs, output):
    input, target, reduction, eps = inputs
    ctx.save_for_backward(input, target)
    ctx.reduction = reduction
    ctx.eps = eps


def _backward(ctx, grad):
    input, target = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_input or need_target):
        return None, None, None, None
    m, d = input.shape
    row_scale = _row_grad_scale(grad, ctx.reduction, m, d)
    grad_input, grad_target = torch.ops.leap_kernels.token_normalized_mse_backward(
        row_scale, input, target, ctx.eps, need_input, need_target
    )
    return (grad_input if need_input else None), (grad_target if need_target else None), None, None


_token_normalized_mse_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def token_normalized_mse(
    input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean", eps: float = 1e-6
) -> torch.Tensor:
    """Token-normalized MSE: ``mean((LN(input) - LN(target))^2)``.

    LN normalizes each token over the channel dim without affine, with ``eps`` inside
    the square root. Gradients flow to both ``input`` and ``target`` when they require
    grad.

    Args:
        input: ``(..., D)`` float32, bfloat16 or float16.
        target: ``(..., D)``, same shape.
        reduction: ``"mean"`` (scalar, mean over tokens and channels), ``"sum"`` (scalar),
            ``"none"`` (``(...)``, per-token mean over channels).
        eps: added to the variance.

    Returns:
        fp32 loss (fp64 for float64 inputs): ``()`` or ``(...)`` for ``"none"``.
    """
    _checks.check_token_mse_inputs(input, target, reduction, eps)
    lead_shape = input.shape[:-1]
    d = input.shape[-1]
    loss = _token_normalized_mse_op(input.reshape(-1, d), target.reshape(-1, d), reduction, float(eps))
    return loss.reshape(lead_shape) if reduction == "none" else loss
