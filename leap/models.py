"""Model construction for LEAP (and, re-exported from :mod:`leap.weights`, teacher-checkpoint loading).

Two timm families: ``VisionTransformer`` models in the DINOv2 layout (patch 14, LayerScale, optional
register tokens, optional packed SwiGLU FFN) and ``Eva`` models in the DINOv3 layout (patch 16, CLS + 4
storage tokens, 2-D rotary position embedding, LayerScale, a SwiGLU FFN for the 7B and H+ models).

Public API
----------
- :func:`build_model` -- build a timm ViT or DINOv3 model (plus ``vit_tiny_patch14_dinov2``, which timm lacks).
- :func:`patch_grid`, :func:`check_compatible` -- patch-grid bookkeeping for teacher/student.
- :func:`load_teacher_weights` -- load a local checkpoint in the official DINOv2/DINOv3, Hugging Face
  ``transformers`` Dinov2/DINOv3ViT or timm layout into a timm model (:mod:`leap.weights`).
- :func:`convert_state_dict` -- the conversion step of :func:`load_teacher_weights`, without I/O.

The checkpoint layouts and their conversions are described in :mod:`leap.weights`.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ModelError
from .hub import hub_source, is_hub_name
from .vit import EVA, patch_grid, unwrap
from .weights import (
    POS_EMBED_RULES,
    convert_state_dict,
    load_teacher_weights,
    pos_embed_rule,
    resample_patch_pos_embed,
)

__all__ = [
    "build_model",
    "patch_grid",
    "check_compatible",
    "load_teacher_weights",
    "convert_state_dict",
    "available_models",
    "pos_embed_rule",
    "resample_patch_pos_embed",
    "POS_EMBED_RULES",
    "DINOV3_MODELS",
]

# Models timm does not register, defined as (timm base model, overrides).
_EXTRA_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # ViT-T/14 as the LEAP reference code builds it: a plain timm VisionTransformer(patch 14,
    # width 192, depth 12, 3 heads, mlp_ratio 4, qkv_bias) with NO LayerScale (5.50M parameters
    # at 224 px). Built from timm's plain ViT-T rather than the DINOv2 ViT-S (which would bring
    # LayerScale; timm drops an ``init_values=None`` override, so it cannot be switched off there).
    "vit_tiny_patch14_dinov2": ("vit_tiny_patch16_224", dict(patch_size=14)),
    "vit_tiny_patch14_reg4_dinov2": ("vit_tiny_patch16_224", dict(patch_size=14, reg_tokens=4, no_embed_class=True)),
}

#: The DINOv3 models of this timm (``Eva``: patch 16, CLS + 4 storage tokens, 2-D rotary embedding).
DINOV3_MODELS: tuple[str, ...] = tuple(timm.list_models("*_dinov3*", module="eva"))


# --------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`: timm's ViT list, its DINOv3 models (:data:`DINOV3_MODELS`)
    and the extra LEAP models."""
    return sorted(set(timm.list_models(module="vision_transformer")) | set(DINOV3_MODELS) | set(_EXTRA_MODELS))


def build_model(name: str, img_size: int = 224, pretrained: bool = False, **overrides: Any) -> nn.Module:
    """Build a timm ViT or DINOv3 model without a classifier head, running at ``img_size``.

    Args:
        name: a timm ViT name (e.g. ``vit_giant_patch14_reg4_dinov2``,
            ``vit_small_patch14_dinov2``, optionally with a ``.tag``), a timm DINOv3 name
            (``vit_small_patch16_dinov3``, ..., ``vit_7b_patch16_dinov3``, the ``_qkvb`` variants:
            timm ``Eva`` models), or one of the extra names (``vit_tiny_patch14_dinov2``: width 192,
            depth 12, 3 heads, patch 14, no LayerScale -- the LEAP reference ViT-T).
        img_size: square training resolution; must be divisible by the patch size.
        pretrained: download timm's pretrained weights (needs network or a warm HF cache).
            Prefer :func:`load_teacher_weights` with a local file.
        **overrides: passed to ``timm.create_model`` (``depth``, ``embed_dim``,
            ``num_heads``, ``patch_size``, ``mlp_ratio``, ...), e.g. for tiny test models.

    Returns:
        ``VisionTransformer`` (or ``Eva``) with ``num_classes=0``; ``model(x)`` for ``x`` of shape
        ``(B, 3, img_size, img_size)`` returns pooled features ``(B, embed_dim)``.

    Raises:
        ModelError: unknown name (close names are suggested), bad ``img_size``, or an override of None
            (timm would drop it silently).
        RuntimeError: ``pretrained=True`` and the weights could not be fetched.
    """
    dropped = sorted(k for k, v in overrides.items() if v is None)
    if dropped:
        # timm.create_model silently drops None arguments, so the model would keep its default.
        raise ModelError(
            f"{name!r}: override {dropped[0]}=None would be ignored (timm drops None arguments and keeps the "
            f"model's default); give a value instead"
            + (
                " (no LayerScale: use vit_tiny_patch14_dinov2, a plain timm ViT, with depth/embed_dim/num_heads "
                "overrides)"
                if dropped[0] == "init_values"
                else ""
            )
        )
    base_name, _, tag = name.partition(".")
    kwargs: dict[str, Any] = {}
    if base_name in _EXTRA_MODELS:
        if pretrained:
            raise ModelError(f"no pretrained weights exist for {name!r} (it is not a timm model)")
        if tag:
            raise ModelError(f"{base_name!r} takes no pretrained tag (got {name!r})")
        timm_name, kwargs = _EXTRA_MODELS[base_name]
    else:
        known = available_models()
        if base_name not in known and not is_hub_name(name):
            close = difflib.get_close_matches(base_name, known, n=5, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise ModelError(f"unknown ViT model name {name!r}{hint}")
        timm_name, pretrained = hub_source(name, pretrained)  # hf-hub:/timm/ names: the local HF cache
    kwargs = {**kwargs, **overrides, "num_classes": 0, "img_size": img_size}

    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    # TypeError: an argument timm does not know (a typo in --student-overrides); AssertionError: a shape
    # timm refuses, e.g. embed_dim not divisible by num_heads.
    except (TypeError, AssertionError) as e:
        if pretrained:
            raise
        raise ModelError(f"{name!r} with arguments {overrides}: {e}") from None
    except Exception as e:  # noqa: BLE001 - re-raised with context
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained timm weights for {name!r} ({type(e).__name__}: {e}). "
            "Without network access, build with pretrained=False and load a local file with "
            "leap.models.load_teacher_weights(model, path)."
        ) from e

    if not isinstance(model, VisionTransformer) and not EVA.matches(model):
        raise ModelError(f"{name!r} builds a {type(model).__name__}, not a timm VisionTransformer or DINOv3 Eva")
    patch = tuple(model.patch_embed.patch_size)
    img = tuple(model.patch_embed.img_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise ModelError(f"img_size {img_size} is not divisible by the patch size {patch[0]} of {name!r}")
    return model


# --------------------------------------------------------------------------------------
# Patch grids
# --------------------------------------------------------------------------------------


def _describe_grid(model: nn.Module) -> str:
    pe = unwrap(model).patch_embed
    gh, gw = patch_grid(model)
    ih, iw = (int(s) for s in pe.img_size)
    ph, pw = (int(s) for s in pe.patch_size)
    img = f"{ih}" if ih == iw else f"{ih}x{iw}"
    patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
    return f"patch grid {gh}x{gw} (img {img}, patch {patch})"


def check_compatible(teacher: nn.Module, student: nn.Module) -> tuple[int, int]:
    """Check that teacher and student see the same patch grid; return it.

    Raises:
        ModelError: e.g. "teacher patch grid 16x16 (img 224, patch 14) != student patch
            grid 14x14 (img 224, patch 16)".
    """
    tg, sg = patch_grid(teacher), patch_grid(student)
    if tg != sg:
        raise ModelError(f"teacher {_describe_grid(teacher)} != student {_describe_grid(student)}")
    return tg
