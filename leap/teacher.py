"""Frozen, early-exit teacher for LEAP.

:class:`TruncatedTeacher` wraps a timm ``VisionTransformer`` and produces the LEAP target at
block ``k`` (1-indexed): patch embed -> blocks ``1..k`` -> the teacher's *final* norm (with its
affine) applied to that intermediate output. Blocks after ``k`` are never run.

All blocks run through :meth:`TruncatedTeacher._run_blocks`, which calls
:meth:`TruncatedTeacher.block_forward` once per block; that is the single place where the
attention kernel (:func:`leap_kernels.teacher_attention`) is swapped in: with it on, a timm
``Block`` runs as ``x + ls1(proj(attention(qkv(norm1(x))))) ; x + ls2(mlp(norm2(x)))`` with the
attention read straight from the packed ``qkv`` output (no permute, no transpose copy).

With ``precision="fp8"`` the block linears (``qkv``, ``proj``, ``fc1``, ``fc2``) are
:class:`leap_kernels.ops.fp8_linear.Fp8Linear` layers (e4m3 weights and inputs, per-row scales); everything else
keeps the teacher dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leap_kernels import teacher_attention
from leap_kernels.ops.fp8_linear import convert_teacher_linears

from . import vit
from .precision import DTYPES, TEACHER_PRECISIONS, auto_precision

__all__ = ["TruncatedTeacher", "ScoreFn"]

#: ``score_fn(k, patch_tokens_normed (B, N, D), cls_normed (B, D)) -> 0-d tensor``
ScoreFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class TruncatedTeacher(nn.Module):
    """Frozen timm ViT teacher whose forward stops after block ``k``.

    Args:
        model: a timm ``VisionTransformer`` with a CLS token (e.g. from
            ``leap.models.build_model`` + ``load_teacher_weights``). It is cast to ``dtype``,
            put in eval mode and frozen (``requires_grad=False``) in place.
        dtype: compute dtype of the teacher. Default: ``torch.bfloat16`` if the model's
            parameters are on CUDA at construction, else ``torch.float32``.
        attention_kernel: run each block's attention with :func:`leap_kernels.teacher_attention`
            (``True``), with timm's own attention (``False``), or ``None`` (default, auto): the
            kernel for CUDA inputs, timm on CPU. Settable later: ``teacher.attention_kernel = False``.
            Blocks the kernel path does not cover (not a timm ``Block``/``Attention``, a q/k norm,
            attention dropout in training mode) always run timm's forward. The op picks its backend
            itself (Triton for bf16/fp16 with head dim 16/32/64/128, else SDPA).
        precision: ``"auto"`` (default): the block linears compute in ``dtype``; ``"fp8"``: they are
            replaced in place by :class:`leap_kernels.ops.fp8_linear.Fp8Linear` (quantized from the loaded weights;
            ``torch._scaled_mm`` on GPUs of compute capability 8.9+, else the emulated path with the
            same numerics). Outputs stay in ``dtype``.

    Shapes (B = batch, N = patch tokens = rows*cols, D = ``embed_dim``):
        input ``x``: ``(B, 3, H, W)`` at the model's image size; cast to the teacher dtype.
        ``forward(x, k)`` -> ``(patch_tokens (B, N, D), cls (B, D))`` in the teacher dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        attention_kernel: bool | None = None,
        precision: str = "auto",
    ):
        super().__init__()
        family = vit.family_of(model, "TruncatedTeacher")
        if getattr(model, "cls_token", None) is None:
            raise ValueError("TruncatedTeacher needs a teacher with a CLS token (class_token=True)")
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(TEACHER_PRECISIONS)}, got {precision!r}")
        if dtype is None:
            param = next(model.parameters(), None)
            dtype = DTYPES[auto_precision(param.device if param is not None else torch.device("cpu"))]
        if precision == "fp8":
            # Before the dtype cast, so the weights are quantized from the loaded values (not from
            # their bf16 rounding); Fp8Linear keeps its dtypes through the cast.
            convert_teacher_linears(model)
        model = model.to(dtype=dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self._family = family  # the layout of the model's internals (leap.vit)
        self._dtype = dtype
        self._precision = precision
        if attention_kernel is not None and not isinstance(attention_kernel, bool):
            raise TypeError(f"attention_kernel: expected True, False or None (auto), got {attention_kernel!r}")
        #: ``True``/``False`` force the attention kernel on/off; ``None``: on for CUDA inputs only.
        self.attention_kernel: bool | None = attention_kernel

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the teacher."""
        return self._dtype

    @property
    def precision(self) -> str:
        """``"auto"`` (block linears in :attr:`dtype`) or ``"fp8"`` (:class:`leap_kernels.ops.fp8_linear.Fp8Linear`)."""
        return self._precision

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks L (valid ``k`` are ``1..L``)."""
        return len(self._family.blocks(self.model))

    @property
    def embed_dim(self) -> int:
        """Teacher width D."""
        return int(self.model.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS + registers."""
        return self._family.num_prefix_tokens(self.model)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``; N = rows * cols patch tokens."""
        return self._family.patch_grid(self.model)

    def train(self, mode: bool = True) -> TruncatedTeacher:
        """The teacher always stays in eval mode (no dropout / drop-path), whatever ``mode``."""
        super().train(mode)
        self.model.eval()
        return self

    # ------------------------------------------------------------------ internals

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= self.num_blocks:
            raise ValueError(f"target block k={k!r} is out of range: expected 1 <= k <= {self.num_blocks}")
        return int(k)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Token embedding as in timm ``forward_features``: ``(B, 3, H, W) -> (B, P + N, D)``.

        Patch embed, position embedding with the prefix tokens, ``patch_drop`` and ``norm_pre``
        (:meth:`leap.vit.VitFamily.embed`).
        """
        return self._family.embed(self.model, x.to(dtype=self._dtype))

    def uses_attention_kernel(self, x: torch.Tensor) -> bool:
        """Whether blocks run on tokens ``x`` take the attention-kernel path (see ``attention_kernel``)."""
        if self.attention_kernel is None:
            return x.device.type == "cuda"
        return bool(self.attention_kernel)

    def block_forward(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run one transformer block on tokens ``(B, P + N, D)``.

        With the attention kernel on (:meth:`uses_attention_kernel`) and a block it covers
        (:func:`kernel_block_supported`), the block runs through :func:`block_forward_with_kernel`;
        otherwise timm's ``block(x)``.
        """
        if self.uses_attention_kernel(x) and kernel_block_supported(block):
            return block_forward_with_kernel(block, x)
        return block(x)

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start..stop-1`` (0-indexed, i.e. 1-indexed blocks ``start+1..stop``).

        This is the only per-block loop of the class; ``forward`` and ``scan`` both use it.
        """
        blocks = self._family.blocks(self.model)
        for i in range(start, stop):
            x = self.block_forward(blocks[i], x)
        return x

    def _normed_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final teacher norm on ``(B, P + N, D)``; return ``(patch (B, N, D), cls (B, D))``."""
        x = self._family.final_norm(self.model, x)
        return x[:, self.num_prefix_tokens :], x[:, 0]

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def forward(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher target at block ``k`` (1-indexed).

        Args:
            x: images ``(B, 3, H, W)``.
            k: last block to run, ``1 <= k <= num_blocks``.

        Returns:
            ``(patch_tokens (B, N, D), cls (B, D))`` after the teacher's final norm; no graph.
        """
        k = self._check_k(k)
        x = self._run_blocks(self.embed(x), 0, k)
        return self._normed_outputs(x)

    @torch.no_grad()
    def collect(self, x: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normed outputs after several blocks in one pass (the one-to-one baseline's targets).

        Args:
            x: images ``(B, 3, H, W)``.
            blocks: 1-indexed blocks, increasing (repeats allowed); runs up to the largest only.

        Returns:
            ``(patch (P, B, N, D), cls (P, B, D))`` with ``P = len(blocks)``, entry ``p`` after
            block ``blocks[p]`` and the final norm.
        """
        blocks = [self._check_k(k) for k in blocks]
        if not blocks or any(b < a for a, b in zip(blocks, blocks[1:])):
            raise ValueError(f"collect: blocks must be a non-empty increasing list, got {blocks}")
        h = self.embed(x)
        done = 0
        patches, clss = [], []
        for k in blocks:
            h = self._run_blocks(h, done, k)
            done = k
            patch, cls = self._normed_outputs(h)
            patches.append(patch)
            clss.append(cls)
        return torch.stack(patches), torch.stack(clss)

    @torch.no_grad()
    def scan(self, x: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
        """Score every block in one pass through the teacher.

        After block ``k`` (1-indexed) calls ``score_fn(k, patch_tokens_normed (B, N, D),
        cls_normed (B, D))``, which must return a scalar (0-d tensor or number). Only the
        running activation is kept between blocks.

        Returns:
            float32 tensor ``(num_blocks,)`` of scores; entry ``k-1`` is block ``k``'s score.
        """
        h = self.embed(x)
        scores = []
        for k in range(1, self.num_blocks + 1):
            h = self._run_blocks(h, k - 1, k)
            patch, cls = self._normed_outputs(h)
            s = torch.as_tensor(score_fn(k, patch, cls))
            if s.numel() != 1:
                raise ValueError(f"score_fn must return a scalar; got shape {tuple(s.shape)} at block {k}")
            scores.append(s.detach().reshape(()).to(device=h.device, dtype=torch.float32))
            del patch, cls
        return torch.stack(scores)


# ---------------------------------------------------------------------- attention-kernel path


def _timm_block_types() -> tuple[type, type]:
    from timm.models.vision_transformer import Attention, Block  # timm re-exports timm.layers.Attention

    return Block, Attention


def kernel_block_supported(block: nn.Module) -> bool:
    """True when :func:`block_forward_with_kernel` computes exactly what ``block(x)`` computes.

    That is timm's pre-norm ``Block`` (exact type: subclasses may change ``forward``) with timm's
    ``Attention`` (exact type), identity q/k norms (DINOv2) and no attention dropout in effect.
    """
    block_type, attention_type = _timm_block_types()
    if type(block) is not block_type or type(getattr(block, "attn", None)) is not attention_type:
        return False
    attn = block.attn
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            return False
    attn_drop = getattr(attn, "attn_drop", None)
    if attn.training and attn_drop is not None and getattr(attn_drop, "p", 0.0) > 0:
        return False
    return True


def attention_with_kernel(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward(x)`` (no mask, non-causal) with the attention computed by
    :func:`leap_kernels.teacher_attention` straight from the packed ``qkv`` projection."""
    gate = getattr(attn, "gate", None)  # timm >= 1.0.30: optional sigmoid output gate
    gate = gate(x).sigmoid() if gate is not None else None
    out = teacher_attention(attn.qkv(x), attn.num_heads, scale=attn.scale)  # (B, N, H*d)
    norm = getattr(attn, "norm", None)  # scale_norm (Identity for DINOv2)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def block_forward_with_kernel(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward(x)`` with :func:`attention_with_kernel` in place of ``block.attn``.

    ``x + drop_path1(ls1(attn(norm1(x))))`` then ``x + drop_path2(ls2(mlp(norm2(x))))``; the drop
    paths are identities in eval mode (the teacher is always in eval mode).
    """
    x = x + block.drop_path1(block.ls1(attention_with_kernel(block.attn, block.norm1(x))))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x
