// int8 GEMM bodies on 512-bit vectors: the avx512 level (AVX-512BW: vpmaddubsw + vpmaddwd on zmm) and
// the avx512_vnni level (vpdpbusd). int8_gemm.cpp's entry points call them at those levels; layouts,
// epilogue and the saturation argument are in int8_gemm.h.
//
// B is the same packed s8 layout as the AVX2 body: one 4-k group of a 16-column panel is 64 bytes, one
// zmm. A that arrives already shifted to unsigned (Int8Linear: int8_gemm_u8s8, int8_gemm_u8s7) with K a
// multiple of 4 is read in place, row by row. Otherwise A is repacked per call (O(M K); copied 4 bytes at
// a time, shifted to unsigned on the way for VNNI) in groups of 6 rows (all rows when there are at most
// 8), [M / 6][K / 4][6][4] bytes. Reading in place measured faster (one thread, M = 400, K = 3072,
// N = 768: 2.43 / 2.46 -> 2.11 / 2.30 ms): the copy and its allocation were ~7% of the call, and the
// micro-tile's six row streams (6 x K bytes, in L1/L2 across the panels) run as fast as one packed one.
// A micro-tile is one such row group (MR <= 6 rows) x NP <= 4 panels: 24 accumulators, 4 B vectors and
// one broadcast of A's 4 bytes fit the 32 zmm registers, and per 4-k group it issues 24 multiply-adds
// for 4 + 6 loads.
//
// Arithmetic per level (every path is exact: int32 sums of int8 products):
//  * avx512_vnni: vpdpbusd multiplies unsigned by signed bytes and adds groups of four into int32 with
//    no 16-bit intermediate, so nothing saturates. A is shifted to unsigned (a_u = a + 128, computed
//    once per call) and the sums start at -128 * the column sums of B, so C = sum (a + 128) b - 128 sum b
//    = sum a b for every int8 value of A and B, -128 included. Int8Linear hands in the correction
//    (its weight_corr, built with the packed weight; int8_gemm_u8s8 / u8s7 with col_corr): starting
//    from it measured 1.03-1.09x faster at 1 and 8 rows and 1.00-1.03x at 256-400 than summing per
//    call. Without it (int8_mm, int8_linear) the column sums are computed per tile from the panels the
//    tile is about to read (they are then in L2), so B still streams from memory once; with at most
//    kSmallRows rows they are summed inside the micro-kernel instead, from the B vectors already in
//    registers (one more vpdpbusd per panel and group).
//  * avx512 without VNNI: the AVX2 body's steps on zmm. 8-bit: |b| (unsigned, <= 128) times a * sign(b)
//    (vpsignb has no 512-bit form: a masked subtract from zero where b < 0), pairs <= 2 * 128 * 127 =
//    32512 < 32767, exact when A has no -128 (such A takes the AVX2 body). 7-bit: a_u times b in
//    [-63, 63], pairs <= 2 * 255 * 63.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"
#include "cpu/simd.h"

#define EFFOPS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace effops::cpu {

#if EFFOPS_HAVE_X86
namespace {

constexpr int kMR = 6;  // rows per micro-tile
constexpr int kNP = 4;  // panels per micro-tile
constexpr int64_t kGroupBytes = kInt8NR * kInt8KG;  // one 4-k group of one panel: 64 bytes, one zmm
// Few rows (M <= kSmallRows): A is one row group of M rows and one micro-tile covers them all, against 4
// panels (M <= 4) or 2 (5-8 rows, for the registers), so B streams from memory once and no row
// group re-reads it; on VNNI the column correction is summed in the micro-kernel there.
constexpr int kSmallRows = 8;
constexpr int small_panels(int rows) { return rows <= 4 ? kNP : 2; }
// Rows per packed group of A: kMR, or all of a few-row A.
int64_t group_rows(int64_t M) { return M <= kSmallRows ? std::max<int64_t>(M, 1) : kMR; }

// The loads and stores every step shares.
struct Zmm {
  EFFOPS_AVX512_TARGET static __m512i zero() { return _mm512_setzero_si512(); }
  EFFOPS_AVX512_TARGET static __m512i load(const void* p) { return _mm512_loadu_si512(p); }
  EFFOPS_AVX512_TARGET static __m512i bcast4(const uint8_t* p) {
    int32_t w;
    std::memcpy(&w, p, 4);
    return _mm512_set1_epi32(w);
  }
  EFFOPS_AVX512_TARGET static void store(int32_t* p, __m512i v) { _mm512_storeu_si512(p, v); }
  EFFOPS_AVX512_TARGET static __m512i u8(uint8_t v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  EFFOPS_AVX512_TARGET static __m512i sub(__m512i x, __m512i y) { return _mm512_sub_epi32(x, y); }
  EFFOPS_AVX512_TARGET static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  // fp32, for the fused epilogue
  EFFOPS_AVX512_TARGET static __m512 loadf(const float* p) { return _mm512_loadu_ps(p); }
  EFFOPS_AVX512_TARGET static __m512 zerof() { return _mm512_setzero_ps(); }
  EFFOPS_AVX512_TARGET static __m512 bcastf(float v) { return _mm512_set1_ps(v); }
  EFFOPS_AVX512_TARGET static __m512 cvtf(__m512i v) { return _mm512_cvtepi32_ps(v); }
  EFFOPS_AVX512_TARGET static __m512 mulf(__m512 x, __m512 y) { return _mm512_mul_ps(x, y); }
  EFFOPS_AVX512_TARGET static __m512 addf(__m512 x, __m512 y) { return _mm512_add_ps(x, y); }
};

// ---- steps: acc += the 4-k dot products of one row's broadcast bytes `a` with one prepared B vector ----
struct VnniStep {  // a: a + 128 (unsigned); b: any int8
  using B = __m512i;
  EFFOPS_AVX512_VNNI_TARGET static B prepare(__m512i b) { return b; }
  EFFOPS_AVX512_VNNI_TARGET static __m512i step(__m512i acc, __m512i a, const B& b) {
    return _mm512_dpbusd_epi32(acc, a, b);
  }
};

struct Bw7Step {  // a: a + 128 (unsigned); b in [-63, 63]
  using B = __m512i;
  EFFOPS_AVX512_TARGET static B prepare(__m512i b) { return b; }
  EFFOPS_AVX512_TARGET static __m512i step(__m512i acc, __m512i a, const B& b) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), _mm512_set1_epi16(1)));
  }
};

struct Bw8Step {  // a: int8 without -128; b: any int8
  struct B {
    __m512i abs_b;
    __mmask64 negative;
  };
  EFFOPS_AVX512_TARGET static B prepare(__m512i b) { return {_mm512_abs_epi8(b), _mm512_movepi8_mask(b)}; }
  EFFOPS_AVX512_TARGET static __m512i step(__m512i acc, __m512i a, const B& b) {
    const __m512i a_sign_b = _mm512_mask_sub_epi8(a, b.negative, _mm512_setzero_si512(), a);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(b.abs_b, a_sign_b), _mm512_set1_epi16(1)));
  }
};

// ---- fused epilogue: a micro-tile's sums straight from the registers to the output ----
// Where a micro-tile's panels are all whole (16 columns each), the micro-kernel converts and stores its
// accumulators itself instead of writing them to a scratch tile that epilogue() then reads back per
// panel (a call, a reload and a row-scale broadcast per row and panel): 1-3% faster at M = 1 and 8, no
// change at M = 256 and 400 (one thread, in-process A/B, medians of 11 rounds), where the epilogue's
// time is the output's own stores (a write prefetch of the output lines did not help either). A
// micro-tile with a partial panel (N not a multiple of 16) keeps the scratch tile. Same arithmetic and
// order as epilogue(): (acc * xs) * ws + bias.
struct FusedOut {
  Int8Out kind;
  void* out;               // the micro-tile's first row and column
  int64_t ldo;
  const float* row_scale;  // the micro-tile's first row
  const float* col_scale;  // its first column
  const float* bias;       // its first column, or nullptr
};

template <typename OutT, int MR, int NP>
EFFOPS_ALWAYS_INLINE void fused_store(const __m512i (&acc)[MR][NP], const FusedOut& f) {
  OutT* out = static_cast<OutT*>(f.out);
  if constexpr (std::is_same_v<OutT, int32_t>) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) Zmm::store(out + r * f.ldo + q * kInt8NR, acc[r][q]);
  } else {
    __m512 ws[NP], bias[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      ws[q] = Zmm::loadf(f.col_scale + q * kInt8NR);
      bias[q] = f.bias ? Zmm::loadf(f.bias + q * kInt8NR) : Zmm::zerof();
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xs = Zmm::bcastf(f.row_scale[r]);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) {
        __m512 v = int8_epilogue_rounded(Zmm::mulf(Zmm::mulf(Zmm::cvtf(acc[r][q]), xs), ws[q]));
        if (f.bias) v = Zmm::addf(v, bias[q]);
        Avx512Vec{v}.store(out + r * f.ldo + q * kInt8NR);
      }
    }
  }
}

// ---- micro-kernel: the first MR rows of one row group of A against NP neighbouring panels. Row r's
// bytes of 4-k group g are at a + g * group_stride + r * row_stride: a packed group (row_stride 4) or
// A's own rows (group_stride 4, row_stride lda).
// init: NP x 16 starting sums (the correction), or nullptr for zeros. fused: the output (the fused
// epilogue above), or nullptr: then c gets panel q's row r at c + (q * MR + r) * 16, each panel's rows
// in epilogue()'s layout.
// kInline (VNNI only): the sums start at zero and -128 * the column sums, accumulated here from the
// same B vectors, are added at the end.
template <class Step, int MR, int NP, bool kInline>
EFFOPS_ALWAYS_INLINE void micro(const uint8_t* a, int64_t row_stride, int64_t group_stride, int64_t groups,
                                const int8_t* b, int64_t panel_bytes, const int32_t* init, const FusedOut* fused,
                                int32_t* c) {
  __m512i acc[MR][NP], colsum128[NP];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    const __m512i start = init ? Zmm::load(init + q * kInt8NR) : Zmm::zero();
    colsum128[q] = Zmm::zero();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) acc[r][q] = start;
  }
  for (int64_t g = 0; g < groups; ++g) {
    typename Step::B bq[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int8_t* bp = b + q * panel_bytes + g * kGroupBytes;
      bq[q] = Step::prepare(Zmm::load(bp));
      if constexpr (kInline) colsum128[q] = Step::step(colsum128[q], Zmm::u8(0x80), bq[q]);
      // With few rows the weights stream from memory and their reads are the whole cost: ask early.
      if constexpr (MR <= 2) Zmm::prefetch(bp + 1024);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i av = Zmm::bcast4(a + g * group_stride + r * row_stride);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[r][q] = Step::step(acc[r][q], av, bq[q]);
    }
  }
  if constexpr (kInline)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) acc[r][q] = Zmm::sub(acc[r][q], colsum128[q]);
  if (fused) {
    switch (fused->kind) {
      case Int8Out::kInt32: return fused_store<int32_t, MR, NP>(acc, *fused);
      case Int8Out::kFloat: return fused_store<float, MR, NP>(acc, *fused);
      case Int8Out::kBFloat16: return fused_store<c10::BFloat16, MR, NP>(acc, *fused);
      case Int8Out::kHalf: return fused_store<c10::Half, MR, NP>(acc, *fused);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) Zmm::store(c + (q * MR + r) * kInt8NR, acc[r][q]);
}

// -128 * (column sums of NP panels), 16 per panel: the starting sums of the VNNI path. All panels'
// chains at once, two per panel: a lone chain is bound by vpdpbusd's latency, not its throughput.
template <int NP>
EFFOPS_AVX512_VNNI_TARGET void column_correction_np(const int8_t* b, int64_t panel_bytes, int64_t groups,
                                                    int32_t* corr) {
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i s0[NP], s1[NP];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) s0[q] = s1[q] = _mm512_setzero_si512();
  int64_t g = 0;
  for (; g + 1 < groups; g += 2)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int8_t* bp = b + q * panel_bytes + g * kGroupBytes;
      s0[q] = _mm512_dpbusd_epi32(s0[q], u128, _mm512_loadu_si512(bp));
      s1[q] = _mm512_dpbusd_epi32(s1[q], u128, _mm512_loadu_si512(bp + kGroupBytes));
    }
  if (g < groups)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q)
      s0[q] = _mm512_dpbusd_epi32(s0[q], u128, _mm512_loadu_si512(b + q * panel_bytes + g * kGroupBytes));
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q)
    _mm512_storeu_si512(corr + q * kInt8NR, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_add_epi32(s0[q], s1[q])));
}

void column_correction(const int8_t* b, int64_t panel_bytes, int64_t groups, int np, int32_t* corr) {
  switch (np) {
    case 1: return column_correction_np<1>(b, panel_bytes, groups, corr);
    case 2: return column_correction_np<2>(b, panel_bytes, groups, corr);
    case 3: return column_correction_np<3>(b, panel_bytes, groups, corr);
    default: return column_correction_np<kNP>(b, panel_bytes, groups, corr);
  }
}

// ---- epilogue: one panel's mr rows of int32 sums (row stride 16) to the output, nc <= 16 columns ----
// Same arithmetic and order as int8_gemm.cpp's scalar epilogue: (acc * xs) * ws + bias.
template <typename OutT>
EFFOPS_AVX512_TARGET void epilogue(const int32_t* c, int mr, int64_t i0, int64_t j0, int nc, const Int8Epilogue& e) {
  if constexpr (std::is_same_v<OutT, int32_t>) {
    for (int r = 0; r < mr; ++r)
      std::memcpy(static_cast<int32_t*>(e.out) + (i0 + r) * e.ldo + j0, c + r * kInt8NR, nc * sizeof(int32_t));
  } else {
    OutT* out = static_cast<OutT*>(e.out);
    if (nc != kInt8NR) {
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < nc; ++j) {
          float v = int8_epilogue_rounded(static_cast<float>(c[r * kInt8NR + j]) * e.row_scale[i0 + r] *
                                          e.col_scale[j0 + j]);
          if (e.bias) v += e.bias[j0 + j];
          out[(i0 + r) * e.ldo + j0 + j] = from_float<OutT>(v);
        }
      return;
    }
    const __m512 ws = _mm512_loadu_ps(e.col_scale + j0);
    const __m512 bias = e.bias ? _mm512_loadu_ps(e.bias + j0) : _mm512_setzero_ps();
    for (int r = 0; r < mr; ++r) {
      __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * kInt8NR));
      v = int8_epilogue_rounded(_mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(e.row_scale[i0 + r])), ws));
      if (e.bias) v = _mm512_add_ps(v, bias);
      Avx512Vec{v}.store(out + (i0 + r) * e.ldo + j0);
    }
  }
}

using EpilogueFn = void (*)(const int32_t*, int, int64_t, int64_t, int, const Int8Epilogue&);

EpilogueFn pick_epilogue(Int8Out kind) {
  switch (kind) {
    case Int8Out::kInt32: return epilogue<int32_t>;
    case Int8Out::kFloat: return epilogue<float>;
    case Int8Out::kBFloat16: return epilogue<c10::BFloat16>;
    case Int8Out::kHalf: return epilogue<c10::Half>;
  }
  return nullptr;
}

using MicroFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const int8_t*, int64_t, const int32_t*,
                         const FusedOut*, int32_t*, int64_t, int64_t, int64_t);

// A run of micro-tiles: `row_groups` row groups of MR rows (block_stride bytes of A apart) times
// `panel_groups` neighbouring groups of NP panels, row group by row group, each micro-tile storing its
// output itself (a run of more than one needs `fused`, the first micro-tile's). gemm_tiles hands a tile's
// full row groups and whole panels to one call: one call per micro-tile (its indirect call, register
// saves and stack set-up, and the pipeline's drain and refill around it) cost ~60 cycles beside ~2300
// of work at K = 768. One thread, in-process A/B, medians of 31 rounds: M = 400 768 x 3072 1.047x
// [1.014-1.076], 3072 x 768 1.010x, M = 64 768 x 3072 1.027x, M = 256 4096^2 1.003x (one call per row
// group instead: 1.018x at 768 x 3072).
template <class Step, int MR, int NP, bool kInline>
EFFOPS_ALWAYS_INLINE void micro_run(const uint8_t* a, int64_t row_stride, int64_t group_stride, int64_t groups,
                                    const int8_t* b, int64_t panel_bytes, const int32_t* init, const FusedOut* fused,
                                    int32_t* c, int64_t panel_groups, int64_t row_groups, int64_t block_stride) {
  if constexpr (MR != kMR || NP != kNP || kInline) {  // runs only of the full micro-tile: no code for others
    micro<Step, MR, NP, kInline>(a, row_stride, group_stride, groups, b, panel_bytes, init, fused, c);
  } else {
    if (panel_groups * row_groups == 1)
      return micro<Step, MR, NP, kInline>(a, row_stride, group_stride, groups, b, panel_bytes, init, fused, c);
    const int64_t out_bytes = fused->kind == Int8Out::kFloat || fused->kind == Int8Out::kInt32 ? 4 : 2;
    for (int64_t r = 0; r < row_groups; ++r) {
      FusedOut f = *fused;
      f.out = static_cast<char*>(f.out) + r * MR * f.ldo * out_bytes;
      if (f.row_scale) f.row_scale += r * MR;
      for (int64_t q = 0; q < panel_groups; ++q) {
        micro<Step, MR, NP, kInline>(a + r * block_stride, row_stride, group_stride, groups, b + q * NP * panel_bytes,
                                     panel_bytes, init ? init + q * NP * kInt8NR : nullptr, &f, c);
        f.out = static_cast<char*>(f.out) + NP * kInt8NR * out_bytes;
        if (f.col_scale) f.col_scale += NP * kInt8NR;
        if (f.bias) f.bias += NP * kInt8NR;
      }
    }
  }
}

// One compiled function per (rows, panels), each under its level's target.
template <class Step, int MR, int NP, bool kInline>
EFFOPS_AVX512_TARGET void micro_avx512(const uint8_t* a, int64_t row_stride, int64_t group_stride, int64_t groups,
                                       const int8_t* b, int64_t panel_bytes, const int32_t* init,
                                       const FusedOut* fused, int32_t* c, int64_t panel_groups, int64_t row_groups,
                                       int64_t block_stride) {
  micro_run<Step, MR, NP, kInline>(a, row_stride, group_stride, groups, b, panel_bytes, init, fused, c, panel_groups,
                                   row_groups, block_stride);
}
template <class Step, int MR, int NP, bool kInline>
EFFOPS_AVX512_VNNI_TARGET void micro_vnni(const uint8_t* a, int64_t row_stride, int64_t group_stride,
                                          int64_t groups, const int8_t* b, int64_t panel_bytes, const int32_t* init,
                                          const FusedOut* fused, int32_t* c, int64_t panel_groups,
                                          int64_t row_groups, int64_t block_stride) {
  micro_run<Step, MR, NP, kInline>(a, row_stride, group_stride, groups, b, panel_bytes, init, fused, c, panel_groups,
                                   row_groups, block_stride);
}

// Tables of the micro-kernels by [rows - 1][panels - 1], up to max_panels(rows) panels (nullptr past it).
template <class Step, bool kInline, int MR, int NP>
constexpr MicroFn micro_fn(int max_panels) {
  if (NP > max_panels) return nullptr;
  if constexpr (std::is_same_v<Step, VnniStep>) return micro_vnni<Step, MR, NP, kInline>;
  else return micro_avx512<Step, MR, NP, kInline>;
}
template <class Step, bool kInline, bool kSmall, int MR, int... NP>
constexpr std::array<MicroFn, kNP> micro_row(std::integer_sequence<int, NP...>) {
  return {micro_fn<Step, kInline, MR, NP + 1>(kSmall ? small_panels(MR) : kNP)...};
}
template <class Step, bool kInline, bool kSmall, int... MR>
constexpr std::array<std::array<MicroFn, kNP>, sizeof...(MR)> micro_table(std::integer_sequence<int, MR...>) {
  return {micro_row<Step, kInline, kSmall, MR + 1>(std::make_integer_sequence<int, kNP>{})...};
}
template <class Step>
constexpr auto kMicro = micro_table<Step, false, false>(std::make_integer_sequence<int, kMR>{});
template <class Step, bool kInline>
constexpr auto kMicroSmall = micro_table<Step, kInline, true>(std::make_integer_sequence<int, kSmallRows>{});

// ---- tile loop: as int8_gemm.cpp's (tiles of rows x a block of panels, handed out from a shared
// counter, panel-block-major), with micro-tiles of up to 6 rows x 4 panels. A tile's rows (144 x K
// bytes) and panels (at most 256 KiB) fit one Zen 4 core's 1 MiB L2 together for K up to ~5000.
// a: A's bytes, either packed by pack_a (group_rows(M) rows a group) or, with lda > 0, A's own rows
// (lda bytes apart, K a multiple of 4 so that no group reads past a row). col_init: the starting sums of
// every panel, or nullptr; correction (VNNI s8): compute them, per tile or (few rows) in the micro-kernel.
template <class Step>
void gemm_tiles(const uint8_t* a, int64_t lda, int64_t M, int64_t kpad, const int8_t* b, int64_t N,
                const int32_t* col_init, bool correction, const Int8Epilogue& e) {
  const bool small = M <= kSmallRows;
  const bool per_tile_correction = correction && !small;
  const EpilogueFn epi = pick_epilogue(e.kind);
  const int64_t panels = (N + kInt8NR - 1) / kInt8NR, groups = kpad / kInt8KG, panel_bytes = kpad * kInt8NR;
  const int64_t rows_per_group = group_rows(M);
  const int64_t group_stride = lda ? kInt8KG : rows_per_group * kInt8KG, row_stride = lda ? lda : kInt8KG;
  const int64_t block_stride = lda ? rows_per_group * lda : groups * group_stride;  // one row group to the next
  const int np_step = small ? small_panels(static_cast<int>(M)) : kNP;
  constexpr int64_t kMC = kMR * 24;
  constexpr int64_t kL2Budget = 256 * 1024;
  // Few rows: 4 panels a tile (the threads share the weight stream finely); more: as many as fit L2.
  const int64_t ncp = M <= kMR ? kNP
                               : kNP * std::max<int64_t>(1, std::min<int64_t>(4, kL2Budget / (panel_bytes * kNP)));
  const int64_t tiles_m = (M + kMC - 1) / kMC, tiles_n = (panels + ncp - 1) / ncp, tiles = tiles_m * tiles_n;
  const size_t out_bytes = e.kind == Int8Out::kFloat || e.kind == Int8Out::kInt32 ? 4 : 2;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tiles, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    alignas(64) int32_t c[kMR * kNP * kInt8NR];
    std::vector<int32_t> corr(per_tile_correction ? ncp * kInt8NR : 0);
    int64_t corr_p0 = -1;  // the panel block corr holds: consecutive tiles of one block share it
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tiles;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t m0 = (t % tiles_m) * kMC, m1 = std::min(M, m0 + kMC);
      const int64_t p0 = (t / tiles_m) * ncp, p1 = std::min(panels, p0 + ncp);
      const int32_t* init = col_init ? col_init + p0 * kInt8NR : nullptr;
      if (per_tile_correction && p0 != corr_p0) {
        corr_p0 = p0;
        for (int64_t p = p0; p < p1; p += kNP)
          column_correction(b + p * panel_bytes, panel_bytes, groups, static_cast<int>(std::min<int64_t>(kNP, p1 - p)),
                            corr.data() + (p - p0) * kInt8NR);
      }
      if (per_tile_correction) init = corr.data();
      // The tile's full 6-row groups against its whole 4-panel micro-tiles in one call (micro_run); the
      // loop below takes what is left: a row tail, a last group of fewer panels, a partial panel.
      int64_t run_rows = 0, run_panels = 0;
      if (!small) {
        run_rows = (m1 - m0) / kMR;
        run_panels = std::max<int64_t>(0, std::min(p1, N / kInt8NR) - p0) / kNP;
        if (run_rows > 0 && run_panels > 0) {
          const int64_t j0 = p0 * kInt8NR;
          const FusedOut fused{e.kind, static_cast<char*>(e.out) + (m0 * e.ldo + j0) * out_bytes, e.ldo,
                               e.row_scale ? e.row_scale + m0 : nullptr, e.col_scale ? e.col_scale + j0 : nullptr,
                               e.bias ? e.bias + j0 : nullptr};
          kMicro<Step>[kMR - 1][kNP - 1](a + (m0 / rows_per_group) * block_stride, row_stride, group_stride, groups,
                                         b + p0 * panel_bytes, panel_bytes, init, &fused, c, run_panels, run_rows,
                                         block_stride);
        } else {
          run_rows = run_panels = 0;
        }
      }
      for (int64_t i0 = m0; i0 < m1; i0 += rows_per_group) {  // one packed row group per micro-tile
        const int mr = static_cast<int>(std::min<int64_t>(rows_per_group, m1 - i0));
        const uint8_t* a_group = a + (i0 / rows_per_group) * block_stride;
        int64_t p = i0 < m0 + run_rows * kMR ? p0 + run_panels * kNP : p0;
        for (; p < p1; p += np_step) {
          const int np = static_cast<int>(std::min<int64_t>(np_step, p1 - p));
          const MicroFn fn = !small ? kMicro<Step>[mr - 1][np - 1]
                             : correction ? kMicroSmall<VnniStep, true>[mr - 1][np - 1]
                                          : kMicroSmall<Step, false>[mr - 1][np - 1];
          const int64_t j0 = p * kInt8NR;
          if (j0 + np * kInt8NR <= N) {  // whole panels: the micro-kernel stores the output itself
            const FusedOut fused{e.kind, static_cast<char*>(e.out) + (i0 * e.ldo + j0) * out_bytes, e.ldo,
                                 e.row_scale ? e.row_scale + i0 : nullptr, e.col_scale ? e.col_scale + j0 : nullptr,
                                 e.bias ? e.bias + j0 : nullptr};
            fn(a_group, row_stride, group_stride, groups, b + p * panel_bytes, panel_bytes,
               init ? init + (p - p0) * kInt8NR : nullptr, &fused, c, 1, 1, 0);
            continue;
          }
          fn(a_group, row_stride, group_stride, groups, b + p * panel_bytes, panel_bytes,
             init ? init + (p - p0) * kInt8NR : nullptr, nullptr, c, 1, 1, 0);
          for (int q = 0; q < np; ++q)
            epi(c + q * mr * kInt8NR, mr, i0, (p + q) * kInt8NR,
                static_cast<int>(std::min<int64_t>(kInt8NR, N - (p + q) * kInt8NR)), e);
        }
      }
    }
  });
}

// A packed for the micro-kernels: [ceil(M / R)][kpad / 4][R][4] bytes with R = group_rows(M), each byte
// XORed with `flip` (0x80 turns int8 a into the unsigned a + 128); rows past M and columns past K are
// zero (they meet B's zero padding, and rows past M are never stored).
std::vector<uint8_t> pack_a(const uint8_t* a, int64_t lda, int64_t M, int64_t K, int64_t kpad, uint8_t flip) {
  const int64_t rows = group_rows(M), row_groups = (M + rows - 1) / rows, groups = kpad / kInt8KG;
  const int64_t group_stride = rows * kInt8KG;
  std::vector<uint8_t> out(static_cast<size_t>(row_groups * groups * group_stride), 0);
  at::parallel_for(0, row_groups, 8, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t r = 0; r < rows && q * rows + r < M; ++r) {
        const uint8_t* src = a + (q * rows + r) * lda;
        uint8_t* dst = out.data() + q * groups * group_stride + r * kInt8KG;
        const uint32_t flip4 = flip * 0x01010101u;
        const int64_t whole = K / kInt8KG;
        for (int64_t g = 0; g < whole; ++g) {  // 4 bytes at a time
          uint32_t w;
          std::memcpy(&w, src + g * kInt8KG, 4);
          w ^= flip4;
          std::memcpy(dst + g * group_stride, &w, 4);
        }
        for (int64_t k = whole * kInt8KG; k < K; ++k) dst[whole * group_stride + k % kInt8KG] = src[k] ^ flip;
      }
  });
  return out;
}

}  // namespace

bool int8_gemm_s8_avx512(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                         const Int8Epilogue& epi) {
  const CpuIsa level = cpu_isa();
  if (static_cast<int>(level) < static_cast<int>(CpuIsa::kAvx512)) return false;
  const int64_t kpad = ceil_to(K, kInt8KG);
  const auto* bytes = reinterpret_cast<const uint8_t*>(a);
  if (level >= CpuIsa::kAvx512Vnni) {
    const std::vector<uint8_t> a_u = pack_a(bytes, lda, M, K, kpad, 0x80);
    gemm_tiles<VnniStep>(a_u.data(), 0, M, kpad, b_packed, N, nullptr, true, epi);
    return true;
  }
  for (int64_t i = 0; i < M; ++i)
    if (int8_contains_min(a + i * lda, K)) return false;  // a * sign(b) would wrap: the AVX2 |a| body runs
  const std::vector<uint8_t> ap = pack_a(bytes, lda, M, K, kpad, 0);
  gemm_tiles<Bw8Step>(ap.data(), 0, M, kpad, b_packed, N, nullptr, false, epi);
  return true;
}

bool int8_gemm_u8s7_avx512(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                           const int32_t* col_corr, const Int8Epilogue& epi) {
  const CpuIsa level = cpu_isa();
  if (static_cast<int>(level) < static_cast<int>(CpuIsa::kAvx512)) return false;
  const int64_t kpad = ceil_to(K, kInt8KG);
  // K a multiple of 4: the micro-kernels read A's rows in place (no packing pass).
  std::vector<uint8_t> ap;
  if (K != kpad) ap = pack_a(a_u, lda, M, K, kpad, 0);
  const uint8_t* a_use = ap.empty() ? a_u : ap.data();
  const int64_t lda_use = ap.empty() ? lda : 0;
  if (level >= CpuIsa::kAvx512Vnni)
    gemm_tiles<VnniStep>(a_use, lda_use, M, kpad, b_packed, N, col_corr, false, epi);
  else
    gemm_tiles<Bw7Step>(a_use, lda_use, M, kpad, b_packed, N, col_corr, false, epi);
  return true;
}

bool int8_gemm_u8s8_avx512(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                           const int32_t* col_corr, const Int8Epilogue& epi) {
  if (!cpu_isa_at_least(CpuIsa::kAvx512Vnni)) return false;
  const int64_t kpad = ceil_to(K, kInt8KG);
  std::vector<uint8_t> ap;
  if (K != kpad) ap = pack_a(a_u, lda, M, K, kpad, 0);
  gemm_tiles<VnniStep>(ap.empty() ? a_u : ap.data(), ap.empty() ? lda : 0, M, kpad, b_packed, N, col_corr,
                       col_corr == nullptr, epi);
  return true;
}

#else
bool int8_gemm_s8_avx512(const int8_t*, int64_t, int64_t, int64_t, const int8_t*, int64_t, const Int8Epilogue&) {
  return false;
}
bool int8_gemm_u8s7_avx512(const uint8_t*, int64_t, int64_t, int64_t, const int8_t*, int64_t, const int32_t*,
                           const Int8Epilogue&) {
  return false;
}
bool int8_gemm_u8s8_avx512(const uint8_t*, int64_t, int64_t, int64_t, const int8_t*, int64_t, const int32_t*,
                           const Int8Epilogue&) {
  return false;
}
#endif

}  // namespace effops::cpu
