// The depthwise middle of the inverted-residual block's training step (see inverted_residual_depthwise.h).
//
// Work is split by channels: a thread owns a range of channels of every image, so its weight and bias
// gradients and its share of g_in are written by no one else (no reduction across threads). The body is
// one template over the vector type V; a block is 16 (AVX-512), 8 (AVX2, and the AVX-512 level's last
// 8 channels) or 1 channel wide.
#include "cpu/inverted_residual_depthwise.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/dwpw_kernels.h"  // act_forward, act_derivative: the activations of dwpw_conv2d, same codes
#include "cpu/inverted_residual.h"
#include "cpu/simd.h"

namespace effops::cpu::ir {
namespace {

using dwpw::act_derivative;
using dwpw::act_forward;

constexpr int64_t kAhead = 4;  // pixels ahead that prefetch() asks for
constexpr int64_t kMaxTaps = 64;  // 8 x 8: the binding sends larger kernels through ATen

// A hint to fetch base[ahead]'s line into L1: a block's pass over a row reads one line of each pixel's
// channels, a stride the hardware prefetchers were measured not to follow (the loads of g_d and pre_e
// waited on memory). The address is computed as an integer: it may lie past the tensor, which a
// prefetch never faults on.
template <typename T>
EFFOPS_INLINE void prefetch(const T* base, int64_t ahead) {
#if EFFOPS_HAVE_X86
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) + ahead * sizeof(T)), _MM_HINT_T0);
#else
  (void)base, (void)ahead;
#endif
}

// Valid taps [k0, k1) of one axis at output coordinate o, whose first tap reads input coordinate start.
EFFOPS_INLINE void valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t K, int64_t in, int64_t& start,
                              int64_t& k0, int64_t& k1) {
  start = o * stride - pad;
  k0 = std::max<int64_t>(0, -start);
  k1 = std::max(k0, std::min<int64_t>(K, in - start));
}

// A run of `count` channel blocks of one width, channels [c, c + count * width).
struct Run {
  int64_t c, count;
  int width;  // 16, 8 or 1
};

// f(k) with k a std::integral_constant: the kernel size when it is square and 3 or 5, else 0.
template <class F>
void with_kernel_size(const DepthwiseShape& s, F&& f) {
  if (s.KH == 3 && s.KW == 3) return f(std::integral_constant<int, 3>{});
  if (s.KH == 5 && s.KW == 5) return f(std::integral_constant<int, 5>{});
  f(std::integral_constant<int, 0>{});
}

// Both bodies go output row by output row and, within a row, channel block by channel block, so that a
// block's weights (and in the backward its weight-gradient sums) stay in registers along the row while
// the row's inputs stay in L1/L2 across the blocks. K: the kernel size when it is square and 3 or 5
// (the taps unroll at compile time and those arrays become registers), 0 for any other.
template <int K>
struct Taps {
  int64_t KH, KW;
  explicit Taps(const DepthwiseShape& s) : KH(K ? K : s.KH), KW(K ? K : s.KW) {}
};

// d = act(depthwise(e) + b) for one run of channel blocks.
template <typename T>
struct Forward {
  const DepthwiseShape& s;
  const T* e;
  const float *w, *b;
  T* d;

  template <class V, int K>
  EFFOPS_INLINE void rows(const Run& r, std::vector<float>&) const {
    constexpr int64_t L = V::kWidth;
    const Taps<K> k(s);
    V wt[kMaxTaps];
    for (int64_t n = 0; n < s.N; ++n) {
      const T* en = e + n * s.H * s.W * s.C;
      T* dn = d + n * s.OH * s.OW * s.C;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        int64_t ih0, kh0, kh1;
        valid_taps(oh, s.SH, s.PH, k.KH, s.H, ih0, kh0, kh1);
        for (int64_t c = r.c; c < r.c + r.count * L; c += L) {
          for (int64_t t = 0; t < k.KH * k.KW; ++t) wt[t] = V::load(w + t * s.C + c);
          const V bias = b != nullptr ? V::load(b + c) : V::zero();
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            int64_t iw0, kw0, kw1;
            valid_taps(ow, s.SW, s.PW, k.KW, s.W, iw0, kw0, kw1);
            V acc = bias;
            for (int64_t kh = 0; kh < k.KH; ++kh) {
              if (kh < kh0 || kh >= kh1) continue;
              const int64_t row = ((ih0 + kh) * s.W + iw0) * s.C + c;  // may start left of the image
              for (int64_t kw = 0; kw < k.KW; ++kw)
                if (kw >= kw0 && kw < kw1) acc = V::fma(V::load(en + (row + kw * s.C)), wt[kh * k.KW + kw], acc);
            }
            prefetch(en, ((ih0 + k.KH - 1) * s.W + iw0 + k.KW - 1 + kAhead * s.SW) * s.C + c);
            act_forward(acc, s.act).store(dn + (oh * s.OW + ow) * s.C + c);
          }
        }
      }
    }
  }
};

// The backward of one run of channel blocks. scratch holds, in fp32: the run's g_e of one image
// ([H][W][width]), then its weight and bias gradients ([KH * KW + 1][width]).
template <typename T>
struct Backward {
  const DepthwiseShape& s;
  const T *g_d, *e, *pre_e;
  const float *w, *b;
  T* g_in;
  float *g_w, *g_b;

  template <class V, int K>
  EFFOPS_INLINE void rows(const Run& r, std::vector<float>& scratch) const {
    constexpr int64_t L = V::kWidth;
    const Taps<K> k(s);
    const int64_t width = r.count * L, taps = k.KH * k.KW;
    scratch.assign((s.H * s.W + taps + 1) * width, 0.f);
    float* ge = scratch.data();          // [H * W][width]
    float* gw = ge + s.H * s.W * width;  // [taps][width]
    float* gb = gw + taps * width;       // [width]
    V wt[kMaxTaps], sw[kMaxTaps];
    for (int64_t n = 0; n < s.N; ++n) {
      if (n > 0) std::fill(ge, ge + s.H * s.W * width, 0.f);
      const T* en = e + n * s.H * s.W * s.C;
      const T* gdn = g_d + n * s.OH * s.OW * s.C;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        int64_t ih0, kh0, kh1;
        valid_taps(oh, s.SH, s.PH, k.KH, s.H, ih0, kh0, kh1);
        for (int64_t j = 0; j < width; j += L) {
          const int64_t c = r.c + j;
          for (int64_t t = 0; t < taps; ++t) wt[t] = V::load(w + t * s.C + c), sw[t] = V::load(gw + t * width + j);
          const V bias = b != nullptr ? V::load(b + c) : V::zero();
          V sb = V::load(gb + j);
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            int64_t iw0, kw0, kw1;
            valid_taps(ow, s.SW, s.PW, k.KW, s.W, iw0, kw0, kw1);
            const int64_t at = (ih0 * s.W + iw0) * s.C + c;  // tap (0, 0)'s input offset, maybe outside
            V pre = bias;  // pre_d, recomputed: only its activation's derivative is needed
            for (int64_t kh = 0; kh < k.KH; ++kh) {
              if (kh < kh0 || kh >= kh1) continue;
              for (int64_t kw = 0; kw < k.KW; ++kw)
                if (kw >= kw0 && kw < kw1) pre = V::fma(V::load(en + (at + (kh * s.W + kw) * s.C)), wt[kh * k.KW + kw], pre);
            }
            prefetch(gdn, (oh * s.OW + ow + kAhead) * s.C + c);
            prefetch(en, at + ((k.KH - 1) * s.W + k.KW - 1 + kAhead * s.SW) * s.C);  // the newest input row's
            const V g = V::load(gdn + (oh * s.OW + ow) * s.C + c) * act_derivative(pre, s.act);
            sb = sb + g;
            const int64_t gat = (ih0 * s.W + iw0) * width + j;
            for (int64_t kh = 0; kh < k.KH; ++kh) {
              if (kh < kh0 || kh >= kh1) continue;
              for (int64_t kw = 0; kw < k.KW; ++kw) {
                if (kw < kw0 || kw >= kw1) continue;
                const int64_t t = kh * k.KW + kw;
                sw[t] = V::fma(g, V::load(en + (at + (kh * s.W + kw) * s.C)), sw[t]);
                float* gp = ge + (gat + (kh * s.W + kw) * width);
                V::fma(g, wt[t], V::load(gp)).store(gp);
              }
            }
          }
          for (int64_t t = 0; t < taps; ++t) sw[t].store(gw + t * width + j);
          sb.store(gb + j);
        }
      }
      T* out = g_in + n * s.H * s.W * s.C;
      const T* pn = pre_e != nullptr ? pre_e + n * s.H * s.W * s.C : nullptr;
      for (int64_t p = 0; p < s.H * s.W; ++p)
        for (int64_t j = 0; j < width; j += L) {
          if (pn != nullptr) prefetch(pn, (p + kAhead) * s.C + r.c + j);
          V v = V::load(ge + p * width + j);
          if (pn != nullptr) v = v * act_derivative(V::load(pn + p * s.C + r.c + j), s.act);
          v.store(out + p * s.C + r.c + j);
        }
    }
    for (int64_t t = 0; t < taps; ++t) std::copy(gw + t * width, gw + (t + 1) * width, g_w + t * s.C + r.c);
    std::copy(gb, gb + width, g_b + r.c);
  }
};

// One run with the vector type of its width, compiled for the level (flatten: `rows` is inlined here;
// one entry per kernel size, so that each stays small enough for flatten to inline whole).
template <class Body, int K>
EFFOPS_FLATTEN void run_scalar(const Body& body, const Run& r, std::vector<float>& scratch) {
  body.template rows<ScalarVec, K>(r, scratch);
}
#if EFFOPS_HAVE_X86
template <class Body, int K>
EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void run_avx2(const Body& body, const Run& r, std::vector<float>& scratch) {
  if (r.width == Avx2Vec::kWidth) return body.template rows<Avx2Vec, K>(r, scratch);
  body.template rows<ScalarVec, K>(r, scratch);
}
template <class Body, int K>
EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void run_avx512(const Body& body, const Run& r, std::vector<float>& scratch) {
  if (r.width == Avx512Vec::kWidth) return body.template rows<Avx512Vec, K>(r, scratch);
  if (r.width == Avx2Vec::kWidth) return body.template rows<Avx2Vec, K>(r, scratch);
  body.template rows<ScalarVec, K>(r, scratch);
}
#endif

int widest_block(CpuIsa level) { return level >= CpuIsa::kAvx512 ? 16 : level >= CpuIsa::kAvx2 ? 8 : 1; }

// Block widths, first channel first: the widest while it fits, then one of 8 where the widest is 16,
// then single channels.
std::vector<int> block_widths(int64_t C, int widest) {
  std::vector<int> widths;
  int64_t c = 0;
  for (; c + widest <= C; c += widest) widths.push_back(widest);
  if (widest == 16 && c + 8 <= C) widths.push_back(8), c += 8;
  for (; c < C; ++c) widths.push_back(1);
  return widths;
}

// Each thread takes a contiguous range of channel blocks (at::parallel_for's split) and runs it as runs
// of equal width: per pixel it reads one contiguous stretch of channels, which the prefetchers follow
// (a task per block, striding through whole images, waited on memory).
template <class Body, int K>
void run_blocks(int64_t C, const Body& body) {
  const CpuIsa level = cpu_isa();
  const std::vector<int> widths = block_widths(C, widest_block(level));
  std::vector<int64_t> first(widths.size() + 1, 0);
  for (size_t i = 0; i < widths.size(); ++i) first[i + 1] = first[i] + widths[i];
  at::parallel_for(0, static_cast<int64_t>(widths.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t i = begin; i < end;) {
      int64_t k = i + 1;
      while (k < end && widths[k] == widths[i]) ++k;
      const Run r{first[i], k - i, widths[i]};
      i = k;
#if EFFOPS_HAVE_X86
      if (level >= CpuIsa::kAvx512) {
        run_avx512<Body, K>(body, r, scratch);
        continue;
      }
      if (level >= CpuIsa::kAvx2) {
        run_avx2<Body, K>(body, r, scratch);
        continue;
      }
#endif
      run_scalar<Body, K>(body, r, scratch);
    }
  });
}

}  // namespace

template <typename T>
void depthwise_act_forward(const DepthwiseShape& s, const T* e, const float* w, const float* b, T* d) {
  with_kernel_size(s, [&](auto k) { run_blocks<Forward<T>, decltype(k)::value>(s.C, Forward<T>{s, e, w, b, d}); });
}

template <typename T>
void depthwise_act_backward(const DepthwiseShape& s, const T* g_d, const T* e, const T* pre_e, const float* w,
                            const float* b, T* g_in, float* g_w, float* g_b) {
  with_kernel_size(s, [&](auto k) {
    run_blocks<Backward<T>, decltype(k)::value>(s.C, Backward<T>{s, g_d, e, pre_e, w, b, g_in, g_w, g_b});
  });
}

#define EFFOPS_INSTANTIATE(T)                                                                                   \
  template void depthwise_act_forward<T>(const DepthwiseShape&, const T*, const float*, const float*, T*);      \
  template void depthwise_act_backward<T>(const DepthwiseShape&, const T*, const T*, const T*, const float*,     \
                                          const float*, T*, float*, float*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE

}  // namespace effops::cpu::ir
