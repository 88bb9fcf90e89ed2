// Block-sparse masked matmul on CPU: forward / grad_x (block_sparse_mm) and the sampled weight
// gradient (block_sparse_grad_weight). See masked_linear.h for the contract.
//
// block_sparse_pack: the kept blocks of W' as fp32 panels of 16 output columns, k-major:
//   packed[br][panel p][kept block j][k][16]  (zero-padded past R and C), so the micro-kernel reads
//   two contiguous AVX2 vectors per k. O(kept weights); converts bf16/fp16 weights once. The Python
//   side caches it per (weight version, mask version), so inference packs once.
// block_sparse_mm: regroup a into 6-row fp32 tiles, then one thread per block-row range; for each
//   6-row tile, for each panel, walk the kept blocks and accumulate a 6 x 16 tile in 12 vector
//   registers (broadcast a[i, k], FMA with the panel row).
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
#include <memory>
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
  const float* packed;   // W' panels, see the file comment
  const int64_t* offset; // packed offset of each block-row
  const float* a_packed; // a in 6-row tiles: a_packed[(tile * C + c) * 6 + i] = a[tile * 6 + i, c], zero-padded
};

// One block-row range of the product: out[:, rows of br0..br1).
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void block_mm_rows(const BlockMmArgs& g, const T* bias, T* out, int64_t br0, int64_t br1) {
  const int64_t b = g.block, panels = b / kPanel;
  alignas(32) float tile[kRows * kPanel];
  for (int64_t chunk = 0; chunk < g.M; chunk += kChunkRows)
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t nkept = g.ptr[br + 1] - g.ptr[br];
    const int64_t* kept = g.idx + g.ptr[br];
    for (int64_t m0 = chunk; m0 < std::min(g.M, chunk + kChunkRows); m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, g.M - m0));
      const float* a_tile = g.a_packed + (m0 / kRows) * g.C * kRows;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t r0 = br * b + p * kPanel;
        if (r0 >= g.R) break;
        const int64_t cols = std::min<int64_t>(kPanel, g.R - r0);
        for (int i = 0; i < kRows; ++i)
          for (int64_t c = 0; c < kPanel; ++c)
            tile[i * kPanel + c] = (bias != nullptr && c < cols) ? to_float(bias[r0 + c]) : 0.f;
        const float* panel = g.packed + g.offset[br] + p * nkept * b * kPanel;
        micro_blocks<Vec>(a_tile, kept, nkept, b, g.C, panel, tile);
        for (int i = 0; i < rows; ++i)
          for (int64_t c = 0; c < cols; ++c) out[(m0 + i) * g.R + r0 + c] = from_float<T>(tile[i * kPanel + c]);
      }
    }
  }
}

template <typename T>
EFFOPS_AVX2_TARGET void block_mm_rows_avx2(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1) {
#if EFFOPS_HAVE_X86
  block_mm_rows<Avx2Vec, T>(g, bias, out, b0, b1);
#endif
}

template <typename T>
void block_mm_rows_scalar(const BlockMmArgs& g, const T* bias, T* out, int64_t b0, int64_t b1) {
  block_mm_rows<ScalarVec, T>(g, bias, out, b0, b1);
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
EFFOPS_AVX2_TARGET void block_gw_rows_avx2(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
#if EFFOPS_HAVE_X86
  block_gw_rows<Avx2Vec, T>(g, gw, b0, b1);
#endif
}

template <typename T>
void block_gw_rows_scalar(const BlockGwArgs& g, T* gw, int64_t b0, int64_t b1) {
  block_gw_rows<ScalarVec, T>(g, gw, b0, b1);
}

// Pack block-row br of W' into dst (layout in the file comment). The loop order follows W's memory:
// for the forward product (w_cs == 1) one weight row at a time across its kept blocks; for the
// transposed product (w_rs == 1) one weight row (a column c of W') at a time within each block, so
// reads are always contiguous runs (walking the other way costs a TLB miss per element).
template <typename T>
void pack_block_row(const T* w, int64_t w_rs, int64_t w_cs, int64_t R, int64_t C, const int64_t* ptr,
                    const int64_t* idx, int64_t b, int64_t br, float* dst) {
  const int64_t nkept = ptr[br + 1] - ptr[br];
  const int64_t* kept = idx + ptr[br];
  auto slot = [&](int64_t j, int64_t rr) { return dst + ((rr / kPanel) * nkept + j) * b * kPanel + rr % kPanel; };
  for (int64_t j = 0; j < nkept; ++j) {
    const int64_t c0 = kept[j] * b;
    if (w_cs == 1) continue;  // handled row by row below
    for (int64_t k = 0; k < b; ++k) {
      const int64_t c = c0 + k;
      for (int64_t rr = 0; rr < b; ++rr) {
        const int64_t r = br * b + rr;
        slot(j, rr)[k * kPanel] = (r < R && c < C) ? to_float(w[r * w_rs + c * w_cs]) : 0.f;
      }
    }
  }
  if (w_cs != 1) return;
  for (int64_t rr = 0; rr < b; ++rr) {
    const int64_t r = br * b + rr;
    for (int64_t j = 0; j < nkept; ++j) {
      const int64_t c0 = kept[j] * b;
      float* out = slot(j, rr);
      const T* src = w + r * w_rs + c0;
      const int64_t kc = (r < R) ? std::min(b, C - c0) : 0;
      for (int64_t k = 0; k < kc; ++k) out[k * kPanel] = to_float(src[k]);
      for (int64_t k = kc; k < b; ++k) out[k * kPanel] = 0.f;
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
                       const int64_t* idx, int64_t block, float* packed) {
  const int64_t b = block, nbr = (R + b - 1) / b;
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    for (int64_t br = br0; br < br1; ++br) pack_block_row(w, w_rs, w_cs, R, C, ptr, idx, b, br, packed + ptr[br] * b * b);
  });
}

template <typename T>
void block_sparse_mm(const T* a, int64_t M, int64_t C, int64_t R, const T* bias, const int64_t* ptr,
                     const int64_t* idx, int64_t block, const float* packed, T* out) {
  const int64_t b = block, nbr = (R + b - 1) / b;
  std::vector<int64_t> offset(nbr + 1);
  for (int64_t br = 0; br <= nbr; ++br) offset[br] = ptr[br] * b * b;
  // a in 6-row tiles, fp32: every block-row reads the tiles' kept columns, so converting and
  // regrouping once makes each k step's 6 broadcasts one cache line instead of 6 rows 4*C bytes apart.
  // The buffer is reused across calls (grow-only, per calling thread): a fresh multi-MB allocation
  // per call costs more in page faults than the packing itself.
  // Buffers above 64 MB are not kept (a one-off huge batch should not pin its memory).
  const int64_t mtiles = (M + kRows - 1) / kRows;
  const size_t a_size = static_cast<size_t>(mtiles * C * kRows);
  constexpr size_t kKeepLimit = size_t{16} << 20;  // floats
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
  at::parallel_for(0, mtiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dst = a_packed + t * C * kRows;
      for (int i = 0; i < kRows; ++i) {
        const int64_t m = t * kRows + i;
        if (m < M) {
          const T* src = a + m * C;
          for (int64_t c = 0; c < C; ++c) dst[c * kRows + i] = to_float(src[c]);
        } else {
          for (int64_t c = 0; c < C; ++c) dst[c * kRows + i] = 0.f;
        }
      }
    }
  });
  const BlockMmArgs g{M, C, R, b, ptr, idx, packed, offset.data(), a_packed};
  const bool avx2 = EFFOPS_HAVE_X86 && has_avx2_fma();
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    if (avx2)
      block_mm_rows_avx2<T>(g, bias, out, br0, br1);
    else
      block_mm_rows_scalar<T>(g, bias, out, br0, br1);
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
  const bool avx2 = EFFOPS_HAVE_X86 && has_avx2_fma();
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    if (avx2)
      block_gw_rows_avx2<T>(g, gw, br0, br1);
    else
      block_gw_rows_scalar<T>(g, gw, br0, br1);
  });
}

#define EFFOPS_INSTANTIATE(T)                                                                               \
  template void block_sparse_pack<T>(const T*, int64_t, int64_t, int64_t, int64_t, const int64_t*,          \
                                     const int64_t*, int64_t, float*);                                      \
  template void block_sparse_mm<T>(const T*, int64_t, int64_t, int64_t, const T*, const int64_t*,           \
                                   const int64_t*, int64_t, const float*, T*);                              \
  template void block_sparse_grad_weight<T>(const T*, const T*, int64_t, int64_t, int64_t, const int64_t*,  \
                                            const int64_t*, int64_t, T*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE

const char* masked_linear_body() {
  return has_avx2_fma() ? "avx2 (fp32 FMA, 256-bit; bf16/fp16 computed in fp32)" : "scalar";
}

}  // namespace effops::cpu
