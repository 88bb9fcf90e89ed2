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
// block_sparse_grad_weight: for each kept block (owned by its block-row's thread), tiles of 6 weight
// rows x 16 weight columns, reduction over the M rows of gy and x: gy[m, n..n+5] are 6 adjacent
// scalars, x[m, k..k+15] two vectors.
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
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t nkept = g.ptr[br + 1] - g.ptr[br];
    const int64_t* kept = g.idx + g.ptr[br];
    for (int64_t m0 = 0; m0 < g.M; m0 += kRows) {
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

// Sampled gradient for the kept blocks of block-rows br0..br1.
template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void block_gw_rows(const T* gy, const T* x, int64_t M, int64_t N, int64_t K,
                                        const int64_t* ptr, const int64_t* idx, int64_t b, T* gw,
                                        int64_t br0, int64_t br1) {
  alignas(32) float tile[kRows * kPanel];
  for (int64_t br = br0; br < br1; ++br) {
    for (int64_t j = ptr[br]; j < ptr[br + 1]; ++j) {
      const int64_t k_begin = idx[j] * b, k_end = std::min(K, k_begin + b);
      const int64_t n_end = std::min(N, br * b + b);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kPanel) {
        const int64_t cols = std::min<int64_t>(kPanel, k_end - k0);
        for (int64_t n0 = br * b; n0 < n_end; n0 += kRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kRows, n_end - n0));
          std::fill(tile, tile + kRows * kPanel, 0.f);
          if (cols == kPanel) {
            // a(i, m) = gy[m, n0 + i]; b(m, :) = x[m, k0 .. k0 + 16)
            micro_dispatch<Vec>(rows, gy + n0, int64_t{1}, N, x + k0, K, M, tile);
          } else {
            // The last, partial panel of the matrix: a vector load would run past x's rows.
            for (int64_t m = 0; m < M; ++m)
              for (int i = 0; i < rows; ++i) {
                const float g = to_float(gy[m * N + n0 + i]);
                for (int64_t c = 0; c < cols; ++c) tile[i * kPanel + c] += g * to_float(x[m * K + k0 + c]);
              }
          }
          for (int i = 0; i < rows; ++i)
            for (int64_t c = 0; c < cols; ++c) gw[(n0 + i) * K + k0 + c] = from_float<T>(tile[i * kPanel + c]);
        }
      }
    }
  }
}

template <typename T>
EFFOPS_AVX2_TARGET void block_gw_rows_avx2(const T* gy, const T* x, int64_t M, int64_t N, int64_t K,
                                           const int64_t* ptr, const int64_t* idx, int64_t b, T* gw, int64_t b0,
                                           int64_t b1) {
#if EFFOPS_HAVE_X86
  block_gw_rows<Avx2Vec, T>(gy, x, M, N, K, ptr, idx, b, gw, b0, b1);
#endif
}

template <typename T>
void block_gw_rows_scalar(const T* gy, const T* x, int64_t M, int64_t N, int64_t K, const int64_t* ptr,
                          const int64_t* idx, int64_t b, T* gw, int64_t b0, int64_t b1) {
  block_gw_rows<ScalarVec, T>(gy, x, M, N, K, ptr, idx, b, gw, b0, b1);
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
  const int64_t nbr = (N + block - 1) / block;
  const bool avx2 = EFFOPS_HAVE_X86 && has_avx2_fma();
  at::parallel_for(0, nbr, block_row_grain(nbr), [&](int64_t br0, int64_t br1) {
    if (avx2)
      block_gw_rows_avx2<T>(gy, x, M, N, K, ptr, idx, block, gw, br0, br1);
    else
      block_gw_rows_scalar<T>(gy, x, M, N, K, ptr, idx, block, gw, br0, br1);
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

}  // namespace effops::cpu
