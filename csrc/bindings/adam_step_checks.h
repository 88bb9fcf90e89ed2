// Argument checks shared by the CPU and CUDA torch glue of adam_step (csrc/bindings/adam_step.cpp,
// csrc/bindings/cuda/adam_step.cpp). Both check everything before writing anything, so a failed call
// leaves every tensor untouched.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace effops::adam_glue {

// The kernels' dtype code for params[i] (both backends number fp32/bf16/fp16 as 0/1/2).
template <typename Dtype>
Dtype param_dtype(const at::Tensor& t, int64_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default: TORCH_CHECK(false, "adam_step: params[", i, "] must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Same element order in memory for two dense tensors of one shape: equal strides wherever a dimension
// has more than one element (a size-1 dimension's stride is arbitrary: a channels_last conv weight
// of shape (C, 1, k, k) and its gradient from autograd can differ there and still match).
inline bool same_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// A tensor the kernel may walk as `numel` contiguous elements in the param's element order
// (the device is checked by the caller, which knows its backend).
inline void check_layout_like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* name,
                              int64_t i) {
  TORCH_CHECK(t.scalar_type() == dtype, "adam_step: ", name, "[", i, "] must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), "adam_step: ", name, "[", i, "] must have the param's shape");
  TORCH_CHECK(t.numel() == 0 || (t.is_non_overlapping_and_dense() && same_order(t, param)),
              "adam_step: ", name, "[", i, "] must be dense in the param's element order");
}

// Every per-param list has one entry per param (max_exp_avg_sqs only when amsgrad).
inline void check_list_sizes(int64_t n, size_t grads, size_t exp_avgs, size_t exp_avg_sqs, size_t masters,
                             size_t step_sizes, size_t bias_corrections, bool amsgrad, size_t max_exp_avg_sqs) {
  TORCH_CHECK(static_cast<int64_t>(grads) == n && static_cast<int64_t>(exp_avgs) == n &&
                  static_cast<int64_t>(exp_avg_sqs) == n && static_cast<int64_t>(masters) == n &&
                  static_cast<int64_t>(step_sizes) == n && static_cast<int64_t>(bias_corrections) == n,
              "adam_step: every list must have one entry per param (", n, ")");
  TORCH_CHECK(!amsgrad || static_cast<int64_t>(max_exp_avg_sqs) == n,
              "adam_step: amsgrad needs one max_exp_avg_sq per param");
}

}  // namespace effops::adam_glue
