// CPU row kernel: per-token squared error (plain or token-normalized) and its gradients in
// one pass per row, fp32 statistics, at::vec inner loops, rows split across threads.
// setup.py passes LEAP_KERNELS_CPU_AVX2 (with -mavx2 -mfma -mf16c) on x86-64 build machines that
// have AVX2: at::vec then uses its 256-bit AVX2 implementation here (its own inline namespace, so
// no clash with the default one the rest of the extension sees).
#ifdef LEAP_KERNELS_CPU_AVX2
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include "../leap_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace leap_kernels {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

// A row as fp32: the row itself when it already is unit-stride fp32, else a converted copy.
const float* load_row(const char* base, at::ScalarType dtype, int64_t stride, int64_t d, float* scratch) {
  if (dtype == at::kFloat) {
    const float* p = reinterpret_cast<const float*>(base);
    if (stride == 1) return p;
    for (int64_t j = 0; j < d; ++j) scratch[j] = p[j * stride];
  } else if (dtype == at::kBFloat16) {
    const c10::BFloat16* p = reinterpret_cast<const c10::BFloat16*>(base);
    for (int64_t j = 0; j < d; ++j) scratch[j] = static_cast<float>(p[j * stride]);
  } else {
    const c10::Half* p = reinterpret_cast<const c10::Half*>(base);
    for (int64_t j = 0; j < d; ++j) scratch[j] = static_cast<float>(p[j * stride]);
  }
  return scratch;
}

// Where to compute a gradient row: straight into the output when it is fp32, else a scratch row.
float* grad_row(char* base, at::ScalarType dtype, float* scratch) {
  return dtype == at::kFloat ? reinterpret_cast<float*>(base) : scratch;
}

void store_row(const float* src, char* base, at::ScalarType dtype, int64_t d) {
  if (dtype == at::kFloat) return;  // computed in place
  if (dtype == at::kBFloat16) {
    c10::BFloat16* p = reinterpret_cast<c10::BFloat16*>(base);
    for (int64_t j = 0; j < d; ++j) p[j] = static_cast<c10::BFloat16>(src[j]);
  } else {
    c10::Half* p = reinterpret_cast<c10::Half*>(base);
    for (int64_t j = 0; j < d; ++j) p[j] = static_cast<c10::Half>(src[j]);
  }
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Calls body(j, r, full) over [0, d) in steps of one vector: full vectors with full = true_type
// (plain loads and stores), then the tail once with full = false_type and r < kV valid lanes
// (masked loads that zero the padding, partial stores).
template <typename Body>
inline void for_each_vec(int64_t d, Body&& body) {
  int64_t j = 0;
  for (; j + kV <= d; j += kV) body(j, kV, std::true_type{});
  if (j < d) body(j, d - j, std::false_type{});
}

template <bool Full>
inline Vec load(const float* p, int64_t r) {
  if constexpr (Full) {
    return Vec::loadu(p);
  } else {
    return Vec::loadu(p, r);
  }
}

template <bool Full>
inline void store(const Vec& v, float* p, int64_t r) {
  if constexpr (Full) {
    v.store(p);
  } else {
    v.store(p, r);
  }
}

// Padding lanes of a tail vector set to 0.
template <bool Full>
inline Vec keep(const Vec& v, int64_t r) {
  if constexpr (Full) {
    return v;
  } else {
    return Vec::set(Vec(0.f), v, r);
  }
}

// Sums of x and t in one sweep.
inline void sum2(const float* x, const float* t, int64_t d, float& sx, float& st) {
  Vec ax(0.f), at_(0.f);
  for_each_vec(d, [&](int64_t j, int64_t r, auto full) {
    constexpr bool F = decltype(full)::value;
    ax += load<F>(x + j, r);
    at_ += load<F>(t + j, r);
  });
  sx = hsum(ax);
  st = hsum(at_);
}

// Centered sums of squares (two-pass variance: no cancellation for large-mean tokens).
inline void centered_sq2(const float* x, const float* t, int64_t d, float mx, float mt, float& vx, float& vt) {
  const Vec vmx(mx), vmt(mt);
  Vec ax(0.f), at_(0.f);
  for_each_vec(d, [&](int64_t j, int64_t r, auto full) {
    constexpr bool F = decltype(full)::value;
    // Padding lanes load 0 and would add mean^2: masked out.
    Vec cx = keep<F>(load<F>(x + j, r) - vmx, r), ct = keep<F>(load<F>(t + j, r) - vmt, r);
    ax = at::vec::fmadd(cx, cx, ax);
    at_ = at::vec::fmadd(ct, ct, at_);
  });
  vx = hsum(ax);
  vt = hsum(at_);
}

struct Args {
  const char* x;
  const char* t;
  at::ScalarType x_dtype, t_dtype, gx_dtype, gt_dtype;
  int64_t x_s0, x_s1, t_s0, t_s1, gx_s0, gt_s0;
  int64_t d;
  bool normalize;
  float eps;
  const float* row_scale;
  float* loss;
  char* gx;
  char* gt;
  float* col_sum_partial;  // this block's (d,) partial column sums of grad_x, or null
};

void process_rows(const Args& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t d = a.d;
  float* xs = scratch;
  float* ts = scratch + d;
  float* gxs = scratch + 2 * d;
  float* gts = scratch + 3 * d;
  const size_t xe = c10::elementSize(a.x_dtype), te = c10::elementSize(a.t_dtype);
  const size_t gxe = c10::elementSize(a.gx_dtype), gte = c10::elementSize(a.gt_dtype);
  const float inv_d = 1.0f / static_cast<float>(d);
  for (int64_t i = begin; i < end; ++i) {
    // grad_x may alias x: load (or point at) x before anything is written.
    const float* x = load_row(a.x + i * a.x_s0 * xe, a.x_dtype, a.x_s1, d, xs);
    const float* t = load_row(a.t + i * a.t_s0 * te, a.t_dtype, a.t_s1, d, ts);
    const float s = a.row_scale ? a.row_scale[i] : 1.0f;
    char* gx_base = a.gx ? a.gx + i * a.gx_s0 * gxe : nullptr;
    char* gt_base = a.gt ? a.gt + i * a.gt_s0 * gte : nullptr;
    float* gx = gx_base ? grad_row(gx_base, a.gx_dtype, gxs) : nullptr;
    float* gt = gt_base ? grad_row(gt_base, a.gt_dtype, gts) : nullptr;
    float* cs = a.col_sum_partial;
    if (!a.normalize) {
      const Vec two_s(2.0f * s);
      Vec acc(0.f);
      for_each_vec(d, [&](int64_t j, int64_t r, auto full) {
        constexpr bool F = decltype(full)::value;
        Vec e = load<F>(x + j, r) - load<F>(t + j, r);  // padding lanes: 0 - 0
        acc = at::vec::fmadd(e, e, acc);
        if (gx || gt) {
          Vec g = two_s * e;
          if (gx) store<F>(g, gx + j, r);
          if (gt) store<F>(Vec(0.f) - g, gt + j, r);
          if (cs) store<F>(load<F>(cs + j, r) + g, cs + j, r);
        }
      });
      if (a.loss) a.loss[i] = hsum(acc);
    } else {
      float sx, st, vx, vt;
      sum2(x, t, d, sx, st);
      const float mx = sx * inv_d, mt = st * inv_d;
      centered_sq2(x, t, d, mx, mt, vx, vt);
      const float rx = 1.0f / std::sqrt(vx * inv_d + a.eps);
      const float rt = 1.0f / std::sqrt(vt * inv_d + a.eps);
      const Vec vmx(mx), vmt(mt), vrx(rx), vrt(rt);
      Vec l(0.f), sd(0.f), sdx(0.f), sdt(0.f);
      for_each_vec(d, [&](int64_t j, int64_t r, auto full) {
        constexpr bool F = decltype(full)::value;
        // Padding lanes: x_hat = -mean * rstd, not 0: masked out.
        Vec xh = keep<F>((load<F>(x + j, r) - vmx) * vrx, r);
        Vec th = keep<F>((load<F>(t + j, r) - vmt) * vrt, r);
        Vec diff = xh - th;
        l = at::vec::fmadd(diff, diff, l);
        sd += diff;
        sdx = at::vec::fmadd(diff, xh, sdx);
        sdt = at::vec::fmadd(diff, th, sdt);
      });
      if (a.loss) a.loss[i] = hsum(l);
      if (gx || gt) {
        // g = 2 s diff; mean(g), mean(g x_hat), mean(g t_hat) from the sums above.
        const float two_s = 2.0f * s;
        const Vec vts(two_s), gmean(two_s * hsum(sd) * inv_d);
        const Vec gxp(two_s * hsum(sdx) * inv_d), gtp(two_s * hsum(sdt) * inv_d);
        for_each_vec(d, [&](int64_t j, int64_t r, auto full) {
          constexpr bool F = decltype(full)::value;
          Vec xh = (load<F>(x + j, r) - vmx) * vrx;
          Vec th = (load<F>(t + j, r) - vmt) * vrt;
          Vec g = vts * (xh - th) - gmean;
          if (gx) {
            Vec out = vrx * (g - xh * gxp);
            store<F>(out, gx + j, r);
            if (cs) store<F>(load<F>(cs + j, r) + out, cs + j, r);
          }
          if (gt) store<F>(Vec(0.f) - vrt * (g - th * gtp), gt + j, r);
        });
      }
    }
    if (gx_base) store_row(gx, gx_base, a.gx_dtype, d);
    if (gt_base) store_row(gt, gt_base, a.gt_dtype, d);
  }
}

void check_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "rows_loss_grad: ", name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
}

void check_grad(const at::Tensor& g, const at::Tensor& like, const char* name) {
  if (!g.defined()) return;
  check_float(g, name);
  TORCH_CHECK(g.sizes() == like.sizes(), "rows_loss_grad: ", name, " must have shape ", like.sizes(), ", got ",
              g.sizes());
  TORCH_CHECK(g.size(1) <= 1 || g.stride(1) == 1, "rows_loss_grad: ", name, " needs unit stride along d");
  TORCH_CHECK(g.device().is_cpu(), "rows_loss_grad: ", name, " must be a CPU tensor");
}

}  // namespace

void rows_loss_grad(const at::Tensor& x, const at::Tensor& t, bool normalize, double eps,
                    const c10::optional<at::Tensor>& row_scale, const at::Tensor& loss,
                    const at::Tensor& grad_x, const at::Tensor& grad_t, const at::Tensor& col_sum) {
  TORCH_CHECK(x.dim() == 2 && t.sizes() == x.sizes(), "rows_loss_grad: x and t must be (m, d) of one shape, got ",
              x.sizes(), " and ", t.sizes());
  TORCH_CHECK(x.device().is_cpu() && t.device().is_cpu(), "rows_loss_grad: CPU tensors expected");
  check_float(x, "x");
  check_float(t, "t");
  check_grad(grad_x, x, "grad_x");
  check_grad(grad_t, t, "grad_t");
  const int64_t m = x.size(0), d = x.size(1);
  const float* scale_ptr = nullptr;
  if (row_scale.has_value() && row_scale->defined()) {
    TORCH_CHECK(row_scale->scalar_type() == at::kFloat && row_scale->is_contiguous() && row_scale->numel() == m,
                "rows_loss_grad: row_scale must be a contiguous (m,) float32 tensor");
    scale_ptr = row_scale->data_ptr<float>();
  }
  if (loss.defined()) {
    TORCH_CHECK(loss.scalar_type() == at::kFloat && loss.is_contiguous() && loss.numel() == m,
                "rows_loss_grad: loss must be a contiguous (m,) float32 tensor");
  }
  const bool want_col_sum = col_sum.defined() && grad_x.defined();
  if (want_col_sum) {
    TORCH_CHECK(col_sum.scalar_type() == at::kFloat && col_sum.is_contiguous() && col_sum.numel() == d,
                "rows_loss_grad: col_sum must be a contiguous (d,) float32 tensor");
  }
  if (m == 0 || d == 0) return;

  Args a{};
  a.x = static_cast<const char*>(x.const_data_ptr());
  a.t = static_cast<const char*>(t.const_data_ptr());
  a.x_dtype = x.scalar_type();
  a.t_dtype = t.scalar_type();
  a.x_s0 = x.stride(0);
  a.x_s1 = x.stride(1);
  a.t_s0 = t.stride(0);
  a.t_s1 = t.stride(1);
  a.d = d;
  a.normalize = normalize;
  a.eps = static_cast<float>(eps);
  a.row_scale = scale_ptr;
  a.loss = loss.defined() ? loss.data_ptr<float>() : nullptr;
  a.gx = grad_x.defined() ? static_cast<char*>(grad_x.data_ptr()) : nullptr;
  a.gt = grad_t.defined() ? static_cast<char*>(grad_t.data_ptr()) : nullptr;
  a.gx_dtype = grad_x.defined() ? grad_x.scalar_type() : at::kFloat;
  a.gt_dtype = grad_t.defined() ? grad_t.scalar_type() : at::kFloat;
  a.gx_s0 = grad_x.defined() ? grad_x.stride(0) : 0;
  a.gt_s0 = grad_t.defined() ? grad_t.stride(0) : 0;

  // Fixed blocks of rows (one per thread at most), so that the column sums are reduced in a
  // fixed order: deterministic for a given thread count.
  const int64_t min_rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + min_rows - 1) / min_rows));
  at::Tensor partial;
  if (want_col_sum) partial = at::zeros({blocks, d}, x.options().dtype(at::kFloat));
  float* partial_ptr = want_col_sum ? partial.data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(static_cast<size_t>(4 * d));
    for (int64_t b = b0; b < b1; ++b) {
      Args ab = a;
      ab.col_sum_partial = partial_ptr ? partial_ptr + b * d : nullptr;
      process_rows(ab, b * m / blocks, (b + 1) * m / blocks, scratch.data());
    }
  });
  if (want_col_sum) col_sum.add_(partial.sum(0));
}

}  // namespace cpu
}  // namespace leap_kernels
