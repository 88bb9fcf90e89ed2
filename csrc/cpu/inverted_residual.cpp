// Fused inverted-residual block, forward (see inverted_residual.h for what is computed and the layout).
//
// Loop nest: parallel over (image, band of output rows); per band, per step of R output rows:
//   1. expand the input rows the step reads that the ring does not hold yet (each row once per band):
//        ring[ih % C][PW + iw][0..Chp) = act(x[ih][iw][:] @ We + be)     GEMM, M = new rows x W, K = Cin
//   2. depthwise: d[p][c] = act(bd[c] + sum_taps ring[ih][ow * SW + kw][c] * wd[tap][c])   (7 pixels at a time)
//   3. project:   y[p][:] = d[p][:] @ Wp + bp (+ x[p][:])                  GEMM, M = R x OW, K = Ch
//      (with squeeze-excitation's gate g: d @ (g[k] Wp[k][:]), the image's weights scaled once)
// The two GEMMs run a register-blocked micro-kernel (MR pixels x NP panels of 16 columns, accumulators
// in registers for the whole K loop) on the packed weight panels; bias, activation, residual and the
// store are its epilogue. Every loop body is a template over the vector type V (ScalarVec, Avx2Vec,
// Avx512Vec from simd.h), instantiated once per level inside a function compiled for that level.
#include "cpu/inverted_residual.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/dwpw_kernels.h"  // act_forward: the activations of dwpw_conv2d, same codes
#include "cpu/inverted_residual_gemm.h"
#include "cpu/simd.h"

namespace effops::cpu::ir {

int64_t packed_size(const Shape& s) {
  const int64_t Chp = padded(s.Ch), Coutp = padded(s.Cout);
  return (s.expand ? Chp * s.Cin + Chp : 0) + s.KH * s.KW * Chp + Chp + Coutp * s.Ch + Coutp;
}

Packed packed_views(const Shape& s, const float* p) {
  const int64_t Chp = padded(s.Ch), Coutp = padded(s.Cout);
  Packed w{};
  if (s.expand) {
    w.expand_w = p, p += Chp * s.Cin;
    w.expand_b = p, p += Chp;
  }
  w.dw_w = p, p += s.KH * s.KW * Chp;
  w.dw_b = p, p += Chp;
  w.project_w = p, p += Coutp * s.Ch;
  w.project_b = p;
  return w;
}

namespace {

using dwpw::act_forward;

// One depthwise output row: d[ow][0..Chp) = act(bd + sum over taps rows[kh][ow * SW + kw][:] * wd[tap][:]).
// rows[kh]: the expanded input row of tap row kh, indexed from its left zero padding (or a zero row
// above/below the image), so no tap needs a bounds check.
template <class V>
EFFOPS_INLINE void depthwise_row(const Shape& s, const float* const* rows, const float* wd, const float* bd,
                                 int64_t Chp, float* d) {
  constexpr int W = V::kWidth;
  for (int64_t ow = 0; ow < s.OW; ++ow) {
    const int64_t off = ow * s.SW * Chp;
    float* dp = d + ow * Chp;
    int64_t c = 0;
    // Four vectors per step: four independent FMA chains hide the FMA latency.
    for (; c + 4 * W <= Chp; c += 4 * W) {
      V acc[4];
      for (int u = 0; u < 4; ++u) acc[u] = V::load(bd + c + u * W);
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const float* xr = rows[kh] + off + c;
        const float* wr = wd + kh * s.KW * Chp + c;
        for (int64_t kw = 0; kw < s.KW; ++kw)
          for (int u = 0; u < 4; ++u)
            acc[u] = V::fma(V::load(xr + kw * Chp + u * W), V::load(wr + kw * Chp + u * W), acc[u]);
      }
      for (int u = 0; u < 4; ++u) act_forward(acc[u], s.act).store(dp + c + u * W);
    }
    for (; c < Chp; c += W) {
      V acc = V::load(bd + c);
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw)
          acc = V::fma(V::load(rows[kh] + off + kw * Chp + c), V::load(wd + (kh * s.KW + kw) * Chp + c), acc);
      act_forward(acc, s.act).store(dp + c);
    }
  }
}

// depthwise_row for a KH x KW kernel known at compile time: per group of U channel vectors, the taps'
// weights are loaded into registers once and the row's pixels stream past them (one load per FMA,
// where depthwise_row loads the weight too). KH * KW * U weights + U accumulators must fit the vector
// registers: 3x3 with U = 2 and 5x5 with U = 1 on AVX-512 (32 zmm), 3x3 with U = 1 on AVX2 (16 ymm).
// Channels [0, C) of rows whose pixel stride is Chp.
template <class V, int KH, int KW, int U>
EFFOPS_INLINE void depthwise_row_fixed(const Shape& s, const float* const* rows, const float* wd, const float* bd,
                                       int64_t C, int64_t Chp, float* d) {
  constexpr int W = V::kWidth, T = KH * KW;
  int64_t c = 0;
  for (; c + U * W <= C; c += U * W) {
    V w[T][U], b[U];
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < U; ++u) w[t][u] = V::load(wd + t * Chp + c + u * W);
    for (int u = 0; u < U; ++u) b[u] = V::load(bd + c + u * W);
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const int64_t off = ow * s.SW * Chp + c;
      V acc[U];
      for (int u = 0; u < U; ++u) acc[u] = b[u];
      for (int kh = 0; kh < KH; ++kh)
        for (int kw = 0; kw < KW; ++kw)
          for (int u = 0; u < U; ++u)
            acc[u] = V::fma(V::load(rows[kh] + off + kw * Chp + u * W), w[kh * KW + kw][u], acc[u]);
      for (int u = 0; u < U; ++u) act_forward(acc[u], s.act).store(d + ow * Chp + c + u * W);
    }
  }
  if constexpr (U > 1) {
    if (c < C) {  // C is a multiple of 16: at most U - 1 vectors left
      const float* r[KH];
      for (int kh = 0; kh < KH; ++kh) r[kh] = rows[kh] + c;
      depthwise_row_fixed<V, KH, KW, 1>(s, r, wd + c, bd + c, C - c, Chp, d + c);
    }
  }
}

// depthwise_row for a KH x KW kernel and stride SW known at compile time, P output pixels at a time:
// per channel vector, each input pixel of a tap row is loaded once and feeds every one of the P
// accumulators whose window holds it, and a tap row's KW weights are loaded once per P pixels. Loads
// per output pixel and vector: KH (KW + (P - 1) SW + KW) / P, against KH KW with the weights held in
// registers (depthwise_row_fixed) and 2 KH KW in depthwise_row; P + KW + 1 registers, which a 5x5 kernel
// fits in AVX2's 16 (its 25 weights do not). The loop runs pixel block outer, channels inner, so a block
// reads a few pixels of KH rows (L1) where channels outer streams whole rows from L2. P = 7 divides the
// widths of these networks (112, 56, 28, 14, 7); another width >= P ends with a block overlapping the
// one before (its first pixels computed and written twice, the same values).
template <class V, int KH, int KW, int SW, int P>
EFFOPS_INLINE void depthwise_row_cols(const Shape& s, const float* const* rows, const float* wd, const float* bd,
                                      int64_t Chp, float* d) {
  constexpr int W = V::kWidth, span = (P - 1) * SW + KW;
  for (int64_t ow0 = 0; ow0 < s.OW; ow0 += P) {
    const int64_t o = std::min<int64_t>(ow0, s.OW - P);
    for (int64_t c = 0; c < Chp; c += W) {
      V acc[P];
      const V b = V::load(bd + c);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[p] = b;
#pragma GCC unroll 8
      for (int kh = 0; kh < KH; ++kh) {
        const float* xr = rows[kh] + o * SW * Chp + c;
        V w[KW];
#pragma GCC unroll 8
        for (int kw = 0; kw < KW; ++kw) w[kw] = V::load(wd + (kh * KW + kw) * Chp + c);
#pragma GCC unroll 32
        for (int j = 0; j < span; ++j) {
          const V xv = V::load(xr + j * Chp);
#pragma GCC unroll 8
          for (int p = 0; p < P; ++p) {
            const int kw = j - p * SW;  // the tap of pixel p that reads input pixel j
            if (kw >= 0 && kw < KW) acc[p] = V::fma(xv, w[kw], acc[p]);
          }
        }
      }
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) act_forward(acc[p], s.act).store(d + (o + p) * Chp + c);
    }
  }
}

// One depthwise output row: at the vector levels, 3x3 and 5x5 kernels of stride 1 or 2 on rows of at
// least 7 output pixels through depthwise_row_cols (whole blocks of MNASNet / MobileNetV3, b16, one
// thread, against the bodies below: AVX-512 5x5 1.07-1.44x, 3x3 1.00-1.08x; AVX2, with the expand epilogue
// change, 5x5 1.06-1.38x, 3x3 1.03-1.25x); narrower rows through the bodies below.
template <class V>
EFFOPS_INLINE void depthwise_any(const Shape& s, const float* const* rows, const float* wd, const float* bd,
                                 int64_t Chp, float* d) {
  constexpr int P = 7;
  if constexpr (V::kWidth > 1) {
    if (s.OW >= P && s.KH == s.KW && (s.KH == 3 || s.KH == 5) && (s.SW == 1 || s.SW == 2)) {
      if (s.KH == 3)
        return s.SW == 1 ? depthwise_row_cols<V, 3, 3, 1, P>(s, rows, wd, bd, Chp, d)
                         : depthwise_row_cols<V, 3, 3, 2, P>(s, rows, wd, bd, Chp, d);
      return s.SW == 1 ? depthwise_row_cols<V, 5, 5, 1, P>(s, rows, wd, bd, Chp, d)
                       : depthwise_row_cols<V, 5, 5, 2, P>(s, rows, wd, bd, Chp, d);
    }
  }
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<V, Avx512Vec>) {
    if (s.KH == 3 && s.KW == 3) return depthwise_row_fixed<V, 3, 3, 2>(s, rows, wd, bd, Chp, Chp, d);
    if (s.KH == 5 && s.KW == 5) return depthwise_row_fixed<V, 5, 5, 1>(s, rows, wd, bd, Chp, Chp, d);
  }
  if constexpr (std::is_same_v<V, Avx2Vec>) {
    if (s.KH == 3 && s.KW == 3) return depthwise_row_fixed<V, 3, 3, 1>(s, rows, wd, bd, Chp, Chp, d);
  }
#endif
  depthwise_row<V>(s, rows, wd, bd, Chp, d);
}


// How a band is cut into steps of R output rows, and the buffers that follows from (per task): a ring
// of C expanded input rows (each Wp x Chp, zero where the padding is; row ih in slot ih % C), a zero
// row for taps above or below the image, the step's depthwise output d[R * OW][Chp], an fp32 copy of
// the step's input rows for 16-bit x.
struct Plan {
  int64_t R, C, Wp, Chp;
};

// Width of a ring row: left padding, the row, and zeros far enough right for the last tap.
int64_t ring_width(const Shape& s) { return std::max(s.PW + s.W, (s.OW - 1) * s.SW + s.KW); }

// R output rows per step: enough for ~64 pixels per project GEMM and ~64 / SH rows of the expand GEMM
// (each GEMM call streams its weight panels once: with one 7-pixel row per call, the last stages read
// 1.2 MB of weights from L3 per 7 pixels), but at most `rows` (the band) and buffers of ~512 KB (L2).
Plan plan(const Shape& s, int64_t rows) {
  Plan p{};
  p.Wp = ring_width(s), p.Chp = padded(s.Ch);
  p.R = std::max<int64_t>(1, std::min<int64_t>(rows, (64 + s.OW - 1) / s.OW));
  const auto floats = [&](int64_t R) { return (((R - 1) * s.SH + s.KH) * p.Wp + R * s.OW) * p.Chp; };
  while (p.R > 1 && floats(p.R) * 4 > (512 << 10)) --p.R;
  p.C = (p.R - 1) * s.SH + s.KH;
  return p;
}

struct Buffers {
  std::vector<float> ring, zero, d, xrows, project_w;  // project_w: the gate-scaled project weights
};

// What a band does (squeeze-excitation needs d's means before the project: two passes over the bands).
//   plain:          expand, depthwise into a step buffer, project (d scaled per channel first if scale)
//   first pass:     expand, depthwise, d's per-channel sums added into sums; no project. With d_store the
//                   rows of d go there (the whole batch's d, in memory) for the second pass to read.
//   second pass:    with d_load: d's rows read from there (no expand, no depthwise), scaled, project.
struct BandOut {
  const float* scale = nullptr;  // [Chp] of this image
  float* sums = nullptr;         // [Chp] of this band: the first pass
  float* d_store = nullptr;      // [N][OH * OW][Chp]: the first pass keeps d
  const float* d_load = nullptr; // the same: the second pass reads it
};

// Expands the input rows output rows [o, o + r) read that the ring does not hold yet (next: the first
// such row, advanced) and writes d's rows [o, o + r) (r * OW pixels, Chp channels) at d.
template <class V, typename T>
EFFOPS_INLINE void expand_and_depthwise(const Shape& s, const Plan& p, const T* xn, const Packed& w, int64_t o,
                                        int64_t r, int64_t& next, float* d, Buffers& buf) {
  const int64_t Chp = p.Chp, row_floats = p.Wp * Chp, ch_panels = Chp / kPanel;
  float* ring = buf.ring.data();
  const float* rows[8];
  const int64_t lo = o * s.SH - s.PH, hi = lo + (r - 1) * s.SH + s.KH - 1;
  const int64_t a0 = std::max<int64_t>({next, lo, 0}), a1 = std::min(hi, s.H - 1);
  next = std::max(next, hi + 1);
  // Expanded pixel m of the new rows (m = (ih - a0) * W + iw) goes to its ring slot, after the padding.
  const auto slot = [&](int64_t m) { return ring + ((a0 + m / s.W) % p.C) * row_floats + (s.PW + m % s.W) * Chp; };
  if (a0 <= a1 && !s.expand) {  // e = x: the rows themselves, in fp32 (the padding channels stay zero)
    const T* xr = xn + a0 * s.W * s.Cin;
    for (int64_t m = 0; m < (a1 - a0 + 1) * s.W; ++m) {
      float* e = slot(m);
      for (int64_t c = 0; c < s.Cin; ++c) e[c] = to_float(xr[m * s.Cin + c]);
    }
  } else if (a0 <= a1) {
    // The epilogue runs once per MR x 16 tile, which with a small K (16-24 input channels: the 112x112
    // and 56x56 blocks) costs as much as the tile's FMAs: one division per tile (not per pixel) finds
    // the ring slot, and the activation is a constant of the loop (with_act), not a switch per vector.
    const int64_t M = (a1 - a0 + 1) * s.W;
    const float* a = reinterpret_cast<const float*>(xn + a0 * s.W * s.Cin);
    if constexpr (!std::is_same_v<T, float>) {
      const T* xr = xn + a0 * s.W * s.Cin;
      for (int64_t i = 0; i < M * s.Cin; ++i) buf.xrows[i] = to_float(xr[i]);
      a = buf.xrows.data();
    }
    with_act(s.act, [&](auto act) {
      gemm<V>(M, s.Cin, a, s.Cin, w.expand_w, ch_panels, w.expand_b,
              [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
                int64_t iw = m0 % s.W;
                float* e = slot(m0) + c0;
                for (int i = 0; i < rows_; ++i) {
                  for (int64_t j = 0; j < width; j += V::kWidth)
                    act_forward(V::load(out + i * width + j), act).store(e + j);
                  e += Chp;
                  if (++iw == s.W) iw = 0, e = slot(m0 + i + 1) + c0;  // the next input row's slot
                }
              });
    });
  }
  for (int64_t j = 0; j < r; ++j) {
    const int64_t ih0 = (o + j) * s.SH - s.PH;
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t ih = ih0 + kh;
      rows[kh] = ih >= 0 && ih < s.H ? ring + (ih % p.C) * row_floats : buf.zero.data();
    }
    depthwise_any<V>(s, rows, w.dw_w, w.dw_b, Chp, d + j * s.OW * Chp);
  }
}

// Output rows [oh0, oh1) of image n, in steps of p.R rows (BandOut says which pass): expand the input
// rows the step reads that the ring does not hold (one GEMM over their pixels: x's rows are contiguous
// in channels-last), the depthwise of each output row into d, the project GEMM over the step's pixels
// (y's rows are contiguous).
template <class V, typename T>
EFFOPS_INLINE void band(const Shape& s, const Plan& p, const T* x, const Packed& w, T* y, int64_t n, int64_t oh0,
                        int64_t oh1, const BandOut& to, Buffers& buf) {
  const int64_t Chp = p.Chp, out_panels = padded(s.Cout) / kPanel;
  const T* xn = x + n * s.H * s.W * s.Cin;
  // project(d * scale) = d @ (Wp with row k times scale[k]): the gate scales whichever has fewer values,
  // the Ch x Coutp weights once per band (then the second pass reads a kept d in place) or the band's
  // pixels of d (the 7x7 and 14x14 blocks, whose Ch x Cout weights outnumber a band's d).
  const bool gate = to.scale != nullptr && to.sums == nullptr;
  const bool gate_d = gate && s.Ch * padded(s.Cout) > (oh1 - oh0) * s.OW * Chp;
  const float* project_w = w.project_w;
  if (gate && !gate_d) {
    buf.project_w.resize(out_panels * s.Ch * kPanel);
    for (int64_t q = 0; q < out_panels; ++q)
      for (int64_t k = 0; k < s.Ch; ++k) {
        const V g = V::broadcast(to.scale[k]);
        const int64_t i = (q * s.Ch + k) * kPanel;
        for (int64_t j = 0; j < kPanel; j += V::kWidth) (V::load(w.project_w + i + j) * g).store(&buf.project_w[i + j]);
      }
    project_w = buf.project_w.data();
  }
  int64_t next = oh0 * s.SH - s.PH;  // first input row the ring does not hold
  for (int64_t o = oh0; o < oh1; o += p.R) {
    const int64_t r = std::min(p.R, oh1 - o), pixels = r * s.OW;
    const int64_t at = (n * s.OH + o) * s.OW * Chp;  // the step's first d value in d_store / d_load
    const float* d = to.d_load != nullptr ? to.d_load + at : buf.d.data();  // second pass: d as kept
    if (to.d_load == nullptr) {
      float* dw = to.d_store != nullptr ? to.d_store + at : buf.d.data();
      expand_and_depthwise<V>(s, p, xn, w, o, r, next, dw, buf);
      d = dw;
      if (to.sums != nullptr) {  // first pass: d's sums, no project (a channel vector's sum in a register)
        for (int64_t c = 0; c < Chp; c += V::kWidth) {
          V sum = V::load(to.sums + c);
          for (int64_t q = 0; q < pixels; ++q) sum = sum + V::load(d + q * Chp + c);
          sum.store(to.sums + c);
        }
        continue;
      }
    }
    if (gate_d) {  // d * scale into the step buffer (in place when d is there already)
      float* ds = buf.d.data();
      for (int64_t q = 0; q < pixels * Chp; q += Chp)
        for (int64_t c = 0; c < Chp; c += V::kWidth) (V::load(d + q + c) * V::load(to.scale + c)).store(ds + q + c);
      d = ds;
    }
    T* yo = y + (n * s.OH + o) * s.OW * s.Cout;
    const T* res = s.residual ? xn + o * s.W * s.Cin : nullptr;  // stride 1, W == OW: the same pixels
    gemm<V>(pixels, s.Ch, d, Chp, project_w, out_panels, w.project_b,
            [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
              store_rows<V>(m0, rows_, c0, width, out, s.Cout, res, yo);
            });
  }
}

template <typename T>
EFFOPS_FLATTEN void band_scalar(const Shape& s, const Plan& p, const T* x, const Packed& w, T* y, int64_t n,
                                int64_t oh0, int64_t oh1, const BandOut& to, Buffers& buf) {
  band<ScalarVec>(s, p, x, w, y, n, oh0, oh1, to, buf);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void band_avx2(const Shape& s, const Plan& p, const T* x, const Packed& w, T* y,
                                                 int64_t n, int64_t oh0, int64_t oh1, const BandOut& to,
                                                 Buffers& buf) {
  band<Avx2Vec>(s, p, x, w, y, n, oh0, oh1, to, buf);
}
template <typename T>
EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void band_avx512(const Shape& s, const Plan& p, const T* x, const Packed& w,
                                                     T* y, int64_t n, int64_t oh0, int64_t oh1, const BandOut& to,
                                                     Buffers& buf) {
  band<Avx512Vec>(s, p, x, w, y, n, oh0, oh1, to, buf);
}
#endif

// Runs the bands of every image: to(n, band) says where band `band` of image n ends (BandOut).
template <typename T, typename To>
void run_bands(const Shape& s, int64_t bands, const T* x, const float* packed, T* y, To&& to) {
  const Packed w = packed_views(s, packed);
  const Plan p = plan(s, (s.OH + bands - 1) / bands);
  const CpuIsa level = cpu_isa();
  at::parallel_for(0, s.N * bands, 1, [&](int64_t begin, int64_t end) {
    Buffers buf;
    buf.ring.assign(p.C * p.Wp * p.Chp, 0.f);  // zeroed once: the padding columns are never written
    buf.zero.assign(p.Wp * p.Chp, 0.f);
    buf.d.assign(p.R * s.OW * p.Chp, 0.f);
    if (!std::is_same_v<T, float>) buf.xrows.assign(p.C * s.W * s.Cin, 0.f);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / bands, b = i % bands;
      const int64_t oh0 = b * s.OH / bands, oh1 = (b + 1) * s.OH / bands;
      const BandOut out = to(n, b);
#if EFFOPS_HAVE_X86
      if (level >= CpuIsa::kAvx512) {
        band_avx512<T>(s, p, x, w, y, n, oh0, oh1, out, buf);
        continue;
      }
      if (level >= CpuIsa::kAvx2) {
        band_avx2<T>(s, p, x, w, y, n, oh0, oh1, out, buf);
        continue;
      }
#endif
      band_scalar<T>(s, p, x, w, y, n, oh0, oh1, out, buf);
    }
  });
}

// Bands per image: one when the batch alone keeps every thread busy (no halo rows expanded twice);
// otherwise enough bands for the threads, each re-expanding the KH - SH rows of halo above it.
int64_t bands_per_image(const Shape& s) {
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(s.OH, (threads + s.N - 1) / std::max<int64_t>(1, s.N)));
}

}  // namespace

bool keep_d(const Shape& s) { return !s.expand || s.OH * s.OW * padded(s.Ch) * 4 <= kKeepDBytesPerImage; }

int64_t kept_d_size(const Shape& s) { return s.N * s.OH * s.OW * padded(s.Ch); }

template <typename T>
void forward(const Shape& s, const T* x, const float* packed, T* y, const float* scale, const float* d_kept) {
  const int64_t Chp = padded(s.Ch);
  run_bands(s, bands_per_image(s), x, packed, y, [&](int64_t n, int64_t) {
    BandOut to;
    to.scale = scale != nullptr ? scale + n * Chp : nullptr;
    to.d_load = d_kept;
    return to;
  });
}

template <typename T>
void depthwise_means(const Shape& s, const T* x, const float* packed, float* means, float* d_kept) {
  const int64_t Chp = padded(s.Ch), bands = bands_per_image(s);
  std::vector<float> sums(s.N * bands * Chp, 0.f);  // one row per band: no two threads add into one
  run_bands(s, bands, x, packed, static_cast<T*>(nullptr), [&](int64_t n, int64_t b) {
    BandOut to;
    to.sums = sums.data() + (n * bands + b) * Chp;
    to.d_store = d_kept;
    return to;
  });
  const float inv = 1.f / static_cast<float>(s.OH * s.OW);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < s.Ch; ++c) {
      float total = 0.f;
      for (int64_t b = 0; b < bands; ++b) total += sums[(n * bands + b) * Chp + c];
      means[n * s.Ch + c] = total * inv;
    }
}

template void forward<float>(const Shape&, const float*, const float*, float*, const float*, const float*);
template void forward<c10::BFloat16>(const Shape&, const c10::BFloat16*, const float*, c10::BFloat16*, const float*,
                                     const float*);
template void forward<c10::Half>(const Shape&, const c10::Half*, const float*, c10::Half*, const float*,
                                 const float*);
template void depthwise_means<float>(const Shape&, const float*, const float*, float*, float*);
template void depthwise_means<c10::BFloat16>(const Shape&, const c10::BFloat16*, const float*, float*, float*);
template void depthwise_means<c10::Half>(const Shape&, const c10::Half*, const float*, float*, float*);

const char* inverted_residual_body() {
  if (cpu_isa_at_least(CpuIsa::kAvx512))
    return "avx512 (fp32 FMA, 512-bit, 8 x 48 micro-kernel, depthwise 7 pixels at a time; fused backward with "
           "the same micro-kernels, chunked backward's depthwise in 16-channel blocks)";
  if (cpu_isa_at_least(CpuIsa::kAvx2))
    return "avx2 (fp32 FMA, 256-bit, 6 x 16 micro-kernel, depthwise 7 pixels at a time; fused backward with "
           "the same micro-kernels, chunked backward's depthwise in 8-channel blocks)";
  return "scalar";
}

}  // namespace effops::cpu::ir
