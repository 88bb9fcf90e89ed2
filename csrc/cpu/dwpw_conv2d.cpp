// Fused depthwise + pointwise convolution, forward (see dwpw_conv2d.h for the layout; the backward is
// in dwpw_conv2d_backward.cpp, the shared helpers in dwpw_kernels.h).
//
// Every loop body is a template over the vector type V (Avx512Vec, Avx2Vec or ScalarVec from simd.h).
// The entry points per tile (`*_avx512`, `*_avx2`, `*_scalar`) are marked `flatten`, so the whole tile
// computation is inlined into them, each compiled for its level; cpu_features picks one at run time.
#include "cpu/dwpw_conv2d.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/dwpw_kernels.h"

namespace effops::cpu::dwpw {
namespace {

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
// past C are left alone), with the activation applied when `act` is given.
template <typename V, typename T>
EFFOPS_INLINE void depthwise_tile(const Shape& s, const T* xn, const float* w, const float* b, int64_t q0, int64_t np,
                                  int64_t Cp, int act, float* h) {
  for (int64_t p = 0; p < np; ++p) {
    const int64_t oh = (q0 + p) / s.OW, ow = (q0 + p) % s.OW;
    float* hp = h + p * Cp;
    int64_t c = depthwise_channels<V>(s, xn, w, b, oh, ow, 0, s.C, hp);
#if EFFOPS_HAVE_X86
    if constexpr (V::kWidth > Avx2Vec::kWidth) c = depthwise_channels<Avx2Vec>(s, xn, w, b, oh, ow, c, s.C, hp);
#endif
    depthwise_channels<ScalarVec>(s, xn, w, b, oh, ow, c, s.C, hp);
    // While the row is in L1; pad columns hold 0 and act(0) == 0 for every activation.
    if (act != kNone)
      for (int64_t k = 0; k < round_up(s.C, kNr); k += V::kWidth) act_forward(V::load(hp + k), act).store(hp + k);
  }
}


// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
// Length of one stride-phase line of the NCHW depthwise (see depthwise_rows_nchw).
// OW is rounded up to 16 (the widest vector) so that a row's last vector may read past OW (its extra
// lanes are dropped).
int64_t phase_len(const Shape& s) { return round_up(s.OW, 16) + (s.KW - 1) * s.DW / s.SW + 1; }
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
  // The row copies run in 256-bit vectors at every level: with 512-bit ones (their stores start a
  // padding column off alignment) the AVX-512 forward of 8 x 144 -> 24 @56 NCHW measured 11.6 ms, most of
  // it in this loop, against 5.1 ms so (one thread; the AVX2 body: 6.7-7.3 ms).
#if EFFOPS_HAVE_X86
  using CopyV = std::conditional_t<(V::kWidth > Avx2Vec::kWidth), Avx2Vec, V>;
#else
  using CopyV = V;
#endif
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
          for (; m + CopyV::kWidth <= m_hi - m_lo; m += CopyV::kWidth) CopyV::load(src + m).store(line + m_lo + m);
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

#if EFFOPS_HAVE_X86
// ---- bf16 channels-last forward at the avx512_bf16 level (T = bf16, pw_pairs given) ----
// The depthwise output never exists in fp32 memory: it is summed in fp32 registers (bf16 loads widened,
// fp32 weights), the activation applied there, and rounded into bf16-pair words by vcvtneps2bf16 /
// vcvtne2ps2bf16 (round to nearest even, as torch rounds its bf16 intermediate): the A operand of the
// vdpbf16ps product, row stride Cp bf16. Channels past C are
// masked to 0 at the loads (act(0) == 0), so the pad words of a row are 0 without a second pass.
// (The fp32 tile buffer, its activation pass and a scalar bf16 rounding per vector, which this
// replaces, measured about half of the forward at 8 x 64 -> 128 @56.)

// 16 bf16 as fp32: all of them, or (Masked) the lanes of m, the others 0.
template <bool Masked>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE __m512 load_bf16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = Masked ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <bool Masked>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE __m512 load_f32(const float* p, __mmask16 m) {
  return Masked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

// Strides of the depthwise tap loops, hoisted out of Shape (the compiler reloads its fields after
// every vector store, which may alias them).
struct TapSteps {
  int64_t x_kh, x_kw, w_kh, C;
};

// Depthwise output, activation applied, of channels [c, c + 32 * G) for one pixel whose valid taps are
// nkh rows x nkw columns from x0 (the input pixel of its first valid tap) and w (that tap's weights):
// written to out as 16 * G bf16-pair words. G groups: 2 * G independent FMA chains. Masked: the last
// group's lanes past C (`last`) read as 0.
template <int G, bool Masked>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE void depthwise_pairs(const TapSteps& t, const c10::BFloat16* x0,
                                                            const float* w, const float* b, int64_t nkh, int64_t nkw,
                                                            int64_t c, __mmask32 last, int act, uint32_t* out) {
  __mmask16 m[2 * G];
  for (int g = 0; g < G; ++g) {
    const __mmask32 mg = g + 1 == G && Masked ? last : ~__mmask32(0);
    m[2 * g] = static_cast<__mmask16>(mg), m[2 * g + 1] = static_cast<__mmask16>(mg >> 16);
  }
  __m512 acc[2 * G];
  for (int u = 0; u < 2 * G; ++u) acc[u] = b ? load_f32<Masked>(b + c + 16 * u, m[u]) : _mm512_setzero_ps();
  for (int64_t kh = 0; kh < nkh; ++kh) {
    const c10::BFloat16* xrow = x0 + kh * t.x_kh + c;
    const float* wrow = w + kh * t.w_kh + c;
    for (int64_t kw = 0; kw < nkw; ++kw) {
      const c10::BFloat16* xp = xrow + kw * t.x_kw;
      const float* wp = wrow + kw * t.C;
      for (int u = 0; u < 2 * G; ++u)
        acc[u] = _mm512_fmadd_ps(load_bf16<Masked>(xp + 16 * u, m[u]), load_f32<Masked>(wp + 16 * u, m[u]), acc[u]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 lo = act_forward(Avx512Vec{acc[2 * g]}, act).v, hi = act_forward(Avx512Vec{acc[2 * g + 1]}, act).v;
    _mm512_storeu_si512(out + c / 2 + 16 * g, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Valid tap range of one kernel axis (tap_range) without divisions where the dilation is 1.
EFFOPS_INLINE void tap_range_fast(int64_t o, int64_t stride, int64_t pad, int64_t dil, int64_t K, int64_t in,
                                  int64_t& start, int64_t& k0, int64_t& k1) {
  if (dil != 1) return tap_range(o, stride, pad, dil, K, in, start, k0, k1);
  start = o * stride - pad;
  k0 = std::max<int64_t>(0, -start);
  k1 = std::max(k0, std::min<int64_t>(K, in - start));
}

// The depthwise output of pixels [q0, q0 + np) of image xn as rows of bf16 pairs A16[np][Cp / 2].
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE void depthwise_tile_pairs(const Shape& s, const c10::BFloat16* xn,
                                                                 const float* w, const float* b, int64_t q0,
                                                                 int64_t np, int64_t Cp, uint32_t* A16) {
  const TapSteps t{s.DH * s.W * s.C, s.DW * s.C, s.KW * s.C, s.C};
  const int64_t groups = (s.C + 31) / 32, rem = s.C - (groups - 1) * 32, act = s.act;
  const __mmask32 last = rem == 32 ? ~__mmask32(0) : (__mmask32(1) << rem) - 1;
  const bool masked = rem != 32, pair_last = groups % 2 == 0;
  const int64_t OW = s.OW, row_words = Cp / 2;
  int64_t oh = q0 / OW, ow = q0 % OW;
  int64_t ih0, kh0, kh1;
  tap_range_fast(oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
  for (int64_t p = 0; p < np; ++p) {
    int64_t iw0, kw0, kw1;
    tap_range_fast(ow, s.SW, s.PW, s.DW, s.KW, s.W, iw0, kw0, kw1);
    const c10::BFloat16* x0 = xn + ((ih0 + kh0 * s.DH) * s.W + iw0 + kw0 * s.DW) * s.C;
    const float* w0 = w + (kh0 * s.KW + kw0) * s.C;
    const int64_t nkh = kh1 - kh0, nkw = kw1 - kw0;
    uint32_t* out = A16 + p * row_words;
    // Two groups (64 channels, 4 FMA chains) at a time, then the last one or two (masked if C % 32).
    const int64_t full = groups - (pair_last ? 2 : 1);
    for (int64_t g = 0; g < full; g += 2)
      depthwise_pairs<2, false>(t, x0, w0, b, nkh, nkw, g * 32, last, act, out);
    const int64_t c = full * 32;
    if (pair_last) {
      if (masked) depthwise_pairs<2, true>(t, x0, w0, b, nkh, nkw, c, last, act, out);
      else depthwise_pairs<2, false>(t, x0, w0, b, nkh, nkw, c, last, act, out);
    } else {
      if (masked) depthwise_pairs<1, true>(t, x0, w0, b, nkh, nkw, c, last, act, out);
      else depthwise_pairs<1, false>(t, x0, w0, b, nkh, nkw, c, last, act, out);
    }
    if (++ow == OW) {
      ow = 0;
      tap_range_fast(++oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
    }
  }
}

// The depthwise of J consecutive output pixels of one row for 16 channels (lanes of m; the others 0),
// for kernel width KW and stride S (dilation 1 along the row): each input pixel of a kernel row is
// loaded and widened once into registers and feeds the up to KW outputs that read it (the per-pixel
// form widens it once per tap: KW times). xr: the input rows' pixel 0 at channel c, row step x_kh;
// iw0: the input column of output pixel 0's first tap. Edge: some of the J * S + KW - S columns lie
// outside [0, W) (they read as 0). Masked: m is not all 16 lanes (masked loads only then: with a full
// mask they measured several times slower than plain loads on Zen 5).
template <int KW, int S, int J, bool Edge, bool Masked>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE void depthwise_strip(const c10::BFloat16* xr, int64_t x_kh, int64_t C,
                                                            int64_t W, int64_t iw0, const float* w, int64_t w_kh,
                                                            const float* b, int64_t nkh, __mmask16 m, int act,
                                                            int64_t jn, uint32_t* out, int64_t out_rs) {
  constexpr int NI = (J - 1) * S + KW;
  __m512 acc[J];
  const __m512 bias = b ? load_f32<Masked>(b, m) : _mm512_setzero_ps();
  for (int j = 0; j < J; ++j) acc[j] = bias;
  // Pointers stepped by C rather than indexed by i * C: the indexed form kept its NI offsets on the
  // stack (general registers run out).
  for (int64_t kh = 0; kh < nkh; ++kh) {
    const c10::BFloat16* row = xr + kh * x_kh;
    int64_t off = iw0 * C;  // an offset, not a pointer: left of the image it would point before x
    __m512 in[NI];
    for (int i = 0; i < NI; ++i, off += C)
      in[i] = !Edge || (iw0 + i >= 0 && iw0 + i < W) ? load_bf16<Masked>(row + off, m) : _mm512_setzero_ps();
    const float* wp = w + kh * w_kh;
    for (int kw = 0; kw < KW; ++kw, wp += C) {
      const __m512 wv = load_f32<Masked>(wp, m);
      for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(in[j * S + kw], wv, acc[j]);
    }
  }
  for (int j = 0; j < J; ++j)
    if (j < jn)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * out_rs),
                          (__m256i)_mm512_cvtneps_pbh(act_forward(Avx512Vec{acc[j]}, act).v));
}

// depthwise_tile_pairs for kernel width KW and stride S along rows (dilation 1 there): the tile's
// pixels as runs along output rows, J pixels x 16 channels at a time (depthwise_strip).
template <int KW, int S>
EFFOPS_AVX512_BF16_TARGET EFFOPS_INLINE void depthwise_tile_strips(const Shape& s, const c10::BFloat16* xn,
                                                                  const float* w, const float* b, int64_t q0,
                                                                  int64_t np, int64_t Cp, uint32_t* A16) {
  constexpr int J = S == 1 ? 8 : 6;  // registers: (J - 1) * S + KW inputs + J sums + a weight <= 32
  const int64_t C = s.C, W = s.W, OW = s.OW, row_words = Cp / 2, act = s.act;
  for (int64_t p = 0; p < np;) {
    const int64_t oh = (q0 + p) / OW, ow_a = (q0 + p) % OW, len = std::min(OW - ow_a, np - p);
    int64_t ih0, kh0, kh1;
    tap_range_fast(oh, s.SH, s.PH, s.DH, s.KH, s.H, ih0, kh0, kh1);
    const c10::BFloat16* xr = xn + (ih0 + kh0 * s.DH) * W * C;
    const float* wk = w + kh0 * KW * C;
    for (int64_t j0 = 0; j0 < len; j0 += J) {
      const int64_t iw0 = (ow_a + j0) * S - s.PW, jn = std::min<int64_t>(J, len - j0);
      const bool edge = iw0 < 0 || iw0 + (J - 1) * S + KW > W;
      uint32_t* out = A16 + (p + j0) * row_words;
      // Prefetch the input rows that the next output row reads first, at these columns:
      // one output row later they are there. At batch 32 (x 13 MB, out of cache) the tap loads
      // otherwise waited on memory, each new input row being a fresh stream to the hardware.
      for (int64_t r = 0; r < s.SH; ++r) {
        const int64_t ihp = (oh + 1) * s.SH - s.PH + (s.KH - 1) * s.DH - r;
        if (ihp < 0 || ihp >= s.H) continue;
        const int64_t c0 = std::max<int64_t>(0, iw0), c1 = std::min<int64_t>(W, iw0 + J * S);
        const char* a = reinterpret_cast<const char*>(xn + (ihp * W + c0) * C);
        const char* e = reinterpret_cast<const char*>(xn + (ihp * W + c1) * C);
        for (; a < e; a += 64) _mm_prefetch(a, _MM_HINT_T0);
      }
      // (Not a lambda: one is not compiled for this level unless inlined.)
      const int64_t x_kh = s.DH * W * C, w_kh = KW * C, nkh = kh1 - kh0;
      int64_t c = 0;
      for (; c + 16 <= C; c += 16) {
        const float* bc = b ? b + c : nullptr;
        if (edge)
          depthwise_strip<KW, S, J, true, false>(xr + c, x_kh, C, W, iw0, wk + c, w_kh, bc, nkh, 0xffff, act, jn,
                                                 out + c / 2, row_words);
        else
          depthwise_strip<KW, S, J, false, false>(xr + c, x_kh, C, W, iw0, wk + c, w_kh, bc, nkh, 0xffff, act, jn,
                                                  out + c / 2, row_words);
      }
      if (c < C) {
        const __mmask16 m = static_cast<__mmask16>((1u << (C - c)) - 1);
        const float* bc = b ? b + c : nullptr;
        if (edge)
          depthwise_strip<KW, S, J, true, true>(xr + c, x_kh, C, W, iw0, wk + c, w_kh, bc, nkh, m, act, jn,
                                                out + c / 2, row_words);
        else
          depthwise_strip<KW, S, J, false, true>(xr + c, x_kh, C, W, iw0, wk + c, w_kh, bc, nkh, m, act, jn,
                                                 out + c / 2, row_words);
      }
    }
    p += len;
  }
}

// The pointwise product in bf16: y[r][o + q * 16 + j] = bias + sum over pairs k of a[r * a_rs + k] .
// b[q * b_ps + k * 16 + j], each 32-bit word holding the bf16 values of channels 2k (low half) and
// 2k + 1 (high half); one vdpbf16ps per row, pair and panel adds both products to 16 fp32 sums, where
// the fp32 body does two FMAs on twice the bytes. Blocking as the fp32 AVX-512 body's (8 x 3 panels).
// The sums are rounded to bf16 (vcvtneps2bf16) and stored from the registers, columns past `cols`
// masked off. masked_linear_micro.h's micro_blocks_dpbf16 is the same instruction over kept blocks of
// a sparse weight.
// Lanes of the columns left of `left` in a 16-column panel.
EFFOPS_INLINE __mmask16 column_mask(int64_t left) {
  return left >= kNr ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
}

template <int R, int NP>
__attribute__((noinline)) EFFOPS_AVX512_BF16_TARGET void micro_dpbf16(const uint32_t* a, int64_t a_rs,
                                                                     const uint32_t* b, int64_t b_ps, int64_t K2,
                                                                     const float* bias, int64_t cols,
                                                                     c10::BFloat16* y, int64_t y_rs) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_setzero_ps();
  dpbf16_accumulate<R, NP>(acc, a, a_rs, 1, b, kNr, b_ps, K2);
  if (bias)
    for (int q = 0; q < NP; ++q) {
      const __m512 bq = _mm512_maskz_loadu_ps(column_mask(cols - q * kNr), bias + q * kNr);
      for (int r = 0; r < R; ++r) acc[r][q] = _mm512_add_ps(acc[r][q], bq);
    }
  if (cols >= NP * kNr) {
    // Whole panels: two at a time into one 64-byte store (vcvtne2ps2bf16 rounds and packs both).
    for (int r = 0; r < R; ++r) {
      int q = 0;
      for (; q + 1 < NP; q += 2)
        _mm512_storeu_si512(y + r * y_rs + q * kNr, (__m512i)_mm512_cvtne2ps_pbh(acc[r][q + 1], acc[r][q]));
      if (q < NP)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_rs + q * kNr), (__m256i)_mm512_cvtneps_pbh(acc[r][q]));
    }
    return;
  }
  for (int q = 0; q < NP; ++q) {
    const __mmask16 m = column_mask(cols - q * kNr);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(y + r * y_rs + q * kNr, m, (__m256i)_mm512_cvtneps_pbh(acc[r][q]));
  }
}

// micro_dpbf16<rows, NP> for 1 <= rows <= R (the last pixels of a tile).
template <int R, int NP>
EFFOPS_INLINE void micro_dpbf16_rows(int64_t rows, const uint32_t* a, int64_t a_rs, const uint32_t* b, int64_t b_ps,
                                     int64_t K2, const float* bias, int64_t cols, c10::BFloat16* y, int64_t y_rs) {
  if constexpr (R > 1) {
    if (rows < R) return micro_dpbf16_rows<R - 1, NP>(rows, a, a_rs, b, b_ps, K2, bias, cols, y, y_rs);
  }
  micro_dpbf16<R, NP>(a, a_rs, b, b_ps, K2, bias, cols, y, y_rs);
}

// The np pixels of a tile against NP panels: R x NP = 24 accumulators (12 for one panel), R pixels a call.
// NP = 4 (6 x 4) where the outputs allow: per pair, 4 weight loads and 6 broadcasts for 24 vdpbf16ps
// (8 x 3: 3 and 8).
template <int NP>
EFFOPS_INLINE void product_panels(int64_t np, const uint32_t* A16, int64_t a_rs, const uint32_t* b, int64_t b_ps,
                                  int64_t K2, const float* bias, int64_t cols, c10::BFloat16* y, int64_t y_rs) {
  constexpr int R = NP == 1 ? 12 : 24 / NP;
  for (int64_t r0 = 0; r0 < np; r0 += R)
    micro_dpbf16_rows<R, NP>(std::min<int64_t>(R, np - r0), A16 + r0 * a_rs, a_rs, b, b_ps, K2, bias, cols,
                             y + r0 * y_rs, y_rs);
}

// One tile of np pixels: the depthwise into A16, then y = A16 @ pairs, up to 4 panels of 16 outputs at a time.
EFFOPS_AVX512_BF16_TARGET EFFOPS_FLATTEN void forward_tile_bf16_pairs(const Shape& s, const c10::BFloat16* x,
                                                                     const float* dw_w, const float* dw_b,
                                                                     const uint32_t* pw_pairs, const float* pw_b,
                                                                     c10::BFloat16* y, int64_t n, int64_t q0,
                                                                     int64_t np, int64_t Cp, uint32_t* A16) {
  const c10::BFloat16* xn = x + n * s.H * s.W * s.C;
  // Strips along rows for the usual kernels (3, 5, 7 wide, stride 1 or 2, no dilation along rows).
  const int strip = s.DW != 1 || s.SW > 2 ? 0 : s.SW * 10 + static_cast<int>(s.KW);
  switch (strip) {
    case 13: depthwise_tile_strips<3, 1>(s, xn, dw_w, dw_b, q0, np, Cp, A16); break;
    case 23: depthwise_tile_strips<3, 2>(s, xn, dw_w, dw_b, q0, np, Cp, A16); break;
    case 15: depthwise_tile_strips<5, 1>(s, xn, dw_w, dw_b, q0, np, Cp, A16); break;
    case 25: depthwise_tile_strips<5, 2>(s, xn, dw_w, dw_b, q0, np, Cp, A16); break;
    case 17: depthwise_tile_strips<7, 1>(s, xn, dw_w, dw_b, q0, np, Cp, A16); break;
    default: depthwise_tile_pairs(s, xn, dw_w, dw_b, q0, np, Cp, A16);
  }
  const int64_t K2 = (s.C + 1) / 2, panels = (s.O + kNr - 1) / kNr, a_rs = Cp / 2;
  c10::BFloat16* yt = y + (n * s.OH * s.OW + q0) * s.O;
  for (int64_t pan = 0; pan < panels;) {
    // Blocks of 4 panels; 5 left: 3 + 2 (not 4 + 1, whose 12 accumulators run slower).
    const int64_t left = panels - pan, npan = left == 5 ? 3 : std::min<int64_t>(4, left), o = pan * kNr;
    const uint32_t* b = pw_pairs + pan * K2 * kNr;
    const float* bias = pw_b ? pw_b + o : nullptr;
    switch (npan) {
      case 4: product_panels<4>(np, A16, a_rs, b, K2 * kNr, K2, bias, s.O - o, yt + o, s.O); break;
      case 3: product_panels<3>(np, A16, a_rs, b, K2 * kNr, K2, bias, s.O - o, yt + o, s.O); break;
      case 2: product_panels<2>(np, A16, a_rs, b, K2 * kNr, K2, bias, s.O - o, yt + o, s.O); break;
      default: product_panels<1>(np, A16, a_rs, b, K2 * kNr, K2, bias, s.O - o, yt + o, s.O);
    }
    pan += npan;
  }
}
#endif

template <typename V, typename T>
EFFOPS_INLINE void forward_tile(const Shape& s, const T* x, const float* dw_w, const float* dw_b, const float* pw,
                                const float* pw_b, T* y, int64_t n, int64_t q0, int64_t np, int64_t Cp, float* A,
                                bool nchw, float* lines) {
  constexpr int MR = Blocking<V>::MR, NP = Blocking<V>::NP;
  constexpr int64_t NC = NP * kNr;  // output columns per micro-kernel call
  const int64_t panels = (s.O + kNr - 1) / kNr;
  alignas(64) float out[kMaxMr * kMaxNp * kNr];
  if (nchw) {
    // NCHW: the tile is np / OW whole output rows, its depthwise output transposed, AT[C][Pp]. The
    // pointwise product is the channels-last one (MR pixels x NP panels of 16 outputs, B = the packed
    // weight panels [C][16], L1-resident) with A read column-wise from AT: the MR pixels of one k are
    // MR consecutive floats. The result is stored transposed: consecutive pixels of each output plane.
    // (A 6 outputs x 16 pixels kernel over AT measured 3x slower at C = 256..512: it streamed all of
    // AT from L2 for every 6 outputs.)
    const int64_t Pp = round_up(np, kNr) + kNr;  // + 16: a power-of-two row stride would thrash L1 sets
    float* AT = A;
    depthwise_rows_nchw<V>(s, x + n * s.C * s.H * s.W, dw_w, dw_b, q0 / s.OW, np / s.OW, Pp, s.act, AT, lines);
    T* yn = y + n * s.O * s.OH * s.OW + q0;
    const int64_t OHW = s.OH * s.OW;
    for (int64_t o = 0; o < s.O; o += NC) {
      const int64_t npan = std::min<int64_t>(NP, panels - o / kNr), ld = npan * kNr;
      const float* pwb = pw + (o / kNr) * s.C * kNr;
      const int64_t cols = std::min<int64_t>(ld, s.O - o);
      for (int64_t r0 = 0; r0 < np; r0 += MR) {
        const int64_t rows = std::min<int64_t>(MR, np - r0);
        micro_call<V>(rows, npan, AT + r0, 1, Pp, pwb, kNr, s.C * kNr, s.C, out);  // out's row stride: ld
        for (int64_t j = 0; j < cols; ++j) {
          T* yo = yn + (o + j) * OHW + r0;
          const float bias = pw_b ? pw_b[o + j] : 0.f;
          for (int64_t r = 0; r < rows; ++r) yo[r] = from_float<T>(out[r * ld + j] + bias);
        }
      }
    }
    return;
  }
  depthwise_tile<V>(s, x + n * s.H * s.W * s.C, dw_w, dw_b, q0, np, Cp, s.act, A);
  T* yt = y + (n * s.OH * s.OW + q0) * s.O;
  for (int64_t o = 0; o < s.O; o += NC) {
    const int64_t npan = std::min<int64_t>(NP, panels - o / kNr), ld = npan * kNr;
    const float* pwb = pw + (o / kNr) * s.C * kNr;
    // Columns [o, o + full) are whole vectors inside O, stored straight from the accumulators; the
    // rest (O's tail) goes through `out`.
    const int64_t full = std::min(ld, (s.O - o) / V::kWidth * V::kWidth), cols = std::min(ld, s.O - o);
    for (int64_t r0 = 0; r0 < np; r0 += MR) {
      const int64_t rows = std::min<int64_t>(MR, np - r0);
      const auto epi = [&](int r, int64_t v, V acc) {
        if (v < full) (acc + (pw_b ? V::load(pw_b + o + v) : V::zero())).store(yt + (r0 + r) * s.O + o + v);
        else acc.store(out + r * ld + v);
      };
      micro_rows<V>(rows, npan, A + r0 * Cp, Cp, 1, pwb, kNr, s.C * kNr, s.C, epi);
      if (full == cols) continue;
      for (int64_t r = 0; r < rows; ++r) {
        T* yr = yt + (r0 + r) * s.O + o;
        for (int64_t j = full; j < cols; ++j) yr[j] = from_float<T>(out[r * ld + j] + (pw_b ? pw_b[o + j] : 0.f));
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
template <typename T>
EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void forward_tile_avx512(const Shape& s, const T* x, const float* dw_w,
                                                             const float* dw_b, const float* pw, const float* pw_b,
                                                             T* y, int64_t n, int64_t q0, int64_t np, int64_t Cp,
                                                             float* A, bool nchw, float* lines) {
  forward_tile<Avx512Vec>(s, x, dw_w, dw_b, pw, pw_b, y, n, q0, np, Cp, A, nchw, lines);
}
#endif


}  // namespace

bool forward_takes_bf16_pairs(bool nchw) {
#if EFFOPS_HAVE_X86
  return !nchw && cpu_isa_at_least(CpuIsa::kAvx512Bf16);
#else
  return false;
#endif
}

template <typename T>
void forward(const Shape& s, const T* x, const float* dw_w, const float* dw_b, const float* pw_packed,
             const float* pw_b, T* y, bool nchw, const uint32_t* pw_pairs) {
  if constexpr (!std::is_same_v<T, c10::BFloat16>) pw_pairs = nullptr;
  // Given the pairs, the caller packed no fp32 panels (pw_packed may be null): the pairs body runs even if
  // the level was lowered since the caller asked forward_takes_bf16_pairs, as long as the CPU has it.
  if (nchw || static_cast<int>(detected_cpu_isa()) < static_cast<int>(CpuIsa::kAvx512Bf16)) pw_pairs = nullptr;
  const int64_t Cp = row_stride(s.C), OHW = s.OH * s.OW;
  // Channels-last: tiles of P pixels anywhere in the image. NCHW: tiles of whole output rows (the
  // depthwise runs along rows), about as many pixels, at least one row.
  const int64_t rows = std::max<int64_t>(1, tile_pixels(Cp) / s.OW);
  int64_t P = nchw ? rows * s.OW : tile_pixels(Cp);
  if (pw_pairs) {
    // The bf16 tile is half the bytes of the fp32 one: twice the pixels. The image split into tiles of
    // about equal size (not P, P, ..., a remainder of a few pixels: at 7 x 7 that left a tile of one
    // pixel, which streams all of the pointwise weight for one row of outputs).
    const int64_t t = std::max<int64_t>(1, (OHW + P) / (2 * P));
    P = (OHW + t - 1) / t;
  }
  const int64_t tiles = (OHW + P - 1) / P;
  const int64_t buf = nchw ? (round_up(P, kNr) + kNr) * s.C : P * Cp;
  const int64_t nlines = nchw ? band_input_rows(s, rows) * s.SW * phase_len(s) : 0;
  const bool avx2 = use_avx2(), avx512 = use_avx512();
  at::parallel_for(0, s.N * tiles, 1, [&](int64_t begin, int64_t end) {
    // Zeroed once: pad columns / tail pixels stay finite (the micro-kernel's extra lanes are dropped).
    std::vector<float> A(pw_pairs ? 0 : buf, 0.f), lines(nlines, 0.f);
    std::vector<uint32_t> A16(pw_pairs ? P * Cp / 2 : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / tiles, q0 = (i % tiles) * P, np = std::min(P, OHW - q0);
#if EFFOPS_HAVE_X86
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (pw_pairs) {
          forward_tile_bf16_pairs(s, x, dw_w, dw_b, pw_pairs, pw_b, y, n, q0, np, Cp, A16.data());
          continue;
        }
      }
      if (avx512) {
        forward_tile_avx512<T>(s, x, dw_w, dw_b, pw_packed, pw_b, y, n, q0, np, Cp, A.data(), nchw, lines.data());
        continue;
      }
      if (avx2) {
        forward_tile_avx2<T>(s, x, dw_w, dw_b, pw_packed, pw_b, y, n, q0, np, Cp, A.data(), nchw, lines.data());
        continue;
      }
#endif
      forward_tile_scalar<T>(s, x, dw_w, dw_b, pw_packed, pw_b, y, n, q0, np, Cp, A.data(), nchw, lines.data());
    }
  });
}

#define EFFOPS_INSTANTIATE(T)                                                                               \
  template void forward<T>(const Shape&, const T*, const float*, const float*, const float*, const float*, T*,   \
                           bool, const uint32_t*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)

const char* dwpw_body() {
  if (cpu_isa_at_least(CpuIsa::kAvx512Bf16))
    return "avx512_bf16 (bf16 channels-last forward: depthwise to bf16 pairs, vdpbf16ps pointwise 6 x 64; bf16 "
           "backward: its two pointwise products by vdpbf16ps 6 x 64; fp32 FMA, 512-bit, 8 x 48, otherwise)";
  if (use_avx512()) return "avx512 (fp32 FMA, 512-bit, 8 x 48 micro-kernel)";
  return use_avx2() ? "avx2 (fp32 FMA, 256-bit, 6 x 16 micro-kernel)" : "scalar";
}

}  // namespace effops::cpu::dwpw
