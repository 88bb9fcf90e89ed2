// Block-sparse masked matmul on CPU: forward / grad_x (block_sparse_mm) and the sampled weight
// gradient (block_sparse_grad_weight). See masked_linear.h for the contract.
//
// block_sparse_pack: the kept blocks of W' as panels of 16 output columns, k-major:
//   fp32 / fp16 weights: fp32 packed[br][panel p][kept block j][k][16] (zero-padded past R and C), so
//   the micro-kernel reads 16 contiguous floats per k. bf16 weights: bf16 pairs,
//   packed[br][p][j][k / 2][16][2], the operand order of vdpbf16ps (two k of one column per 32-bit
//   word); the other levels split a word into two fp32 values in registers. The layout depends on the
//   dtype only, never on the level, so a packed weight is right at every level. O(kept weights).
//   block_sparse_mm packs each block-row itself, just before walking it, unless given panels packed
//   ahead (a module's pack_weights) or the rows span several chunks (then it packs all ahead, once).
// block_sparse_mm: regroup a into 6-row tiles (fp32, or bf16 pairs for bf16), then one thread per
//   block-row range; for each 6-row tile, for each panel, walk the kept blocks and accumulate a 6 x 16
//   tile in registers (broadcast a[i, k], FMA with the panel row; or a pair and vdpbf16ps).
//
//   Rows are taken in chunks of kChunkRows (504): a chunk of the regrouped a stays in L3 while every
//   block-row walks it (for M = 2048 x 4096 fp32, a is 32 MB and would be re-read from memory).
//
// block_sparse_grad_weight: gy and x are first packed per block (fp32, zero-padded): gy's columns of
// each block-row in 6-row groups, m-major (gy_packed[br][group][m][6]), and x's columns of each
// block-column m-major (x_packed[bc][m][b]). Then each kept block (owned by its block-row's thread) is
// 6 x 16 register tiles reduced over m in chunks of kChunkRows: both operands stream contiguously
// (reading gy and x in place walked both matrices with a row stride per step).
#include "cpu/masked_linear.h"
#include "cpu/masked_linear_micro.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace effops::cpu {
namespace {

constexpr int64_t kPanel = 16;  // output columns per micro-tile
constexpr int kRows = 6;        // a rows per micro-tile: 6 x 2 accumulators + 2 loads + 1 broadcast fit 16 ymm
constexpr int64_t kChunkRows = 84 * kRows;  // rows of a per pass over the block-rows (8 MB at C = 4096)

struct BlockMmArgs {
  int64_t M, C, R, block;
  const int64_t* ptr;
  const int64_t* idx;
  const void* packed;    // W' panels, see the file comment (float, or bf16 pairs); null: packed per block-row
  const int64_t* offset; // packed offset of each block-row, in weights
  const void* w;         // W' (a T*) at w[r * w_rs + c * w_cs], read when packed is null
  int64_t w_rs, w_cs;
  const void* a_packed;  // a in 6-row tiles: [tile][column or pair][6], zero-padded
};

// The tile kernels block_mm_rows runs. AElem / PElem: what a_packed and the panels hold (float, or a
// uint32_t bf16 pair covering 2 k); kPanels: output panels of 16 per call (2 where registers allow).
template <class V>
struct Fp32Tile {
  using Vec = V;
  using AElem = float;
  using PElem = float;
  static constexpr int kPanels = V::kWidth == 16 ? 2 : 1;
  template <int NP>
  EFFOPS_ALWAYS_INLINE static void run(const float* a, const int64_t* kept, int64_t nkept, int64_t b, int64_t C,
                                       const float* panel, int64_t panel_stride, float* tile) {
    micro_blocks<V, NP>(a, kept, nkept, b, C, panel, panel_stride, tile);
  }
};
template <class V>
struct Bf16PanelTile {
  using Vec = V;
  using AElem = float;
  using PElem = uint32_t;
  static constexpr int kPanels = V::kWidth == 16 ? 2 : 1;
  template <int NP>
  EFFOPS_ALWAYS_INLINE static void run(const float* a, const int64_t* kept, int64_t nkept, int64_t b, int64_t C,
                                       const uint32_t* panel, int64_t panel_stride, float* tile) {
    micro_blocks_pairs<V, NP>(a, kept, nkept, b, C, panel, panel_stride, tile);
  }
};
#if EFFOPS_HAVE_X86
struct Dpbf16Tile {
  using Vec = Avx512Vec;
  using AElem = uint32_t;
  using PElem = uint32_t;
  static constexpr int kPanels = 2;
  template <int NP>
  EFFOPS_AVX512_BF16_TARGET static void run(const uint32_t* a, const int64_t* kept, int64_t nkept, int64_t b,
                                             int64_t C, const uint32_t* panel, int64_t panel_stride, float* tile) {
    micro_blocks_dpbf16<NP>(a, kept, nkept, b, C, panel, panel_stride, tile);
  }
};
#endif

template <typename T>
constexpr bool kBf16Pairs = std::is_same_v<T, c10::BFloat16>;
// The tile kernel of a Vec level for storage type T.
template <class Vec, typename T>
using TileFor = std::conditional_t<kBf16Pairs<T>, Bf16PanelTile<Vec>, Fp32Tile<Vec>>;

// rows x cols of the fp32 tile (row stride w) to out (row stride ldo), converted to T: whole vectors
// (Vec::store rounds as from_float does) where the columns fill them, the rest one by one.
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void store_tile(const float* tile, int w, int rows, int64_t cols, T* out, int64_t ldo) {
  constexpr int W = Vec::kWidth;
  for (int i = 0; i < rows; ++i) {
    int64_t c = 0;
    for (; c + W <= cols; c += W) Vec::load(tile + i * w + c).store(out + i * ldo + c);
    for (; c < cols; ++c) out[i * ldo + c] = from_float<T>(tile[i * w + c]);
  }
}

// How many k one element of type E covers: a packed bf16 pair covers two.
template <typename E>
constexpr int64_t kPerElem = std::is_same_v<E, uint32_t> ? 2 : 1;

template <typename T>
void pack_block_row(const T* w, int64_t w_rs, int64_t w_cs, int64_t R, int64_t C, const int64_t* ptr,
                    const int64_t* idx, int64_t b, int64_t br, void* dst_row);

// One block-row range of the product: out[:, rows of br0..br1). Without g.packed, each block-row's
// panels are packed from W' into `own` as the row is reached (one chunk of rows only: block_sparse_mm
// packs ahead otherwise), so they are written and read in L2 and no weight-sized buffer is allocated.
template <class Tile, typename T>
EFFOPS_ALWAYS_INLINE void block_mm_rows(const BlockMmArgs& g, const T* bias, T* out, int64_t br0, int64_t br1) {
  using AE = typename Tile::AElem;
  using PE = typename Tile::PElem;
  constexpr int kW = Tile::kPanels * kPanel;
  const int64_t b = g.block, panels = b / kPanel, a_cols = (g.C + kPerElem<AE> - 1) / kPerElem<AE>;
  alignas(64) float tile[kRows * kW];
  alignas(64) float bias_row[64] = {};  // (b is at most 64)
  std::vector<float> own;  // (4-byte elements; bf16 panels use half)
  if (g.packed == nullptr) {
    int64_t most = 0;
    for (int64_t br = br0; br < br1; ++br) most = std::max(most, g.ptr[br + 1] - g.ptr[br]);
    own.resize(static_cast<size_t>(most * b * b));
  }
  for (int64_t chunk = 0; chunk < g.M; chunk += kChunkRows)
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t nkept = g.ptr[br + 1] - g.ptr[br];
    const int64_t* kept = g.idx + g.ptr[br];
    const int64_t panel_stride = nkept * b * kPanel / kPerElem<PE>;
    const PE* panels_br;
    if (g.packed != nullptr) {
      panels_br = static_cast<const PE*>(g.packed) + g.offset[br] / kPerElem<PE>;
    } else {
      pack_block_row(static_cast<const T*>(g.w), g.w_rs, g.w_cs, g.R, g.C, g.ptr, g.idx, b, br, own.data());
      panels_br = reinterpret_cast<const PE*>(own.data());
    }
    // The bias of the block-row's columns in fp32, zero past R. Converted here, not per tile: a masked
    // vector load of a null bias (the compiler's form of `bias ? bias[c] : 0` per tile) took a quarter
    // of the bf16 forward's time (masked loads touching an unmapped page are a microcode assist).
    if (bias != nullptr) {
      for (int64_t c = 0; c < b; ++c) bias_row[c] = br * b + c < g.R ? to_float(bias[br * b + c]) : 0.f;
    }
    for (int64_t m0 = chunk; m0 < std::min(g.M, chunk + kChunkRows); m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, g.M - m0));
      const AE* a_tile = static_cast<const AE*>(g.a_packed) + (m0 / kRows) * a_cols * kRows;
      for (int64_t p = 0; p < panels; p += Tile::kPanels) {
        const int64_t r0 = br * b + p * kPanel;
        if (r0 >= g.R) break;
        const int np = static_cast<int>(std::min<int64_t>(Tile::kPanels, panels - p));
        const int w = np * kPanel;  // the tile's row stride this call
        const int64_t cols = std::min<int64_t>(w, g.R - r0);
        // The tile starts at the bias (converted once per block-row above).
        for (int i = 0; i < kRows; ++i) std::memcpy(tile + i * w, bias_row + p * kPanel, w * sizeof(float));
        const PE* panel = panels_br + p * panel_stride;
        if (np == 2)
          Tile::template run<Tile::kPanels>(a_tile, kept, nkept, b, g.C, panel, panel_stride, tile);
        else
          Tile::template run<1>(a_tile, kept, nkept, b, g.C, panel, panel_stride, tile);
        store_tile<typename Tile::Vec>(tile, w, rows, cols, out + m0 * g.R + r0, g.R);
      }
    }
  }
}

// One function per level, each compiled for its instruction set.
template <typename T>
void block_mm_rows_scalar(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1) {
  block_mm_rows<TileFor<ScalarVec, T>, T>(g, bias, out, b0, b1);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void block_mm_rows_avx2(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1) {
  block_mm_rows<TileFor<Avx2Vec, T>, T>(g, bias, out, b0, b1);
}
template <typename T>
EFFOPS_AVX512_TARGET void block_mm_rows_avx512(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1) {
  block_mm_rows<TileFor<Avx512Vec, T>, T>(g, bias, out, b0, b1);
}
EFFOPS_AVX512_BF16_TARGET void block_mm_rows_dpbf16(const BlockMmArgs& g, const c10::BFloat16* bias,
                                                    c10::BFloat16* out, int64_t b0, int64_t b1) {
  block_mm_rows<Dpbf16Tile, c10::BFloat16>(g, bias, out, b0, b1);
}
#endif

// dpbf16: T is bf16 and the level has vdpbf16ps (a was packed in pairs for it).
template <typename T>
void block_mm_rows_at_level(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1, bool dpbf16) {
#if EFFOPS_HAVE_X86
  if constexpr (kBf16Pairs<T>) {
    if (dpbf16) return block_mm_rows_dpbf16(g, bias, out, b0, b1);
  }
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return block_mm_rows_avx512<T>(g, bias, out, b0, b1);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return block_mm_rows_avx2<T>(g, bias, out, b0, b1);
#endif
  block_mm_rows_scalar<T>(g, bias, out, b0, b1);
}

// Packed operands of the sampled weight gradient (layouts in the file comment).
struct BlockGwArgs {
  int64_t M, N, K, block, groups;  // groups: 6-row groups per block-row, ceil(block / 6)
  const int64_t* ptr;
  const int64_t* idx;
  const float* gy_packed;
  const float* x_packed;
};

// Sampled gradient for the kept blocks of block-rows br0..br1: gw[n, k] = sum_m gy[m, n] x[m, k].
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void block_gw_rows(const BlockGwArgs& g, T* gw, int64_t br0, int64_t br1) {
  const int64_t b = g.block, panels = b / kPanel;
  // One 6 x 16 tile per (row group, column panel) of a block, carried across the m chunks.
  std::vector<float> tiles(static_cast<size_t>(g.groups * panels * kRows * kPanel));
  for (int64_t br = br0; br < br1; ++br) {
    const float* gy_br = g.gy_packed + br * g.groups * g.M * kRows;
    for (int64_t j = g.ptr[br]; j < g.ptr[br + 1]; ++j) {
      const float* x_bc = g.x_packed + g.idx[j] * g.M * b;
      std::fill(tiles.begin(), tiles.end(), 0.f);
      for (int64_t m0 = 0; m0 < g.M; m0 += kChunkRows) {
        const int64_t mc = std::min(kChunkRows, g.M - m0);
        for (int64_t t = 0; t < g.groups; ++t)
          for (int64_t p = 0; p < panels; ++p)
            micro<Vec, kRows>(gy_br + (t * g.M + m0) * kRows, int64_t{1}, int64_t{kRows}, x_bc + m0 * b + p * kPanel,
                              b, mc, tiles.data() + (t * panels + p) * kRows * kPanel);
      }
      const int64_t n0 = br * b, k0 = g.idx[j] * b;
      for (int64_t t = 0; t < g.groups; ++t)
        for (int i = 0; i < kRows; ++i) {
          const int64_t n = n0 + t * kRows + i;
          if (t * kRows + i >= b || n >= g.N) break;
          for (int64_t p = 0; p < panels; ++p) {
            const float* tile = tiles.data() + (t * panels + p) * kRows * kPanel + i * kPanel;
            const int64_t cols = std::min<int64_t>(kPanel, g.K - (k0 + p * kPanel));
            for (int64_t c = 0; c < cols; ++c) gw[n * g.K + k0 + p * kPanel + c] = from_float<T>(tile[c]);
          }
        }
    }
  }
}

template <typename T>
void block_gw_rows_scalar(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
  block_gw_rows<ScalarVec, T>(g, gw, b0, b1);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void block_gw_rows_avx2(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
  block_gw_rows<Avx2Vec, T>(g, gw, b0, b1);
}
template <typename T>
EFFOPS_AVX512_TARGET void block_gw_rows_avx512(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
  block_gw_rows<Avx512Vec, T>(g, gw, b0, b1);
}
#endif

template <typename T>
void block_gw_rows_at_level(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
#if EFFOPS_HAVE_X86
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return block_gw_rows_avx512<T>(g, gw, b0, b1);
  if (cpu_isa_at_least(CpuIsa::kAvx2)) return block_gw_rows_avx2<T>(g, gw, b0, b1);
#endif
  block_gw_rows_scalar<T>(g, gw, b0, b1);
}

// Pack block-row br of W' into dst (layout in the file comment). For the transposed product (w_rs == 1)
// one weight row (a column c of W') at a time within each block, so reads are contiguous runs (walking
// the other way costs a TLB miss per element); for the forward product (w_cs == 1) panel by panel (below).
template <typename T>
void pack_block_row(const T* w, int64_t w_rs, int64_t w_cs, int64_t R, int64_t C, const int64_t* ptr,
                    const int64_t* idx, int64_t b, int64_t br, void* dst_row) {
  const int64_t nkept = ptr[br + 1] - ptr[br];
  const int64_t* kept = idx + ptr[br];
  // Where weight (k, rr) of kept block j goes: fp32 k-major rows of 16, or bf16 pairs (file comment).
  using Out = std::conditional_t<kBf16Pairs<T>, c10::BFloat16, float>;
  Out* dst = static_cast<Out*>(dst_row);
  auto at = [&](int64_t j, int64_t rr, int64_t k) -> Out& {
    Out* block = dst + ((rr / kPanel) * nkept + j) * b * kPanel;
    if constexpr (kBf16Pairs<T>) return block[(k / 2) * 2 * kPanel + (rr % kPanel) * 2 + k % 2];
    else return block[k * kPanel + rr % kPanel];
  };
  auto value = [](T v) { return kBf16Pairs<T> ? Out(v) : Out(to_float(v)); };
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    if (w_cs == 1) continue;  // handled row by row below
    for (int64_t k = 0; k < b; ++k) {
      const int64_t c = c0 + k;
      for (int64_t rr = 0; rr < b; ++rr) {
        const int64_t r = br * b + rr;
        at(j, rr, k) = (r < R && c < C) ? value(w[r * w_rs + c * w_cs]) : Out(0.f);
      }
    }
  }
  if (w_cs != 1) return;
  // Panel by panel, the output written in order: for each k, the 16 rows of the panel (their b-wide
  // runs of W stay in L1 across the k loop). Writing in the order W is read instead scattered every
  // value to its own cache line of the panel (a third of a training step's packing time).
  // Each block's rows are b separate runs of W (R x C, mostly not in cache): their loads are started two
  // blocks ahead, so the misses overlap instead of each packing step waiting for its own (a few % of a
  // bf16 call that packs per block-row).
  constexpr int64_t kAhead = 2;
  auto prefetch_block = [&](int64_t j) {
    if (j >= nkept) return;
    for (int64_t rr = 0; rr < b && br * b + rr < R; ++rr)
      __builtin_prefetch(w + (br * b + rr) * w_rs + kept[j] * b);
  };
  for (int64_t j = 0; j < kAhead; ++j) prefetch_block(j);
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    const int64_t kc = std::min(b, C - c0);
    prefetch_block(j + kAhead);
    for (int64_t p = 0; p < b / kPanel; ++p) {
      const T* rows[kPanel];
      for (int64_t i = 0; i < kPanel; ++i) {
        const int64_t r = br * b + p * kPanel + i;
        rows[i] = r < R ? w + r * w_rs + c0 : nullptr;
      }
      Out* block = dst + (p * nkept + j) * b * kPanel;
      const bool full = kc == b && br * b + (p + 1) * kPanel <= R;
      if (full) {
        // No edge inside: plain copies. bf16: a word of two k of one row is a word of the panel (a 16 x
        // b/2 transpose of 32-bit words), where the general loop below moved and tested 16-bit values
        // one by one (its cost was most of a bf16 call's packing).
        if constexpr (kBf16Pairs<T>) {
          uint32_t* o = reinterpret_cast<uint32_t*>(block);
          for (int64_t q = 0; q < b / 2; ++q)
            for (int64_t i = 0; i < kPanel; ++i) std::memcpy(o + q * kPanel + i, rows[i] + 2 * q, 4);
        } else {
          for (int64_t k = 0; k < b; ++k)
            for (int64_t i = 0; i < kPanel; ++i) block[k * kPanel + i] = value(rows[i][k]);
        }
        continue;
      }
      if constexpr (kBf16Pairs<T>) {
        for (int64_t k2 = 0; k2 < b; k2 += 2)
          for (int64_t i = 0; i < kPanel; ++i) {
            Out* out = block + k2 * kPanel + i * 2;
            out[0] = rows[i] && k2 < kc ? value(rows[i][k2]) : Out(0.f);
            out[1] = rows[i] && k2 + 1 < kc ? value(rows[i][k2 + 1]) : Out(0.f);
          }
      } else {
        for (int64_t k = 0; k < b; ++k)
          for (int64_t i = 0; i < kPanel; ++i)
            block[k * kPanel + i] = rows[i] && k < kc ? value(rows[i][k]) : Out(0.f);
      }
    }
  }
}

// Grain for parallel_for over block-rows: about 4 ranges per thread evens out unequal rows.
int64_t block_row_grain(int64_t nbr) {
  return std::max<int64_t>(1, nbr / (4 * std::max(1, at::get_num_threads())));
}

}  // namespace

template <typename T>
void block_sparse_pack(const T* w, int64_t w_rs, int64_t w_cs, int64_t R, int64_t C, const int64_t* ptr,
                       const int64_t* idx, int64_t block, void* packed) {
  const int64_t b = block, nbr = (R + b - 1) / b;
  using Out = std::conditional_t<kBf16Pairs<T>, c10::BFloat16, float>;
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    for (int64_t br = br0; br < br1; ++br)
      pack_block_row(w, w_rs, w_cs, R, C, ptr, idx, b, br, static_cast<Out*>(packed) + ptr[br] * b * b);
  });
}

// a regrouped into 6-row tiles for block_mm_rows: a_packed[(tile * cols + c) * 6 + i] = a[tile * 6 + i, c]
// (zero past M), in fp32, or (pairs, bf16 only) as bf16 pairs: c a pair of columns, zero past C.
template <typename T>
void pack_a_tiles(const T* a, int64_t M, int64_t C, bool pairs, void* a_packed) {
  const int64_t mtiles = (M + kRows - 1) / kRows;
  at::parallel_for(0, mtiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int i = 0; i < kRows; ++i) {
        const int64_t m = t * kRows + i;
        const T* src = a + m * C;
        if constexpr (kBf16Pairs<T>) {
          if (pairs) {
            const int64_t npairs = (C + 1) / 2;
            uint32_t* dst = static_cast<uint32_t*>(a_packed) + t * npairs * kRows;
            int64_t q = 0;
            if (m < M)  // whole pairs of a row are words of a: copied as such
              for (; q < C / 2; ++q) std::memcpy(dst + q * kRows + i, src + 2 * q, 4);
            for (; q < npairs; ++q) {
              const uint32_t lo = m < M ? src[2 * q].x : 0;
              const uint32_t hi = (m < M && 2 * q + 1 < C) ? src[2 * q + 1].x : 0;
              dst[q * kRows + i] = lo | (hi << 16);
            }
            continue;
          }
        }
        float* dst = static_cast<float*>(a_packed) + t * C * kRows;
        for (int64_t c = 0; c < C; ++c) dst[c * kRows + i] = m < M ? to_float(src[c]) : 0.f;
      }
  });
}

template <typename T>
void block_sparse_mm(const T* a, int64_t M, int64_t C, int64_t R, const T* bias, const int64_t* ptr,
                     const int64_t* idx, int64_t block, const void* packed, const T* w, int64_t w_rs, int64_t w_cs,
                     T* out) {
  const int64_t b = block, nbr = (R + b - 1) / b;
  // Several chunks of rows would pack each block-row once per chunk: pack all of W' once ahead instead
  // (the kernels' own buffer: O(kept weights), made and dropped in this call).
  std::unique_ptr<float[]> packed_here;
  if (packed == nullptr && M > kChunkRows) {
    packed_here.reset(new float[static_cast<size_t>(ptr[nbr] * b * b)]);  // (bf16 panels use half)
    block_sparse_pack(w, w_rs, w_cs, R, C, ptr, idx, block, packed_here.get());
    packed = packed_here.get();
  }
  std::vector<int64_t> offset(nbr + 1);
  for (int64_t br = 0; br <= nbr; ++br) offset[br] = ptr[br] * b * b;
  // a in 6-row tiles: every block-row reads the tiles' kept columns, so converting and regrouping once
  // makes each k step's 6 broadcasts one cache line instead of 6 rows 4*C bytes apart.
  // The buffer is reused across calls (grow-only, per calling thread): a fresh multi-MB allocation
  // per call costs more in page faults than the packing itself.
  // Buffers above 64 MB are not kept (a one-off huge batch should not pin its memory).
  const int64_t mtiles = (M + kRows - 1) / kRows;
  const bool dpbf16 = kBf16Pairs<T> && cpu_isa_at_least(CpuIsa::kAvx512Bf16);  // a in pairs too
  const int64_t a_cols = dpbf16 ? (C + 1) / 2 : C;  // 4-byte elements per tile row
  const size_t a_size = static_cast<size_t>(mtiles * a_cols * kRows);
  constexpr size_t kKeepLimit = size_t{16} << 20;  // 4-byte elements
  thread_local std::vector<float> a_storage;
  std::unique_ptr<float[]> a_once;
  float* a_packed;
  if (a_size <= kKeepLimit) {
    if (a_storage.size() < a_size) a_storage.resize(a_size);
    a_packed = a_storage.data();  // worker threads see this pointer, not their own thread_local
  } else {
    a_once.reset(new float[a_size]);
    a_packed = a_once.get();
  }
  pack_a_tiles(a, M, C, dpbf16, a_packed);
  const BlockMmArgs g{M, C, R, b, ptr, idx, packed, offset.data(), w, w_rs, w_cs, a_packed};
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    block_mm_rows_at_level<T>(g, bias, out, br0, br1, dpbf16);
  });
}

template <typename T>
void block_sparse_grad_weight(const T* gy, const T* x, int64_t M, int64_t N, int64_t K, const int64_t* ptr,
                              const int64_t* idx, int64_t block, T* gw) {
  const int64_t b = block, nbr = (N + b - 1) / b, nbc = (K + b - 1) / b, groups = (b + kRows - 1) / kRows;
  // Uninitialised: every element is written by the packing below (zeros past N, K and the block).
  std::unique_ptr<float[]> gy_packed(new float[static_cast<size_t>(nbr * groups * M * kRows)]);
  std::unique_ptr<float[]> x_packed(new float[static_cast<size_t>(nbc * M * b)]);
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    for (int64_t br = br0; br < br1; ++br)
      for (int64_t t = 0; t < groups; ++t) {
        float* dst = gy_packed.get() + (br * groups + t) * M * kRows;
        for (int64_t m = 0; m < M; ++m)
          for (int i = 0; i < kRows; ++i) {
            const int64_t r = t * kRows + i, n = br * b + r;
            dst[m * kRows + i] = (r < b && n < N) ? to_float(gy[m * N + n]) : 0.f;
          }
      }
  });
  at::parallel_for(0, nbc, block_row_grain(nbc), [&](int64_t bc0, int64_t bc1) {
    for (int64_t bc = bc0; bc < bc1; ++bc) {
      float* dst = x_packed.get() + bc * M * b;
      const int64_t cols = std::min(b, K - bc * b);
      for (int64_t m = 0; m < M; ++m) {
        const T* src = x + m * K + bc * b;
        for (int64_t c = 0; c < cols; ++c) dst[m * b + c] = to_float(src[c]);
        for (int64_t c = cols; c < b; ++c) dst[m * b + c] = 0.f;
      }
    }
  });
  const BlockGwArgs g{M, N, K, b, groups, ptr, idx, gy_packed.get(), x_packed.get()};
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    block_gw_rows_at_level<T>(g, gw, br0, br1);
  });
}

#define EFFOPS_INSTANTIATE(T)                                                                               \
  template void block_sparse_pack<T>(const T*, int64_t, int64_t, int64_t, int64_t, const int64_t*,          \
                                     const int64_t*, int64_t, void*);                                       \
  template void block_sparse_mm<T>(const T*, int64_t, int64_t, int64_t, const T*, const int64_t*,           \
                                   const int64_t*, int64_t, const void*, const T*, int64_t, int64_t, T*);   \
  template void block_sparse_grad_weight<T>(const T*, const T*, int64_t, int64_t, int64_t, const int64_t*,  \
                                            const int64_t*, int64_t, T*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE

const char* masked_linear_body() {
  switch (cpu_isa()) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2 (fp32 FMA, 256-bit)";
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Vnni: return "avx512 (fp32 FMA, 512-bit)";
    default: return "avx512_bf16 (bf16 block and CSR products by vdpbf16ps; fp32 FMA, 512-bit, otherwise)";
  }
}

}  // namespace effops::cpu
