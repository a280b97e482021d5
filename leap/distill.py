"""What one distillation step computes: the student, the projection head and the loss in one
module (:class:`DistillModule`, the unit DDP wraps), and a truncated teacher that counts the
blocks it runs (:class:`CountingTeacher`).

Used by the trainer (:mod:`leap.train`) and by the step timing (:mod:`leap.timing`), so both
run the same step.
"""

from __future__ import annotations

import torch
from torch import nn

from leap_kernels import FeatureDistillationHead

from .teacher import TruncatedTeacher

__all__ = ["DistillModule", "CountingTeacher"]


class DistillModule(nn.Module):
    """Student + projection head in one module (the unit DDP wraps).

    ``forward(images (B,3,H,W), target_patch (B,N,D_t), target_cls (B,D_t))`` returns
    ``(loss, patch_loss, cls_loss, student_patch (B,N,D_s) detached)``; the losses are fp32
    0-d tensors from :func:`leap_kernels.fused_feature_loss` (through the head), with
    ``loss = patch_loss + cls_weight * cls_loss``.

    Args:
        student: timm ViT; its final-norm output is split into CLS (token 0) and patches
            (after ``num_prefix_tokens``).
        head: :class:`leap_kernels.FeatureDistillationHead` ``(D_s -> D_t)``, shared by
            patch tokens and CLS.
        cls_weight: weight of the CLS term (paper: 0.05).
        compute_dtype: under autocast, the student features are cast to this dtype before
            the fused loss, as autocast would do for a Linear (LayerNorm outputs fp32).
    """

    def __init__(self, student: nn.Module, head: FeatureDistillationHead, cls_weight: float,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.student = student
        self.head = head
        self.cls_weight = float(cls_weight)
        self.compute_dtype = compute_dtype
        self.num_prefix_tokens = int(student.num_prefix_tokens)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student ``(patch (B, N, D_s), cls (B, D_s))`` after its final norm."""
        x = self.student.forward_features(images)
        if self.compute_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.compute_dtype)
        return x[:, self.num_prefix_tokens:], x[:, 0]

    def forward(self, images: torch.Tensor, target_patch: torch.Tensor, target_cls: torch.Tensor):
        s_patch, s_cls = self.features(images)
        patch_loss = self.head(s_patch, target_patch)
        cls_loss = self.head(s_cls, target_cls)
        loss = patch_loss + self.cls_weight * cls_loss
        return loss, patch_loss, cls_loss, s_patch.detach()


class CountingTeacher(TruncatedTeacher):
    """:class:`~leap.teacher.TruncatedTeacher` that counts the blocks it actually runs
    (``blocks_run``, a host-side int: no device sync)."""

    blocks_run: int = 0

    def block_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.blocks_run += 1
        return super().block_forward(block, x)
