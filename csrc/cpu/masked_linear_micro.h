// The register-tiled micro-kernel shared by the block-sparse products (masked_linear_block.cpp):
//   tile[i][0..16) += sum_{k < kc} a(i, k) * b(k, 0..16)     for i < MR
// with a(i, k) = a[i * a_is + k * a_ks] (a scalar, broadcast) and b(k, :) = b[k * b_ks + 0..16)
// (16 contiguous values, two AVX2 vectors). The accumulators live in registers for the whole k loop;
// tile (fp32, row stride 16) carries them between calls (one call per kept block).
// Instantiated with Avx512Vec / Avx2Vec inside functions of that level's target and with ScalarVec elsewhere.
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

// Start loading `bytes` from p. The tile kernels below call it for the next kept block's columns of the
// a tile: x's regrouped tiles come from L3 (a chunk of x does not fit L2), in one short run per kept
// block that the hardware prefetcher does not foresee (bf16 block-32 90% at 4096 x 4096, 256 rows:
// 5.5-6.1x torch's bf16 F.linear without it, 6.6-7.0x with it).
EFFOPS_ALWAYS_INLINE void prefetch_run(const void* p, int64_t bytes) {
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(static_cast<const char*>(p) + l);
}

// The forward/grad_x tile over all kept blocks of one block-row, accumulators kept in registers
// across blocks: 6 rows x NP neighbouring panels of 16 output columns (NP = 2 where 32 registers hold
// the 12 accumulators, so each broadcast of a feeds two panels). a is a packed 6-row tile of the dense
// operand, column-major in groups of 6: a(i, c) = a[c * 6 + i] (so the 6 broadcasts of one k come from
// one cache line); panel q's row k of the j-th kept block (columns from kept[j] * b) is
// panel[q * panel_stride + (j * b + k) * 16 + 0..16). tile: [6][NP * 16] floats, carried in and out.
template <class Vec, int NP>
EFFOPS_ALWAYS_INLINE void micro_blocks(const float* a, const int64_t* kept, int64_t nkept, int64_t b, int64_t C,
                                       const float* panel, int64_t panel_stride, float* tile) {
  constexpr int MR = 6, NV = 16 / Vec::kWidth, W = NP * 16;
  Vec acc[MR][NP * NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NP * NV; ++v) acc[i][v] = Vec::load(tile + i * W + v * Vec::kWidth);
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    const int64_t kc = C - c0 < b ? C - c0 : b;
    const float* aj = a + c0 * MR;
    const float* pj = panel + j * b * 16;
    if (j + 1 < nkept) prefetch_run(a + kept[j + 1] * b * MR, b * MR * 4);
    for (int64_t k = 0; k < kc; ++k) {
      Vec bv[NP * NV];
      for (int q = 0; q < NP; ++q)
        for (int v = 0; v < NV; ++v) bv[q * NV + v] = Vec::load(pj + q * panel_stride + k * 16 + v * Vec::kWidth);
      for (int i = 0; i < MR; ++i) {
        const Vec ai = Vec::broadcast(aj[k * MR + i]);
        for (int v = 0; v < NP * NV; ++v) acc[i][v] = Vec::fma(ai, bv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NP * NV; ++v) acc[i][v].store(tile + i * W + v * Vec::kWidth);
}

// micro_blocks with the panels in bf16 pairs (a bf16 weight's packing): panel q's pair r of block j is
// panel[q * panel_stride + (j * b / 2 + r) * 16 + 0..16), 32-bit words holding k = 2r (low half) and
// 2r + 1 (high half); a stays fp32 as in micro_blocks. Each word is split into two fp32 values in
// registers (a shift and a mask per vector, shared by the 6 rows): the same products in the same order
// (k ascending) as converting the weights to fp32 first, so the result is identical to that.
template <class Vec, int NP>
EFFOPS_ALWAYS_INLINE void micro_blocks_pairs(const float* a, const int64_t* kept, int64_t nkept, int64_t b, int64_t C,
                                             const uint32_t* panel, int64_t panel_stride, float* tile) {
  constexpr int MR = 6, NV = 16 / Vec::kWidth, W = NP * 16;
  Vec acc[MR][NP * NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NP * NV; ++v) acc[i][v] = Vec::load(tile + i * W + v * Vec::kWidth);
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    const int64_t kc = C - c0 < b ? C - c0 : b;
    const float* aj = a + c0 * MR;
    const uint32_t* pj = panel + j * (b / 2) * 16;
    if (j + 1 < nkept) prefetch_run(a + kept[j + 1] * b * MR, b * MR * 4);
    for (int64_t r = 0; 2 * r < kc; ++r) {
      Vec even[NP * NV], odd[NP * NV];
      for (int q = 0; q < NP; ++q)
        for (int v = 0; v < NV; ++v)
          Vec::load_bf16_pairs(pj + q * panel_stride + r * 16 + v * Vec::kWidth, even[q * NV + v], odd[q * NV + v]);
      const bool has_odd = 2 * r + 1 < kc;  // a block cut short by C: a has no column past it
      for (int i = 0; i < MR; ++i) {
        const Vec ae = Vec::broadcast(aj[2 * r * MR + i]);
        for (int v = 0; v < NP * NV; ++v) acc[i][v] = Vec::fma(ae, even[v], acc[i][v]);
        if (has_odd) {
          const Vec ao = Vec::broadcast(aj[(2 * r + 1) * MR + i]);
          for (int v = 0; v < NP * NV; ++v) acc[i][v] = Vec::fma(ao, odd[v], acc[i][v]);
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NP * NV; ++v) acc[i][v].store(tile + i * W + v * Vec::kWidth);
}

#if EFFOPS_HAVE_X86
// The bf16 tile with vdpbf16ps (avx512_bf16 level): a in pairs too, a(i, pair r) = a[r * 6 + i] (a block
// cut short by C ends in a pair whose missing half is zero on both sides). One instruction per row,
// pair and panel adds both products to 16 fp32 sums (odd k first, then even, each rounded to fp32;
// bf16 denormals read as zero) where micro_blocks_pairs does two FMAs.
template <int NP>
EFFOPS_AVX512_BF16_TARGET inline void micro_blocks_dpbf16(const uint32_t* a, const int64_t* kept, int64_t nkept,
                                                          int64_t b, int64_t C, const uint32_t* panel,
                                                          int64_t panel_stride, float* tile) {
  constexpr int MR = 6, W = NP * 16;
  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_loadu_ps(tile + i * W + q * 16);
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    const int64_t pairs = ((C - c0 < b ? C - c0 : b) + 1) / 2;
    const uint32_t* aj = a + (c0 / 2) * MR;
    if (j + 1 < nkept) prefetch_run(a + (kept[j + 1] * b / 2) * MR, b * MR * 2);
    const uint32_t* pj = panel + j * (b / 2) * 16;
    for (int64_t r = 0; r < pairs; ++r) {
      __m512bh bv[NP];
      for (int q = 0; q < NP; ++q) bv[q] = (__m512bh)_mm512_loadu_si512(pj + q * panel_stride + r * 16);
      for (int i = 0; i < MR; ++i) {
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(aj[r * MR + i]));
        for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_dpbf16_ps(acc[i][q], av, bv[q]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < NP; ++q) _mm512_storeu_ps(tile + i * W + q * 16, acc[i][q]);
}
#endif

}  // namespace effops::cpu
