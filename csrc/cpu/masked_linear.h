// Sparse masked matmul kernels for effops::masked_linear (torch-free: raw pointers and sizes).
//
// Two storage schemes for the kept weights, both walked through int64 (ptr, idx) arrays built from the
// mask (csrc/bindings/masked_linear_index.cpp, from the scans below):
//  * block: the mask is constant over b x b blocks (b in 16, 32, 64). A block-CSR index lists the
//    kept blocks of each block-row of W' (W for the forward product, W^T for grad_x), so each output
//    tile belongs to one thread and no atomics are needed. grad_weight is computed on kept blocks only.
//  * csr: any mask (unstructured, 2:4). Per-row lists of kept columns; the dense operand is passed
//    transposed and zero-padded (aT[C, Mpad], fp32) so each kept weight drives contiguous FMAs over
//    the batch dimension.
// All accumulation is fp32; T (float, bf16, fp16) is the storage type of x, weight and outputs.
#pragma once

#include <cstdint>

namespace effops::cpu {

// Pack the kept blocks of W'[r, c] = w[r * w_rs + c * w_cs] (R x C; block-row br keeps block-columns
// idx[ptr[br] .. ptr[br+1])) into packed (ptr[nbr] * block * block weights) for block_sparse_mm: fp32
// for fp32 and fp16 weights, bf16 (in pairs of k) for bf16 weights (masked_linear_block.cpp).
template <typename T>
void block_sparse_pack(const T* w, int64_t w_rs, int64_t w_cs, int64_t R, int64_t C, const int64_t* ptr,
                       const int64_t* idx, int64_t block, void* packed);

// out[M, R] = a[M, C] @ W'^T (+ bias[R]) over the kept blocks, W' given packed by block_sparse_pack (by
// the same T), or, with packed null, read from W'[r, c] = w[r * w_rs + c * w_cs] (packed block-row by
// block-row as the kernel reaches it: no weight-sized buffer, and the panels stay in cache).
template <typename T>
void block_sparse_mm(const T* a, int64_t M, int64_t C, int64_t R, const T* bias, const int64_t* ptr,
                     const int64_t* idx, int64_t block, const void* packed, const T* w, int64_t w_rs, int64_t w_cs,
                     T* out);

// gw[N, K] (pre-zeroed) = (gy[M, N]^T @ x[M, K]) on the kept blocks of the block-CSR index only.
template <typename T>
void block_sparse_grad_weight(const T* gy, const T* x, int64_t M, int64_t N, int64_t K,
                              const int64_t* ptr, const int64_t* idx, int64_t block, T* gw);

// A dense operand a[M, C] given transposed for the CSR kernels, fp32, in batch spans:
// spans x [C, width] row-major, span s holding a^T[:, s * width .. (s + 1) * width), rows past M zero.
// width is a multiple of 64 (or M itself when M <= 4, one span). Within a span one column's batch
// values are contiguous and the whole span is one block of memory (C x width floats), so a kernel that
// walks the batch span by span touches few pages (a plain [C, Mpad] layout at 2048 rows put every
// 1 KB slice on its own page: a TLB miss per slice).
// S: float, or uint16_t holding bf16 bits (SpannedBf16, for bf16 inputs at the avx512_bf16 level: the
// values as they are, half the bytes, the operand of vdpbf16ps).
template <typename S>
struct Spanned {
  const S* data;
  int64_t C, spans, width;
  const S* at(int64_t c, int64_t m) const {
    const int64_t s = m / width;
    return data + (s * C + c) * width + (m - s * width);
  }
};
using SpannedT = Spanned<float>;
using SpannedBf16 = Spanned<uint16_t>;

// out[M, R] = a @ W'^T (+ bias) with a given as aT (above). Row r of W' keeps columns
// idx[ptr[r] .. ptr[r+1]), values w[r * w_rs + c * w_cs] (gathered row by row as the kernel reaches
// the row, or all at once ahead when aT has several spans), or vals[j] for the j-th kept weight when
// vals is not null (a compressed copy made ahead: contiguous, so a small batch reads density x the
// weight's bytes instead of most of its cache lines).
// S (the span element) float: any level. S uint16_t (bf16 spans, T bf16, more than 4 rows): the
// vdpbf16ps body, avx512_bf16 level only (csr_bf16_spans_run() says whether it runs here).
template <typename T, typename S>
void csr_sparse_mm(const Spanned<S>& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R, const T* bias,
                   const int64_t* ptr, const int64_t* idx, const T* vals, T* out);
bool csr_bf16_spans_run();

// gw[N, K] (pre-zeroed) at the kept (n, k) of the CSR index: dot(gy[:, n], x[:, k]) over the batch,
// gy and x given as gyT (C = N) and xT (C = K) with the same spans.
template <typename T>
void csr_sparse_grad_weight(const SpannedT& gyT, const SpannedT& xT, int64_t N, int64_t K, const int64_t* ptr,
                            const int64_t* idx, T* gw);

// Mask scans for the index (mask_index.cpp). m: a row-major N x K byte mask.
// counts[ceil(N/b) * ceil(K/b)]: the bytes summed per b x b block (edge blocks partial): kept entries
// of a bool mask (b at most 255).
void mask_block_counts(const uint8_t* m, int64_t N, int64_t K, int64_t b, int64_t* counts);
// CSR of the nonzero bytes: ptr[N + 1] (returns ptr[N]), then idx[ptr[N]] (columns ascending in a row).
int64_t mask_row_counts(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr);
void mask_row_lists(const uint8_t* m, int64_t N, int64_t K, const int64_t* ptr, int64_t* idx);
// The same per column (CSC): ptr[K + 1], idx (rows ascending in a column).
int64_t mask_col_counts(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr);
void mask_col_lists(const uint8_t* m, int64_t N, int64_t K, const int64_t* ptr, int64_t* idx);

// Which body the block and CSR kernels run at the current level (for `python -m effops info`).
const char* masked_linear_body();

}  // namespace effops::cpu
