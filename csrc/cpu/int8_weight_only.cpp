// Weight-only int8 linear: out = x @ (B * col_scale)^T + bias with float x and the s8-packed int8 B.
// For small batches the GEMM is bound by reading the weights, so reading 1 byte per weight instead of
// 4 is the gain; the column scale is applied once per output (it factors out of the k sum).
//
// Loop nest: threads split the 16-column panels; per panel, per row, 8 accumulators each hold
// (2 columns x 4 k) fp32 partial sums: one 8-byte load of the packed panel is exactly that block, so
// no transpose is needed, and x's 4 values are broadcast to both 128-bit halves.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"
#include "cpu/simd.h"

namespace effops::cpu {
namespace {

// sums[16] = x_row (zero padded to kpad) . B_panel columns
void panel_dot_scalar(const float* x, int64_t kpad, const int8_t* b, float* sums) {
  for (int j = 0; j < kInt8NR; ++j) sums[j] = 0.0f;
  for (int64_t g = 0; g < kpad / kInt8KG; ++g)
    for (int j = 0; j < kInt8NR; ++j)
      for (int t = 0; t < kInt8KG; ++t) sums[j] += x[g * kInt8KG + t] * b[(g * kInt8NR + j) * kInt8KG + t];
}

#if EFFOPS_HAVE_X86
EFFOPS_AVX2_TARGET void panel_dot_avx2(const float* x, int64_t kpad, const int8_t* b, float* sums) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < kpad / kInt8KG; ++g) {
    const __m256 x4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(x + g * kInt8KG));
    const int8_t* bg = b + g * kInt8NR * kInt8KG;
    // The weights stream from memory once (the whole cost at small M): fetch 1 KiB ahead of the
    // hardware prefetcher, which alone left the M = 1 dynamic GEMM at ~11 of ~20 GB/s.
    _mm_prefetch(reinterpret_cast<const char*>(bg + 1024), _MM_HINT_T0);
    for (int j = 0; j < 8; ++j) {
      const __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bg + 8 * j));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)), x4, acc[j]);
    }
  }
  alignas(32) float lanes[8];
  for (int j = 0; j < 8; ++j) {
    _mm256_store_ps(lanes, acc[j]);  // lanes 0-3: column 2j, lanes 4-7: column 2j+1
    sums[2 * j] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    sums[2 * j + 1] = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7]);
  }
}
#endif

}  // namespace

template <typename T>
void int8_weight_only_linear(const T* x, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                             const float* col_scale, const float* bias, T* out) {
  const bool avx2 = has_avx2_fma();
  const int64_t kpad = ceil_to(K, kInt8KG);
  // x in fp32 with rows padded to a whole group, so the inner loop needs no tail.
  std::vector<float> xf(static_cast<size_t>(M * kpad), 0.0f);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) xf[i * kpad + k] = to_float(x[i * K + k]);
  const int64_t panels = (N + kInt8NR - 1) / kInt8NR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    float sums[kInt8NR];
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* b = b_packed + p * kpad * kInt8NR;
      const int nc = static_cast<int>(std::min<int64_t>(kInt8NR, N - p * kInt8NR));
      for (int64_t i = 0; i < M; ++i) {
#if EFFOPS_HAVE_X86
        if (avx2) panel_dot_avx2(xf.data() + i * kpad, kpad, b, sums);
        else
#endif
          panel_dot_scalar(xf.data() + i * kpad, kpad, b, sums);
        for (int j = 0; j < nc; ++j) {
          const int64_t n = p * kInt8NR + j;
          float v = sums[j] * col_scale[n];
          if (bias) v += bias[n];
          out[i * N + n] = from_float<T>(v);
        }
      }
    }
  });
}

template void int8_weight_only_linear<float>(const float*, int64_t, int64_t, const int8_t*, int64_t, const float*,
                                             const float*, float*);
template void int8_weight_only_linear<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, const int8_t*, int64_t,
                                                     const float*, const float*, c10::BFloat16*);
template void int8_weight_only_linear<c10::Half>(const c10::Half*, int64_t, int64_t, const int8_t*, int64_t,
                                                 const float*, const float*, c10::Half*);

}  // namespace effops::cpu
