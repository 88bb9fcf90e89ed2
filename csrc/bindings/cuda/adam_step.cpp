// torch glue for the CUDA Adam step: effops_cuda::adam_step. Checks everything before launching
// (a failed call leaves every tensor untouched), groups the tensors by (dtype, master weights) and
// hands raw pointers to the torch-free launcher in csrc/cuda/adam_step.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "bindings/adam_step_checks.h"
#include "cuda/adam_step.cuh"

namespace {

using effops::cuda::AdamDtype;
using effops::cuda::AdamTensorArgs;

AdamDtype adam_dtype(const at::Tensor& t, int64_t i) { return effops::adam_glue::param_dtype<AdamDtype>(t, i); }

void check_like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* name, int64_t i) {
  TORCH_CHECK(t.is_cuda() && t.device() == param.device(), "adam_step: ", name, "[", i,
              "] must be on the param's CUDA device");
  effops::adam_glue::check_layout_like(t, param, dtype, name, i);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& master_params,
                    at::ArrayRef<double> step_sizes, at::ArrayRef<double> bias_correction2_sqrts, double lr,
                    double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                    bool decoupled_weight_decay, std::optional<double> grad_scale) {
  const int64_t n = static_cast<int64_t>(params.size());
  effops::adam_glue::check_list_sizes(n, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), master_params.size(),
                                     step_sizes.size(), bias_correction2_sqrts.size(), amsgrad,
                                     max_exp_avg_sqs.size());
  if (n == 0) return;
  std::map<std::pair<int, bool>, std::vector<AdamTensorArgs>> groups;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::optional<at::Tensor> master = master_params.get(i);
    const bool has_master = master.has_value() && master->defined();
    const AdamDtype dtype = adam_dtype(p, i);
    TORCH_CHECK(!has_master || dtype != AdamDtype::kFloat32, "adam_step: params[", i,
                "] is float32 and needs no master copy");
    const at::ScalarType state_dtype = has_master ? at::kFloat : p.scalar_type();
    // On params[0]'s device, and dense (p against itself: the params of a group differ in shape).
    TORCH_CHECK(p.is_cuda() && p.device() == params[0].device(), "adam_step: params[", i,
                "] must be on params[0]'s CUDA device");
    check_like(p, p, p.scalar_type(), "params", i);
    check_like(grads[i], p, p.scalar_type(), "grads", i);
    check_like(exp_avgs[i], p, state_dtype, "exp_avgs", i);
    check_like(exp_avg_sqs[i], p, state_dtype, "exp_avg_sqs", i);
    if (amsgrad) check_like(max_exp_avg_sqs[i], p, state_dtype, "max_exp_avg_sqs", i);
    if (has_master) check_like(*master, p, at::kFloat, "master_params", i);
    if (p.numel() == 0) continue;
    groups[{static_cast<int>(dtype), has_master}].push_back(AdamTensorArgs{
        p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
        amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr, has_master ? master->data_ptr<float>() : nullptr,
        p.numel(), static_cast<float>(-step_sizes[i]), static_cast<float>(bias_correction2_sqrts[i])});
  }
  effops::cuda::AdamHyperArgs hyper{static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                                    static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                                    static_cast<float>(weight_decay), static_cast<float>(1.0 - lr * weight_decay),
                                    static_cast<float>(grad_scale.value_or(1.0)), amsgrad, maximize,
                                    decoupled_weight_decay, weight_decay != 0.0, grad_scale.has_value()};
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  for (const auto& [key, tensors] : groups) {
    const cudaError_t err = effops::cuda::launch_adam_step(tensors.data(), static_cast<int64_t>(tensors.size()),
                                                           static_cast<AdamDtype>(key.first), key.second, hyper,
                                                           stream);
    TORCH_CHECK(err == cudaSuccess, "adam_step: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cuda, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)?[] master_params, float[] step_sizes, "
      "float[] bias_correction2_sqrts, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool amsgrad, bool maximize, bool decoupled_weight_decay, float? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(effops_cuda, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }
