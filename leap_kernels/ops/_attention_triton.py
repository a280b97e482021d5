"""The Triton kernel of :func:`leap_kernels.ops.teacher_attention.teacher_attention` and its host
function (the op, its other backends and the functional API live in that module).

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

Rotary position embedding (``rope=(sin, cos)``, DINOv3 / timm ``EvaAttention``): the same kernel with
``ROPE`` set reads q and k as their two channel halves, rotates each loaded tile in registers (fp32,
``a cos - b sin`` and ``b cos + a sin`` per channel pair ``(j, j + d/2)``, tokens before ``rope_prefix``
unrotated), rounds it to the input dtype as timm does, and computes ``Q K^T`` as two half-width dots.
q and k are never written back rotated: no extra pass over them in memory (FlashAttention applies
rotary as a separate kernel). The fp32 ``sin, cos`` tables, ``(N - P, d/2)``, are shared by every
(batch, head) and stay in L2.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton_common import HAS_TRITON, INTERPRETED, autotune_shortlist, upcast_dot

__all__ = ["TAIL_M", "TAIL_N", "LOG2E", "query_programs", "computed_pairs", "bh_bucket", "teacher_attention_triton"]

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
        """d = 128 with 128x128 tiles spills registers; drop it. With rope, d = 128 also drops the
        128-row 4-warp tiles (the rotated key tile and its fp32 tables on top). Never prune to nothing.
        Of the rest, a GPU with an entry in the autotune table tries only its shortlist."""
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        rope = kwargs.get("ROPE", named_args.get("ROPE", False))

        def too_big(c: triton.Config) -> bool:
            if head_dim is None or head_dim < 128:
                return False
            rows, keys, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
            return rows * keys > 128 * 64 or bool(rope and rows // warps > 16)

        kept = [c for c in configs if not too_big(c)] or configs[:1]
        # Then the card's committed shortlist (LEAP_KERNELS_AUTOTUNE=full tries all that fit).
        qkv = named_args.get("QKV")
        device = qkv.device if isinstance(qkv, torch.Tensor) else torch.device("cpu")
        return autotune_shortlist("_teacher_attention_fwd_kernel", kept, device)

    @triton.jit
    def _round_bf16(x):  # type: ignore[no-untyped-def]
        """fp32 -> bfloat16 round-to-nearest-even, kept in fp32. The interpreter's own cast truncates
        (twice the error of a GPU's); it runs this instead so that the tests see the GPU's rounding."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _rope_rotate(  # type: ignore[no-untyped-def]
        xa, xb, rows, N, rope_prefix, sin_ptr, cos_ptr, stride_tab, offs_h, UPCAST: tl.constexpr
    ):
        """Rotate the channel halves ``xa, xb (R, d/2)`` of tokens ``rows`` (R,) in fp32; tokens before
        ``rope_prefix`` (CLS, registers) and past ``N`` (padding) stay as they are. Returns both halves
        rounded to the input dtype (timm rotates in fp32 and casts back); with ``UPCAST`` (the
        interpreter) the rounded values are returned in fp32."""
        rotated = (rows >= rope_prefix) & (rows < N)
        table = tl.where(rotated, rows - rope_prefix, 0)[:, None] * stride_tab + offs_h[None, :]
        cos = tl.load(cos_ptr + table, mask=rotated[:, None], other=1.0)
        sin = tl.load(sin_ptr + table, mask=rotated[:, None], other=0.0)
        a = xa.to(tl.float32)
        b = xb.to(tl.float32)
        ra = tl.where(rotated[:, None], a * cos - b * sin, a)
        rb = tl.where(rotated[:, None], b * cos + a * sin, b)
        if UPCAST:
            if xa.dtype == tl.bfloat16:
                return _round_bf16(ra), _round_bf16(rb)
            return ra.to(xa.dtype).to(tl.float32), rb.to(xb.dtype).to(tl.float32)
        return ra.to(xa.dtype), rb.to(xb.dtype)

    @triton.jit
    def _attention_kv_tile(  # type: ignore[no-untyped-def]
        acc,
        l_i,
        m_i,
        q,
        q2,
        k_ptrs,
        v_ptrs,
        start_n,
        N,
        qk_scale,
        offs_n,
        rope_prefix,  # the rope arguments (unused without ROPE): see _attention_rows
        sin_ptr,
        cos_ptr,
        stride_tab,
        half_step,
        offs_h,
        MASK_KEYS: tl.constexpr,
        UPCAST: tl.constexpr,
        ROPE: tl.constexpr,
    ):
        """One key/value tile (``len(offs_n)`` keys from ``start_n``) of the online softmax;
        returns the updated ``(acc, l_i, m_i)``. With ``ROPE``, ``q``/``q2`` are the rotated channel
        halves of the query tile and ``k_ptrs`` points at the first half of the keys."""
        if MASK_KEYS:
            key_ok = (start_n + offs_n) < N
        if ROPE:
            if MASK_KEYS:
                ka = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
                kb = tl.load(k_ptrs + half_step, mask=key_ok[:, None], other=0.0)
            else:
                ka = tl.load(k_ptrs)
                kb = tl.load(k_ptrs + half_step)
            ka, kb = _rope_rotate(
                ka, kb, start_n + offs_n, N, rope_prefix, sin_ptr, cos_ptr, stride_tab, offs_h, UPCAST=UPCAST
            )
            if UPCAST:  # interpreter only: its 16-bit dot is not exact
                qk = tl.dot(q.to(tl.float32), tl.trans(ka.to(tl.float32)), input_precision="ieee")
                qk = tl.dot(q2.to(tl.float32), tl.trans(kb.to(tl.float32)), qk, input_precision="ieee")
            else:  # Q K^T over the two channel halves: one k-loop of the MMA split in two
                qk = tl.dot(q, tl.trans(ka))
                qk = tl.dot(q2, tl.trans(kb), qk)
        else:
            if MASK_KEYS:
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
        rope_prefix,
        SIN,
        COS,
        stride_tab,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
        ROPE: tl.constexpr,
        ROWS: tl.constexpr,
        MASK_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        TAIL_N: tl.constexpr,
    ):
        """Output rows ``[row0, row0 + ROWS)`` of one (batch, head): the full ``BLOCK_N`` key tiles
        without masks, then the key tail in ``TAIL_N``-key steps. ``MASK_ROWS``: rows may pass ``N``.
        ``ROPE``: q and k are read as channel halves and rotated with the ``SIN``/``COS`` tables
        (``(N - rope_prefix, d/2)`` fp32, row stride ``stride_tab``)."""
        offs_m = row0 + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        # Without ROPE the "half" is the whole head dim and q2 is never used.
        if ROPE:
            offs_h = tl.arange(0, HEAD_DIM // 2)
        else:
            offs_h = offs_d
        half_step = (HEAD_DIM // 2) * stride_qkv_c
        q_ptrs = q_base + offs_m[:, None] * stride_qkv_n + offs_h[None, :] * stride_qkv_c
        if MASK_ROWS:
            q = tl.load(q_ptrs, mask=(offs_m < N)[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs)
        q2 = q
        if ROPE:
            if MASK_ROWS:
                q2 = tl.load(q_ptrs + half_step, mask=(offs_m < N)[:, None], other=0.0)
            else:
                q2 = tl.load(q_ptrs + half_step)
            q, q2 = _rope_rotate(q, q2, offs_m, N, rope_prefix, SIN, COS, stride_tab, offs_h, UPCAST=UPCAST)

        m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)

        offs_n = tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_qkv_n + offs_h[None, :] * stride_qkv_c
        v_ptrs = v_base + offs_n[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        n_full = (N // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):  # full tiles: no masks
            acc, l_i, m_i = _attention_kv_tile(
                acc,
                l_i,
                m_i,
                q,
                q2,
                k_ptrs,
                v_ptrs,
                start_n,
                N,
                qk_scale,
                offs_n,
                rope_prefix,
                SIN,
                COS,
                stride_tab,
                half_step,
                offs_h,
                MASK_KEYS=False,
                UPCAST=UPCAST,
                ROPE=ROPE,
            )
            k_ptrs += BLOCK_N * stride_qkv_n
            v_ptrs += BLOCK_N * stride_qkv_n
        # The key tail (N % BLOCK_N keys) in TAIL_N-key steps, keys past N masked; not pipelined (one
        # step at the paper's shapes; stages would only cost shared memory).
        offs_t = tl.arange(0, TAIL_N)
        k_ptrs = k_base + (n_full + offs_t)[:, None] * stride_qkv_n + offs_h[None, :] * stride_qkv_c
        v_ptrs = v_base + (n_full + offs_t)[:, None] * stride_qkv_n + offs_d[None, :] * stride_qkv_c
        for start_n in tl.range(n_full, N, TAIL_N, num_stages=1):
            acc, l_i, m_i = _attention_kv_tile(
                acc,
                l_i,
                m_i,
                q,
                q2,
                k_ptrs,
                v_ptrs,
                start_n,
                N,
                qk_scale,
                offs_t,
                rope_prefix,
                SIN,
                COS,
                stride_tab,
                half_step,
                offs_h,
                MASK_KEYS=True,
                UPCAST=UPCAST,
                ROPE=ROPE,
            )
            k_ptrs += TAIL_N * stride_qkv_n
            v_ptrs += TAIL_N * stride_qkv_n

        out = acc * (1.0 / l_i)[:, None]
        out_ptrs = out_base + offs_m[:, None] * stride_out_n + offs_d[None, :]
        if MASK_ROWS:
            tl.store(out_ptrs, out.to(out_base.dtype.element_ty), mask=(offs_m < N)[:, None])
        else:
            tl.store(out_ptrs, out.to(out_base.dtype.element_ty))

    @triton.jit(do_not_specialize=["bh_bucket", "rope_prefix"])
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
        rope_prefix,  # ROPE: tokens before it are not rotated (CLS + registers)
        SIN,  # ROPE: (N - rope_prefix, d/2) fp32 tables, unit column stride; else any pointer
        COS,
        stride_tab,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
        ROPE: tl.constexpr,
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
                rope_prefix,
                SIN,
                COS,
                stride_tab,
                HEAD_DIM=HEAD_DIM,
                UPCAST=UPCAST,
                ROPE=ROPE,
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
                rope_prefix,
                SIN,
                COS,
                stride_tab,
                HEAD_DIM=HEAD_DIM,
                UPCAST=UPCAST,
                ROPE=ROPE,
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
    # The rotary variant tunes apart (its registers differ); same key, same configs.
    _teacher_attention_rope_tuned = triton.autotune(
        configs=_attention_configs(INTERPRETED),
        key=["N", "bh_bucket", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_teacher_attention_fwd_kernel)


def teacher_attention_triton(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float,
    out: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_prefix: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 1,
) -> torch.Tensor:
    """Triton backend: writes attention of ``qkv (B, N, 3*H*d)`` into ``out (B, N, H*d)`` (unit channel stride).

    ``rope = (sin, cos)``: fp32 tables ``(N - rope_prefix, d/2)`` with unit column stride (q and k
    rotated in the kernel). ``block_m``/``block_n`` (powers of 2, >= 16) launch fixed tiles with
    ``num_warps``/``num_stages`` instead of the autotuned config (tests and benchmarks of one config).
    """
    batch, n, c = qkv.shape
    head_dim = c // (3 * num_heads)
    grid = lambda meta: (query_programs(n, meta["BLOCK_M"]) * batch * num_heads,)  # noqa: E731
    if rope is None:
        sin = cos = qkv  # never read
        stride_tab = 0
    else:
        sin, cos = rope
        if sin.stride() != cos.stride() or (sin.shape[-1] > 1 and sin.stride(-1) != 1):
            sin, cos = sin.contiguous(), cos.contiguous()  # the kernel takes one row stride, unit columns
        stride_tab = sin.stride(0)
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
        int(rope_prefix),
        sin,
        cos,
        stride_tab,
    )
    meta = dict(HEAD_DIM=head_dim, UPCAST=upcast_dot(qkv.dtype), ROPE=rope is not None, TAIL_M=TAIL_M, TAIL_N=TAIL_N)
    if block_m is None and block_n is None:
        tuned = _teacher_attention_fwd_tuned if rope is None else _teacher_attention_rope_tuned
        tuned[grid](*args, **meta)
    else:
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of 2 >= 16 (with the other one given), got {value!r}")
        _teacher_attention_fwd_kernel[grid](
            *args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages
        )
    return out
