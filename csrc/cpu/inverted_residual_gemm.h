// The register-blocked GEMM of the fused inverted-residual kernels (the forward in inverted_residual.cpp,
// the fused backward in inverted_residual_backward.cpp): C = A @ B + bias with B packed in panels of 16
// columns, each MR x (NP x 16) block of results handed to an epilogue. Included by those two files only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu_features.h"
#include "cpu/dwpw_kernels.h"
#include "cpu/inverted_residual.h"
#include "cpu/simd.h"

namespace effops::cpu::ir {

// Register blocking per level. AVX2 (16 ymm): 6 pixels x 1 panel = 12 accumulators + 2 B + 1
// broadcast. AVX-512 (32 zmm): 8 pixels x 3 panels = 24 accumulators + 3 B + 1 broadcast; 8 rows
// cover the 7-pixel rows of the last stages in one call.
template <class V> struct Blocking { static constexpr int MR = 6, NP = 1; };
#if EFFOPS_HAVE_X86
template <> struct Blocking<Avx512Vec> { static constexpr int MR = 8, NP = 3; };
#endif

// acc[r][..] += a[r * a_rs + k] * b's panels at k, r < MR: one k step of micro.
template <class V, int MR, int NP>
EFFOPS_INLINE void micro_k(V (&acc)[MR][NP * (kPanel / V::kWidth)], const float* a, int64_t a_rs, const float* b,
                           int64_t b_ps, int64_t k) {
  constexpr int NV = kPanel / V::kWidth;
  V bv[NP * NV];
  for (int q = 0; q < NP; ++q)
    for (int v = 0; v < NV; ++v) bv[q * NV + v] = V::load(b + q * b_ps + k * kPanel + v * V::kWidth);
  for (int r = 0; r < MR; ++r) {
    const V ar = V::broadcast(a[r * a_rs + k]);
    for (int v = 0; v < NP * NV; ++v) acc[r][v] = V::fma(ar, bv[v], acc[r][v]);
  }
}

// out[r][0..NP*16) = bias[0..NP*16) + sum_{k < K} a[r * a_rs + k] * b[q * b_ps + k * 16 + 0..16)
// (q: the panel of the column), r < MR; out's row stride is NP * 16.
template <class V, int MR, int NP>
EFFOPS_INLINE void micro(const float* a, int64_t a_rs, const float* b, int64_t b_ps, int64_t K, const float* bias,
                         float* out) {
  constexpr int NV = kPanel / V::kWidth;
  // The last rows of a GEMM (MR of 1 to 3) have too few accumulators to cover the FMA latency: S sets of
  // them, each over every S-th k, summed at the end.
  constexpr int S = MR * NP * NV >= 8 ? 1 : (8 + MR * NP * NV - 1) / (MR * NP * NV);
  // The bias in its own registers, copied to every row: copying row 0 into the others instead made GCC
  // keep row 0 on the stack through the K loop (AVX2 6 x 16: a store and a reload per FMA pair).
  V bias_v[NP * NV], acc[S][MR][NP * NV];
  for (int q = 0; q < NP; ++q)
    for (int v = 0; v < NV; ++v) bias_v[q * NV + v] = V::load(bias + q * kPanel + v * V::kWidth);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NP * NV; ++v) {
      acc[0][r][v] = bias_v[v];
      for (int u = 1; u < S; ++u) acc[u][r][v] = V::zero();
    }
  int64_t k = 0;
  for (; k + S <= K; k += S)
    for (int u = 0; u < S; ++u) micro_k<V, MR, NP>(acc[u], a, a_rs, b, b_ps, k + u);
  for (; k < K; ++k) micro_k<V, MR, NP>(acc[0], a, a_rs, b, b_ps, k);
  for (int u = 1; u < S; ++u)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NP * NV; ++v) acc[0][r][v] = acc[0][r][v] + acc[u][r][v];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NP * NV; ++v) acc[0][r][v].store(out + r * NP * kPanel + v * V::kWidth);
}

// The micro-kernel as its own function per level (noinline): inlined into the large band function the
// compiler keeps that function's values in vector registers and spills accumulators (dwpw_kernels.h
// measured 2x slower so); alone it gets every register.
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_FLATTEN void micro_scalar(const float* a, int64_t a_rs, const float* b, int64_t b_ps,
                                                           int64_t K, const float* bias, float* out) {
  micro<ScalarVec, MR, NP>(a, a_rs, b, b_ps, K, bias, out);
}
#if EFFOPS_HAVE_X86
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void micro_avx2(const float* a, int64_t a_rs,
                                                                            const float* b, int64_t b_ps, int64_t K,
                                                                            const float* bias, float* out) {
  micro<Avx2Vec, MR, NP>(a, a_rs, b, b_ps, K, bias, out);
}
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void micro_avx512(const float* a, int64_t a_rs,
                                                                                const float* b, int64_t b_ps,
                                                                                int64_t K, const float* bias,
                                                                                float* out) {
  micro<Avx512Vec, MR, NP>(a, a_rs, b, b_ps, K, bias, out);
}
#endif

// micro<V, rows, NP> for 1 <= rows <= R (the last rows of a GEMM), by recursion down from R.
template <class V, int NP, int R = Blocking<V>::MR>
EFFOPS_INLINE void micro_rows(int rows, const float* a, int64_t a_rs, const float* b, int64_t b_ps, int64_t K,
                              const float* bias, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return micro_rows<V, NP, R - 1>(rows, a, a_rs, b, b_ps, K, bias, out);
  }
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<V, Avx512Vec>) return micro_avx512<R, NP>(a, a_rs, b, b_ps, K, bias, out);
  if constexpr (std::is_same_v<V, Avx2Vec>) return micro_avx2<R, NP>(a, a_rs, b, b_ps, K, bias, out);
#endif
  micro_scalar<R, NP>(a, a_rs, b, b_ps, K, bias, out);
}

// C = A @ B + bias for A[M][K] (row stride a_rs, fp32) and B packed as [panels][K][16], handing each
// block of results to epi(m0, rows, c0, width, out): rows x width values (width = np * 16 columns from
// c0), out's row stride = width. Panels outer, pixels inner: one panel group (K x 48 floats) stays in
// L1/L2 while the pixels stream past it.
template <class V, typename Epi>
EFFOPS_INLINE void gemm(int64_t M, int64_t K, const float* a, int64_t a_rs, const float* panels, int64_t npanels,
                        const float* bias, Epi&& epi) {
  constexpr int MR = Blocking<V>::MR, NP = Blocking<V>::NP;
  alignas(64) float out[MR * NP * kPanel];
  for (int64_t p0 = 0; p0 < npanels; p0 += NP) {
    const int np = static_cast<int>(std::min<int64_t>(NP, npanels - p0));
    const float* b = panels + p0 * K * kPanel;
    const float* bb = bias + p0 * kPanel;
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - m0));
      const float* am = a + m0 * a_rs;
      if constexpr (NP >= 3) {
        if (np == 3) micro_rows<V, 3>(rows, am, a_rs, b, K * kPanel, K, bb, out);
      }
      if constexpr (NP >= 2) {
        if (np == 2) micro_rows<V, 2>(rows, am, a_rs, b, K * kPanel, K, bb, out);
      }
      if (np == 1) micro_rows<V, 1>(rows, am, a_rs, b, K * kPanel, K, bb, out);
      epi(m0, rows, p0 * kPanel, np * kPanel, out);
    }
  }
}

// The weight gradients' GEMM, C += A^T @ B summed over pixels: C[m][n] += sum_p a[p * a_ps + m] *
// b[p * b_ps + n], A and B rows of pixels (channels contiguous), C[M][N] in memory (row stride c_rs), its
// MR x (NP x 16) block in registers for the whole pixel loop. B and C are as wide as a whole number of
// panels (zero columns past the real ones).
template <class V, int MR, int NP>
EFFOPS_INLINE void wgrad_micro(const float* a, int64_t a_ps, const float* b, int64_t b_ps, int64_t P, float* c,
                               int64_t c_rs) {
  constexpr int NV = NP * kPanel / V::kWidth;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::load(c + r * c_rs + v * V::kWidth);
  for (int64_t p = 0; p < P; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + p * b_ps + v * V::kWidth);
    for (int r = 0; r < MR; ++r) {
      const V ar = V::broadcast(a[p * a_ps + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * c_rs + v * V::kWidth);
}

// wgrad_micro as its own function per level (noinline, as micro above).
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_FLATTEN void wgrad_scalar(const float* a, int64_t a_ps, const float* b,
                                                           int64_t b_ps, int64_t P, float* c, int64_t c_rs) {
  wgrad_micro<ScalarVec, MR, NP>(a, a_ps, b, b_ps, P, c, c_rs);
}
#if EFFOPS_HAVE_X86
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_AVX2_TARGET EFFOPS_FLATTEN void wgrad_avx2(const float* a, int64_t a_ps,
                                                                            const float* b, int64_t b_ps, int64_t P,
                                                                            float* c, int64_t c_rs) {
  wgrad_micro<Avx2Vec, MR, NP>(a, a_ps, b, b_ps, P, c, c_rs);
}
template <int MR, int NP>
__attribute__((noinline)) EFFOPS_AVX512_TARGET EFFOPS_FLATTEN void wgrad_avx512(const float* a, int64_t a_ps,
                                                                                const float* b, int64_t b_ps,
                                                                                int64_t P, float* c, int64_t c_rs) {
  wgrad_micro<Avx512Vec, MR, NP>(a, a_ps, b, b_ps, P, c, c_rs);
}
#endif

// wgrad_micro<V, rows, NP> for 1 <= rows <= R (the last rows of C), by recursion down from R.
template <class V, int NP, int R = Blocking<V>::MR>
EFFOPS_INLINE void wgrad_rows(int rows, const float* a, int64_t a_ps, const float* b, int64_t b_ps, int64_t P,
                              float* c, int64_t c_rs) {
  if constexpr (R > 1) {
    if (rows < R) return wgrad_rows<V, NP, R - 1>(rows, a, a_ps, b, b_ps, P, c, c_rs);
  }
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<V, Avx512Vec>) return wgrad_avx512<R, NP>(a, a_ps, b, b_ps, P, c, c_rs);
  if constexpr (std::is_same_v<V, Avx2Vec>) return wgrad_avx2<R, NP>(a, a_ps, b, b_ps, P, c, c_rs);
#endif
  wgrad_scalar<R, NP>(a, a_ps, b, b_ps, P, c, c_rs);
}

// C[M][npanels * 16] += A^T @ B over P pixels (see wgrad_micro), C's row stride npanels * 16.
template <class V>
EFFOPS_INLINE void wgrad(int64_t M, int64_t npanels, int64_t P, const float* a, int64_t a_ps, const float* b,
                         int64_t b_ps, float* c) {
  constexpr int MR = Blocking<V>::MR, NP = Blocking<V>::NP;
  const int64_t c_rs = npanels * kPanel;
  for (int64_t p0 = 0; p0 < npanels; p0 += NP) {
    const int np = static_cast<int>(std::min<int64_t>(NP, npanels - p0));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - m0));
      const float* am = a + m0;
      const float* bp = b + p0 * kPanel;
      float* cm = c + m0 * c_rs + p0 * kPanel;
      if constexpr (NP >= 3) {
        if (np == 3) wgrad_rows<V, 3>(rows, am, a_ps, bp, b_ps, P, cm, c_rs);
      }
      if constexpr (NP >= 2) {
        if (np == 2) wgrad_rows<V, 2>(rows, am, a_ps, bp, b_ps, P, cm, c_rs);
      }
      if (np == 1) wgrad_rows<V, 1>(rows, am, a_ps, bp, b_ps, P, cm, c_rs);
    }
  }
}

// An epilogue's block (rows x width fp32 values from column c0, row stride width) into rows m0.. of a
// channels-last tensor of C channels per pixel, in its storage type T, adding res at the same places when
// given (a residual): the forward's project output and the backward's g_x.
template <class V, typename T>
EFFOPS_INLINE void store_rows(int64_t m0, int rows, int64_t c0, int64_t width, const float* out, int64_t C,
                              const T* res, T* dst) {
  const int64_t full = std::min(width, (C - c0) / V::kWidth * V::kWidth);
  for (int i = 0; i < rows; ++i) {
    const int64_t q = (m0 + i) * C + c0;
    const float* oi = out + i * width;
    int64_t j = 0;
    for (; j < full; j += V::kWidth) {
      V v = V::load(oi + j);
      if (res) v = v + V::load(res + q + j);
      v.store(dst + q + j);
    }
    for (; j < width && c0 + j < C; ++j) dst[q + j] = from_float<T>(oi[j] + (res ? to_float(res[q + j]) : 0.f));
  }
}

// f(std::integral_constant<int, act>{}): the activation a compile-time constant inside f, so act_forward
// folds its switch away in f's loops.
template <typename F>
EFFOPS_INLINE void with_act(int act, F&& f) {
  switch (act) {
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kRelu6: return f(std::integral_constant<int, kRelu6>{});
    case kGelu: return f(std::integral_constant<int, kGelu>{});
    case kSilu: return f(std::integral_constant<int, kSilu>{});
    case kHardswish: return f(std::integral_constant<int, kHardswish>{});
    default: return f(std::integral_constant<int, kNone>{});
  }
}

}  // namespace effops::cpu::ir
