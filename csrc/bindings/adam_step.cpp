// torch glue for the CPU Adam step: effops_cpu::adam_step. Checks everything before writing anything
// (a failed call leaves every tensor untouched), then hands raw pointers to csrc/cpu/adam_step.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "bindings/adam_step_checks.h"
#include "cpu/adam_step.h"

namespace {

using effops::cpu::AdamDtype;
using effops::cpu::AdamTensor;

AdamDtype adam_dtype(const at::Tensor& t, int64_t i) { return effops::adam_glue::param_dtype<AdamDtype>(t, i); }

// A tensor the kernel may walk as `numel` contiguous elements in the param's element order.
void check_like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype, const char* name, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "adam_step: ", name, "[", i, "] must be a CPU tensor");
  effops::adam_glue::check_layout_like(t, param, dtype, name, i);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& master_params,
                   at::ArrayRef<double> step_sizes, at::ArrayRef<double> bias_correction2_sqrts, double lr,
                   double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                   bool decoupled_weight_decay, std::optional<double> grad_scale,
                   at::OptionalIntArrayRef stochastic_round_seeds) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(!stochastic_round_seeds.has_value() || static_cast<int64_t>(stochastic_round_seeds->size()) == n,
              "adam_step: stochastic_round_seeds must have one entry per param (", n, ")");
  effops::adam_glue::check_list_sizes(n, grads.size(), exp_avgs.size(), exp_avg_sqs.size(), master_params.size(),
                                     step_sizes.size(), bias_correction2_sqrts.size(), amsgrad,
                                     max_exp_avg_sqs.size());
  std::vector<AdamTensor> tensors;
  tensors.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::optional<at::Tensor> master = master_params.get(i);
    const bool has_master = master.has_value() && master->defined();
    AdamDtype dtype = adam_dtype(p, i);
    TORCH_CHECK(!has_master || dtype != AdamDtype::kFloat32, "adam_step: params[", i,
                "] is float32 and needs no master copy");
    const at::ScalarType state_dtype = has_master ? at::kFloat : p.scalar_type();
    check_like(p, p, p.scalar_type(), "params", i);
    check_like(grads[i], p, p.scalar_type(), "grads", i);
    check_like(exp_avgs[i], p, state_dtype, "exp_avgs", i);
    check_like(exp_avg_sqs[i], p, state_dtype, "exp_avg_sqs", i);
    if (amsgrad) check_like(max_exp_avg_sqs[i], p, state_dtype, "max_exp_avg_sqs", i);
    if (has_master) check_like(*master, p, at::kFloat, "master_params", i);
    const int64_t sr_seed = stochastic_round_seeds.has_value() ? (*stochastic_round_seeds)[i] : -1;
    TORCH_CHECK(sr_seed < 0 || (dtype == AdamDtype::kBFloat16 && !has_master), "adam_step: params[", i,
                "]: stochastic rounding is for bf16 params without a master copy");
    if (p.numel() == 0) continue;
    tensors.push_back(AdamTensor{p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                                 amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                                 has_master ? master->data_ptr<float>() : nullptr, p.numel(), dtype, step_sizes[i],
                                 bias_correction2_sqrts[i], 0, sr_seed});
  }
  effops::cpu::AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                               grad_scale.has_value(), grad_scale.value_or(1.0)};
  effops::cpu::adam_step(tensors.data(), static_cast<int64_t>(tensors.size()), hyper);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)?[] master_params, float[] step_sizes, "
      "float[] bias_correction2_sqrts, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool amsgrad, bool maximize, bool decoupled_weight_decay, float? grad_scale, "
      "int[]? stochastic_round_seeds=None) -> ()");
}

TORCH_LIBRARY_IMPL(effops_cpu, CPU, m) { m.impl("adam_step", &adam_step_cpu); }
