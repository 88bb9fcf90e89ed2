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

// A squeeze-excitation block between the depthwise conv and the project conv (MobileNetV3, EfficientNet):
//   g = gate(conv1x1(act(conv1x1(mean_hw(d), reduce_w, reduce_b)), expand_w, expand_b)),  d = d * g
// Its weights as nn.Conv2d's: reduce_w (squeeze, Ch, 1, 1), expand_w (Ch, squeeze, 1, 1).
enum Gate : int { kSigmoid = 0, kHardsigmoid = 1 };
struct Se {
  bool on = false;
  OptTensor reduce_w, reduce_b, expand_w, expand_b;
  int act = 0, gate = kSigmoid;
};

// The squeeze-excitation arguments checked against x and the block's shape (absent: Se{}.on false).
Se checked_se(const at::Tensor& x, const ir::Shape& s, const OptTensor& reduce_w, const OptTensor& reduce_b,
              const OptTensor& expand_w, const OptTensor& expand_b, c10::string_view act, c10::string_view gate);

// The gate's intermediates for pooled (N, Ch, 1, 1), in pooled's dtype (the backward needs them all).
struct SeGate {
  at::Tensor z1, a1, z2, g;  // reduce conv, its activation, expand conv, the gate
};
SeGate se_gate(const Se& se, const at::Tensor& pooled);

// The block through ATen's ops (oneDNN convolutions, each tensor in memory): the plain route. Called
// above autograd, torch records its graph (the training route where training_aten_faster says so).
at::Tensor aten_route(const ir::Shape& s, const at::Tensor& x, const OptTensor& expand_weight,
                      const OptTensor& expand_bias, const at::Tensor& dw_weight, const OptTensor& dw_bias,
                      const at::Tensor& project_weight, const OptTensor& project_bias, const Se& se);

// Why torch's own ops with saved activations train this block faster than our forward and backward, or
// nullptr (the speed policy of a training step on CPU). fused_backward: the fused backward takes the block;
// se: it has squeeze-excitation.
const char* training_aten_faster(const ir::Shape& s, at::ScalarType dtype, bool fused_backward, bool se);

// f(T{}) with T the storage type of `dtype`: float, bf16 or fp16 (the dtypes checked_shape accepts).
template <class F>
void with_storage_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) f(float{});
  else if (dtype == at::kBFloat16) f(c10::BFloat16{});
  else f(c10::Half{});
}

// channels_last when x is laid out that way (and not also plainly contiguous), else contiguous.
at::MemoryFormat format_of(const at::Tensor& x);

// The weights packed as the CPU kernel reads them (csrc/cpu/inverted_residual.h's layout, fp32), and one
// [R, K(, 1, 1)] weight as a gemm B operand ([padded(R) / 16][K][16], zero past R) written at dst.
at::Tensor pack(const ir::Shape& s, const OptTensor& expand_weight, const OptTensor& expand_bias,
                const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                const OptTensor& project_bias);
void pack_panels(const at::Tensor& w, float* dst);

// activation(h) through ATen, with effops' values at +-inf (effops/reference/dwpw_conv2d.py, _AT_INFINITY).
at::Tensor activate(const at::Tensor& h, int act);

}  // namespace effops::bindings::inverted_residual
