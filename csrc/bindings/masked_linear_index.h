// The index of a masked_linear mask: what the sparse kernels walk and what the policy reads. Built from
// the mask on every call of the functional op (one scan for the summary, one more per list the chosen
// kernel walks), or once by a module at its named points (effops::masked_linear_index).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace effops::masked {

struct Index {
  int64_t block = 0;  // b in 64, 32, 16 when the mask is constant over b x b blocks (edge blocks partial), else 0
  int64_t nnz = 0;    // kept weights
  int64_t numel = 0;
  at::Tensor kept_blocks;          // [ceil(N/b), ceil(K/b)] bool when block: which blocks are kept
  at::Tensor rows_ptr, rows_idx;   // W's rows: block-CSR per block-row (block), CSR per row (else)
  at::Tensor cols_ptr, cols_idx;   // the same of W^T (grad_x's product)
  double density() const { return numel ? static_cast<double>(nnz) / static_cast<double>(numel) : 1.0; }
  bool has_rows() const { return rows_ptr.defined() && rows_ptr.numel() > 0; }
  bool has_cols() const { return cols_ptr.defined() && cols_ptr.numel() > 0; }
};

// block and nnz of a 0/1 mask (bool, or float already checked to hold 0 and 1), on any device.
Index describe(const at::Tensor& mask);
// The lists, built when missing.
void build_rows(Index& index, const at::Tensor& mask);
void build_cols(Index& index, const at::Tensor& mask);

// As the Tensor[] the op takes: [info, rows_ptr, rows_idx, cols_ptr, cols_idx], info int64 [block, nnz]
// on the CPU; a list not built is an empty tensor.
std::vector<at::Tensor> to_list(const Index& index, const at::Tensor& mask);
// From that list, checked against the mask's shape.
Index from_list(at::TensorList list, const at::Tensor& mask);

}  // namespace effops::masked
