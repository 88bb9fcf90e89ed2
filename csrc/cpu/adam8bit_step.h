// Fused Adam/AdamW step with 8-bit moments on the CPU: dequantize, update, requantize in one pass.
//
// The quantization (effops/reference/adam8bit.py defines it): blocks of kAdam8bitBlock elements in
// the tensor's element order, one fp32 scale per block and moment;
//   first moment:  int8 code c in [-127, 127],  m = c * |c| * (scale / 127^2)
//   second moment: uint8 code c in [0, 255] of r = sqrt(v),  r = (c + 1)^2 * (scale / 2^16),  v = r^2
// and per element, in fp32, the arithmetic of adam_step.h (adam_math.h) on the dequantized moments;
// the new m and r = sqrt(v) are requantized against their new block maxima:
//   m: c = copysign(round(sqrt(|m| / max|m|) * 127), m);   r: c = max(round(sqrt(r / max r) * 256) - 1, 0)
#pragma once

#include <cstdint>

#include "cpu/adam_step.h"

namespace effops::cpu {

constexpr int64_t kAdam8bitBlock = 256;

struct Adam8bitTensor {
  void* param;
  void* grad;
  int8_t* exp_avg_codes;
  float* exp_avg_scales;       // one per block
  uint8_t* exp_avg_sq_codes;
  float* exp_avg_sq_scales;    // one per block: the max of sqrt(exp_avg_sq)
  float* master;               // nullptr unless master weights (bf16/fp16 params)
  int64_t numel;
  AdamDtype dtype;             // of param and grad
  double step_size;            // lr / (1 - beta1^t)
  double bias_correction2_sqrt;
  int32_t hyper = 0;
};

// Steps every tensor (hypers[t.hyper] for tensor t; amsgrad is not supported and ignored), chunks of
// whole blocks spread over at::parallel_for's threads.
void adam8bit_step(const Adam8bitTensor* tensors, int64_t count, const AdamHyper* hypers);

}  // namespace effops::cpu
