// csrc/cuda/teacher_attention.cu -- inference attention of a ViT block read in place from its
// packed qkv (B, N, 3*H*d) (timm's (B, N, 3, H, d) layout), written as (B, N, H*d).
// Flash-attention forward (FlashAttention-2 style) on tensor cores: mma.sync m16n8k16 through
// inline PTX, ldmatrix fragments from shared memory, cp.async global -> shared; sm_80 and newer.
//
// Tiling. One CTA = one query tile of BM = 16 * WARPS rows (64 rows / 4 warps, or 128 rows /
// 8 warps for long sequences) of one (batch, head); a 1-D grid with the query tiles fastest, so
// the CTAs of one head run together and share its K/V in L2. Warp w owns query rows
// [16w, 16w + 16) of the tile: its Q fragments stay in registers for the whole key loop, and no
// data is exchanged between warps (the only barriers guard the shared K/V buffers).
// Keys stream in tiles of 64 (double-buffered in shared memory: cp.async of tile j+1 overlaps
// the math on tile j). The last tile is short: it holds ceil(keys/16) chunks of 16 keys, and only
// those chunks are loaded and multiplied, so N = 257 or 261 pays one 16-key chunk for its 1 or 5
// tail keys instead of a full 64-key tile. Keys past N inside that chunk are zero-filled in shared
// memory (so 0 * garbage can never make a NaN in P V) and their logits are set to -inf before the
// row max. Query rows past N are zero-filled at load (their softmax is finite) and never stored.
// The schedule and all index arithmetic live in attention_tiling.h and are tested on the CPU by
// tests/test_cuda_kernel_layout.py.
//
// Per key tile, per warp (KC = 16-key chunks in the tile, 4 except in the tail):
//   S (16 x 16KC, fp32) = Q (16 x d) K^T:   d/16 k-steps x 2KC n-tiles of 8 keys, one mma each.
//   online softmax on S (fp32, base 2):     m_new = max(m, rowmax(S) * scale * log2 e),
//                                           P = exp2(S * scale * log2 e - m_new), alpha = exp2(m - m_new),
//                                           l = l * alpha + rowsum(P), O *= alpha.
//   O (16 x d, fp32) += P (16 x 16KC, rounded to the input dtype) V:  KC k-steps x d/8 n-tiles.
// At the end O / l is staged through the warp's own rows of the Q buffer and written with
// 16-byte stores to the (B, N, H*d) output (coalesced: a row's d channels are contiguous there).
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} (lane = 4 * group + tig,
// group = lane / 4 in 0..7, tig = lane % 4 in 0..3; each 32-bit register holds 2 16-bit values):
//   A (16x16, row-major), 4 regs: a0a1 = A[group][2tig, 2tig+1],     a2a3 = A[group+8][2tig, 2tig+1],
//                                 a4a5 = A[group][2tig+8, 2tig+9],   a6a7 = A[group+8][2tig+8, 2tig+9].
//   B (16x8, "col": k x n with k contiguous), 2 regs: b0b1 = B[2tig, 2tig+1][group],
//                                                     b2b3 = B[2tig+8, 2tig+9][group].
//   C/D (16x8 fp32), 4 regs: c0c1 = C[group][2tig, 2tig+1], c2c3 = C[group+8][2tig, 2tig+1].
// Why these fit together:
//   * ldmatrix (no .trans) gives lane l the elements [l/4][2(l%4), 2(l%4)+1] of each 8x8 matrix,
//     i.e. exactly the A pattern for Q stored row-major (rows = queries, columns = channels) and
//     the B pattern for K^T when K is stored row-major (rows = keys = n, columns = channels = k):
//     K's natural [key][channel] layout *is* the "col" layout of B. No transposition anywhere.
//   * For P V, B[k = key][n = channel] must come as pairs of consecutive keys, but V is stored
//     [key][channel]; ldmatrix .trans gives lane l the elements [2(l%4), 2(l%4)+1][l/4] = B's pattern.
//   * The S accumulator of two adjacent 8-key n-tiles (C layout) is register for register the
//     A fragment of P for that 16-key k-step (c0c1 of n-tile 2c -> a0a1, c2c3 -> a2a3, c0c1 of
//     n-tile 2c+1 -> a4a5, c2c3 -> a6a7), so P goes from the softmax to the next mma without
//     shared memory. Each lane holds 2 query rows (group, group+8): row max and row sum are
//     reduced over the 4 lanes of a group with two xor-shuffles (l only once, at the end).
// Shared memory is swizzled (16-byte chunk c of row r at c ^ (r % 8)) so each 8-row ldmatrix
// phase hits 32 distinct banks.
//
// Rotary position embedding (teacher_attention_rope: DINOv3, timm's EvaAttention, half layout): once a
// Q or K tile has landed in shared memory, the CTA rotates it in place before any ldmatrix reads it:
// each thread takes channel pairs (j, j + d/2) of token t >= rope_prefix and writes back
// a cos - b sin, b cos + a sin (fp32, rounded to the input dtype as timm rounds the rotated q and k),
// with sin, cos the fp32 tables (N - rope_prefix, d/2) read through the read-only cache (they are a
// few KB shared by every CTA). q and k are never written rotated to global memory. One extra
// __syncthreads per key tile; tokens before rope_prefix (CLS, registers) and past N are left alone.

#include "attention_tiling.h"
#include "cuda_kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace leap_kernels {
namespace cuda {
namespace {

using namespace attn;

struct AttnParams {
  const void* qkv;
  void* out;
  int n;               // tokens
  int h;               // heads
  int num_q_tiles;
  int64_t stride_b;    // qkv strides in elements (channel stride 1)
  int64_t stride_n;
  int64_t out_stride_b;
  int64_t out_stride_n;
  float qk_scale_log2;  // scale * log2(e)
  // Rotary embedding (the ROPE kernels only): fp32 tables (n - rope_prefix, d/2), unit column stride.
  const float* rope_sin;
  const float* rope_cos;
  int64_t rope_stride;
  int rope_prefix;
};

// ---------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// ---------------------------------------------------------------------------- kernel pieces

// cp.async `rows` rows (starting at token `row0`) of one head's q, k or v into a swizzled tile.
// Rows at or past n are zero-filled.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* head_base, int64_t stride_n, int row0, int rows, int n) {
  constexpr int kChunks = D / kChunkElems;
  for (int i = threadIdx.x; i < rows * kChunks; i += THREADS) {
    const int r = i / kChunks;
    const int c = i % kChunks;
    const bool valid = row0 + r < n;
    const T* src = valid ? head_base + static_cast<int64_t>(row0 + r) * stride_n + c * kChunkElems : head_base;
    cp_async_16(smem_u32(smem + smem_offset(r, c, D)), src, valid);
  }
}

// Rotates `rows` rows (tokens row0..) of a swizzled q or k tile in place: channel pairs (j, j + D/2) of
// tokens in [rope_prefix, n). Pairs are disjoint, so the threads never touch the same element.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void rope_tile(T* smem, int row0, int rows, int n, const AttnParams& p) {
  constexpr int kHalf = D / 2;
  for (int i = threadIdx.x; i < rows * kHalf; i += THREADS) {
    const int r = i / kHalf;
    const int j = i % kHalf;
    const int token = row0 + r;
    if (token < p.rope_prefix || token >= n) continue;
    const int64_t t = static_cast<int64_t>(token - p.rope_prefix) * p.rope_stride + j;
    const float c = __ldg(p.rope_cos + t);
    const float s = __ldg(p.rope_sin + t);
    T* pa = smem + smem_element(r, j, D);
    T* pb = smem + smem_element(r, j + kHalf, D);
    const float a = Mma<T>::to_float(*pa);
    const float b = Mma<T>::to_float(*pb);
    *pa = Mma<T>::from_float(a * c - b * s);
    *pb = Mma<T>::from_float(b * c + a * s);
  }
}

// One key tile of KC 16-key chunks for one warp: S = Q K^T, online softmax, O += P V.
// MASK: keys at or past n get -inf logits (only the tail tile).
template <typename T, int D, int KC, bool MASK>
__device__ __forceinline__ void attend_tile(const T* sK, const T* sV, const uint32_t (&qf)[D / 16][4],
                                            float (&acc)[D / 8][4], float (&m)[2], float (&l)[2], int key0, int n,
                                            float qk_scale_log2, int lane) {
  constexpr int NT = 2 * KC;  // 8-key n-tiles
  float s[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[nt][i] = 0.0f;

  // S = Q K^T.
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_u32(sK + smem_offset(k_frag_row(kc, lane), k_frag_chunk(kk, lane), D)));
      Mma<T>::run(s[2 * kc], qf[kk], b[0], b[1]);
      Mma<T>::run(s[2 * kc + 1], qf[kk], b[2], b[3]);
    }
  }
  if constexpr (MASK) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (key0 + nt * 8 + c_frag_col(lane, i) >= n) s[nt][i] = -INFINITY;
  }

  // Online softmax; this lane's rows are group (registers 0, 1) and group + 8 (registers 2, 3).
  float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    row_max[0] = fmaxf(row_max[0], fmaxf(s[nt][0], s[nt][1]));
    row_max[1] = fmaxf(row_max[1], fmaxf(s[nt][2], s[nt][3]));
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
    row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
    // scale > 0: the max of the scaled logits is the scaled max. Every tile has a real key, so
    // m_new is finite for finite inputs and alpha = exp2(-inf) = 0 on the first tile.
    const float m_new = fmaxf(m[r], row_max[r] * qk_scale_log2);
    alpha[r] = exp2f(m[r] - m_new);
    m[r] = m_new;
  }
  float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[nt][i] = exp2f(fmaf(s[nt][i], qk_scale_log2, -m[i >> 1]));  // masked keys: exp2(-inf) = 0
      row_sum[i >> 1] += s[nt][i];
    }
  // l stays a per-lane partial sum (alpha is the same in the 4 lanes of a row); reduced at the end.
  l[0] = l[0] * alpha[0] + row_sum[0];
  l[1] = l[1] * alpha[1] + row_sum[1];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    acc[dt][0] *= alpha[0];
    acc[dt][1] *= alpha[0];
    acc[dt][2] *= alpha[1];
    acc[dt][3] *= alpha[1];
  }

  // O += P V: the S accumulators of n-tiles 2kc, 2kc+1 are the A fragment of k-step kc.
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    const uint32_t pa[4] = {Mma<T>::pack(s[2 * kc][0], s[2 * kc][1]), Mma<T>::pack(s[2 * kc][2], s[2 * kc][3]),
                            Mma<T>::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                            Mma<T>::pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_u32(sV + smem_offset(v_frag_row(kc, lane), v_frag_chunk(dp, lane), D)));
      Mma<T>::run(acc[2 * dp], pa, b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], pa, b[2], b[3]);
    }
  }
}

// Register budget through the minimum CTAs per SM: 3 for the 4-warp d = 64 kernel (<= 170 registers,
// 12 warps per SM; ptxas takes ~190 if unbounded), 1 elsewhere (d = 128 needs ~210; with the default
// bound ptxas caps the 8-warp d = 64 kernel at 128 registers on sm_80 and spills).
template <int D, int WARPS>
constexpr int min_ctas_per_sm() { return (D == 64 && WARPS == 4) ? 3 : 1; }

template <typename T, int D, int WARPS, bool ROPE>
__global__ void __launch_bounds__(WARPS * 32, min_ctas_per_sm<D, WARPS>())
    teacher_attention_kernel(const AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16 / cp.async need sm_80; the host checks the device first
#else
  constexpr int THREADS = WARPS * 32;
  constexpr int BM = WARPS * kWarpRows;
  static_assert(D % 16 == 0, "head dim must be a multiple of 16");
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte aligned
  T* sQ = reinterpret_cast<T*>(smem_raw);  // BM x D; reused for the output
  T* sK = sQ + BM * D;                     // 2 stages x 64 x D
  T* sV = sK + 2 * kBlockN * D;            // 2 stages x 64 x D

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int n = p.n;
  const int q_tile = static_cast<int>(blockIdx.x % static_cast<unsigned>(p.num_q_tiles));
  const int bh = static_cast<int>(blockIdx.x / static_cast<unsigned>(p.num_q_tiles));
  const int b = bh / p.h;
  const int h = bh % p.h;
  const int q0 = q_tile * BM;

  const T* base = static_cast<const T*>(p.qkv) + static_cast<int64_t>(b) * p.stride_b;
  const T* q_base = base + static_cast<int64_t>(h) * D;
  const T* k_base = base + static_cast<int64_t>(p.h + h) * D;
  const T* v_base = base + static_cast<int64_t>(2 * p.h + h) * D;

  const int k_tiles = num_key_tiles(n);
  load_tile<T, D, THREADS>(sQ, q_base, p.stride_n, q0, BM, n);
  load_tile<T, D, THREADS>(sK, k_base, p.stride_n, 0, key_tile_rows(n, 0), n);
  load_tile<T, D, THREADS>(sV, v_base, p.stride_n, 0, key_tile_rows(n, 0), n);
  cp_async_commit();

  uint32_t qf[D / 16][4];
  float acc[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};

  for (int j = 0; j < k_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < k_tiles) {  // prefetch the next tile into the other stage (freed by the last barrier)
      const int next = (j + 1) & 1;
      const int key0 = key_tile_start(j + 1);
      load_tile<T, D, THREADS>(sK + next * kBlockN * D, k_base, p.stride_n, key0, key_tile_rows(n, j + 1), n);
      load_tile<T, D, THREADS>(sV + next * kBlockN * D, v_base, p.stride_n, key0, key_tile_rows(n, j + 1), n);
      cp_async_commit();
      cp_async_wait<1>();  // everything but the prefetch has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (ROPE) {  // rotate the landed tiles in place before any fragment is read
      if (j == 0) rope_tile<T, D, THREADS>(sQ, q0, BM, n, p);
      rope_tile<T, D, THREADS>(sK + stage * kBlockN * D, key_tile_start(j), key_tile_rows(n, j), n, p);
      __syncthreads();
    }
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], smem_u32(sQ + smem_offset(q_frag_row(warp, lane), q_frag_chunk(kk, lane), D)));
    }
    const T* sKs = sK + stage * kBlockN * D;
    const T* sVs = sV + stage * kBlockN * D;
    const int key0 = key_tile_start(j);
    if (!key_tile_masked(n, j) && key_tile_chunks(n, j) == 4) {
      attend_tile<T, D, 4, false>(sKs, sVs, qf, acc, m, l, key0, n, p.qk_scale_log2, lane);
    } else {
      switch (key_tile_chunks(n, j)) {
        case 1: attend_tile<T, D, 1, true>(sKs, sVs, qf, acc, m, l, key0, n, p.qk_scale_log2, lane); break;
        case 2: attend_tile<T, D, 2, true>(sKs, sVs, qf, acc, m, l, key0, n, p.qk_scale_log2, lane); break;
        case 3: attend_tile<T, D, 3, true>(sKs, sVs, qf, acc, m, l, key0, n, p.qk_scale_log2, lane); break;
        default: attend_tile<T, D, 4, true>(sKs, sVs, qf, acc, m, l, key0, n, p.qk_scale_log2, lane); break;
      }
    }
    __syncthreads();  // stage is refilled by the prefetch of the next iteration
  }

  // Finish: full row sums, O / l, staged through this warp's own 16 rows of sQ.
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    inv_l[r] = 1.0f / l[r];
  }
  const int row_lo = warp * kWarpRows + c_frag_row(lane, 0);
  const int row_hi = warp * kWarpRows + c_frag_row(lane, 2);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    // Registers 0,1 / 2,3 are channels 8dt + 2tig, +1 of rows row_lo / row_hi: one 32-bit store each.
    const int within = c_frag_col(lane, 0);
    *reinterpret_cast<uint32_t*>(sQ + smem_offset(row_lo, dt, D) + within) =
        Mma<T>::pack(acc[dt][0] * inv_l[0], acc[dt][1] * inv_l[0]);
    *reinterpret_cast<uint32_t*>(sQ + smem_offset(row_hi, dt, D) + within) =
        Mma<T>::pack(acc[dt][2] * inv_l[1], acc[dt][3] * inv_l[1]);
  }
  __syncwarp();
  constexpr int kChunks = D / kChunkElems;
  T* out_base = static_cast<T*>(p.out) + static_cast<int64_t>(b) * p.out_stride_b + static_cast<int64_t>(h) * D;
  for (int i = lane; i < kWarpRows * kChunks; i += 32) {
    const int r = warp * kWarpRows + i / kChunks;
    const int c = i % kChunks;
    const int q = q0 + r;
    if (q < n) {
      *reinterpret_cast<uint4*>(out_base + static_cast<int64_t>(q) * p.out_stride_n + c * kChunkElems) =
          *reinterpret_cast<const uint4*>(sQ + smem_offset(r, c, D));
    }
  }
#endif
}

// ---------------------------------------------------------------------------- host side

template <typename T, int D, int WARPS, bool ROPE>
void launch_attention(const AttnParams& p, int64_t batch_heads, cudaStream_t stream) {
  constexpr int BM = WARPS * kWarpRows;
  constexpr size_t smem = sizeof(T) * static_cast<size_t>(BM * D + 4 * kBlockN * D);
  auto kernel = teacher_attention_kernel<T, D, WARPS, ROPE>;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(smem <= prop->sharedMemPerBlockOptin, "teacher_attention: the kernel needs ", smem,
              " bytes of shared memory per block, the device allows ", prop->sharedMemPerBlockOptin);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t blocks = batch_heads * p.num_q_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "teacher_attention: B * H * ceil(N / ", BM,
              ") must be below 2^31, got ", blocks);
  kernel<<<static_cast<unsigned>(blocks), WARPS * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D, bool ROPE>
void launch_for_dim(AttnParams& p, int64_t batch_heads, cudaStream_t stream) {
  // 128-row query tiles (8 warps) halve the K/V traffic per query on long sequences; 64-row
  // tiles give short sequences (N ~ 257) more CTAs and less waste in the last query tile.
  if (p.n >= 512) {
    p.num_q_tiles = num_query_tiles(p.n, 128);
    launch_attention<T, D, 8, ROPE>(p, batch_heads, stream);
  } else {
    p.num_q_tiles = num_query_tiles(p.n, 64);
    launch_attention<T, D, 4, ROPE>(p, batch_heads, stream);
  }
}

template <bool ROPE>
void launch_for_dtype(AttnParams& p, at::ScalarType dtype, int64_t d, int64_t batch_heads, cudaStream_t stream) {
  if (dtype == at::kBFloat16) {
    if (d == 64) launch_for_dim<__nv_bfloat16, 64, ROPE>(p, batch_heads, stream);
    else launch_for_dim<__nv_bfloat16, 128, ROPE>(p, batch_heads, stream);
  } else {
    if (d == 64) launch_for_dim<__half, 64, ROPE>(p, batch_heads, stream);
    else launch_for_dim<__half, 128, ROPE>(p, batch_heads, stream);
  }
}

bool aligned16(const at::Tensor& qkv) {
  const int64_t es = qkv.element_size();
  if (reinterpret_cast<uintptr_t>(qkv.data_ptr()) % 16 != 0) return false;
  if (qkv.size(0) > 1 && (qkv.stride(0) * es) % 16 != 0) return false;
  if (qkv.size(1) > 1 && (qkv.stride(1) * es) % 16 != 0) return false;
  return true;
}

// Checks, output allocation and parameters shared by both entry points; returns false when the
// output is empty (nothing to launch).
bool prepare(const at::Tensor& qkv_in, int64_t num_heads, double scale, at::Tensor& qkv, at::Tensor& out,
             AttnParams& p, int64_t& d) {
  TORCH_CHECK(qkv_in.defined(), "teacher_attention: qkv must be a defined tensor");
  TORCH_CHECK(qkv_in.is_cuda(), "teacher_attention: qkv must be a CUDA tensor, got device ", qkv_in.device());
  TORCH_CHECK(qkv_in.dim() == 3, "teacher_attention: qkv must be 3-D (B, N, 3*H*d), got shape ", qkv_in.sizes());
  TORCH_CHECK(qkv_in.scalar_type() == at::kBFloat16 || qkv_in.scalar_type() == at::kHalf,
              "teacher_attention: qkv must be bfloat16 or float16, got ", qkv_in.scalar_type());
  TORCH_CHECK(num_heads > 0, "teacher_attention: num_heads must be positive, got ", num_heads);
  const int64_t batch = qkv_in.size(0), n = qkv_in.size(1), c = qkv_in.size(2);
  TORCH_CHECK(c % (3 * num_heads) == 0, "teacher_attention: qkv's last dim must be 3 * num_heads * head_dim, got ",
              c, " with num_heads = ", num_heads);
  d = c / (3 * num_heads);
  TORCH_CHECK(d == 64 || d == 128, "teacher_attention: head dim must be 64 or 128, got ", d, " (qkv last dim ", c,
              ", num_heads ", num_heads, ")");
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "teacher_attention: scale must be finite and > 0, got ", scale);
  TORCH_CHECK(c <= 1 || qkv_in.stride(2) == 1,
              "teacher_attention: qkv must have unit stride along its last dim, got strides ", qkv_in.strides());
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max() / 2, "teacher_attention: N must be below 2^30, got ", n);

  out = at::empty({batch, n, num_heads * d}, qkv_in.options());
  if (out.numel() == 0) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "teacher_attention: the CUDA kernel needs compute capability >= 8.0, got ",
              prop->major, ".", prop->minor);

  // cp.async moves 16-byte chunks: a view whose rows are not 16-byte aligned is copied once.
  qkv = aligned16(qkv_in) ? qkv_in : at::empty_like(qkv_in, at::MemoryFormat::Contiguous).copy_(qkv_in);

  p.qkv = qkv.data_ptr();
  p.out = out.data_ptr();
  p.n = static_cast<int>(n);
  p.h = static_cast<int>(num_heads);
  p.num_q_tiles = 0;
  p.stride_b = qkv.stride(0);
  p.stride_n = qkv.stride(1);
  p.out_stride_b = out.stride(0);
  p.out_stride_n = out.stride(1);
  p.qk_scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e): exp(x) = exp2(x * log2 e)
  p.rope_sin = nullptr;
  p.rope_cos = nullptr;
  p.rope_stride = 0;
  p.rope_prefix = 0;
  return true;
}

}  // namespace

at::Tensor teacher_attention(const at::Tensor& qkv_in, int64_t num_heads, double scale) {
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  at::Tensor qkv, out;
  AttnParams p;
  int64_t d = 0;
  if (!prepare(qkv_in, num_heads, scale, qkv, out, p, d)) return out;
  launch_for_dtype<false>(p, qkv.scalar_type(), d, qkv.size(0) * num_heads, at::cuda::getCurrentCUDAStream());
  return out;
}

at::Tensor teacher_attention_rope(const at::Tensor& qkv_in, int64_t num_heads, double scale, const at::Tensor& sin,
                                  const at::Tensor& cos, int64_t rope_prefix) {
  const c10::cuda::CUDAGuard device_guard(qkv_in.device());
  at::Tensor qkv, out;
  AttnParams p;
  int64_t d = 0;
  const bool launch = prepare(qkv_in, num_heads, scale, qkv, out, p, d);
  const int64_t n = qkv_in.size(1);
  TORCH_CHECK(0 <= rope_prefix && rope_prefix <= n, "teacher_attention_rope: rope_prefix must be in [0, N = ", n,
              "], got ", rope_prefix);
  for (const at::Tensor* t : {&sin, &cos}) {
    TORCH_CHECK(t->defined() && t->is_cuda() && t->device() == qkv_in.device(),
                "teacher_attention_rope: sin and cos must be CUDA tensors on the device of qkv");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "teacher_attention_rope: sin and cos must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n - rope_prefix && t->size(1) == d / 2,
                "teacher_attention_rope: sin and cos must be (N - rope_prefix, d/2) = (", n - rope_prefix, ", ",
                d / 2, "), got ", t->sizes());
  }
  if (!launch) return out;
  const at::Tensor s = sin.stride(1) == 1 && sin.strides() == cos.strides() ? sin : sin.contiguous();
  const at::Tensor c = s.strides() == cos.strides() ? cos : cos.contiguous();
  TORCH_CHECK(s.strides() == c.strides(), "teacher_attention_rope: sin and cos must share their strides");
  p.rope_sin = s.data_ptr<float>();
  p.rope_cos = c.data_ptr<float>();
  p.rope_stride = s.stride(0);
  p.rope_prefix = static_cast<int>(rope_prefix);
  launch_for_dtype<true>(p, qkv.scalar_type(), d, qkv.size(0) * num_heads, at::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace cuda
}  // namespace leap_kernels
