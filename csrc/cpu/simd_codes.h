// Vector operations the 8-bit optimizer states need beyond simd.h's fp32 vocabulary: 8-bit codes
// to and from fp32 lanes, absolute value, sign transfer, round-to-nearest-even and a horizontal max.
// Overloads per vector type of simd.h (ScalarVec, Avx2Vec, Avx512Vec), so a kernel template over Vec
// calls them by name.
#pragma once

#include <cmath>

#include "cpu/simd.h"

namespace effops::cpu {

// ---- scalar ----
inline ScalarVec load_codes(ScalarVec, const int8_t* p) { return {static_cast<float>(*p)}; }
inline ScalarVec load_codes(ScalarVec, const uint8_t* p) { return {static_cast<float>(*p)}; }
// v holds an integer in the code's range (the caller rounded and bounded it).
inline void store_codes(ScalarVec v, int8_t* p) { *p = static_cast<int8_t>(v.v); }
inline void store_codes(ScalarVec v, uint8_t* p) { *p = static_cast<uint8_t>(v.v); }
inline ScalarVec vabs(ScalarVec a) { return {std::fabs(a.v)}; }
inline ScalarVec vcopysign(ScalarVec magnitude, ScalarVec sign) { return {std::copysign(magnitude.v, sign.v)}; }
inline ScalarVec vround(ScalarVec a) { return {std::nearbyint(a.v)}; }  // default mode: to nearest even
inline float hmax(ScalarVec a) { return a.v; }
// sqrt(a) for a >= 0 where only the nearest code of the result matters (see the AVX2 version).
inline ScalarVec sqrt_for_codes(ScalarVec a) { return {std::sqrt(a.v)}; }

#if EFFOPS_HAVE_X86
// ---- AVX2 ----
EFFOPS_AVX2_TARGET inline Avx2Vec load_codes(Avx2Vec, const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
EFFOPS_AVX2_TARGET inline Avx2Vec load_codes(Avx2Vec, const uint8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
EFFOPS_AVX2_TARGET inline __m128i pack_words(Avx2Vec v) {
  __m256i i = _mm256_cvtps_epi32(v.v);  // exact: v holds integers
  return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}
EFFOPS_AVX2_TARGET inline void store_codes(Avx2Vec v, int8_t* p) {
  __m128i w = pack_words(v);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}
EFFOPS_AVX2_TARGET inline void store_codes(Avx2Vec v, uint8_t* p) {
  __m128i w = pack_words(v);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
EFFOPS_AVX2_TARGET inline Avx2Vec vabs(Avx2Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
EFFOPS_AVX2_TARGET inline Avx2Vec vcopysign(Avx2Vec magnitude, Avx2Vec sign) {
  const __m256 bit = _mm256_set1_ps(-0.f);
  return {_mm256_or_ps(_mm256_andnot_ps(bit, magnitude.v), _mm256_and_ps(bit, sign.v))};
}
EFFOPS_AVX2_TARGET inline Avx2Vec vround(Avx2Vec a) {
  return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// sqrt(a) for a >= 0 from the reciprocal-square-root estimate and one Newton step (relative error
// a few 1e-7): for choosing a code, where a result differs from the exact root's only when it sits
// within that error of a rounding boundary (then by one code), at a fraction of the divider's time.
EFFOPS_AVX2_TARGET inline Avx2Vec sqrt_for_codes(Avx2Vec a) {
  const __m256 x = _mm256_max_ps(a.v, _mm256_set1_ps(1e-30f));  // rsqrt(0) = inf; 1e-30 -> code 0
  __m256 y = _mm256_rsqrt_ps(x);
  // y *= 1.5 - 0.5 * x * y * y
  const __m256 half_x = _mm256_mul_ps(_mm256_set1_ps(0.5f), x);
  y = _mm256_mul_ps(y, _mm256_fnmadd_ps(_mm256_mul_ps(half_x, y), y, _mm256_set1_ps(1.5f)));
  return {_mm256_mul_ps(x, y)};
}
EFFOPS_AVX2_TARGET inline float hmax(Avx2Vec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// ---- AVX-512 ----
EFFOPS_AVX512_TARGET inline Avx512Vec load_codes(Avx512Vec, const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
EFFOPS_AVX512_TARGET inline Avx512Vec load_codes(Avx512Vec, const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// v holds integers in the code's range, so the saturating narrowings are exact.
EFFOPS_AVX512_TARGET inline void store_codes(Avx512Vec v, int8_t* p) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v.v)));
}
EFFOPS_AVX512_TARGET inline void store_codes(Avx512Vec v, uint8_t* p) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(v.v)));
}
EFFOPS_AVX512_TARGET inline Avx512Vec vabs(Avx512Vec a) { return {_mm512_abs_ps(a.v)}; }
EFFOPS_AVX512_TARGET inline Avx512Vec vcopysign(Avx512Vec magnitude, Avx512Vec sign) {
  const __m512i bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  // (magnitude & ~bit) | (sign & bit) in one ternary-logic instruction: 0xCA is the table of bit ? sign : magnitude.
  return {_mm512_castsi512_ps(_mm512_ternarylogic_epi32(bit, _mm512_castps_si512(sign.v),
                                                        _mm512_castps_si512(magnitude.v), 0xCA))};
}
EFFOPS_AVX512_TARGET inline Avx512Vec vround(Avx512Vec a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// As the AVX2 version, from vrsqrt14ps (relative error 2^-14 before the Newton step, not 2^-12).
EFFOPS_AVX512_TARGET inline Avx512Vec sqrt_for_codes(Avx512Vec a) {
  const __m512 x = _mm512_max_ps(a.v, _mm512_set1_ps(1e-30f));
  __m512 y = _mm512_rsqrt14_ps(x);
  const __m512 half_x = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
  y = _mm512_mul_ps(y, _mm512_fnmadd_ps(_mm512_mul_ps(half_x, y), y, _mm512_set1_ps(1.5f)));
  return {_mm512_mul_ps(x, y)};
}
EFFOPS_AVX512_TARGET inline float hmax(Avx512Vec a) { return _mm512_reduce_max_ps(a.v); }
#endif

}  // namespace effops::cpu
