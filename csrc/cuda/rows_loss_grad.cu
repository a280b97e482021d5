// csrc/cuda/rows_loss_grad.cu -- per-token squared error (plain or token-normalized) and its
// gradients, one launch: the epilogue of the fused feature loss and the row kernel of the
// token-normalized MSE.
//
// Tiling. A row (token) needs all of its d channels before anything can be written (the
// statistics of the token-normalized loss, and the row loss), so one row belongs to one group of
// TPR threads ("threads per row") and stays in registers between the passes:
//   * d <= 1024:  a row per warp (TPR = 32), 4 rows per 128-thread block; reductions are warp
//                 shuffles only (no shared memory, no __syncthreads).
//   * d <= 16384: a row per block (TPR = 256 or 512); warp shuffles, then one shared-memory
//                 exchange per reduction (each reduction stage has its own buffer, so one barrier
//                 per stage suffices).
//   * larger d:   a row per 512-thread block that streams the row from global memory once per pass
//                 (correct for any d, not tuned).
// Thread `lane` of a row owns the 8-element groups g*TPR + lane (g < NG), i.e. channels
// [8*(g*TPR + lane), +8): consecutive threads touch consecutive 16 (bf16/fp16) or 32 (fp32) bytes,
// so every load and store is coalesced. The register cache is x[NG][8] and t[NG][8] in fp32.
//
// Vector access. A group is read with 16-byte loads (one uint4 for 16-bit types, two float4 for
// fp32) when the tensor allows it: d % 8 == 0, 16-byte aligned base pointer and row stride a
// multiple of 16 bytes. Otherwise (or for any tensor that fails the test) element loads with
// bounds checks are used. The choice is made per tensor on the host and passed as a flag
// (warp-uniform branch), so only the input dtypes are template parameters: 9 (x, t) dtype pairs;
// the dtype of each gradient output is a runtime switch at the store.
//
// Numerics. Everything is fp32. Token-normalized statistics are two-pass (mean, then the mean of
// squared deviations of the register-held values: no cancellation for tokens with a large mean),
// rstd = 1 / sqrt(var + eps) with IEEE division and square root (as the Triton kernel). All
// threads of a row sum the per-warp partials in the same order, so they agree bit for bit on the
// statistics. No max/min is used anywhere: NaN in x or t propagates to the loss and gradients.
//
// Aliasing. grad_x may be x (and grad_t may be t): each element is written only by the thread
// that read it, after the whole row is in registers; the large-d streaming path likewise reads
// x[j] and t[j] before writing element j in its final pass. No __restrict__ on these pointers.

#include "cuda_kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

namespace leap_kernels {
namespace cuda {
namespace {

enum class OutDType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct RowsParams {
  const void* x;
  const void* t;
  const float* row_scale;  // nullptr: 1
  float* loss;             // nullptr: not written
  void* grad_x;            // nullptr: not written
  void* grad_t;            // nullptr: not written
  int64_t m;
  int d;
  int64_t stride_x, stride_t, stride_gx, stride_gt;  // row strides, in elements
  float eps;
  OutDType gx_dtype, gt_dtype;
  bool normalize;
  bool vec_x, vec_t, vec_gx, vec_gt;  // 16-byte access allowed for this tensor
};

constexpr int kGroup = 8;  // channels per thread and group: 16 bytes of a 16-bit type

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// v[0..7] = row[col0 .. col0+7] in fp32, zeros past d.
template <typename T>
__device__ __forceinline__ void load_group(const T* row, int col0, int d, bool vec, float (&v)[kGroup]) {
  if (vec) {  // host checked: d % 8 == 0 (so the group is whole), 16-byte aligned rows
    if constexpr (sizeof(T) == 4) {
      const float4* p = reinterpret_cast<const float4*>(row + col0);
      const float4 a = p[0];
      const float4 b = p[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + col0);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) v[i] = to_f32(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kGroup; ++i) v[i] = (col0 + i < d) ? to_f32(row[col0 + i]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_group_t(T* row, int col0, int d, bool vec, const float (&v)[kGroup]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      float4* p = reinterpret_cast<float4*>(row + col0);
      p[0] = make_float4(v[0], v[1], v[2], v[3]);
      p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) e[i] = from_f32<T>(v[i]);
      *reinterpret_cast<uint4*>(row + col0) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kGroup; ++i)
      if (col0 + i < d) row[col0 + i] = from_f32<T>(v[i]);
  }
}

// Row `row` of an output of runtime dtype `dt` (row stride in elements).
__device__ __forceinline__ void store_group(void* base, OutDType dt, int64_t row, int64_t stride, int col0, int d,
                                            bool vec, const float (&v)[kGroup]) {
  switch (dt) {
    case OutDType::kF32:
      store_group_t(static_cast<float*>(base) + row * stride, col0, d, vec, v);
      break;
    case OutDType::kBF16:
      store_group_t(static_cast<__nv_bfloat16*>(base) + row * stride, col0, d, vec, v);
      break;
    default:
      store_group_t(static_cast<__half*>(base) + row * stride, col0, d, vec, v);
      break;
  }
}

// Sums v[0..K) over the TPR threads of a row; every thread of the row gets the same totals.
// TPR == 32: shuffles only. TPR > 32 (the row is the whole block): shuffles, then the warps'
// partials through `smem` (TPR/32 * K floats, a fresh buffer for every call: no trailing barrier).
template <int TPR, int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if constexpr (TPR > 32) {
    constexpr int kWarps = TPR / 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += smem[w * K + k];  // same order in every thread
      v[k] = s;
    }
  }
}

// Row kernel with the row cached in registers. Block = ROWS * TPR threads; row capacity
// TPR * NG * 8 channels (the host picks the smallest config that holds d).
template <typename TX, typename TT, int TPR, int NG, int ROWS>
__global__ void __launch_bounds__(TPR * ROWS) rows_loss_grad_kernel(const RowsParams p) {
  static_assert(ROWS == 1 || TPR == 32, "several rows per block only with a row per warp");
  constexpr int kWarps = TPR / 32;
  __shared__ float red[3][kWarps * 4];  // one buffer per reduction stage (unused when TPR == 32)

  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / TPR;
  if (row >= p.m) return;  // whole warps (ROWS > 1) or whole blocks (ROWS == 1): no barrier is skipped
  const int d = p.d;
  const TX* xr = static_cast<const TX*>(p.x) + row * p.stride_x;
  const TT* tr = static_cast<const TT*>(p.t) + row * p.stride_t;

  float x[NG][kGroup], t[NG][kGroup];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int col0 = (g * TPR + lane) * kGroup;
    if (col0 < d) {
      load_group(xr, col0, d, p.vec_x, x[g]);
      load_group(tr, col0, d, p.vec_t, t[g]);
    } else {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) x[g][i] = t[g][i] = 0.0f;
    }
  }
  const float two_s = 2.0f * (p.row_scale != nullptr ? p.row_scale[row] : 1.0f);
  const bool want_grads = p.grad_x != nullptr || p.grad_t != nullptr;

  if (!p.normalize) {
    // Plain MSE: e = x - t (zero past d, as both were loaded as zero).
    if (p.loss != nullptr) {
      float acc[1] = {0.0f};
#pragma unroll
      for (int g = 0; g < NG; ++g)
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          const float e = x[g][i] - t[g][i];
          acc[0] += e * e;
        }
      row_sum<TPR, 1>(acc, red[0]);
      if (lane == 0) p.loss[row] = acc[0];
    }
    if (want_grads) {
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        const int col0 = (g * TPR + lane) * kGroup;
        if (col0 >= d) continue;
        float gx[kGroup], gt[kGroup];
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          gx[i] = two_s * (x[g][i] - t[g][i]);
          gt[i] = -gx[i];
        }
        if (p.grad_x != nullptr) store_group(p.grad_x, p.gx_dtype, row, p.stride_gx, col0, d, p.vec_gx, gx);
        if (p.grad_t != nullptr) store_group(p.grad_t, p.gt_dtype, row, p.stride_gt, col0, d, p.vec_gt, gt);
      }
    }
    return;
  }

  // Token-normalized. Pass 1: means.
  const float inv_d = 1.0f / static_cast<float>(d);
  float s1[2] = {0.0f, 0.0f};
#pragma unroll
  for (int g = 0; g < NG; ++g)
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      s1[0] += x[g][i];
      s1[1] += t[g][i];
    }
  row_sum<TPR, 2>(s1, red[0]);
  const float mean_x = s1[0] * inv_d, mean_t = s1[1] * inv_d;

  // Pass 2: center in place (zero past d), variances.
  float s2[2] = {0.0f, 0.0f};
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int col0 = (g * TPR + lane) * kGroup;
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const bool in = col0 + i < d;
      x[g][i] = in ? x[g][i] - mean_x : 0.0f;
      t[g][i] = in ? t[g][i] - mean_t : 0.0f;
      s2[0] += x[g][i] * x[g][i];
      s2[1] += t[g][i] * t[g][i];
    }
  }
  row_sum<TPR, 2>(s2, red[1]);
  const float rstd_x = 1.0f / sqrtf(s2[0] * inv_d + p.eps);
  const float rstd_t = 1.0f / sqrtf(s2[1] * inv_d + p.eps);

  // Pass 3: normalized rows in place; loss, and the three projections the gradients need.
  float s3[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // sum diff^2, sum g, sum g*x_hat, sum g*t_hat
#pragma unroll
  for (int g = 0; g < NG; ++g)
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      x[g][i] *= rstd_x;
      t[g][i] *= rstd_t;
      const float diff = x[g][i] - t[g][i];
      const float gr = two_s * diff;
      s3[0] += diff * diff;
      s3[1] += gr;
      s3[2] += gr * x[g][i];
      s3[3] += gr * t[g][i];
    }
  if (!want_grads) {
    float acc[1] = {s3[0]};
    row_sum<TPR, 1>(acc, red[2]);
    if (lane == 0) p.loss[row] = acc[0];
    return;
  }
  row_sum<TPR, 4>(s3, red[2]);
  if (p.loss != nullptr && lane == 0) p.loss[row] = s3[0];
  const float g_mean = s3[1] * inv_d, gx_proj = s3[2] * inv_d, gt_proj = s3[3] * inv_d;
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const int col0 = (g * TPR + lane) * kGroup;
    if (col0 >= d) continue;
    float gx[kGroup], gt[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const float gr = two_s * (x[g][i] - t[g][i]);
      gx[i] = rstd_x * (gr - g_mean - x[g][i] * gx_proj);
      gt[i] = -rstd_t * (gr - g_mean - t[g][i] * gt_proj);
    }
    if (p.grad_x != nullptr) store_group(p.grad_x, p.gx_dtype, row, p.stride_gx, col0, d, p.vec_gx, gx);
    if (p.grad_t != nullptr) store_group(p.grad_t, p.gt_dtype, row, p.stride_gt, col0, d, p.vec_gt, gt);
  }
}

// Any d: a row per block, re-read from global memory in every pass (element loads).
constexpr int kStreamThreads = 512;

template <typename TX, typename TT>
__global__ void __launch_bounds__(kStreamThreads) rows_loss_grad_stream_kernel(const RowsParams p) {
  __shared__ float red[3][(kStreamThreads / 32) * 4];
  const int64_t row = blockIdx.x;
  const int d = p.d;
  const TX* xr = static_cast<const TX*>(p.x) + row * p.stride_x;
  const TT* tr = static_cast<const TT*>(p.t) + row * p.stride_t;
  const float two_s = 2.0f * (p.row_scale != nullptr ? p.row_scale[row] : 1.0f);
  const bool want_grads = p.grad_x != nullptr || p.grad_t != nullptr;

  float mean_x = 0.0f, mean_t = 0.0f, rstd_x = 1.0f, rstd_t = 1.0f;
  float g_mean = 0.0f, gx_proj = 0.0f, gt_proj = 0.0f;
  const float inv_d = 1.0f / static_cast<float>(d);
  if (p.normalize) {
    float s1[2] = {0.0f, 0.0f};
    for (int j = threadIdx.x; j < d; j += kStreamThreads) {
      s1[0] += to_f32(xr[j]);
      s1[1] += to_f32(tr[j]);
    }
    row_sum<kStreamThreads, 2>(s1, red[0]);
    mean_x = s1[0] * inv_d;
    mean_t = s1[1] * inv_d;
    float s2[2] = {0.0f, 0.0f};
    for (int j = threadIdx.x; j < d; j += kStreamThreads) {
      const float xc = to_f32(xr[j]) - mean_x, tc = to_f32(tr[j]) - mean_t;
      s2[0] += xc * xc;
      s2[1] += tc * tc;
    }
    row_sum<kStreamThreads, 2>(s2, red[1]);
    rstd_x = 1.0f / sqrtf(s2[0] * inv_d + p.eps);
    rstd_t = 1.0f / sqrtf(s2[1] * inv_d + p.eps);
  }
  // Loss (and the normalized loss's projections).
  if (p.loss != nullptr || (p.normalize && want_grads)) {
    float s3[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = threadIdx.x; j < d; j += kStreamThreads) {
      const float xh = (to_f32(xr[j]) - mean_x) * rstd_x, th = (to_f32(tr[j]) - mean_t) * rstd_t;
      const float diff = xh - th, gr = two_s * diff;
      s3[0] += diff * diff;
      s3[1] += gr;
      s3[2] += gr * xh;
      s3[3] += gr * th;
    }
    row_sum<kStreamThreads, 4>(s3, red[2]);
    if (p.loss != nullptr && threadIdx.x == 0) p.loss[row] = s3[0];
    g_mean = s3[1] * inv_d;
    gx_proj = s3[2] * inv_d;
    gt_proj = s3[3] * inv_d;
  }
  if (!want_grads) return;
  for (int j = threadIdx.x; j < d; j += kStreamThreads) {
    // Both inputs of element j are read before either gradient of element j is written.
    const float xv = to_f32(xr[j]), tv = to_f32(tr[j]);
    float gx[kGroup] = {}, gt[kGroup] = {};
    if (p.normalize) {
      const float xh = (xv - mean_x) * rstd_x, th = (tv - mean_t) * rstd_t;
      const float gr = two_s * (xh - th);
      gx[0] = rstd_x * (gr - g_mean - xh * gx_proj);
      gt[0] = -rstd_t * (gr - g_mean - th * gt_proj);
    } else {
      gx[0] = two_s * (xv - tv);
      gt[0] = -gx[0];
    }
    // One element: a group store with d' = j + 1 writes exactly column j.
    if (p.grad_x != nullptr) store_group(p.grad_x, p.gx_dtype, row, p.stride_gx, j, j + 1, false, gx);
    if (p.grad_t != nullptr) store_group(p.grad_t, p.gt_dtype, row, p.stride_gt, j, j + 1, false, gt);
  }
}

// ----------------------------------------------------------------------------- host side

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_float_type(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    default: TORCH_CHECK(false, "rows_loss_grad: unsupported dtype ", st);
  }
}

bool is_float_type(at::ScalarType st) { return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf; }

OutDType out_dtype(at::ScalarType st) {
  return st == at::kFloat ? OutDType::kF32 : (st == at::kBFloat16 ? OutDType::kBF16 : OutDType::kF16);
}

// 16-byte access possible for every row of a (m, d) tensor with unit channel stride.
bool vectorizable(const at::Tensor& a) {
  const int64_t m = a.size(0), d = a.size(1);
  const int64_t es = a.element_size();
  if (d % kGroup != 0) return false;
  if (reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 != 0) return false;
  return m <= 1 || (a.stride(0) * es) % 16 == 0;
}

void check_rows_tensor(const at::Tensor& a, const char* name, const at::Tensor& x) {
  TORCH_CHECK(a.is_cuda(), "rows_loss_grad: ", name, " must be a CUDA tensor, got device ", a.device());
  TORCH_CHECK(a.device() == x.device(), "rows_loss_grad: ", name, " must be on ", x.device(), " (as x), got ",
              a.device());
  TORCH_CHECK(a.dim() == 2, "rows_loss_grad: ", name, " must be 2-D (m, d), got shape ", a.sizes());
  TORCH_CHECK(a.sizes() == x.sizes(), "rows_loss_grad: ", name, " must have x's shape ", x.sizes(), ", got ",
              a.sizes());
  TORCH_CHECK(is_float_type(a.scalar_type()), "rows_loss_grad: ", name,
              " must be float32, bfloat16 or float16, got ", a.scalar_type());
  TORCH_CHECK(a.size(1) <= 1 || a.stride(1) == 1, "rows_loss_grad: ", name,
              " must have unit stride along d, got strides ", a.strides());
}

template <typename TX, typename TT, int TPR, int NG, int ROWS>
void launch_cached(const RowsParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.m + ROWS - 1) / ROWS;
  rows_loss_grad_kernel<TX, TT, TPR, NG, ROWS><<<static_cast<unsigned>(blocks), TPR * ROWS, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TX, typename TT>
void launch_rows(const RowsParams& p, cudaStream_t stream) {
  // Smallest configuration whose register cache (TPR * NG * 8 channels) holds the row.
  const int d = p.d;
  if (d <= 32 * 8 * 1) return launch_cached<TX, TT, 32, 1, 4>(p, stream);
  if (d <= 32 * 8 * 2) return launch_cached<TX, TT, 32, 2, 4>(p, stream);
  if (d <= 32 * 8 * 4) return launch_cached<TX, TT, 32, 4, 4>(p, stream);
  if (d <= 256 * 8 * 1) return launch_cached<TX, TT, 256, 1, 1>(p, stream);
  if (d <= 256 * 8 * 2) return launch_cached<TX, TT, 256, 2, 1>(p, stream);
  if (d <= 512 * 8 * 2) return launch_cached<TX, TT, 512, 2, 1>(p, stream);
  if (d <= 512 * 8 * 4) return launch_cached<TX, TT, 512, 4, 1>(p, stream);
  rows_loss_grad_stream_kernel<TX, TT><<<static_cast<unsigned>(p.m), kStreamThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rows_loss_grad(const at::Tensor& x, const at::Tensor& t, bool normalize, double eps,
                    const c10::optional<at::Tensor>& row_scale, const at::Tensor& loss,
                    const at::Tensor& grad_x, const at::Tensor& grad_t) {
  TORCH_CHECK(x.defined() && t.defined(), "rows_loss_grad: x and t must be defined tensors");
  TORCH_CHECK(x.is_cuda(), "rows_loss_grad: x must be a CUDA tensor, got device ", x.device());
  check_rows_tensor(x, "x", x);
  check_rows_tensor(t, "t", x);
  const int64_t m = x.size(0), d = x.size(1);
  TORCH_CHECK(d <= std::numeric_limits<int>::max() / 2, "rows_loss_grad: d must be below 2^30, got ", d);
  TORCH_CHECK(m <= std::numeric_limits<int>::max(), "rows_loss_grad: at most 2^31 - 1 rows, got m = ", m);
  TORCH_CHECK(!normalize || eps >= 0.0, "rows_loss_grad: eps must be >= 0, got ", eps);
  const at::Tensor* scale = (row_scale.has_value() && row_scale->defined()) ? &row_scale.value() : nullptr;
  if (scale != nullptr) {
    TORCH_CHECK(scale->device() == x.device(), "rows_loss_grad: row_scale must be on ", x.device(), ", got ",
                scale->device());
    TORCH_CHECK(scale->scalar_type() == at::kFloat, "rows_loss_grad: row_scale must be float32, got ",
                scale->scalar_type());
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == m, "rows_loss_grad: row_scale must have shape (", m,
                ",), got ", scale->sizes());
    TORCH_CHECK(scale->is_contiguous(), "rows_loss_grad: row_scale must be contiguous, got strides ",
                scale->strides());
  }
  if (loss.defined()) {
    TORCH_CHECK(loss.device() == x.device(), "rows_loss_grad: loss must be on ", x.device(), ", got ", loss.device());
    TORCH_CHECK(loss.scalar_type() == at::kFloat, "rows_loss_grad: loss must be float32, got ", loss.scalar_type());
    TORCH_CHECK(loss.dim() == 1 && loss.size(0) == m, "rows_loss_grad: loss must have shape (", m, ",), got ",
                loss.sizes());
    TORCH_CHECK(loss.is_contiguous(), "rows_loss_grad: loss must be contiguous, got strides ", loss.strides());
  }
  if (grad_x.defined()) check_rows_tensor(grad_x, "grad_x", x);
  if (grad_t.defined()) check_rows_tensor(grad_t, "grad_t", x);
  if (m == 0 || !(loss.defined() || grad_x.defined() || grad_t.defined())) return;

  const c10::cuda::CUDAGuard device_guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (d == 0) {  // empty rows: zero loss, nothing to differentiate
    if (loss.defined()) C10_CUDA_CHECK(cudaMemsetAsync(loss.data_ptr(), 0, sizeof(float) * m, stream));
    return;
  }

  RowsParams p;
  p.x = x.data_ptr();
  p.t = t.data_ptr();
  p.row_scale = scale != nullptr ? scale->data_ptr<float>() : nullptr;
  p.loss = loss.defined() ? loss.data_ptr<float>() : nullptr;
  p.grad_x = grad_x.defined() ? grad_x.data_ptr() : nullptr;
  p.grad_t = grad_t.defined() ? grad_t.data_ptr() : nullptr;
  p.m = m;
  p.d = static_cast<int>(d);
  p.stride_x = x.stride(0);
  p.stride_t = t.stride(0);
  p.stride_gx = grad_x.defined() ? grad_x.stride(0) : 0;
  p.stride_gt = grad_t.defined() ? grad_t.stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.gx_dtype = grad_x.defined() ? out_dtype(grad_x.scalar_type()) : OutDType::kF32;
  p.gt_dtype = grad_t.defined() ? out_dtype(grad_t.scalar_type()) : OutDType::kF32;
  p.normalize = normalize;
  p.vec_x = vectorizable(x);
  p.vec_t = vectorizable(t);
  p.vec_gx = grad_x.defined() && vectorizable(grad_x);
  p.vec_gt = grad_t.defined() && vectorizable(grad_t);

  dispatch_float_type(x.scalar_type(), [&](auto x_tag) {
    dispatch_float_type(t.scalar_type(), [&](auto t_tag) {
      using TX = typename decltype(x_tag)::type;
      using TT = typename decltype(t_tag)::type;
      launch_rows<TX, TT>(p, stream);
    });
  });
}

}  // namespace cuda
}  // namespace leap_kernels
