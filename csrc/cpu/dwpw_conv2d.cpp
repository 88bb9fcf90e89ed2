// Fused depthwise + pointwise convolution, forward and backward (see dwpw_conv2d.h for the layout).
//
// Every loop body is a template over the vector type V (Avx2Vec or ScalarVec from simd.h). The two
// entry points per tile (`*_avx2`, `*_scalar`) are marked `flatten`, so the whole tile computation is
// inlined into them and the AVX2 one is compiled for AVX2+FMA; cpu_features picks one at run time.
//
// Backward, per band of output rows of one image, in sub-tiles of P pixels:
//   recompute h = dw(x) and a = act(h) for the sub-tile (nothing was saved by the forward);
//   g_pwb += sum_p gy;  g_pw += gy^T @ a            (micro-kernel: 6 outputs x 16 channels over pixels)
//   g   = (gy @ Wpw) * act'(h)                       (micro-kernel: 6 pixels x 16 channels over O)
//   g_dwb += sum_p g;  g_dw[tap] += g * x[tap pixel];  gx[tap pixel] += g * w[tap]   (vector over C)
// gx is a scatter: two bands whose input rows overlap must not run at once. Bands are tall enough
// that band b and b+2 never overlap, and even bands run before odd ones. Weight gradients are summed
// per thread and reduced at the end.
#include "cpu/dwpw_conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/simd.h"

namespace effops::cpu::dwpw {
namespace {

#define EFFOPS_INLINE inline __attribute__((always_inline))
#define EFFOPS_FLATTEN __attribute__((flatten))

constexpr int64_t kNr = 16;  // micro-kernel columns (2 AVX2 vectors)
constexpr int kMr = 6;       // micro-kernel rows: 6 x 2 accumulators + 2 B vectors + 1 broadcast <= 16 ymm

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---- the vector functions simd.h does not have: min, a (lo, hi) indicator, exp, erf ----
EFFOPS_INLINE ScalarVec vmin(ScalarVec a, ScalarVec b) { return {a.v < b.v ? a.v : b.v}; }
EFFOPS_INLINE ScalarVec vinside(ScalarVec h, float lo, float hi) { return {(h.v > lo && h.v < hi) ? 1.f : 0.f}; }
EFFOPS_INLINE ScalarVec vexp(ScalarVec a) { return {std::exp(a.v)}; }
EFFOPS_INLINE ScalarVec verf(ScalarVec a) { return {std::erf(a.v)}; }

#if EFFOPS_HAVE_X86
EFFOPS_AVX2_TARGET inline Avx2Vec vmin(Avx2Vec a, Avx2Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
EFFOPS_AVX2_TARGET inline Avx2Vec vinside(Avx2Vec h, float lo, float hi) {
  __m256 m = _mm256_and_ps(_mm256_cmp_ps(h.v, _mm256_set1_ps(lo), _CMP_GT_OQ),
                           _mm256_cmp_ps(h.v, _mm256_set1_ps(hi), _CMP_LT_OQ));
  return {_mm256_and_ps(m, _mm256_set1_ps(1.f))};
}
// Cephes expf: exp(x) = 2^n * exp(r), r = x - n ln2 split in two parts, degree-6 polynomial (~1 ulp).
EFFOPS_AVX2_TARGET inline Avx2Vec vexp(Avx2Vec a) {
  __m256 x = _mm256_min_ps(_mm256_max_ps(a.v, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};
}
// Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd extension.
EFFOPS_AVX2_TARGET inline Avx2Vec verf(Avx2Vec a) {
  const __m256 sign = _mm256_and_ps(a.v, _mm256_set1_ps(-0.f));
  const __m256 x = _mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(x, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = vexp(Avx2Vec{_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(x, x))}).v;
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.f));
  return {_mm256_or_ps(y, sign)};
}
#endif

// act(h) and act'(h), as torch defines them (gelu: exact erf form; relu6 derivative 0 at 0 and 6).
template <typename V>
EFFOPS_INLINE V act_forward(V h, int act) {
  switch (act) {
    case kRelu: return V::max(h, V::zero());
    case kRelu6: return vmin(V::max(h, V::zero()), V::broadcast(6.f));
    case kGelu: return V::broadcast(0.5f) * h * (V::broadcast(1.f) + verf(h * V::broadcast(0.70710678118654752f)));
    case kSilu: return h / (V::broadcast(1.f) + vexp(V::zero() - h));
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
    default: return V::broadcast(1.f);
  }
}

// Valid tap range [k0, k1) of one kernel axis for output coordinate o (zero padding: skip the rest).
EFFOPS_INLINE void tap_range(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t K, int64_t in,
                             int64_t& start, int64_t& k0, int64_t& k1) {
  start = o * stride - pad;
  k0 = start >= 0 ? 0 : (-start + dil - 1) / dil;
  k1 = std::min<int64_t>(K, start < in ? (in - 1 - start) / dil + 1 : 0);
  if (k1 < k0) k1 = k0;
}

// h[c] = dw_b[c] + sum over valid taps x[ih][iw][c] * w[tap][c], channels [c0, c1) in steps of V.
template <typename V, typename T>
EFFOPS_INLINE int64_t depthwise_channels(const Shape& s, const T* xn, const float* w, const float* b, int64_t oh,
                                         int64_t ow, int64_t c0, int64_t c1, float* h) {
  int64_t ih0, kh0, kh1, iw0, kw0, kw1;
  tap_range(oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
  tap_range(ow, s.SW, s.PW, s.DW, s.KW, s.W, iw0, kw0, kw1);
  int64_t c = c0;
  // Four vectors per step: four independent FMA chains hide the FMA latency.
  for (; c + 4 * V::kWidth <= c1; c += 4 * V::kWidth) {
    V acc[4];
    for (int u = 0; u < 4; ++u) acc[u] = b ? V::load(b + c + u * V::kWidth) : V::zero();
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      const T* xrow = xn + ((ih0 + kh * s.DH) * s.W + iw0) * s.C + c;
      const float* wrow = w + kh * s.KW * s.C + c;
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const T* xp = xrow + kw * s.DW * s.C;
        const float* wp = wrow + kw * s.C;
        for (int u = 0; u < 4; ++u) acc[u] = V::fma(V::load(xp + u * V::kWidth), V::load(wp + u * V::kWidth), acc[u]);
      }
    }
    for (int u = 0; u < 4; ++u) acc[u].store(h + c + u * V::kWidth);
  }
  for (; c + V::kWidth <= c1; c += V::kWidth) {
    V acc = b ? V::load(b + c) : V::zero();
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t kw = kw0; kw < kw1; ++kw)
        acc = V::fma(V::load(xn + ((ih0 + kh * s.DH) * s.W + iw0 + kw * s.DW) * s.C + c),
                     V::load(w + (kh * s.KW + kw) * s.C + c), acc);
    acc.store(h + c);
  }
  return c;
}

// The depthwise output of pixels [q0, q0 + np) of image xn into h[np][Cp] (Cp: the row stride; columns
// past C are left alone),
// with the activation applied when `act` is given (the forward) or not (the backward needs h itself).
template <typename V, typename T>
EFFOPS_INLINE void depthwise_tile(const Shape& s, const T* xn, const float* w, const float* b, int64_t q0, int64_t np,
                                  int64_t Cp, int act, float* h) {
  for (int64_t p = 0; p < np; ++p) {
    const int64_t oh = (q0 + p) / s.OW, ow = (q0 + p) % s.OW;
    float* hp = h + p * Cp;
    const int64_t c = depthwise_channels<V>(s, xn, w, b, oh, ow, 0, s.C, hp);
    depthwise_channels<ScalarVec>(s, xn, w, b, oh, ow, c, s.C, hp);
    if (act != kNone)  // while the row is in L1; pad columns hold 0 and act(0) == 0 for every activation
      for (int64_t k = 0; k < round_up(s.C, kNr); k += V::kWidth) act_forward(V::load(hp + k), act).store(hp + k);
  }
}

// out[R][16] = sum_k a[r * a_rs + k * a_ks] * b[k * b_ks + 0..16): the register-blocked product,
// 6 x 2 AVX2 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers.
template <typename V, int R, typename TA>
EFFOPS_INLINE void micro(const TA* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks, int64_t K,
                         float* out) {
  constexpr int NV = kNr / V::kWidth;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + k * b_ks + v * V::kWidth);
    for (int r = 0; r < R; ++r) {
      const V av = V::broadcast(to_float(a[r * a_rs + k * a_ks]));
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(out + r * kNr + v * V::kWidth);
}

// The micro-kernel as its own function (noinline): inlined into a large tile function, the compiler
// kept that function's constants in ymm registers and spilled an accumulator to the stack (a store ->
// load chain in the inner loop, measured 2x slower). On its own it gets all 16 registers.
template <int R, typename TA>
__attribute__((noinline)) EFFOPS_FLATTEN void micro_scalar(const TA* a, int64_t a_rs, int64_t a_ks, const float* b,
                                                           int64_t b_ks, int64_t K, float* out) {
  micro<ScalarVec, R>(a, a_rs, a_ks, b, b_ks, K, out);
}

#if EFFOPS_HAVE_X86
template <int R, typename TA>
__attribute__((noinline)) EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void micro_avx2(const TA* a, int64_t a_rs, int64_t a_ks,
                                                                            const float* b, int64_t b_ks, int64_t K,
                                                                            float* out) {
  micro<Avx2Vec, R>(a, a_rs, a_ks, b, b_ks, K, out);
}
#endif

template <typename V, int R, typename TA>
EFFOPS_INLINE void micro_call(const TA* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks, int64_t K,
                              float* out) {
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<V, Avx2Vec>) {
    micro_avx2<R>(a, a_rs, a_ks, b, b_ks, K, out);
    return;
  }
#endif
  micro_scalar<R>(a, a_rs, a_ks, b, b_ks, K, out);
}

// rows (1..6) x 16 results, each accumulator vector then handed to epi(r, column, value).
template <typename V, typename TA, typename Epi>
EFFOPS_INLINE void micro_rows(int64_t rows, const TA* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t b_ks,
                              int64_t K, Epi&& epi) {
  alignas(32) float out[kMr * kNr];
  switch (rows) {
    case 6: micro_call<V, 6>(a, a_rs, a_ks, b, b_ks, K, out); break;
    case 5: micro_call<V, 5>(a, a_rs, a_ks, b, b_ks, K, out); break;
    case 4: micro_call<V, 4>(a, a_rs, a_ks, b, b_ks, K, out); break;
    case 3: micro_call<V, 3>(a, a_rs, a_ks, b, b_ks, K, out); break;
    case 2: micro_call<V, 2>(a, a_rs, a_ks, b, b_ks, K, out); break;
    default: micro_call<V, 1>(a, a_rs, a_ks, b, b_ks, K, out); break;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < kNr; v += V::kWidth) epi(static_cast<int>(r), v, V::load(out + r * kNr + v));
}

// Row stride of the fp32 tile buffers: channels rounded up to the micro-kernel's 16 columns, plus 16
// so that the stride is never a power of two (those map every few rows to the same L1 set).
int64_t row_stride(int64_t C) { return round_up(C, kNr) + kNr; }

// Pixels per tile: one fp32 tile buffer of P x Cp stays within ~64 KB (L2), P a multiple of kMr.
int64_t tile_pixels(int64_t Cp) { return std::max<int64_t>(kMr, (16384 / Cp) / kMr * kMr); }

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
// Length of one stride-phase line of the NCHW depthwise (see depthwise_rows_nchw).
// OW is rounded up to 8 so that a row's last vector may read past OW (its extra lanes are dropped).
int64_t phase_len(const Shape& s) { return round_up(s.OW, 8) + (s.KW - 1) * s.DW / s.SW + 1; }
// Input rows an NCHW band of `rows` output rows reads.
int64_t band_input_rows(const Shape& s, int64_t rows) { return (rows - 1) * s.SH + (s.KH - 1) * s.DH + 1; }

// NCHW input: the depthwise output of output rows [oh0, oh0 + rows) of image xn (NCHW) for every
// channel, activation applied, into AT[c][p] (row stride Pp, p = (oh - oh0) * OW + ow): the B panel of
// the transposed micro-kernel, so neither x nor the tile is ever transposed. Vectorised along ow. Each
// input row of the band is copied once per channel into zero-padded fp32 lines split by stride phase,
// line[r][m] = xpad[m * SW + r], so tap kw reads line[(kw*DW) % SW][ow + (kw*DW) / SW]: unit-stride
// vector loads for every stride, and no bounds checks in the tap loop.
// V::kWidth consecutive output pixels from ow of one NCHW depthwise row (see depthwise_rows_nchw).
// A function, not a lambda: a lambda is not compiled for AVX2 unless inlined, and 8-lane values then
// cross an ABI boundary (measured: lanes 4..7 came back wrong).
template <typename V>
EFFOPS_INLINE void depthwise_nchw_pixels(const Shape& s, const float* rows_in, int64_t Lm, const int64_t* koff,
                                         const float* wk, float bias, int64_t kh0, int64_t kh1, int act, int64_t ow,
                                         float* out) {
  // Two accumulators (odd / even kw): half the FMA latency chain, which bounds short rows (7x7 maps).
  V acc = V::broadcast(bias), acc1 = V::zero();
  for (int64_t kh = kh0; kh < kh1; ++kh) {
    const float* base = rows_in + kh * s.DH * s.SW * Lm + ow;
    const float* wr = wk + kh * s.KW;
    int64_t kw = 0;
    for (; kw + 1 < s.KW; kw += 2) {
      acc = V::fma(V::load(base + koff[kw]), V::broadcast(wr[kw]), acc);
      acc1 = V::fma(V::load(base + koff[kw + 1]), V::broadcast(wr[kw + 1]), acc1);
    }
    if (kw < s.KW) acc = V::fma(V::load(base + koff[kw]), V::broadcast(wr[kw]), acc);
  }
  acc = acc + acc1;
  act_forward(acc, act).store(out + ow);
}

template <typename V, typename T>
EFFOPS_INLINE void depthwise_rows_nchw(const Shape& s, const T* xn, const float* w, const float* b, int64_t oh0,
                                       int64_t rows, int64_t Pp, int act, float* AT, float* lines) {
  const int64_t Lm = phase_len(s), RI = band_input_rows(s, rows), ih_first = oh0 * s.SH - s.PH;
  const int64_t taps = s.KH * s.KW;
  float wk[64];  // this channel's taps (<= 8 x 8)
  // Offset of tap kw in the phase lines, hoisted: a division per tap and pixel measured as the
  // NCHW forward's largest cost (64-bit idiv).
  int64_t koff[8];
  for (int64_t kw = 0; kw < s.KW; ++kw) koff[kw] = (kw * s.DW) % s.SW * Lm + (kw * s.DW) / s.SW;
  for (int64_t c = 0; c < s.C; ++c) {
    const T* xc = xn + c * s.H * s.W;
    for (int64_t i = 0; i < RI; ++i) {
      const int64_t ih = ih_first + i;
      if (ih < 0 || ih >= s.H) continue;  // rows outside the image are skipped by the tap loop below
      const T* xr = xc + ih * s.W;
      for (int64_t r = 0; r < s.SW; ++r) {
        float* line = lines + (i * s.SW + r) * Lm;
        // m covers iw = m * SW + r - PW: zeros left of the image, the row, zeros right of it.
        const int64_t m_lo = std::min(Lm, std::max<int64_t>(0, (s.PW - r + s.SW - 1) / s.SW));
        const int64_t m_hi = std::max(m_lo, std::min(Lm, (s.W + s.PW - r + s.SW - 1) / s.SW));
        for (int64_t m = 0; m < m_lo; ++m) line[m] = 0.f;
        if (s.SW == 1) {
          const T* src = xr + (m_lo + r - s.PW);
          int64_t m = 0;
          for (; m + V::kWidth <= m_hi - m_lo; m += V::kWidth) V::load(src + m).store(line + m_lo + m);
          for (; m < m_hi - m_lo; ++m) line[m_lo + m] = to_float(src[m]);
        } else {
          for (int64_t m = m_lo; m < m_hi; ++m) line[m] = to_float(xr[m * s.SW + r - s.PW]);
        }
        for (int64_t m = m_hi; m < Lm; ++m) line[m] = 0.f;
      }
    }
    for (int64_t t = 0; t < taps; ++t) wk[t] = w[t * s.C + c];
    const float bias = b ? b[c] : 0.f;
    for (int64_t j = 0; j < rows; ++j) {
      const int64_t oh = oh0 + j;
      int64_t ih0, kh0, kh1;
      tap_range(oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
      float* out = AT + c * Pp + j * s.OW;
      const float* rows_in = lines + (ih0 - ih_first) * s.SW * Lm;
      // Whole vectors, the last one past the row's end: its extra lanes land on the next row's first
      // pixels, which that row (computed next) overwrites, or on AT's padding after the last row.
      // Rows shorter than a vector (7x7 maps) stay vectorised this way; a scalar tail measured as
      // costly as the whole pointwise product there (a 9-FMA latency chain per pixel).
      int64_t ow = 0;
      for (; ow < s.OW; ow += V::kWidth)
        depthwise_nchw_pixels<V>(s, rows_in, Lm, koff, wk, bias, kh0, kh1, act, ow, out);
    }
  }
}

template <typename V, typename T>
EFFOPS_INLINE void forward_tile(const Shape& s, const T* x, const float* dw_w, const float* dw_b, const float* pw,
                                const float* pw_b, T* y, int64_t n, int64_t q0, int64_t np, int64_t Cp, float* A,
                                bool nchw, float* lines) {
  alignas(32) float out[kMr * kNr];
  if (nchw) {
    // NCHW: the tile is np / OW whole output rows, its depthwise output transposed, AT[C][Pp]. The
    // pointwise product is the channels-last one (6 pixels x 16 outputs, B = the packed weight panel
    // [C][16], L1-resident) with A read column-wise from AT: the 6 pixels of one k are 6 consecutive
    // floats. The 6 x 16 result is stored transposed: 6 consecutive pixels of 16 output planes. (A
    // 6 outputs x 16 pixels kernel over AT measured 3x slower at C = 256..512: it streamed all of AT
    // from L2 for every 6 outputs.)
    const int64_t Pp = round_up(np, kNr) + kNr;  // + 16: a power-of-two row stride would thrash L1 sets
    float* AT = A;
    depthwise_rows_nchw<V>(s, x + n * s.C * s.H * s.W, dw_w, dw_b, q0 / s.OW, np / s.OW, Pp, s.act, AT, lines);
    T* yn = y + n * s.O * s.OH * s.OW + q0;
    const int64_t OHW = s.OH * s.OW;
    for (int64_t o = 0; o < s.O; o += kNr) {
      const float* pwb = pw + (o / kNr) * s.C * kNr;
      const int64_t cols = std::min<int64_t>(kNr, s.O - o);
      for (int64_t r0 = 0; r0 < np; r0 += kMr) {
        const int64_t rows = std::min<int64_t>(kMr, np - r0);
        micro_rows<V>(rows, AT + r0, 1, Pp, pwb, kNr, s.C, [&](int r, int64_t v, V acc) { acc.store(out + r * kNr + v); });
        for (int64_t j = 0; j < cols; ++j) {
          T* yo = yn + (o + j) * OHW + r0;
          const float bias = pw_b ? pw_b[o + j] : 0.f;
          for (int64_t r = 0; r < rows; ++r) yo[r] = from_float<T>(out[r * kNr + j] + bias);
        }
      }
    }
    return;
  }
  depthwise_tile<V>(s, x + n * s.H * s.W * s.C, dw_w, dw_b, q0, np, Cp, s.act, A);
  T* yt = y + (n * s.OH * s.OW + q0) * s.O;
  for (int64_t o = 0; o < s.O; o += kNr) {
    const float* pwb = pw + (o / kNr) * s.C * kNr;
    const bool full = o + kNr <= s.O;
    for (int64_t r0 = 0; r0 < np; r0 += kMr) {
      const int64_t rows = std::min<int64_t>(kMr, np - r0);
      micro_rows<V>(rows, A + r0 * Cp, Cp, 1, pwb, kNr, s.C, [&](int r, int64_t v, V acc) {
        if (full) (acc + (pw_b ? V::load(pw_b + o + v) : V::zero())).store(yt + (r0 + r) * s.O + o + v);
        else acc.store(out + r * kNr + v);
      });
      if (full) continue;
      for (int64_t r = 0; r < rows; ++r) {
        T* yr = yt + (r0 + r) * s.O + o;
        for (int64_t j = 0; j < s.O - o; ++j) yr[j] = from_float<T>(out[r * kNr + j] + (pw_b ? pw_b[o + j] : 0.f));
      }
    }
  }
}

template <typename T>
EFFOPS_FLATTEN void forward_tile_scalar(const Shape& s, const T* x, const float* dw_w, const float* dw_b,
                                        const float* pw, const float* pw_b, T* y, int64_t n, int64_t q0, int64_t np,
                                        int64_t Cp, float* A, bool nchw, float* lines) {
  forward_tile<ScalarVec>(s, x, dw_w, dw_b, pw, pw_b, y, n, q0, np, Cp, A, nchw, lines);
}

#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void forward_tile_avx2(const Shape& s, const T* x, const float* dw_w,
                                                         const float* dw_b, const float* pw, const float* pw_b, T* y,
                                                         int64_t n, int64_t q0, int64_t np, int64_t Cp, float* A,
                                                         bool nchw, float* lines) {
  forward_tile<Avx2Vec>(s, x, dw_w, dw_b, pw, pw_b, y, n, q0, np, Cp, A, nchw, lines);
}
#endif

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
struct Partials {  // one thread's sums of the weight gradients (null: not wanted)
  float* g_dw;     // [KH*KW][C]
  float* g_pw;     // [O][Cp]
  float* g_dwb;    // [C]
  float* g_pwb;    // [O]
};

// For channels [c0, c1) of one pixel: g_dwb += g; per valid tap g_dw += g * x, gx += g * w.
template <typename V, typename T>
EFFOPS_INLINE int64_t depthwise_backward_channels(const Shape& s, const T* xn, float* gxn, const float* w,
                                                  const Partials& part, int64_t oh, int64_t ow, const float* g,
                                                  int64_t c0, int64_t c1) {
  int64_t ih0, kh0, kh1, iw0, kw0, kw1;
  tap_range(oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
  tap_range(ow, s.SW, s.PW, s.DW, s.KW, s.W, iw0, kw0, kw1);
  int64_t c = c0;
  for (; c + V::kWidth <= c1; c += V::kWidth) {
    const V gv = V::load(g + c);
    if (part.g_dwb) (V::load(part.g_dwb + c) + gv).store(part.g_dwb + c);
    for (int64_t kh = kh0; kh < kh1; ++kh) {
      for (int64_t kw = kw0; kw < kw1; ++kw) {
        const int64_t pix = (ih0 + kh * s.DH) * s.W + iw0 + kw * s.DW, tap = kh * s.KW + kw;
        if (gxn) {
          float* gp = gxn + pix * s.C + c;
          V::fma(gv, V::load(w + tap * s.C + c), V::load(gp)).store(gp);
        }
        if (part.g_dw) {
          float* dp = part.g_dw + tap * s.C + c;
          V::fma(gv, V::load(xn + pix * s.C + c), V::load(dp)).store(dp);
        }
      }
    }
  }
  return c;
}

template <typename V, typename T>
EFFOPS_INLINE void backward_tile(const Shape& s, const T* x, const T* gy, const float* dw_w, const float* dw_b,
                                 const float* pwT, float* gx, const Partials& part, int64_t n, int64_t q0,
                                 int64_t np, int64_t Cp, float* H, float* A, float* G) {
  const T* xn = x + n * s.H * s.W * s.C;
  float* gxn = gx ? gx + n * s.H * s.W * s.C : nullptr;
  const T* gyt = gy + (n * s.OH * s.OW + q0) * s.O;
  const bool need_g = gx || part.g_dw || part.g_dwb;
  depthwise_tile<V>(s, xn, dw_w, dw_b, q0, np, Cp, kNone, H);
  if (part.g_pwb) {
    for (int64_t p = 0; p < np; ++p) {
      int64_t o = 0;
      for (; o + V::kWidth <= s.O; o += V::kWidth)
        (V::load(part.g_pwb + o) + V::load(gyt + p * s.O + o)).store(part.g_pwb + o);
      for (; o < s.O; ++o) part.g_pwb[o] += to_float(gyt[p * s.O + o]);
    }
  }
  if (part.g_pw) {
    const float* a = H;
    if (s.act != kNone) {
      for (int64_t k = 0; k < np * Cp; k += V::kWidth) act_forward(V::load(H + k), s.act).store(A + k);
      a = A;
    }
    // g_pw[o][c] += sum_p gy[p][o] * a[p][c]: rows are outputs, the reduction runs over the pixels.
    for (int64_t o0 = 0; o0 < s.O; o0 += kMr) {
      const int64_t rows = std::min<int64_t>(kMr, s.O - o0);
      for (int64_t cb = 0; cb < round_up(s.C, kNr); cb += kNr) {
        micro_rows<V>(rows, gyt + o0, 1, s.O, a + cb, Cp, np, [&](int r, int64_t v, V acc) {
          float* dst = part.g_pw + (o0 + r) * Cp + cb + v;
          (V::load(dst) + acc).store(dst);
        });
      }
    }
  }
  if (!need_g) return;
  // G[p][c] = (sum_o gy[p][o] * Wpw[o][c]) * act'(h[p][c]).
  for (int64_t cb = 0; cb < round_up(s.C, kNr); cb += kNr) {
    const float* wb = pwT + (cb / kNr) * s.O * kNr;
    for (int64_t r0 = 0; r0 < np; r0 += kMr) {
      const int64_t rows = std::min<int64_t>(kMr, np - r0);
      micro_rows<V>(rows, gyt + r0 * s.O, s.O, 1, wb, kNr, s.O, [&](int r, int64_t v, V g) {
        const int64_t off = (r0 + r) * Cp + cb + v;
        if (s.act != kNone) g = g * act_derivative(V::load(H + off), s.act);
        g.store(G + off);
      });
    }
  }
  for (int64_t p = 0; p < np; ++p) {
    const int64_t oh = (q0 + p) / s.OW, ow = (q0 + p) % s.OW;
    const int64_t c = depthwise_backward_channels<V>(s, xn, gxn, dw_w, part, oh, ow, G + p * Cp, 0, s.C);
    depthwise_backward_channels<ScalarVec>(s, xn, gxn, dw_w, part, oh, ow, G + p * Cp, c, s.C);
  }
}

template <typename T>
EFFOPS_FLATTEN void backward_tile_scalar(const Shape& s, const T* x, const T* gy, const float* dw_w,
                                         const float* dw_b, const float* pwT, float* gx, const Partials& part,
                                         int64_t n, int64_t q0, int64_t np, int64_t Cp, float* H, float* A, float* G) {
  backward_tile<ScalarVec>(s, x, gy, dw_w, dw_b, pwT, gx, part, n, q0, np, Cp, H, A, G);
}

#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void backward_tile_avx2(const Shape& s, const T* x, const T* gy, const float* dw_w,
                                                          const float* dw_b, const float* pwT, float* gx,
                                                          const Partials& part, int64_t n, int64_t q0, int64_t np,
                                                          int64_t Cp, float* H, float* A, float* G) {
  backward_tile<Avx2Vec>(s, x, gy, dw_w, dw_b, pwT, gx, part, n, q0, np, Cp, H, A, G);
}
#endif

bool use_avx2() {
#if EFFOPS_HAVE_X86
  return has_avx2_fma();
#else
  return false;
#endif
}

}  // namespace

template <typename T>
void forward(const Shape& s, const T* x, const float* dw_w, const float* dw_b, const float* pw_packed,
             const float* pw_b, T* y, bool nchw) {
  const int64_t Cp = row_stride(s.C), OHW = s.OH * s.OW;
  // Channels-last: tiles of P pixels anywhere in the image. NCHW: tiles of whole output rows (the
  // depthwise runs along rows), about as many pixels, at least one row.
  const int64_t rows = std::max<int64_t>(1, tile_pixels(Cp) / s.OW);
  const int64_t P = nchw ? rows * s.OW : tile_pixels(Cp), tiles = (OHW + P - 1) / P;
  const int64_t buf = nchw ? (round_up(P, kNr) + kNr) * s.C : P * Cp;
  const int64_t nlines = nchw ? band_input_rows(s, rows) * s.SW * phase_len(s) : 0;
  const bool avx2 = use_avx2();
  at::parallel_for(0, s.N * tiles, 1, [&](int64_t begin, int64_t end) {
    // Zeroed once: pad columns / tail pixels stay finite (the micro-kernel's extra lanes are dropped).
    std::vector<float> A(buf, 0.f), lines(nlines, 0.f);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / tiles, q0 = (i % tiles) * P, np = std::min(P, OHW - q0);
#if EFFOPS_HAVE_X86
      if (avx2) {
        forward_tile_avx2<T>(s, x, dw_w, dw_b, pw_packed, pw_b, y, n, q0, np, Cp, A.data(), nchw, lines.data());
        continue;
      }
#endif
      forward_tile_scalar<T>(s, x, dw_w, dw_b, pw_packed, pw_b, y, n, q0, np, Cp, A.data(), nchw, lines.data());
    }
  });
}

template <typename T>
void backward(const Shape& s, const T* x, const T* gy, const float* dw_w, const float* dw_b, const float* pw_packed_t,
              float* gx, float* g_dw, float* g_pw, float* g_dwb, float* g_pwb) {
  const int64_t Cp = row_stride(s.C), P = tile_pixels(Cp), taps = s.KH * s.KW;
  // Bands of output rows: band b and b + 2 touch disjoint input rows when (KH-1)*DH < (R+1)*SH.
  const int64_t min_rows = std::max<int64_t>(1, (s.KH - 1) * s.DH / s.SH);
  const int64_t R = std::min(s.OH, std::max(min_rows, (P + s.OW - 1) / s.OW));
  const int64_t bands = (s.OH + R - 1) / R;
  const int phases = gx ? 2 : 1;
  const bool avx2 = use_avx2();
  // Per-thread sums of the weight gradients, reduced below.
  const int threads = at::get_num_threads();
  const int64_t n_dw = g_dw ? taps * s.C : 0, n_pw = g_pw ? s.O * Cp : 0, n_dwb = g_dwb ? s.C : 0,
                n_pwb = g_pwb ? s.O : 0, per = n_dw + n_pw + n_dwb + n_pwb;
  std::vector<float> sums(threads * per, 0.f);
  auto partials = [&](int t) {
    float* base = sums.data() + t * per;
    return Partials{g_dw ? base : nullptr, g_pw ? base + n_dw : nullptr, g_dwb ? base + n_dw + n_pw : nullptr,
                    g_pwb ? base + n_dw + n_pw + n_dwb : nullptr};
  };
  for (int phase = 0; phase < phases; ++phase) {
    const int64_t per_image = (bands - phase + phases - 1) / phases;
    if (per_image <= 0) continue;
    at::parallel_for(0, s.N * per_image, 1, [&](int64_t begin, int64_t end) {
      const Partials part = partials(at::get_thread_num());
      std::vector<float> H(P * Cp, 0.f), A(g_pw && s.act != kNone ? P * Cp : 0), G(P * Cp, 0.f);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / per_image, band = (i % per_image) * phases + phase;
        const int64_t q_end = std::min(s.OH, (band + 1) * R) * s.OW;
        for (int64_t q0 = band * R * s.OW; q0 < q_end; q0 += P) {
          const int64_t np = std::min(P, q_end - q0);
#if EFFOPS_HAVE_X86
          if (avx2) {
            backward_tile_avx2<T>(s, x, gy, dw_w, dw_b, pw_packed_t, gx, part, n, q0, np, Cp, H.data(), A.data(),
                                  G.data());
            continue;
          }
#endif
          backward_tile_scalar<T>(s, x, gy, dw_w, dw_b, pw_packed_t, gx, part, n, q0, np, Cp, H.data(), A.data(),
                                  G.data());
        }
      }
    });
  }
  for (int t = 0; t < threads; ++t) {
    const Partials part = partials(t);
    for (int64_t i = 0; i < n_dw; ++i) g_dw[i] = (t ? g_dw[i] : 0.f) + part.g_dw[i];
    for (int64_t o = 0; o < (g_pw ? s.O : 0); ++o)
      for (int64_t c = 0; c < s.C; ++c) g_pw[o * s.C + c] = (t ? g_pw[o * s.C + c] : 0.f) + part.g_pw[o * Cp + c];
    for (int64_t i = 0; i < n_dwb; ++i) g_dwb[i] = (t ? g_dwb[i] : 0.f) + part.g_dwb[i];
    for (int64_t i = 0; i < n_pwb; ++i) g_pwb[i] = (t ? g_pwb[i] : 0.f) + part.g_pwb[i];
  }
}

#define EFFOPS_INSTANTIATE(T)                                                                               \
  template void forward<T>(const Shape&, const T*, const float*, const float*, const float*, const float*, T*,   \
                           bool);                                                                         \
  template void backward<T>(const Shape&, const T*, const T*, const float*, const float*, const float*, float*,  \
                            float*, float*, float*, float*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)

}  // namespace effops::cpu::dwpw
