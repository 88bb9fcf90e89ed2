// The register-tiled micro-kernel shared by the block-sparse products (masked_linear_block.cpp):
//   tile[i][0..16) += sum_{k < kc} a(i, k) * b(k, 0..16)     for i < MR
// with a(i, k) = a[i * a_is + k * a_ks] (a scalar, broadcast) and b(k, :) = b[k * b_ks + 0..16)
// (16 contiguous values, two AVX2 vectors). The accumulators live in registers for the whole k loop;
// tile (fp32, row stride 16) carries them between calls (one call per kept block).
// Instantiated with Avx2Vec inside EFFOPS_AVX2_TARGET functions and with ScalarVec elsewhere.
#pragma once

#include "cpu/cpu_features.h"
#include "cpu/simd.h"

#include <cstdint>

#define EFFOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace effops::cpu {

template <class Vec, int MR, typename TA, typename TB>
EFFOPS_ALWAYS_INLINE void micro(const TA* a, int64_t a_is, int64_t a_ks, const TB* b, int64_t b_ks, int64_t kc,
                                float* tile) {
  constexpr int NV = 16 / Vec::kWidth;
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::load(tile + i * 16 + v * Vec::kWidth);
  for (int64_t k = 0; k < kc; ++k) {
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Vec::load(b + k * b_ks + v * Vec::kWidth);
    for (int i = 0; i < MR; ++i) {
      const Vec ai = Vec::broadcast(to_float(a[i * a_is + k * a_ks]));
      for (int v = 0; v < NV; ++v) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(tile + i * 16 + v * Vec::kWidth);
}

// The forward/grad_x tile over all kept blocks of one block-row, accumulators kept in registers
// across blocks. a is a packed 6-row tile of the dense operand, column-major in groups of 6:
// a(i, c) = a[c * 6 + i] (so the 6 broadcasts of one k come from one cache line);
// b(k, :) = panel[(j * b + k) * 16 + 0..16) for the j-th kept block, whose columns start at kept[j] * b.
template <class Vec>
EFFOPS_ALWAYS_INLINE void micro_blocks(const float* a, const int64_t* kept, int64_t nkept, int64_t b, int64_t C,
                                       const float* panel, float* tile) {
  constexpr int MR = 6, NV = 16 / Vec::kWidth;
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = Vec::load(tile + i * 16 + v * Vec::kWidth);
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    const int64_t kc = C - c0 < b ? C - c0 : b;
    const float* aj = a + c0 * MR;
    const float* pj = panel + j * b * 16;
    for (int64_t k = 0; k < kc; ++k) {
      Vec bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = Vec::load(pj + k * 16 + v * Vec::kWidth);
      for (int i = 0; i < MR; ++i) {
        const Vec ai = Vec::broadcast(aj[k * MR + i]);
        for (int v = 0; v < NV; ++v) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v].store(tile + i * 16 + v * Vec::kWidth);
}

}  // namespace effops::cpu
