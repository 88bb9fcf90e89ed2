// Fused depthwise + pointwise convolution kernels for effops::dwpw_conv2d (torch-free: raw pointers).
//
// Layout: activations channels-last (NHWC) or, for the forward, NCHW; T = float, bf16 or fp16 storage,
// fp32 arithmetic.
// Forward, per tile of P output pixels of one image:
//   1. depthwise: the tile's depthwise output for ALL channels, activation applied, into a buffer
//      A[P][Cp] (fp32, channels-last, Cp = C rounded up to 16) sized to stay in L2;
//   2. pointwise: y[P][O] = A @ Wpw^T by a register-blocked micro-kernel (6 pixels x 16 outputs,
//      12 AVX2 accumulators), reading the pointwise weights packed as [ceil(O/16)][C][16].
// (bf16 channels-last at the avx512_bf16 level: A in bf16 pairs, the product by vdpbf16ps; see pw_pairs.)
// The intermediate never reaches memory. The backward recomputes it per tile (see dwpw_conv2d.cpp).
#pragma once

#include <cstdint>

namespace effops::cpu::dwpw {

enum Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2, kGelu = 3, kSilu = 4, kHardswish = 5 };

struct Shape {
  int64_t N, C, H, W;     // input
  int64_t O, OH, OW;      // output channels and size
  int64_t KH, KW, SH, SW, PH, PW, DH, DW;
  int act;
};

// y[N][OH][OW][O] = pw(act(dw(x))). dw_w: [KH*KW][C] (tap-major, so channels are contiguous);
// dw_b: [C] or null; pw_packed: [ceil(O/16)][C][16], zero-padded past O; pw_b: [O] or null.
// nchw: false for channels-last x and y (x[N][H][W][C], y[N][OH][OW][O]); true for NCHW x and y
// (x[N][C][H][W], y[N][O][OH][OW]): the depthwise then runs along rows into a transposed tile [C][P],
// the same micro-kernel reads it column-wise and stores its results transposed into y's planes.
// pw_pairs: null, or (T = bf16, where forward_takes_bf16_pairs(nchw)) the pointwise weight as bf16 pairs
// [ceil(O/16)][ceil(C/2)][16] 32-bit words (channel 2k in the low half, 2k + 1 in the high half,
// zero-padded past O and C), and pw_packed may then be null: the forward then runs the avx512_bf16
// body, the depthwise output (after the activation) rounded to bf16 pairs as torch's two bf16
// convolutions round their intermediate and the pointwise product by vdpbf16ps with fp32 sums.
template <typename T>
void forward(const Shape& s, const T* x, const float* dw_w, const float* dw_b, const float* pw_packed,
             const float* pw_b, T* y, bool nchw, const uint32_t* pw_pairs = nullptr);

// Whether forward() at the current level takes pw_pairs for a bf16 x (channels-last at avx512_bf16).
bool forward_takes_bf16_pairs(bool nchw);

// Gradients from gy (T), computed per band of output rows of one image (see dwpw_conv2d_backward.cpp).
// x_nchw: x is x[N][C][H][W] (else x[N][H][W][C]) and gx is written in the same layout; gy_nchw: gy is
// gy[N][O][OH][OW] (else gy[N][OH][OW][O]). pw_packed_t: the pointwise weight transposed and packed as
// [ceil(C/16)][O][16] (zero-padded past C). Outputs (each may be null when not wanted), all written,
// none accumulated into: gx (T, x's layout); g_dw: [KH*KW][C]; g_pw: [O][C]; g_dwb: [C]; g_pwb: [O] (fp32).
// pw_pairs_t: null, or (T = bf16, where backward_takes_bf16_pairs()) the pointwise weight transposed as
// bf16 pairs [ceil(C/16)][ceil(O/2)][16] words (outputs 2k, 2k + 1 of one channel): the products
// G = gy @ Wpw and g_pw = gy^T @ act(h) then run by vdpbf16ps with fp32 sums, act(h) rounded to bf16
// as torch's bf16 backward takes it, and pw_packed_t may be null.
template <typename T>
void backward(const Shape& s, const T* x, bool x_nchw, const T* gy, bool gy_nchw, const float* dw_w,
              const float* dw_b, const float* pw_packed_t, T* gx, float* g_dw, float* g_pw, float* g_dwb,
              float* g_pwb, const uint32_t* pw_pairs_t = nullptr);

// Whether backward() at the current level takes pw_pairs_t for bf16 (avx512_bf16).
bool backward_takes_bf16_pairs();

// Which body the forward and backward run at the current level (for `python -m effops info`).
const char* dwpw_body();

}  // namespace effops::cpu::dwpw
