"""Teacher attention: non-causal softmax attention read straight from the packed QKV
projection of a ViT block, for the frozen (inference-only) LEAP teacher.

Room layout: Triton flash-attention forward kernel -> per-backend host functions ->
torch.library op with a fake implementation -> functional API.

Layout. ``qkv (B, N, 3*H*d)`` is the output of the block's ``qkv`` linear, laid out as
timm's ``reshape(B, N, 3, H, d)``: channel ``c = s*H*d + h*d + j`` holds q (s=0), k (s=1)
or v (s=2) of head ``h``. The kernel reads q, k and v of one (batch, head) in place through
the strides of ``qkv`` (no permute/contiguous copy; strided views of ``qkv`` work) and
writes the output ``(B, N, H*d)`` directly in the layout the output projection consumes,
i.e. ``(softmax(q k^T * scale) v).transpose(1, 2).reshape(B, N, H*d)`` - no transpose copy.

Kernel (flash-attention forward, one program per (query tile, batch*head)): the query
tile stays in registers; key/value tiles of ``BLOCK_N`` tokens stream past it; the running
row max ``m`` and row sum ``l`` of the online softmax are fp32, the output accumulator is
fp32 and is rescaled by ``exp2(m_old - m_new)`` when the max grows. ``log2(e)`` is folded
into the softmax scale so the exponentials are ``exp2``. Ragged ends cost 16-token steps, not
whole tiles: the key loop runs over the full ``BLOCK_N`` tiles without any mask, then over the
key tail (``N % BLOCK_N`` keys) in ``TAIL_N = 16``-key steps with the out-of-range keys masked
to ``-inf`` *before* the row max; each (batch, head) has ``N // BLOCK_M`` full query tiles
(no row masks) and ``cdiv(N % BLOCK_M, TAIL_M)`` tail tiles of ``TAIL_M = 16`` rows (masked
at load and store). At N = 261 with 64 x 64 tiles that is 272 x 272 computed (query, key)
pairs instead of 320 x 320 (8 % masked instead of 33 %; :func:`computed_pairs`). Full query
tiles run on wgmma (Hopper), the 16-row tail tiles on mma.sync. Nothing is padded in memory.
The autotune key is ``N``, ``bh_bucket(B * H)`` and the head dim. ``N`` stays a runtime argument:
as a ``tl.constexpr`` it costs the d = 128 tiles registers (a spill under Triton 3.8).

Backends (their limits are declared in :mod:`leap_kernels._backends`): ``triton`` runs
bfloat16/float16 inputs with head dims 16, 32, 64, 128 and a positive scale (CUDA, or CPU under
``TRITON_INTERPRET=1``); ``cuda`` (``leap_kernels._C``, bfloat16/float16, head dims 64 and 128)
only when forced until it is verified on a GPU. Everything else (float32, float64, other head
dims, scale <= 0, CPU tensors) runs on the ``torch`` backend (``scaled_dot_product_attention`` on
permuted views of ``qkv``), which automatic dispatch falls back to; forcing a backend on inputs
it cannot run raises with the reasons.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import _backends, _checks
from ._triton_common import HAS_TRITON, INTERPRETED, upcast_dot

OP_NAME = "teacher_attention"
#: Head dims the Triton kernel is built for (one ``tl.dot`` over the whole head dim).
TRITON_HEAD_DIMS = _backends.TRITON_HEAD_DIMS
#: Input dtypes of the Triton kernel (tensor-core dots with fp32 accumulation).
TRITON_DTYPES = _backends.HALF_DTYPES

LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------- Triton kernel

#: Rows of a tail query tile and keys of a tail key step. The query and key remainders past the
#: last full ``BLOCK_M`` / ``BLOCK_N`` tile are computed in steps of 16 (the k extent of a 16-bit
#: tensor-core MMA): N = 261 costs 4 full 64-key tiles and one 16-key step, not a fifth 64-key tile.
TAIL_M = 16
TAIL_N = 16


def query_programs(n: int, block_m: int) -> int:
    """Programs per (batch, head): ``n // block_m`` full query tiles and ``cdiv(n % block_m, TAIL_M)`` tail tiles."""
    return n // block_m + -(-(n % block_m) // TAIL_M)


def computed_pairs(n: int, block_m: int, block_n: int) -> int:
    """(query, key) pairs the kernel computes per (batch, head) with ``block_m x block_n`` tiles
    (``n * n`` of them are real; the rest are masked padding)."""
    rows = (n // block_m) * block_m + -(-(n % block_m) // TAIL_M) * TAIL_M
    keys = (n // block_n) * block_n + -(-(n % block_n) // TAIL_N) * TAIL_N
    return rows * keys


def bh_bucket(batch_heads: int) -> int:
    """Autotune key of the grid size: ``B * H`` rounded up to a power of 2 (with ``N`` in the key
    this fixes the program count within a factor of 2, so a config tuned at one batch size is not
    reused for a very different grid)."""
    return 1 << max(0, (batch_heads - 1).bit_length())


if HAS_TRITON:
    import triton
    import triton.language as tl

    def _attention_configs(interpreted: bool) -> list[triton.Config]:
        if interpreted:  # the interpreter accepts one config; its cost grows with the program count
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
        shapes = [
            # (BLOCK_M, BLOCK_N, num_warps, num_stages)
            (128, 64, 8, 3),  # Hopper default for d = 64
            (64, 64, 4, 3),  # more programs for short sequences and small batches
            (128, 32, 4, 3),  # fewer registers per thread
            (64, 32, 4, 4),
            (128, 128, 8, 2),  # long sequences
        ]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]

    def _prune_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        """d = 128 with 128x128 tiles spills registers; drop it. Never prune to nothing."""
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        kept = [
            c
            for c in configs
            if not (head_dim is not None and head_dim >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)
        ]
        return kept or configs[:1]

    @triton.jit
    def _attention_kv_tile(  # type: ignore[no-untyped-def]
        acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, N, qk_scale, offs_n, MASK_KEYS: tl.constexpr, UPCAST: tl.constexpr
    ):
        """One key/value tile (``len(offs_n)`` keys from ``start_n``) of the online softmax;
        returns the updated ``(acc, l_i, m_i)``."""
        if MASK_KEYS:
            key_ok = (start_n + offs_n) < N
            k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:  # interpreter only: its 16-bit dot is not exact
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASK_KEYS:
            qk = tl.where(key_ok[None, :], qk, float("-inf"))  # before the max: padded keys never win
        # qk_scale = scale * log2(e) > 0, so max(qk) * qk_scale is the max of the scaled logits and the
        # scaling folds into one FMA per logit; the softmax runs in base 2.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # finite: every tile has at least one real key
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])  # padded keys: exp2(-inf) = 0
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASK_KEYS:
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        p = p.to(v.dtype)  # probabilities rounded to the input dtype, as a tensor-core dot takes them
        if UPCAST:
            acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p, v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _attention_rows(  # type: ignore[no-untyped-def]
        q_base,
        k_base,
        v_base,
        out_base,
        row0,
        N,
        stride_qkv_n,
        stride_qkv_c,
        stride_out_n,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
        ROWS: tl.constexpr,
        MASK_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAIL_N: tl.constexpr,
    ):
        """Output rows ``[row0, row0 + ROWS)`` of one (batch, head): the full ``BLOCK_N`` key tiles
        without masks, then the key tail in ``TAIL_N``-key steps. ``MASK_ROWS``: rows may pass ``N``."""
        offs_m = row0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = q_base + offs_m[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        if MASK_ROWS:
            q = tl.load(q_ptrs, mask=(offs_m < N)[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs)

        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

        offs_n = tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        v_ptrs = v_base + offs_n[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        n_full = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):  # full tiles: no masks
            acc, l_i, m_i = _attention_kv_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, N, qk_scale, offs_n, MASK_KEYS=False, UPCAST=UPCAST
            )
            k_ptrs += BLOCK_N * stride_qkv_n
            v_ptrs += BLOCK_N * stride_qkv_n
        # The key tail (N % BLOCK_N keys) in TAIL_N-key steps, keys past N masked; not pipelined (one
        # step at the paper's shapes; stages would only cost shared memory).
        offs_t = tl.arange(0, TAIL_N)
        k_ptrs = k_base + (n_full + offs_t)[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        v_ptrs = v_base + (n_full + offs_t)[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        for start_n in tl.range(n_full, N, TAIL_N, num_stages=1):
            acc, l_i, m_i = _attention_kv_tile(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, N, qk_scale, offs_t, MASK_KEYS=True, UPCAST=UPCAST
            )
            k_ptrs += TAIL_N * stride_qkv_n
            v_ptrs += TAIL_N * stride_qkv_n

        out = acc * (1.0 / l_i)[:, None]
        out_ptrs = out_base + offs_m[:, None] * stride_out_n + offs_d[None, :]
        if MASK_ROWS:
            tl.store(out_ptrs, out.to(out_base.dtype.element_ty), mask=(offs_m < N)[:, None])
        else:
            tl.store(out_ptrs, out.to(out_base.dtype.element_ty))

    @triton.jit(do_not_specialize=["bh_bucket"])
    def _teacher_attention_fwd_kernel(  # type: ignore[no-untyped-def]
        QKV,
        OUT,
        N,
        H,
        bh_bucket,  # autotune key only (bh_bucket(B * H)); unused by the kernel
        stride_qkv_b,
        stride_qkv_n,
        stride_qkv_c,
        stride_out_b,
        stride_out_n,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
        TAIL_M: tl.constexpr,
        TAIL_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # 1-D grid, query tiles fastest: the programs of one (batch, head), its tail tiles included,
        # run together and share its K/V tiles in L2; no 65535 limit on the batch*head axis.
        # Per (batch, head): N // BLOCK_M full query tiles (no row masks), then the query tail in
        # TAIL_M-row tiles, so N = 261 costs 4 x 64 + 16 rows instead of 5 x 64.
        num_full_m = N // BLOCK_M
        num_m_tiles = num_full_m + tl.cdiv(N - num_full_m * BLOCK_M, TAIL_M)
        pid = tl.program_id(0)
        pid_m = pid % num_m_tiles
        pid_bh = pid // num_m_tiles
        b = pid_bh // H
        h = pid_bh % H

        # q, k, v of head h are channel slices [s*H*d + h*d, s*H*d + (h+1)*d) of each token row.
        base = QKV + b.to(tl.int64) * stride_qkv_b
        q_base = base + (h * HEAD_DIM) * stride_qkv_c
        k_base = base + ((H + h) * HEAD_DIM) * stride_qkv_c
        v_base = base + ((2 * H + h) * HEAD_DIM) * stride_qkv_c
        out_base = OUT + b.to(tl.int64) * stride_out_b + h * HEAD_DIM
        if pid_m < num_full_m:
            _attention_rows(
                q_base,
                k_base,
                v_base,
                out_base,
                pid_m * BLOCK_M,
                N,
                stride_qkv_n,
                stride_qkv_c,
                stride_out_n,
                qk_scale,
                HEAD_DIM=HEAD_DIM,
                UPCAST=UPCAST,
                ROWS=BLOCK_M,
                MASK_ROWS=False,
                BLOCK_N=BLOCK_N,
                TAIL_N=TAIL_N,
            )
        else:
            _attention_rows(
                q_base,
                k_base,
                v_base,
                out_base,
                num_full_m * BLOCK_M + (pid_m - num_full_m) * TAIL_M,
                N,
                stride_qkv_n,
                stride_qkv_c,
                stride_out_n,
                qk_scale,
                HEAD_DIM=HEAD_DIM,
                UPCAST=UPCAST,
                ROWS=TAIL_M,
                MASK_ROWS=True,
                BLOCK_N=BLOCK_N,
                TAIL_N=TAIL_N,
            )

    _teacher_attention_fwd_tuned = triton.autotune(
        configs=_attention_configs(INTERPRETED),
        # Exact N (one per model resolution: it fixes the full-tile and tail counts) and the B*H
        # bucket (the grid size): a config picked at batch 128 is not reused at batch 1.
        key=["N", "bh_bucket", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_teacher_attention_fwd_kernel)


def teacher_attention_triton(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float,
    out: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 1,
) -> torch.Tensor:
    """Triton backend: writes attention of ``qkv (B, N, 3*H*d)`` into ``out (B, N, H*d)`` (unit channel stride).

    ``block_m``/``block_n`` (powers of 2, >= 16) launch fixed tiles with ``num_warps``/``num_stages``
    instead of the autotuned config (tests and benchmarks of one config).
    """
    batch, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    grid = lambda meta: (query_programs(n, meta["BLOCK_M"]) * batch * num_heads,)  # noqa: E731
    args = (
        qkv,
        out,
        n,
        num_heads,
        bh_bucket(batch * num_heads),
        qkv.stride(0),
        qkv.stride(1),
        qkv.stride(2),
        out.stride(0),
        out.stride(1),
        float(scale) * LOG2E,
    )
    meta = dict(HEAD_DIM=head_dim, UPCAST=upcast_dot(qkv.dtype), TAIL_M=TAIL_M, TAIL_N=TAIL_N)
    if block_m is None and block_n is None:
        _teacher_attention_fwd_tuned[grid](*args, **meta)
    else:
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of 2 >= 16 (with the other one given), got {value!r}")
        _teacher_attention_fwd_kernel[grid](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages
        )
    return out


# ----------------------------------------------------------------------------- torch backend


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``q, k, v (B, H, N, d)`` of a packed ``qkv (B, N, 3*H*d)`` (timm's layout), no copy."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0)


def teacher_attention_torch(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Torch backend: ``scaled_dot_product_attention`` on views of ``qkv``; returns ``(B, N, H*d)``."""
    batch, n, c = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if qkv.device.type == "cpu":
        # torch's CPU SDPA kernel turns a query row holding NaN/inf into zeros; the reference (and
        # every other backend) gives NaN there. q.sum() * 0 is 0, or NaN for such a row.
        out = out + (q.sum(dim=-1, keepdim=True) * 0).to(out.dtype)
    return out.transpose(1, 2).reshape(batch, n, c // 3)


# ----------------------------------------------------------------------------- dispatch


def select_attention_backend(qkv: torch.Tensor, head_dim: int, scale: float = 1.0) -> str:
    """Backend for this call (:func:`leap_kernels._backends.select_backend` with the call's head dim
    and scale, which the backends' declarations check).

    Automatic dispatch falls back to ``torch`` when no kernel can take the dtype, head dim or scale;
    a forced backend that cannot raises RuntimeError with every reason.
    """
    return _backends.select_backend(OP_NAME, [qkv], head_dim=head_dim, scale=scale)


# ----------------------------------------------------------------------------- torch.library op


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


def teacher_attention(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of a ViT block, read from its packed QKV projection (inference only).

    ``out = (softmax(q @ k^T * scale) @ v).transpose(1, 2).reshape(B, N, H*d)`` with
    ``q, k, v = qkv.unflatten(-1, (3, H, d)).permute(2, 0, 3, 1, 4).unbind(0)``: exactly timm's
    ``Attention`` between its ``qkv`` and ``proj`` layers (non-causal, no mask, no dropout).

    Args:
        qkv: ``(B, N, 3*H*d)``, the output of the block's ``qkv`` linear (timm layout
            ``(B, N, 3, H, d)``). Any strides (e.g. a slice of a larger batch); read in place.
            bfloat16/float16 run the Triton kernel (head dims 16, 32, 64, 128); float32, float64,
            other head dims and ``scale <= 0`` run ``scaled_dot_product_attention`` (the ``torch``
            backend).
        num_heads: ``H``, a positive int dividing ``qkv.shape[-1] / 3``.
        scale: softmax scale; default ``d ** -0.5``.

    Returns:
        ``(B, N, H*d)`` contiguous, in ``qkv``'s dtype: the input of the block's ``proj`` linear.
        Softmax statistics and accumulation are fp32 (online softmax, flash-attention style).

    Raises:
        RuntimeError: grad mode is on and ``qkv`` requires grad (there is no backward; the
            teacher is frozen), or ``triton`` was forced for inputs it cannot run.
        TypeError / ValueError: ``qkv`` is not a 3-D float tensor with a last dim divisible by
            ``3 * num_heads``, or ``num_heads`` / ``scale`` is invalid.

    Example::

        >>> qkv = block.attn.qkv(block.norm1(x))                    # (B, N, 3*D)
        >>> with torch.no_grad():
        ...     y = block.attn.proj(teacher_attention(qkv, block.attn.num_heads))
    """
    _check_inputs(qkv, num_heads, scale)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if scale is None:
        scale = head_dim**-0.5
    return _teacher_attention_op(qkv, int(num_heads), float(scale))
