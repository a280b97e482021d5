"""The one adapter over a timm ViT's internals.

``leap`` runs a ViT piecewise (the teacher stops after block ``k``, the one-to-one baseline
reads every block of the student, the evaluation cuts a model at block ``K``). That needs the
model's layout beyond its public ``forward_features``: the token embedding (patch embed,
position embedding, prefix tokens), the block list, what every block call takes besides the
tokens, and the final norm, some of them private attributes of timm. Every such read goes
through a *family adapter* here, so a change of timm's layout, or a new model family, is
handled in this module only.

Two families are implemented, tried in this order by :func:`family_of`:

- :data:`EVA`: timm's ``Eva`` (DINOv3: ``vit_*_patch16_dinov3``). ``_pos_embed`` returns
  ``(tokens, rope)``, the 2-D rotary embedding every block takes as ``block(x, rope=rope)``
  (the prefix tokens, CLS + 4 storage tokens, are not rotated); LayerScale is ``gamma_1`` /
  ``gamma_2``; the 7B and H+ models have a SwiGLU MLP.
- :data:`VIT`: timm's ``VisionTransformer`` (DINOv2 included): ``block(x)``.

Running blocks: ``tokens, pos = family.embed_with_pos(model, images)``, then block ``i`` as
``block(tokens, **family.block_kwargs(model, i, pos))``; :meth:`VitFamily.block_outputs` and
:meth:`VitFamily.run_blocks` do that loop. The teacher's attention-kernel path (the block with
:func:`leap_kernels.teacher_attention` in place of timm's attention, rotary embedding fused for
Eva) is :meth:`VitFamily.kernel_block_forward`.

Shapes: images ``(B, 3, H, W)``; tokens ``(B, P + N, D)`` with ``P`` prefix tokens (CLS +
registers) before the ``N`` patch tokens.

Why this module is long: two families, each with its embedding, block call and the attention-kernel
forward of its block (the only code that reads timm's block and attention internals).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VitFamily",
    "EvaFamily",
    "VIT",
    "EVA",
    "FAMILIES",
    "family_of",
    "unwrap",
    "unwrap_vit",
    "embed",
    "blocks",
    "final_norm",
    "num_prefix_tokens",
    "patch_grid",
    "rope_tables",
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

    # ---- embedding and the block call -------------------------------------------------

    def embed_with_pos(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Token embedding as in timm ``forward_features``: ``(B, 3, H, W) -> ((B, P + N, D), pos)``.

        ``pos`` is what every block call needs besides the tokens (:meth:`block_kwargs`): None here.
        Patch embed, ``_pos_embed`` (prepends CLS/register tokens, adds positions), ``patch_drop``
        and ``norm_pre``.
        """
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))), None

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The tokens of :meth:`embed_with_pos`, for families whose blocks take nothing else.

        Raises:
            TypeError: the model's blocks need a position input (a rotary embedding): use
                :meth:`embed_with_pos` and :meth:`block_kwargs`.
        """
        tokens, pos = self.embed_with_pos(model, x)
        if pos is not None:
            raise TypeError(
                f"{type(model).__name__}'s blocks take a rotary position embedding: use embed_with_pos() and "
                "block_kwargs() (or block_outputs()/run_blocks()) instead of embed()"
            )
        return tokens

    def block_kwargs(self, model: nn.Module, index: int, pos: Any) -> dict[str, Any]:
        """Keyword arguments of the call of block ``index`` (0-indexed) besides the tokens."""
        return {}

    def block_outputs(self, model: nn.Module, x: torch.Tensor, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Tokens ``(B, P + N, D)`` after each of blocks ``1..stop`` (all if None), before the final norm,
        each block run as timm runs it."""
        h, pos = self.embed_with_pos(model, x)
        for i, block in enumerate(self.blocks(model)[:stop]):
            h = block(h, **self.block_kwargs(model, i, pos))
            yield h

    def run_blocks(self, model: nn.Module, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Tokens ``(B, P + N, D)`` after block ``stop`` (1-indexed; 0: the embedding), before the final norm."""
        h, pos = self.embed_with_pos(model, x)
        for i, block in enumerate(self.blocks(model)[:stop]):
            h = block(h, **self.block_kwargs(model, i, pos))
        return h

    # ---- layout ------------------------------------------------------------------------

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

    def has_rope(self, model: nn.Module) -> bool:
        """Whether the blocks rotate q and k (a rotary position embedding)."""
        return False

    # ---- the teacher's attention-kernel path ---------------------------------------------

    def kernel_block_forward(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        """``block(x, **kwargs)`` with the attention computed by :func:`leap_kernels.teacher_attention`
        straight from the packed ``qkv`` projection, or None when the kernel path does not compute
        exactly what the block computes (then the caller runs ``block(x, **kwargs)``)."""
        if kwargs or not vit_kernel_supported(block):
            return None
        x = x + block.drop_path1(block.ls1(vit_attention_with_kernel(block.attn, block.norm1(x))))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class EvaFamily(VitFamily):
    """Adapter of timm's ``Eva`` layout (DINOv3): rotary position embedding passed to every block."""

    name = "eva"
    required = ("patch_embed", "_pos_embed", "blocks", "norm", "rope")

    def matches(self, model: Any) -> bool:
        eva = _eva_types()
        return eva is not None and isinstance(model, eva[0]) and self.missing(model) is None

    def embed_with_pos(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Patch embed, ``_pos_embed`` (prefix tokens, absolute positions if any, patch dropout) and
        ``norm_pre``, as timm's ``Eva.forward_features``; ``pos`` is the rotary embedding (timm's
        ``(N, 2d)`` ``[sin | cos]`` tensor, per block for mixed-mode RoPE) or None."""
        tokens, rope = model._pos_embed(model.patch_embed(x))
        return model.norm_pre(tokens), rope

    def block_kwargs(self, model: nn.Module, index: int, pos: Any) -> dict[str, Any]:
        if pos is None:
            return {}
        if getattr(model, "rope_mixed", False):  # depth-dependent frequencies: one embedding per block
            return {"rope": pos[index]}
        return {"rope": pos}

    def has_rope(self, model: nn.Module) -> bool:
        return getattr(model, "rope", None) is not None

    def kernel_block_forward(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        """timm ``EvaBlock.forward(x, rope=rope)`` with the attention (and its rotary embedding) in
        :func:`leap_kernels.teacher_attention`; None for blocks the path does not cover
        (:func:`eva_kernel_supported`)."""
        rope = kwargs.get("rope")
        if set(kwargs) - {"rope"} or not eva_kernel_supported(block, rope):
            return None
        x_attn = eva_attention_with_kernel(block.attn, block.norm1(x), rope)
        gamma_1 = getattr(block, "gamma_1", None)
        if gamma_1 is not None:
            x_attn = gamma_1 * x_attn
        x = x + block.drop_path1(x_attn)
        x_mlp = block.mlp(block.norm2(x))
        gamma_2 = getattr(block, "gamma_2", None)
        if gamma_2 is not None:
            x_mlp = gamma_2 * x_mlp
        return x + block.drop_path2(x_mlp)


#: The timm ``VisionTransformer`` family.
VIT = VitFamily()
#: The timm ``Eva`` family (DINOv3).
EVA = EvaFamily()
#: The families :func:`family_of` knows, tried in order (an ``Eva`` also has every attribute a ViT has).
FAMILIES: tuple[VitFamily, ...] = (EVA, VIT)


def _eva_types() -> tuple[type, type, type] | None:
    """timm's ``(Eva, EvaBlock, EvaAttention)``, or None when this timm has no Eva models."""
    try:
        from timm.models.eva import Eva, EvaAttention, EvaBlock
    except ImportError:  # pragma: no cover - timm without eva.py
        return None
    return Eva, EvaBlock, EvaAttention


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
        raise TypeError(
            f"expected a timm VisionTransformer or Eva (or a wrapper with .model), got {type(model).__name__}"
        )
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
        f"{who} needs a timm VisionTransformer or Eva; {type(model).__name__} has no {VIT.missing(model)!r}"
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
        raise TypeError(f"{type(model).__name__} has no patch_embed; expected a timm VisionTransformer or Eva")
    return next((f for f in FAMILIES if f.matches(vit)), VIT).patch_grid(vit)


# ---------------------------------------------------------------------- attention-kernel forwards


def _timm_vit_types() -> tuple[type, type]:
    from timm.models.vision_transformer import Attention, Block  # timm re-exports timm.layers.Attention

    return Block, Attention


def _identity_qk_norms(attn: nn.Module) -> bool:
    return all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm"))


def _attention_dropout(attn: nn.Module) -> bool:
    attn_drop = getattr(attn, "attn_drop", None)
    return bool(attn.training and attn_drop is not None and getattr(attn_drop, "p", 0.0) > 0)


def vit_kernel_supported(block: nn.Module) -> bool:
    """True when the kernel path computes exactly what ``block(x)`` computes: timm's pre-norm ``Block``
    (exact type: subclasses may change ``forward``) with timm's ``Attention`` (exact type), identity
    q/k norms (DINOv2) and no attention dropout in effect."""
    block_type, attention_type = _timm_vit_types()
    if type(block) is not block_type or type(getattr(block, "attn", None)) is not attention_type:
        return False
    return _identity_qk_norms(block.attn) and not _attention_dropout(block.attn)


def vit_attention_with_kernel(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward(x)`` (no mask, non-causal) with the attention computed by
    :func:`leap_kernels.teacher_attention` straight from the packed ``qkv`` projection."""
    from leap_kernels import teacher_attention

    gate = getattr(attn, "gate", None)  # timm >= 1.0.30: optional sigmoid output gate
    gate = gate(x).sigmoid() if gate is not None else None
    out = teacher_attention(attn.qkv(x), attn.num_heads, scale=attn.scale)  # (B, N, H*d)
    norm = getattr(attn, "norm", None)  # scale_norm (Identity for DINOv2)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def rope_tables(rope: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)``, each ``(N, d/2)``, of timm's half-layout rotary embedding ``(N, 2d)``.

    timm's ``[sin | cos]`` embedding with ``rotate_half=True`` repeats each half (``[s0..s_{d/2-1},
    s0..s_{d/2-1}]``): the first ``d/2`` columns of each are the per-pair angles the op takes. Views.
    """
    return rope[:, : head_dim // 2], rope[:, head_dim : head_dim + head_dim // 2]


def eva_kernel_supported(block: nn.Module, rope: torch.Tensor | None) -> bool:
    """True when the kernel path computes exactly what ``block(x, rope=rope)`` computes: timm's
    pre-norm ``EvaBlock`` with ``EvaAttention`` (exact types), a fused ``qkv`` projection, identity
    q/k norms, no attention dropout in effect, and a rotary embedding (if any) in the half layout
    (``rotate_half``, DINOv3) given as one ``(N - P, 2d)`` table for the whole batch (patch dropout
    gives per-image tables: timm's path)."""
    eva = _eva_types()
    if eva is None:
        return False
    _, block_type, attention_type = eva
    attn = getattr(block, "attn", None)
    if type(block) is not block_type or type(attn) is not attention_type:
        return False
    if getattr(attn, "qkv", None) is None or not _identity_qk_norms(attn) or _attention_dropout(attn):
        return False
    if rope is not None:
        head_dim = int(attn.head_dim)
        if not getattr(attn, "rotate_half", False) or rope.dim() != 2 or rope.shape[-1] != 2 * head_dim:
            return False
    return True


def eva_attention_with_kernel(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """timm ``EvaAttention.forward(x, rope=rope)`` (no mask, non-causal) with the attention, q and k
    rotated inside it, computed by :func:`leap_kernels.teacher_attention` from the packed ``qkv``."""
    from leap_kernels import teacher_attention

    gate = getattr(attn, "gate", None)  # timm >= 1.0.30: optional sigmoid output gate
    gate = gate(x).sigmoid() if gate is not None else None
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is None:
        qkv = attn.qkv(x)
    else:  # as timm: the k bias is a zero buffer
        bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
        if getattr(attn, "qkv_bias_separate", False):
            qkv = attn.qkv(x) + bias
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
    if rope is None:
        out = teacher_attention(qkv, attn.num_heads, scale=attn.scale)
    else:
        tables = rope_tables(rope, int(attn.head_dim))
        out = teacher_attention(qkv, attn.num_heads, scale=attn.scale, rope=tables, rope_prefix=attn.num_prefix_tokens)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
