"""The backward of the fused feature loss for ``reduction="mean"|"sum"``: the gradients were finished
in the forward pass (:mod:`.loops`), so backward only scales the kept student gradient and sums the
weight/bias gradient splits in a fixed order, times ``grad_output`` and the reduction's scale in fp32,
cast to the parameters' dtypes: one launch of ``_rescale_kernel`` (:func:`rescale_triton`) or a few
ATen ops (:func:`rescale_aten`).
"""

from __future__ import annotations

import dataclasses

import torch

from .._triton_common import HAS_TRITON, accumulation_dtype
from .loops import ELEMENTWISE_BLOCK

if HAS_TRITON:
    import triton

    from .triton import _rescale_kernel

__all__ = ["RESCALE_TRITON_DTYPES", "RescaleRequest", "rescale_aten", "rescale_fits_triton", "rescale_triton"]


@dataclasses.dataclass(frozen=True)
class RescaleRequest:
    """The outputs of the backward rescale: ``scale`` and the dtypes of the weight and bias
    gradients (the student gradient keeps the kept gradient's dtype, the student's), and which of
    the three gradients are wanted."""

    scale: float
    weight_dtype: torch.dtype
    bias_dtype: torch.dtype
    need_student: bool
    need_weight: bool
    need_bias: bool


#: dtypes the rescale kernel loads and stores.
RESCALE_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rescale_fits_triton(
    grad_student: torch.Tensor, grad_weight: torch.Tensor, grad_output: torch.Tensor | None, request: RescaleRequest
) -> bool:
    """True when the Triton rescale kernel takes these dtypes (fp32 math; 16/32-bit in and out)."""
    dtypes = (grad_student.dtype, request.weight_dtype, request.bias_dtype)
    return (
        HAS_TRITON
        and accumulation_dtype(grad_weight.dtype, grad_student.dtype) == torch.float32
        and all(d in RESCALE_TRITON_DTYPES for d in dtypes)
        and (grad_output is None or grad_output.dtype in RESCALE_TRITON_DTYPES)
    )


def rescale_triton(
    grad_student: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    grad_output: torch.Tensor | None,
    request: RescaleRequest,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward rescale in one launch of ``_rescale_kernel`` (see ``feature_loss_rescale``)."""
    device = grad_weight.device
    splits, n, k = grad_weight.shape
    grad_student = grad_student.contiguous()  # the kept gradient is: no copy
    out_student = torch.empty(
        grad_student.shape if request.need_student else (0,), dtype=grad_student.dtype, device=device
    )
    out_weight = torch.empty((n, k) if request.need_weight else (0,), dtype=request.weight_dtype, device=device)
    out_bias = torch.empty((n,) if request.need_bias else (0,), dtype=request.bias_dtype, device=device)
    n_s, n_w, n_b = out_student.numel(), out_weight.numel(), out_bias.numel()
    block = ELEMENTWISE_BLOCK
    programs = triton.cdiv(n_s, block) + triton.cdiv(n_w, block) + triton.cdiv(n_b, block)
    if programs:
        _rescale_kernel[(programs,)](
            grad_student,
            grad_weight,
            grad_bias if grad_bias.numel() else grad_weight,
            grad_output if grad_output is not None else grad_weight,
            out_student,
            out_weight,
            out_bias,
            n_s,
            n_w,
            n_b,
            request.scale,
            SPLITS=splits,
            HAS_GRAD_OUT=grad_output is not None,
            BLOCK=block,
        )
    return out_student, out_weight, out_bias


def rescale_aten(
    grad_student: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    grad_output: torch.Tensor | None,
    request: RescaleRequest,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward rescale with ATen ops, the factor kept in fp32 (fp64 for fp64 inputs)."""
    acc = accumulation_dtype(grad_weight.dtype, grad_student.dtype)
    factor = grad_output.to(acc) * request.scale if grad_output is not None else request.scale

    def empty(dtype: torch.dtype) -> torch.Tensor:  # one each: outputs must not alias
        return grad_weight.new_empty(0, dtype=dtype)

    student_dtype = grad_student.dtype
    out_student = (grad_student.to(acc) * factor).to(student_dtype) if request.need_student else empty(student_dtype)
    out_weight = (
        (grad_weight.sum(0) * factor).to(request.weight_dtype) if request.need_weight else empty(request.weight_dtype)
    )
    out_bias = (grad_bias.sum(0) * factor).to(request.bias_dtype) if request.need_bias else empty(request.bias_dtype)
    return out_student, out_weight, out_bias
