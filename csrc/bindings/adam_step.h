// One checked call of effops::adam_step, as bindings/adam_step.cpp hands it to a device's kernel glue
// (the CUDA glue, bindings/cuda/adam_step.cpp, lives in its own file: it is built only with CUDA).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace effops::adam {

struct AdamStepCall {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs;  // max_exp_avg_sqs: amsgrad only
  std::vector<at::Tensor> masters;                                       // per param, undefined where none
  std::vector<double> step_sizes, bias_correction2_sqrts;                // per param
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
  std::optional<double> grad_scale;
};

// Runs the CUDA kernel of csrc/cuda/adam_step.cu (no stochastic rounding); defined only when built with CUDA.
void adam_step_cuda_kernel(const AdamStepCall& call);

}  // namespace effops::adam
