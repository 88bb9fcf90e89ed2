// The fused backward of an inverted-residual block (effops::inverted_residual_backward's CPU route for
// batches of at least one image per thread). Torch-free: raw pointers and sizes.
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
// Weight gradients sum per thread (fp32) and then over threads in a fixed order. A squeeze-excitation block
// (d * g into the project conv, g from d's means) takes one more pass first (fused_backward_se_sums).
#pragma once

#include <cstdint>

#include "cpu/inverted_residual.h"

namespace effops::cpu::ir {

// The weights as the steps read them: the forward's packed weights (inverted_residual_pack's layout,
// packed_size(s) floats; the project panels and bias unused) and the panels of the two transposed products,
// packed as the forward packs a [R][K] weight for gemm ([padded(R) / 16][K][16], zero past R):
//   expand_t  = pack(expand_w^T)   [padded(Cin) / 16][Ch][16]   g_x = g_pre_e @ expand_w (nullptr without expansion)
//   project_t = pack(project_w^T)  [padded(Ch) / 16][Cout][16]  g_d = g_y @ project_w
struct BackwardWeights {
  const float *packed, *expand_t, *project_t;
};

// The weights' gradients, fp32, overwritten, in the weights' layouts (expand_b [Ch], dw_b [Ch],
// project_b [Cout]; expand_w and expand_b unused without expansion).
struct WeightGrads {
  float *expand_w, *expand_b, *dw_w, *dw_b, *project_w, *project_b;
};

// A squeeze-excitation block's terms, [N][padded(Ch)] fp32 each: the gate g (d * g goes into the project
// conv) and the mean's share of d's gradient (the gradient at d's per-image mean over the output pixels,
// divided by their count).
struct SeTerms {
  const float *gate, *mean_grad;
};

// x, g_y, g_x: channels-last [N][H][W][Cin], [N][OH][OW][Cout], [N][H][W][Cin]; T = float, bf16 or fp16.
// Without expansion (s.expand false) e is x: step 1 copies its rows, step 5 writes g_x = g_e.
// se: nullptr, or the terms of a squeeze-excitation block (from fused_backward_se_sums).
template <typename T>
void fused_backward(const Shape& s, const T* x, const T* g_y, const BackwardWeights& w, T* g_x, const WeightGrads& g,
                    const SeTerms* se = nullptr);

// The first pass of a squeeze-excitation block's backward (steps 1-2 and step 3's GEMM of every image, d
// recomputed as above): means[n][c] = the mean of d over the output pixels, and gate_grad[n][c] = the sum
// over them of d * (g_y @ project_w), the gradient at the gate. Both [N][padded(Ch)], overwritten. The gate
// and the squeeze-excitation's own backward follow from them outside the kernel (small tensors).
template <typename T>
void fused_backward_se_sums(const Shape& s, const T* x, const T* g_y, const BackwardWeights& w, float* means,
                            float* gate_grad);

}  // namespace effops::cpu::ir
