// The SIMD vocabulary every CPU kernel uses: an fp32 vector type with load/store/fma and conversions
// from and to bf16/fp16, in a scalar, an AVX2 (8 lanes) and an AVX-512 (16 lanes) flavour with the
// same names. The lane masks of compares (`Mask`: a bool, an all-ones __m256 lane, a __mmask16 bit) are
// only ever handed to `select`, so the three can differ in type.
//
// Kernels are templates over `Vec` and are instantiated once per level: inside a function marked
// EFFOPS_AVX512_TARGET / EFFOPS_AVX2_TARGET (compiled for that instruction set although the file is
// not), and plainly for the scalar path. cpu_features.h decides at run time which one runs. Never
// compile these files with -march=native.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EFFOPS_HAVE_X86 1
#define EFFOPS_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
// The avx512 level of cpu_features.h (F/BW/DQ/VL), and the two extensions above it.
#define EFFOPS_AVX512_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")))
#define EFFOPS_AVX512_VNNI_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))
#define EFFOPS_AVX512_BF16_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16")))
#else
#define EFFOPS_HAVE_X86 0
#define EFFOPS_AVX2_TARGET
#define EFFOPS_AVX512_TARGET
#define EFFOPS_AVX512_VNNI_TARGET
#define EFFOPS_AVX512_BF16_TARGET
#endif

namespace effops::cpu {

// ---- element conversions (scalar, exact as torch does them: bf16 rounds to nearest even) ----
template <typename T> inline float to_float(T v) { return static_cast<float>(v); }
template <typename T> inline T from_float(float v) { return static_cast<T>(v); }

// A 32-bit word holding two bf16 values (k even in the low half, k odd in the high half, as packed for
// vdpbf16ps) as two fp32 values: bf16 is the top half of an fp32, so the conversion is a shift and a mask.
inline float bf16_pair_even(uint32_t w) {
  const uint32_t bits = w << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float bf16_pair_odd(uint32_t w) {
  const uint32_t bits = w & 0xffff0000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// ---- scalar "vector": width 1, the reference the AVX2 body is checked against ----
struct ScalarVec {
  static constexpr int kWidth = 1;
  float v;
  static ScalarVec zero() { return {0.f}; }
  static ScalarVec broadcast(float x) { return {x}; }
  template <typename T> static ScalarVec load(const T* p) { return {to_float(*p)}; }
  // kWidth words of bf16 pairs (see bf16_pair_even) as their even and odd fp32 values.
  static void load_bf16_pairs(const uint32_t* p, ScalarVec& even, ScalarVec& odd) {
    even.v = bf16_pair_even(*p);
    odd.v = bf16_pair_odd(*p);
  }
  template <typename T> void store(T* p) const { *p = from_float<T>(v); }
  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return {a.v + b.v}; }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return {a.v - b.v}; }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return {a.v * b.v}; }
  friend ScalarVec operator/(ScalarVec a, ScalarVec b) { return {a.v / b.v}; }
  static ScalarVec fma(ScalarVec a, ScalarVec b, ScalarVec c) { return {a.v * b.v + c.v}; }
  static ScalarVec max(ScalarVec a, ScalarVec b) { return {a.v > b.v ? a.v : b.v}; }
  static ScalarVec sqrt(ScalarVec a) { return {__builtin_sqrtf(a.v)}; }
  float reduce_add() const { return v; }
  // For the polynomial approximations (dwpw_kernels.h's exp and erf). min and max return b where
  // either is NaN, as min_ps/max_ps do.
  using Mask = bool;
  static ScalarVec min(ScalarVec a, ScalarVec b) { return {a.v < b.v ? a.v : b.v}; }
  static ScalarVec fnma(ScalarVec a, ScalarVec b, ScalarVec c) { return {c.v - a.v * b.v}; }  // c - a * b
  static ScalarVec round(ScalarVec a) { return {__builtin_rintf(a.v)}; }  // to nearest, ties to even
  static ScalarVec abs(ScalarVec a) { return {__builtin_fabsf(a.v)}; }
  // 2^n for n integral in [-126, 127]: the exponent field written directly.
  static ScalarVec pow2(ScalarVec n) { return from_bits((static_cast<int32_t>(n.v) + 127) << 23); }
  friend ScalarVec operator&(ScalarVec a, ScalarVec b) { return from_bits(a.bits() & b.bits()); }  // of the bit patterns
  friend ScalarVec operator|(ScalarVec a, ScalarVec b) { return from_bits(a.bits() | b.bits()); }
  static Mask greater(ScalarVec a, ScalarVec b) { return a.v > b.v; }  // false where either is NaN
  static Mask is_nan(ScalarVec a) { return a.v != a.v; }
  static ScalarVec select(Mask m, ScalarVec if_true, ScalarVec if_false) { return m ? if_true : if_false; }

 private:
  int32_t bits() const {
    int32_t b;
    std::memcpy(&b, &v, 4);
    return b;
  }
  static ScalarVec from_bits(int32_t b) {
    ScalarVec r;
    std::memcpy(&r.v, &b, 4);
    return r;
  }
};

#if EFFOPS_HAVE_X86
// ---- AVX2: 8 fp32 lanes. Every member is compiled for AVX2+FMA through the target attribute. ----
struct Avx2Vec {
  static constexpr int kWidth = 8;
  __m256 v;
  EFFOPS_AVX2_TARGET static Avx2Vec zero() { return {_mm256_setzero_ps()}; }
  EFFOPS_AVX2_TARGET static Avx2Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec load(const c10::BFloat16* p) {
    // bf16 is the top half of an fp32: widen to 32 bits and shift left.
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  EFFOPS_AVX2_TARGET static Avx2Vec load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  EFFOPS_AVX2_TARGET static void load_bf16_pairs(const uint32_t* p, Avx2Vec& even, Avx2Vec& odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even.v = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd.v = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EFFOPS_AVX2_TARGET void store(float* p) const { _mm256_storeu_ps(p, v); }
  EFFOPS_AVX2_TARGET void store(c10::BFloat16* p) const {
    // Round to nearest even, NaN kept quiet: the same rule as c10::BFloat16's constructor.
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(is_nan));
    __m256i hi = _mm256_srli_epi32(rounded, 16);
    // Pack 8 x 32-bit to 8 x 16-bit (packus works per 128-bit lane, then fix the lane order).
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  EFFOPS_AVX2_TARGET void store(c10::Half* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator+(Avx2Vec a, Avx2Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator-(Avx2Vec a, Avx2Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator*(Avx2Vec a, Avx2Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator/(Avx2Vec a, Avx2Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec fma(Avx2Vec a, Avx2Vec b, Avx2Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec max(Avx2Vec a, Avx2Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec sqrt(Avx2Vec a) { return {_mm256_sqrt_ps(a.v)}; }
  EFFOPS_AVX2_TARGET float reduce_add() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
  using Mask = __m256;  // all-ones lanes where true
  EFFOPS_AVX2_TARGET static Avx2Vec min(Avx2Vec a, Avx2Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec fnma(Avx2Vec a, Avx2Vec b, Avx2Vec c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec round(Avx2Vec a) {
    return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  EFFOPS_AVX2_TARGET static Avx2Vec abs(Avx2Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
  EFFOPS_AVX2_TARGET static Avx2Vec pow2(Avx2Vec n) {
    const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(biased, 23))};
  }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator&(Avx2Vec a, Avx2Vec b) { return {_mm256_and_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET friend Avx2Vec operator|(Avx2Vec a, Avx2Vec b) { return {_mm256_or_ps(a.v, b.v)}; }
  EFFOPS_AVX2_TARGET static Mask greater(Avx2Vec a, Avx2Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
  EFFOPS_AVX2_TARGET static Mask is_nan(Avx2Vec a) { return _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q); }
  EFFOPS_AVX2_TARGET static Avx2Vec select(Mask m, Avx2Vec if_true, Avx2Vec if_false) {
    return {_mm256_blendv_ps(if_false.v, if_true.v, m)};
  }
};

// ---- AVX-512: 16 fp32 lanes, the same members; compiled for the avx512 level. ----
struct Avx512Vec {
  static constexpr int kWidth = 16;
  __m512 v;
  EFFOPS_AVX512_TARGET static Avx512Vec zero() { return {_mm512_setzero_ps()}; }
  EFFOPS_AVX512_TARGET static Avx512Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec load(const c10::BFloat16* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  EFFOPS_AVX512_TARGET static Avx512Vec load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  EFFOPS_AVX512_TARGET static void load_bf16_pairs(const uint32_t* p, Avx512Vec& even, Avx512Vec& odd) {
    const __m512i w = _mm512_loadu_si512(p);
    even.v = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    odd.v = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  EFFOPS_AVX512_TARGET void store(float* p) const { _mm512_storeu_ps(p, v); }
  EFFOPS_AVX512_TARGET void store(c10::BFloat16* p) const {
    // Round to nearest even, NaN kept quiet (as Avx2Vec::store and c10::BFloat16).
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7fc00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  EFFOPS_AVX512_TARGET void store(c10::Half* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator+(Avx512Vec a, Avx512Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator-(Avx512Vec a, Avx512Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator*(Avx512Vec a, Avx512Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator/(Avx512Vec a, Avx512Vec b) { return {_mm512_div_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec fma(Avx512Vec a, Avx512Vec b, Avx512Vec c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  EFFOPS_AVX512_TARGET static Avx512Vec max(Avx512Vec a, Avx512Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec sqrt(Avx512Vec a) { return {_mm512_sqrt_ps(a.v)}; }
  EFFOPS_AVX512_TARGET float reduce_add() const { return _mm512_reduce_add_ps(v); }
  using Mask = __mmask16;  // one bit per lane
  EFFOPS_AVX512_TARGET static Avx512Vec min(Avx512Vec a, Avx512Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec fnma(Avx512Vec a, Avx512Vec b, Avx512Vec c) {
    return {_mm512_fnmadd_ps(a.v, b.v, c.v)};
  }
  EFFOPS_AVX512_TARGET static Avx512Vec round(Avx512Vec a) {
    return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
  }
  EFFOPS_AVX512_TARGET static Avx512Vec abs(Avx512Vec a) { return {_mm512_andnot_ps(_mm512_set1_ps(-0.f), a.v)}; }
  EFFOPS_AVX512_TARGET static Avx512Vec pow2(Avx512Vec n) {
    const __m512i biased = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(biased, 23))};
  }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator&(Avx512Vec a, Avx512Vec b) { return {_mm512_and_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET friend Avx512Vec operator|(Avx512Vec a, Avx512Vec b) { return {_mm512_or_ps(a.v, b.v)}; }
  EFFOPS_AVX512_TARGET static Mask greater(Avx512Vec a, Avx512Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  EFFOPS_AVX512_TARGET static Mask is_nan(Avx512Vec a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
  EFFOPS_AVX512_TARGET static Avx512Vec select(Mask m, Avx512Vec if_true, Avx512Vec if_false) {
    return {_mm512_mask_mov_ps(if_false.v, m, if_true.v)};
  }
};
#endif

}  // namespace effops::cpu
