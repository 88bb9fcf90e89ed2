// Stochastic rounding of fp32 lanes to bf16 with random bits from a counter-based generator, the
// same bits on every backend (effops/reference/stochastic_round.py defines them):
//   bits(i) = mix(i ^ seed) & 0xffff,  mix(x): x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15;
//                                                x *= 0x1b873593; x ^= x >> 16      (32-bit wrap-around)
//   bf16(x) = (fp32_bits(x) + bits(i)) >> 16
// i is the element's index in its tensor, seed a 32-bit value per tensor and step. Adding 16 random
// bits below the kept ones carries into them with probability (discarded bits) / 2^16: x is rounded
// away from zero with that probability, toward zero otherwise, so the rounding is unbiased. NaN stays
// a quiet NaN; the largest finite values may round to infinity, as they may round up to it.
// Overloads per vector type of simd.h, as simd_codes.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

namespace effops::cpu {

constexpr uint32_t kMix1 = 0x7feb352du;
constexpr uint32_t kMix2 = 0x1b873593u;  // both below 2^31: the reference multiplies in int64 without overflow

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  x ^= x >> 16;
  return x;
}

inline void store_bf16_stochastic(ScalarVec v, c10::BFloat16* p, uint32_t seed, int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &v.v, 4);
  if (v.v != v.v) {  // NaN
    p->x = 0x7fc0;
    return;
  }
  p->x = static_cast<uint16_t>((bits + (mix32(static_cast<uint32_t>(index) ^ seed) & 0xffffu)) >> 16);
}

#if EFFOPS_HAVE_X86
EFFOPS_AVX2_TARGET inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix1)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix2)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

EFFOPS_AVX2_TARGET inline void store_bf16_stochastic(Avx2Vec v, c10::BFloat16* p, uint32_t seed, int64_t index) {
  const __m256i lanes = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(index))),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i noise = _mm256_and_si256(mix32(_mm256_xor_si256(lanes, _mm256_set1_epi32(static_cast<int>(seed)))),
                                         _mm256_set1_epi32(0xffff));
  __m256i bits = _mm256_add_epi32(_mm256_castps_si256(v.v), noise);
  const __m256 is_nan = _mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q);
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(is_nan));
  const __m256i hi = _mm256_srli_epi32(bits, 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#endif

}  // namespace effops::cpu
