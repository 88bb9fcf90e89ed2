// Row-wise symmetric int8 quantization: one pass for the absmax, one for the rounded values, per row.
// Bit-identical to reference/int8.py: fp32 scale = absmax / 127 (IEEE division, not a reciprocal),
// q = x / scale rounded half to even (vroundps / nearbyint in the default rounding mode), clamped.
// A row holding NaN or inf: q = 0 and scale NaN (max drops NaN, so a probe sums x * 0, which is NaN
// exactly when some x is NaN or inf).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"
#include "cpu/simd.h"

namespace effops::cpu {
namespace {

inline float row_scale(float absmax) {
  const float s = absmax / 127.0f;
  return s > 0.0f ? s : 1.0f;  // a zero row (or an absmax so small that s underflows) gets scale 1
}

inline int8_t quantize_one(float v, float scale) {
  const float r = std::nearbyint(v / scale);
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
}

// The row's result when it holds NaN or inf.
inline void non_finite_row(int64_t K, int8_t* q, float* scale, uint8_t flip) {
  std::fill(q, q + K, static_cast<int8_t>(flip));
  *scale = std::nanf("");
}

template <typename T>
void quantize_row_scalar(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  float absmax = 0.0f, probe = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = to_float(x[k]);
    absmax = std::max(absmax, std::fabs(v));
    probe += v * 0.0f;
  }
  if (std::isnan(probe)) return non_finite_row(K, q, scale, flip);
  const float s = row_scale(absmax);
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(quantize_one(to_float(x[k]), s) ^ flip);
  *scale = s;
}

#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void quantize_row_avx2(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps(), vprobe = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = Avx2Vec::load(x + k).v;
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
    vprobe = _mm256_fmadd_ps(v, zero, vprobe);
  }
  alignas(32) float lanes[8], probes[8];
  _mm256_store_ps(lanes, vmax);
  _mm256_store_ps(probes, vprobe);
  float absmax = *std::max_element(lanes, lanes + 8), probe = 0.0f;
  for (float p : probes) probe += p;
  for (; k < K; ++k) {
    const float v = to_float(x[k]);
    absmax = std::max(absmax, std::fabs(v));
    probe += v * 0.0f;
  }
  if (std::isnan(probe)) return non_finite_row(K, q, scale, flip);
  const float s = row_scale(absmax);
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m128i vflip = _mm_set1_epi8(static_cast<char>(flip));
  for (k = 0; k + 8 <= K; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(Avx2Vec::load(x + k).v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
    const __m256i i32 = _mm256_cvtps_epi32(v);  // already integral and within int8
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_xor_si128(_mm_packs_epi16(i16, i16), vflip));
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(quantize_one(to_float(x[k]), s) ^ flip);
  *scale = s;
}
#endif

}  // namespace

template <typename T>
void quantize_rowwise(const T* x, int64_t M, int64_t K, int8_t* q, float* scale, bool offset128) {
  const bool avx2 = has_avx2_fma();
  const uint8_t flip = offset128 ? 0x80 : 0;  // q ^ 0x80 == q + 128 as an unsigned byte
  // Threads only for big inputs (>= 2 Mi elements per chunk, ~1 ms of work): Int8Linear runs this
  // right before the GEMM's own parallel region, and each fork-join costs a scheduler time slice when
  // the cores are busy (measured: 13.9 ms for M = 256 x K = 4096 with two threads on a loaded machine,
  // 0.5 ms on one thread), more than the quantization itself.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
#if EFFOPS_HAVE_X86
      if (avx2) {
        quantize_row_avx2(x + i * K, K, q + i * K, scale + i, flip);
        continue;
      }
#endif
      quantize_row_scalar(x + i * K, K, q + i * K, scale + i, flip);
    }
  });
}

template void quantize_rowwise<float>(const float*, int64_t, int64_t, int8_t*, float*, bool);
template void quantize_rowwise<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int8_t*, float*, bool);
template void quantize_rowwise<c10::Half>(const c10::Half*, int64_t, int64_t, int8_t*, float*, bool);

}  // namespace effops::cpu
