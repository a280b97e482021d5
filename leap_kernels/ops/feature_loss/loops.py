"""Host side of the fused feature loss: the chunk loop of each backend.

- :func:`forward_triton`: the Triton loop (``_projection_loss_kernel`` -> cuBLAS ``dS = G W`` ->
  ``_grad_weight_kernel`` per chunk; kernels in :mod:`.triton`);
- :func:`chunks_torch`: the same chunk loop in plain PyTorch (the readable reference and fallback);
- :func:`chunks_compiled`: one call of the C++ loop ``leap_kernels::feature_loss_chunks``
  (csrc/ops.cpp) for the ``cpp`` and ``cuda`` backends;
- :func:`run`: the loop of a given backend, returning the kept gradients in the op's layout.

The backward of ``reduction="mean"|"sum"`` (a rescale of the kept gradients) is :mod:`.rescale`.

A call is described by two small frozen dataclasses: :class:`Operands` (the tensors) and
:class:`LossOptions` (what to compute). The backend is chosen once by the caller (see
:mod:`leap_kernels.ops.feature_loss`) and handed in by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable

import torch

from .._rows import RowBuffers, layer_norm_rows, layer_norm_rows_backward, reduce_rows, token_norm_rows_triton
from .._triton_common import HAS_TRITON, INTERPRETED, accumulation_dtype, dot_precision, m_bucket, upcast_dot

if HAS_TRITON:
    import triton

    from .triton import PARTIAL_BLOCK_N, _grad_weight_kernel, _projection_loss_kernel

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
# The torch backend on a CPU: its elementwise steps are separate fp32 passes over (chunk, D_t) buffers, which
# run from the last-level cache only for small chunks. Measured at M = 8192, 384 -> 1536 on 2 cores (ms,
# forward+backward, token-normalized / plain), chunk 1024 against 4096: fp32 195 / 177 against 239 / 192,
# bf16 GEMMs 120 / 103 against 174 / 133 (eager: 347 / 256 fp32, 134 / 127 bf16).
DEFAULT_TORCH_CPU_CHUNK_TOKENS = 1024

# Weight-gradient splits over tokens: enough CTAs for a whole H100/H200 (72 column tiles x 8 = 576 for
# 1536 x 384), at least this many tokens per split so that the fp32 tile write stays small next to the
# reads, and a (splits, D_t, D_s) fp32 workspace of at most 8 weight gradients.
MIN_ROWS_PER_SPLIT = 2048
MAX_WEIGHT_GRAD_SPLITS = 8

ELEMENTWISE_BLOCK = 65536 if INTERPRETED else 4096  # the interpreter runs programs one after another

#: ``(loss, grad_student, grad_weight, grad_bias)`` of a chunk loop (None where not computed).
LoopResult = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

ENV_CPU_16BIT_GEMM = "LEAP_KERNELS_CPU_BF16_GEMM"


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    """AVX512-BF16 or AMX: oneDNN's bf16 GEMM then runs about 2.4x faster than its fp32 GEMM (measured on
    a 2-core Zen 4 at the fused loss's shapes). Without them a bf16 GEMM is emulated, slower than fp32."""
    if os.environ.get(ENV_CPU_16BIT_GEMM, "1") == "0":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # a capability query that fails means "unknown": keep the fp32 GEMMs
        return False


def cpu_16bit_gemm(student: torch.Tensor) -> bool:
    """Whether a CPU loop runs its GEMMs in bf16 (fp32 accumulation, bf16 outputs, as eager PyTorch does)
    instead of on fp32 copies: bf16 inputs on a CPU with native bf16 dot products
    (``LEAP_KERNELS_CPU_BF16_GEMM=0`` keeps fp32 GEMMs everywhere)."""
    return student.device.type == "cpu" and student.dtype == torch.bfloat16 and _cpu_has_bf16_dot()


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
    """Number of token slices whose weight/bias gradients the Triton loop keeps apart until backward.

    A function of the shape and device only. CPU tensors without the Triton interpreter never reach
    the Triton kernels: one (the C++ loop's layout).
    """
    if device.type == "cpu" and not INTERPRETED:
        return 1
    return max(1, min(MAX_WEIGHT_GRAD_SPLITS, m // MIN_ROWS_PER_SPLIT))


def kept_splits(backend: str, m: int, device: torch.device) -> int:
    """Token splits of the kept weight/bias gradients of ``backend``: the Triton loop's
    :func:`weight_grad_splits`; the other backends hand over their one gradient as a single split
    (no padding slices to add). A function of the backend's name and the shape: the fake
    implementations use it without choosing a backend."""
    return weight_grad_splits(m, device) if backend == "triton" else 1


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


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``(M, D)`` rows of ``x``: a view of a 2-D tensor, a reshape (copy if needed) of ``(B, N, D)``."""
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


# ----------------------------------------------------------------------------- what a call computes


@dataclasses.dataclass(frozen=True, eq=False)
class Operands:
    """The tensors of one call: student ``(M, D_s)`` or ``(B, N, D_s)`` (any strides), weight
    ``(D_t, D_s)``, bias ``(D_t,)`` or None, target ``(M, D_t)`` or ``(B, N, D_t)``."""

    student: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor

    @property
    def m(self) -> int:
        """Tokens."""
        return self.student.numel() // self.student.shape[-1]

    @property
    def k(self) -> int:
        """Student channels ``D_s``."""
        return int(self.student.shape[-1])

    @property
    def n(self) -> int:
        """Teacher channels ``D_t``."""
        return int(self.weight.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.student, self.weight, self.bias, self.target) if t is not None]

    def acc_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.student.dtype, self.weight.dtype, self.target.dtype)

    def as_rows(self) -> Operands:
        """The same operands with ``(M, D)`` student and target (a strided ``(B, N, D)`` view is copied)."""
        return dataclasses.replace(self, student=rows_2d(self.student), target=rows_2d(self.target))


@dataclasses.dataclass(frozen=True, eq=False)
class LossOptions:
    """What a chunk loop computes.

    ``reduction``: ``"mean"``, ``"sum"`` or ``"none"`` for the loss, None for no loss (the recomputing
    backward); with ``want_grads`` the gradients of ``kept_scale * sum_m row_scale[m] row_loss[m]``
    (``row_scale``: an ``(M,)`` fp32 per-token weight, None for ones).
    """

    normalize: bool
    eps: float
    reduction: str | None = None
    want_grads: bool = True
    row_scale: torch.Tensor | None = None
    kept_scale: float = 1.0


# ----------------------------------------------------------------------------- Triton loop


def _token_layout(student: torch.Tensor, target: torch.Tensor) -> int:
    """Tokens per sample of the ``(B, N, D)`` inputs (``M`` when both are 2-D ``(M, D)``)."""
    for x in (student, target):
        if x.dim() == 3:
            return int(x.shape[1])
    return int(student.shape[0])


def _row_strides(x: torch.Tensor, tokens: int) -> tuple[int, int]:
    """(stride_b, stride_m) of ``x``'s token rows in a ``(B, tokens, D)`` view."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1)
    return tokens * x.stride(0), x.stride(0)


@dataclasses.dataclass(frozen=True, eq=False)
class _TritonCall:
    """What every launch of one call of the Triton loop shares: the operands (weight in the compute
    dtype), the token-row addressing of student and target, the dot settings and the loss scale."""

    student: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    tokens: int
    s_strides: tuple[int, int]  # (stride_b, stride_m)
    t_strides: tuple[int, int]
    upcast: bool
    precision: str
    loss_scale: float
    dummy: torch.Tensor  # any tensor, for pointer arguments a launch does not use


def _launch_projection(
    call: _TritonCall,
    start: int,
    rows: int,
    out: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    partial: torch.Tensor | None,
    *,
    mode: int,
    write_grad: bool = False,
) -> None:
    s, w, t, dummy = call.student, call.weight, call.target, call.dummy
    k, n = s.shape[-1], w.shape[0]
    _projection_loss_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        s,
        w,
        call.bias if call.bias is not None else dummy,
        t,
        out if out is not None else dummy,
        row_scale if row_scale is not None else dummy,
        partial if partial is not None else dummy,
        rows,
        n,
        k,
        call.s_strides[1],
        s.stride(-1),
        w.stride(0),
        w.stride(1),
        call.t_strides[1],
        t.stride(-1),
        out.stride(0) if out is not None else 0,
        partial.stride(0) if partial is not None else 0,
        start,
        call.tokens,
        call.s_strides[0],
        call.t_strides[0],
        m_bucket(rows),
        call.loss_scale,
        MODE=mode,
        HAS_BIAS=call.bias is not None,
        WRITE_LOSS=partial is not None,
        WRITE_GRAD=write_grad,
        HAS_ROW_SCALE=row_scale is not None,
        UPCAST=call.upcast,
        INPUT_PRECISION=call.precision,
        PARTIAL_BLOCK_N=PARTIAL_BLOCK_N,
    )


def _launch_grad_weight(
    call: _TritonCall,
    g: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor | None],
    start: int,
    splits: int,
    kept_scale: float,
) -> None:
    """``grads = (grad_weight (splits, D_t, D_s), grad_bias (splits, D_t) or None)`` get this chunk's
    ``G^T S`` and ``sum G`` (added to the previous chunks' for ``start > 0``)."""
    grad_weight, grad_bias = grads
    s = call.student
    rows, n = g.shape
    k = s.shape[-1]
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), 128) * 128
    _grad_weight_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]) * splits,)](
        g,
        s,
        grad_weight,
        grad_bias if grad_bias is not None else grad_weight,
        rows,
        n,
        k,
        g.stride(0),
        g.stride(1),
        call.s_strides[1],
        s.stride(-1),
        start,
        call.tokens,
        call.s_strides[0],
        m_bucket(rows_per_split),
        kept_scale,
        ROWS_PER_SPLIT=rows_per_split,
        HAS_BIAS_GRAD=grad_bias is not None,
        ACCUMULATE=start > 0,
        UPCAST=call.upcast,
        INPUT_PRECISION=call.precision,
    )


def _loss_slots(n: int) -> int:
    return triton.cdiv(n, PARTIAL_BLOCK_N)


def forward_triton(ops: Operands, opts: LossOptions, splits: int) -> LoopResult:
    """The Triton chunk loop on ``ops`` (strided ``(B, N, D)`` views read in place).

    Returns ``(loss, grad_student, grad_weight_parts, grad_bias_parts)``: loss as :func:`reduce_rows`
    gives it (None without ``opts.reduction``); with ``opts.want_grads`` the gradients of
    :class:`LossOptions`: student (student's shape and dtype), weight ``(splits, D_t, D_s)`` and bias
    ``(splits, D_t)`` fp32 per token split (bias None without bias).
    """
    student, target = ops.student, ops.target
    k, n, m = ops.k, ops.n, ops.m
    device = student.device
    compute_dtype = student.dtype
    weight_c = ops.weight.to(compute_dtype)  # no copy in the common case of matching dtypes
    bias = ops.bias.contiguous() if ops.bias is not None else None  # the kernel reads it in its own dtype
    reduction, normalize, want_grads, row_scale = opts.reduction, opts.normalize, opts.want_grads, opts.row_scale
    chunk = chunk_tokens(m, DEFAULT_TRITON_CHUNK_TOKENS)

    # Every buffer once per call, sized by the shapes only.
    g_buf = p_buf = None
    if want_grads or normalize:  # G, and for the token-normalized loss first P, in the compute dtype
        g_buf = torch.empty(chunk, n, dtype=compute_dtype, device=device)
    if normalize and compute_dtype == torch.float16:
        # An fp16 P overflows where the fp32 accumulator (and the float64 reference) does not: |P| > 65504
        # would turn the token's statistics into NaN. P stays fp32 here; G (bounded by the normalization)
        # still goes to the fp16 buffer the gradient GEMMs read. bf16 has fp32's range: no second buffer.
        p_buf = torch.empty(chunk, n, dtype=torch.float32, device=device)
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
    tokens = _token_layout(student, target)
    call = _TritonCall(
        student,
        weight_c,
        bias,
        target,
        tokens,
        _row_strides(student, tokens),
        _row_strides(target, tokens),
        upcast_dot(compute_dtype),
        dot_precision(compute_dtype),
        loss_scale(reduction, m, n) if reduction is not None else 1.0,
        g_buf if g_buf is not None else (partial if partial is not None else weight_c),
    )

    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        rows = stop - start
        g = g_buf[:rows] if g_buf is not None else None
        scale_chunk = row_scale[start:stop] if row_scale is not None else None
        if normalize:
            assert g is not None  # allocated for the token-normalized loss
            p = p_buf[:rows] if p_buf is not None else g
            _launch_projection(call, start, rows, p, None, None, mode=0)
            token_norm_rows_triton(
                p,
                target,
                opts.eps,
                row_scale=scale_chunk,
                loss_scale=call.loss_scale,
                out=RowBuffers(
                    row_loss=row_loss[start:stop] if row_loss is not None else None, grad_x=g if want_grads else None
                ),
                t_rows=(start, tokens, *call.t_strides),
            )
        else:
            _launch_projection(
                call,
                start,
                rows,
                g,
                scale_chunk,
                partial[:, start:stop] if partial is not None else None,
                mode=1,
                write_grad=want_grads,
            )
        if want_grads:
            assert g is not None and grad_student is not None and grad_weight is not None
            gs = grad_student.view(m, k)[start:stop]
            if opts.kept_scale != 1.0:  # alpha on the fp32 accumulator, before the 16-bit store
                torch.addmm(gs, g, weight_c, beta=0, alpha=opts.kept_scale, out=gs)
            else:
                torch.mm(g, weight_c, out=gs)
            _launch_grad_weight(call, g, (grad_weight, grad_bias), start, splits, opts.kept_scale)

    loss = None
    if reduction is not None:  # the kernels applied the reduction's scale
        if row_loss is not None:
            loss = row_loss if reduction == "none" else row_loss.sum()
        elif partial is not None:
            loss = partial.sum(dim=0) if reduction == "none" else partial.sum()
    return loss, grad_student, grad_weight, grad_bias


# ----------------------------------------------------------------------------- torch backend


def chunks_torch(ops: Operands, opts: LossOptions) -> LoopResult:
    """Per-token losses and (optionally) gradients, chunk by chunk, in plain PyTorch.

    ``ops`` as ``(M, D)`` rows (:meth:`Operands.as_rows`). Returns ``row_loss (M,)`` =
    ``sum_c err^2`` per token (acc dtype; ``opts.reduction`` is not applied), and with
    ``opts.want_grads`` the gradients of :class:`LossOptions`: student ``(M, D_s)`` in student dtype,
    weight ``(D_t, D_s)`` and bias ``(D_t,)`` in the accumulation dtype (fp32, fp64 for fp64 inputs).
    """
    student, target = ops.student, ops.target
    m, k, n = ops.m, ops.k, ops.n
    acc = ops.acc_dtype()
    # The projection runs on student-dtype operands (as autocast would) and accumulates in `acc`; the
    # GEMMs run on `acc` copies, or in bf16 where the CPU has native bf16 dot products (cpu_16bit_gemm).
    gemm = student.dtype if cpu_16bit_gemm(student) else acc
    # With bf16 GEMMs and a bf16 target, the elementwise steps run in bf16 too, as eager runs them (layer
    # norm statistics and every reduction in fp32): fp32 copies of the chunks cost more than eager's
    # bf16 formula (M = 8192, 384 -> 1536, token-normalized: 1.1-1.2x eager's time) for gradients no
    # more accurate than the bf16 GEMMs leave them.
    work = gemm if gemm != acc and target.dtype == gemm else acc
    weight_acc = ops.weight.to(student.dtype).to(gemm)
    bias_acc = ops.bias.to(acc) if ops.bias is not None else None
    bias_work = ops.bias.to(work) if ops.bias is not None and work != acc else None
    row_loss = torch.empty(m, dtype=acc, device=student.device)
    grad_student = grad_weight = grad_bias = None
    if opts.want_grads:
        grad_student = torch.empty(m, k, dtype=student.dtype, device=student.device)
        grad_weight = torch.zeros(n, k, dtype=acc, device=student.device)
        grad_bias = torch.zeros(n, dtype=acc, device=student.device) if bias_acc is not None else None

    chunk = chunk_tokens(m, DEFAULT_TORCH_CPU_CHUNK_TOKENS if student.device.type == "cpu" else DEFAULT_CHUNK_TOKENS)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        s_chunk = student[start:stop].to(gemm)
        if work != acc:
            projection = s_chunk @ weight_acc.T if bias_work is None else torch.addmm(bias_work, s_chunk, weight_acc.T)
        elif gemm != acc:
            projection = s_chunk @ weight_acc.T
            # bf16 + fp32 bias promotes: the fp32 projection in one pass (no separate cast)
            projection = projection + bias_acc if bias_acc is not None else projection.to(acc)
        elif bias_acc is not None:
            projection = torch.addmm(bias_acc, s_chunk, weight_acc.T)
        else:
            projection = s_chunk @ weight_acc.T
        if opts.normalize:
            p_hat, mean_p, rstd_p = layer_norm_rows(projection, opts.eps, work)
            t_hat = layer_norm_rows(target[start:stop], opts.eps, work)[0]
            diff = p_hat.sub_(t_hat)
        else:
            diff = projection - target[start:stop].to(work)
        # One pass over diff (square().sum() would write the squares first), then G in place of diff.
        row_loss[start:stop] = torch.linalg.vector_norm(diff, dim=-1, dtype=acc).square_()
        if grad_student is None or grad_weight is None:
            continue
        grad = diff.mul_(2.0 * opts.kept_scale)
        if opts.row_scale is not None:
            grad.mul_(opts.row_scale[start:stop].to(acc)[:, None])
        if opts.normalize:
            grad = layer_norm_rows_backward(grad, projection, mean_p, rstd_p)
        if gemm != acc:
            grad_g = grad.to(gemm)
            torch.mm(grad_g, weight_acc, out=grad_student[start:stop])
            grad_weight += grad_g.T @ s_chunk
        else:
            if grad_student.dtype == acc:
                torch.mm(grad, weight_acc, out=grad_student[start:stop])
            else:
                grad_student[start:stop] = grad @ weight_acc
            grad_weight.addmm_(grad.T, s_chunk)
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0, dtype=acc)
    return row_loss, grad_student, grad_weight, grad_bias


# ----------------------------------------------------------------------------- compiled backends (cpp, cuda)


def chunks_compiled(ops: Operands, opts: LossOptions) -> LoopResult:
    """The whole chunk loop in one call of the C++ op ``leap_kernels::feature_loss_chunks`` (csrc/ops.cpp).

    Same contract as :func:`chunks_torch` (fp32 and 16-bit inputs only). ``opts.kept_scale`` reaches
    the C++ loop as a per-token scale, so it applies before the 16-bit store of the student gradient.
    """
    student = ops.student
    row_scale = opts.row_scale
    if opts.want_grads and opts.kept_scale != 1.0:
        row_scale = (
            row_scale * opts.kept_scale
            if row_scale is not None
            else torch.full((student.shape[0],), opts.kept_scale, dtype=torch.float32, device=student.device)
        )
    default = DEFAULT_CPU_CHUNK_TOKENS if student.device.type == "cpu" else DEFAULT_CHUNK_TOKENS
    row_loss, grad_student, grad_weight, grad_bias = torch.ops.leap_kernels.feature_loss_chunks(
        student,
        ops.weight,
        ops.bias,
        ops.target,
        opts.normalize,
        opts.eps,
        opts.want_grads,
        row_scale,
        chunk_tokens(student.shape[0], default),
        cpu_16bit_gemm(student),
    )
    if not opts.want_grads:
        return row_loss, None, None, None
    return row_loss, grad_student, grad_weight, grad_bias if ops.bias is not None else None


_CHUNK_LOOPS: dict[str, Callable[[Operands, LossOptions], LoopResult]] = {
    "torch": chunks_torch,
    "cpp": chunks_compiled,
    "cuda": chunks_compiled,
}


def run(backend: str, ops: Operands, opts: LossOptions) -> LoopResult:
    """Loss (None without ``opts.reduction``) and the kept gradients of ``backend``'s loop, in the op's
    layout: ``(loss, grad_student (student's shape), grad_weight (splits, D_t, D_s), grad_bias
    (splits, D_t) or None)`` with :func:`kept_splits` splits."""
    if backend == "triton":
        return forward_triton(ops, opts, kept_splits(backend, ops.m, ops.student.device))
    # The other backends take (M, D) rows: a strided (B, N, D) view is copied here.
    row_loss, grad_student, grad_weight, grad_bias = _CHUNK_LOOPS[backend](ops.as_rows(), opts)
    acc = ops.acc_dtype()
    assert row_loss is not None
    loss = reduce_rows(row_loss.to(acc), opts.reduction, ops.n) if opts.reduction is not None else None
    if grad_student is None or grad_weight is None:
        return loss, None, None, None
    kept_bias = grad_bias.to(acc).unsqueeze(0) if grad_bias is not None else None
    return loss, grad_student.view(ops.student.shape), grad_weight.to(acc).unsqueeze(0), kept_bias
