"""Fused feature loss: projection ``student @ weight.T + bias`` followed by MSE or
token-normalized MSE against the teacher's features, forward and backward fused.

Room layout: Triton kernels (projection GEMM with a loss epilogue; split weight/bias
gradient GEMM; one rescale kernel for backward) -> the chunk loop of each backend (Triton
and torch here; cpp and cuda: one call of the C++ loop in csrc/ops.cpp) -> torch.library
ops with fake implementations and autograd -> functional API.

How it saves memory (the idea of Liger's fused linear cross-entropy, for a
regression loss): tokens are processed in chunks; for each chunk the projection is
formed, turned into the loss and into ``G = dL/dP`` right away, and ``G`` is
consumed by the gradient GEMMs before the next chunk. The full ``(M, D_t)``
projection never exists and nothing of that size is kept for backward. For
``reduction="mean"|"sum"`` the gradients are finished in the forward pass and the
backward only rescales them by ``grad_output``; ``reduction="none"`` (a per-token
upstream gradient) recomputes the chunks in backward instead.

Triton flow, per chunk of ``chunk_tokens`` tokens (16384 by default: two chunks at the
paper's 32768 tokens), with every buffer allocated once per call and sized by the shapes
only (no host sync, nothing data-dependent: CUDA-graph capturable):

1. ``_projection_loss_kernel``: ``P = S W^T + b``. Plain MSE: the epilogue writes
   ``G = 2 (P - T)`` into the one reusable ``(chunk, D_t)`` G buffer (compute dtype) and each
   column tile's per-token partial sums of ``(P - T)^2`` into one ``(slots, M)`` fp32 buffer.
   Token-normalized: the epilogue stores ``P`` in the compute dtype into the G buffer, and
   ``_token_norm_mse_rows_kernel`` (``._rows``) turns it into ``G`` in place and writes the
   per-token losses.
2. cuBLAS: ``dS = G W`` straight into the kept student gradient (``addmm`` with
   ``alpha = kept scale`` for fp16, see below).
3. ``_grad_weight_kernel``: ``dW = G^T S`` and ``db = sum G``, split over token slices of the
   chunk (a grid over column tiles x splits, not only the 72 column tiles of 1536 x 384),
   each split accumulating into its own fp32 ``(splits, D_t, D_s)`` workspace slice.

Then one ATen sum gives the loss. Backward is one launch of ``_rescale_kernel``: the kept
student gradient, the split sums of the weight and bias gradients (added in a fixed order:
deterministic, no atomics), all times ``grad_output`` and the reduction's scale in fp32,
cast to the parameters' dtypes. Plain MSE, bf16, at the paper's shape: 8 launches per
forward+backward (3 per chunk, the loss sum, the rescale); token-normalized: 10.

Strided ``(B, N, D)`` inputs (e.g. ``x[:, prefix:]``) are read in place by the Triton kernels
(row ``m`` at ``(m // N) * stride_b + (m % N) * stride_n``); the other backends copy them.

The gradients kept between forward and backward are ``kept_grad_scale`` times those of
``sum(row_loss)``: no ``1/numel`` factor, so that 16-bit storage does not underflow, and for fp16
a ``2^-ceil(log2(D_t) / 2)`` factor so that the student gradient, a sum over ``D_t`` channels, does
not overflow fp16 at residuals |P - T| ~ 1e3. Backward undoes both in fp32.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .. import _backends, _checks
from ._triton_common import (
    HAS_TRITON,
    INTERPRETED,
    accumulation_dtype,
    dot_precision,
    m_bucket,
    upcast_dot,
)
from ._rows import reduce_rows, row_grad_scale, token_norm_input_grad, token_norm_rows_torch, token_norm_rows_triton

ENV_CHUNK_TOKENS = "LEAP_KERNELS_CHUNK_TOKENS"
# The torch backend and the C++ CUDA loop (whose fp32 projection buffer makes larger chunks costly).
DEFAULT_CHUNK_TOKENS = 8192
# The Triton loop. Peak extra memory at the paper's shape (M = 32768, 384 -> 1536, bf16, chunk C,
# S = 8 weight-gradient splits, 24 loss slots of 64 channels) is in the forward, in MiB:
#   G buffer C * 1536 * 2 + kept dS 32768 * 384 * 2 + dW workspace S * 1536 * 384 * 4
#   + loss partials 24 * 32768 * 4 (plain; token-normalized: per-token losses 32768 * 4)
#   = 48.0 + 24.0 + 18.0 + 3.0 = 93.0 MiB at C = 16384 (90.1 MiB token-normalized);
# backward: kept dS + workspace + the new student/weight/bias gradients = 24.0 + 18.0 + 25.1 = 67.2 MiB.
# C = 32768 would need 141 MiB, over the 130 MB target; C = 8192 doubles the launches.
# tests/test_launch_count.py measures the peak from the allocations and frees of a meta-tensor run.
DEFAULT_TRITON_CHUNK_TOKENS = 16384
# The C++ CPU loop, measured at M = 8192, 384 -> 1536 on 2 cores: smaller chunks run the GEMMs slower
# (1024 tokens: 1.5x the time of 8192), and 8192 raises the peak from 43 MB to 62 MB (eager: 192 MB).
DEFAULT_CPU_CHUNK_TOKENS = 4096

# Weight-gradient splits over tokens: enough CTAs for a whole H100/H200 (72 column tiles x 8 = 576 for
# 1536 x 384), at least this many tokens per split so that the fp32 tile write stays small next to the
# reads, and a (splits, D_t, D_s) fp32 workspace of at most 8 weight gradients.
MIN_ROWS_PER_SPLIT = 2048
MAX_WEIGHT_GRAD_SPLITS = 8


def chunk_tokens(m: int, default: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Tokens per chunk: bounds the ``(chunk, D_t)`` scratch buffers (``LEAP_KERNELS_CHUNK_TOKENS``
    when set, else ``default``)."""
    value = os.environ.get(ENV_CHUNK_TOKENS)
    if value:
        try:
            chunk = int(value)
        except ValueError:
            chunk = 0
        if chunk <= 0:
            raise ValueError(f"{ENV_CHUNK_TOKENS}: expected a positive integer, got {value!r}")
    else:
        chunk = default
    return min(m, chunk)


def weight_grad_splits(m: int, device: torch.device) -> int:
    """Number of token slices whose weight/bias gradients are kept apart until backward.

    A function of the shape and device only, so that the fake implementations know it. CPU tensors
    without the Triton interpreter never reach the Triton kernels: one (the C++ loop's layout).
    """
    if device.type == "cpu" and not INTERPRETED:
        return 1
    return max(1, min(MAX_WEIGHT_GRAD_SPLITS, m // MIN_ROWS_PER_SPLIT))


def kept_grad_scale(student_dtype: torch.dtype, n: int) -> float:
    """Factor on the gradients kept from forward to backward (``reduction="mean"|"sum"``):
    ``2^-ceil(log2(D_t) / 2)`` for fp16 (1/64 for D_t = 1536), else 1.

    The kept student gradient ``G W`` sums ``D_t`` products ``2 (P - T) W``: unscaled, it overflows
    fp16 from |P - T| ~ 1e3 when the products add up coherently. A factor of about ``1/sqrt(D_t)``
    moves that to where ``G = 2 (P - T)`` itself overflows (|P - T| ~ 3e4) for weights of the usual
    ``1/sqrt(D_s)`` scale, and keeps a random-sign sum (which grows like ``sqrt(D_t)``) in fp16's normal
    range down to |P - T| ~ 1e-3 (a ``1/D_t`` factor would push residuals ~1e-2 into subnormals).
    bf16 and fp32 have the range and keep factor 1.
    """
    if student_dtype != torch.float16:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(max(n, 1)) / 2)


def loss_scale(reduction: str, m: int, n: int) -> float:
    """Factor from ``sum_c err^2`` per token to the op's loss: the mean's ``1/(M D_t)``, ``1`` for the
    sum, ``1/D_t`` per token for ``"none"``."""
    if reduction == "mean":
        return 1.0 / (m * n)
    if reduction == "sum":
        return 1.0
    return 1.0 / n


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _can_flatten(x: torch.Tensor, dims: int) -> bool:
    """True when the first ``dims`` dims of ``x`` merge into one without a copy."""
    for i in range(dims - 1):
        if x.shape[i + 1] != 1 and x.shape[i] != 1 and x.stride(i) != x.stride(i + 1) * x.shape[i + 1]:
            return False
    return True


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(M, D)`` when that is a view, else ``(B, N, D)`` when that is a view (a slice
    ``x[:, prefix:]`` of contiguous tokens), else a copy ``(M, D)``."""
    if x.dim() <= 2:
        return x.reshape(-1, x.shape[-1]) if x.dim() == 1 else x
    if _can_flatten(x, x.dim() - 1):
        return x.reshape(-1, x.shape[-1])
    if _can_flatten(x, x.dim() - 2):
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_common import _row_offsets

    def _gemm_configs(interpreted: bool, **extra):
        if interpreted:  # the interpreter accepts one config; big tiles mean few programs
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, **extra}, num_warps=4)]
        # No 128x256 tile: it spills registers with the MSE epilogue (bench/compile_check.py, sm_90).
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes
        ]

    _PROJECTION_CONFIGS = _gemm_configs(INTERPRETED, GROUP_M=8)

    # The loss partials buffer has one row ("slot") per PARTIAL_BLOCK_N channels: a column tile of
    # BLOCK_N = r * PARTIAL_BLOCK_N writes its per-token sum to its first slot and zeros to the other
    # r - 1, so every slot is written whatever config the autotuner picks (no zero-fill launch, no
    # stale rows from a benchmarked config). That needs every BLOCK_N to be a multiple of the narrowest.
    PARTIAL_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _PROJECTION_CONFIGS)

    def check_partial_slots(configs, partial_block_n: int) -> None:
        """Raises if a projection config's BLOCK_N is not a multiple of the partials' slot width."""
        bad = [c.kwargs["BLOCK_N"] for c in configs if c.kwargs["BLOCK_N"] % partial_block_n]
        if bad:
            raise RuntimeError(
                f"_projection_loss_kernel configs: BLOCK_N {bad} is not a multiple of PARTIAL_BLOCK_N = "
                f"{partial_block_n}, the slot width the loss partials buffer is sized by"
            )

    check_partial_slots(_PROJECTION_CONFIGS, PARTIAL_BLOCK_N)

    @triton.autotune(
        configs=_PROJECTION_CONFIGS,
        key=["M_BUCKET", "N", "K", "MODE", "WRITE_LOSS", "WRITE_GRAD"],
    )
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _projection_loss_kernel(
        S, W, BIAS, T, OUT, ROW_SCALE, PARTIAL_LOSS,
        M, N, K,
        stride_sm, stride_sk, stride_wn, stride_wk, stride_tm, stride_tn, stride_om,
        stride_pl, ROW0, TOKENS, stride_sb, stride_tb, M_BUCKET, loss_scale,
        MODE: tl.constexpr,  # 0: store the projection in OUT's dtype; 1: MSE epilogue
        HAS_BIAS: tl.constexpr,
        WRITE_LOSS: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        PARTIAL_BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """P = S @ W^T + bias for one (BLOCK_M, BLOCK_N) tile of the chunk's M rows, then the epilogue.

        Chunk row m is token row ROW0 + m of S and T, read through (TOKENS, stride_*b, stride_*m).
        MODE 1 writes ``loss_scale * sum (P - T)^2`` over the tile's columns to its slot of
        PARTIAL_LOSS (summed later: deterministic, no atomics) and, with WRITE_GRAD, G = 2 (P - T)
        (times ROW_SCALE) to OUT. M_BUCKET only keys the autotuner.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: programs that run together share W tiles in L2.
        group_size = GROUP_M * num_pid_n
        first_pid_m = (pid // group_size) * GROUP_M
        group_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % group_size) % group_m
        pid_n = (pid % group_size) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        offs_m64 = offs_m.to(tl.int64)
        s_rows = _row_offsets(ROW0 + offs_m, TOKENS, stride_sb, stride_sm)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            s = tl.load(
                S + s_rows[:, None] + (k0 + offs_k)[None, :] * stride_sk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0,
            )
            w_t = tl.load(
                W + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk,
                mask=n_mask[None, :] & k_mask[:, None], other=0.0,
            )
            if UPCAST:
                s = s.to(tl.float32)
                w_t = w_t.to(tl.float32)
            acc = tl.dot(s, w_t, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

        mask = m_mask[:, None] & n_mask[None, :]
        out_ptrs = OUT + offs_m64[:, None] * stride_om + offs_n[None, :]
        if MODE == 0:
            tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
        else:
            t_rows = _row_offsets(ROW0 + offs_m, TOKENS, stride_tb, stride_tm)
            t = tl.load(T + t_rows[:, None] + offs_n[None, :] * stride_tn, mask=mask, other=0.0)
            residual = tl.where(mask, acc - t.to(tl.float32), 0.0)
            if WRITE_LOSS:
                part = tl.sum(residual * residual, axis=1) * loss_scale
                slot = pid_n * (BLOCK_N // PARTIAL_BLOCK_N)
                tl.store(PARTIAL_LOSS + slot * stride_pl + offs_m, part, mask=m_mask)
                num_slots = tl.cdiv(N, PARTIAL_BLOCK_N)
                for j in tl.static_range(1, BLOCK_N // PARTIAL_BLOCK_N):
                    tl.store(PARTIAL_LOSS + (slot + j) * stride_pl + offs_m, tl.zeros_like(part),
                             mask=m_mask & (slot + j < num_slots))
            if WRITE_GRAD:
                if HAS_ROW_SCALE:
                    row_scale = tl.load(ROW_SCALE + offs_m, mask=m_mask, other=0.0)
                    grad = (2.0 * row_scale)[:, None] * residual
                else:
                    grad = 2.0 * residual
                tl.store(out_ptrs, grad.to(OUT.dtype.element_ty), mask=mask)

    @triton.autotune(
        configs=_gemm_configs(INTERPRETED),
        key=["M_BUCKET", "N", "K", "HAS_BIAS_GRAD", "ACCUMULATE"],
        restore_value=["DW", "DB"],  # ACCUMULATE adds to them: benchmarking a config must not
    )
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _grad_weight_kernel(
        G, S, DW, DB,
        M, N, K,
        stride_gm, stride_gn, stride_sm, stride_sk,
        ROW0, TOKENS, stride_sb, ROWS_PER_SPLIT, M_BUCKET, kept_scale,
        HAS_BIAS_GRAD: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """DW[split, n, k] (+)= kept_scale * sum_m G[m, n] S[m, k] over the split's rows, in fp32;
        DB[split, n] (+)= kept_scale * sum_m G[m, n].

        One program per (split, column tile), splits outermost so that programs running together
        read the same rows. Each split owns its workspace slice: no atomics, and backward adds the
        slices in a fixed order. ACCUMULATE is off for the first chunk (plain stores: no zero fill).
        """
        pid = tl.program_id(0)
        num_pid_k = tl.cdiv(K, BLOCK_K)
        tiles = tl.cdiv(N, BLOCK_N) * num_pid_k
        split = pid // tiles
        tile = pid % tiles
        pid_n = tile // num_pid_k
        pid_k = tile % num_pid_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        k_mask = offs_k < K
        lo = split * ROWS_PER_SPLIT
        hi = min(lo + ROWS_PER_SPLIT, M)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            m_mask = rows < hi
            g_t = tl.load(G + rows.to(tl.int64)[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                          mask=n_mask[:, None] & m_mask[None, :], other=0.0)
            s_rows = _row_offsets(ROW0 + rows, TOKENS, stride_sb, stride_sm)
            s = tl.load(S + s_rows[:, None] + offs_k[None, :] * stride_sk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_BIAS_GRAD:
                bias_acc += tl.sum(g_t.to(tl.float32), axis=1)
            if UPCAST:
                g_t = g_t.to(tl.float32)
                s = s.to(tl.float32)
            acc = tl.dot(g_t, s, acc, input_precision=INPUT_PRECISION)
        acc = acc * kept_scale
        w_ptrs = DW + split.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
        w_mask = n_mask[:, None] & k_mask[None, :]
        if ACCUMULATE:
            acc += tl.load(w_ptrs, mask=w_mask, other=0.0)
        tl.store(w_ptrs, acc, mask=w_mask)
        if HAS_BIAS_GRAD:
            if pid_k == 0:
                bias_acc = bias_acc * kept_scale
                b_ptrs = DB + split * N + offs_n
                if ACCUMULATE:
                    bias_acc += tl.load(b_ptrs, mask=n_mask, other=0.0)
                tl.store(b_ptrs, bias_acc, mask=n_mask)

    @triton.jit
    def _rescale_kernel(
        GS, GW, GB, GRAD_OUT, OUT_S, OUT_W, OUT_B,
        n_s, n_w, n_b, splits, scale,
        HAS_GRAD_OUT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The fused loss's whole backward for ``reduction="mean"|"sum"``, one launch:
        ``OUT_S = GS * f``, ``OUT_W = (sum_s GW[s]) * f``, ``OUT_B = (sum_s GB[s]) * f`` with
        ``f = GRAD_OUT * scale`` in fp32, each stored in its output's dtype.

        Programs ``[0, cdiv(n_s))`` rescale the student gradient, the next ``cdiv(n_w)`` the weight
        gradient, the rest the bias gradient (``n_* = 0``: not wanted). The split slices are added
        in order 0, 1, ...: deterministic.
        """
        pid = tl.program_id(0)
        progs_s = tl.cdiv(n_s, BLOCK)
        progs_w = tl.cdiv(n_w, BLOCK)
        factor = scale
        if HAS_GRAD_OUT:
            factor = tl.load(GRAD_OUT).to(tl.float32) * scale
        if pid < progs_s:
            offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_s
            x = tl.load(GS + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT_S + offs, (x * factor).to(OUT_S.dtype.element_ty), mask=mask)
        elif pid < progs_s + progs_w:
            offs = (pid - progs_s).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_w
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(GW + (offs + s * n_w), mask=mask, other=0.0)
            tl.store(OUT_W + offs, (total * factor).to(OUT_W.dtype.element_ty), mask=mask)
        else:
            offs = (pid - progs_s - progs_w).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_b
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(GB + (offs + s * n_b), mask=mask, other=0.0)
            tl.store(OUT_B + offs, (total * factor).to(OUT_B.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_cast_kernel(X, FACTOR, OUT, n, BLOCK: tl.constexpr):
        """OUT = X * FACTOR in fp32, stored in OUT's dtype (FACTOR: a 0-d fp32 tensor on the device)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        factor = tl.load(FACTOR).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x * factor).to(OUT.dtype.element_ty), mask=mask)


ELEMENTWISE_BLOCK = 65536 if INTERPRETED else 4096  # the interpreter runs programs one after another


def _token_layout(student: torch.Tensor, target: torch.Tensor) -> int:
    """Tokens per sample of the ``(B, N, D)`` inputs (``M`` when both are 2-D ``(M, D)``)."""
    for x in (student, target):
        if x.dim() == 3:
            return x.shape[1]
    return student.shape[0]


def _row_strides(x: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(stride_b, stride_m) of ``x``'s token rows in a ``(B, tokens, D)`` view."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1)
    return tokens * x.stride(0), x.stride(0)


def _loss_slots(n: int) -> int:
    return triton.cdiv(n, PARTIAL_BLOCK_N)


def _forward_triton(student, weight, bias, target, normalize, eps, *, reduction, want_grads, row_scale, splits,
                    kept_scale):
    """The Triton chunk loop.

    student ``(M, D_s)`` or ``(B, N, D_s)`` (any strides), weight ``(D_t, D_s)``, bias ``(D_t,)`` or None,
    target ``(M, D_t)`` or ``(B, N, D_t)``, row_scale ``(M,)`` fp32 or None; ``reduction`` None: no loss.
    Returns ``(loss, grad_student, grad_weight_parts, grad_bias_parts)``: loss as :func:`reduce_rows`
    gives it (None without ``reduction``); with ``want_grads`` the gradients of
    ``kept_scale * sum_m row_scale[m] row_loss[m]``: student (student's shape and dtype), weight
    ``(splits, D_t, D_s)`` and bias ``(splits, D_t)`` fp32 per token split (bias None without bias).
    """
    k = student.shape[-1]
    n = weight.shape[0]
    m = student.numel() // k
    device = student.device
    compute_dtype = student.dtype
    weight_c = weight.to(compute_dtype)  # no copy in the common case of matching dtypes
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it in its own dtype
    upcast, precision = upcast_dot(compute_dtype), dot_precision(compute_dtype)
    tokens = _token_layout(student, target)
    s_stride_b, s_stride_m = _row_strides(student, tokens)
    t_stride_b, t_stride_m = _row_strides(target, tokens)
    scale = loss_scale(reduction, m, n) if reduction is not None else 1.0
    chunk = chunk_tokens(m, DEFAULT_TRITON_CHUNK_TOKENS)

    # Every buffer once per call, sized by the shapes only.
    g_buf = None
    if want_grads or normalize:  # G, and for the token-normalized loss first P, in the compute dtype
        g_buf = torch.empty(chunk, n, dtype=compute_dtype, device=device)
    row_loss = partial = None
    if reduction is not None:
        if normalize:
            row_loss = torch.empty(m, dtype=torch.float32, device=device)
        else:
            partial = torch.empty(_loss_slots(n), m, dtype=torch.float32, device=device)
    grad_student = grad_weight = grad_bias = None
    if want_grads:
        grad_student = torch.empty(student.shape, dtype=compute_dtype, device=device)
        grad_weight = torch.empty(splits, n, k, dtype=torch.float32, device=device)
        if bias is not None:
            grad_bias = torch.empty(splits, n, dtype=torch.float32, device=device)
    dummy = g_buf if g_buf is not None else (partial if partial is not None else weight_c)
    rows_layout = dict(tokens=tokens, s_stride_b=s_stride_b, s_stride_m=s_stride_m, t_stride_b=t_stride_b,
                       t_stride_m=t_stride_m)

    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        rows = stop - start
        g = g_buf[:rows] if g_buf is not None else None
        scale_chunk = row_scale[start:stop] if row_scale is not None else None
        if normalize:
            _launch_projection(student, weight_c, bias, target, g, None, None, start, rows, mode=0, upcast=upcast,
                               precision=precision, loss_scale=scale, dummy=dummy, **rows_layout)
            token_norm_rows_triton(
                g, target, eps, row_scale=scale_chunk,
                row_loss=row_loss[start:stop] if row_loss is not None else None,
                grad_x=g if want_grads else None, loss_scale=scale,
                t_rows=(start, tokens, t_stride_b, t_stride_m),
            )
        else:
            _launch_projection(student, weight_c, bias, target, g, scale_chunk,
                               partial[:, start:stop] if partial is not None else None, start, rows, mode=1,
                               upcast=upcast, precision=precision, loss_scale=scale, dummy=dummy,
                               write_grad=want_grads, **rows_layout)
        if want_grads:
            gs = grad_student.view(m, k)[start:stop]
            if kept_scale != 1.0:  # alpha on the fp32 accumulator, before the 16-bit store
                torch.addmm(gs, g, weight_c, beta=0, alpha=kept_scale, out=gs)
            else:
                torch.mm(g, weight_c, out=gs)
            rows_per_split = triton.cdiv(triton.cdiv(rows, splits), 128) * 128
            _grad_weight_kernel[
                lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]) * splits,)
            ](
                g, student, grad_weight, grad_bias if grad_bias is not None else grad_weight,
                rows, n, k,
                g.stride(0), g.stride(1), s_stride_m, student.stride(-1),
                start, tokens, s_stride_b, rows_per_split, m_bucket(rows_per_split), kept_scale,
                HAS_BIAS_GRAD=grad_bias is not None,
                ACCUMULATE=start > 0,
                UPCAST=upcast,
                INPUT_PRECISION=precision,
            )

    loss = None
    if reduction is not None:  # the kernels applied the reduction's scale
        if normalize:
            loss = row_loss if reduction == "none" else row_loss.sum()
        else:
            loss = partial.sum(dim=0) if reduction == "none" else partial.sum()
    return loss, grad_student, grad_weight, grad_bias


def _launch_projection(s, w, bias, t, out, row_scale, partial, row0, rows, *, mode, upcast, precision, loss_scale,
                       dummy, tokens, s_stride_b, s_stride_m, t_stride_b, t_stride_m, write_grad=False):
    k = s.shape[-1]
    n = w.shape[0]
    out_arg = out if out is not None else dummy
    _projection_loss_kernel[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    ](
        s, w,
        bias if bias is not None else dummy,
        t, out_arg,
        row_scale if row_scale is not None else dummy,
        partial if partial is not None else dummy,
        rows, n, k,
        s_stride_m, s.stride(-1), w.stride(0), w.stride(1), t_stride_m, t.stride(-1),
        out.stride(0) if out is not None else 0,
        partial.stride(0) if partial is not None else 0,
        row0, tokens, s_stride_b, t_stride_b, m_bucket(rows), loss_scale,
        MODE=mode,
        HAS_BIAS=bias is not None,
        WRITE_LOSS=partial is not None,
        WRITE_GRAD=write_grad,
        HAS_ROW_SCALE=row_scale is not None,
        UPCAST=upcast,
        INPUT_PRECISION=precision,
        PARTIAL_BLOCK_N=PARTIAL_BLOCK_N,
    )


# ----------------------------------------------------------------------------- torch backend


def _chunks_torch(
    student, weight, bias, target, normalize, eps, want_grads, row_scale, grad_scale=1.0
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token losses and (optionally) gradients, chunk by chunk, in plain PyTorch.

    student ``(M, D_s)``, weight ``(D_t, D_s)``, bias ``(D_t,)`` or None, target ``(M, D_t)``,
    row_scale ``(M,)`` or None (= ones).
    Returns ``row_loss (M,)`` = ``sum_c err^2`` per token (acc dtype), and with ``want_grads`` the
    gradients of ``grad_scale * sum_m row_scale[m] * row_loss[m]``: student ``(M, D_s)`` in student
    dtype, weight ``(D_t, D_s)`` and bias ``(D_t,)`` in the accumulation dtype (fp32, fp64 for fp64 inputs).
    """
    m, k = student.shape
    n = weight.shape[0]
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    # The projection runs in the student's dtype (as autocast would) and accumulates in `acc`.
    weight_acc = weight.to(student.dtype).to(acc)
    bias_acc = bias.to(acc) if bias is not None else None
    row_loss = torch.empty(m, dtype=acc, device=student.device)
    grad_student = grad_weight = grad_bias = None
    if want_grads:
        grad_student = torch.empty(m, k, dtype=student.dtype, device=student.device)
        grad_weight = torch.zeros(n, k, dtype=acc, device=student.device)
        grad_bias = torch.zeros(n, dtype=acc, device=student.device) if bias is not None else None

    chunk = chunk_tokens(m)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        s_chunk = student[start:stop].to(acc)
        projection = s_chunk @ weight_acc.T
        if bias_acc is not None:
            projection += bias_acc
        if normalize:
            p_hat, rstd_p, t_hat, _ = token_norm_rows_torch(projection, target[start:stop], eps, acc)
            diff = p_hat - t_hat
        else:
            diff = projection - target[start:stop].to(acc)
        row_loss[start:stop] = diff.square().sum(dim=-1)
        if not want_grads:
            continue
        grad = (2.0 * grad_scale) * diff
        if row_scale is not None:
            grad *= row_scale[start:stop].to(acc)[:, None]
        if normalize:
            grad = token_norm_input_grad(grad, p_hat, rstd_p)
        grad_student[start:stop] = grad @ weight_acc
        grad_weight += grad.T @ s_chunk
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0)
    return row_loss, grad_student, grad_weight, grad_bias


# ----------------------------------------------------------------------------- compiled backends (cpp, cuda)


def _chunks_compiled(
    student, weight, bias, target, normalize, eps, want_grads, row_scale, grad_scale=1.0
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole chunk loop in one call of the C++ op ``leap_kernels::feature_loss_chunks`` (csrc/ops.cpp).

    Same contract as :func:`_chunks_torch` (fp32 and 16-bit inputs only). ``grad_scale`` reaches the
    C++ loop as a per-token scale, so it applies before the 16-bit store of the student gradient.
    """
    if want_grads and grad_scale != 1.0:
        row_scale = (row_scale * grad_scale if row_scale is not None
                     else torch.full((student.shape[0],), grad_scale, dtype=torch.float32, device=student.device))
    default = DEFAULT_CPU_CHUNK_TOKENS if student.device.type == "cpu" else DEFAULT_CHUNK_TOKENS
    row_loss, grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.feature_loss_chunks(
        student, weight, bias, target, normalize, eps, want_grads, row_scale, chunk_tokens(student.shape[0], default)
    )
    if not want_grads:
        return row_loss, None, None, None
    return row_loss, grad_student, grad_weight, grad_bias if bias is not None else None


_CHUNK_LOOPS = {"torch": _chunks_torch, "cpp": _chunks_compiled, "cuda": _chunks_compiled}


def _select_backend(student, weight, bias, target, normalize) -> str:
    tensors = [t for t in (student, weight, bias, target) if t is not None]
    return _backends.select_backend("fused_feature_loss", tensors, row_width=weight.shape[0] if normalize else None)


def _kept_splits(backend: str, m: int, device: torch.device) -> int:
    """Token splits of the kept weight/bias gradients: the Triton loop's :func:`weight_grad_splits`;
    the other backends hand over their one gradient as a single split (no padding slices to add)."""
    return weight_grad_splits(m, device) if backend == "triton" else 1


def _run(student, weight, bias, target, normalize, eps, *, reduction, want_grads, row_scale=None, kept_scale=1.0):
    """Loss (None without ``reduction``) and the kept gradients of any backend, in the op's layout:
    ``(loss, grad_student (student's shape), grad_weight (splits, D_t, D_s), grad_bias (splits, D_t) or None)``,
    gradients of ``kept_scale * sum_m row_scale[m] row_loss[m]``."""
    backend = _select_backend(student, weight, bias, target, normalize)
    n = weight.shape[0]
    m = student.numel() // student.shape[-1]
    if backend == "triton":
        splits = _kept_splits(backend, m, student.device)
        return _forward_triton(student, weight, bias, target, normalize, eps, reduction=reduction,
                               want_grads=want_grads, row_scale=row_scale, splits=splits, kept_scale=kept_scale)
    # The other backends take (M, D) rows: a strided (B, N, D) view is copied here.
    row_loss, grad_student, grad_weight, grad_bias = _CHUNK_LOOPS[backend](
        _rows_2d(student), weight, bias, _rows_2d(target), normalize, eps, want_grads, row_scale, kept_scale
    )
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    loss = reduce_rows(row_loss.to(acc), reduction, n) if reduction is not None else None
    if not want_grads:
        return loss, None, None, None
    grad_bias = grad_bias.to(acc).unsqueeze(0) if grad_bias is not None else None
    return loss, grad_student.view(student.shape), grad_weight.to(acc).unsqueeze(0), grad_bias


# ----------------------------------------------------------------------------- torch.library ops


def _kept_outputs(student, weight, bias, target, normalize, compute_grads, acc_dtype):
    """Empty tensors shaped like the kept gradients (``(0,)`` each without ``compute_grads``)."""
    if not compute_grads:
        return student.new_empty(0), student.new_empty(0), student.new_empty(0)
    k = student.shape[-1]
    n = weight.shape[0]
    backend = _select_backend(student, weight, bias, target, normalize)
    splits = _kept_splits(backend, student.numel() // k, student.device)
    grad_student = student.new_empty(student.shape)
    grad_weight = student.new_empty((splits, n, k), dtype=acc_dtype)
    grad_bias = student.new_empty((splits, n) if bias is not None else (0,), dtype=acc_dtype)
    return grad_student, grad_weight, grad_bias


@torch.library.custom_op("leap_kernels::fused_feature_loss", mutates_args=())
def _fused_feature_loss_op(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    normalize: bool,
    reduction: str,
    eps: float,
    compute_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss, grad_student, grad_weight, grad_bias)``.

    student ``(M, D_s)`` or ``(B, N, D_s)`` (a strided token slice), target likewise with ``D_t``.
    The gradients are ``kept_grad_scale(student.dtype, D_t)`` times those of ``sum(row_loss)``:
    student in its shape and dtype, weight ``(splits, D_t, D_s)`` and bias ``(splits, D_t)`` per
    token split (``weight_grad_splits``; backward adds them), fp32 (fp64 for fp64 inputs); bias
    ``(0,)`` without bias; all ``(0,)`` when ``compute_grads`` is False.
    """
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    loss, grad_student, grad_weight, grad_bias = _run(
        student, weight, bias, target, normalize, eps, reduction=reduction, want_grads=compute_grads,
        kept_scale=kept_grad_scale(student.dtype, weight.shape[0]),
    )
    if not compute_grads:
        return (loss, *_kept_outputs(student, weight, bias, target, normalize, False, acc))
    if grad_bias is None:
        grad_bias = grad_weight.new_empty(0)
    return loss, grad_student, grad_weight, grad_bias


@_fused_feature_loss_op.register_fake
def _(student, weight, bias, target, normalize, reduction, eps, compute_grads):
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    m = student.numel() // student.shape[-1]
    loss = student.new_empty((m,) if reduction == "none" else (), dtype=acc)
    return (loss, *_kept_outputs(student, weight, bias, target, normalize, compute_grads, acc))


@torch.library.custom_op("leap_kernels::fused_feature_loss_backward", mutates_args=())
def _fused_feature_loss_backward_op(
    row_scale: torch.Tensor,
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    normalize: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recomputes the chunks with a per-token upstream gradient (``reduction="none"``); returns the
    gradients of ``sum_m row_scale[m] row_loss[m]`` in the layout of :func:`_fused_feature_loss_op`
    (no kept scale: ``row_scale`` carries the ``1/D_t`` of the per-token mean already)."""
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    _, grad_student, grad_weight, grad_bias = _run(
        student, weight, bias, target, normalize, eps, reduction=None, want_grads=True,
        row_scale=row_scale.to(acc).contiguous(),
    )
    if grad_bias is None:
        grad_bias = grad_weight.new_empty(0)
    return grad_student, grad_weight, grad_bias


@_fused_feature_loss_backward_op.register_fake
def _(row_scale, student, weight, bias, target, normalize, eps):
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    return _kept_outputs(student, weight, bias, target, normalize, True, acc)


@torch.library.custom_op("leap_kernels::feature_loss_rescale", mutates_args=())
def _rescale_op(
    grad_student: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    grad_output: Optional[torch.Tensor],
    scale: float,
    student_dtype: torch.dtype,
    weight_dtype: torch.dtype,
    bias_dtype: torch.dtype,
    need_student: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused loss's backward from the kept gradients, one Triton launch.

    ``f = grad_output * scale`` (``scale`` alone when ``grad_output`` is None), in fp32 (fp64 for fp64
    inputs); returns ``grad_student * f`` in ``student_dtype``, ``grad_weight.sum(0) * f`` ``(D_t, D_s)``
    in ``weight_dtype`` and ``grad_bias.sum(0) * f`` ``(D_t,)`` in ``bias_dtype`` (the split slices
    added in order); an output not asked for is ``(0,)``.

    Multiplying a 16-bit gradient by a 0-d 16-bit factor would round the factor first (a 1/(M*D_t)
    factor underflows to 0 in fp16 and loses up to 0.4% in bf16), and an fp32 copy would cost memory.
    """
    need_bias = need_bias and grad_bias.numel() > 0
    acc = accumulation_dtype(grad_weight.dtype, student_dtype)
    triton_ok = (acc == torch.float32 and HAS_TRITON
                 and all(d in (torch.float32, torch.bfloat16, torch.float16)
                         for d in (grad_student.dtype, student_dtype, weight_dtype, bias_dtype))
                 and (grad_output is None or grad_output.dtype in (torch.float32, torch.bfloat16, torch.float16)))
    if triton_ok and _backends.select_backend("scale_cast", [grad_weight]) == "triton":
        return _rescale_triton(grad_student, grad_weight, grad_bias, grad_output, scale, student_dtype, weight_dtype,
                               bias_dtype, need_student, need_weight, need_bias)
    factor = grad_output.to(acc) * scale if grad_output is not None else scale

    def empty(dtype):  # one each: outputs must not alias
        return grad_weight.new_empty(0, dtype=dtype)

    out_student = (grad_student.to(acc) * factor).to(student_dtype) if need_student else empty(student_dtype)
    out_weight = (grad_weight.sum(0) * factor).to(weight_dtype) if need_weight else empty(weight_dtype)
    out_bias = (grad_bias.sum(0) * factor).to(bias_dtype) if need_bias else empty(bias_dtype)
    return out_student, out_weight, out_bias


def _rescale_triton(grad_student, grad_weight, grad_bias, grad_output, scale, student_dtype, weight_dtype, bias_dtype,
                    need_student, need_weight, need_bias):
    device = grad_weight.device
    splits, n, k = grad_weight.shape
    grad_student = grad_student.contiguous()  # the kept gradient is: no copy
    out_student = torch.empty(grad_student.shape if need_student else (0,), dtype=student_dtype, device=device)
    out_weight = torch.empty((n, k) if need_weight else (0,), dtype=weight_dtype, device=device)
    out_bias = torch.empty((n,) if need_bias else (0,), dtype=bias_dtype, device=device)
    n_s, n_w, n_b = out_student.numel(), out_weight.numel(), out_bias.numel()
    block = ELEMENTWISE_BLOCK
    programs = triton.cdiv(n_s, block) + triton.cdiv(n_w, block) + triton.cdiv(n_b, block)
    if programs:
        _rescale_kernel[(programs,)](
            grad_student, grad_weight, grad_bias if grad_bias.numel() else grad_weight,
            grad_output if grad_output is not None else grad_weight,
            out_student, out_weight, out_bias,
            n_s, n_w, n_b, splits, scale,
            HAS_GRAD_OUT=grad_output is not None,
            BLOCK=block,
        )
    return out_student, out_weight, out_bias


@_rescale_op.register_fake
def _(grad_student, grad_weight, grad_bias, grad_output, scale, student_dtype, weight_dtype, bias_dtype,
      need_student, need_weight, need_bias):
    need_bias = need_bias and grad_bias.numel() > 0
    _, n, k = grad_weight.shape
    new = grad_weight.new_empty
    return (new(grad_student.shape if need_student else (0,), dtype=student_dtype),
            new((n, k) if need_weight else (0,), dtype=weight_dtype),
            new((n,) if need_bias else (0,), dtype=bias_dtype))


def _setup_context(ctx, inputs, output):
    student, weight, bias, target, normalize, reduction, eps, compute_grads = inputs
    _, grad_student, grad_weight, grad_bias = output
    ctx.set_materialize_grads(False)  # the kept-gradient outputs get no gradient: no zero tensors for them
    ctx.reduction = reduction
    ctx.normalize = normalize
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.dtypes = (student.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
    ctx.shape = (student.numel() // student.shape[-1], weight.shape[0])
    if reduction == "none":
        ctx.save_for_backward(student, weight, bias, target)
    else:
        ctx.save_for_backward(grad_student, grad_weight, grad_bias)


@torch.library.custom_op("leap_kernels::scale_cast", mutates_args=())
def _scale_cast_op(x: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(x * factor).to(dtype)`` with the product in fp32 (fp64 for fp64 inputs).

    ``x * factor`` on a 16-bit ``x`` with a 0-d device ``factor`` would first round the factor to 16
    bits (a 1/(M*D_t) factor underflows to 0 in fp16 and loses up to 0.4% in bf16), and an fp32 copy
    of ``x`` would cost memory. (The fused loss's backward uses ``feature_loss_rescale``, which does
    this for its three gradients in one launch.)
    """
    acc = accumulation_dtype(x.dtype, factor.dtype, dtype)
    x = x.contiguous()
    backend = _backends.select_backend("scale_cast", [x])
    if backend == "triton" and x.numel() and acc == torch.float32 and dtype in (torch.float32, torch.bfloat16,
                                                                                torch.float16):
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        n = x.numel()
        _scale_cast_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](x, factor.to(torch.float32).reshape(1), out, n,
                                                                 BLOCK=ELEMENTWISE_BLOCK)
        return out
    return (x.to(acc) * factor.to(acc)).to(dtype)


@_scale_cast_op.register_fake
def _(x, factor, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _backward(ctx, grad_loss, _grad_student, _grad_weight, _grad_bias):
    need_student, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    if grad_loss is None or not (need_student or need_weight or need_bias):
        return None, None, None, None, None, None, None, None
    student_dtype, weight_dtype, bias_dtype = ctx.dtypes
    m, n = ctx.shape
    if ctx.reduction == "none":
        student, weight, bias, target = ctx.saved_tensors
        grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.fused_feature_loss_backward(
            row_grad_scale(grad_loss, "none", m, n), student, weight, bias, target, ctx.normalize, ctx.eps
        )
        grad_output, scale = None, 1.0
    else:
        grad_student, grad_weight, grad_bias = ctx.saved_tensors
        if grad_student.numel() == 0 and m > 0:
            raise RuntimeError(
                "fused_feature_loss: backward reached a loss computed without gradients; this happens when "
                "the forward ran with grad disabled or no input required grad"
            )
        grad_output = grad_loss
        scale = (1.0 / (m * n) if ctx.reduction == "mean" else 1.0) / kept_grad_scale(student_dtype, n)
    out_student, out_weight, out_bias = torch.ops.leap_kernels.feature_loss_rescale(
        grad_student, grad_weight, grad_bias, grad_output, scale, student_dtype, weight_dtype, bias_dtype,
        need_student, need_weight, need_bias,
    )
    return (out_student if need_student else None, out_weight if need_weight else None,
            out_bias if need_bias else None, None, None, None, None, None)


_fused_feature_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def fused_feature_loss(
    student: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    *,
    normalize: bool = False,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Projection + MSE (or token-normalized MSE), forward and backward fused.

    ``P = student @ weight.T + bias``;
    ``normalize=False``: ``loss = mean((P - target)^2)`` (the LEAP paper's loss);
    ``normalize=True``: ``loss = mean((LN(P) - LN(target))^2)``, LN per token over channels,
    no affine, ``eps`` inside the square root.

    Args:
        student: ``(..., D_s)`` student features (fp32, bf16 or fp16). A token slice such as
            ``x[:, prefix:]`` of a ``(B, N, D_s)`` tensor is read in place by the Triton kernels.
        weight: ``(D_t, D_s)`` projection weight, ``nn.Linear`` layout.
        bias: ``(D_t,)`` or None.
        target: ``(..., D_t)`` teacher features, same leading dims; a constant (must not
            require grad: pass ``target.detach()``).
        normalize: token-normalized MSE instead of plain MSE.
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (``(...)``: per-token
            loss, mean over channels).
        eps: variance epsilon of the token normalization.

    Returns:
        The fp32 loss (fp64 for float64 inputs). Gradients flow to ``student``, ``weight`` and
        ``bias`` in their own dtypes. The projection runs in ``student.dtype`` (weight and bias
        are cast to it, as autocast does) with fp32 accumulation; the ``(M, D_t)`` projection is
        never materialized nor kept for backward (the token-normalized loss holds one chunk of it
        in ``student.dtype``).

    Example::

        >>> head = torch.nn.Linear(384, 1536)
        >>> loss = fused_feature_loss(student_tokens, head.weight, head.bias, teacher_tokens.detach())
        >>> loss.backward()
    """
    _checks.check_feature_loss_inputs(student, weight, bias, target, reduction, eps)
    _checks.check_normalize(normalize)
    lead_shape = student.shape[:-1]
    student_rows, target_rows = token_rows(student), token_rows(target)
    compute_grads = (
        reduction != "none"
        and torch.is_grad_enabled()
        and (student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    )
    loss, _, _, _ = _fused_feature_loss_op(
        student_rows, weight, bias, target_rows, bool(normalize), reduction, float(eps), compute_grads
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss
