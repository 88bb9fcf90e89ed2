// int8 GEMM kernels: packing, the register-blocked micro-kernels (AVX2 and scalar side by side), the
// fused epilogue, and the tile loop. See int8_gemm.h for the layouts and the saturation argument.
#include "cpu/int8_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/simd.h"

namespace effops::cpu {
namespace {

constexpr int kMR = 4;
// Small-M kernels (micro_rxn_avx2): panels per pass for 1, 2, 3 rows (one tile holds 4 panels).
constexpr int kFewRows = 3;
constexpr int kFewRowPanels[kFewRows] = {4, 2, 2};  // rows per micro-tile: 4 rows x 2 vectors = 8 int32 accumulators in registers

// ---------------------------------------------------------------------------------------------
// Micro-kernels: c[MR][16] = A[MR rows, 0:K] @ B_panel[0:K, 16 columns]
// ---------------------------------------------------------------------------------------------
// Scalar: the plain definition over either packed layout (KG = 4 for s8, 2 for s16).
// `init` (16 values or nullptr for zeros) starts every row's sums: the u8s7 path's column correction.
template <typename TA, typename TB, int KG, int MR>
void micro_scalar(const TA* a, int64_t lda, int64_t K, const TB* b, const int32_t* init, int32_t* c) {
  int32_t acc[MR][kInt8NR] = {};
  if (init)
    for (int r = 0; r < MR; ++r) std::memcpy(acc[r], init, sizeof(acc[r]));
  for (int64_t k = 0; k < K; ++k) {
    const TB* bk = b + (k / KG) * kInt8NR * KG + k % KG;
    for (int r = 0; r < MR; ++r) {
      const int32_t ar = a[r * lda + k];
      for (int j = 0; j < kInt8NR; ++j) acc[r][j] += ar * static_cast<int32_t>(bk[j * KG]);
    }
  }
  std::memcpy(c, acc, sizeof(acc));
}

#if EFFOPS_HAVE_X86
// One 4-k step of the s8 path for one row and 8 columns: |a| * (sign(a) * b) in int16 pairs (no
// saturation, see the header), pairs summed into int32 by vpmaddwd with ones, added to acc.
EFFOPS_AVX2_TARGET __attribute__((always_inline)) inline __m256i s8_step(__m256i acc, __m256i abs_a, __m256i a,
                                                                         __m256i b, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(b, a)), ones));
}

EFFOPS_AVX2_TARGET __attribute__((always_inline)) inline __m256i bcast4(const int8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm256_set1_epi32(w);
}

// A's rows are zero padded to a multiple of 4. |a| is taken in registers (vpabsb, an ALU uop next to
// the multiplier-bound maddubs/maddwd) rather than loaded from a precomputed |A| copy: that copy
// doubled A's L1 footprint (2 x 4 rows x K bytes = 32 KiB at K = 4096, all of L1) so the streamed B
// panel evicted A every micro-tile. Accumulators are named variables (an
// array of __m256i made GCC spill them to the stack inside the loop).
template <int MR>
EFFOPS_AVX2_TARGET void micro_s8_avx2(const int8_t* a, int64_t lda, int64_t K, const int8_t* b,
                                      const int32_t* /*init: unused (nullptr)*/, int32_t* c) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t groups = (K + kInt8KG - 1) / kInt8KG;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 64 + 32));
    const int64_t off = g * kInt8KG;
    {
      const __m256i av = bcast4(a + off), ua = _mm256_abs_epi8(av);
      c00 = s8_step(c00, ua, av, b0, ones);
      c01 = s8_step(c01, ua, av, b1, ones);
    }
    if constexpr (MR > 1) {
      const __m256i av = bcast4(a + lda + off), ua = _mm256_abs_epi8(av);
      c10 = s8_step(c10, ua, av, b0, ones);
      c11 = s8_step(c11, ua, av, b1, ones);
    }
    if constexpr (MR > 2) {
      const __m256i av = bcast4(a + 2 * lda + off), ua = _mm256_abs_epi8(av);
      c20 = s8_step(c20, ua, av, b0, ones);
      c21 = s8_step(c21, ua, av, b1, ones);
    }
    if constexpr (MR > 3) {
      const __m256i av = bcast4(a + 3 * lda + off), ua = _mm256_abs_epi8(av);
      c30 = s8_step(c30, ua, av, b0, ones);
      c31 = s8_step(c31, ua, av, b1, ones);
    }
  }
  const __m256i rows[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR), rows[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR + 8), rows[r][1]);
  }
}

// The s8 path when A has no -128 (always so for quantize_rowwise's output, whose range is [-127, 127]):
// the roles are swapped, |b| (computed in registers from the packed B, <= 127) is the unsigned
// operand and sign(a, b) = a * sign(b) the signed one, so a pair is at most 2 * 127 * 127 = 32258:
// no saturation. (With a = -128, sign(a, b) would wrap for negative b: such A takes micro_s8_avx2.)
// The sign and abs are then per B vector (shared by all MR rows) instead of per row, and with 6 rows
// x 2 vectors the loop is ALU-bound at 4 uops per (row, vector) step plus 2 shared abs: measured
// 152 vs 131 GOP/s per core with A and B in L1 for the 4-row |a| kernel.
EFFOPS_AVX2_TARGET __attribute__((always_inline)) inline __m256i s8u_step(__m256i acc, __m256i abs_b, __m256i a,
                                                                          __m256i b, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_b, _mm256_sign_epi8(a, b)), ones));
}

// The exact 8-bit step above, as a step policy of micro6_avx2: A is int8, the sums start at zero.
struct S8uStep {
  using AT = int8_t;
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i start(const int32_t* /*init: nullptr*/) {
    return _mm256_setzero_si256();
  }
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i prepare_b(__m256i b) { return _mm256_abs_epi8(b); }
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i step(__m256i acc, __m256i prepared_b, __m256i a,
                                                                        __m256i b, __m256i ones) {
    return s8u_step(acc, prepared_b, a, b, ones);
  }
};

// u8s7 path (7-bit weights): a_u = a + 128 unsigned, b in [-63, 63] signed, so vpmaddubsw's pairs are
// at most 2 * 255 * 63 = 32130 (no saturation) and the step is maddubs, maddwd, add: no vpabsb per B
// vector, no vpsignb per row (the uop that bounds the s8u loop). The sums start at the column
// correction -128 * sum_k b (see the header), so the result is sum a * b exactly.
struct U8s7Step {
  using AT = uint8_t;
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i start(const int32_t* init) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(init));
  }
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i prepare_b(__m256i b) { return b; }
  EFFOPS_AVX2_TARGET __attribute__((always_inline)) static __m256i step(__m256i acc, __m256i /*prepared_b*/, __m256i a,
                                                                        __m256i b, __m256i ones) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
  }
};

// The 6-row micro-kernel of both B-side paths: MR (1-6) rows of A against one 16-column panel of B,
// the step (and A's type, and where the sums start) from the Step policy above.
template <int MR, typename Step>
EFFOPS_AVX2_TARGET void micro6_avx2(const typename Step::AT* a, int64_t lda, int64_t K, const int8_t* b,
                                    const int32_t* init, int32_t* c) {
  const __m256i i0 = Step::start(init), i1 = Step::start(init ? init + 8 : nullptr);
  __m256i c00 = i0, c01 = i1, c10 = i0, c11 = i1, c20 = i0, c21 = i1, c30 = i0, c31 = i1, c40 = i0, c41 = i1,
          c50 = i0, c51 = i1;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t groups = (K + kInt8KG - 1) / kInt8KG;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 64));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 64 + 32));
    const __m256i u0 = Step::prepare_b(b0), u1 = Step::prepare_b(b1);
    // 1 KiB ahead: at small M the packed weights stream from memory once, and the hardware
    // prefetcher alone left the M = 1 GEMM at ~11 of ~20 GB/s (0.57 vs 1.06 ms single-threaded).
    _mm_prefetch(reinterpret_cast<const char*>(b + g * 64 + 1024), _MM_HINT_T0);
    const int64_t off = g * kInt8KG;
#define EFFOPS_MICRO6_ROW(r, x, y)                                                   \
  if constexpr (MR > r) {                                                            \
    const __m256i av = bcast4(reinterpret_cast<const int8_t*>(a) + r * lda + off);   \
    x = Step::step(x, u0, av, b0, ones);                                             \
    y = Step::step(y, u1, av, b1, ones);                                             \
  }
    EFFOPS_MICRO6_ROW(0, c00, c01)
    EFFOPS_MICRO6_ROW(1, c10, c11)
    EFFOPS_MICRO6_ROW(2, c20, c21)
    EFFOPS_MICRO6_ROW(3, c30, c31)
    EFFOPS_MICRO6_ROW(4, c40, c41)
    EFFOPS_MICRO6_ROW(5, c50, c51)
#undef EFFOPS_MICRO6_ROW
  }
  const __m256i rows[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR), rows[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR + 8), rows[r][1]);
  }
}

// R rows (1-3) against NP neighbouring panels at once (small M only): NP independent weight streams
// (one panel apart) instead of one, for more reads in flight, since with few rows reading the weights
// is the whole cost. One thread, M = 1, K = 4096, N = 4096 and 11008, medians of 8 interleaved rounds:
// 4 panels ran 1.08-1.28x the speed of one panel at a time, 2 panels 1.00-1.21x (8- and 7-bit, with
// the weights in L3 and coming from memory). U8S7 picks the u8s7 step (a + 128 times 7-bit b, sums
// from init) or the s8u step (|b| times sign(a, b)). init holds NP x 16 values; c gets, for panel q
// and row r, 16 sums at c + (q * R + r) * 16 (each panel's rows in the epilogue's layout).
template <bool U8S7, int R, int NP, typename TA>
EFFOPS_AVX2_TARGET void micro_rxn_avx2(const TA* a, int64_t lda, int64_t K, const int8_t* b, const int32_t* init,
                                       int32_t* c) {
  const int64_t panel = ceil_to(K, kInt8KG) * kInt8NR;
  __m256i acc[NP][R][2];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        acc[q][r][h] = U8S7 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(init + 16 * q + 8 * h))
                            : _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t groups = (K + kInt8KG - 1) / kInt8KG;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i av[R];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r) av[r] = bcast4(reinterpret_cast<const int8_t*>(a) + r * lda + g * kInt8KG);
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int8_t* bp = b + q * panel + g * 64;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32));
      _mm_prefetch(reinterpret_cast<const char*>(bp + 1024), _MM_HINT_T0);
      if constexpr (U8S7) {
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r) {
          acc[q][r][0] = _mm256_add_epi32(acc[q][r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av[r], b0), ones));
          acc[q][r][1] = _mm256_add_epi32(acc[q][r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av[r], b1), ones));
        }
      } else {
        const __m256i u0 = _mm256_abs_epi8(b0), u1 = _mm256_abs_epi8(b1);
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r) {
          acc[q][r][0] = s8u_step(acc[q][r][0], u0, av[r], b0, ones);
          acc[q][r][1] = s8u_step(acc[q][r][1], u1, av[r], b1, ones);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (q * R + r) * kInt8NR + 8 * h), acc[q][r][h]);
}

// s16 path: A already widened to int16 with rows padded to an even length; one vpmaddwd per
// (row, 8 columns, 2 k), exact for every int8 input.
EFFOPS_AVX2_TARGET __attribute__((always_inline)) inline __m256i bcast2x16(const int16_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm256_set1_epi32(w);
}

template <int MR>
EFFOPS_AVX2_TARGET void micro_s16_avx2(const int16_t* a, int64_t lda, int64_t K, const int16_t* b,
                                       const int32_t* /*init: unused (nullptr)*/, int32_t* c) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int64_t groups = (K + kInt16KG - 1) / kInt16KG;
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + g * 32 + 16));
    const int64_t off = g * kInt16KG;
    {
      const __m256i av = bcast2x16(a + off);
      c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(av, b0));
      c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(av, b1));
    }
    if constexpr (MR > 1) {
      const __m256i av = bcast2x16(a + lda + off);
      c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(av, b0));
      c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(av, b1));
    }
    if constexpr (MR > 2) {
      const __m256i av = bcast2x16(a + 2 * lda + off);
      c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(av, b0));
      c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(av, b1));
    }
    if constexpr (MR > 3) {
      const __m256i av = bcast2x16(a + 3 * lda + off);
      c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(av, b0));
      c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(av, b1));
    }
  }
  const __m256i rows[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR), rows[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kInt8NR + 8), rows[r][1]);
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Epilogue: one micro-tile (mr rows, nc <= 16 valid columns) of int32 sums to the output.
// ---------------------------------------------------------------------------------------------
template <typename OutT>
void epilogue_scalar(const int32_t* c, int mr, int64_t i0, int64_t j0, int nc, const Int8Epilogue& e) {
  OutT* out = static_cast<OutT*>(e.out);
  for (int r = 0; r < mr; ++r) {
    const float xs = e.row_scale[i0 + r];
    for (int j = 0; j < nc; ++j) {
      float v = int8_epilogue_rounded(static_cast<float>(c[r * kInt8NR + j]) * xs * e.col_scale[j0 + j]);
      if (e.bias) v += e.bias[j0 + j];
      out[(i0 + r) * e.ldo + j0 + j] = from_float<OutT>(v);
    }
  }
}

void epilogue_int32(const int32_t* c, int mr, int64_t i0, int64_t j0, int nc, const Int8Epilogue& e) {
  int32_t* out = static_cast<int32_t*>(e.out);
  for (int r = 0; r < mr; ++r) std::memcpy(out + (i0 + r) * e.ldo + j0, c + r * kInt8NR, nc * sizeof(int32_t));
}

#if EFFOPS_HAVE_X86
// Same arithmetic and order as epilogue_scalar ((acc * xs) * ws + bias, no FMA: int8_epilogue_rounded).
template <typename OutT>
EFFOPS_AVX2_TARGET void epilogue_avx2(const int32_t* c, int mr, int64_t i0, int64_t j0, int nc,
                                      const Int8Epilogue& e) {
  if (nc != kInt8NR) return epilogue_scalar<OutT>(c, mr, i0, j0, nc, e);
  OutT* out = static_cast<OutT*>(e.out);
  for (int r = 0; r < mr; ++r) {
    const __m256 xs = _mm256_set1_ps(e.row_scale[i0 + r]);
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * kInt8NR + 8 * h)));
      v = int8_epilogue_rounded(_mm256_mul_ps(_mm256_mul_ps(v, xs), _mm256_loadu_ps(e.col_scale + j0 + 8 * h)));
      if (e.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(e.bias + j0 + 8 * h));
      Avx2Vec{v}.store(out + (i0 + r) * e.ldo + j0 + 8 * h);
    }
  }
}
#endif

using EpilogueFn = void (*)(const int32_t*, int, int64_t, int64_t, int, const Int8Epilogue&);

EpilogueFn pick_epilogue(Int8Out kind, bool avx2) {
  switch (kind) {
    case Int8Out::kInt32: return epilogue_int32;
#if EFFOPS_HAVE_X86
    case Int8Out::kFloat: return avx2 ? epilogue_avx2<float> : epilogue_scalar<float>;
    case Int8Out::kBFloat16: return avx2 ? epilogue_avx2<c10::BFloat16> : epilogue_scalar<c10::BFloat16>;
    case Int8Out::kHalf: return avx2 ? epilogue_avx2<c10::Half> : epilogue_scalar<c10::Half>;
#else
    case Int8Out::kFloat: return epilogue_scalar<float>;
    case Int8Out::kBFloat16: return epilogue_scalar<c10::BFloat16>;
    case Int8Out::kHalf: return epilogue_scalar<c10::Half>;
#endif
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Tile loop. Work is cut into tiles of NCP panels (NCP x 16 x K bytes of B, sized to stay in L2) x MC
// rows, ordered panel-block-major so that the threads' contiguous ranges split N (every thread streams
// its own part of B once, the whole story for small M, where the weights' bytes are the cost) and,
// for large M, consecutive tiles of one thread reuse the same B block from L2 while A (M x K, small
// next to L3) is re-read. Inside a tile each MR-row micro-tile of A (MR x K bytes, L1) meets the NCP
// panels in turn.
// ---------------------------------------------------------------------------------------------
template <typename TA, typename TB>
using MicroFn = void (*)(const TA*, int64_t, int64_t, const TB*, const int32_t*, int32_t*);

// col_init: nullptr, or ceil(N/16)*16 starting values of the column sums (the u8s7 correction).
template <typename TA, typename TB, int MR>
void gemm_tiles(const TA* a, int64_t lda, int64_t M, int64_t K, const TB* b, int64_t kpad, int64_t N,
                const int32_t* col_init, const MicroFn<TA, TB> (&micro)[MR], EpilogueFn epilogue,
                const Int8Epilogue& e, const MicroFn<TA, TB>* micro_few = nullptr) {
  const int64_t panels = (N + kInt8NR - 1) / kInt8NR;
  const int64_t panel_elems = kpad * kInt8NR;
  constexpr int64_t kMC = MR * 64;
  constexpr int64_t kL2Budget = 256 * 1024;
  // (With at most MR rows, one micro-tile reads every panel once, so keeping a block of them in L2
  // buys nothing: such M gets 4 panels per tile at any K, for the small-M kernels' multi-panel passes.)
  const int64_t ncp = M <= MR && micro_few ? 4
                      : std::max<int64_t>(1, std::min<int64_t>(4, kL2Budget / (panel_elems * (int64_t)sizeof(TB))));
  const int64_t tiles_m = (M + kMC - 1) / kMC, tiles_n = (panels + ncp - 1) / ncp;
  // Tiles are handed out one at a time from a shared counter rather than as one fixed range per
  // thread: when another process holds a core for a time slice, the other thread takes over its tiles
  // instead of waiting at the join (the machine this was tuned on is shared).
  const int64_t tiles = tiles_m * tiles_n;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tiles, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    alignas(32) int32_t c[std::max(MR, 4) * kInt8NR];
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < tiles;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t m0 = (t % tiles_m) * kMC, m1 = std::min(M, m0 + kMC);
      const int64_t p0 = (t / tiles_m) * ncp, p1 = std::min(panels, p0 + ncp);
      // Rows dealt evenly over the fewest micro-tiles (16 rows: 6 + 5 + 5, not 6 + 6 + 4): every
      // micro-tile re-reads the B panels, so a short last one costs a full pass for few rows.
      for (int64_t i0 = m0, left = m1 - m0; left > 0;) {
        const int64_t tiles_left = (left + MR - 1) / MR;
        const int mr = static_cast<int>((left + tiles_left - 1) / tiles_left);
        for (int64_t p = p0; p < p1; ++p) {
          const int32_t* init = col_init ? col_init + p * kInt8NR : nullptr;
          if (mr <= kFewRows && micro_few && p + kFewRowPanels[mr - 1] <= p1) {  // few rows: several panels a pass
            micro_few[mr - 1](a + i0 * lda, lda, K, b + p * panel_elems, init, c);
            for (int q = 0; q < kFewRowPanels[mr - 1]; ++q, ++p)
              epilogue(c + q * mr * kInt8NR, mr, i0, p * kInt8NR,
                       static_cast<int>(std::min<int64_t>(kInt8NR, N - p * kInt8NR)), e);
            --p;
            continue;
          }
          micro[mr - 1](a + i0 * lda, lda, K, b + p * panel_elems, init, c);
          const int nc = static_cast<int>(std::min<int64_t>(kInt8NR, N - p * kInt8NR));
          epilogue(c, mr, i0, p * kInt8NR, nc, e);
        }
        i0 += mr;
        left -= mr;
      }
    }
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------
template <typename TB, int KG>
static void pack_b(const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t N, TB* out) {
  const int64_t panels = (N + kInt8NR - 1) / kInt8NR, kpad = ceil_to(K, KG);
  const int64_t full_groups = K / KG;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      TB* dst = out + p * kpad * kInt8NR;
      const int8_t* src = b + p * kInt8NR * stride_n;
      if ((p + 1) * kInt8NR <= N) {
        // Interior panel: no bounds checks; the groups' order keeps reads within a few cache lines.
        for (int64_t g = 0; g < full_groups; ++g, dst += kInt8NR * KG)
          for (int64_t j = 0; j < kInt8NR; ++j)
            for (int t = 0; t < KG; ++t) dst[j * KG + t] = src[(g * KG + t) * stride_k + j * stride_n];
      } else {
        for (int64_t g = 0; g < full_groups; ++g, dst += kInt8NR * KG)
          for (int64_t j = 0; j < kInt8NR; ++j)
            for (int t = 0; t < KG; ++t)
              dst[j * KG + t] = p * kInt8NR + j < N ? src[(g * KG + t) * stride_k + j * stride_n] : TB(0);
      }
      for (int64_t g = full_groups; g < kpad / KG; ++g, dst += kInt8NR * KG)  // K's zero-padded tail group
        for (int64_t j = 0; j < kInt8NR; ++j)
          for (int t = 0; t < KG; ++t) {
            const int64_t n = p * kInt8NR + j, k = g * KG + t;
            dst[j * KG + t] = (n < N && k < K) ? static_cast<TB>(src[k * stride_k + j * stride_n]) : TB(0);
          }
    }
  });
}

void int8_pack_b_s8(const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t N, int8_t* out) {
  pack_b<int8_t, kInt8KG>(b, stride_k, stride_n, K, N, out);
}

void int8_pack_b_s16(const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t N, int16_t* out) {
  pack_b<int16_t, kInt16KG>(b, stride_k, stride_n, K, N, out);
}

bool int8_contains_min(const int8_t* p, int64_t n) {
  // A branch-free reduction (vectorized by the compiler, unlike std::find's early exit), in chunks so
  // that a hit still stops the scan early.
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    const int64_t i1 = std::min(n, i0 + 4096);
    int hit = 0;
    for (int64_t i = i0; i < i1; ++i) hit |= p[i] == -128;
    if (hit) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------
// A with rows zero padded to whole 4-byte groups (the kernels read whole groups): a copy only when K
// is not a multiple of 4 or rows are strided; O(M K) next to the O(M N K) product. (The padding bytes
// meet B's zero padding, so their value never matters.) Returns the row stride of *a.
template <typename TA>
static int64_t pad_a_rows(const TA*& a, int64_t lda, int64_t M, int64_t K, std::vector<TA>& storage) {
  const int64_t kpad = ceil_to(K, kInt8KG);
  if (kpad == K && lda == K) return lda;
  storage.assign(static_cast<size_t>(M * kpad), TA(0));
  for (int64_t i = 0; i < M; ++i) std::memcpy(storage.data() + i * kpad, a + i * lda, K);  // memory-bound: 1 thread
  a = storage.data();
  return kpad;
}

#if EFFOPS_HAVE_X86
// The kernel tables of one B-side path (Step: S8uStep or U8s7Step; U8S7: the same choice for the
// few-row kernels): 1-6 rows by micro6_avx2, 1-3 rows against several panels by micro_rxn_avx2.
template <typename Step, bool U8S7>
struct BSideKernels {
  using AT = typename Step::AT;
  static constexpr MicroFn<AT, int8_t> six[6] = {micro6_avx2<1, Step>, micro6_avx2<2, Step>, micro6_avx2<3, Step>,
                                                 micro6_avx2<4, Step>, micro6_avx2<5, Step>, micro6_avx2<6, Step>};
  static constexpr MicroFn<AT, int8_t> few[kFewRows] = {micro_rxn_avx2<U8S7, 1, kFewRowPanels[0], AT>,
                                                        micro_rxn_avx2<U8S7, 2, kFewRowPanels[1], AT>,
                                                        micro_rxn_avx2<U8S7, 3, kFewRowPanels[2], AT>};
};
#endif

bool int8_s8_takes_any_b() { return cpu_isa_at_least(CpuIsa::kAvx512Vnni); }

const char* int8_gemm_body() {
  switch (cpu_isa()) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2 (vpmaddubsw + vpmaddwd, 256-bit)";
    case CpuIsa::kAvx512: return "avx512 (vpmaddubsw + vpmaddwd, 512-bit)";
    default: return "avx512_vnni (vpdpbusd, 512-bit)";
  }
}

void int8_gemm_s8(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                  const Int8Epilogue& epi) {
  if (int8_gemm_s8_avx512(a, lda, M, K, b_packed, N, epi)) return;
  const bool avx2 = has_avx2_fma();
  const int64_t kpad = ceil_to(K, kInt8KG);
  // (vpabsb of -128 gives 0x80 = 128 as an unsigned byte, so |a| is right for every int8.)
  std::vector<int8_t> ap;
  const int8_t* a_use = a;
  const int64_t lda_use = pad_a_rows(a_use, lda, M, K, ap);
#if EFFOPS_HAVE_X86
  if (avx2) {
    bool a_has_min = false;
    for (int64_t i = 0; i < M && !a_has_min; ++i) a_has_min = int8_contains_min(a_use + i * lda_use, K);
    // quantize_rowwise never produces -128, so Int8Linear always takes the faster |b| kernel; general
    // int8_mm inputs are checked (O(M K), next to the O(M N K) product).
    if (!a_has_min) {
      return gemm_tiles(a_use, lda_use, M, K, b_packed, kpad, N, nullptr, BSideKernels<S8uStep, false>::six,
                        pick_epilogue(epi.kind, true), epi, BSideKernels<S8uStep, false>::few);
    }
    static const MicroFn<int8_t, int8_t> vec[kMR] = {micro_s8_avx2<1>, micro_s8_avx2<2>, micro_s8_avx2<3>,
                                                     micro_s8_avx2<4>};
    return gemm_tiles(a_use, lda_use, M, K, b_packed, kpad, N, nullptr, vec,
                      pick_epilogue(epi.kind, true), epi);
  }
#endif
  static const MicroFn<int8_t, int8_t> scalar[kMR] = {
      micro_scalar<int8_t, int8_t, kInt8KG, 1>, micro_scalar<int8_t, int8_t, kInt8KG, 2>,
      micro_scalar<int8_t, int8_t, kInt8KG, 3>, micro_scalar<int8_t, int8_t, kInt8KG, 4>};
  gemm_tiles(a_use, lda_use, M, K, b_packed, kpad, N, nullptr, scalar,
             pick_epilogue(epi.kind, avx2), epi);
}

bool int8_gemm_u8s8_direct() { return cpu_isa_at_least(CpuIsa::kAvx512Vnni); }

void int8_gemm_u8s8(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                    const int32_t* col_corr, const Int8Epilogue& epi) {
  if (int8_gemm_u8s8_avx512(a_u, lda, M, K, b_packed, N, col_corr, epi)) return;
  std::vector<int8_t> a(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = static_cast<int8_t>(a_u[i * lda + k] ^ 0x80);
  int8_gemm_s8(a.data(), K, M, K, b_packed, N, epi);
}

void int8_gemm_u8s7(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                    const int32_t* col_corr, const Int8Epilogue& epi) {
  if (int8_gemm_u8s7_avx512(a_u, lda, M, K, b_packed, N, col_corr, epi)) return;
  const bool avx2 = has_avx2_fma();
  const int64_t kpad = ceil_to(K, kInt8KG);
  std::vector<uint8_t> ap;
  const uint8_t* a_use = a_u;
  const int64_t lda_use = pad_a_rows(a_use, lda, M, K, ap);
#if EFFOPS_HAVE_X86
  if (avx2) {
    return gemm_tiles(a_use, lda_use, M, K, b_packed, kpad, N, col_corr, BSideKernels<U8s7Step, true>::six,
                      pick_epilogue(epi.kind, true), epi, BSideKernels<U8s7Step, true>::few);
  }
#endif
  // Scalar: the same arithmetic (sum a_u * b from the correction), so the correction is tested here too.
  static const MicroFn<uint8_t, int8_t> scalar[kMR] = {
      micro_scalar<uint8_t, int8_t, kInt8KG, 1>, micro_scalar<uint8_t, int8_t, kInt8KG, 2>,
      micro_scalar<uint8_t, int8_t, kInt8KG, 3>, micro_scalar<uint8_t, int8_t, kInt8KG, 4>};
  gemm_tiles(a_use, lda_use, M, K, b_packed, kpad, N, col_corr, scalar, pick_epilogue(epi.kind, avx2), epi);
}

void int8_gemm_s16(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int16_t* b_packed, int64_t N,
                   const Int8Epilogue& epi) {
  const bool avx2 = has_avx2_fma();
  // Widen A once (O(M K), small next to the O(M N K) product), rows padded to an even length.
  const int64_t kpad = ceil_to(K, kInt16KG);
  std::vector<int16_t> a16(static_cast<size_t>(M * kpad), 0);
  at::parallel_for(0, M, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < K; ++k) a16[i * kpad + k] = a[i * lda + k];
  });
#if EFFOPS_HAVE_X86
  static const MicroFn<int16_t, int16_t> vec[kMR] = {micro_s16_avx2<1>, micro_s16_avx2<2>, micro_s16_avx2<3>,
                                                     micro_s16_avx2<4>};
  if (avx2) return gemm_tiles(a16.data(), kpad, M, K, b_packed, kpad, N, nullptr, vec, pick_epilogue(epi.kind, true), epi);
#endif
  static const MicroFn<int16_t, int16_t> scalar[kMR] = {
      micro_scalar<int16_t, int16_t, kInt16KG, 1>, micro_scalar<int16_t, int16_t, kInt16KG, 2>,
      micro_scalar<int16_t, int16_t, kInt16KG, 3>, micro_scalar<int16_t, int16_t, kInt16KG, 4>};
  gemm_tiles(a16.data(), kpad, M, K, b_packed, kpad, N, nullptr, scalar, pick_epilogue(epi.kind, avx2), epi);
}

}  // namespace effops::cpu
