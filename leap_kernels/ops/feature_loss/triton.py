"""The Triton kernels of the fused feature loss (host loops: :mod:`.loops`).

- ``_projection_loss_kernel``: ``P = S W^T + b`` for one tile of a chunk, with a loss epilogue
  (plain MSE: the per-token partial sums of ``(P - T)^2`` and ``G = 2 (P - T)``; token-normalized:
  ``P`` stored in the compute dtype for ``_token_norm_mse_rows_kernel`` of :mod:`.._rows`);
- ``_grad_weight_kernel``: ``dW = G^T S`` and ``db = sum G`` over token splits of the chunk, each
  split into its own fp32 workspace slice (no atomics);
- ``_rescale_kernel``: the whole backward for ``reduction="mean"|"sum"`` in one launch.

Loop bounds are ``tl.constexpr`` arguments used directly in ``range`` (the channel count ``K``,
the rows per split, the split count): Triton 3.6's interpreter hands runtime integers, and every
value assigned to a local, to the kernels as 1-element arrays, which Python's ``range`` cannot take
(``only 0-dimensional arrays can be converted to Python scalars``; Triton 3.8 squeezes them). Each
is fixed per model (``K = D_s``) or per chunk size, so specializing the compiled kernels on them
costs at most a compile per distinct value (the autotuner's choice is keyed separately).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._triton_common import HAS_TRITON, INTERPRETED, autotune_shortlist

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .._triton_common import _row_offsets

    def _gemm_configs(interpreted: bool, **extra: Any) -> list[triton.Config]:
        if interpreted:  # the interpreter accepts one config; big tiles mean few programs
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, **extra}, num_warps=4)]
        # No 128x256 tile: it spills registers with the MSE epilogue (tools/compile_check.py, sm_90).
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

    def check_partial_slots(configs: list[triton.Config], partial_block_n: int) -> None:
        """Raises if a projection config's BLOCK_N is not a multiple of the partials' slot width."""
        bad = [c.kwargs["BLOCK_N"] for c in configs if c.kwargs["BLOCK_N"] % partial_block_n]
        if bad:
            raise RuntimeError(
                f"_projection_loss_kernel configs: BLOCK_N {bad} is not a multiple of PARTIAL_BLOCK_N = "
                f"{partial_block_n}, the slot width the loss partials buffer is sized by"
            )

    check_partial_slots(_PROJECTION_CONFIGS, PARTIAL_BLOCK_N)

    def _shortlist(kernel: str, tensor_arg: str) -> Callable[..., list[triton.Config]]:
        """The autotuner's config pruning: the card's committed shortlist (:func:`autotune_shortlist`)."""

        def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
            return autotune_shortlist(kernel, configs, named_args[tensor_arg].device)

        return prune

    @triton.autotune(
        configs=_PROJECTION_CONFIGS,
        key=["M_BUCKET", "N", "K", "MODE", "WRITE_LOSS", "WRITE_GRAD"],
        prune_configs_by={"early_config_prune": _shortlist("_projection_loss_kernel", "S")},
    )
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _projection_loss_kernel(  # type: ignore[no-untyped-def]
        S,
        W,
        BIAS,
        T,
        OUT,
        ROW_SCALE,
        PARTIAL_LOSS,
        M,
        N,
        K: tl.constexpr,  # D_s: a constexpr trip count (see the module docstring)
        stride_sm,
        stride_sk,
        stride_wn,
        stride_wk,
        stride_tm,
        stride_tn,
        stride_om,
        stride_pl,
        ROW0,
        TOKENS,
        stride_sb,
        stride_tb,
        M_BUCKET,
        loss_scale,
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
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w_t = tl.load(
                W + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk,
                mask=n_mask[None, :] & k_mask[:, None],
                other=0.0,
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
                    tl.store(
                        PARTIAL_LOSS + (slot + j) * stride_pl + offs_m,
                        tl.zeros_like(part),
                        mask=m_mask & (slot + j < num_slots),
                    )
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
        prune_configs_by={"early_config_prune": _shortlist("_grad_weight_kernel", "G")},
        restore_value=["DW", "DB"],  # ACCUMULATE adds to them: benchmarking a config must not
    )
    @triton.jit(do_not_specialize=["M_BUCKET"])
    def _grad_weight_kernel(  # type: ignore[no-untyped-def]
        G,
        S,
        DW,
        DB,
        M,
        N,
        K,
        stride_gm,
        stride_gn,
        stride_sm,
        stride_sk,
        ROW0,
        TOKENS,
        stride_sb,
        M_BUCKET,
        kept_scale,
        ROWS_PER_SPLIT: tl.constexpr,  # a multiple of 128; a constexpr trip count
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
        for m0 in range(0, ROWS_PER_SPLIT, BLOCK_M):  # rows past the split's end (hi) are masked
            rows = lo + m0 + offs_m
            m_mask = rows < hi
            g_t = tl.load(
                G + rows.to(tl.int64)[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                mask=n_mask[:, None] & m_mask[None, :],
                other=0.0,
            )
            s_rows = _row_offsets(ROW0 + rows, TOKENS, stride_sb, stride_sm)
            s = tl.load(
                S + s_rows[:, None] + offs_k[None, :] * stride_sk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
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
    def _rescale_kernel(  # type: ignore[no-untyped-def]
        GS,
        GW,
        GB,
        GRAD_OUT,
        OUT_S,
        OUT_W,
        OUT_B,
        n_s,
        n_w,
        n_b,
        scale,
        SPLITS: tl.constexpr,
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
            for s in range(0, SPLITS):
                total += tl.load(GW + (offs + s * n_w), mask=mask, other=0.0)
            tl.store(OUT_W + offs, (total * factor).to(OUT_W.dtype.element_ty), mask=mask)
        else:
            offs = (pid - progs_s - progs_w).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n_b
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in range(0, SPLITS):
                total += tl.load(GB + (offs + s * n_b), mask=mask, other=0.0)
            tl.store(OUT_B + offs, (total * factor).to(OUT_B.dtype.element_ty), mask=mask)
