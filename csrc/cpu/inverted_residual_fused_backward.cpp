// The fused backward of an inverted-residual block (see inverted_residual_fused_backward.h for the steps).
//
// Parallel over images: each task owns whole images, so no input row's gradient comes from two tasks and
// no halo is recomputed; the weight gradients are summed per task and then over tasks in the order of
// their first image (the same sums for the same thread count). The GEMMs are the forward's micro-kernels
// (inverted_residual_gemm.h); every loop body is a template over the vector type V, instantiated once per
// instruction-set level inside a function compiled for that level.
#include "cpu/inverted_residual_fused_backward.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/dwpw_kernels.h"  // act_forward, act_derivative: the activations of dwpw_conv2d, same codes
#include "cpu/inverted_residual_gemm.h"
#include "cpu/simd.h"

namespace effops::cpu::ir {
namespace {

using dwpw::act_derivative;
using dwpw::act_forward;

constexpr int64_t kMaxTaps = 64;  // 8 x 8: the binding sends larger kernels to the chunked backward

// The weights as the steps read them (BackwardWeights' arrays, no copies), and their padded widths.
struct Packs {
  int64_t Chp, Cinp, Coutp, taps;
  const float* expand_w;   // [Chp / 16][Cin][16]   e = act(x @ expand_w^T + expand_b)
  const float* expand_b;   // [Chp]
  const float* expand_t;   // [Cinp / 16][Ch][16]   g_x = g_pre_e @ expand_w
  const float* dw_w;       // [taps][Chp]           tap-major: channels contiguous for vectors
  const float* dw_b;       // [Chp]
  const float* project_t;  // [Chp / 16][Cout][16]  g_d = g_y @ project_w
  std::vector<float> zeros;  // the GEMMs without a bias
};

Packs views(const Shape& s, const BackwardWeights& w) {
  const Packed f = packed_views(s, w.packed);
  Packs p;
  p.Chp = padded(s.Ch), p.Cinp = padded(s.Cin), p.Coutp = padded(s.Cout), p.taps = s.KH * s.KW;
  p.expand_w = f.expand_w, p.expand_b = f.expand_b, p.expand_t = w.expand_t;
  p.dw_w = f.dw_w, p.dw_b = f.dw_b, p.project_t = w.project_t;
  p.zeros.assign(std::max(p.Chp, p.Cinp), 0.f);
  return p;
}

// One task's sums of the weight gradients (fp32, padded widths).
struct Sums {
  std::vector<float> expand_w;   // [Cin][Chp]
  std::vector<float> expand_b;   // [Chp]
  std::vector<float> dw_w;       // [taps][Chp]
  std::vector<float> dw_b;       // [Chp]
  std::vector<float> project_w;  // [Chp][Coutp]
  std::vector<float> project_b;  // [Coutp]
};

// Steps of R output rows; a ring of C input rows, each Wp pixels wide (left padding, the row, zeros far
// enough right for the last tap).
struct Plan {
  int64_t R, C, Wp;
};

// R: ~64 output pixels per step (each GEMM call streams its weight panels once), fewer where the step's
// buffers (three rings and the step's rows) would pass ~1 MB (L2).
Plan plan(const Shape& s, const Packs& w) {
  Plan p{};
  p.Wp = std::max(s.PW + s.W, (s.OW - 1) * s.SW + s.KW);
  p.R = std::max<int64_t>(1, std::min<int64_t>(s.OH, (64 + s.OW - 1) / s.OW));
  const auto floats = [&](int64_t R) {
    const int64_t C = (R - 1) * s.SH + s.KH;
    return 3 * C * p.Wp * w.Chp + C * s.W * (w.Chp + s.Cin) + R * s.OW * (3 * w.Chp + w.Coutp);
  };
  while (p.R > 1 && floats(p.R) * 4 > (1 << 20)) --p.R;
  p.C = (p.R - 1) * s.SH + s.KH;
  return p;
}

struct Buffers {
  std::vector<float> e, de, ge;    // rings [C][Wp][Chp]: e, act'(pre_e), g_e (input row ih in slot ih % C)
  std::vector<float> zero, trash;  // [Wp][Chp]: taps above or below the image read zeros and write trash
  std::vector<float> d, dd, gd;    // [R * OW][Chp]: the step's d, act'(pre_d), g_pre_d
  std::vector<float> gy;           // [R * OW][Coutp]: the step's g_y in fp32
  std::vector<float> xrows;        // [C * W][Cin]: x rows in fp32 (16-bit x)
  std::vector<float> gpe;          // [C * W][Chp]: g_pre_e of complete input rows
};

// Depthwise of one output row (its tap rows e[kh]): d and act'(pre_d) of its pixels at d and dd.
// K: the kernel size when square and 3 or 5 (the taps unroll; their weights stay in registers), else 0.
// Four pixels at a time: four independent FMA chains (one pixel's KH x KW FMAs are a chain whose latency
// the loop otherwise waits on).
template <class V, int K>
EFFOPS_INLINE void depthwise_row(const Shape& s, const Packs& w, const float* const* e, float* d, float* dd) {
  constexpr int P = 4;
  const int64_t KH = K ? K : s.KH, KW = K ? K : s.KW, Chp = w.Chp, step = s.SW * Chp;
  for (int64_t c = 0; c < Chp; c += V::kWidth) {
    V wt[kMaxTaps];
    for (int64_t t = 0; t < KH * KW; ++t) wt[t] = V::load(w.dw_w + t * Chp + c);
    const V bias = V::load(w.dw_b + c);
    const auto finish = [&](int64_t ow, V pre) {
      act_forward(pre, s.act).store(d + ow * Chp + c);
      act_derivative(pre, s.act).store(dd + ow * Chp + c);
    };
    int64_t ow = 0;
    for (; ow + P <= s.OW; ow += P) {
      V pre[P];
      for (int p = 0; p < P; ++p) pre[p] = bias;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const float* er = e[kh] + ow * step + c;
        for (int64_t kw = 0; kw < KW; ++kw)
          for (int p = 0; p < P; ++p) pre[p] = V::fma(V::load(er + p * step + kw * Chp), wt[kh * KW + kw], pre[p]);
      }
      for (int p = 0; p < P; ++p) finish(ow + p, pre[p]);
    }
    for (; ow < s.OW; ++ow) {
      V pre = bias;
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
          pre = V::fma(V::load(e[kh] + ow * step + kw * Chp + c), wt[kh * KW + kw], pre);
      finish(ow, pre);
    }
  }
}

// Depthwise backward of one output row from g_pre_d (gd, the row's pixels): the weight and bias gradient
// sums (in registers along the row), and g_e += g_pre_d * w into the tap rows ge[kh]. A pixel's
// contributions to g_e gather in registers (a window of KW columns per tap row, sliding by the stride);
// a column goes to memory once no later pixel of the row reaches it, one read-modify-write per column
// and tap row where adding each tap into memory made every pixel wait on the previous one's stores.
// S: the stride when K is not 0 and the stride is 1 or 2 (the window's shifts unroll), else 0.
template <class V, int K, int S>
EFFOPS_INLINE void depthwise_backward_row(const Shape& s, const Packs& w, const float* gd, const float* const* e,
                                          float* const* ge, Sums& sum) {
  const int64_t KH = K ? K : s.KH, KW = K ? K : s.KW, SW = S ? S : s.SW, Chp = w.Chp;
  for (int64_t c = 0; c < Chp; c += V::kWidth) {
    V wt[kMaxTaps], sw[kMaxTaps], win[kMaxTaps];  // win[kh * KW + j]: column ow * SW + j of tap row kh
    for (int64_t t = 0; t < KH * KW; ++t) {
      wt[t] = V::load(w.dw_w + t * Chp + c), sw[t] = V::load(sum.dw_w.data() + t * Chp + c);
      win[t] = V::zero();
    }
    V sb = V::load(sum.dw_b.data() + c);
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const V g = V::load(gd + ow * Chp + c);
      sb = sb + g;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const float* er = e[kh] + ow * SW * Chp + c;
        float* gr = ge[kh] + ow * SW * Chp + c;
        V* wk = win + kh * KW;
        for (int64_t kw = 0; kw < KW; ++kw) {
          sw[kh * KW + kw] = V::fma(g, V::load(er + kw * Chp), sw[kh * KW + kw]);
          wk[kw] = V::fma(g, wt[kh * KW + kw], wk[kw]);
        }
        // Columns ow * SW + [0, SW) are complete (the next pixel starts at (ow + 1) * SW): out of the window.
        for (int64_t j = 0; j < std::min(SW, KW); ++j) (V::load(gr + j * Chp) + wk[j]).store(gr + j * Chp);
        for (int64_t j = 0; j < KW; ++j) wk[j] = j + SW < KW ? wk[j + SW] : V::zero();
      }
    }
    // The last pixel's window past its stride: columns (OW - 1) * SW + [SW, KW).
    for (int64_t kh = 0; kh < KH; ++kh) {
      float* gr = ge[kh] + (s.OW * SW) * Chp + c;
      for (int64_t j = 0; j + SW < KW; ++j) (V::load(gr + j * Chp) + win[kh * KW + j]).store(gr + j * Chp);
    }
    for (int64_t t = 0; t < KH * KW; ++t) sw[t].store(sum.dw_w.data() + t * Chp + c);
    sb.store(sum.dw_b.data() + c);
  }
}

// f(k) with k a std::integral_constant: the kernel size when it is square and 3 or 5, else 0.
template <class F>
EFFOPS_INLINE void with_kernel_size(const Shape& s, F&& f) {
  if (s.KH == 3 && s.KW == 3) return f(std::integral_constant<int, 3>{});
  if (s.KH == 5 && s.KW == 5) return f(std::integral_constant<int, 5>{});
  f(std::integral_constant<int, 0>{});
}

// One output row's depthwise: with gd == nullptr the forward (d and act'(pre_d) into d and dd), else the
// backward from g_pre_d = gd (the sums into sum, g_e into the tap rows ge). The kernel size and stride
// become compile-time constants here; the activation stays a switch per vector (one body per activation
// too doubled this file's compile time, and the switch measured no slower).
template <class V>
EFFOPS_INLINE void depthwise_any(const Shape& s, const Packs& w, const float* const* e, float* const* ge,
                                 const float* gd, float* d, float* dd, Sums* sum) {
  with_kernel_size(s, [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (gd == nullptr) return depthwise_row<V, K>(s, w, e, d, dd);
    if (K != 0 && s.SW == 1) return depthwise_backward_row<V, K, K ? 1 : 0>(s, w, gd, e, ge, *sum);
    if (K != 0 && s.SW == 2) return depthwise_backward_row<V, K, K ? 2 : 0>(s, w, gd, e, ge, *sum);
    depthwise_backward_row<V, K, 0>(s, w, gd, e, ge, *sum);
  });
}

// sum[c] += the sum over P rows of a[p * Chp + c], c < Chp.
template <class V>
EFFOPS_INLINE void add_rows(int64_t P, int64_t Chp, const float* a, float* sum) {
  for (int64_t c = 0; c < Chp; c += V::kWidth) {
    V acc = V::load(sum + c);
    for (int64_t p = 0; p < P; ++p) acc = acc + V::load(a + p * Chp + c);
    acc.store(sum + c);
  }
}

// The whole backward of image n (the steps in the header); se: a squeeze-excitation block's terms or
// nullptr. With se_sums (the squeeze-excitation's first pass, [2][Chp] of this image): steps 1-2 and step
// 3's GEMM only, adding d into se_sums[c] and d * (g_y @ project_w) into se_sums[Chp + c].
template <class V, typename T>
EFFOPS_INLINE void image(const Shape& s, const Plan& p, const Packs& w, const T* x, const T* g_y, T* g_x, int64_t n,
                         const SeTerms* se, float* se_sums, Buffers& b, Sums& sum) {
  const int64_t Chp = w.Chp, Coutp = w.Coutp, ring_row = p.Wp * Chp;
  const T* xn = x + n * s.H * s.W * s.Cin;
  const T* gyn = g_y + n * s.OH * s.OW * s.Cout;
  T* gxn = g_x + n * s.H * s.W * s.Cin;
  const auto slot = [&](int64_t ih) { return ih % p.C * ring_row; };  // input row ih's ring offset
  // x's rows [a, a + rows) in fp32: x itself when T is float
  const auto x_rows = [&](int64_t a, int64_t rows) -> const float* {
    if constexpr (std::is_same_v<T, float>) {
      return xn + a * s.W * s.Cin;
    } else {
      const T* xr = xn + a * s.W * s.Cin;
      for (int64_t i = 0; i < rows * s.W * s.Cin; ++i) b.xrows[i] = to_float(xr[i]);
      return b.xrows.data();
    }
  };
  int64_t next = 0;  // the first input row not expanded yet (rows below it no step reads were skipped)
  int64_t done = 0;  // the first input row whose g_x is not written yet
  for (int64_t o = 0; o < s.OH; o += p.R) {
    const int64_t r = std::min(p.R, s.OH - o), pixels = r * s.OW;
    // 1. Expand the input rows the step reads that the ring does not hold (without an expand conv: copy
    //    them); their g_e starts at zero.
    const int64_t lo = o * s.SH - s.PH, hi = lo + (r - 1) * s.SH + s.KH - 1;
    const int64_t a0 = std::max<int64_t>({next, lo, 0}), a1 = std::min(hi, s.H - 1);
    if (a0 <= a1) {
      for (int64_t ih = a0; ih <= a1; ++ih) std::fill_n(b.ge.data() + slot(ih), ring_row, 0.f);
      const float* xa = x_rows(a0, a1 - a0 + 1);
      if (!s.expand) {  // e = x (Cin == Ch channels; the padding channels of the ring stay zero)
        for (int64_t ih = a0; ih <= a1; ++ih)
          for (int64_t iw = 0; iw < s.W; ++iw)
            std::copy_n(xa + ((ih - a0) * s.W + iw) * s.Cin, s.Cin, b.e.data() + slot(ih) + (s.PW + iw) * Chp);
      } else {
        with_act(s.act, [&](auto act) {
          gemm<V>((a1 - a0 + 1) * s.W, s.Cin, xa, s.Cin, w.expand_w, Chp / kPanel, w.expand_b,
                  [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
                    int64_t ih = a0 + m0 / s.W, iw = m0 % s.W;
                    for (int i = 0; i < rows_; ++i) {
                      const int64_t at = slot(ih) + (s.PW + iw) * Chp + c0;
                      for (int64_t j = 0; j < width; j += V::kWidth) {
                        const V pre = V::load(out + i * width + j);
                        act_forward(pre, act).store(b.e.data() + at + j);
                        act_derivative(pre, act).store(b.de.data() + at + j);
                      }
                      if (++iw == s.W) iw = 0, ++ih;
                    }
                  });
        });
      }
      next = a1 + 1;
    }
    // Tap rows of output row o + j: the ring's, or the zero row (reads) and the trash row (writes).
    const float* e_rows[8];
    float* ge_rows[8];
    const auto tap_rows = [&](int64_t j) {
      const int64_t ih0 = (o + j) * s.SH - s.PH;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = ih0 + kh;
        const bool in = ih >= 0 && ih < s.H;
        e_rows[kh] = in ? b.e.data() + slot(ih) : b.zero.data();
        ge_rows[kh] = in ? b.ge.data() + slot(ih) : b.trash.data();
      }
    };
    // 2. d and act'(pre_d) of the step's pixels.
    for (int64_t j = 0; j < r; ++j) {
      tap_rows(j);
      depthwise_any<V>(s, w, e_rows, ge_rows, nullptr, b.d.data() + j * s.OW * Chp,
                            b.dd.data() + j * s.OW * Chp, nullptr);
    }
    // 3. The project conv's gradients, and g_pre_d = (g_y @ project_w) * act'(pre_d).
    const T* gys = gyn + o * s.OW * s.Cout;
    for (int64_t q = 0; q < pixels; ++q)
      for (int64_t c = 0; c < s.Cout; ++c) b.gy[q * Coutp + c] = to_float(gys[q * s.Cout + c]);
    if (se_sums != nullptr) {  // the squeeze-excitation's first pass: d's sums and the gate's gradient
      gemm<V>(pixels, s.Cout, b.gy.data(), Coutp, w.project_t, Chp / kPanel, w.zeros.data(),
              [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
                for (int i = 0; i < rows_; ++i)
                  for (int64_t j = 0; j < width; j += V::kWidth) {
                    const V d = V::load(b.d.data() + (m0 + i) * Chp + c0 + j);
                    float *sd = se_sums + c0 + j, *sg = se_sums + Chp + c0 + j;
                    (V::load(sd) + d).store(sd);
                    V::fma(V::load(out + i * width + j), d, V::load(sg)).store(sg);
                  }
              });
      continue;
    }
    // With squeeze-excitation the project conv reads d * g, and d's gradient is g times the project's
    // plus the mean's share.
    const float* gate = se != nullptr ? se->gate + n * Chp : nullptr;
    const float* mean_grad = se != nullptr ? se->mean_grad + n * Chp : nullptr;
    if (gate != nullptr)
      for (int64_t q = 0; q < pixels * Chp; q += Chp)
        for (int64_t c = 0; c < Chp; c += V::kWidth)
          (V::load(b.d.data() + q + c) * V::load(gate + c)).store(b.d.data() + q + c);
    add_rows<V>(pixels, Coutp, b.gy.data(), sum.project_b.data());
    wgrad<V>(s.Ch, Coutp / kPanel, pixels, b.d.data(), Chp, b.gy.data(), Coutp, sum.project_w.data());
    gemm<V>(pixels, s.Cout, b.gy.data(), Coutp, w.project_t, Chp / kPanel, w.zeros.data(),
            [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
              for (int i = 0; i < rows_; ++i) {
                const int64_t at = (m0 + i) * Chp + c0;
                for (int64_t j = 0; j < width; j += V::kWidth) {
                  V g_d = V::load(out + i * width + j);
                  if (gate != nullptr) g_d = V::fma(g_d, V::load(gate + c0 + j), V::load(mean_grad + c0 + j));
                  (g_d * V::load(b.dd.data() + at + j)).store(b.gd.data() + at + j);
                }
              }
            });
    // 4. The depthwise's gradients; g_e of the tap rows.
    for (int64_t j = 0; j < r; ++j) {
      tap_rows(j);
      depthwise_any<V>(s, w, e_rows, ge_rows, b.gd.data() + j * s.OW * Chp, nullptr, nullptr, &sum);
    }
    // 5. Input rows no later step reads (all of them after the last step): g_pre_e, the expand conv's
    //    gradients and g_x (without an expand conv g_x = g_e), at most a ring's rows at a time.
    const int64_t upto = o + r == s.OH ? s.H : std::min(s.H, (o + r) * s.SH - s.PH);
    while (done < upto) {
      const int64_t f1 = std::min(upto, done + p.C), P = (f1 - done) * s.W;
      for (int64_t ih = done; ih < f1; ++ih) {
        float* dst = b.gpe.data() + (ih - done) * s.W * Chp;
        if (ih >= next) {  // never read by a tap (rows a stride or the padding skips): no gradient
          std::fill_n(dst, s.W * Chp, 0.f);
          continue;
        }
        const int64_t at = slot(ih) + s.PW * Chp;
        for (int64_t i = 0; i < s.W * Chp; i += V::kWidth) {
          const V g_e = V::load(b.ge.data() + at + i);
          (s.expand ? g_e * V::load(b.de.data() + at + i) : g_e).store(dst + i);
        }
      }
      T* gxs = gxn + done * s.W * s.Cin;
      const T* res = s.residual ? gyn + done * s.W * s.Cout : nullptr;  // stride 1, Cout == Cin: same pixels
      if (!s.expand) {
        for (int64_t q = 0; q < P; ++q)
          for (int64_t c = 0; c < s.Cin; ++c)
            gxs[q * s.Cin + c] = from_float<T>(b.gpe[q * Chp + c] + (res ? to_float(res[q * s.Cin + c]) : 0.f));
        done = f1;
        continue;
      }
      add_rows<V>(P, Chp, b.gpe.data(), sum.expand_b.data());
      wgrad<V>(s.Cin, Chp / kPanel, P, x_rows(done, f1 - done), s.Cin, b.gpe.data(), Chp, sum.expand_w.data());
      gemm<V>(P, s.Ch, b.gpe.data(), Chp, w.expand_t, w.Cinp / kPanel, w.zeros.data(),
              [&](int64_t m0, int rows_, int64_t c0, int64_t width, const float* out) {
                store_rows<V>(m0, rows_, c0, width, out, s.Cin, res, gxs);
              });
      done = f1;
    }
  }
}

// image's arguments past the plan and weights (one struct: the per-level entries below stay short).
template <typename T>
struct ImageArgs {
  const T *x, *g_y;
  T* g_x;
  const SeTerms* se;
  float* se_sums;  // [N][2][Chp] in the squeeze-excitation's first pass, else nullptr
};

template <typename T>
EFFOPS_FLATTEN void image_scalar(const Shape& s, const Plan& p, const Packs& w, const ImageArgs<T>& a, int64_t n,
                                 float* se_sums, Buffers& b, Sums& sum) {
  image<ScalarVec>(s, p, w, a.x, a.g_y, a.g_x, n, a.se, se_sums, b, sum);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void image_avx2(const Shape& s, const Plan& p, const Packs& w, const ImageArgs<T>& a,
                                                  int64_t n, float* se_sums, Buffers& b, Sums& sum) {
  image<Avx2Vec>(s, p, w, a.x, a.g_y, a.g_x, n, a.se, se_sums, b, sum);
}
template <typename T>
EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void image_avx512(const Shape& s, const Plan& p, const Packs& w,
                                                      const ImageArgs<T>& a, int64_t n, float* se_sums, Buffers& b,
                                                      Sums& sum) {
  image<Avx512Vec>(s, p, w, a.x, a.g_y, a.g_x, n, a.se, se_sums, b, sum);
}
#endif

// image over the batch, images in parallel; parts[begin] gets the sums of the task that starts at image
// begin (nullptr: none kept, the squeeze-excitation's first pass).
template <typename T>
void run_images(const Shape& s, const Plan& p, const Packs& w, const ImageArgs<T>& a, std::vector<Sums>* parts) {
  const int64_t Chp = w.Chp, Coutp = w.Coutp;
  const CpuIsa level = cpu_isa();
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) {
    Sums unused;  // the squeeze-excitation's first pass sums no weight gradient
    Sums& sum = parts != nullptr ? (*parts)[begin] : unused;
    if (parts != nullptr) {
      sum.expand_w.assign(s.Cin * Chp, 0.f), sum.expand_b.assign(Chp, 0.f);
      sum.dw_w.assign(w.taps * Chp, 0.f), sum.dw_b.assign(Chp, 0.f);
      sum.project_w.assign(Chp * Coutp, 0.f), sum.project_b.assign(Coutp, 0.f);
    }
    Buffers b;
    b.e.assign(p.C * p.Wp * Chp, 0.f);  // zeroed once: the padding columns are never written
    b.de.assign(p.C * p.Wp * Chp, 0.f);
    b.ge.assign(p.C * p.Wp * Chp, 0.f);
    b.zero.assign(p.Wp * Chp, 0.f);
    b.trash.assign(p.Wp * Chp, 0.f);
    b.d.assign(p.R * s.OW * Chp, 0.f);
    b.dd.assign(p.R * s.OW * Chp, 0.f);
    b.gd.assign(p.R * s.OW * Chp, 0.f);
    b.gy.assign(p.R * s.OW * Coutp, 0.f);  // the padding channels stay zero
    if (!std::is_same_v<T, float>) b.xrows.assign(p.C * s.W * s.Cin, 0.f);
    b.gpe.assign(p.C * s.W * Chp, 0.f);
    for (int64_t n = begin; n < end; ++n) {
      float* se_sums = a.se_sums != nullptr ? a.se_sums + n * 2 * Chp : nullptr;
#if EFFOPS_HAVE_X86
      if (level >= CpuIsa::kAvx512) {
        image_avx512<T>(s, p, w, a, n, se_sums, b, sum);
        continue;
      }
      if (level >= CpuIsa::kAvx2) {
        image_avx2<T>(s, p, w, a, n, se_sums, b, sum);
        continue;
      }
#endif
      image_scalar<T>(s, p, w, a, n, se_sums, b, sum);
    }
  });
}

}  // namespace

template <typename T>
void fused_backward(const Shape& s, const T* x, const T* g_y, const BackwardWeights& wt, T* g_x, const WeightGrads& g,
                    const SeTerms* se) {
  const Packs w = views(s, wt);
  const Plan p = plan(s, w);
  const int64_t Chp = w.Chp, Coutp = w.Coutp, taps = w.taps;
  std::vector<Sums> parts(std::max<int64_t>(1, s.N));  // parts[begin]: the task that starts at image begin
  run_images(s, p, w, ImageArgs<T>{x, g_y, g_x, se, nullptr}, &parts);
  // The tasks' sums in the order of their first image, into the weights' layouts.
  if (s.expand) std::fill_n(g.expand_w, s.Ch * s.Cin, 0.f), std::fill_n(g.expand_b, s.Ch, 0.f);
  std::fill_n(g.dw_w, s.Ch * taps, 0.f), std::fill_n(g.dw_b, s.Ch, 0.f);
  std::fill_n(g.project_w, s.Cout * s.Ch, 0.f), std::fill_n(g.project_b, s.Cout, 0.f);
  for (const Sums& sum : parts) {
    if (sum.expand_w.empty()) continue;  // no task started at this image
    for (int64_t c = 0; c < s.Ch; ++c) {
      if (s.expand)
        for (int64_t k = 0; k < s.Cin; ++k) g.expand_w[c * s.Cin + k] += sum.expand_w[k * Chp + c];
      for (int64_t t = 0; t < taps; ++t) g.dw_w[c * taps + t] += sum.dw_w[t * Chp + c];
      for (int64_t o = 0; o < s.Cout; ++o) g.project_w[o * s.Ch + c] += sum.project_w[c * Coutp + o];
      if (s.expand) g.expand_b[c] += sum.expand_b[c];
      g.dw_b[c] += sum.dw_b[c];
    }
    for (int64_t o = 0; o < s.Cout; ++o) g.project_b[o] += sum.project_b[o];
  }
}

template <typename T>
void fused_backward_se_sums(const Shape& s, const T* x, const T* g_y, const BackwardWeights& wt, float* means,
                            float* gate_grad) {
  const Packs w = views(s, wt);
  const Plan p = plan(s, w);
  const int64_t Chp = w.Chp;
  std::vector<float> sums(s.N * 2 * Chp, 0.f);  // [N][means, gate_grad][Chp]
  run_images(s, p, w, ImageArgs<T>{x, g_y, nullptr, nullptr, sums.data()}, nullptr);
  const float inv = 1.f / static_cast<float>(s.OH * s.OW);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < Chp; ++c) {
      means[n * Chp + c] = sums[(2 * n) * Chp + c] * inv;
      gate_grad[n * Chp + c] = sums[(2 * n + 1) * Chp + c];
    }
}

#define EFFOPS_INSTANTIATE(T)                                                                                    \
  template void fused_backward<T>(const Shape&, const T*, const T*, const BackwardWeights&, T*, const WeightGrads&, \
                                  const SeTerms*);                                                               \
  template void fused_backward_se_sums<T>(const Shape&, const T*, const T*, const BackwardWeights&, float*, float*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE

}  // namespace effops::cpu::ir
