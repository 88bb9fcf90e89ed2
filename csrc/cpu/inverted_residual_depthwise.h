// The depthwise middle of the inverted-residual block's training step (the recomputing backward in
// csrc/bindings/inverted_residual_backward.cpp), between its two 1x1 convolutions, which stay oneDNN
// GEMMs. Torch-free: raw pointers and sizes. Channels-last tensors ([N][H][W][C]); T = float, bf16 or
// fp16 storage, fp32 arithmetic.
//
//   forward:   d = act(depthwise(e) + b)
//   backward:  from g_d, the gradient at d: g_pre_d = g_d * act'(pre_d), pre_d recomputed from e;
//              g_w and g_b, the depthwise weights' and bias' gradients (sums over every image and pixel);
//              g_e = the transposed depthwise of g_pre_d; out = g_e * act'(pre_e) where pre_e (the
//              expand conv's output before its activation, e = act(pre_e)) is given, else g_e (a block
//              without expansion: e is its input).
//
// Both replace several passes over the expanded tensor (torch's depthwise convolution, an activation,
// its derivative, torch's depthwise backward, the other activation's derivative) by one each. Each task
// owns a block of channels for every image and pixel, so no two threads write one value and the weight
// gradients need no reduction across threads.
#pragma once

#include <cstdint>

namespace effops::cpu::ir {

struct DepthwiseShape {
  int64_t N, C, H, W, OH, OW;
  int64_t KH, KW, SH, SW, PH, PW;  // zero padding
  int act;                         // the block's activation (Activation in inverted_residual.h)
};

// w: [KH * KW][C] fp32, tap-major (channels contiguous); b: [C] fp32 or nullptr.
template <typename T>
void depthwise_act_forward(const DepthwiseShape& s, const T* e, const float* w, const float* b, T* d);

// g_in: [N][H][W][C], the gradient at pre_e (or at e when pre_e is nullptr); g_w: [KH * KW][C] and
// g_b: [C], fp32, overwritten.
template <typename T>
void depthwise_act_backward(const DepthwiseShape& s, const T* g_d, const T* e, const T* pre_e, const float* w,
                            const float* b, T* g_in, float* g_w, float* g_b);

}  // namespace effops::cpu::ir
