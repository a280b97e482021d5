// Host-side declarations shared by the C++ sources of leap_kernels._C.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace leap_kernels {

// Bumped whenever an op schema or its semantics change: the Python side refuses a _C
// built from older sources (a stale build) instead of calling it with the wrong arguments.
constexpr int64_t kExtensionVersion = 2;

namespace cpu {

// The CPU twin of cuda::rows_loss_grad (csrc/cuda/cuda_kernels.h), same contract, plus:
//   x, t:    any strides (rows and channels), fp32/bf16/fp16.
//   col_sum: undefined, or (d,) fp32 contiguous: col_sum[j] += sum_i grad_x[i, j] (the bias
//            gradient of the fused loss, without another pass over grad_x).
//   x_bias:  undefined, or (d,) fp32 contiguous added to every row of x first (the fused loss's
//            bias, so that its projection GEMM needs no separate bias pass).
// Rows are processed in fixed blocks: results do not depend on the thread count.
void rows_loss_grad(const at::Tensor& x, const at::Tensor& t, bool normalize, double eps,
                    const c10::optional<at::Tensor>& row_scale, const at::Tensor& loss,
                    const at::Tensor& grad_x, const at::Tensor& grad_t, const at::Tensor& col_sum,
                    const at::Tensor& x_bias = at::Tensor());

// Asks for transparent huge pages (madvise) on the 2 MiB-aligned interior of a large, not yet
// touched CPU tensor: its first writes then fault 2 MiB at a time instead of 4 KiB (about 4x less
// time for a fresh 50 MB output on a Linux VM). No effect elsewhere; LEAP_KERNELS_CPU_THP=0 turns it off.
void advise_hugepages(const at::Tensor& t);

}  // namespace cpu
}  // namespace leap_kernels
