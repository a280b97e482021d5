"""Plain PyTorch references: the specification of each op, differentiated by autograd.

Tests evaluate these in float64 and compare the kernels against them; the
benchmarks time them as "eager" and under ``torch.compile``. Shapes: ``M`` tokens
(any leading dims), ``D_s`` student width, ``D_t`` teacher width.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _reduce(per_element: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum":
        return per_element.sum()
    return per_element.mean(dim=-1)  # "none": per-token loss, mean over channels


def token_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token normalization over the channel dim, no affine: ``(x - mean) / sqrt(var + eps)``."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def token_normalized_mse_reference(
    input: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean", eps: float = 1e-6
) -> torch.Tensor:
    """``mean((LN(input) - LN(target))^2)``; input, target ``(..., D)``; "none" gives ``(...)``."""
    diff = token_layer_norm(input, eps) - token_layer_norm(target, eps)
    return _reduce(diff * diff, reduction)


def fused_feature_loss_reference(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Projection + (token-normalized) MSE.

    student ``(..., D_s)``, weight ``(D_t, D_s)``, bias ``(D_t,)`` or None, target ``(..., D_t)``.
    ``normalize=False``: ``mean((student @ weight.T + bias - target)^2)``.
    ``normalize=True``: ``mean((LN(student @ weight.T + bias) - LN(target))^2)``.
    """
    projected = F.linear(student, weight, bias)
    if normalize:
        return token_normalized_mse_reference(projected, target, reduction=reduction, eps=eps)
    diff = projected - target
    return _reduce(diff * diff, reduction)
