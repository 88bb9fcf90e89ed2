// Internal helpers shared by the dwpw_conv2d forward (dwpw_conv2d.cpp) and backward
// (dwpw_conv2d_backward.cpp): activation functions and derivatives in vector form, the
// register-blocked micro-kernel (6 x 16 on AVX2, 8 x 48 on AVX-512), tile sizes. Not a public header: everything is in an
// anonymous namespace, so each kernel file gets its own (inlined) copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/dwpw_conv2d.h"
#include "cpu/simd.h"

namespace effops::cpu::dwpw {
namespace {

#define EFFOPS_INLINE inline __attribute__((always_inline))
#define EFFOPS_FLATTEN __attribute__((flatten))

constexpr int64_t kNr = 16;  // columns of one packed weight panel (2 AVX2 vectors, 1 AVX-512 vector)
constexpr int kMr = 6;       // AVX2 micro-kernel rows: 6 x 2 accumulators + 2 B vectors + 1 broadcast <= 16 ymm

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- the vector functions simd.h does not have: a (lo, hi) indicator, exp, erf ----
// The scalar level keeps the C library's exp and erf: it is the body the vector ones are checked
// against. The vector levels share one polynomial of each (vexp, verf below).
EFFOPS_INLINE ScalarVec vinside(ScalarVec h, float lo, float hi) { return {(h.v > lo && h.v < hi) ? 1.f : 0.f}; }
EFFOPS_INLINE ScalarVec vexp(ScalarVec a) { return {std::exp(a.v)}; }
EFFOPS_INLINE ScalarVec verf(ScalarVec a) { return {std::erf(a.v)}; }

#if EFFOPS_HAVE_X86
EFFOPS_AVX2_TARGET inline Avx2Vec vinside(Avx2Vec h, float lo, float hi) {
  __m256 m = _mm256_and_ps(_mm256_cmp_ps(h.v, _mm256_set1_ps(lo), _CMP_GT_OQ),
                           _mm256_cmp_ps(h.v, _mm256_set1_ps(hi), _CMP_LT_OQ));
  return {_mm256_and_ps(m, _mm256_set1_ps(1.f))};
}
EFFOPS_AVX512_TARGET inline Avx512Vec vinside(Avx512Vec h, float lo, float hi) {
  const __mmask16 m = _mm512_cmp_ps_mask(h.v, _mm512_set1_ps(lo), _CMP_GT_OQ) &
                      _mm512_cmp_ps_mask(h.v, _mm512_set1_ps(hi), _CMP_LT_OQ);
  return {_mm512_maskz_mov_ps(m, _mm512_set1_ps(1.f))};
}
#endif

// Cephes expf on Avx2Vec and Avx512Vec (the ScalarVec overload above wins for the scalar level):
// exp(x) = 2^n * exp(r), r = x - n ln2 split in two parts, degree-6 polynomial (~1 ulp). No target
// attribute: always inlined into the kernel bodies, which carry their level's.
template <typename V>
EFFOPS_INLINE V vexp(V a) {
  V x = V::min(V::max(a, V::broadcast(-87.3f)), V::broadcast(88.3f));  // a NaN becomes -87.3 here
  const V n = V::round(x * V::broadcast(1.44269504088896341f));
  x = V::fnma(n, V::broadcast(0.693359375f), x);
  x = V::fnma(n, V::broadcast(-2.12194440e-4f), x);
  V p = V::broadcast(1.9875691500e-4f);
  p = V::fma(p, x, V::broadcast(1.3981999507e-3f));
  p = V::fma(p, x, V::broadcast(8.3334519073e-3f));
  p = V::fma(p, x, V::broadcast(4.1665795894e-2f));
  p = V::fma(p, x, V::broadcast(1.6666665459e-1f));
  p = V::fma(p, x, V::broadcast(5.0000001201e-1f));
  p = V::fma(p, x * x, x) + V::broadcast(1.f);
  const V y = p * V::pow2(n);
  // Overflow to +inf where std::exp does (above ln(FLT_MAX) = 88.7228; between the 88.3 clamp and that
  // the result stays exp(88.3) ~ 2e38, below std::exp's, a difference no activation here shows), so
  // silu(-inf) is -inf / inf = NaN as torch's -inf * sigmoid(-inf); NaN stays NaN (the clamp dropped it).
  const V y_inf = V::select(V::greater(a, V::broadcast(88.72283935546875f)), V::broadcast(INFINITY), y);
  return V::select(V::is_nan(a), a, y_inf);
}

// Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd extension: the sign bit of a or-ed
// into erf(|a|).
template <typename V>
EFFOPS_INLINE V verf(V a) {
  const V sign = a & V::broadcast(-0.f);
  const V x = V::abs(a);
  const V t = V::broadcast(1.f) / V::fma(x, V::broadcast(0.3275911f), V::broadcast(1.f));
  V p = V::broadcast(1.061405429f);
  p = V::fma(p, t, V::broadcast(-1.453152027f));
  p = V::fma(p, t, V::broadcast(1.421413741f));
  p = V::fma(p, t, V::broadcast(-0.284496736f));
  p = V::fma(p, t, V::broadcast(0.254829592f));
  p = p * t;
  const V e = vexp(V::zero() - x * x);
  return V::fnma(p, e, V::broadcast(1.f)) | sign;
}

// act(h) and act'(h), as torch defines them (gelu: exact erf form; relu6 derivative 0 at 0 and 6).
template <typename V>
EFFOPS_INLINE V act_forward(V h, int act) {
  switch (act) {
    // Operand order matters: max_ps/min_ps (and the scalar a > b ? a : b) return the SECOND operand
    // when one is NaN, so h goes second and a NaN passes through, as in torch.
    case kRelu: return V::max(V::zero(), h);
    case kRelu6: return V::min(V::broadcast(6.f), V::max(V::zero(), h));
    case kGelu: return V::broadcast(0.5f) * h * (V::broadcast(1.f) + verf(h * V::broadcast(0.70710678118654752f)));
    case kSilu: return h / (V::broadcast(1.f) + vexp(V::zero() - h));
    case kHardswish:  // h * relu6(h + 3) / 6, in torch's order of operations
      return h * V::min(V::broadcast(6.f), V::max(V::zero(), h + V::broadcast(3.f))) / V::broadcast(6.f);
    default: return h;
  }
}

template <typename V>
EFFOPS_INLINE V act_derivative(V h, int act) {
  switch (act) {
    case kRelu: return vinside(h, 0.f, INFINITY);
    case kRelu6: return vinside(h, 0.f, 6.f);
    case kGelu: {
      V cdf = V::broadcast(0.5f) * (V::broadcast(1.f) + verf(h * V::broadcast(0.70710678118654752f)));
      V pdf = vexp(V::broadcast(-0.5f) * h * h) * V::broadcast(0.39894228040143268f);
      return V::fma(h, pdf, cdf);
    }
    case kSilu: {
      V sig = V::broadcast(1.f) / (V::broadcast(1.f) + vexp(V::zero() - h));
      return sig * (V::broadcast(1.f) + h * (V::broadcast(1.f) - sig));
    }
    case kHardswish:  // the reference's (torch 2.7+'s): 0 up to -3 included, h / 3 + 1/2 on (-3, 3), 1 from 3 on
      return vinside(h, -3.f, 3.f) * (h / V::broadcast(3.f) + V::broadcast(0.5f)) +
             vinside(h, std::nextafter(3.f, -INFINITY), INFINITY);
    default: return V::broadcast(1.f);
  }
}


// Register blocking per level: MR rows x NP panels of kNr = 16 columns. AVX2 (16 ymm): 6 x 1 panel =
// 12 accumulators + 2 B vectors + 1 broadcast. AVX-512 (32 zmm): 8 x 3 panels = 24 accumulators + 3 B +
// 1 broadcast (inverted_residual.cpp's blocking); a single 16-column panel would leave 6 independent
// FMA chains per K step, too few for two FMA pipes of 4 cycles' latency.
template <class V> struct Blocking { static constexpr int MR = kMr, NP = 1; };
#if EFFOPS_HAVE_X86
template <> struct Blocking<Avx512Vec> { static constexpr int MR = 8, NP = 3; };
#endif
constexpr int kMaxMr = 8, kMaxNp = 3;  // the largest blocking above (epilogue buffers)

// out[r][q * 16 + j] = sum_k a[r * a_rs + k * a_ks] * b[q * b_ps + k * b_ks + j] for r < R, q < NP,
// j < 16: the register-blocked product (out's row stride NP * 16). b_ps: the stride between the 16-column
// panels (K * 16 for packed weights, 16 for a plain row-major B).
template <typename V, int R, int NP, typename TA>
EFFOPS_INLINE void micro(const TA* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks, int64_t b_ps,
                         int64_t K, float* out) {
  constexpr int NV = kNr / V::kWidth;
  V acc[R][NP * NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NP * NV; ++v) acc[r][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    V bv[NP * NV];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < NV; ++v) bv[q * NV + v] = V::load(b + q * b_ps + k * b_ks + v * V::kWidth);
    for (int r = 0; r < R; ++r) {
      const V av = V::broadcast(to_float(a[r * a_rs + k * a_ks]));
      for (int v = 0; v < NP * NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NP * NV; ++v) acc[r][v].store(out + r * NP * kNr + v * V::kWidth);
}

// The micro-kernel as its own function per level (noinline): inlined into a large tile function, the
// compiler kept that function's constants in vector registers and spilled an accumulator to the stack
// (a store -> load chain in the inner loop, measured 2x slower). On its own it gets every register.
template <int R, int NP, typename TA>
__attribute__((noinline)) EFFOPS_FLATTEN void micro_scalar(const TA* a, int64_t a_rs, int64_t a_ks, const float* b,
                                                           int64_t b_ks, int64_t b_ps, int64_t K, float* out) {
  micro<ScalarVec, R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
}

#if EFFOPS_HAVE_X86
template <int R, int NP, typename TA>
__attribute__((noinline)) EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void micro_avx2(const TA* a, int64_t a_rs, int64_t a_ks,
                                                                            const float* b, int64_t b_ks, int64_t b_ps,
                                                                            int64_t K, float* out) {
  micro<Avx2Vec, R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
}
template <int R, int NP, typename TA>
__attribute__((noinline)) EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void micro_avx512(const TA* a, int64_t a_rs,
                                                                                int64_t a_ks, const float* b,
                                                                                int64_t b_ks, int64_t b_ps, int64_t K,
                                                                                float* out) {
  micro<Avx512Vec, R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
}
#endif

// micro<V, rows, np> for 1 <= rows <= R and 1 <= np <= NP (the last rows and panels of a product), by
// recursion down from the level's blocking.
template <typename V, int R = Blocking<V>::MR, int NP = Blocking<V>::NP, typename TA>
EFFOPS_INLINE void micro_call(int64_t rows, int64_t np, const TA* a, int64_t a_rs, int64_t a_ks, const float* b,
                              int64_t b_ks, int64_t b_ps, int64_t K, float* out) {
  if constexpr (NP > 1) {
    if (np < NP) return micro_call<V, R, NP - 1>(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K, out);
  }
  if constexpr (R > 1) {
    if (rows < R) return micro_call<V, R - 1, NP>(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K, out);
  }
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<V, Avx512Vec>) return micro_avx512<R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
  if constexpr (std::is_same_v<V, Avx2Vec>) return micro_avx2<R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
#endif
  micro_scalar<R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K, out);
}

// rows (1..MR) x np (1..NP) panels of 16 results, each accumulator vector then handed to
// epi(r, column, value) (column: 0 .. np * 16, in steps of V::kWidth).
template <typename V, typename TA, typename Epi>
EFFOPS_INLINE void micro_rows(int64_t rows, int64_t np, const TA* a, int64_t a_rs, int64_t a_ks, const float* b,
                              int64_t b_ks, int64_t b_ps, int64_t K, Epi&& epi) {
  alignas(64) float out[kMaxMr * kMaxNp * kNr];
  micro_call<V>(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K, out);
  // out's row stride is the np of the instantiation that ran: micro_call<V, R, np> wrote np * 16.
  const int64_t ld = np * kNr;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < ld; v += V::kWidth) epi(static_cast<int>(r), v, V::load(out + r * ld + v));
}

#if EFFOPS_HAVE_X86
// ---- vdpbf16ps products (avx512_bf16 level) ----
// acc[r][q] += sum over pairs k of a[r * a_rs + k * a_ks] . b[q * b_ps + k * b_ks + 0..16): each 32-bit word
// holds two bf16 values, and one vdpbf16ps adds both products of a word to 16 fp32 sums. The loop of
// the bf16 forward's pointwise product (y = A @ W, pairs over channels) and of the backward's two
// (G = GY @ W^T, pairs over outputs; g_pw = GY^T @ A, pairs over pixels).
template <int R, int NP>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE void dpbf16_accumulate(__m512 (&acc)[R][NP], const uint32_t* a, int64_t a_rs,
                                                               int64_t a_ks, const uint32_t* b, int64_t b_ks,
                                                               int64_t b_ps, int64_t K2) {
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh bv[NP];
    for (int q = 0; q < NP; ++q) bv[q] = (__m512bh)_mm512_loadu_si512(b + q * b_ps + k * b_ks);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * a_rs + k * a_ks]));
      for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, bv[q]);
    }
  }
}

// The fp32 sums of dpbf16_accumulate from zero into out[R][NP * 16] (noinline: every register to itself,
// as micro_avx512).
template <int R, int NP>
__attribute__((noinline)) EFFOPS_AVX512_BF16_TARGET void micro_dpbf16_f32(const uint32_t* a, int64_t a_rs,
                                                                         int64_t a_ks, const uint32_t* b,
                                                                         int64_t b_ks, int64_t b_ps, int64_t K2,
                                                                         float* out) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_setzero_ps();
  dpbf16_accumulate<R, NP>(acc, a, a_rs, a_ks, b, b_ks, b_ps, K2);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) _mm512_storeu_ps(out + (r * NP + q) * kNr, acc[r][q]);
}

// micro_dpbf16_f32<rows, np> for 1 <= rows <= R, 1 <= np <= NP (out's row stride: np * 16).
template <int R = 6, int NP = 4>
EFFOPS_INLINE void micro_dpbf16_f32_call(int64_t rows, int64_t np, const uint32_t* a, int64_t a_rs, int64_t a_ks,
                                         const uint32_t* b, int64_t b_ks, int64_t b_ps, int64_t K2, float* out) {
  if constexpr (NP > 1) {
    if (np < NP) return micro_dpbf16_f32_call<R, NP - 1>(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K2, out);
  }
  if constexpr (R > 1) {
    if (rows < R) return micro_dpbf16_f32_call<R - 1, NP>(rows, np, a, a_rs, a_ks, b, b_ks, b_ps, K2, out);
  }
  micro_dpbf16_f32<R, NP>(a, a_rs, a_ks, b, b_ks, b_ps, K2, out);
}
#endif

// Row stride of the fp32 tile buffers: channels rounded up to the micro-kernel's 16 columns, plus 16
// so that the stride is never a power of two (those map every few rows to the same L1 set).
int64_t row_stride(int64_t C) { return round_up(C, kNr) + kNr; }

// Pixels per tile: one fp32 tile buffer of P x Cp stays within ~64 KB (L2), P a multiple of every
// level's micro-kernel rows (6 and 8).
int64_t tile_pixels(int64_t Cp) { return std::max<int64_t>(24, (16384 / Cp) / 24 * 24); }

bool use_avx2() {
#if EFFOPS_HAVE_X86
  return has_avx2_fma();
#else
  return false;
#endif
}

bool use_avx512() {
#if EFFOPS_HAVE_X86
  return cpu_isa_at_least(CpuIsa::kAvx512);
#else
  return false;
#endif
}

}  // namespace
}  // namespace effops::cpu::dwpw
