"""Fused feature loss: projection ``student @ weight.T + bias`` followed by MSE or
token-normalized MSE against the teacher's features, forward and backward fused.

Room layout: :mod:`.triton` (the Triton kernels: projection GEMM with a loss epilogue; split
weight/bias gradient GEMM; one rescale kernel for backward) -> :mod:`.loops` (the chunk loop of
each backend: Triton and torch; cpp and cuda: one call of the C++ loop in csrc/ops.cpp) and
:mod:`.rescale` (the backward of ``mean``/``sum``) -> here: the backend choice, the torch.library ops with their fake
implementations and autograd, and the functional API.

The backend is chosen once per call, by the caller of each op (:func:`fused_feature_loss` for the
forward, the autograd backward for the recomputing backward op), and handed to the op as its
``backend`` argument: the op runs that backend's loop, and its fake implementation derives the
layout of the kept gradients (the split count of the weight-gradient workspace,
:func:`~.loops.kept_splits`) from the name alone, without dispatching again.

How it saves memory (the idea of Liger's fused linear cross-entropy, for a
regression loss): tokens are processed in chunks; for each chunk the projection is
formed, turned into the loss and into ``G = dL/dP`` right away, and ``G`` is
consumed by the gradient GEMMs before the next chunk. The full ``(M, D_t)``
projection never exists and nothing of that size is kept for backward. For
``reduction="mean"|"sum"`` the gradients are finished in the forward pass and the
backward only rescales them by ``grad_output``; ``reduction="none"`` (a per-token
upstream gradient) recomputes the chunks in backward instead.

Triton flow, per chunk of ``chunk_tokens`` tokens (16384 by default: two chunks at the
paper's 32768 tokens), with every buffer allocated once per call and sized by the shapes
only (no host sync, nothing data-dependent: CUDA-graph capturable):

1. ``_projection_loss_kernel``: ``P = S W^T + b``. Plain MSE: the epilogue writes
   ``G = 2 (P - T)`` into the one reusable ``(chunk, D_t)`` G buffer (compute dtype) and each
   column tile's per-token partial sums of ``(P - T)^2`` into one ``(slots, M)`` fp32 buffer.
   Token-normalized: the epilogue stores ``P`` in the compute dtype into the G buffer, and
   ``_token_norm_mse_rows_kernel`` (``._rows``) turns it into ``G`` in place and writes the
   per-token losses.
2. cuBLAS: ``dS = G W`` straight into the kept student gradient (``addmm`` with
   ``alpha = kept scale`` for fp16, see below).
3. ``_grad_weight_kernel``: ``dW = G^T S`` and ``db = sum G``, split over token slices of the
   chunk (a grid over column tiles x splits, not only the 72 column tiles of 1536 x 384),
   each split accumulating into its own fp32 ``(splits, D_t, D_s)`` workspace slice.

Then one ATen sum gives the loss. Backward is one launch of ``_rescale_kernel``: the kept
student gradient, the split sums of the weight and bias gradients (added in a fixed order:
deterministic, no atomics), all times ``grad_output`` and the reduction's scale in fp32,
cast to the parameters' dtypes. Plain MSE, bf16, at the paper's shape: 8 launches per
forward+backward (3 per chunk, the loss sum, the rescale); token-normalized: 10.

Strided ``(B, N, D)`` inputs (e.g. ``x[:, prefix:]``) are read in place by the Triton kernels
(row ``m`` at ``(m // N) * stride_b + (m % N) * stride_n``); the other backends copy them.

The gradients kept between forward and backward are ``kept_grad_scale`` times those of
``sum(row_loss)``: no ``1/numel`` factor, so that 16-bit storage does not underflow, and for fp16
a ``2^-ceil(log2(D_t) / 2)`` factor so that the student gradient, a sum over ``D_t`` channels, does
not overflow fp16 at residuals |P - T| ~ 1e3. Backward undoes both in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from ... import _backends, _checks
from .._rows import row_grad_scale
from .._triton_common import HAS_TRITON, INTERPRETED
from .loops import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CPU_CHUNK_TOKENS,
    DEFAULT_TORCH_CPU_CHUNK_TOKENS,
    DEFAULT_TRITON_CHUNK_TOKENS,
    ENV_CHUNK_TOKENS,
    MAX_WEIGHT_GRAD_SPLITS,
    MIN_ROWS_PER_SPLIT,
    LossOptions,
    Operands,
    chunk_tokens,
    kept_grad_scale,
    kept_splits,
    loss_scale,
    run,
    token_rows,
    weight_grad_splits,
)
from .rescale import RescaleRequest, rescale_aten, rescale_fits_triton, rescale_triton

if HAS_TRITON:  # the kernels, listed with this op (tests and tools/compile_check.py find them here)
    from .triton import (  # noqa: F401
        PARTIAL_BLOCK_N,
        _grad_weight_kernel,
        _projection_loss_kernel,
        _rescale_kernel,
        check_partial_slots,
    )

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CPU_CHUNK_TOKENS",
    "DEFAULT_TORCH_CPU_CHUNK_TOKENS",
    "DEFAULT_TRITON_CHUNK_TOKENS",
    "ENV_CHUNK_TOKENS",
    "INTERPRETED",
    "MAX_WEIGHT_GRAD_SPLITS",
    "MIN_ROWS_PER_SPLIT",
    "chunk_tokens",
    "fused_feature_loss",
    "kept_grad_scale",
    "kept_splits",
    "loss_scale",
    "select_feature_loss_backend",
    "token_rows",
    "weight_grad_splits",
]

OP_NAME = "fused_feature_loss"
#: The op ``feature_loss_rescale`` declares its backends under this name (Triton kernel or ATen ops).
RESCALE_OP_NAME = "feature_loss_rescale"

Tensors3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Tensors4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- backend choice


def select_feature_loss_backend(ops: Operands, normalize: bool) -> str:
    """The backend that runs the fused loss on ``ops`` now (:func:`leap_kernels._backends.select_backend`
    with the call's row width: the token-normalized loss holds a whole ``D_t`` row per program).

    Called once per op call, by the op's caller; the op and its fake take the name as an argument.
    """
    return _backends.select_backend(OP_NAME, ops.tensors(), row_width=ops.n if normalize else None)


def _check_backend_name(backend: str) -> None:
    if backend not in _backends.backend_names():
        raise ValueError(f"backend: expected one of {list(_backends.backend_names())}, got {backend!r}")


# ----------------------------------------------------------------------------- torch.library ops


def _kept_outputs(ops: Operands, compute_grads: bool, backend: str) -> Tensors3:
    """Empty tensors shaped like the kept gradients of ``backend`` (``(0,)`` each without ``compute_grads``)."""
    student = ops.student
    if not compute_grads:
        return student.new_empty(0), student.new_empty(0), student.new_empty(0)
    acc = ops.acc_dtype()
    splits = kept_splits(backend, ops.m, student.device)
    grad_student = student.new_empty(student.shape)
    grad_weight = student.new_empty((splits, ops.n, ops.k), dtype=acc)
    grad_bias = student.new_empty((splits, ops.n) if ops.bias is not None else (0,), dtype=acc)
    return grad_student, grad_weight, grad_bias


def _or_empty(grad_bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad_bias if grad_bias is not None else like.new_empty(0)


@torch.library.custom_op("leap_kernels::fused_feature_loss", mutates_args=())
def _fused_feature_loss_op(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalize: bool,
    reduction: str,
    eps: float,
    compute_grads: bool,
    backend: str,
) -> Tensors4:
    """Returns ``(loss, grad_student, grad_weight, grad_bias)``, computed by ``backend``'s loop.

    student ``(M, D_s)`` or ``(B, N, D_s)`` (a strided token slice), target likewise with ``D_t``.
    The gradients are ``kept_grad_scale(student.dtype, D_t)`` times those of ``sum(row_loss)``:
    student in its shape and dtype, weight ``(splits, D_t, D_s)`` and bias ``(splits, D_t)`` per
    token split (``kept_splits(backend, M, device)``; backward adds them), fp32 (fp64 for fp64
    inputs); bias ``(0,)`` without bias; all ``(0,)`` when ``compute_grads`` is False.
    ``backend``: a name of :func:`leap_kernels.backends` chosen by the caller
    (:func:`select_feature_loss_backend`); it is not checked against the inputs here.
    """
    _check_backend_name(backend)
    ops = Operands(student, weight, bias, target)
    options = LossOptions(
        normalize, eps, reduction=reduction, want_grads=compute_grads, kept_scale=kept_grad_scale(student.dtype, ops.n)
    )
    loss, grad_student, grad_weight, grad_bias = run(backend, ops, options)
    assert loss is not None
    if grad_student is None or grad_weight is None:
        return (loss, *_kept_outputs(ops, False, backend))
    return loss, grad_student, grad_weight, _or_empty(grad_bias, grad_weight)


@_fused_feature_loss_op.register_fake
def _(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalize: bool,
    reduction: str,
    eps: float,
    compute_grads: bool,
    backend: str,
) -> Tensors4:
    ops = Operands(student, weight, bias, target)
    loss = student.new_empty((ops.m,) if reduction == "none" else (), dtype=ops.acc_dtype())
    return (loss, *_kept_outputs(ops, compute_grads, backend))


@torch.library.custom_op("leap_kernels::fused_feature_loss_backward", mutates_args=())
def _fused_feature_loss_backward_op(
    row_scale: torch.Tensor,
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalize: bool,
    eps: float,
    backend: str,
) -> Tensors3:
    """Recomputes the chunks with a per-token upstream gradient (``reduction="none"``); returns the
    gradients of ``sum_m row_scale[m] row_loss[m]`` in the layout of :func:`_fused_feature_loss_op`
    (no kept scale: ``row_scale`` carries the ``1/D_t`` of the per-token mean already)."""
    _check_backend_name(backend)
    ops = Operands(student, weight, bias, target)
    options = LossOptions(
        normalize, eps, reduction=None, want_grads=True, row_scale=row_scale.to(ops.acc_dtype()).contiguous()
    )
    _, grad_student, grad_weight, grad_bias = run(backend, ops, options)
    assert grad_student is not None and grad_weight is not None
    return grad_student, grad_weight, _or_empty(grad_bias, grad_weight)


@_fused_feature_loss_backward_op.register_fake
def _(
    row_scale: torch.Tensor,
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    normalize: bool,
    eps: float,
    backend: str,
) -> Tensors3:
    return _kept_outputs(Operands(student, weight, bias, target), True, backend)


@torch.library.custom_op("leap_kernels::feature_loss_rescale", mutates_args=())
def _rescale_op(
    grad_student: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    grad_output: torch.Tensor | None,
    scale: float,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
    need: list[bool],
) -> Tensors3:
    """The fused loss's backward from the kept gradients, one Triton launch.

    ``f = grad_output * scale`` (``scale`` alone when ``grad_output`` is None), in fp32 (fp64 for fp64
    inputs); returns ``grad_student * f`` in ``grad_student``'s dtype (the kept student gradient is in
    the student's dtype), ``grad_weight.sum(0) * f`` ``(D_t, D_s)`` in ``weight_dtype`` and
    ``grad_bias.sum(0) * f`` ``(D_t,)`` in ``bias_dtype`` (the split slices added in order);
    ``need = [student, weight, bias]`` says which are wanted; one not asked for is ``(0,)``.

    Multiplying a 16-bit gradient by a 0-d 16-bit factor would round the factor first (a 1/(M*D_t)
    factor underflows to 0 in fp16 and loses up to 0.4% in bf16), and an fp32 copy would cost memory.
    """
    request = _rescale_request(grad_bias, scale, weight_dtype, bias_dtype, need)
    if (
        rescale_fits_triton(grad_student, grad_weight, grad_output, request)
        and _backends.select_backend(RESCALE_OP_NAME, [grad_weight]) == "triton"
    ):
        return rescale_triton(grad_student, grad_weight, grad_bias, grad_output, request)
    return rescale_aten(grad_student, grad_weight, grad_bias, grad_output, request)


def _rescale_request(
    grad_bias: torch.Tensor, scale: float, weight_dtype: torch.dtype, bias_dtype: torch.dtype, need: list[bool]
) -> RescaleRequest:
    if len(need) != 3:
        raise ValueError(f"need: expected [student, weight, bias] (3 bools), got {need!r}")
    need_student, need_weight, need_bias = (bool(x) for x in need)
    return RescaleRequest(
        scale, weight_dtype, bias_dtype, need_student, need_weight, need_bias and grad_bias.numel() > 0
    )


@_rescale_op.register_fake
def _(
    grad_student: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    grad_output: torch.Tensor | None,
    scale: float,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
    need: list[bool],
) -> Tensors3:
    request = _rescale_request(grad_bias, scale, weight_dtype, bias_dtype, need)
    _, n, k = grad_weight.shape
    new = grad_weight.new_empty
    return (
        new(grad_student.shape if request.need_student else (0,), dtype=grad_student.dtype),
        new((n, k) if request.need_weight else (0,), dtype=weight_dtype),
        new((n,) if request.need_bias else (0,), dtype=bias_dtype),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors4) -> None:
    student, weight, bias, target, normalize, reduction, eps, compute_grads, backend = inputs
    _, grad_student, grad_weight, grad_bias = output
    ctx.set_materialize_grads(False)  # the kept-gradient outputs get no gradient: no zero tensors for them
    ctx.reduction = reduction
    ctx.normalize = normalize
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.dtypes = (student.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
    ctx.shape = (student.numel() // student.shape[-1], weight.shape[0])
    if reduction == "none":
        ctx.save_for_backward(student, weight, bias, target)
    else:
        ctx.save_for_backward(grad_student, grad_weight, grad_bias)


def _backward(ctx: Any, grad_loss: torch.Tensor | None, *_kept: torch.Tensor | None) -> tuple[Any, ...]:
    need_student, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    nothing = (None,) * 9
    if grad_loss is None or not (need_student or need_weight or need_bias):
        return nothing
    student_dtype, weight_dtype, bias_dtype = ctx.dtypes
    m, n = ctx.shape
    if ctx.reduction == "none":
        student, weight, bias, target = ctx.saved_tensors
        # The backward op's caller chooses its backend, now (a backend forced around backward() applies).
        backend = select_feature_loss_backend(Operands(student, weight, bias, target), ctx.normalize)
        grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.fused_feature_loss_backward(
            row_grad_scale(grad_loss, "none", m, n), student, weight, bias, target, ctx.normalize, ctx.eps, backend
        )
        grad_output, scale = None, 1.0
    else:
        grad_student, grad_weight, grad_bias = ctx.saved_tensors
        if grad_student.numel() == 0 and m > 0:
            raise RuntimeError(
                "fused_feature_loss: backward reached a loss computed without gradients; this happens when "
                "the forward ran with grad disabled or no input required grad"
            )
        grad_output = grad_loss
        scale = (1.0 / (m * n) if ctx.reduction == "mean" else 1.0) / kept_grad_scale(student_dtype, n)
    out_student, out_weight, out_bias = torch.ops.leap_kernels.feature_loss_rescale(
        grad_student,
        grad_weight,
        grad_bias,
        grad_output,
        scale,
        weight_dtype,
        bias_dtype,
        [need_student, need_weight, need_bias],
    )
    return (
        out_student if need_student else None,
        out_weight if need_weight else None,
        out_bias if need_bias else None,
        *nothing[3:],
    )


_fused_feature_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def fused_feature_loss(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Projection + MSE (or token-normalized MSE), forward and backward fused.

    ``P = student @ weight.T + bias``;
    ``normalize=False``: ``loss = mean((P - target)^2)`` (the LEAP paper's loss);
    ``normalize=True``: ``loss = mean((LN(P) - LN(target))^2)``, LN per token over channels,
    no affine, ``eps`` inside the square root.

    Args:
        student: ``(..., D_s)`` student features (fp32, bf16 or fp16). A token slice such as
            ``x[:, prefix:]`` of a ``(B, N, D_s)`` tensor is read in place by the Triton kernels.
        weight: ``(D_t, D_s)`` projection weight, ``nn.Linear`` layout.
        bias: ``(D_t,)`` or None.
        target: ``(..., D_t)`` teacher features, same leading dims; a constant (must not
            require grad: pass ``target.detach()``).
        normalize: token-normalized MSE instead of plain MSE.
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (``(...)``: per-token
            loss, mean over channels).
        eps: variance epsilon of the token normalization.

    Returns:
        The fp32 loss (fp64 for float64 inputs). Gradients flow to ``student``, ``weight`` and
        ``bias`` in their own dtypes. The projection runs in ``student.dtype`` (weight and bias
        are cast to it, as autocast does) with fp32 accumulation; the ``(M, D_t)`` projection is
        never materialized nor kept for backward (the token-normalized loss holds one chunk of it
        in ``student.dtype``).

    Example::

        >>> head = torch.nn.Linear(384, 1536)
        >>> loss = fused_feature_loss(student_tokens, head.weight, head.bias, teacher_tokens.detach())
        >>> loss.backward()
    """
    _checks.check_feature_loss_inputs(student, weight, bias, target, reduction, eps)
    _checks.check_normalize(normalize)
    lead_shape = student.shape[:-1]
    ops = Operands(token_rows(student), weight, bias, token_rows(target))
    compute_grads = (
        reduction != "none"
        and torch.is_grad_enabled()
        and (student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    )
    backend = select_feature_loss_backend(ops, bool(normalize))
    loss, _, _, _ = _fused_feature_loss_op(
        ops.student, weight, bias, ops.target, bool(normalize), reduction, float(eps), compute_grads, backend
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss
