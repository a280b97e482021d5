"""What one distillation step computes: the student, the projection head and the loss in one
module (:class:`DistillModule`, the unit DDP wraps; :class:`OneToOneDistillModule` for the
ablation's one-to-one baseline, :class:`ConcatDistillModule` for the concatenated target
``[t_k ; t_L]``, with :func:`teacher_targets` giving each its targets), and a truncated teacher
that counts the blocks it runs (:class:`CountingTeacher`).

Used by the trainer (:mod:`leap.run.loop`) and by the step timing (:mod:`leap.run.timing`), so both
run the same step.
"""

from __future__ import annotations

import torch
from torch import nn

from leap_kernels import FeatureDistillationHead

from . import vit
from .teacher import TruncatedTeacher

__all__ = [
    "DistillModule",
    "OneToOneDistillModule",
    "ConcatDistillModule",
    "CountingTeacher",
    "one_to_one_pairs",
    "teacher_targets",
]


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

    def __init__(
        self,
        student: nn.Module,
        head: FeatureDistillationHead,
        cls_weight: float,
        compute_dtype: torch.dtype | None = None,
    ):
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
        return x[:, self.num_prefix_tokens :], x[:, 0]

    def forward(self, images: torch.Tensor, target_patch: torch.Tensor, target_cls: torch.Tensor):
        s_patch, s_cls = self.features(images)
        patch_loss = self.head(s_patch, target_patch)
        cls_loss = self.head(s_cls, target_cls)
        loss = patch_loss + self.cls_weight * cls_loss
        return loss, patch_loss, cls_loss, s_patch.detach()

    @staticmethod
    def final_target(target: torch.Tensor) -> torch.Tensor:
        """The target the (final) student features are measured against (CKA/cosine)."""
        return target

    def project(self, student: torch.Tensor) -> torch.Tensor:
        """``(..., D_s) -> (..., D_t)``: the projected student that calibration and the per-step
        CKA compare with the teacher target (:meth:`final_target`)."""
        return self.head.project(student)

    def heads(self) -> list[nn.Module]:
        """Every projection head (one here)."""
        return [self.head]

    @torch.no_grad()
    def reset_heads(self, generator: torch.Generator) -> list[nn.Parameter]:
        """Re-initialise every projection head (``--reset-head-on-level-up``) from ``generator``
        (same seed on every rank: identical heads under DDP); returns the reset parameters."""
        params = []
        for head in self.heads():
            w = torch.empty(head.weight.shape, dtype=torch.float32)
            # timm trunc-normal(std 0.02) as leap_kernels.init_projection_head_, drawn on CPU
            # from the given generator so the result does not depend on the device.
            nn.init.trunc_normal_(w, std=0.02, generator=generator)
            head.weight.copy_(w)
            params.append(head.weight)
            if head.bias is not None:
                head.bias.zero_()
                params.append(head.bias)
        return params


def one_to_one_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """``(student block, teacher block)`` pairs of the one-to-one baseline, both 1-indexed:
    student block ``i + 1`` (``i`` 0-indexed) -> teacher block ``round((i + 1) * L_t / L_s)``
    (Python's round, half to even), so the last student block meets the last teacher block."""
    if student_blocks < 1 or teacher_blocks < 1:
        raise ValueError(f"one_to_one_pairs: block counts must be >= 1, got {student_blocks}, {teacher_blocks}")
    return [(i + 1, max(1, round((i + 1) * teacher_blocks / student_blocks))) for i in range(student_blocks)]


class OneToOneDistillModule(DistillModule):
    """The one-to-one baseline of the paper's ablation: every student block is aligned with a
    teacher block (:func:`one_to_one_pairs`) through its own projector.

    The student's intermediate outputs go through the student's final norm (as the teacher's
    do), block ``i``'s tokens through projector ``i`` (the last block's projector is ``head``,
    so metrics and checkpoints of the final features work as in :class:`DistillModule`), and the
    loss is the mean over the blocks of ``patch_loss + cls_weight * cls_loss``.

    ``forward(images, target_patch (P, B, N, D_t), target_cls (P, B, D_t))`` with ``P`` = student
    depth (:func:`teacher_targets` builds them) returns ``(loss, patch_loss, cls_loss, final student
    patch (B, N, D_s) detached)``, the two partial losses also averaged over the blocks.
    """

    def __init__(
        self,
        student: nn.Module,
        head: FeatureDistillationHead,
        cls_weight: float,
        compute_dtype: torch.dtype | None = None,
        teacher_blocks: int = 1,
    ):
        super().__init__(student, head, cls_weight, compute_dtype)
        self.pairs = one_to_one_pairs(len(student.blocks), teacher_blocks)
        normalize = getattr(head, "normalize", False)
        self.block_heads = nn.ModuleList(
            FeatureDistillationHead(head.weight.shape[1], head.weight.shape[0], normalize=normalize)
            for _ in self.pairs[:-1]
        )

    @property
    def teacher_blocks(self) -> list[int]:
        return [t for _, t in self.pairs]

    def heads(self) -> list[nn.Module]:
        return [*self.block_heads, self.head]

    def block_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Student tokens after every block, through the final norm: ``L_s`` x ``(B, P + N, D_s)``."""
        m = self.student
        family = vit.family_of(m, "OneToOneDistillModule")
        outs = []
        for x in family.block_outputs(m, images):  # each block called as timm calls it (rope for Eva)
            y = family.final_norm(m, x)
            if self.compute_dtype is not None and torch.is_autocast_enabled(y.device.type):
                y = y.to(self.compute_dtype)
            outs.append(y)
        return outs

    def forward(self, images: torch.Tensor, target_patch: torch.Tensor, target_cls: torch.Tensor):
        feats = self.block_features(images)
        patch_losses, cls_losses = [], []
        for p, (x, head) in enumerate(zip(feats, self.heads())):
            patch_losses.append(head(x[:, self.num_prefix_tokens :], target_patch[p]))
            cls_losses.append(head(x[:, 0], target_cls[p]))
        patch_loss = torch.stack(patch_losses).mean()
        cls_loss = torch.stack(cls_losses).mean()
        loss = patch_loss + self.cls_weight * cls_loss
        return loss, patch_loss, cls_loss, feats[-1][:, self.num_prefix_tokens :].detach()

    @staticmethod
    def final_target(target: torch.Tensor) -> torch.Tensor:
        return target[-1]


class ConcatDistillModule(DistillModule):
    """The reference's ``--curriculum-concat-teacher-last`` (``--concat-teacher-last``): the target is
    the concatenation ``[t_k ; t_L]`` of the current block and the last block on the channel axis,
    ``(B, N, 2 D_t)``, reached through one ``Linear(D_s -> 2 D_t)`` head (``head``, built that wide):
    with the paper's MSE the loss is the mean of the two halves' MSEs. The teacher runs to the last
    block every step (:func:`teacher_targets`), so this mode saves no teacher FLOPs.

    The curriculum measures the first half only: :meth:`project` is the head's first ``D_t`` outputs
    and :meth:`final_target` the block-``k`` half of the target.
    """

    @property
    def target_dim(self) -> int:
        """``D_t``: half the head's output width."""
        return self.head.weight.shape[0] // 2

    def project(self, student: torch.Tensor) -> torch.Tensor:
        d = self.target_dim
        w, b = self.head.weight[:d], self.head.bias
        return nn.functional.linear(student, w.to(student.dtype), None if b is None else b[:d].to(student.dtype))

    @staticmethod
    def final_target(target: torch.Tensor) -> torch.Tensor:
        return target[..., : target.shape[-1] // 2]


def teacher_targets(
    teacher: TruncatedTeacher, module: DistillModule, images: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's teacher targets ``(patch (B, N, D), cls (B, D))``: block ``k`` for LEAP/the baseline;
    every paired block (in one pass, up to the last; ``(P, B, N, D_t)``, ``(P, B, D_t)``) for
    :class:`OneToOneDistillModule`; ``[t_k ; t_L]`` (one pass to the last block, ``D = 2 D_t``) for
    :class:`ConcatDistillModule`."""
    if isinstance(module, OneToOneDistillModule):
        return teacher.collect(images, module.teacher_blocks)
    if isinstance(module, ConcatDistillModule):
        patch, cls = teacher.collect(images, [k, teacher.num_blocks])
        return torch.cat([patch[0], patch[1]], dim=-1), torch.cat([cls[0], cls[1]], dim=-1)
    return teacher(images, k)


class CountingTeacher(TruncatedTeacher):
    """:class:`~leap.teacher.TruncatedTeacher` that counts the blocks it actually runs
    (``blocks_run``, a host-side int: no device sync)."""

    blocks_run: int = 0

    def block_forward(self, block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        self.blocks_run += 1
        return super().block_forward(block, x, **kwargs)
