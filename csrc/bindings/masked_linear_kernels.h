// Tensor-level calls of the CPU masked_linear kernels (masked_linear_kernels.cpp). W' is the weight
// (transpose_w false) or its transpose (true); (ptr, idx) the index of W''s rows: block-CSR of the kept
// blocks for the block kernels, CSR of the kept weights for the CSR kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace effops::masked {

// The kept blocks of W' packed as the block kernel's panels (a module's explicit state, pack_weights).
at::Tensor block_pack(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx, int64_t block,
                      bool transpose_w);
// out[M, R] = a[M, C] @ W'^T (+ bias), W' read from weight (packed in the kernel as it walks the
// block-rows), or from packed (block_pack's panels of this weight) when given.
at::Tensor block_mm(const at::Tensor& a, const at::Tensor& weight, bool transpose_w,
                    const std::optional<at::Tensor>& packed, const std::optional<at::Tensor>& bias,
                    const at::Tensor& ptr, const at::Tensor& idx, int64_t block);
// (gy^T @ x) on the kept blocks, zero elsewhere.
at::Tensor block_grad_weight(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& idx,
                             int64_t block);

// a[M, C] as the CSR kernels' transposed fp32 operand in batch spans (effops::cpu::SpannedT). few_rows_ok:
// up to 4 rows stay one unpadded span (the kernel's per-row path). Operands used together (grad_weight's
// gy^T and x^T) must share spans: pass the larger column count as `columns`. bf16 (a bf16 a, more than 4
// rows, csr_bf16_spans()): the spans in bf16, for csr_mm's vdpbf16ps body.
at::Tensor spanned_t(const at::Tensor& a, bool few_rows_ok, int64_t columns, bool bf16 = false);
// Whether csr_mm takes bf16 spans of a bf16 operand of `rows` rows here (the avx512_bf16 level).
bool csr_bf16_spans(at::ScalarType dtype, int64_t rows);
// out[M, R] = a @ W'^T (+ bias) with a given as spanned_t(a); vals (optional): the kept weights of W' in
// index order, read instead of W' by index (without them the kernel gathers them from W').
at::Tensor csr_mm(const at::Tensor& aT, int64_t M, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w, const std::optional<at::Tensor>& vals);
// (gy^T @ x) at the kept weights, zero elsewhere; gyT and xT from spanned_t with shared spans.
at::Tensor csr_grad_weight(const at::Tensor& gyT, const at::Tensor& xT, const at::Tensor& ptr, const at::Tensor& idx,
                           at::ScalarType dtype);
// The kept weights of W' in index order (contiguous: a small batch reads density x the weight's bytes).
at::Tensor gather_values(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w);

// weight * mask (bool or 0/1 in weight's dtype), as the reference computes it; in_place: into weight.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask, bool in_place);
// Whether a CPU float mask holds only 0 and 1; else the first other value in *found.
bool holds_only_zeros_and_ones(const at::Tensor& mask, double* found);

}  // namespace effops::masked
