// Row-wise symmetric int8 quantization: one pass for the absmax, one for the rounded values, per row,
// one template body per instruction-set level.
// Bit-identical to reference/int8.py: fp32 scale = absmax / 127 (IEEE division, not a reciprocal),
// q = x / scale rounded half to even (vroundps / nearbyint in the default rounding mode), clamped.
// A row holding NaN or inf: q = 0 and scale NaN (max drops NaN, so a probe sums x * 0, which is NaN
// exactly when some x is NaN or inf).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

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

#if EFFOPS_HAVE_X86
// The AVX-512 body's quantizing pass over the row's first K / 64 * 64 values (returns that count): 64
// codes a step, converted with round-to-nearest-even (embedded in the conversion, the same as vround),
// packed with saturating packs and one permute into a single 64-byte store instead of a vpmovsdb /
// vpmovusdb store per 16 codes (store_codes): quantize_rowwise 5-8% faster alone (one thread, M = 64 and
// 400, K = 768 and 3072). (A reciprocal with an FMA correction step in place of the division gained
// nothing measurable beside it; with the prefetch below it was ~10% faster, but one correction step is
// not provably the correctly rounded quotient, and a second one, or a check for quotients near a
// half-integer, cost more than the division.)
// next: the following row of x, or nullptr. This pass runs from L1 (the absmax pass just read the
// row), so it fetches the next row into L1 meanwhile, one line per line quantized: that row's absmax
// pass then reads L1 instead of waiting on L3 or memory, where 3/4 of this function's samples were.
// quantize_rowwise alone, one thread, M = 400, K = 3072: 92.8 -> 80.0 us (in-process A/B, medians of
// 9 rounds); with the integer absmax below, 68-77 us against 97-113 us before (alternating processes).
// The codes are in [-127, 127] (|x| <= absmax, so |x / scale| rounds to at most 127); the max keeps
// -128 out anyway, as the generic clamp does.
template <typename T>
EFFOPS_AVX512_TARGET int64_t quantize_64s_avx512(const T* x, int64_t K, Avx512Vec vs, int8_t* q, uint8_t flip,
                                                 const T* next) {
  // packs work per 128-bit lane: after them, dword 4 L + j holds vector j's lane L; put it at 4 j + L.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i lo = _mm512_set1_epi8(-127), flip_bytes = _mm512_set1_epi8(static_cast<char>(flip));
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (next)
      for (int j = 0; j < static_cast<int>(64 * sizeof(T)); j += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + k) + j, _MM_HINT_T0);
    __m512i i[4];
    for (int j = 0; j < 4; ++j) {
      const __m512 xv = Avx512Vec::load(x + k + 16 * j).v;
      const __m512 y = _mm512_div_ps(xv, vs.v);
      i[j] = _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i words = _mm512_packs_epi32(i[0], i[1]), words2 = _mm512_packs_epi32(i[2], i[3]);
    __m512i bytes = _mm512_max_epi8(_mm512_packs_epi16(words, words2), lo);
    bytes = _mm512_xor_si512(_mm512_permutexvar_epi32(order, bytes), flip_bytes);
    _mm512_storeu_si512(q + k, bytes);
  }
  return k;
}

// The AVX-512 body's absmax pass over the row's first K / 64 * 64 values (returns that count): the
// largest |x| as its bit pattern (*bits). For floats of one sign the integer order of the bit patterns
// is their order, and a pattern >= 0x7f800000 is an inf or a NaN, so one integer max per vector both
// finds the absmax and probes for non-finite values (where the generic pass needs a float max and an
// FMA probe).
template <typename T>
EFFOPS_AVX512_TARGET int64_t absmax_64s_avx512(const T* x, int64_t K, uint32_t* bits) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i m[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    for (int j = 0; j < 4; ++j)
      m[j] = _mm512_max_epu32(m[j], _mm512_and_si512(_mm512_castps_si512(Avx512Vec::load(x + k + 16 * j).v), magnitude));
  *bits = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(m[0], m[1]), _mm512_max_epu32(m[2], m[3])));
  return k;
}
#endif

// One row at one level (Vec: ScalarVec, Avx2Vec, Avx512Vec): absmax and the NaN/inf probe, then
// q = clamp(round_half_even(x / scale)) (a true division, as the reference), stored as int8, or with
// flip as the unsigned q + 128 (= q ^ 0x80).
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void quantize_row(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip,
                                       const T* next = nullptr) {
  constexpr int W = Vec::kWidth;
  // Four chains of each: one max / FMA chain is bound by its latency (4 cycles a vector for the FMA).
  // quantize_rowwise alone, one thread, K = 3072: M = 64 24.3 -> 18.5 us, M = 400 144 -> 130 us.
  Vec vmax[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  Vec vprobe[4] = {Vec::zero(), Vec::zero(), Vec::zero(), Vec::zero()};
  int64_t k = 0;
  uint32_t bits = 0;  // the AVX-512 pass's absmax, as a bit pattern
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<Vec, Avx512Vec>)
    k = absmax_64s_avx512(x, K, &bits);
#endif
  for (; k + 4 * W <= K; k += 4 * W)
    for (int j = 0; j < 4; ++j) {
      const Vec v = Vec::load(x + k + j * W);
      vmax[j] = Vec::max(vmax[j], vabs(v));
      vprobe[j] = Vec::fma(v, Vec::zero(), vprobe[j]);
    }
  for (; k + W <= K; k += W) {
    const Vec v = Vec::load(x + k);
    vmax[0] = Vec::max(vmax[0], vabs(v));
    vprobe[0] = Vec::fma(v, Vec::zero(), vprobe[0]);
  }
  float absmax = hmax(Vec::max(Vec::max(vmax[0], vmax[1]), Vec::max(vmax[2], vmax[3])));
  float probe = ((vprobe[0] + vprobe[1]) + (vprobe[2] + vprobe[3])).reduce_add();
  for (; k < K; ++k) {
    const float v = to_float(x[k]);
    absmax = std::max(absmax, std::fabs(v));
    probe += v * 0.0f;
  }
  if (std::isnan(probe) || bits >= 0x7f800000u) return non_finite_row(K, q, scale, flip);
  float bits_max;
  std::memcpy(&bits_max, &bits, 4);
  absmax = std::max(absmax, bits_max);
  const float s = row_scale(absmax);
  const Vec vs = Vec::broadcast(s), lo = Vec::broadcast(-127.0f), hi = Vec::broadcast(127.0f);
  k = 0;
#if EFFOPS_HAVE_X86
  if constexpr (std::is_same_v<Vec, Avx512Vec>) k = quantize_64s_avx512(x, K, vs, q, flip, next);
#endif
  for (; k + W <= K; k += W) {
    const Vec r = vround(Vec::load(x + k) / vs);
    const Vec c = Vec::min(Vec::max(r, lo), hi);
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
EFFOPS_AVX512_TARGET void quantize_row_avx512(const T* x, int64_t K, int8_t* q, float* scale, uint8_t flip,
                                              const T* next) {
  quantize_row<Avx512Vec>(x, K, q, scale, flip, next);
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
        quantize_row_avx512(x + i * K, K, q + i * K, scale + i, flip, i + 1 < i1 ? x + (i + 1) * K : nullptr);
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
