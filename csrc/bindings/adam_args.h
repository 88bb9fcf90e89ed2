// What both Adam ops (bindings/adam_step.cpp, bindings/adam8bit_step.cpp) check and read in their
// arguments: list lengths, hyper-parameters, step counts, the GradScaler tensors, the dense layout the
// kernels walk. Every check runs before anything is written, so a call that fails leaves every tensor
// untouched; failures are ValueError / TypeError naming the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bindings/arg_text.h"

namespace effops::adam_args {

using effops::bindings::dtype_name;

inline void check_count(const char* name, size_t got, size_t n) {
  TORCH_CHECK_VALUE(got == n, name, " must have one entry per param (", n, "), got ", got);
}

// t has `dtype` (why: what the dtype follows), the param's shape and its device.
inline void check_like(const at::Tensor& t, const char* name, int64_t i, at::ScalarType dtype, const char* why,
                       at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, "[", i, "] must have dtype ", dtype_name(dtype), " (", why,
                   "), got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.sizes() == shape, name, "[", i, "] must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "] must be on ", device, " like params[0], got ", t.device());
}

inline void check_grad_layout(const char* op, const at::Tensor& g, int64_t i) {
  TORCH_CHECK(g.layout() == at::kStrided, op, " does not support sparse gradients (grads[", i, "] has layout ",
              g.layout(), "); use torch.optim.SparseAdam");
}

// The hyper-parameters' ranges (NaN fails every comparison, so it is refused too).
inline void check_hyper(double lr, double beta1, double beta2, double eps, double weight_decay) {
  TORCH_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be >= 0 and < 1, got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be >= 0 and < 1, got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
}

// grad_scale / found_inf: None or a 1-element fp32 tensor (the GradScaler protocol).
inline void check_scalar(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must have dtype in (float32), got ",
                   dtype_name(t->scalar_type()));
  TORCH_CHECK_VALUE(t->numel() == 1, name, " must have one element, got shape ", t->sizes());
}

inline void check_step(const at::Tensor& s, int64_t i) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, "steps[", i,
                   "] must have dtype in (float32, float64), got ", dtype_name(s.scalar_type()));
  TORCH_CHECK_VALUE(s.numel() == 1, "steps[", i, "] must be a 1-element tensor, got shape ", s.sizes());
}

// The master copies per param (undefined where none), from the list of those that exist and a flag per param.
inline std::vector<at::Tensor> masters_per_param(at::TensorList masters, const c10::List<bool>& has_master,
                                                 size_t n) {
  check_count("has_master", has_master.size(), n);
  std::vector<at::Tensor> out(n);
  size_t next = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!has_master.get(i)) continue;
    TORCH_CHECK_VALUE(next < masters.size(), "masters must hold one tensor per true entry of has_master, got ",
                      masters.size());
    out[i] = masters[next++];
  }
  TORCH_CHECK_VALUE(next == masters.size(), "masters must hold one tensor per true entry of has_master (", next,
                    "), got ", masters.size());
  return out;
}

// A GradScaler step with an inf/NaN gradient is skipped whole. Read on the host: a skipped step must not
// advance the (host) step counts; on CUDA one sync per step, as torch's non-capturable path.
inline bool skipped(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->item<float>() != 0.0f;
}

inline std::optional<double> scale_of(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value()) return std::nullopt;
  return static_cast<double>(grad_scale->item<float>());
}

// The count after this step, in the step tensor's own dtype (torch: step_t += 1; step = step_t.item()).
inline double next_step(const at::Tensor& s) {
  if (s.is_cpu()) {
    return s.scalar_type() == at::kFloat ? static_cast<double>(*s.const_data_ptr<float>() + 1.0f)
                                         : *s.const_data_ptr<double>() + 1.0;
  }
  return (s + 1).item<double>();
}

inline void store_step(const at::Tensor& s, double step) {
  if (!s.is_cpu()) {
    s.add_(1);
  } else if (s.scalar_type() == at::kFloat) {
    *s.data_ptr<float>() = static_cast<float>(step);
  } else {
    *s.data_ptr<double>() = step;
  }
}

// Per tensor: step_size = lr / (1 - beta1^t) and sqrt(1 - beta2^t), in double as torch's single-tensor
// Adam computes them; once per distinct step (usually once per call).
struct BiasCorrections {
  std::vector<double> steps, step_sizes, bc2_sqrts;
};

inline BiasCorrections bias_corrections(at::TensorList steps, double lr, double beta1, double beta2) {
  BiasCorrections b;
  const size_t n = steps.size();
  b.steps.resize(n);
  b.step_sizes.resize(n);
  b.bc2_sqrts.resize(n);
  double last = -1.0, step_size = 0.0, bc2_sqrt = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double step = next_step(steps[i]);
    if (step != last) {
      step_size = lr / (1.0 - std::pow(beta1, step));
      bc2_sqrt = std::pow(1.0 - std::pow(beta2, step), 0.5);
      last = step;
    }
    b.steps[i] = step;
    b.step_sizes[i] = step_size;
    b.bc2_sqrts[i] = bc2_sqrt;
  }
  return b;
}

inline void store_steps(at::TensorList steps, const BiasCorrections& b) {
  for (size_t i = 0; i < steps.size(); ++i) store_step(steps[i], b.steps[i]);
}

// Same element order in memory for two dense tensors of one shape: equal strides wherever a dimension
// has more than one element (a size-1 dimension's stride is arbitrary: a channels_last conv weight of
// shape (C, 1, k, k) and its gradient from autograd can differ there and still match).
inline bool same_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// A tensor a kernel may walk as numel contiguous elements in the param's element order.
inline bool flat_like(const at::Tensor& t, const at::Tensor& param) {
  return t.numel() == 0 || (t.is_non_overlapping_and_dense() && same_order(t, param));
}

// Whether a Python-registered route (a Triton launcher) exists: its module registers it when imported.
inline bool has_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
}

// The ADInplaceOrView kernel of both ops: runs the op, then moves the version counters of every tensor
// the schema declares written, as torch's generated kernels do for its in-place ops (autograd then
// refuses a backward through a tensor saved before the step). torch's own fallback for custom ops moves
// only aliased returns, and these ops return nothing.
inline void run_and_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t start = stack->size() - arguments.size();
  // The written lists are held by their IValues (one reference per list, not per tensor: a step over
  // thousands of small tensors would otherwise pay two atomic reference-count updates per tensor).
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[start + i];
    if (v.isTensorList() || v.isTensor()) written.push_back(v);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  auto bump = [](const at::Tensor& t) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  };
  for (const c10::IValue& v : written) {
    if (v.isTensor()) {
      bump(v.toTensor());
      continue;
    }
    for (const c10::IValue& t : v.toListRef()) bump(t.toTensor());
  }
}

}  // namespace effops::adam_args
