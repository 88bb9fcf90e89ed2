// CUDA kernel glue of effops::adam_step (bindings/adam_step.cpp checks the call and chooses this route):
// groups the tensors by (dtype, master weights) and hands raw pointers to the torch-free launcher in
// csrc/cuda/adam_step.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <utility>
#include <vector>

#include "bindings/adam_step.h"
#include "cuda/adam_step.cuh"

namespace effops::adam {

void adam_step_cuda_kernel(const AdamStepCall& c) {
  using effops::cuda::AdamDtype;
  std::map<std::pair<int, bool>, std::vector<effops::cuda::AdamTensorArgs>> groups;
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& p = c.params[i];
    if (p.numel() == 0) continue;
    const at::Tensor& master = c.masters[i];
    const at::ScalarType s = p.scalar_type();
    const AdamDtype dtype = s == at::kFloat      ? AdamDtype::kFloat32
                            : s == at::kBFloat16 ? AdamDtype::kBFloat16
                                                 : AdamDtype::kFloat16;
    groups[{static_cast<int>(dtype), master.defined()}].push_back(effops::cuda::AdamTensorArgs{
        p.data_ptr(), c.grads[i].data_ptr(), c.exp_avgs[i].data_ptr(), c.exp_avg_sqs[i].data_ptr(),
        c.amsgrad ? c.max_exp_avg_sqs[i].data_ptr() : nullptr, master.defined() ? master.data_ptr<float>() : nullptr,
        p.numel(), static_cast<float>(-c.step_sizes[i]), static_cast<float>(c.bias_correction2_sqrts[i])});
  }
  if (groups.empty()) return;
  const effops::cuda::AdamHyperArgs hyper{
      static_cast<float>(1.0 - c.beta1), static_cast<float>(c.beta2), static_cast<float>(1.0 - c.beta2),
      static_cast<float>(c.eps), static_cast<float>(c.weight_decay), static_cast<float>(1.0 - c.lr * c.weight_decay),
      static_cast<float>(c.grad_scale.value_or(1.0)), c.amsgrad, c.maximize, c.decoupled_weight_decay,
      c.weight_decay != 0.0, c.grad_scale.has_value()};
  const c10::cuda::CUDAGuard guard(c.params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c.params[0].device().index()).stream();
  for (const auto& [key, tensors] : groups) {
    const cudaError_t err = effops::cuda::launch_adam_step(tensors.data(), static_cast<int64_t>(tensors.size()),
                                                           static_cast<AdamDtype>(key.first), key.second, hyper,
                                                           stream);
    TORCH_CHECK(err == cudaSuccess, "adam_step: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace effops::adam
