// Fused multi-tensor Adam/AdamW step on CUDA, torch-free (raw pointers, sizes, cudaStream_t).
//
// Same arithmetic as csrc/cpu/adam_step.h (torch's single-tensor order, fp32 math, explicit FMAs
// where torch's vectorized kernels use them, IEEE sqrt and division), applied to many tensors per
// launch: like apex's multi_tensor_apply, each launch carries a table of up to kMaxTensors tensors
// and kMaxBlocks (tensor, chunk) pairs by value, so thousands of tensors take a handful of launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda {

enum class AdamDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor: moments (and max_exp_avg_sq) are fp32 when master != nullptr, else the param's dtype.
struct AdamTensorArgs {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  float* master;         // nullptr unless master weights
  int64_t numel;
  float neg_step_size;   // -lr / (1 - beta1^t)
  float bias_correction2_sqrt;
};

// Scalars already rounded to fp32 on the host, as torch rounds its Python scalars.
struct AdamHyperArgs {
  float lerp_weight;  // 1 - beta1
  float beta2, one_minus_beta2, eps, weight_decay, decay_factor, grad_scale;
  bool amsgrad, maximize, decoupled, has_weight_decay, unscale;
};

// Steps `count` tensors that all have param dtype `dtype` and all have (or all lack) a master copy.
// Returns the first launch error, or cudaSuccess.
cudaError_t launch_adam_step(const AdamTensorArgs* tensors, int64_t count, AdamDtype dtype, bool master,
                             const AdamHyperArgs& hyper, cudaStream_t stream);

}  // namespace effops::cuda
