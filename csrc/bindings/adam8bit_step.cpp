// torch glue for the CPU 8-bit Adam step: effops_cpu::adam8bit_step. Checks everything before writing
// anything (a failed call leaves every tensor untouched), then hands raw pointers to
// csrc/cpu/adam8bit_step.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "bindings/adam_step_checks.h"
#include "cpu/adam8bit_step.h"

namespace {

using effops::cpu::AdamDtype;
using effops::cpu::kAdam8bitBlock;

void check_flat(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "adam8bit_step: ", name, "[", i, "] must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "adam8bit_step: ", name, "[", i, "] must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "adam8bit_step: ", name, "[", i, "] must have ", numel, " elements, got ",
              t.numel());
  TORCH_CHECK(t.is_contiguous(), "adam8bit_step: ", name, "[", i, "] must be contiguous");
}

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                       at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_codes, at::TensorList exp_avg_sq_scales,
                       const c10::List<std::optional<at::Tensor>>& master_params, at::ArrayRef<double> step_sizes,
                       at::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool maximize, bool decoupled_weight_decay,
                       std::optional<double> grad_scale) {
  const int64_t n = static_cast<int64_t>(params.size());
  effops::adam_glue::check_list_sizes(n, grads.size(), exp_avg_codes.size(), exp_avg_sq_codes.size(),
                                      master_params.size(), step_sizes.size(), bias_correction2_sqrts.size(), false, 0);
  TORCH_CHECK(static_cast<int64_t>(exp_avg_scales.size()) == n && static_cast<int64_t>(exp_avg_sq_scales.size()) == n,
              "adam8bit_step: every list must have one entry per param (", n, ")");
  std::vector<effops::cpu::Adam8bitTensor> tensors;
  tensors.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::optional<at::Tensor> master = master_params.get(i);
    const bool has_master = master.has_value() && master->defined();
    const AdamDtype dtype = effops::adam_glue::param_dtype<AdamDtype>(p, i);
    TORCH_CHECK(!has_master || dtype != AdamDtype::kFloat32, "adam8bit_step: params[", i,
                "] is float32 and needs no master copy");
    const int64_t numel = p.numel();
    const int64_t blocks = (numel + kAdam8bitBlock - 1) / kAdam8bitBlock;
    check_flat(p, p.scalar_type(), numel, "params", i);
    check_flat(grads[i], p.scalar_type(), numel, "grads", i);
    check_flat(exp_avg_codes[i], at::kChar, numel, "exp_avg_codes", i);
    check_flat(exp_avg_sq_codes[i], at::kByte, numel, "exp_avg_sq_codes", i);
    check_flat(exp_avg_scales[i], at::kFloat, blocks, "exp_avg_scales", i);
    check_flat(exp_avg_sq_scales[i], at::kFloat, blocks, "exp_avg_sq_scales", i);
    if (has_master) check_flat(*master, at::kFloat, numel, "master_params", i);
    if (numel == 0) continue;
    tensors.push_back({p.data_ptr(), grads[i].data_ptr(), exp_avg_codes[i].data_ptr<int8_t>(),
                       exp_avg_scales[i].data_ptr<float>(), exp_avg_sq_codes[i].data_ptr<uint8_t>(),
                       exp_avg_sq_scales[i].data_ptr<float>(), has_master ? master->data_ptr<float>() : nullptr,
                       numel, dtype, step_sizes[i], bias_correction2_sqrts[i]});
  }
  effops::cpu::AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, false, maximize, decoupled_weight_decay,
                               grad_scale.has_value(), grad_scale.value_or(1.0)};
  effops::cpu::adam8bit_step(tensors.data(), static_cast<int64_t>(tensors.size()), &hyper);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def(
      "adam8bit_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avg_codes, "
      "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_codes, Tensor(f!)[] exp_avg_sq_scales, "
      "Tensor(g!)?[] master_params, float[] step_sizes, float[] bias_correction2_sqrts, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, bool decoupled_weight_decay, "
      "float? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(effops_cpu, CPU, m) { m.impl("adam8bit_step", &adam8bit_step_cpu); }
