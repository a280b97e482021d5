// leap_kernels._C: operator schemas, the fused feature loss's chunk loop (shared by CPU and
// CUDA), and the CPU/CUDA registrations. The public ops are the Python custom ops of
// leap_kernels; these are the compiled backends they call.
#include "leap_kernels.h"

#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/version.h>

// The torch this was built against (setup.py passes e.g. 2.14.1+cu130 unquoted).
#define LEAP_KERNELS_STR2(x) #x
#define LEAP_KERNELS_STR(x) LEAP_KERNELS_STR2(x)
#ifdef LEAP_KERNELS_TORCH_VERSION_TOKENS
#define LEAP_KERNELS_TORCH_VERSION LEAP_KERNELS_STR(LEAP_KERNELS_TORCH_VERSION_TOKENS)
#else
#define LEAP_KERNELS_TORCH_VERSION "unknown"
#endif

#ifdef LEAP_KERNELS_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

#include <Python.h>

namespace leap_kernels {
namespace {

using at::Tensor;

bool has_cuda() {
#ifdef LEAP_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// One place where the rows kernel of the tensors' device is called.
// x_bias (CPU only): a (d,) fp32 row added to x inside the kernel.
void rows_kernel(const Tensor& x, const Tensor& t, bool normalize, double eps, const c10::optional<Tensor>& row_scale,
                 const Tensor& loss, const Tensor& grad_x, const Tensor& grad_t, const Tensor& col_sum,
                 const Tensor& x_bias = Tensor()) {
  if (x.is_cuda()) {
    TORCH_CHECK(!x_bias.defined(), "rows_kernel: x_bias is CPU only");
#ifdef LEAP_KERNELS_WITH_CUDA
    cuda::rows_loss_grad(x, t, normalize, eps, row_scale, loss, grad_x, grad_t);
    if (col_sum.defined() && grad_x.defined()) col_sum.add_(grad_x.sum(0, /*keepdim=*/false, at::kFloat));
    return;
#else
    TORCH_CHECK(false, "leap_kernels._C was built without CUDA kernels");
#endif
  }
  cpu::rows_loss_grad(x, t, normalize, eps, row_scale, loss, grad_x, grad_t, col_sum, x_bias);
}

std::tuple<Tensor, Tensor, Tensor> rows_loss_grad_op(const Tensor& x, const Tensor& t, bool normalize, double eps,
                                                     const c10::optional<Tensor>& row_scale, bool want_loss,
                                                     bool want_grad_x, bool want_grad_t) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == t.sizes(), "rows_loss_grad: x and t must be (m, d) of one shape, got ",
              x.sizes(), " and ", t.sizes());
  const int64_t m = x.size(0), d = x.size(1);
  Tensor loss = at::empty({want_loss ? m : 0}, x.options().dtype(at::kFloat));
  Tensor gx = want_grad_x ? at::empty({m, d}, x.options()) : at::empty({0}, x.options());
  Tensor gt = want_grad_t ? at::empty({m, d}, t.options()) : at::empty({0}, t.options());
  if (!x.is_cuda()) {  // fresh outputs written once: huge pages make their first touch cheap
    cpu::advise_hugepages(gx);
    cpu::advise_hugepages(gt);
  }
  c10::optional<Tensor> scale;
  if (row_scale.has_value() && row_scale->defined()) scale = row_scale->to(at::kFloat).contiguous();
  // CUDA kernels take unit channel stride; the CPU kernel takes any strides.
  Tensor xc = x.is_cuda() && x.stride(1) != 1 ? x.contiguous() : x;
  Tensor tc = t.is_cuda() && t.stride(1) != 1 ? t.contiguous() : t;
  rows_kernel(xc, tc, normalize, eps, scale, want_loss ? loss : Tensor(), want_grad_x ? gx : Tensor(),
              want_grad_t ? gt : Tensor(), Tensor());
  return {loss, gx, gt};
}

// The fused feature loss, chunk by chunk: P = bias + S_c W^T (ATen GEMM), one rows kernel that
// writes the per-token loss and G = dL/dP, then dS_c = G W, dW += G^T S_c, db += sum(G) with fp32
// accumulation. One reusable G buffer of (chunk, D_t); nothing of size (M, D_t); no host sync.
// Returns row_loss (M,) fp32 and, with want_grads, the gradients of sum_i row_scale[i] row_loss[i]:
// student (M, D_s) in student's dtype, weight (D_t, D_s) and bias (D_t,) in fp32 (bias: (0,) if absent).
std::tuple<Tensor, Tensor, Tensor, Tensor> feature_loss_chunks(const Tensor& student, const Tensor& weight,
                                                               const c10::optional<Tensor>& bias,
                                                               const Tensor& target, bool normalize, double eps,
                                                               bool want_grads, const c10::optional<Tensor>& row_scale,
                                                               int64_t chunk, bool cpu_16bit_gemm) {
  TORCH_CHECK(student.dim() == 2 && weight.dim() == 2 && target.dim() == 2, "feature_loss_chunks: 2-D inputs expected");
  const int64_t m = student.size(0), k = student.size(1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k && target.size(0) == m && target.size(1) == n,
              "feature_loss_chunks: shapes do not match: student ", student.sizes(), ", weight ", weight.sizes(),
              ", target ", target.sizes());
  TORCH_CHECK(chunk > 0, "feature_loss_chunks: chunk_tokens must be positive, got ", chunk);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool on_cuda = student.is_cuda();
  const auto f32 = student.options().dtype(at::kFloat);
  // The projection runs on student-dtype operands (weight is rounded to it, as autocast does). On
  // CUDA the 16-bit GEMMs run in the student dtype with fp32 accumulation (cuBLAS), the projection
  // and the weight gradient stored in fp32. On CPU they run in fp32 (upcast operands), unless the
  // caller says the CPU has native 16-bit dot products (cpu_16bit_gemm: AVX512-BF16 or AMX, where
  // oneDNN's bf16 GEMM is about 2.4x its fp32 one): then in the student dtype with fp32 accumulation
  // and 16-bit outputs, as eager PyTorch and autocast do on that CPU.
  const bool native16_cpu = !on_cuda && cpu_16bit_gemm && student.scalar_type() != at::kFloat;
  const bool upcast = (!on_cuda && !native16_cpu) || student.scalar_type() == at::kFloat;
  Tensor w_c = weight.to(student.scalar_type());
  if (upcast) w_c = w_c.to(at::kFloat);
  Tensor b32 = has_bias ? bias->to(at::kFloat) : Tensor();
  c10::optional<Tensor> scale;
  if (row_scale.has_value() && row_scale->defined()) scale = row_scale->to(at::kFloat).contiguous();

  Tensor row_loss = at::empty({m}, f32);
  Tensor grad_student, grad_weight, grad_bias;
  if (want_grads) {
    grad_student = at::empty({m, k}, student.options());
    if (!on_cuda) cpu::advise_hugepages(grad_student);
    grad_weight = at::zeros({n, k}, f32);
    grad_bias = at::zeros({has_bias ? n : 0}, f32);
  } else {
    grad_student = at::empty({0}, student.options());
    grad_weight = at::empty({0}, f32);
    grad_bias = at::empty({0}, f32);
  }
  const int64_t rows_max = std::min(m, chunk);
  // Upcast path: P in one reusable fp32 buffer, then G in place. CUDA 16-bit path: P is the fp32
  // output of the GEMM itself (no copy into a buffer; the caching allocator reuses the memory).
  Tensor proj = upcast ? at::empty({rows_max, n}, f32)
                : native16_cpu ? at::empty({rows_max, n}, student.options())  // P, then G in place
                               : Tensor();
  if (!on_cuda) cpu::advise_hugepages(proj);
  Tensor gw16;  // native 16-bit CPU GEMMs: one chunk's G^T S_c, added into the fp32 weight gradient
  if (want_grads && native16_cpu) gw16 = at::empty({n, k}, student.options());
  // CPU: the bias is added inside the rows kernel (P = S_c W^T by a plain GEMM; addmm would first
  // write the broadcast bias into P, one more pass over it). CUDA keeps addmm.
  const bool bias_in_rows = has_bias && !on_cuda;
  const Tensor bias_rows = bias_in_rows ? b32.contiguous() : Tensor();
  Tensor g16;                                   // CUDA 16-bit: G in the student dtype, for the GEMMs
  if (want_grads && !upcast) g16 = at::empty({rows_max, n}, student.options());
  Tensor ds_tmp;  // dS of one chunk in fp32 when the student is 16-bit and the GEMMs are fp32
  if (want_grads && upcast && student.scalar_type() != at::kFloat) ds_tmp = at::empty({rows_max, k}, f32);

  for (int64_t start = 0; start < m; start += chunk) {
    const int64_t stop = std::min(m, start + chunk);
    const int64_t rows = stop - start;
    Tensor s_c = student.slice(0, start, stop);
    if (upcast) s_c = s_c.to(at::kFloat);
    Tensor t_c = target.slice(0, start, stop);
    Tensor p;
    if (upcast || native16_cpu) {
      p = proj.narrow(0, 0, rows);
      if (has_bias && !bias_in_rows) at::addmm_out(p, b32, s_c, w_c.t());
      else at::mm_out(p, s_c, w_c.t());
    } else {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
      p = has_bias ? at::addmm(b32, s_c, w_c.t(), at::kFloat) : at::mm(s_c, w_c.t(), at::kFloat);
#else
      p = at::mm(s_c.to(at::kFloat), w_c.t().to(at::kFloat));
      if (has_bias) p.add_(b32);
#endif
    }
    c10::optional<Tensor> scale_c;
    if (scale.has_value()) scale_c = scale->slice(0, start, stop);
    Tensor loss_c = row_loss.slice(0, start, stop);
    if (!want_grads) {
      rows_kernel(p, t_c, normalize, eps, scale_c, loss_c, Tensor(), Tensor(), Tensor(),
                  bias_rows);
      continue;
    }
    Tensor g = (upcast || native16_cpu) ? p : g16.narrow(0, 0, rows);
    rows_kernel(p, t_c, normalize, eps, scale_c, loss_c, g, Tensor(), has_bias ? grad_bias : Tensor(),
                bias_rows);
    Tensor gs = grad_student.slice(0, start, stop);
    if (ds_tmp.defined()) {
      Tensor tmp = ds_tmp.narrow(0, 0, rows);
      at::mm_out(tmp, g, w_c);
      gs.copy_(tmp);
    } else {
      at::mm_out(gs, g, w_c);
    }
    if (upcast) {
      grad_weight.addmm_(g.t(), s_c);
    } else if (native16_cpu) {
      at::mm_out(gw16, g.t(), s_c);
      grad_weight.add_(gw16);
    } else {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
      grad_weight = at::addmm(grad_weight, g.t(), s_c, at::kFloat);  // one pass: no separate add
#else
      grad_weight.addmm_(g.t().to(at::kFloat), s_c.to(at::kFloat));
#endif
    }
  }
  return {row_loss, grad_student, grad_weight, grad_bias};
}

#ifdef LEAP_KERNELS_WITH_CUDA
Tensor teacher_attention_cuda(const Tensor& qkv, int64_t num_heads, double scale) {
  return cuda::teacher_attention(qkv, num_heads, scale);
}

Tensor teacher_attention_rope_cuda(const Tensor& qkv, int64_t num_heads, double scale, const Tensor& sin,
                                   const Tensor& cos, int64_t rope_prefix) {
  return cuda::teacher_attention_rope(qkv, num_heads, scale, sin, cos, rope_prefix);
}
#endif

}  // namespace
}  // namespace leap_kernels

TORCH_LIBRARY_FRAGMENT(leap_kernels, m) {
  m.def(
      "rows_loss_grad(Tensor x, Tensor t, bool normalize, float eps, Tensor? row_scale, bool want_loss, "
      "bool want_grad_x, bool want_grad_t) -> (Tensor, Tensor, Tensor)");
  m.def(
      "feature_loss_chunks(Tensor student, Tensor weight, Tensor? bias, Tensor target, bool normalize, float eps, "
      "bool want_grads, Tensor? row_scale, int chunk_tokens, bool cpu_16bit_gemm=False) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def("teacher_attention_fwd(Tensor qkv, int num_heads, float scale) -> Tensor");
  // Added without a version bump (no existing schema changed): the Python side checks that the loaded
  // build has it (leap_kernels._backends, OpSupport.ext_op).
  m.def(
      "teacher_attention_rope_fwd(Tensor qkv, int num_heads, float scale, Tensor sin, Tensor cos, "
      "int rope_prefix) -> Tensor");
}

TORCH_LIBRARY_IMPL(leap_kernels, CPU, m) {
  m.impl("rows_loss_grad", &leap_kernels::rows_loss_grad_op);
  m.impl("feature_loss_chunks", &leap_kernels::feature_loss_chunks);
}

#ifdef LEAP_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(leap_kernels, CUDA, m) {
  m.impl("rows_loss_grad", &leap_kernels::rows_loss_grad_op);
  m.impl("feature_loss_chunks", &leap_kernels::feature_loss_chunks);
  m.impl("teacher_attention_fwd", &leap_kernels::teacher_attention_cuda);
  m.impl("teacher_attention_rope_fwd", &leap_kernels::teacher_attention_rope_cuda);
}
#endif

// A plain Python module: the ops register themselves when the library is loaded. Its constants let
// the Python side reject a stale build (EXTENSION_VERSION) or one made for another torch.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "EXTENSION_VERSION", leap_kernels::kExtensionVersion) < 0 ||
      PyModule_AddIntConstant(mod, "WITH_CUDA", leap_kernels::has_cuda() ? 1 : 0) < 0 ||
      PyModule_AddStringConstant(mod, "TORCH_VERSION", LEAP_KERNELS_TORCH_VERSION) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
