// What the inverted_residual forward and backward glue share: the argument checks and the activations
// through ATen (csrc/bindings/inverted_residual.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cpu/inverted_residual.h"

namespace effops::bindings::inverted_residual {

namespace ir = effops::cpu::ir;
using OptTensor = std::optional<at::Tensor>;

bool given(const OptTensor& t);

// Every check of the op's arguments (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE naming the argument), once
// per call; the block's shape.
ir::Shape checked_shape(const at::Tensor& x, const OptTensor& expand_weight, const OptTensor& expand_bias,
                        const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                        const OptTensor& project_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        const std::optional<c10::string_view>& activation, bool residual);

// channels_last when x is laid out that way (and not also plainly contiguous), else contiguous.
at::MemoryFormat format_of(const at::Tensor& x);

// activation(h) through ATen, with effops' values at +-inf (effops/reference/dwpw_conv2d.py, _AT_INFINITY).
at::Tensor activate(const at::Tensor& h, int act);

}  // namespace effops::bindings::inverted_residual
