// The CPU dwpw_conv2d kernels as ATen functions (csrc/bindings/dwpw_conv2d.cpp), for the op's CPU route.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace effops::bindings {

// y = pw(act(dw(x))) in x's layout; act: the activation code of csrc/cpu/dwpw_conv2d.h.
at::Tensor dwpw_forward_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                            const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act);

// (grad_x, grad_dw_weight, grad_pw_weight, grad_dw_bias, grad_pw_bias); needs: bit i set = gradient i
// wanted, the others come back as empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwpw_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
    const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t act, int64_t needs);

}  // namespace effops::bindings
