"""The one adapter over a timm ViT's internals.

``leap`` runs a ViT piecewise (the teacher stops after block ``k``, the one-to-one baseline
reads every block of the student, the evaluation cuts a model at block ``K``). That needs the
model's layout beyond its public ``forward_features``: the token embedding (patch embed,
position embedding, prefix tokens), the block list and the final norm, some of them private
attributes of timm. Every such read goes through a *family adapter* here, so a change of timm's
layout, or a new model family, is handled in this module only.

Only the timm ``VisionTransformer`` family (DINOv2 included) is implemented: :data:`VIT`. A
DINOv3 (timm ``Eva``) adapter would be another :class:`VitFamily` subclass added to
:data:`FAMILIES`; :func:`family_of` picks the first family a model matches.

Shapes: images ``(B, 3, H, W)``; tokens ``(B, P + N, D)`` with ``P`` prefix tokens (CLS +
registers) before the ``N`` patch tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "VitFamily",
    "VIT",
    "FAMILIES",
    "family_of",
    "unwrap",
    "unwrap_vit",
    "embed",
    "blocks",
    "final_norm",
    "num_prefix_tokens",
    "patch_grid",
]


class VitFamily:
    """Adapter of the timm ``VisionTransformer`` layout (the methods take the model itself)."""

    #: Short name of the family.
    name = "vit"
    #: Attributes a model of the family has (the first missing one names the problem).
    required = ("patch_embed", "_pos_embed", "blocks", "norm")

    def missing(self, model: Any) -> str | None:
        """The first attribute of :attr:`required` that ``model`` lacks, or None."""
        return next((a for a in self.required if not hasattr(model, a)), None)

    def matches(self, model: Any) -> bool:
        return isinstance(model, nn.Module) and self.missing(model) is None

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Token embedding as in timm ``forward_features``: ``(B, 3, H, W) -> (B, P + N, D)``.

        Patch embed, ``_pos_embed`` (prepends CLS/register tokens, adds positions),
        ``patch_drop`` and ``norm_pre``.
        """
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    def blocks(self, model: nn.Module) -> nn.Sequential:
        """The transformer blocks, in order (block ``k`` 1-indexed is entry ``k - 1``)."""
        return model.blocks

    def final_norm(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's final norm (with its affine) on tokens ``(B, P + N, D)``."""
        return model.norm(x)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches: CLS + registers."""
        return int(getattr(model, "num_prefix_tokens", 1))

    def patch_grid(self, model: nn.Module) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` at the configured image size; N = rows * cols."""
        g = model.patch_embed.grid_size
        return int(g[0]), int(g[1])


#: The timm ``VisionTransformer`` family.
VIT = VitFamily()
#: The families :func:`family_of` knows, tried in order.
FAMILIES: tuple[VitFamily, ...] = (VIT,)


def unwrap(model: Any) -> Any:
    """The ViT inside ``model``: ``model`` itself, or the ``.model`` of a wrapper holding one
    (e.g. :class:`leap.teacher.TruncatedTeacher`)."""
    if isinstance(model, nn.Module) and not hasattr(model, "patch_embed"):
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module) and hasattr(inner, "patch_embed"):
            return inner
    return model


def unwrap_vit(model: Any) -> nn.Module:
    """:func:`unwrap`, checked: the result has a patch embedding and blocks.

    Raises:
        TypeError: ``model`` is not a timm ViT, nor a wrapper holding one as ``.model``.
    """
    vit = unwrap(model)
    if not isinstance(vit, nn.Module) or not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
        raise TypeError(f"expected a timm VisionTransformer (or a wrapper with .model), got {type(model).__name__}")
    return vit


def family_of(model: Any, who: str = "leap") -> VitFamily:
    """The adapter of ``model``'s family (``model`` as given, not unwrapped).

    Raises:
        TypeError: no family matches; the message names ``who`` and the missing attribute.
    """
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise TypeError(
        f"{who} needs a timm VisionTransformer; {type(model).__name__} has no {FAMILIES[0].missing(model)!r}"
    )


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:meth:`VitFamily.embed` of ``model``'s family."""
    return family_of(model).embed(model, x)


def blocks(model: nn.Module) -> nn.Sequential:
    """:meth:`VitFamily.blocks` of ``model``'s family."""
    return family_of(model).blocks(model)


def final_norm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:meth:`VitFamily.final_norm` of ``model``'s family."""
    return family_of(model).final_norm(model, x)


def num_prefix_tokens(model: nn.Module) -> int:
    """:meth:`VitFamily.num_prefix_tokens` of ``model``'s family."""
    return family_of(model).num_prefix_tokens(model)


def patch_grid(model: Any) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of a timm ViT (or a wrapper holding one) at its image size.

    Raises:
        TypeError: no patch embedding.
    """
    vit = unwrap(model)
    if not hasattr(vit, "patch_embed"):
        raise TypeError(f"{type(model).__name__} has no patch_embed; expected a timm VisionTransformer")
    return next((f for f in FAMILIES if f.matches(vit)), VIT).patch_grid(vit)
