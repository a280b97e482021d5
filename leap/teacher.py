"""Frozen, early-exit teacher for LEAP.

:class:`TruncatedTeacher` wraps a timm ``VisionTransformer`` (DINOv2) or ``Eva`` (DINOv3) and
produces the LEAP target at block ``k`` (1-indexed): patch embed -> blocks ``1..k`` -> the
teacher's *final* norm (with its affine) applied to that intermediate output. Blocks after ``k``
are never run. What differs between the two families (embedding, the rotary embedding every Eva
block takes, the block internals) is read through :mod:`leap.vit`.

All blocks run through :meth:`TruncatedTeacher._run_blocks`, which calls
:meth:`TruncatedTeacher.block_forward` once per block; that is the single place where the
attention kernel (:func:`leap_kernels.teacher_attention`) is swapped in: with it on, a timm
``Block`` runs as ``x + ls1(proj(attention(qkv(norm1(x))))) ; x + ls2(mlp(norm2(x)))`` with the
attention read straight from the packed ``qkv`` output (no permute, no transpose copy); an Eva
block the same with LayerScale ``gamma_1``/``gamma_2`` and q and k rotated inside the kernel.

With ``precision="fp8"`` the block linears (``qkv``, ``proj``, the MLP's ``fc1``/``fc2`` or SwiGLU
``fc1_g``/``fc1_x``/``fc2``) are :class:`leap_kernels.ops.fp8_linear.Fp8Linear` layers (e4m3 weights
and inputs, per-row scales); everything else keeps the teacher dtype.

With ``offload=True`` the blocks past the deepest target reached so far stay in (pinned) CPU memory
until a level-up needs them (:class:`BlockOffload`): a ViT-7B teacher (13.4 GB in bf16) then holds
only the blocks it runs on the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from leap_kernels.ops.fp8_linear import convert_teacher_linears

from . import vit
from .precision import DTYPES, TEACHER_PRECISIONS, auto_precision

__all__ = ["TruncatedTeacher", "ScoreFn", "BlockOffload", "kernel_block_supported"]

#: ``score_fn(k, patch_tokens_normed (B, N, D), cls_normed (B, D)) -> 0-d tensor``
ScoreFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class TruncatedTeacher(nn.Module):
    """Frozen timm ViT teacher whose forward stops after block ``k``.

    Args:
        model: a timm ``VisionTransformer`` or ``Eva`` (DINOv3) with a CLS token (e.g. from
            ``leap.models.build_model`` + ``load_teacher_weights``). It is cast to ``dtype``,
            put in eval mode and frozen (``requires_grad=False``) in place.
        dtype: compute dtype of the teacher. Default: ``torch.bfloat16`` if the model's
            parameters are on CUDA at construction, else ``torch.float32``.
        attention_kernel: run each block's attention with :func:`leap_kernels.teacher_attention`
            (``True``), with timm's own attention (``False``), or ``None`` (default, auto): the
            kernel for CUDA inputs, timm on CPU. Settable later: ``teacher.attention_kernel = False``.
            Blocks the kernel path does not cover (not a timm ``Block``/``Attention`` or
            ``EvaBlock``/``EvaAttention``, a q/k norm, separate q/k/v projections, an interleaved
            rotary layout, attention dropout in training mode) always run timm's forward. The op picks
            its backend itself (Triton for bf16/fp16 with head dim 16/32/64/128, 32/64/128 with
            rotary embedding, else SDPA).
        precision: ``"auto"`` (default): the block linears compute in ``dtype``; ``"fp8"``: they are
            replaced in place by :class:`leap_kernels.ops.fp8_linear.Fp8Linear` (quantized from the loaded weights;
            ``torch._scaled_mm`` on GPUs of compute capability 8.9+, else the emulated path with the
            same numerics). Outputs stay in ``dtype``.
        offload: keep the blocks past the deepest target block reached so far in CPU memory
            (pinned when CUDA is available) and move them to ``device`` when a forward first needs
            them (:class:`BlockOffload`); the rest of the model is moved to ``device`` now. The
            one-off scan (:meth:`scan`) streams the blocks it needs and leaves them offloaded.
        device: the compute device with ``offload`` (default: where the model's parameters are).

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
        offload: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        family = vit.family_of(model, "TruncatedTeacher")
        if getattr(model, "cls_token", None) is None:
            raise ValueError("TruncatedTeacher needs a teacher with a CLS token (class_token=True)")
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(TEACHER_PRECISIONS)}, got {precision!r}")
        if not isinstance(offload, bool):
            raise TypeError(f"offload: expected True or False, got {offload!r}")
        param = next(model.parameters(), None)
        here = param.device if param is not None else torch.device("cpu")
        compute = torch.device(device) if offload and device is not None else here
        if dtype is None:
            dtype = DTYPES[auto_precision(compute)]
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
        #: The blocks' residency with ``offload=True``, else None (everything stays where it is).
        self.offload: BlockOffload | None = BlockOffload(model, family.blocks(model), compute) if offload else None

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
        (:meth:`leap.vit.VitFamily.embed_with_pos`; the rotary embedding of an Eva teacher is not
        returned: the forwards get it themselves).
        """
        return self._embed(x)[0]

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(tokens (B, P + N, D), pos)``: :meth:`leap.vit.VitFamily.embed_with_pos` in the teacher dtype."""
        return self._family.embed_with_pos(self.model, x.to(dtype=self._dtype))

    def uses_attention_kernel(self, x: torch.Tensor) -> bool:
        """Whether blocks run on tokens ``x`` take the attention-kernel path (see ``attention_kernel``)."""
        if self.attention_kernel is None:
            return x.device.type == "cuda"
        return bool(self.attention_kernel)

    def block_forward(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run one transformer block on tokens ``(B, P + N, D)``; ``kwargs`` are what the family's
        blocks take besides the tokens (``rope=`` for an Eva teacher; none for a ViT).

        With the attention kernel on (:meth:`uses_attention_kernel`) and a block it covers
        (:meth:`leap.vit.VitFamily.kernel_block_forward`), the block runs with the kernel;
        otherwise timm's ``block(x, **kwargs)``.
        """
        if self.uses_attention_kernel(x):
            out = self._family.kernel_block_forward(block, x, **kwargs)
            if out is not None:
                return out
        return block(x, **kwargs)

    def _run_blocks(self, x: torch.Tensor, pos: Any, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start..stop-1`` (0-indexed, i.e. 1-indexed blocks ``start+1..stop``) with the
        embedding's ``pos`` (the rotary embedding of an Eva teacher).

        This is the only per-block loop of the class; ``forward``, ``collect`` and ``scan`` use it.
        """
        blocks = self._family.blocks(self.model)
        for i in range(start, stop):
            kwargs = self._family.block_kwargs(self.model, i, pos)
            with self._on_device(i):
                # ViT blocks are called as block_forward(block, x): subclasses overriding it keep working.
                x = self.block_forward(blocks[i], x, **kwargs) if kwargs else self.block_forward(blocks[i], x)
        return x

    def _on_device(self, index: int) -> contextlib.AbstractContextManager[None]:
        """Block ``index`` (0-indexed) on the compute device for the duration (offload only)."""
        return self.offload.streamed(index) if self.offload is not None else contextlib.nullcontext()

    def _reach(self, k: int) -> None:
        """Blocks ``1..k`` become resident on the device (offload only): a target block was reached."""
        if self.offload is not None:
            self.offload.make_resident(k)

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
        self._reach(k)
        h, pos = self._embed(x)
        return self._normed_outputs(self._run_blocks(h, pos, 0, k))

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
        self._reach(blocks[-1])
        h, pos = self._embed(x)
        done = 0
        patches, clss = [], []
        for k in blocks:
            h = self._run_blocks(h, pos, done, k)
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
        running activation is kept between blocks. With ``offload``, blocks that are not resident
        are streamed to the device for this pass and stay offloaded.

        Returns:
            float32 tensor ``(num_blocks,)`` of scores; entry ``k-1`` is block ``k``'s score.
        """
        h, pos = self._embed(x)
        scores = []
        for k in range(1, self.num_blocks + 1):
            h = self._run_blocks(h, pos, k - 1, k)
            patch, cls = self._normed_outputs(h)
            s = torch.as_tensor(score_fn(k, patch, cls))
            if s.numel() != 1:
                raise ValueError(f"score_fn must return a scalar; got shape {tuple(s.shape)} at block {k}")
            scores.append(s.detach().reshape(()).to(device=h.device, dtype=torch.float32))
            del patch, cls
        return torch.stack(scores)


# ---------------------------------------------------------------------- offloaded blocks


class BlockOffload:
    """Where the blocks of an offloaded teacher live: blocks ``1..resident`` on ``device``, the rest in
    CPU memory (pinned when CUDA is available, so a level-up's copy is asynchronous).

    A block is moved by pointing its parameters and buffers at a device copy of the host tensor (the
    teacher is frozen: nothing is ever copied back). :meth:`make_resident` keeps blocks on
    the device for good (a level-up); :meth:`streamed` brings one for a single use and drops the
    device copy after it (the calibration scan).

    Args:
        model: the teacher model; everything outside ``blocks`` is moved to ``device`` now.
        blocks: its transformer blocks, in order.
        device: the compute device.
    """

    def __init__(self, model: nn.Module, blocks: nn.Module, device: torch.device):
        self.device = torch.device(device)
        self.resident = 0
        block_modules = {id(m) for b in blocks for m in b.modules()}
        pin = torch.cuda.is_available() and self.device.type == "cuda"
        # (owner module, attribute name, is_parameter, host copy) per tensor of each block
        self._tensors: list[list[tuple[nn.Module, str, bool, torch.Tensor]]] = []
        for block in blocks:
            entries = []
            for module in block.modules():
                for table, is_param in ((module._parameters, True), (module._buffers, False)):
                    for name, t in table.items():
                        if t is None:
                            continue
                        host = t.detach().to("cpu")
                        entries.append((module, name, is_param, host.pin_memory() if pin else host))
            self._tensors.append(entries)
            self._point(len(self._tensors) - 1, to_device=False)
        for module in model.modules():  # the embedding, tokens, rotary embedding, final norm
            if id(module) in block_modules:
                continue
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is not None:
                        table[name] = _moved(t, self.device)

    def _point(self, index: int, *, to_device: bool) -> None:
        for module, name, is_param, host in self._tensors[index]:
            data = host.to(self.device, non_blocking=True) if to_device else host
            if is_param:  # a new Parameter, not .data: that cannot change the tensor type (e.g. to meta)
                module._parameters[name] = nn.Parameter(data, requires_grad=False)
            else:
                module._buffers[name] = data

    def make_resident(self, k: int) -> None:
        """Blocks ``1..k`` on the device from now on (the deepest target reached)."""
        for index in range(self.resident, min(k, len(self._tensors))):
            self._point(index, to_device=True)
        self.resident = max(self.resident, k)

    @contextlib.contextmanager
    def streamed(self, index: int) -> Iterator[None]:
        """Block ``index`` (0-indexed) on the device inside the ``with``; a non-resident one goes back
        to its host copy after (the device copy is freed in stream order)."""
        if index < self.resident:
            yield
            return
        self._point(index, to_device=True)
        try:
            yield
        finally:
            self._point(index, to_device=False)

    def device_bytes(self) -> int:
        """Bytes of block weights on the device now."""
        return sum(
            host.numel() * host.element_size() for entries in self._tensors[: self.resident] for *_, host in entries
        )


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(t, nn.Parameter):
        return nn.Parameter(t.detach().to(device), requires_grad=t.requires_grad)
    return t.to(device)


# ---------------------------------------------------------------------- attention-kernel path


def kernel_block_supported(block: nn.Module, rope: torch.Tensor | None = None) -> bool:
    """True when the teacher's attention-kernel path computes exactly what timm's block computes
    (:func:`leap.vit.vit_kernel_supported` for a ViT block, :func:`leap.vit.eva_kernel_supported`
    for an Eva block with its rotary embedding ``rope``)."""
    return vit.vit_kernel_supported(block) or vit.eva_kernel_supported(block, rope)


#: timm ``Attention.forward(x)`` with :func:`leap_kernels.teacher_attention` (see :mod:`leap.vit`).
attention_with_kernel = vit.vit_attention_with_kernel


def block_forward_with_kernel(block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """timm's ``block(x, **kwargs)`` with the attention kernel (ViT or Eva block).

    Raises:
        TypeError: the kernel path does not cover this block (:func:`kernel_block_supported`).
    """
    for family in vit.FAMILIES:
        out = family.kernel_block_forward(block, x, **kwargs)
        if out is not None:
            return out
    raise TypeError(f"the attention-kernel path does not cover {type(block).__name__}")
