"""Teacher attention: non-causal softmax attention read straight from the packed QKV
projection of a ViT block, for the frozen (inference-only) LEAP teacher.

Room layout: the Triton flash-attention forward kernel and its host function
(:mod:`leap_kernels.ops._attention_triton`) -> the torch backend -> dispatch -> two torch.library ops
(without and with rotary embedding) with fake implementations -> functional API.

Layout. ``qkv (B, N, 3*H*d)`` is the output of the block's ``qkv`` linear, laid out as
timm's ``reshape(B, N, 3, H, d)``: channel ``c = s*H*d + h*d + j`` holds q (s=0), k (s=1)
or v (s=2) of head ``h``. The kernel reads q, k and v of one (batch, head) in place through
the strides of ``qkv`` (no permute/contiguous copy; strided views of ``qkv`` work) and
writes the output ``(B, N, H*d)`` directly in the layout the output projection consumes,
i.e. ``(softmax(q k^T * scale) v).transpose(1, 2).reshape(B, N, H*d)`` - no transpose copy.

Backends (their limits are declared in :mod:`leap_kernels._backends`): ``triton`` runs
bfloat16/float16 inputs with head dims 16, 32, 64, 128 and a positive scale (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``cuda`` (``leap_kernels._C``, bfloat16/float16, head dims 64 and 128)
only when forced until it is verified on a GPU. Everything else (float32, float64, other head
dims, scale <= 0, CPU tensors) runs on the ``torch`` backend (``scaled_dot_product_attention`` on
permuted views of ``qkv``), which automatic dispatch falls back to; forcing a backend on inputs
it cannot run raises with the reasons. On CPU tensors holding a NaN or an infinity the torch backend
computes as the reference does (fp32 matmul, softmax, matmul): torch's CPU SDPA kernels return finite
values there.

Rotary position embedding (``rope=(sin, cos)``, ``rope_prefix``: DINOv3, timm's ``EvaAttention``) is a
second op, ``leap_kernels::teacher_attention_rope``: the Triton kernel rotates q and k in registers
(head dims 32, 64, 128), the CUDA kernel its q and k tiles in shared memory (64, 128), the torch
backend rotates q and k with :func:`leap_kernels.ops.naive.rope_half_reference` before SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backends, _checks, _ext
from ._attention_triton import (  # noqa: F401  (re-exported: tests and tools reach the kernel through this module)
    LOG2E,
    TAIL_M,
    TAIL_N,
    bh_bucket,
    computed_pairs,
    query_programs,
    teacher_attention_triton,
)
from ._triton_common import HAS_TRITON
from .naive import rope_half_reference

if HAS_TRITON:
    from ._attention_triton import (  # noqa: F401
        _attention_configs,
        _prune_configs,
        _teacher_attention_fwd_kernel,
        _teacher_attention_fwd_tuned,
        _teacher_attention_rope_tuned,
    )

OP_NAME = "teacher_attention"
#: The op name of the rotary variant in the backends' declarations.
ROPE_OP_NAME = "teacher_attention_rope"
#: Head dims the Triton kernel is built for (one ``tl.dot`` over the whole head dim).
TRITON_HEAD_DIMS = _backends.TRITON_HEAD_DIMS
#: Input dtypes of the Triton kernel (tensor-core dots with fp32 accumulation).
TRITON_DTYPES = _backends.HALF_DTYPES

# ----------------------------------------------------------------------------- torch backend


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v (B, H, N, d)`` of a packed ``qkv (B, N, 3*H*d)`` (timm's layout), no copy."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def teacher_attention_torch(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_prefix: int = 0,
) -> torch.Tensor:
    """Torch backend: ``scaled_dot_product_attention`` on views of ``qkv`` (q and k rotated first when
    ``rope`` is given, as timm's ``EvaAttention`` does); returns ``(B, N, H*d)``.

    On CPU, inputs holding a NaN or an infinity are computed as the reference computes them (fp32
    matmul, softmax, matmul): torch's CPU SDPA kernels return zeros for a non-finite query row and
    finite values for an infinite key in bfloat16/float16, where the reference gives NaN/inf.
    """
    batch, n, c = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    if rope is not None:
        q = rope_half_reference(q, rope[0], rope[1], rope_prefix)
        k = rope_half_reference(k, rope[0], rope[1], rope_prefix)
    if qkv.device.type == "cpu" and not _all_finite(qkv, *(rope or ())):
        work = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        attn = torch.softmax((q.to(work) @ k.to(work).transpose(-2, -1)) * scale, dim=-1)
        out = (attn @ v.to(work)).to(qkv.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(batch, n, c // 3)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """One host check per call (CPU only: on a GPU it would synchronize)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- dispatch


def select_attention_backend(qkv: torch.Tensor, head_dim: int, scale: float = 1.0, *, rope: bool = False) -> str:
    """Backend for this call (:func:`leap_kernels._backends.select_backend` with the call's head dim
    and scale, which the backends' declarations check; ``rope``: the rotary variant's declarations).

    Automatic dispatch falls back to ``torch`` when no kernel can take the dtype, head dim or scale;
    a forced backend that cannot raises RuntimeError with every reason.
    """
    return _backends.select_backend(ROPE_OP_NAME if rope else OP_NAME, [qkv], head_dim=head_dim, scale=scale)


# ----------------------------------------------------------------------------- torch.library ops


@torch.library.custom_op("leap_kernels::teacher_attention", mutates_args=())
def _teacher_attention_op(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    batch, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    if qkv.numel() == 0:
        return qkv.new_zeros((batch, n, c // 3))
    backend = select_attention_backend(qkv, head_dim, scale)
    if backend == "triton":
        out = torch.empty((batch, n, c // 3), dtype=qkv.dtype, device=qkv.device)
        return teacher_attention_triton(qkv, num_heads, scale, out)
    if backend == "cuda":  # the mma.sync kernel of leap_kernels._C (csrc/cuda)
        return torch.ops.leap_kernels.teacher_attention_fwd(qkv, num_heads, scale)
    return teacher_attention_torch(qkv, num_heads, scale).contiguous()


@_teacher_attention_op.register_fake
def _(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    batch, n, c = qkv.shape
    return qkv.new_empty((batch, n, c // 3))


@torch.library.custom_op("leap_kernels::teacher_attention_rope", mutates_args=())
def _teacher_attention_rope_op(
    qkv: torch.Tensor, num_heads: int, scale: float, sin: torch.Tensor, cos: torch.Tensor, rope_prefix: int
) -> torch.Tensor:
    """``teacher_attention`` with q and k rotated (``sin, cos (N - rope_prefix, d/2)``, fp32)."""
    batch, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    if qkv.numel() == 0:
        return qkv.new_zeros((batch, n, c // 3))
    backend = select_attention_backend(qkv, head_dim, scale, rope=True)
    if backend == "triton":
        out = torch.empty((batch, n, c // 3), dtype=qkv.dtype, device=qkv.device)
        return teacher_attention_triton(qkv, num_heads, scale, out, rope=(sin, cos), rope_prefix=rope_prefix)
    if backend == "cuda":  # rotates its q and k tiles in shared memory (csrc/cuda/teacher_attention.cu)
        return torch.ops.leap_kernels.teacher_attention_rope_fwd(qkv, num_heads, scale, sin, cos, rope_prefix)
    return teacher_attention_torch(qkv, num_heads, scale, (sin, cos), rope_prefix).contiguous()


@_teacher_attention_rope_op.register_fake
def _(
    qkv: torch.Tensor, num_heads: int, scale: float, sin: torch.Tensor, cos: torch.Tensor, rope_prefix: int
) -> torch.Tensor:
    batch, n, c = qkv.shape
    return qkv.new_empty((batch, n, c // 3))


def _register_extension_fake() -> None:
    """The compiled rotary op's fake, when the loaded ``leap_kernels._C`` has the op (older builds do not)."""
    if _ext.available() and hasattr(torch.ops.leap_kernels, "teacher_attention_rope_fwd"):

        @torch.library.register_fake("leap_kernels::teacher_attention_rope_fwd")
        def _(
            qkv: torch.Tensor, num_heads: int, scale: float, sin: torch.Tensor, cos: torch.Tensor, rope_prefix: int
        ) -> torch.Tensor:
            batch, n, c = qkv.shape
            return qkv.new_empty((batch, n, c // 3))


_register_extension_fake()


# ----------------------------------------------------------------------------- functional API


def _check_inputs(qkv: torch.Tensor, num_heads: object, scale: object) -> None:
    _checks.check_tensor("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv: expected 3 dims (B, N, 3*H*d), got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads: expected an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads}")
    c = qkv.shape[-1]
    if c == 0 or c % (3 * num_heads):
        raise ValueError(
            f"qkv: expected the last dim to be a positive multiple of 3*num_heads = {3 * num_heads} "
            f"(3*H*d), got {c} (shape {tuple(qkv.shape)})"
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite float, got {scale}")
    if qkv.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "teacher_attention is inference-only (no backward), but qkv requires grad and grad mode is on. "
            "The teacher is frozen: run it under torch.no_grad() / torch.inference_mode(), or pass qkv.detach()"
        )


def _check_rope(qkv: torch.Tensor, head_dim: int, rope: object, rope_prefix: object) -> tuple[torch.Tensor, ...]:
    """Validate ``rope = (sin, cos)`` and ``rope_prefix``; return the tables as fp32 (float64 for a
    float64 ``qkv``), sharing one row stride with unit column stride."""
    if isinstance(rope_prefix, bool) or not isinstance(rope_prefix, int):
        raise TypeError(f"rope_prefix: expected an int, got {type(rope_prefix).__name__}")
    n = qkv.shape[1]
    if not 0 <= rope_prefix <= n:
        raise ValueError(f"rope_prefix: expected 0 <= rope_prefix <= N = {n} (tokens), got {rope_prefix}")
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise TypeError(f"rope: expected a (sin, cos) pair of tensors, got {type(rope).__name__}")
    if head_dim % 2:
        raise ValueError(f"rope: the head dim must be even to rotate channel pairs, got d = {head_dim}")
    want = (n - rope_prefix, head_dim // 2)
    tables = []
    for name, t in zip(("rope[0] (sin)", "rope[1] (cos)"), rope):
        _checks.check_tensor(name, t)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name}: expected shape (N - rope_prefix, d/2) = {want} (N = {n}, rope_prefix = {rope_prefix}, "
                f"d = {head_dim}), got {tuple(t.shape)}"
            )
        _checks.check_same_device(qkv=qkv, **{name: t})
        tables.append(t.detach().to(torch.float64 if qkv.dtype == torch.float64 else torch.float32))
    sin, cos = tables
    if sin.stride() != cos.stride() or (want[1] > 1 and sin.stride(-1) != 1):
        sin, cos = sin.contiguous(), cos.contiguous()
    return sin, cos


def teacher_attention(
    qkv: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_prefix: int = 0,
) -> torch.Tensor:
    """Softmax attention of a ViT block, read from its packed QKV projection (inference only).

    ``out = (softmax(q @ k^T * scale) @ v).transpose(1, 2).reshape(B, N, H*d)`` with
    ``q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4).unbind(0)``: exactly timm's
    ``Attention`` between its ``qkv`` and ``proj`` layers (non-causal, no mask, no dropout); with
    ``rope``, timm's ``EvaAttention`` (DINOv3) between the same layers.

    Args:
        qkv: ``(B, N, 3*H*d)``, the output of the block's ``qkv`` linear (timm layout
            ``(B, N, 3, H, d)``). Any strides (e.g. a slice of a larger batch); read in place.
            bfloat16/float16 run the Triton kernel (head dims 16, 32, 64, 128; with ``rope`` 32,
            64, 128); float32, float64, other head dims and ``scale <= 0`` run
            ``scaled_dot_product_attention`` (the ``torch`` backend).
        num_heads: ``H``, a positive int dividing ``qkv.shape[-1] / 3``.
        scale: softmax scale; default ``d ** -0.5``.
        rope: optional rotary position embedding ``(sin, cos)``, each ``(N - rope_prefix, d/2)``
            (any float dtype, on ``qkv``'s device; computed in fp32): token ``t >= rope_prefix`` of q
            and k has channel ``j < d/2`` paired with ``j + d/2`` and rotated by the angle of row
            ``t - rope_prefix``, column ``j`` -- timm's half layout (``rotate_half=True``), whose
            ``(N - P, 2d)`` ``[sin | cos]`` embedding gives ``sin = emb[:, :d/2]``, ``cos = emb[:, d:d + d/2]``.
        rope_prefix: tokens before the patches that are not rotated (CLS + registers: 5 for DINOv3).

    Returns:
        ``(B, N, H*d)`` contiguous, in ``qkv``'s dtype: the input of the block's ``proj`` linear.
        Softmax statistics and accumulation are fp32 (online softmax, flash-attention style).

    Raises:
        RuntimeError: grad mode is on and ``qkv`` requires grad (there is no backward; the
            teacher is frozen), or ``triton`` was forced for inputs it cannot run.
        TypeError / ValueError: ``qkv`` is not a 3-D float tensor with a last dim divisible by
            ``3 * num_heads``, ``num_heads`` / ``scale`` is invalid, or the rope tables do not have
            the shape ``(N - rope_prefix, d/2)``.

    Example::

        >>> qkv = block.attn.qkv(block.norm1(x))                    # (B, N, 3*D)
        >>> with torch.no_grad():
        ...     y = block.attn.proj(teacher_attention(qkv, block.attn.num_heads))
    """
    _check_inputs(qkv, num_heads, scale)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if scale is None:
        scale = head_dim**-0.5
    if rope is None:
        if not isinstance(rope_prefix, int) or isinstance(rope_prefix, bool) or rope_prefix != 0:
            raise ValueError(f"rope_prefix: only meaningful with rope; got rope=None and rope_prefix={rope_prefix!r}")
        return _teacher_attention_op(qkv, int(num_heads), float(scale))
    sin, cos = _check_rope(qkv, head_dim, rope, rope_prefix)
    return _teacher_attention_rope_op(qkv, int(num_heads), float(scale), sin, cos, int(rope_prefix))
