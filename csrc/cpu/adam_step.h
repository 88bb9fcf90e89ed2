// Fused Adam/AdamW step on the CPU: every tensor of a param group in one call, one pass over memory.
//
// For each element (all math in fp32, whatever the storage dtype), in the order of
// torch.optim.adam._single_tensor_adam:
//   g  = grad / grad_scale (stored back unscaled)        if unscale
//   g  = -g                                              if maximize
//   p  = master or param
//   p *= decay_factor (decoupled)   |   g += weight_decay * p (coupled)      if weight_decay != 0
//   m  = lerp(m, g, 1 - beta1);  v = v * beta2 + ((1 - beta2) * g) * g
//   vm = max(vm, v) if amsgrad;  denom = sqrt(vm or v) / bias_correction2_sqrt + eps
//   p += (-step_size * m) / denom;  store p to master (fp32) and param (rounded once)
#pragma once

#include <cstdint>

namespace effops::cpu {

enum class AdamDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One tensor of the step. The moments (and max_exp_avg_sq) are fp32 when `master` is set (master
// weights), else in the param's dtype. Pointers address `numel` contiguous elements.
struct AdamTensor {
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  float* master;         // nullptr unless master weights
  int64_t numel;
  AdamDtype dtype;       // of param and grad
  double step_size;      // lr / (1 - beta1^t)
  double bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  int32_t hyper = 0;     // index into the hyper-parameter array (the tensor's param group)
  // bf16 params without a master copy: >= 0 rounds the new param stochastically with this 32-bit
  // seed (stochastic_round.h); -1 rounds to nearest.
  int64_t stochastic_round_seed = -1;
};

struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  bool unscale;       // divide gradients by grad_scale (GradScaler) and store them back
  double grad_scale;
};

// Steps every tensor, split into chunks spread over at::parallel_for's threads; tensor k uses
// hypers[tensors[k].hyper] (one entry per param group, so several groups go in one call).
void adam_step(const AdamTensor* tensors, int64_t count, const AdamHyper* hypers);

// All tensors with the same hyper-parameters.
inline void adam_step(const AdamTensor* tensors, int64_t count, const AdamHyper& hyper) {
  adam_step(tensors, count, &hyper);
}

// Which body the step runs at the current level (for `python -m effops info`).
const char* adam_step_body();

}  // namespace effops::cpu
