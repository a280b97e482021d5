// CPU row kernel: per-token squared error (plain or token-normalized) and its gradients.
//
// One pass over memory per row and call: the first sweep of a row brings it into L1 (a 1536-wide
// fp32 row pair is 12 KB), the later sweeps of the same row (normalized differences, their sums,
// the gradient) read it from there, while the next row is prefetched. The sweeps are unrolled over
// independent accumulators (the fp32 FMA latency, not the load port, bounded the earlier version).
// bf16/fp16 rows (x, t and the gradients of one dtype, unit stride) are swept in place and converted in
// registers as they are loaded and stored; other dtype mixes and strided rows go through fp32 copies
// (bit-identical results either way; in place, bf16 M = 8192, D = 1536, 2 cores: loss 5.7 -> 3.6 ms,
// loss + gradient 9.5 -> 7.6 ms).
//
// Statistics: mean and variance in one sweep from sums of shifted values (shift = the row's first
// element: no cancellation unless that element sits far from the mean, in which case the variance
// is recomputed from centered values, from L1). fp32 accumulators, 16 partial sums per quantity.
//
// Rows are split into fixed blocks (independent of the thread count) over at::parallel_for; the only
// cross-row reduction, the column sums of grad_x (the bias gradient of the fused loss), is kept per
// block and summed in block order: bit-identical results for any thread count, no atomics.
//
// setup.py passes LEAP_KERNELS_CPU_AVX2 (with -mavx2 -mfma -mf16c) on x86-64 build machines that
// have AVX2: at::vec then uses its 256-bit AVX2 implementation here (its own inline namespace, so
// no clash with the default one the rest of the extension sees).
#ifdef LEAP_KERNELS_CPU_AVX2
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include <immintrin.h>
#endif

#include "../leap_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace leap_kernels {
namespace cpu {

// ----------------------------------------------------------------------------- huge pages

namespace {
bool hugepages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LEAP_KERNELS_CPU_THP");
    return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 || std::strcmp(v, "false") == 0));
  }();
  return on;
}
}  // namespace

void advise_hugepages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.defined() || !t.device().is_cpu() || !hugepages_enabled()) return;
  const size_t bytes = t.numel() * t.element_size();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  // Only the 2 MiB-aligned interior of a fresh output; a hint: errors (no THP) are ignored.
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kBlockRows = 64;  // rows per parallel block (fixed: the reduction order)

// ----------------------------------------------------------------------------- row conversion

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A row as fp32: the row itself when it already is unit-stride fp32, else a converted copy.
const float* load_row(const char* base, at::ScalarType dtype, int64_t stride, int64_t d, float* scratch) {
  if (dtype == at::kFloat) {
    const float* p = reinterpret_cast<const float*>(base);
    if (stride == 1) return p;
    for (int64_t j = 0; j < d; ++j) scratch[j] = p[j * stride];
  } else if (dtype == at::kBFloat16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(base);
    if (stride == 1) {
      for (int64_t j = 0; j < d; ++j) scratch[j] = bits_f32(static_cast<uint32_t>(p[j]) << 16);  // vectorized
    } else {
      for (int64_t j = 0; j < d; ++j) scratch[j] = bits_f32(static_cast<uint32_t>(p[j * stride]) << 16);
    }
  } else {
    const c10::Half* p = reinterpret_cast<const c10::Half*>(base);
    int64_t j = 0;
#ifdef LEAP_KERNELS_CPU_AVX2
    if (stride == 1) {
      for (; j + 8 <= d; j += 8)
        _mm256_storeu_ps(scratch + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
    }
#endif
    for (; j < d; ++j) scratch[j] = static_cast<float>(p[j * stride]);
  }
  return scratch;
}

// Where to compute a gradient row: straight into the output when it is fp32, else a scratch row.
float* grad_row(char* base, at::ScalarType dtype, float* scratch) {
  return dtype == at::kFloat ? reinterpret_cast<float*>(base) : scratch;
}

// fp32 -> bf16, round to nearest even, NaN kept a (quiet) NaN; branch-free so that it vectorizes.
inline uint16_t to_bf16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

#ifdef LEAP_KERNELS_CPU_AVX2
// 8 fp32 -> 8 bf16 bits, as to_bf16_bits lane by lane.
inline __m128i to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

void store_row(const float* src, char* base, at::ScalarType dtype, int64_t d) {
  if (dtype == at::kFloat) return;  // computed in place
  if (dtype == at::kBFloat16) {
    uint16_t* p = reinterpret_cast<uint16_t*>(base);
    for (int64_t j = 0; j < d; ++j) p[j] = to_bf16_bits(src[j]);
  } else {
    c10::Half* p = reinterpret_cast<c10::Half*>(base);
    int64_t j = 0;
#ifdef LEAP_KERNELS_CPU_AVX2
    for (; j + 8 <= d; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; j < d; ++j) p[j] = static_cast<c10::Half>(src[j]);
  }
}

// ----------------------------------------------------------------------------- vector helpers

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Padding lanes of a tail vector set to 0.
inline Vec keep(const Vec& v, int64_t r) { return Vec::set(Vec(0.f), v, r); }

// Typed loads and stores: 16-bit rows are converted in registers as they are read and written (bf16 -> fp32
// is exact; fp32 -> bf16 rounds to nearest even as to_bf16_bits, fp32 -> fp16 as c10::Half), so their sweeps
// run from the rows themselves like fp32 ones, without a converted copy.
inline Vec ld(const float* p) { return Vec::loadu(p); }
inline Vec ld_tail(const float* p, int64_t r) { return Vec::loadu(p, r); }  // r < kV valid lanes, the others 0

template <typename T>
inline Vec ld_tail(const T* p, int64_t r) {  // 16-bit: r < kV elements, the others 0
  float tmp[kV] = {};
  for (int64_t i = 0; i < r; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

inline Vec ld(const c10::BFloat16* p) {
#ifdef LEAP_KERNELS_CPU_AVX2
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  return ld_tail(p, kV);
#endif
}

inline Vec ld(const c10::Half* p) {
#ifdef LEAP_KERNELS_CPU_AVX2
  return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return ld_tail(p, kV);
#endif
}

inline void st_tail(const Vec& v, float* p, int64_t r) { v.store(p, r); }

inline void st_tail(const Vec& v, c10::BFloat16* p, int64_t r) {
  float tmp[kV];
  v.store(tmp);
  uint16_t* bits = reinterpret_cast<uint16_t*>(p);
  for (int64_t i = 0; i < r; ++i) bits[i] = to_bf16_bits(tmp[i]);
}

inline void st_tail(const Vec& v, c10::Half* p, int64_t r) {
  float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < r; ++i) p[i] = static_cast<c10::Half>(tmp[i]);
}

// x (+ bias) at j, a full vector.
template <bool HasBias, typename T>
inline Vec ldx(const T* x, const float* b, int64_t j) {
  if constexpr (HasBias) {
    return ld(x + j) + Vec::loadu(b + j);
  } else {
    (void)b;
    return ld(x + j);
  }
}

template <bool HasBias, typename T>
inline Vec ldx_tail(const T* x, const float* b, int64_t j, int64_t r) {
  if constexpr (HasBias) {
    return ld_tail(x + j, r) + ld_tail(b + j, r);
  } else {
    (void)b;
    return ld_tail(x + j, r);
  }
}

inline void prefetch(const void* p) {
#ifdef LEAP_KERNELS_CPU_AVX2
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Every 64-byte line of a row of `bytes` bytes.
inline void prefetch_row(const char* row, size_t bytes) {
  for (size_t off = 0; off < bytes; off += 64) prefetch(row + off);
}

// A gradient store: non-temporal (no read for ownership, no cache pollution) for large outputs
// that are not read back soon, else a plain store.
template <bool Stream>
inline void store_full(const Vec& v, float* p) {
#ifdef LEAP_KERNELS_CPU_AVX2
  if constexpr (Stream) {
    _mm256_stream_ps(p, v);
    return;
  }
#endif
  v.store(p);
}

template <bool Stream, typename T>
inline void store_full(const Vec& v, T* p) {  // 16-bit: 8 lanes = 16 bytes
#ifdef LEAP_KERNELS_CPU_AVX2
  const __m128i h = std::is_same_v<T, c10::BFloat16>
                        ? to_bf16x8(v)
                        : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if constexpr (Stream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
#else
  st_tail(v, p, kV);
#endif
}

// ----------------------------------------------------------------------------- statistics

struct RowStats {
  float mean, rstd;
};

// Centered sums (sum of c, sum of c^2, c = x - m) of one row, from L1: the fallback of row_stats.
template <bool HasBias, typename T>
inline void centered_sums(const T* x, const float* b, int64_t d, float m, float& s1, float& s2) {
  const Vec vm(m);
  Vec a1(0.f), a2(0.f), c1(0.f), c2(0.f);
  int64_t j = 0;
  for (; j + 2 * kV <= d; j += 2 * kV) {
    Vec u = ldx<HasBias>(x, b, j) - vm, w = ldx<HasBias>(x, b, j + kV) - vm;
    a1 += u;
    c1 += w;
    a2 = at::vec::fmadd(u, u, a2);
    c2 = at::vec::fmadd(w, w, c2);
  }
  for (; j < d; j += kV) {
    const int64_t r = std::min(kV, d - j);
    Vec u = r == kV ? ldx<HasBias>(x, b, j) - vm : keep(ldx_tail<HasBias>(x, b, j, r) - vm, r);
    a1 += u;
    a2 = at::vec::fmadd(u, u, a2);
  }
  s1 = hsum(a1 + c1);
  s2 = hsum(a2 + c2);
}

// Mean and 1/sqrt(var + eps) from the sums of (v - k), (v - k)^2 with shift k.
template <bool HasBias, typename T>
inline RowStats finish_stats(const T* x, const float* b, int64_t d, float inv_d, float eps, float k, float s1,
                             float s2) {
  float dm = s1 * inv_d;
  float var = s2 * inv_d - dm * dm;
  // The shift sat far from the mean (|mean - k| > 2 std): the difference above cancelled. Rare for
  // real features (the row's first element an outlier); recomputed around the mean, from L1.
  if (dm * dm > 4.0f * var) {
    const float m = k + dm;
    centered_sums<HasBias>(x, b, d, m, s1, s2);
    dm = s1 * inv_d;
    var = s2 * inv_d - dm * dm;
    k = m;
  }
  var = std::max(var, 0.0f);  // NaN stays NaN (std::max returns its first argument)
  return {k + dm, 1.0f / std::sqrt(var + eps)};
}

// One sweep over x and t (from memory): shifted sums of both rows, 2 vectors per step.
template <bool HasBias, typename T>
inline void row_stats(const T* x, const float* b, const T* t, int64_t d, float inv_d, float eps, RowStats& sx,
                      RowStats& st) {
  const float x0 = static_cast<float>(x[0]);
  const float kx = HasBias ? x0 + b[0] : x0, kt = static_cast<float>(t[0]);
  const Vec vkx(kx), vkt(kt);
  Vec x1a(0.f), x1b(0.f), x2a(0.f), x2b(0.f), t1a(0.f), t1b(0.f), t2a(0.f), t2b(0.f);
  int64_t j = 0;
  for (; j + 2 * kV <= d; j += 2 * kV) {
    Vec cx0 = ldx<HasBias>(x, b, j) - vkx, cx1 = ldx<HasBias>(x, b, j + kV) - vkx;
    Vec ct0 = ld(t + j) - vkt, ct1 = ld(t + j + kV) - vkt;
    x1a += cx0;
    x1b += cx1;
    t1a += ct0;
    t1b += ct1;
    x2a = at::vec::fmadd(cx0, cx0, x2a);
    x2b = at::vec::fmadd(cx1, cx1, x2b);
    t2a = at::vec::fmadd(ct0, ct0, t2a);
    t2b = at::vec::fmadd(ct1, ct1, t2b);
  }
  for (; j < d; j += kV) {
    const int64_t r = std::min(kV, d - j);
    Vec cx, ct;
    if (r == kV) {
      cx = ldx<HasBias>(x, b, j) - vkx;
      ct = ld(t + j) - vkt;
    } else {  // padding lanes would add k^2: masked out
      cx = keep(ldx_tail<HasBias>(x, b, j, r) - vkx, r);
      ct = keep(ld_tail(t + j, r) - vkt, r);
    }
    x1a += cx;
    t1a += ct;
    x2a = at::vec::fmadd(cx, cx, x2a);
    t2a = at::vec::fmadd(ct, ct, t2a);
  }
  sx = finish_stats<HasBias>(x, b, d, inv_d, eps, kx, hsum(x1a + x1b), hsum(x2a + x2b));
  st = finish_stats<false>(t, nullptr, d, inv_d, eps, kt, hsum(t1a + t1b), hsum(t2a + t2b));
}

// ----------------------------------------------------------------------------- arguments

struct Args {
  const char* x;
  const char* t;
  at::ScalarType x_dtype, t_dtype, gx_dtype, gt_dtype;
  int64_t x_s0, x_s1, t_s0, t_s1, gx_s0, gt_s0;
  int64_t m, d;
  bool normalize;
  float eps;
  const float* row_scale;
  const float* bias;  // (d,) added to every row of x, or null
  float* loss;
  char* gx;
  char* gt;
  bool stream;             // non-temporal stores of fp32 gradients
  float* col_sum_partial;  // this block's (d,) partial column sums of grad_x, or null
};

// The next row's unit-stride data (of the sweeps' element type T), to prefetch while this row is processed
// from L1; null when the sweeps read converted copies (T = float over other dtypes or strided rows).
template <typename T>
inline const T* next_row(const char* base, at::ScalarType dtype, int64_t s0, int64_t s1, int64_t i, int64_t end) {
  if (dtype != c10::CppTypeToScalarType<T>::value || s1 != 1 || i + 1 >= end) return nullptr;
  return reinterpret_cast<const T*>(base) + (i + 1) * s0;
}

// ----------------------------------------------------------------------------- plain MSE row

template <bool HasBias, bool Stream, typename T>
void plain_row(const T* x, const float* b, const T* t, int64_t d, float s, float* loss, T* gx, T* gt, float* cs) {
  const Vec two_s(2.0f * s);
  Vec l0(0.f), l1(0.f), l2(0.f), l3(0.f);
  const bool grads = gx || gt;
  auto emit = [&](const Vec& e, int64_t j, auto full, int64_t r) {
    constexpr bool F = decltype(full)::value;
    Vec g = two_s * e;
    if (gx) {
      if constexpr (F) {
        store_full<Stream>(g, gx + j);
      } else {
        st_tail(g, gx + j, r);
      }
    }
    if (gt) {
      Vec ng = Vec(0.f) - g;
      if constexpr (F) {
        store_full<Stream>(ng, gt + j);
      } else {
        st_tail(ng, gt + j, r);
      }
    }
    if (cs) {
      if constexpr (F) {
        (Vec::loadu(cs + j) + g).store(cs + j);
      } else {
        (Vec::loadu(cs + j, r) + g).store(cs + j, r);
      }
    }
  };
  int64_t j = 0;
  for (; j + 4 * kV <= d; j += 4 * kV) {
    Vec e0 = ldx<HasBias>(x, b, j) - ld(t + j);
    Vec e1 = ldx<HasBias>(x, b, j + kV) - ld(t + j + kV);
    Vec e2 = ldx<HasBias>(x, b, j + 2 * kV) - ld(t + j + 2 * kV);
    Vec e3 = ldx<HasBias>(x, b, j + 3 * kV) - ld(t + j + 3 * kV);
    l0 = at::vec::fmadd(e0, e0, l0);
    l1 = at::vec::fmadd(e1, e1, l1);
    l2 = at::vec::fmadd(e2, e2, l2);
    l3 = at::vec::fmadd(e3, e3, l3);
    if (grads || cs) {
      emit(e0, j, std::true_type{}, kV);
      emit(e1, j + kV, std::true_type{}, kV);
      emit(e2, j + 2 * kV, std::true_type{}, kV);
      emit(e3, j + 3 * kV, std::true_type{}, kV);
    }
  }
  for (; j < d; j += kV) {
    const int64_t r = std::min(kV, d - j);
    if (r == kV) {
      Vec e = ldx<HasBias>(x, b, j) - ld(t + j);
      l0 = at::vec::fmadd(e, e, l0);
      if (grads || cs) emit(e, j, std::true_type{}, kV);
    } else {
      Vec e = ldx_tail<HasBias>(x, b, j, r) - ld_tail(t + j, r);  // padding lanes: 0 - 0
      l0 = at::vec::fmadd(e, e, l0);
      if (grads || cs) emit(e, j, std::false_type{}, r);
    }
  }
  if (loss) *loss = hsum((l0 + l1) + (l2 + l3));
}

// ----------------------------------------------------------------------------- token-normalized row

// Sweep 2 (from L1): loss = sum diff^2, sdx = sum diff x_hat, sdt = sum diff t_hat
// (diff = x_hat - t_hat); prefetches the next row (one line of each input per step).
template <bool HasBias, bool WantLoss, bool WantSums, typename T>
inline void norm_sums(const T* x, const float* b, const T* t, int64_t d, const RowStats& sx, const RowStats& st,
                      const T* nx, const T* nt, float& loss, float& sdx, float& sdt) {
  const Vec vmx(sx.mean), vmt(st.mean), vrx(sx.rstd), vrt(st.rstd);
  Vec la(0.f), lb(0.f), xa(0.f), xb(0.f), ta(0.f), tb(0.f);
  int64_t j = 0;
  for (; j + 2 * kV <= d; j += 2 * kV) {  // 2 vectors: one 64-byte line of an fp32 row, half of a 16-bit one
    if (sizeof(T) == 4 || (j & (4 * kV - 1)) == 0) {
      if (nx) prefetch(nx + j);
      if (nt) prefetch(nt + j);
    }
    Vec xh0 = (ldx<HasBias>(x, b, j) - vmx) * vrx, xh1 = (ldx<HasBias>(x, b, j + kV) - vmx) * vrx;
    Vec th0 = (ld(t + j) - vmt) * vrt, th1 = (ld(t + j + kV) - vmt) * vrt;
    Vec d0 = xh0 - th0, d1 = xh1 - th1;
    if constexpr (WantLoss) {
      la = at::vec::fmadd(d0, d0, la);
      lb = at::vec::fmadd(d1, d1, lb);
    }
    if constexpr (WantSums) {
      xa = at::vec::fmadd(d0, xh0, xa);
      xb = at::vec::fmadd(d1, xh1, xb);
      ta = at::vec::fmadd(d0, th0, ta);
      tb = at::vec::fmadd(d1, th1, tb);
    }
  }
  for (; j < d; j += kV) {
    const int64_t r = std::min(kV, d - j);
    Vec xh, th;
    if (r == kV) {
      xh = (ldx<HasBias>(x, b, j) - vmx) * vrx;
      th = (ld(t + j) - vmt) * vrt;
    } else {  // padding lanes: x_hat = -mean * rstd, not 0: masked out
      xh = keep((ldx_tail<HasBias>(x, b, j, r) - vmx) * vrx, r);
      th = keep((ld_tail(t + j, r) - vmt) * vrt, r);
    }
    Vec df = xh - th;
    if constexpr (WantLoss) la = at::vec::fmadd(df, df, la);
    if constexpr (WantSums) {
      xa = at::vec::fmadd(df, xh, xa);
      ta = at::vec::fmadd(df, th, ta);
    }
  }
  if constexpr (WantLoss) loss = hsum(la + lb);
  if constexpr (WantSums) {
    sdx = hsum(xa + xb);
    sdt = hsum(ta + tb);
  }
}

// Sweep 3 (from L1): the gradients. With g = 2 s diff (mean(g) = 0: both rows are centered),
//   dL/dx = rx (g - x_hat mean(g x_hat)),   dL/dt = -rt (g - t_hat mean(g t_hat)).
template <bool HasBias, bool Stream, typename T>
inline void norm_grads(const T* x, const float* b, const T* t, int64_t d, const RowStats& sx, const RowStats& st,
                       float s, float sdx, float sdt, float inv_d, T* gx, T* gt, float* cs) {
  const Vec vmx(sx.mean), vmt(st.mean), vrx(sx.rstd), vrt(st.rstd);
  const float two_s = 2.0f * s;
  // gx = ax diff - bx x_hat; gt = at t_hat - ... : gt = -rt (2s diff - t_hat 2s sdt/d).
  const Vec ax(sx.rstd * two_s), bx(sx.rstd * two_s * sdx * inv_d);
  const Vec at_(-st.rstd * two_s), bt(-st.rstd * two_s * sdt * inv_d);
  auto one = [&](int64_t j, auto full, int64_t r) {
    constexpr bool F = decltype(full)::value;
    Vec xv = F ? ldx<HasBias>(x, b, j) : ldx_tail<HasBias>(x, b, j, r);
    Vec tv = F ? ld(t + j) : ld_tail(t + j, r);
    Vec xh = (xv - vmx) * vrx, th = (tv - vmt) * vrt;
    Vec df = xh - th;
    if (gx) {
      Vec out = at::vec::fmsub(ax, df, bx * xh);
      if constexpr (F) {
        store_full<Stream>(out, gx + j);
      } else {
        st_tail(out, gx + j, r);
      }
      if (cs) {
        if constexpr (F) {
          (Vec::loadu(cs + j) + out).store(cs + j);
        } else {
          (Vec::loadu(cs + j, r) + out).store(cs + j, r);
        }
      }
    }
    if (gt) {
      Vec out = at::vec::fmsub(at_, df, bt * th);
      if constexpr (F) {
        store_full<Stream>(out, gt + j);
      } else {
        st_tail(out, gt + j, r);
      }
    }
  };
  int64_t j = 0;
  for (; j + 2 * kV <= d; j += 2 * kV) {
    one(j, std::true_type{}, kV);
    one(j + kV, std::true_type{}, kV);
  }
  for (; j < d; j += kV) {
    const int64_t r = std::min(kV, d - j);
    if (r == kV) {
      one(j, std::true_type{}, kV);
    } else {
      one(j, std::false_type{}, r);
    }
  }
}

// One row: its loss and gradients from rows x, t of element type T (for T = float: fp32 rows or converted
// copies; else the 16-bit rows themselves); gx, gt: where its gradients go (null: not wanted).
template <bool HasBias, bool Stream, typename T>
inline void one_row(const Args& a, int64_t i, int64_t end, const T* x, const T* t, float* loss, T* gx, T* gt,
                    float* cs, bool stream_ok) {
  const int64_t d = a.d;
  const float inv_d = 1.0f / static_cast<float>(d);
  const float* b = a.bias;
  const float s = a.row_scale ? a.row_scale[i] : 1.0f;
  if (!a.normalize) {
    if (Stream && stream_ok) {
      plain_row<HasBias, Stream>(x, b, t, d, s, loss, gx, gt, cs);
    } else {
      plain_row<HasBias, false>(x, b, t, d, s, loss, gx, gt, cs);
    }
    return;
  }
  RowStats sx, st;
  row_stats<HasBias>(x, b, t, d, inv_d, a.eps, sx, st);
  const T* nx = next_row<T>(a.x, a.x_dtype, a.x_s0, a.x_s1, i, end);
  const T* nt = next_row<T>(a.t, a.t_dtype, a.t_s0, a.t_s1, i, end);
  float l = 0.f, sdx = 0.f, sdt = 0.f;
  const bool grads = gx || gt;
  if (loss && grads) {
    norm_sums<HasBias, true, true>(x, b, t, d, sx, st, nx, nt, l, sdx, sdt);
  } else if (grads) {
    norm_sums<HasBias, false, true>(x, b, t, d, sx, st, nx, nt, l, sdx, sdt);
  } else {
    norm_sums<HasBias, true, false>(x, b, t, d, sx, st, nx, nt, l, sdx, sdt);
  }
  if (loss) *loss = l;
  if (grads) {
    if (Stream && stream_ok) {
      norm_grads<HasBias, Stream>(x, b, t, d, sx, st, s, sdx, sdt, inv_d, gx, gt, cs);
    } else {
      norm_grads<HasBias, false>(x, b, t, d, sx, st, s, sdx, sdt, inv_d, gx, gt, cs);
    }
  }
}

inline bool aligned32(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

// Rows [begin, end). T = float: any input dtypes and strides, 16-bit or strided rows converted into scratch
// (4 rows of d floats); T = a 16-bit type: x, t and the gradients all of that type with unit-stride rows,
// read and written in place (no scratch).
template <bool HasBias, bool Stream, typename T>
void process_rows(const Args& a, int64_t begin, int64_t end, float* scratch) {
  const int64_t d = a.d;
  if constexpr (!std::is_same_v<T, float>) {
    (void)scratch;
    for (int64_t i = begin; i < end; ++i) {
      const T* x = reinterpret_cast<const T*>(a.x) + i * a.x_s0;
      const T* t = reinterpret_cast<const T*>(a.t) + i * a.t_s0;
      T* gx = a.gx ? reinterpret_cast<T*>(a.gx) + i * a.gx_s0 : nullptr;
      T* gt = a.gt ? reinterpret_cast<T*>(a.gt) + i * a.gt_s0 : nullptr;
      const bool stream_ok = (!gx || aligned32(gx)) && (!gt || aligned32(gt));
      one_row<HasBias, Stream, T>(a, i, end, x, t, a.loss ? a.loss + i : nullptr, gx, gt,
                                  gx ? a.col_sum_partial : nullptr, stream_ok);
    }
  } else {
    float* xs = scratch;
    float* ts = scratch + d;
    float* gxs = scratch + 2 * d;
    float* gts = scratch + 3 * d;
    const size_t xe = c10::elementSize(a.x_dtype), te = c10::elementSize(a.t_dtype);
    const size_t gxe = c10::elementSize(a.gx_dtype), gte = c10::elementSize(a.gt_dtype);
    for (int64_t i = begin; i < end; ++i) {
      // grad_x may alias x: load (or point at) x before anything is written.
      const float* x = load_row(a.x + i * a.x_s0 * xe, a.x_dtype, a.x_s1, d, xs);
      const float* t = load_row(a.t + i * a.t_s0 * te, a.t_dtype, a.t_s1, d, ts);
      // Converted 16-bit rows are never covered by norm_sums' line-by-line prefetch: prefetch the whole next
      // row of each here, in loss-only calls (with gradients being written the extra requests cost more
      // than they save).
      if (i + 1 < end && !a.gx && !a.gt) {
        if (a.x_dtype != at::kFloat && a.x_s1 == 1) prefetch_row(a.x + (i + 1) * a.x_s0 * xe, d * xe);
        if (a.t_dtype != at::kFloat && a.t_s1 == 1) prefetch_row(a.t + (i + 1) * a.t_s0 * te, d * te);
      }
      char* gx_base = a.gx ? a.gx + i * a.gx_s0 * gxe : nullptr;
      char* gt_base = a.gt ? a.gt + i * a.gt_s0 * gte : nullptr;
      float* gx = gx_base ? grad_row(gx_base, a.gx_dtype, gxs) : nullptr;
      float* gt = gt_base ? grad_row(gt_base, a.gt_dtype, gts) : nullptr;
      // Non-temporal stores need 32-byte aligned rows (and only fp32 rows are written in place).
      const bool stream_x = gx == reinterpret_cast<float*>(gx_base) && aligned32(gx);
      const bool stream_t = gt == reinterpret_cast<float*>(gt_base) && aligned32(gt);
      const bool stream_ok = (!gx || stream_x) && (!gt || stream_t);
      one_row<HasBias, Stream, float>(a, i, end, x, t, a.loss ? a.loss + i : nullptr, gx, gt,
                                      gx ? a.col_sum_partial : nullptr, stream_ok);
      if (gx_base) store_row(gx, gx_base, a.gx_dtype, d);
      if (gt_base) store_row(gt, gt_base, a.gt_dtype, d);
    }
  }
#ifdef LEAP_KERNELS_CPU_AVX2
  if constexpr (Stream) _mm_sfence();  // non-temporal stores visible before the block ends
#endif
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

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined()) return false;
  const char* a0 = static_cast<const char*>(a.const_data_ptr());
  const char* b0 = static_cast<const char*>(b.const_data_ptr());
  const char* a1 = a0 + a.numel() * a.element_size() * 2;  // generous: strided views
  const char* b1 = b0 + b.numel() * b.element_size() * 2;
  return a0 < b1 && b0 < a1;
}

}  // namespace

void rows_loss_grad(const at::Tensor& x, const at::Tensor& t, bool normalize, double eps,
                    const c10::optional<at::Tensor>& row_scale, const at::Tensor& loss,
                    const at::Tensor& grad_x, const at::Tensor& grad_t, const at::Tensor& col_sum,
                    const at::Tensor& x_bias) {
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
  if (x_bias.defined()) {
    TORCH_CHECK(x_bias.scalar_type() == at::kFloat && x_bias.is_contiguous() && x_bias.numel() == d,
                "rows_loss_grad: x_bias must be a contiguous (d,) float32 tensor");
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
  a.m = m;
  a.d = d;
  a.normalize = normalize;
  a.eps = static_cast<float>(eps);
  a.row_scale = scale_ptr;
  a.bias = x_bias.defined() ? x_bias.const_data_ptr<float>() : nullptr;
  a.loss = loss.defined() ? loss.data_ptr<float>() : nullptr;
  a.gx = grad_x.defined() ? static_cast<char*>(grad_x.data_ptr()) : nullptr;
  a.gt = grad_t.defined() ? static_cast<char*>(grad_t.data_ptr()) : nullptr;
  a.gx_dtype = grad_x.defined() ? grad_x.scalar_type() : at::kFloat;
  a.gt_dtype = grad_t.defined() ? grad_t.scalar_type() : at::kFloat;
  a.gx_s0 = grad_x.defined() ? grad_x.stride(0) : 0;
  a.gt_s0 = grad_t.defined() ? grad_t.stride(0) : 0;
  // Non-temporal gradient stores: outputs larger than the last-level cache (not read back soon)
  // that are no input (the fused loss writes G over its projection, and reads it right after).
  const int64_t out_bytes = (a.gx ? m * d * static_cast<int64_t>(c10::elementSize(a.gx_dtype)) : 0) +
                            (a.gt ? m * d * static_cast<int64_t>(c10::elementSize(a.gt_dtype)) : 0);
  a.stream = out_bytes >= (int64_t(32) << 20) && !overlaps(grad_x, x) && !overlaps(grad_x, t) &&
             !overlaps(grad_t, x) && !overlaps(grad_t, t);

  // Fixed blocks of kBlockRows rows, whatever the thread count; the column sums of grad_x are
  // kept per block and summed in block order (deterministic, no atomics).
  const int64_t blocks = (m + kBlockRows - 1) / kBlockRows;
  std::vector<float> partial;
  if (want_col_sum) partial.assign(static_cast<size_t>(blocks * d), 0.0f);
  float* partial_ptr = want_col_sum ? partial.data() : nullptr;
  // At least ~32K elements of work per task: small inputs stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(kBlockRows * d, 1));
  // 16-bit inputs and gradients of one dtype, unit-stride rows: the sweeps read and write them in place.
  const auto same16 = [&](at::ScalarType dt) {
    return a.x_dtype == dt && a.t_dtype == dt && a.x_s1 == 1 && a.t_s1 == 1 && (!a.gx || a.gx_dtype == dt) &&
           (!a.gt || a.gt_dtype == dt);
  };
  auto run = [&](auto has_bias, auto stream, auto element) {
    constexpr bool B = decltype(has_bias)::value, S = decltype(stream)::value;
    using T = decltype(element);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(std::is_same_v<T, float> ? static_cast<size_t>(4 * d) : 0);
      for (int64_t blk = b0; blk < b1; ++blk) {
        Args ab = a;
        ab.col_sum_partial = partial_ptr ? partial_ptr + blk * d : nullptr;
        process_rows<B, S, T>(ab, blk * kBlockRows, std::min(m, (blk + 1) * kBlockRows), scratch.data());
      }
    });
  };
  auto run_typed = [&](auto has_bias, auto stream) {
    if (same16(at::kBFloat16)) {
      run(has_bias, stream, c10::BFloat16{});
    } else if (same16(at::kHalf)) {
      run(has_bias, stream, c10::Half{});
    } else {
      run(has_bias, stream, float{});
    }
  };
  if (a.bias) {
    if (a.stream) run_typed(std::true_type{}, std::true_type{});
    else run_typed(std::true_type{}, std::false_type{});
  } else {
    if (a.stream) run_typed(std::false_type{}, std::true_type{});
    else run_typed(std::false_type{}, std::false_type{});
  }
  if (want_col_sum) {
    // Block partials in block order, per column (vectorized across columns): a fixed order.
    float* out = col_sum.data_ptr<float>();
    at::parallel_for(0, d, 512, [&](int64_t c0, int64_t c1) {
      std::vector<float> acc(partial_ptr + c0, partial_ptr + c1);
      for (int64_t blk = 1; blk < blocks; ++blk) {
        const float* p = partial_ptr + blk * d;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += p[c];
      }
      for (int64_t c = c0; c < c1; ++c) out[c] += acc[c - c0];
    });
  }
}

}  // namespace cpu
}  // namespace leap_kernels
