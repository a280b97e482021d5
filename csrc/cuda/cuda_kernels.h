// csrc/cuda/cuda_kernels.h -- the interface between the C++ host code and the CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace leap_kernels {
namespace cuda {

// Per-token squared error and its gradients in one launch (the fused loss's epilogue and the
// token-normalized MSE's row kernel are both this function).
//   x, t:      (m, d) CUDA tensors, fp32/bf16/fp16 (may differ), unit stride along d, any row stride.
//   normalize: false: e = x - t;  true: e = LN(x) - LN(t), LN over d, no affine, eps inside the
//              square root, fp32 two-pass statistics.
//   row_scale: optional (m,) fp32 contiguous; gradients are those of sum_i row_scale[i] * loss[i]
//              (row_scale = 1 when absent).
//   loss:      undefined tensor, or (m,) fp32 contiguous: loss[i] = sum_j e_ij^2.
//   grad_x:    undefined, or (m, d) fp32/bf16/fp16, unit stride along d, any row stride: d/dx.
//              May alias x (each row is fully read before it is written).
//   grad_t:    undefined, or (m, d) likewise: d/dt.
// Plain MSE: grad_x = 2 * s_i * (x - t), grad_t = -grad_x. Token-normalized: with x_hat, rstd_x,
// g = 2 * s_i * (x_hat - t_hat): grad_x = rstd_x * (g - mean(g) - x_hat * mean(g * x_hat)),
// grad_t = -rstd_t * (g - mean(g) - t_hat * mean(g * t_hat)).
// Asynchronous on the current stream; no host sync, no allocation.
void rows_loss_grad(const at::Tensor& x, const at::Tensor& t, bool normalize, double eps,
                    const c10::optional<at::Tensor>& row_scale, const at::Tensor& loss,
                    const at::Tensor& grad_x, const at::Tensor& grad_t);

// Teacher attention forward (inference) from the packed qkv of a ViT block.
//   qkv: (B, N, 3*H*d) CUDA, bf16/fp16, timm's (B, N, 3, H, d) layout, unit last stride, any
//        batch/token strides (read in place, no copy); d in {64, 128}; scale > 0.
//   returns (B, N, H*d) contiguous in qkv's dtype:
//        (softmax(q k^T * scale) v).transpose(1, 2).reshape(B, N, H*d).
// Input validation happens in Python before this is called; TORCH_CHECK the preconditions anyway.
at::Tensor teacher_attention(const at::Tensor& qkv, int64_t num_heads, double scale);

// The same with rotary position embedding (DINOv3; timm's EvaAttention, half layout): q and k of token
// t >= rope_prefix are rotated, channel j < d/2 paired with j + d/2, by the angle of row t - rope_prefix
// of sin, cos ((N - rope_prefix, d/2) float32 CUDA tensors, unit column stride, equal strides):
// a cos - b sin, b cos + a sin in fp32, rounded to the input dtype. The rotation happens on the q and
// k tiles in shared memory; nothing rotated is written to global memory.
at::Tensor teacher_attention_rope(const at::Tensor& qkv, int64_t num_heads, double scale, const at::Tensor& sin,
                                  const at::Tensor& cos, int64_t rope_prefix);

}  // namespace cuda
}  // namespace leap_kernels
