// Microbenchmark of the int8 GEMM inner step on AVX2 (docs/int8.md, round 4: "Exact 8-bit without
// vpsignb"): 6 rows x 2 vectors of accumulators, data in L1, thread CPU time, best of 7 interleaved
// rounds; prints ns per (row, 8 columns, 4 k) step and the speed relative to the vpsignb kernel.
// Variants: 0 the s8u step (sign, maddubs, maddwd, add: the exact 8-bit kernel), 1 the 7-bit step (no
// sign), 2 int16 vpmaddwd (2 x (madd, add) per 4 k), 5 xor/sub with a per-B sign mask, 6 half the rows
// vpsignb / half xor-sub, 7 negate + vpblendvb. Not built by setup.py; run:
//   g++ -O3 -mavx2 -mfma benchmarks/int8_step_microbench.cpp -o /tmp/int8_step && /tmp/int8_step
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <algorithm>
// 12 independent accumulators (6 rows x 2 vectors), b operands loaded from a small L1 buffer.
alignas(64) int8_t B[64 * 64];
alignas(64) int8_t A[6 * 256];
template <int V>
__attribute__((noinline)) __m256i run(long iters) {
  __m256i c[12];
  for (int i = 0; i < 12; ++i) c[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (long it = 0; it < iters; ++it) {
    const int g = it & 63;
    const __m256i b0 = _mm256_load_si256((const __m256i*)(B + g * 64)), b1 = _mm256_load_si256((const __m256i*)(B + g * 64 + 32));
    if constexpr (V == 0) {  // s8u: |b| shared, sign per row
      const __m256i u0 = _mm256_abs_epi8(b0), u1 = _mm256_abs_epi8(b1);
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(a, b0)), ones));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(a, b1)), ones));
      }
    } else if constexpr (V == 1) {  // 7-bit: no sign
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b0), ones));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b1), ones));
      }
    } else if constexpr (V == 2) {  // s16: 8 cols x 2 k per madd; 32 MACs = 2 madds per (row, 8 cols)
      const __m256i b2 = _mm256_load_si256((const __m256i*)(B + ((g + 1) & 63) * 64)), b3 = _mm256_load_si256((const __m256i*)(B + ((g + 1) & 63) * 64 + 32));
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a0 = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        const __m256i a1 = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4 + 128));
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_madd_epi16(a0, b0));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_madd_epi16(a0, b1));
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_madd_epi16(a1, b2));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_madd_epi16(a1, b3));
      }
    } else if constexpr (V == 3) {  // only sign + add (which pipes does sign take?)
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_sign_epi8(a, b0));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_sign_epi8(a, b1));
      }
    } else if constexpr (V == 4) {  // maddubs + maddwd only + sign (no add): pipe pressure
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        c[2*r] = _mm256_madd_epi16(_mm256_maddubs_epi16(c[2*r], _mm256_sign_epi8(a, b0)), ones);
        c[2*r+1] = _mm256_madd_epi16(_mm256_maddubs_epi16(c[2*r+1], _mm256_sign_epi8(a, b1)), ones);
      }
    } else if constexpr (V == 5 || V == 6 || V == 7) {
      const __m256i u0 = _mm256_abs_epi8(b0), u1 = _mm256_abs_epi8(b1);
      const __m256i z = _mm256_setzero_si256();
      const __m256i m0 = _mm256_cmpgt_epi8(z, b0), m1 = _mm256_cmpgt_epi8(z, b1);
#pragma GCC unroll 6
      for (int r = 0; r < 6; ++r) {
        const __m256i a = _mm256_set1_epi32(*(const int32_t*)(A + r * 256 + (g & 63) * 4));
        __m256i t0, t1;
        if (V == 5 || (V == 6 && r >= 3)) {
          t0 = _mm256_sub_epi8(_mm256_xor_si256(a, m0), m0);
          t1 = _mm256_sub_epi8(_mm256_xor_si256(a, m1), m1);
        } else if (V == 7) {
          const __m256i na = _mm256_sub_epi8(z, a);
          t0 = _mm256_blendv_epi8(a, na, m0);
          t1 = _mm256_blendv_epi8(a, na, m1);
        } else {
          t0 = _mm256_sign_epi8(a, b0);
          t1 = _mm256_sign_epi8(a, b1);
        }
        c[2*r] = _mm256_add_epi32(c[2*r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, t0), ones));
        c[2*r+1] = _mm256_add_epi32(c[2*r+1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, t1), ones));
      }
    }
  }
  __m256i s = c[0];
  for (int i = 1; i < 12; ++i) s = _mm256_xor_si256(s, c[i]);
  return s;
}
#include <time.h>
static double tnow() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec * 1e9 + ts.tv_nsec; }
template <int V> double once() {
  long iters = 4000000;
  double t0 = tnow();
  volatile __m256i s = run<V>(iters);
  (void)s;
  return (tnow() - t0) / iters / 12;
}
int main() {
  for (int i = 0; i < 64 * 64; ++i) B[i] = (i * 37) % 127 - 63;
  for (int i = 0; i < 6 * 256; ++i) A[i] = (i * 11) % 255 - 127;
  double b[8] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
  for (int r = 0; r < 7; ++r) {
    b[0] = std::min(b[0], once<0>()); b[1] = std::min(b[1], once<1>()); b[2] = std::min(b[2], once<2>());
    b[5] = std::min(b[5], once<5>()); b[6] = std::min(b[6], once<6>()); b[7] = std::min(b[7], once<7>());
  }
  const char* names[8] = {"s8u sign", "7-bit", "s16", "", "", "xor/sub", "half sign half xor/sub", "neg+blendv"};
  for (int v : {0, 1, 2, 5, 6, 7}) printf("%-24s %.3f ns/step  rel to s8u %.3f\n", names[v], b[v], b[0] / b[v]);
}
