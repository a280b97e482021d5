// csrc/cuda/attention_tiling.h -- index arithmetic of the teacher attention kernel: key/query tile
// schedule, shared-memory swizzle, and which smem row/chunk each lane hands to ldmatrix.
//
// Plain constexpr integer functions, host and device: teacher_attention.cu uses them, and
// tests/test_cuda_kernel_layout.py compiles this header with a host C++ compiler and checks
// them on the CPU against a model of ldmatrix and mma.sync (every (query, key) pair covered once,
// fragments equal to the matrix products, swizzle a bijection without bank conflicts).
#pragma once

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace leap_kernels {
namespace cuda {
namespace attn {

constexpr int kBlockN = 64;    // keys per key tile
constexpr int kKeyChunk = 16;  // granularity of the tail tile (the k extent of one m16n8k16)
constexpr int kWarpRows = 16;  // query rows per warp (the m extent of one m16n8k16)
constexpr int kChunkElems = 8; // 16-bit elements per 16-byte smem chunk (one ldmatrix row)

// ---- tile schedule -------------------------------------------------------------------------
LK_HD constexpr int num_query_tiles(int n, int block_m) { return (n + block_m - 1) / block_m; }
LK_HD constexpr int num_key_tiles(int n) { return (n + kBlockN - 1) / kBlockN; }
LK_HD constexpr int key_tile_start(int j) { return j * kBlockN; }
// Real keys in key tile j (1..64).
LK_HD constexpr int key_tile_keys(int n, int j) {
  return n - key_tile_start(j) < kBlockN ? n - key_tile_start(j) : kBlockN;
}
// 16-key chunks computed for key tile j (1..4): the tail tile does ceil(keys/16) chunks, not 4.
LK_HD constexpr int key_tile_chunks(int n, int j) { return (key_tile_keys(n, j) + kKeyChunk - 1) / kKeyChunk; }
// True when some computed key of tile j is past n (its logits are set to -inf before the max).
LK_HD constexpr bool key_tile_masked(int n, int j) { return key_tile_chunks(n, j) * kKeyChunk > key_tile_keys(n, j); }
// Rows of key tile j loaded into shared memory (rows past n are zero-filled by cp.async).
LK_HD constexpr int key_tile_rows(int n, int j) { return key_tile_chunks(n, j) * kKeyChunk; }

// ---- shared memory layout ------------------------------------------------------------------
// A tile of R rows x d 16-bit elements is stored row-major in 16-byte chunks, chunk c of row r at
// physical chunk c ^ (r % 8). ldmatrix reads one chunk from each of 8 consecutive rows per 8x8
// matrix; without the XOR those 8 chunks sit d*2 bytes apart (a multiple of 128 B) and hit the
// same four banks (8-way conflict); with it they cover all 32 banks.
LK_HD constexpr int swizzled_chunk(int row, int chunk) { return chunk ^ (row & 7); }
LK_HD constexpr int smem_offset(int row, int chunk, int head_dim) {
  return row * head_dim + swizzled_chunk(row, chunk) * kChunkElems;
}
// Element (row, col) of such a tile (the rotary embedding rotates channel pairs col, col + d/2 in place).
LK_HD constexpr int smem_element(int row, int col, int head_dim) {
  return smem_offset(row, col / kChunkElems, head_dim) + col % kChunkElems;
}

// ---- ldmatrix addressing (lane = 0..31; lanes 8i..8i+7 give the 8 row addresses of matrix i) ----
// Q (A operand of S = Q K^T, row-major 16x16 per k-step kk): matrices (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = registers a0a1, a2a3, a4a5, a6a7.
LK_HD constexpr int q_frag_row(int warp, int lane) { return warp * kWarpRows + (lane & 7) + ((lane >> 3) & 1) * 8; }
LK_HD constexpr int q_frag_chunk(int kk, int lane) { return 2 * kk + (lane >> 4); }
// K (B operand, col-major 16x8 = K rows of 8 keys, 16 channels), two n-tiles per x4 for the key
// chunk kc: matrices (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15)
// = b0b1 and b2b3 of n-tile 2kc, then of n-tile 2kc+1.
LK_HD constexpr int k_frag_row(int kc, int lane) { return kc * kKeyChunk + (lane >> 4) * 8 + (lane & 7); }
LK_HD constexpr int k_frag_chunk(int kk, int lane) { return 2 * kk + ((lane >> 3) & 1); }
// V (B operand of O += P V, k = keys, n = channels), ldmatrix .trans, two channel tiles per x4
// for the channel pair dp: matrices (keys 0-7, ch 0-7), (keys 8-15, ch 0-7), (keys 0-7, ch 8-15),
// (keys 8-15, ch 8-15) = b0b1 and b2b3 of channel tile 2dp, then of channel tile 2dp+1.
LK_HD constexpr int v_frag_row(int kc, int lane) { return kc * kKeyChunk + (lane & 7) + ((lane >> 3) & 1) * 8; }
LK_HD constexpr int v_frag_chunk(int dp, int lane) { return 2 * dp + (lane >> 4); }

// ---- accumulator (C of m16n8k16, 16x8 fp32) ownership: register i of lane -------------------
LK_HD constexpr int c_frag_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
LK_HD constexpr int c_frag_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

}  // namespace attn
}  // namespace cuda
}  // namespace leap_kernels
