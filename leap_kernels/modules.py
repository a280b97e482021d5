"""``nn.Module`` front-ends over the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .ops.feature_loss import fused_feature_loss
from .ops.token_norm_mse import token_normalized_mse


def init_projection_head_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """LEAP's head init: trunc-normal weight with std 0.02 (timm's convention: cut at +-2, i.e.
    effectively untruncated at this std) and zero bias."""
    nn.init.trunc_normal_(weight, std=0.02)
    if bias is not None:
        nn.init.zeros_(bias)


class FeatureDistillationHead(nn.Module):
    """A ``Linear(D_s -> D_t)`` projection head whose loss against the teacher is fused.

    ``forward(student (..., D_s), target (..., D_t)) -> loss``. The weight starts
    trunc-normal (std 0.02) and the bias at zero, as in LEAP.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        bias: bool = True,
        normalize: bool = False,
        reduction: str = "mean",
        eps: float = 1e-6,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        # Validated here, not at the first forward: a bad config fails where it is written.
        _checks.check_positive_int("student_dim", student_dim)
        _checks.check_positive_int("teacher_dim", teacher_dim)
        _checks.check_normalize(normalize)
        _checks.check_reduction(reduction)
        _checks.check_eps(eps)
        self.normalize = normalize
        self.reduction = reduction
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(teacher_dim, student_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(teacher_dim, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_projection_head_(self.weight, self.bias)

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """The plain projection ``(..., D_s) -> (..., D_t)`` (for metrics such as CKA)."""
        return nn.functional.linear(
            student, self.weight.to(student.dtype), self.bias.to(student.dtype) if self.bias is not None else None
        )

    def forward(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_feature_loss(
            student, self.weight, self.bias, target, normalize=self.normalize, reduction=self.reduction, eps=self.eps
        )

    def extra_repr(self) -> str:
        d_t, d_s = self.weight.shape
        return f"{d_s} -> {d_t}, bias={self.bias is not None}, normalize={self.normalize}, reduction={self.reduction!r}"


class TokenNormalizedMSELoss(nn.Module):
    """``forward(input (..., D), target (..., D)) -> loss``: see :func:`token_normalized_mse`."""

    def __init__(self, *, reduction: str = "mean", eps: float = 1e-6):
        super().__init__()
        _checks.check_reduction(reduction)
        _checks.check_eps(eps)
        self.reduction = reduction
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_normalized_mse(input, target, reduction=self.reduction, eps=self.eps)
