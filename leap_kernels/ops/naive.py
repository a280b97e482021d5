"""Plain PyTorch references: the specification of each op, differentiated by autograd.

Tests evaluate these in float64 and compare the kernels against them; the
benchmarks time them as "eager" and under ``torch.compile``. Shapes: ``M`` tokens
(any leading dims), ``D_s`` student width, ``D_t`` teacher width.
"""

from __future__ import annotations

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
    bias: torch.Tensor | None,
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
    Mixed dtypes (bf16 activations, fp32 parameters), as the op accepts them, compute in the promoted dtype.
    """
    dtype = student.dtype
    for t in (weight, bias, target):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    student, weight, target = student.to(dtype), weight.to(dtype), target.to(dtype)
    projected = F.linear(student, weight, None if bias is None else bias.to(dtype))
    if normalize:
        return token_normalized_mse_reference(projected, target, reduction=reduction, eps=eps)
    diff = projected - target
    return _reduce(diff * diff, reduction)


def rope_half_reference(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, prefix: int) -> torch.Tensor:
    """2-D/1-D rotary embedding in the half layout (timm ``apply_rot_embed(half=True)``, DINOv3).

    ``x (..., N, d)``; ``sin, cos (N - prefix, d/2)``, one angle per channel pair ``(j, j + d/2)``;
    the first ``prefix`` tokens (CLS, registers) are not rotated. Token ``t >= prefix``:
    ``x[j] cos - x[j + d/2] sin`` and ``x[j + d/2] cos + x[j] sin`` with ``sin, cos`` of row
    ``t - prefix``. Computed with normal dtype promotion and returned in ``x``'s dtype (as timm).
    """
    head, tail = x[..., :prefix, :], x[..., prefix:, :]
    a, b = tail.chunk(2, dim=-1)
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)
    return torch.cat([head, rotated], dim=-2)


def teacher_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_prefix: int = 0,
) -> torch.Tensor:
    """Softmax attention from a packed QKV projection, as timm's ``Attention`` (and, with ``rope``,
    ``EvaAttention``) computes it.

    qkv ``(B, N, 3*H*d)`` in timm's ``(B, N, 3, H, d)`` layout; returns ``(B, N, H*d)``:
    ``(softmax(q @ k^T * scale) @ v).transpose(1, 2).reshape(B, N, H*d)``, ``scale = d**-0.5``
    by default. ``rope = (sin, cos)``, each ``(N - rope_prefix, d/2)``: q and k are rotated first
    (:func:`rope_half_reference`; the first ``rope_prefix`` tokens are not). Plain matmuls and
    softmax in the input's dtype (evaluate in float64 for a reference).
    """
    batch, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    if scale is None:
        scale = head_dim**-0.5
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
    if rope is not None:
        sin, cos = rope
        q = rope_half_reference(q, sin, cos, rope_prefix)
        k = rope_half_reference(k, sin, cos, rope_prefix)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return (attn @ v).transpose(1, 2).reshape(batch, n, num_heads * head_dim)
