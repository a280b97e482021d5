"""Fused feature loss: projection ``student @ weight.T + bias`` followed by MSE or
token-normalized MSE against the teacher's features, forward and backward fused.

Room layout: Triton kernels (projection GEMM with a loss epilogue; weight/bias
gradient GEMM) -> the chunk loop of each backend (Triton and torch here; cpp and cuda:
one call of the C++ loop in csrc/ops.cpp) -> torch.library ops with fake
implementations and autograd -> functional API.

How it saves memory (the idea of Liger's fused linear cross-entropy, for a
regression loss): tokens are processed in chunks; for each chunk the projection is
formed, turned into the loss and into ``G = dL/dP`` right away, and ``G`` is
consumed by the gradient GEMMs before the next chunk. The full ``(M, D_t)``
projection never exists and nothing of that size is kept for backward. For
``reduction="mean"|"sum"`` the gradients are finished in the forward pass and the
backward only rescales them by ``grad_output``; ``reduction="none"`` (a per-token
upstream gradient) recomputes the chunks in backward instead.

The gradients kept between forward and backward are those of ``sum(row_loss)``
(no ``1/numel`` factor), so that 16-bit storage does not underflow; the mean's scale
is applied in fp32 when backward rescales them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _backends, _checks
from ._triton_common import HAS_TRITON, INTERPRETED, accumulation_dtype, dot_precision, upcast_dot
from ._rows import reduce_rows, row_grad_scale, token_norm_input_grad, token_norm_rows_torch, token_norm_rows_triton

ENV_CHUNK_TOKENS = "LEAP_KERNELS_CHUNK_TOKENS"
DEFAULT_CHUNK_TOKENS = 8192
# The C++ CPU loop, measured at M = 8192, 384 -> 1536 on 2 cores: smaller chunks run the GEMMs slower
# (1024 tokens: 1.5x the time of 8192), and 8192 raises the peak from 43 MB to 62 MB (eager: 192 MB).
DEFAULT_CPU_CHUNK_TOKENS = 4096


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


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _gemm_configs(interpreted: bool, **extra):
        if interpreted:  # the interpreter accepts one config; big tiles mean few programs
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, **extra}, num_warps=4)]
        # No 128x256 tile: it spills registers with the MSE epilogue (bench/compile_check.py, sm_90).
        shapes = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes
        ]

    @triton.autotune(
        configs=_gemm_configs(INTERPRETED, GROUP_M=8),
        key=["N", "K", "MODE", "WRITE_GRAD"],
        restore_value=["PARTIAL_LOSS"],  # tiles of another width leave other rows behind
    )
    @triton.jit
    def _projection_loss_kernel(
        S, W, BIAS, T, OUT, ROW_SCALE, PARTIAL_LOSS,
        M, N, K,
        stride_sm, stride_sk, stride_wn, stride_wk, stride_tm, stride_tn, stride_om,
        MODE: tl.constexpr,  # 0: store the fp32 projection; 1: MSE epilogue
        HAS_BIAS: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """P = S @ W^T + bias for one (BLOCK_M, BLOCK_N) tile, then the epilogue.

        MODE 1 writes the tile's per-row partial sums of (P - T)^2 to PARTIAL_LOSS[pid_n, :]
        (summed on the host: deterministic, no atomics) and, with WRITE_GRAD, G = 2 (P - T).
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

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + offs_k) < K
            s = tl.load(
                S + offs_m64[:, None] * stride_sm + (k0 + offs_k)[None, :] * stride_sk,
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
            tl.store(out_ptrs, acc, mask=mask)
        else:
            t = tl.load(T + offs_m64[:, None] * stride_tm + offs_n[None, :] * stride_tn, mask=mask, other=0.0)
            residual = tl.where(mask, acc - t.to(tl.float32), 0.0)
            tl.store(PARTIAL_LOSS + pid_n * M + offs_m, tl.sum(residual * residual, axis=1), mask=m_mask)
            if WRITE_GRAD:
                if HAS_ROW_SCALE:
                    row_scale = tl.load(ROW_SCALE + offs_m, mask=m_mask, other=0.0)
                    grad = (2.0 * row_scale)[:, None] * residual
                else:
                    grad = 2.0 * residual
                tl.store(out_ptrs, grad.to(OUT.dtype.element_ty), mask=mask)

    @triton.autotune(
        configs=_gemm_configs(INTERPRETED),
        key=["N", "K", "HAS_BIAS_GRAD"],
        restore_value=["GRAD_W", "GRAD_B"],  # the kernel accumulates: autotuning must not
    )
    @triton.jit
    def _grad_weight_kernel(
        G, S, GRAD_W, GRAD_B,
        M, N, K,
        stride_gm, stride_gn, stride_sm, stride_sk, stride_wn,
        HAS_BIAS_GRAD: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """GRAD_W[n, k] += sum_m G[m, n] S[m, k] in fp32; GRAD_B[n] += sum_m G[m, n].

        Accumulating into fp32 buffers across chunks keeps fp16 sums over many tokens
        from overflowing and needs no temporary.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        k_mask = offs_k < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = (m0 + offs_m).to(tl.int64)
            m_mask = (m0 + offs_m) < M
            g_t = tl.load(G + rows[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                          mask=n_mask[:, None] & m_mask[None, :], other=0.0)
            s = tl.load(S + rows[:, None] * stride_sm + offs_k[None, :] * stride_sk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if HAS_BIAS_GRAD:
                bias_acc += tl.sum(g_t.to(tl.float32), axis=1)
            if UPCAST:
                g_t = g_t.to(tl.float32)
                s = s.to(tl.float32)
            acc = tl.dot(g_t, s, acc, input_precision=INPUT_PRECISION)
        w_ptrs = GRAD_W + offs_n[:, None] * stride_wn + offs_k[None, :]
        w_mask = n_mask[:, None] & k_mask[None, :]
        tl.store(w_ptrs, tl.load(w_ptrs, mask=w_mask, other=0.0) + acc, mask=w_mask)
        if HAS_BIAS_GRAD:
            if pid_k == 0:
                old = tl.load(GRAD_B + offs_n, mask=n_mask, other=0.0)
                tl.store(GRAD_B + offs_n, old + bias_acc, mask=n_mask)


    @triton.jit
    def _scale_cast_kernel(X, FACTOR, OUT, n, BLOCK: tl.constexpr):
        """OUT = X * FACTOR in fp32, stored in OUT's dtype (FACTOR: a 0-d fp32 tensor on the device)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        factor = tl.load(FACTOR).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (x * factor).to(OUT.dtype.element_ty), mask=mask)


def _grid_projection(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _chunks_triton(
    student, weight, bias, target, normalize, eps, want_grads, row_scale
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Triton chunk loop. See :func:`_chunks_torch` for the contract."""
    m, k = student.shape
    n = weight.shape[0]
    device = student.device
    compute_dtype = student.dtype
    weight_c = weight.to(compute_dtype)  # no copy in the common case of matching dtypes
    bias_c = bias.to(torch.float32).contiguous() if bias is not None else None
    upcast, precision = upcast_dot(compute_dtype), dot_precision(compute_dtype)

    row_loss = torch.empty(m, dtype=torch.float32, device=device)
    grad_student = grad_weight = grad_bias = None
    if want_grads:
        grad_student = torch.empty(m, k, dtype=compute_dtype, device=device)
        grad_weight = torch.zeros(n, k, dtype=torch.float32, device=device)
        grad_bias = torch.zeros(n, dtype=torch.float32, device=device) if bias is not None else None

    chunk = chunk_tokens(m)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        rows = stop - start
        s_chunk, t_chunk = student[start:stop], target[start:stop]
        scale_chunk = row_scale[start:stop] if row_scale is not None else None
        grad_proj = torch.empty(rows, n, dtype=compute_dtype, device=device) if want_grads else None
        if normalize:
            projection = torch.empty(rows, n, dtype=torch.float32, device=device)
            _launch_projection(s_chunk, weight_c, bias_c, t_chunk, projection, None, None, mode=0,
                               upcast=upcast, precision=precision)
            token_norm_rows_triton(projection, t_chunk, eps, row_scale=scale_chunk,
                                   row_loss=row_loss[start:stop], grad_x=grad_proj)
            del projection
        else:
            # One row of partial sums per column tile; the widest config's tile count bounds it.
            partial = torch.zeros(triton.cdiv(n, 64), rows, dtype=torch.float32, device=device)
            out = grad_proj if want_grads else torch.empty(1, 1, dtype=compute_dtype, device=device)
            _launch_projection(s_chunk, weight_c, bias_c, t_chunk, out, scale_chunk, partial, mode=1,
                               upcast=upcast, precision=precision, write_grad=want_grads)
            row_loss[start:stop] = partial.sum(dim=0)
        if want_grads:
            torch.mm(grad_proj, weight_c, out=grad_student[start:stop])
            _grad_weight_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))](
                grad_proj, s_chunk, grad_weight, grad_bias if grad_bias is not None else grad_weight,
                rows, n, k,
                grad_proj.stride(0), grad_proj.stride(1), s_chunk.stride(0), s_chunk.stride(1), grad_weight.stride(0),
                HAS_BIAS_GRAD=grad_bias is not None,
                UPCAST=upcast,
                INPUT_PRECISION=precision,
            )
    return row_loss, grad_student, grad_weight, grad_bias


def _launch_projection(s, w, bias, t, out, row_scale, partial, *, mode, upcast, precision, write_grad=False):
    m, k = s.shape
    n = w.shape[0]
    dummy = out
    _projection_loss_kernel[_grid_projection(m, n)](
        s, w,
        bias if bias is not None else dummy,
        t, out,
        row_scale if row_scale is not None else dummy,
        partial if partial is not None else dummy,
        m, n, k,
        s.stride(0), s.stride(1), w.stride(0), w.stride(1), t.stride(0), t.stride(1), out.stride(0),
        MODE=mode,
        HAS_BIAS=bias is not None,
        WRITE_GRAD=write_grad,
        HAS_ROW_SCALE=row_scale is not None,
        UPCAST=upcast,
        INPUT_PRECISION=precision,
    )


# ----------------------------------------------------------------------------- torch backend


def _chunks_torch(
    student, weight, bias, target, normalize, eps, want_grads, row_scale
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-token losses and (optionally) gradients, chunk by chunk, in plain PyTorch.

    student ``(M, D_s)``, weight ``(D_t, D_s)``, bias ``(D_t,)`` or None, target ``(M, D_t)``,
    row_scale ``(M,)`` or None (= ones).
    Returns ``row_loss (M,)`` = ``sum_c err^2`` per token (acc dtype), and with ``want_grads`` the
    gradients of ``sum_m row_scale[m] * row_loss[m]``: student ``(M, D_s)`` in student dtype, weight
    ``(D_t, D_s)`` and bias ``(D_t,)`` in the accumulation dtype (fp32, fp64 for fp64 inputs).
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
        grad = 2.0 * diff
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
    student, weight, bias, target, normalize, eps, want_grads, row_scale
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The whole chunk loop in one call of the C++ op ``leap_kernels::feature_loss_chunks`` (csrc/ops.cpp).

    Same contract as :func:`_chunks_torch` (fp32 and 16-bit inputs only).
    """
    default = DEFAULT_CPU_CHUNK_TOKENS if student.device.type == "cpu" else DEFAULT_CHUNK_TOKENS
    row_loss, grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.feature_loss_chunks(
        student, weight, bias, target, normalize, eps, want_grads, row_scale, chunk_tokens(student.shape[0], default)
    )
    if not want_grads:
        return row_loss, None, None, None
    return row_loss, grad_student, grad_weight, grad_bias if bias is not None else None


_CHUNK_LOOPS = {"triton": _chunks_triton, "torch": _chunks_torch, "cpp": _chunks_compiled, "cuda": _chunks_compiled}


def _run_chunks(student, weight, bias, target, normalize, eps, want_grads, row_scale=None):
    tensors = [t for t in (student, weight, bias, target) if t is not None]
    backend = _backends.select_backend("fused_feature_loss", tensors, row_width=weight.shape[0] if normalize else None)
    return _CHUNK_LOOPS[backend](student, weight, bias, target, normalize, eps, want_grads, row_scale)


# ----------------------------------------------------------------------------- torch.library ops


def _empty_like_outputs(student, weight, bias, compute_grads, acc_dtype):
    if not compute_grads:
        empty = student.new_empty(0)
        return empty, empty.clone(), empty.clone()
    m, k = student.shape
    n = weight.shape[0]
    grad_student = student.new_empty((m, k))
    grad_weight = student.new_empty((n, k), dtype=acc_dtype)
    grad_bias = student.new_empty((n,) if bias is not None else (0,), dtype=acc_dtype)
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

    The three gradients are those of ``sum(row_loss)`` (empty when ``compute_grads`` is False).
    """
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    row_loss, grad_student, grad_weight, grad_bias = _run_chunks(
        student, weight, bias, target, normalize, eps, compute_grads
    )
    loss = reduce_rows(row_loss.to(acc), reduction, weight.shape[0])
    if not compute_grads:
        return (loss, *_empty_like_outputs(student, weight, bias, False, acc))
    if grad_bias is None:
        grad_bias = grad_weight.new_empty(0)
    return loss, grad_student, grad_weight.to(acc), grad_bias.to(acc)


@_fused_feature_loss_op.register_fake
def _(student, weight, bias, target, normalize, reduction, eps, compute_grads):
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    loss = student.new_empty((student.shape[0],) if reduction == "none" else (), dtype=acc)
    return (loss, *_empty_like_outputs(student, weight, bias, compute_grads, acc))


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
    """Recomputes the chunks with a per-token upstream gradient (``reduction="none"``)."""
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    _, grad_student, grad_weight, grad_bias = _run_chunks(
        student, weight, bias, target, normalize, eps, True, row_scale.to(acc).contiguous()
    )
    if grad_bias is None:
        grad_bias = grad_weight.new_empty(0)
    return grad_student, grad_weight.to(acc), grad_bias.to(acc)


@_fused_feature_loss_backward_op.register_fake
def _(row_scale, student, weight, bias, target, normalize, eps):
    acc = accumulation_dtype(student.dtype, weight.dtype, target.dtype)
    return _empty_like_outputs(student, weight, bias, True, acc)


def _setup_context(ctx, inputs, output):
    student, weight, bias, target, normalize, reduction, eps, compute_grads = inputs
    _, grad_student, grad_weight, grad_bias = output
    ctx.reduction = reduction
    ctx.normalize = normalize
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.dtypes = (student.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.shape = (student.shape[0], weight.shape[0])
    if reduction == "none":
        ctx.save_for_backward(student, weight, bias, target)
    else:
        ctx.save_for_backward(grad_student, grad_weight, grad_bias)


@torch.library.custom_op("leap_kernels::scale_cast", mutates_args=())
def _scale_cast_op(x: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(x * factor).to(dtype)`` with the product in fp32 (fp64 for fp64 inputs).

    The backward rescale of the fused loss: ``x * factor`` on a 16-bit ``x`` with a 0-d device
    ``factor`` would first round the factor to 16 bits (a 1/(M*D_t) factor underflows to 0 in fp16
    and loses up to 0.4% in bf16), and an fp32 copy of ``x`` would cost memory.
    """
    acc = accumulation_dtype(x.dtype, factor.dtype, dtype)
    x = x.contiguous()
    backend = _backends.select_backend("scale_cast", [x])
    if backend == "triton" and x.numel() and acc == torch.float32 and dtype in (torch.float32, torch.bfloat16,
                                                                                torch.float16):
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        n = x.numel()
        block = 65536 if INTERPRETED else 4096
        _scale_cast_kernel[(triton.cdiv(n, block),)](x, factor.to(torch.float32).reshape(1), out, n, BLOCK=block)
        return out
    return (x.to(acc) * factor.to(acc)).to(dtype)


@_scale_cast_op.register_fake
def _(x, factor, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _backward(ctx, grad_loss, _grad_student, _grad_weight, _grad_bias):
    student_dtype, weight_dtype, bias_dtype = ctx.dtypes
    m, n = ctx.shape
    if ctx.reduction == "none":
        student, weight, bias, target = ctx.saved_tensors
        grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.fused_feature_loss_backward(
            row_grad_scale(grad_loss, "none", m, n), student, weight, bias, target, ctx.normalize, ctx.eps
        )
        factor = None
    else:
        grad_student, grad_weight, grad_bias = ctx.saved_tensors
        if grad_student.numel() == 0 and m > 0:
            raise RuntimeError(
                "fused_feature_loss: backward reached a loss computed without gradients; this happens when "
                "the forward ran with grad disabled or no input required grad"
            )
        scale = 1.0 / (m * n) if ctx.reduction == "mean" else 1.0
        factor = grad_loss.to(grad_weight.dtype) * scale
    need_student, need_weight, need_bias = ctx.needs_input_grad[:3]
    if factor is None:
        out_student = grad_student.to(student_dtype) if need_student else None
        out_weight = grad_weight.to(weight_dtype) if need_weight else None
        out_bias = grad_bias.to(bias_dtype) if (need_bias and ctx.has_bias) else None
    else:
        out_student = _scale_cast_op(grad_student, factor, student_dtype) if need_student else None
        out_weight = _scale_cast_op(grad_weight, factor, weight_dtype) if need_weight else None
        out_bias = _scale_cast_op(grad_bias, factor, bias_dtype) if (need_bias and ctx.has_bias) else None
    return out_student, out_weight, out_bias, None, None, None, None, None


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
        student: ``(..., D_s)`` student features (fp32, bf16 or fp16).
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
        never materialized in fp32 nor kept for backward.

    Example::

        >>> head = torch.nn.Linear(384, 1536)
        >>> loss = fused_feature_loss(student_tokens, head.weight, head.bias, teacher_tokens.detach())
        >>> loss.backward()
    """
    _checks.check_feature_loss_inputs(student, weight, bias, target, reduction, eps)
    _checks.check_normalize(normalize)
    lead_shape = student.shape[:-1]
    student_2d = student.reshape(-1, student.shape[-1])
    target_2d = target.reshape(-1, target.shape[-1])
    compute_grads = (
        reduction != "none"
        and torch.is_grad_enabled()
        and (student.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    )
    loss, _, _, _ = _fused_feature_loss_op(
        student_2d, weight, bias, target_2d, bool(normalize), reduction, float(eps), compute_grads
    )
    return loss.reshape(lead_shape) if reduction == "none" else loss
