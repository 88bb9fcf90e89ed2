// Row-wise symmetric int8 quantization: one pass for the absmax, one for the rounded values, per row,
// one template body per instruction-set level.
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
#include "cpu/simd_codes.h"

#define EFFOPS_ALWAYS_INLINE inline __attribute__((always_inline))

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

// One row at one level (Vec: ScalarVec, Avx2Vec, Avx512Vec): absmax and the NaN/inf probe, then
// q = clamp(round_half_even(x / scale)) (a true division, as the reference), stored as int8, or with
// flip as the unsigned q + 128 (= q ^ 0x80).
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void quantize_row(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  constexpr int W = Vec::kWidth;
  Vec vmax = Vec::zero(), vprobe = Vec::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const Vec v = Vec::load(x + k);
    vmax = Vec::max(vmax, vabs(v));
    vprobe = Vec::fma(v, Vec::zero(), vprobe);
  }
  float absmax = hmax(vmax), probe = vprobe.reduce_add();
  for (; k < K; ++k) {
    const float v = to_float(x[k]);
    absmax = std::max(absmax, std::fabs(v));
    probe += v * 0.0f;
  }
  if (std::isnan(probe)) return non_finite_row(K, q, scale, flip);
  const float s = row_scale(absmax);
  const Vec vs = Vec::broadcast(s), lo = Vec::broadcast(-127.0f), neg_hi = Vec::broadcast(-127.0f);
  for (k = 0; k + W <= K; k += W) {
    const Vec r = vround(Vec::load(x + k) / vs);
    const Vec c = Vec::zero() - Vec::max(Vec::zero() - Vec::max(r, lo), neg_hi);  // clamp to [-127, 127]
    if (flip)
      store_codes(c + Vec::broadcast(128.0f), reinterpret_cast<uint8_t*>(q + k));
    else
      store_codes(c, q + k);
  }
  for (; k < K; ++k) q[k] = static_cast<int8_t>(quantize_one(to_float(x[k]), s) ^ flip);
  *scale = s;
}

template <typename T>
void quantize_row_scalar(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  quantize_row<ScalarVec>(x, K, q, scale, flip);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void quantize_row_avx2(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  quantize_row<Avx2Vec>(x, K, q, scale, flip);
}
template <typename T>
EFFOPS_AVX512_TARGET void quantize_row_avx512(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip) {
  quantize_row<Avx512Vec>(x, K, q, scale, flip);
}
#endif

}  // namespace

template <typename T>
void quantize_rowwise(const T* x, int64_t M, int64_t K, int8_t* q, float* scale, bool offset128) {
  const CpuIsa level = cpu_isa();
  const uint8_t flip = offset128 ? 0x80 : 0;  // q ^ 0x80 == q + 128 as an unsigned byte
  // Threads only for big inputs (>= 2 Mi elements per chunk, ~1 ms of work): Int8Linear runs this
  // right before the GEMM's own parallel region, and each fork-join costs a scheduler time slice when
  // the cores are busy (measured: 13.9 ms for M = 256 x K = 4096 with two threads on a loaded machine,
  // 0.5 ms on one thread), more than the quantization itself.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
#if EFFOPS_HAVE_X86
      if (level >= CpuIsa::kAvx512) {
        quantize_row_avx512(x + i * K, K, q + i * K, scale + i, flip);
        continue;
      }
      if (level >= CpuIsa::kAvx2) {
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
