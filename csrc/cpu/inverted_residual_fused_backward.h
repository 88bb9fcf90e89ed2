// The fused backward of an inverted-residual block with expansion and without squeeze-excitation
// (effops::inverted_residual_backward's CPU route for channels-last batches of at least one image per
// thread). Torch-free: raw pointers and sizes.
//
// Like the forward (inverted_residual.h), each task walks one image's output rows in steps of a few
// rows and keeps a ring of the input rows the current step reads, here three per row: e = act(pre_e),
// act'(pre_e) and g_e, the gradient at e; none of the expanded-size tensors reaches memory. Per step:
//   1. expand the new input rows (GEMM, K = Cin) into e and act'(pre_e); zero their g_e
//   2. depthwise: d and act'(pre_d) of the step's output pixels
//   3. g_project_w += d^T g_y, g_project_b += sum g_y; g_pre_d = (g_y @ project_w) * act'(pre_d)   (GEMM, K = Cout)
//   4. depthwise backward: g_dw += g_pre_d * e at each tap, g_db += g_pre_d, g_e += g_pre_d * w (transposed)
//   5. the input rows no later step reads are complete: g_pre_e = g_e * act'(pre_e);
//      g_expand_w += x^T g_pre_e, g_expand_b += sum g_pre_e; g_x = g_pre_e @ expand_w (+ g_y: residual)
// Weight gradients sum per thread (fp32) and then over threads in a fixed order.
#pragma once

#include <cstdint>

#include "cpu/inverted_residual.h"

namespace effops::cpu::ir {

// The block's weights as torch holds them, fp32 contiguous: expand_w [Ch][Cin], expand_b [Ch] or nullptr,
// dw_w [Ch][KH * KW], dw_b [Ch] or nullptr, project_w [Cout][Ch].
struct BackwardWeights {
  const float *expand_w, *expand_b, *dw_w, *dw_b, *project_w;
};

// The weights' gradients, fp32, overwritten, in the weights' layouts (expand_b [Ch], dw_b [Ch],
// project_b [Cout]).
struct WeightGrads {
  float *expand_w, *expand_b, *dw_w, *dw_b, *project_w, *project_b;
};

// s.expand must hold (a block without expansion has no expanded tensor to keep out of memory). x, g_y,
// g_x: channels-last [N][H][W][Cin], [N][OH][OW][Cout], [N][H][W][Cin]; T = float, bf16 or fp16.
template <typename T>
void fused_backward(const Shape& s, const T* x, const T* g_y, const BackwardWeights& w, T* g_x, const WeightGrads& g);

}  // namespace effops::cpu::ir
