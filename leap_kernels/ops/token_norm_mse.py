"""Token-normalized MSE: ``mean((LN(x) - LN(t))^2)``, LN over channels without affine.

Room layout: the row kernels of every backend live in :mod:`._rows` (shared with the fused
feature loss); here: dispatch -> torch.library ops (forward, backward) with fake
implementations and autograd -> functional API.

Forward reads x and t once and writes one fp32 loss per token; backward reads them
once more and writes the gradients, so nothing of size ``(M, D)`` is saved. Eager CPU
calls of the cpp backend that need gradients write them in the forward instead, in the
same pass (the fused loss does the same): a backward with an upstream gradient of 1
hands that buffer on, so x and t are read once, not twice (3 rows of traffic, not 5).

Gradient of one token (``x_hat = (x - mean) * rstd``, ``g = dL/dx_hat``)::

    dL/dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))

and the same with a minus sign on ``g`` for the target.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import _backends, _checks
from ._rows import (
    RowBuffers,
    layer_norm_rows,
    layer_norm_rows_backward,
    reduce_rows,
    row_grad_scale,
    token_norm_rows_compiled,
    token_norm_rows_triton,
)
from ._triton_common import HAS_TRITON, accumulation_dtype

if HAS_TRITON:  # the row kernel lives in ._rows; listed here with this op's kernels
    from ._rows import _token_norm_mse_rows_kernel  # noqa: F401

# ----------------------------------------------------------------------------- torch.library ops


def _rows_backend(x: torch.Tensor, t: torch.Tensor) -> str:
    return _backends.select_backend("token_normalized_mse", [x, t], row_width=x.shape[-1])


def _empty_grads(
    input: torch.Tensor, target: torch.Tensor, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous gradient buffers shaped like the inputs; ``(0,)`` for one not asked for."""
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else input.new_empty(0)
    grad_target = (
        torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0)
    )
    return grad_input, grad_target


COMPILED = ("cpp", "cuda")  # backends that run the rows kernel of leap_kernels._C


@torch.library.custom_op("leap_kernels::token_normalized_mse", mutates_args=())
def _token_normalized_mse_op(input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    m, d = input.shape
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    backend = _rows_backend(input, target)
    if backend == "triton":
        row_loss = torch.empty(m, dtype=torch.float32, device=input.device)
        token_norm_rows_triton(input, target, eps, RowBuffers(row_loss=row_loss))
    elif backend in COMPILED:
        row_loss, _, _ = token_norm_rows_compiled(input, target, eps, want_loss=True)
    else:
        x_hat = layer_norm_rows(input, eps, acc_dtype)[0]
        t_hat = layer_norm_rows(target, eps, acc_dtype)[0]
        row_loss = (x_hat - t_hat).square().sum(dim=-1)
    return reduce_rows(row_loss.to(acc_dtype), reduction, d)


@_token_normalized_mse_op.register_fake
def _(input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    shape = (input.shape[0],) if reduction == "none" else ()
    return input.new_empty(shape, dtype=acc_dtype)


@torch.library.custom_op("leap_kernels::token_normalized_mse_backward", mutates_args=())
def _token_normalized_mse_backward_op(
    row_scale: torch.Tensor, input: torch.Tensor, target: torch.Tensor, eps: float, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _rows_backend(input, target)
    if backend in COMPILED:
        _, grad_input, grad_target = token_norm_rows_compiled(
            input, target, eps, row_scale=row_scale, want_grad_x=need_input, want_grad_t=need_target
        )
        return grad_input, grad_target
    grad_input, grad_target = _empty_grads(input, target, need_input, need_target)
    if backend == "triton":
        token_norm_rows_triton(
            input,
            target,
            eps,
            RowBuffers(grad_x=grad_input if need_input else None, grad_t=grad_target if need_target else None),
            row_scale=row_scale.float().contiguous(),
        )
        return grad_input, grad_target
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    x_hat, mean_x, rstd_x = layer_norm_rows(input, eps, acc_dtype)
    t_hat, mean_t, rstd_t = layer_norm_rows(target, eps, acc_dtype)
    g = 2.0 * (x_hat - t_hat) * row_scale.to(acc_dtype)[:, None]
    if need_input:
        grad_input.copy_(layer_norm_rows_backward(g, input, mean_x, rstd_x))
    if need_target:
        grad_target.copy_(layer_norm_rows_backward(-g, target, mean_t, rstd_t))
    return grad_input, grad_target


@_token_normalized_mse_backward_op.register_fake
def _(
    row_scale: torch.Tensor, input: torch.Tensor, target: torch.Tensor, eps: float, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _empty_grads(input, target, need_input, need_target)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, target, reduction, eps = inputs
    ctx.save_for_backward(input, target)
    ctx.reduction = reduction
    ctx.eps = eps


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
    input, target = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_input or need_target):
        return None, None, None, None
    m, d = input.shape
    row_scale = row_grad_scale(grad, ctx.reduction, m, d)
    grad_input, grad_target = torch.ops.leap_kernels.token_normalized_mse_backward(
        row_scale, input, target, ctx.eps, need_input, need_target
    )
    return (grad_input if need_input else None), (grad_target if need_target else None), None, None


_token_normalized_mse_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- gradients in the forward (CPU)


@torch.library.custom_op("leap_kernels::token_normalized_mse_with_grads", mutates_args=())
def _token_normalized_mse_with_grads_op(
    input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_input, grad_target)`` in one pass of the rows kernel (cpp backend, ``"mean"``/``"sum"``).

    The gradients are those of the loss itself (an upstream gradient of 1), in the inputs' dtypes; one not
    asked for is ``(0,)``. The forward reads x and t once and writes the gradient once: a backward with an
    upstream gradient of 1 returns it as it is, so the op moves 3 rows of bytes per token instead of 5.
    """
    m, d = input.shape
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    unit = torch.ones((), dtype=torch.float32, device=input.device)
    row_scale = row_grad_scale(unit, reduction, m, d)
    row_loss, grad_input, grad_target = token_norm_rows_compiled(
        input, target, eps, row_scale=row_scale, want_loss=True, want_grad_x=need_input, want_grad_t=need_target
    )
    return reduce_rows(row_loss.to(acc_dtype), reduction, d), grad_input, grad_target


@_token_normalized_mse_with_grads_op.register_fake
def _(
    input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float, need_input: bool, need_target: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    return input.new_empty((), dtype=acc_dtype), *_empty_grads(input, target, need_input, need_target)


def _setup_with_grads(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    input, target, reduction, eps, need_input, need_target = inputs
    ctx.set_materialize_grads(False)  # the kept-gradient outputs get no gradient
    ctx.save_for_backward(input, target)
    ctx.reduction, ctx.eps = reduction, eps
    # Detached (no reference back to this node) and dropped in backward: autograd can then hand the buffer on
    # without a copy (a leaf's .grad steals it); a second backward (retain_graph) recomputes instead.
    ctx.kept = (output[1].detach() if need_input else None, output[2].detach() if need_target else None)


def _is_exactly_one(grad: torch.Tensor) -> bool:
    """True for a real CPU scalar equal to 1 (free to read on a CPU); False for traced (fake) tensors."""
    if grad.device.type != "cpu" or grad.numel() != 1 or torch._subclasses.fake_tensor.is_fake(grad):
        return False
    return bool(grad == 1)


def _backward_with_grads(ctx: Any, grad: torch.Tensor | None, *_kept: torch.Tensor | None) -> tuple[Any, ...]:
    nothing = (None,) * 6
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad is None or not (need_input or need_target):
        return nothing
    kept_input, kept_target = ctx.kept
    ctx.kept = (None, None)
    input, target = ctx.saved_tensors
    usable = (kept_input is not None or not need_input) and (kept_target is not None or not need_target)
    if usable and _is_exactly_one(grad):
        return (kept_input if need_input else None), (kept_target if need_target else None), *nothing[2:]
    if usable and input.dtype in _RESCALED_DTYPES and target.dtype in _RESCALED_DTYPES:
        # One more rounding of an fp32/fp64 gradient; a 16-bit one would round twice in 16 bits: recompute it.
        scaled = [k * grad.to(k.dtype) if k is not None else None for k in (kept_input, kept_target)]
        return (scaled[0] if need_input else None), (scaled[1] if need_target else None), *nothing[2:]
    m, d = input.shape
    grad_input, grad_target = torch.ops.leap_kernels.token_normalized_mse_backward(
        row_grad_scale(grad, ctx.reduction, m, d), input, target, ctx.eps, need_input, need_target
    )
    return (grad_input if need_input else None), (grad_target if need_target else None), *nothing[2:]


_RESCALED_DTYPES = (torch.float32, torch.float64)
_token_normalized_mse_with_grads_op.register_autograd(_backward_with_grads, setup_context=_setup_with_grads)


def _grads_in_forward(rows: torch.Tensor, target_rows: torch.Tensor, reduction: str, backend: str) -> bool:
    """Eager CPU calls of the cpp backend that will need gradients: the forward writes them.

    Not under torch.compile (its traced backward cannot look at the upstream gradient, so the kept gradient
    would be rescaled: no fewer bytes than recomputing) nor on a GPU (reading the upstream gradient syncs).
    """
    return (
        backend == "cpp"
        and reduction != "none"
        and rows.device.type == "cpu"
        and torch.is_grad_enabled()
        and (rows.requires_grad or target_rows.requires_grad)
        and not torch.compiler.is_compiling()
    )


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

    On the cpp backend (CPU, eager, ``"mean"``/``"sum"``) a call that will need gradients writes them
    during the forward and keeps them until backward: the gradients' memory is taken at the forward,
    not at the backward.
    """
    _checks.check_token_mse_inputs(input, target, reduction, eps)
    lead_shape = input.shape[:-1]
    d = input.shape[-1]
    rows, target_rows = input.reshape(-1, d), target.reshape(-1, d)
    backend = _rows_backend(rows, target_rows)
    if backend == "torch":
        loss = _token_normalized_mse_eager(rows, target_rows, reduction, float(eps))
    elif _grads_in_forward(rows, target_rows, reduction, backend):
        loss = _token_normalized_mse_with_grads_op(
            rows, target_rows, reduction, float(eps), rows.requires_grad, target_rows.requires_grad
        )[0]
    else:
        loss = _token_normalized_mse_op(rows, target_rows, reduction, float(eps))
    return loss.reshape(lead_shape) if reduction == "none" else loss


def _token_normalized_mse_eager(input: torch.Tensor, target: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    """The torch backend: the eager formula under autograd, ``F.mse_loss(F.layer_norm(x), F.layer_norm(t))``.

    A row op has nothing to chunk, and ATen's fused layer norm and MSE kernels with autograd's saved
    ``x_hat``/``t_hat`` beat recomputing the rows in backward: this is exactly what a user would write
    (bf16 inputs stay bf16, as a user would run them: ATen's bf16 layer norm keeps its statistics in
    fp32; fp16 would overflow in the backward's 16-bit intermediates, so it and mixed dtypes run in the
    accumulation dtype), so the torch backend never costs more than it. The loss comes back in the
    accumulation dtype, like the other backends'.
    """
    acc_dtype = accumulation_dtype(input.dtype, target.dtype)
    both_bf16 = input.dtype == target.dtype == torch.bfloat16
    compute_dtype = torch.bfloat16 if both_bf16 else acc_dtype
    d = input.shape[-1]
    x_hat = F.layer_norm(input.to(compute_dtype), (d,), eps=eps)
    t_hat = F.layer_norm(target.to(compute_dtype), (d,), eps=eps)
    if reduction == "none":
        return F.mse_loss(x_hat, t_hat, reduction="none").mean(dim=-1).to(acc_dtype)
    return F.mse_loss(x_hat, t_hat, reduction=reduction).to(acc_dtype)
