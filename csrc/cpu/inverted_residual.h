// Fused inverted-residual block (MobileNetV2/V3, MNASNet, EfficientNet; squeeze-excitation in two passes)
// for effops::inverted_residual. Torch-free: raw pointers and sizes.
//
//   e = act(expand(x))            1x1 conv Cin -> Ch (absent when the block has no expansion: e = x)
//   d = act(depthwise_kxk(e))     stride S, zero padding
//   y = project(d) [+ x]          1x1 conv Ch -> Cout, residual when stride 1 and Cin == Cout
//
// Activations are channels-last (x[N][H][W][Cin], y[N][OH][OW][Cout]); T = float, bf16 or fp16
// storage, fp32 arithmetic. The expanded tensor e (Ch = 6 Cin channels: the largest activation of
// these networks) never reaches memory: each task owns a band of output rows of one image, in steps of
// a few output rows (~64 pixels), and keeps a ring of the expanded input rows the current step reads
// (fp32, zero-padded left and right, in L2); each new input row is expanded once, the step's new rows
// in one GEMM, the depthwise writes the step's output rows d[R * OW][Chp], and one project GEMM turns
// them into rows of y.
#pragma once

#include <cstdint>

namespace effops::cpu::ir {

// The same codes as dwpw_conv2d's (csrc/cpu/dwpw_conv2d.h), so the activation functors are shared.
enum Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2, kGelu = 3, kSilu = 4, kHardswish = 5 };

constexpr int64_t kPanel = 16;  // columns of one packed weight panel

struct Shape {
  int64_t N, Cin, H, W;  // input
  int64_t Ch, Cout;      // expanded and output channels (Ch == Cin without expansion)
  int64_t OH, OW;        // output size
  int64_t KH, KW, SH, SW, PH, PW;
  bool expand;           // false: the block starts at the depthwise conv (e = x)
  bool residual;         // y += x (stride 1, Cin == Cout)
  int act;
};

inline int64_t padded(int64_t c) { return (c + kPanel - 1) / kPanel * kPanel; }

// The packed weights: one fp32 array, built once per set of weights (inverted_residual_pack), in this
// order (Chp = padded(Ch), Coutp = padded(Cout); every padding entry zero):
//   expand_w   [Chp / 16][Cin][16]   (only when expand)   B panels of the expand GEMM
//   expand_b   [Chp]                 (only when expand)
//   dw_w       [KH * KW][Chp]                             tap-major: channels contiguous for vectors
//   dw_b       [Chp]
//   project_w  [Coutp / 16][Ch][16]                       B panels of the project GEMM
//   project_b  [Coutp]
struct Packed {
  const float *expand_w, *expand_b, *dw_w, *dw_b, *project_w, *project_b;
};
int64_t packed_size(const Shape& s);
Packed packed_views(const Shape& s, const float* base);

// y = the block of x. packed: packed_size(s) floats laid out as above. scale (a squeeze-excitation
// block's gate, or nullptr): [N][padded(Ch)] fp32, multiplies d per image and channel before project.
// d_kept: nullptr, or d as depthwise_means kept it (then only the scale and the project run here).
template <typename T>
void forward(const Shape& s, const T* x, const float* packed, T* y, const float* scale = nullptr,
             const float* d_kept = nullptr);

// The first pass of a block with squeeze-excitation: means[N][Ch] = the mean over output pixels of d,
// per image and channel, computed as forward computes d (the expanded tensor never reaches memory). The
// gate follows from means outside the kernel; forward with that scale is the second pass. d_kept:
// nullptr (the second pass computes d again) or kept_d_size(s) floats where d is kept for it, which
// pays where keep_d(s): d's bytes per image up to kKeepDBytesPerImage (writing and reading d once costs
// less than a second expand GEMM and activation: 1.5-1.9x faster on EfficientNet-B0's 1.2 and 1.8 MB
// blocks at both AVX2 and AVX-512 levels, batch 1 and 16; larger d is not measured, so recomputed), or a
// block without expansion (recomputing d saves no expanded tensor). Measured: docs/inverted_residual.md.
template <typename T>
void depthwise_means(const Shape& s, const T* x, const float* packed, float* means, float* d_kept = nullptr);
bool keep_d(const Shape& s);
int64_t kept_d_size(const Shape& s);
constexpr int64_t kKeepDBytesPerImage = 4 << 20;

// Which body the forward (and the backward's depthwise middle) runs at the current instruction-set level
// (for `python -m effops info`).
const char* inverted_residual_body();

}  // namespace effops::cpu::ir
