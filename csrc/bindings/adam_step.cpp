// effops::adam_step: one fused Adam/AdamW step over lists of tensors, in place (as torch._fused_adamw_):
// schema, argument checks, the policy, the plain ATen route, and the CPU / CUDA / Meta registrations.
//
// A device implementation checks every argument (nothing is written before all pass), asks the policy
// for the route (dispatch::choose: forcing and record_choices), skips the whole step when GradScaler's
// found_inf is set, runs the route, and only then advances the step counts. The version counters of
// every list move because the schema declares them mutated (torch's ADInplaceOrView fallback).
//
// Routes: our CPU kernel (csrc/cpu/adam_step.cpp), our CUDA kernel (csrc/cuda/adam_step.cu, through
// bindings/cuda/adam_step.cpp), the Triton kernel (registered from Python as effops::_adam_step_triton:
// on CUDA, and on CPU tensors under TRITON_INTERPRET=1), or the plain ATen route: the arithmetic of
// effops/reference/adam.py in ATen ops, which is also the only route for float64 params.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "bindings/adam_args.h"
#include "bindings/adam_step.h"
#include "bindings/dispatch.h"
#include "cpu/adam_step.h"

#ifndef EFFOPS_BUILD_CUDA
#define EFFOPS_BUILD_CUDA 0
#endif

namespace effops::adam {
namespace {

using dispatch::Backend;
namespace args = effops::adam_args;

constexpr const char* kTritonRoute = "effops::_adam_step_triton";

struct Call : AdamStepCall {
  at::TensorList steps;
  at::OptionalIntArrayRef seeds;
  bool any_float64 = false;
  // The first param whose grad or state is not dense in the param's element order (-1: none); found in
  // the checking pass, so the policy walks no tensor again.
  int64_t first_not_flat = -1;
};

bool low_precision(at::ScalarType s) { return s == at::kBFloat16 || s == at::kHalf; }

// Every check of the op, before anything is written.
Call check(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList max_exp_avg_sqs, at::TensorList masters, const c10::List<bool>& has_master,
           at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
           bool maximize, bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf, at::OptionalIntArrayRef seeds) {
  const size_t n = params.size();
  args::check_count("grads", grads.size(), n);
  args::check_count("exp_avgs", exp_avgs.size(), n);
  args::check_count("exp_avg_sqs", exp_avg_sqs.size(), n);
  args::check_count("steps", steps.size(), n);
  TORCH_CHECK_VALUE(!amsgrad || !max_exp_avg_sqs.empty() || n == 0,
                    "max_exp_avg_sqs (one per param) is required when amsgrad=True");
  if (amsgrad) args::check_count("max_exp_avg_sqs", max_exp_avg_sqs.size(), n);
  args::check_hyper(lr, beta1, beta2, eps, weight_decay);
  args::check_scalar(grad_scale, "grad_scale");
  args::check_scalar(found_inf, "found_inf");
  if (seeds.has_value()) {
    TORCH_CHECK_VALUE(seeds->size() == n, "stochastic_round_seeds must be None or one int per param (", n, "), got ",
                      seeds->size());
  }
  Call c;
  c.masters = args::masters_per_param(masters, has_master, n);
  const at::Device device = n ? params[0].device() : at::Device(at::kCPU);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& master = c.masters[i];
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || low_precision(dtype) || dtype == at::kDouble, "params[", i,
                     "] must have dtype in (float32, bfloat16, float16, float64), got ", args::dtype_name(dtype));
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "params[", i, "] must be a strided tensor");
    c.any_float64 |= dtype == at::kDouble;
    args::check_grad_layout("adam_step", grads[i], i);
    args::check_like(p, "params", i, dtype, "the param's", p.sizes(), device);
    args::check_like(grads[i], "grads", i, dtype, "the param's", p.sizes(), device);
    if (master.defined()) {
      TORCH_CHECK_VALUE(low_precision(dtype), "master_params[", i, "] is only for bf16/fp16 params; params[", i,
                        "] is ", args::dtype_name(dtype));
      args::check_like(master, "master_params", i, at::kFloat, "fp32", p.sizes(), device);
    }
    const at::ScalarType state = master.defined() ? at::kFloat : dtype;
    const char* why = master.defined() ? "fp32 beside a master copy" : "the param's";
    args::check_like(exp_avgs[i], "exp_avgs", i, state, why, p.sizes(), device);
    args::check_like(exp_avg_sqs[i], "exp_avg_sqs", i, state, why, p.sizes(), device);
    if (amsgrad) args::check_like(max_exp_avg_sqs[i], "max_exp_avg_sqs", i, state, why, p.sizes(), device);
    args::check_step(steps[i], i);
    if (c.first_not_flat < 0 &&
        !(args::flat_like(p, p) && args::flat_like(grads[i], p) && args::flat_like(exp_avgs[i], p) &&
          args::flat_like(exp_avg_sqs[i], p) && (!amsgrad || args::flat_like(max_exp_avg_sqs[i], p)) &&
          (!master.defined() || args::flat_like(master, p)))) {
      c.first_not_flat = static_cast<int64_t>(i);
    }
    if (seeds.has_value()) {
      const int64_t seed = (*seeds)[i];
      TORCH_CHECK_VALUE(seed >= -1 && seed < (int64_t{1} << 32), "stochastic_round_seeds[", i,
                        "] must be an int in [0, 2^32) or -1, got ", seed);
      TORCH_CHECK_VALUE(seed < 0 || (dtype == at::kBFloat16 && !master.defined()), "stochastic_round_seeds[", i,
                        "]: stochastic rounding is for bf16 params without a master copy; params[", i, "] is ",
                        args::dtype_name(dtype), master.defined() ? " with a master copy" : "");
    }
  }
  c.params = params;
  c.grads = grads;
  c.exp_avgs = exp_avgs;
  c.exp_avg_sqs = exp_avg_sqs;
  c.max_exp_avg_sqs = amsgrad ? max_exp_avg_sqs : at::TensorList();
  c.steps = steps;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.eps = eps;
  c.weight_decay = weight_decay;
  c.amsgrad = amsgrad;
  c.maximize = maximize;
  c.decoupled_weight_decay = decoupled_weight_decay;
  c.seeds = seeds;
  return c;
}

// ---------------------------------------------------------------------------------------------------
// Policy: why a kernel cannot take this call (empty: it can). No speed rule: every kernel moves the
// step's 28 bytes per parameter once, at or above torch's fused AdamW (benchmarks/bench_adam_step.py),
// and the ATen route moves them once per operation.
// ---------------------------------------------------------------------------------------------------
bool stochastic(const Call& c, size_t i) { return c.seeds.has_value() && (*c.seeds)[i] >= 0; }

std::string cannot(const Call& c, Backend kernel) {
  if (kernel == Backend::kCuda && !EFFOPS_BUILD_CUDA) return "the extension was built without CUDA kernels";
  if (kernel == Backend::kTriton && !args::has_op(kTritonRoute)) return "the Triton route is not registered";
  if (c.any_float64) return "float64 params step on the plain ATen route (no kernel has a float64 body)";
  const auto not_flat = [](int64_t i) {
    return "params[" + std::to_string(i) + "] or its grad/state is not dense with one shared layout";
  };
  if (!c.seeds.has_value()) return c.first_not_flat < 0 ? "" : not_flat(c.first_not_flat);
  for (size_t i = 0; i < c.params.size(); ++i) {
    if (stochastic(c, i)) {
      if (kernel == Backend::kCuda) return "no stochastic rounding in the CUDA kernel";
      // The random bits follow the row-major index.
      if (!c.params[i].is_contiguous()) {
        return "params[" + std::to_string(i) + "] is rounded stochastically and is not contiguous";
      }
    }
    if (static_cast<int64_t>(i) == c.first_not_flat) return not_flat(c.first_not_flat);
  }
  return "";
}

Backend route(const Call& c, c10::DeviceType device, std::initializer_list<Backend> kernels) {
  const Backend forced = dispatch::forced_backend();
  Backend ours = *kernels.begin();
  std::string why;
  if (forced != Backend::kAuto && forced != Backend::kReference) {
    ours = forced;
    why = cannot(c, ours);
  } else {
    for (Backend k : kernels) {  // the first kernel that can, else the first one's reason
      std::string reason = cannot(c, k);
      if (reason.empty()) {
        ours = k;
        why.clear();
        break;
      }
      if (why.empty()) why = reason;
    }
  }
  return dispatch::choose("adam_step", device, ours, why.empty() ? nullptr : why.c_str(), nullptr);
}

// ---------------------------------------------------------------------------------------------------
// The plain ATen route: effops/reference/adam.py op for op (fp32 math for fp32/bf16/fp16, float64 math
// for float64), so that it is torch.optim.Adam's single-tensor arithmetic.
// ---------------------------------------------------------------------------------------------------
at::Tensor wide(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat); }

// effops/reference/stochastic_round.py: bits(i) = mix(i ^ seed) & 0xffff; bf16(x) = (fp32_bits(x) + bits) >> 16.
at::Tensor mix32(at::Tensor x) {
  constexpr int64_t kMask = 0xFFFFFFFF;
  x = x.bitwise_xor(x.bitwise_right_shift(16));
  x = (x * int64_t{0x7feb352d}).bitwise_and(kMask);
  x = x.bitwise_xor(x.bitwise_right_shift(15));
  x = (x * int64_t{0x1b873593}).bitwise_and(kMask);
  return x.bitwise_xor(x.bitwise_right_shift(16));
}

at::Tensor round_to_bf16(const at::Tensor& x, int64_t seed) {
  constexpr int64_t kMask = 0xFFFFFFFF;
  const at::Tensor flat = x.reshape(-1);
  const at::Tensor index = at::arange(flat.numel(), flat.options().dtype(at::kLong)).bitwise_and(kMask);
  const at::Tensor noise = mix32(index.bitwise_xor(seed & kMask)).bitwise_and(0xFFFF);
  at::Tensor bits = flat.view(at::kInt).to(at::kLong).bitwise_and(kMask);
  bits = (bits + noise).bitwise_right_shift(16).bitwise_and(0xFFFF);
  at::Tensor upper = bits.bitwise_left_shift(16);
  upper = at::where(upper >= (int64_t{1} << 31), upper - (int64_t{1} << 32), upper).to(at::kInt);
  at::Tensor out = upper.view(at::kFloat).to(at::kBFloat16);
  out = at::where(at::isnan(flat), at::full_like(out, std::numeric_limits<float>::quiet_NaN()), out);
  return out.view(x.sizes());
}

void aten_route(const Call& c) {
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& param = c.params[i];
    if (param.numel() == 0) continue;
    at::Tensor theta = c.masters[i].defined() ? c.masters[i] : wide(param);
    at::Tensor grad = wide(c.grads[i]);
    if (c.grad_scale.has_value()) {
      grad = grad / *c.grad_scale;
      c.grads[i].copy_(grad);
    }
    if (c.maximize) grad = -grad;
    at::Tensor exp_avg = wide(c.exp_avgs[i]);
    at::Tensor exp_avg_sq = wide(c.exp_avg_sqs[i]);
    if (c.weight_decay != 0) {
      if (c.decoupled_weight_decay) {
        theta.mul_(1 - c.lr * c.weight_decay);
      } else {
        grad = grad.add(theta, c.weight_decay);
      }
    }
    exp_avg.lerp_(grad, 1 - c.beta1);
    exp_avg_sq.mul_(c.beta2).addcmul_(grad, grad, 1 - c.beta2);
    at::Tensor denom;
    if (c.amsgrad) {
      at::Tensor max_sq = wide(c.max_exp_avg_sqs[i]);
      at::maximum_out(max_sq, max_sq, exp_avg_sq);
      denom = (max_sq.sqrt() / c.bias_correction2_sqrts[i]).add_(c.eps);
      if (!max_sq.is_same(c.max_exp_avg_sqs[i])) c.max_exp_avg_sqs[i].copy_(max_sq);
    } else {
      denom = (exp_avg_sq.sqrt() / c.bias_correction2_sqrts[i]).add_(c.eps);
    }
    theta.addcdiv_(exp_avg, denom, -c.step_sizes[i]);
    if (stochastic(c, i)) {
      param.copy_(round_to_bf16(theta, (*c.seeds)[i]));
      theta = param;
    }
    if (!exp_avg.is_same(c.exp_avgs[i])) c.exp_avgs[i].copy_(exp_avg);
    if (!exp_avg_sq.is_same(c.exp_avg_sqs[i])) c.exp_avg_sqs[i].copy_(exp_avg_sq);
    if (!theta.is_same(param)) param.copy_(theta);
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------
cpu::AdamDtype cpu_dtype(at::ScalarType s) {
  return s == at::kFloat ? cpu::AdamDtype::kFloat32
                         : s == at::kBFloat16 ? cpu::AdamDtype::kBFloat16 : cpu::AdamDtype::kFloat16;
}

void cpu_kernel(const Call& c) {
  std::vector<cpu::AdamTensor> tensors;
  tensors.reserve(c.params.size());
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& p = c.params[i];
    if (p.numel() == 0) continue;
    const at::Tensor& master = c.masters[i];
    tensors.push_back(cpu::AdamTensor{p.data_ptr(), c.grads[i].data_ptr(), c.exp_avgs[i].data_ptr(),
                                      c.exp_avg_sqs[i].data_ptr(), c.amsgrad ? c.max_exp_avg_sqs[i].data_ptr() : nullptr,
                                      master.defined() ? master.data_ptr<float>() : nullptr, p.numel(),
                                      cpu_dtype(p.scalar_type()), c.step_sizes[i], c.bias_correction2_sqrts[i], 0,
                                      stochastic(c, i) ? (*c.seeds)[i] : -1});
  }
  const cpu::AdamHyper hyper{c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.amsgrad, c.maximize,
                             c.decoupled_weight_decay, c.grad_scale.has_value(), c.grad_scale.value_or(1.0)};
  cpu::adam_step(tensors.data(), static_cast<int64_t>(tensors.size()), hyper);
}

// effops/ops/adam_step.py registers it (the launcher of triton_kernels/adam_step.py), with the bias
// corrections' step counts as floats.
void triton_route(const Call& c, at::TensorList masters, const c10::List<bool>& has_master,
                  const std::vector<double>& steps) {
  static const auto op =
      dispatch::python_route<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                  at::TensorList, const c10::List<bool>&, at::ArrayRef<double>, double, double, double,
                                  double, double, bool, bool, bool, std::optional<double>, at::OptionalIntArrayRef)>(
          kTritonRoute);
  op.call(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, masters, has_master, steps, c.lr, c.beta1,
          c.beta2, c.eps, c.weight_decay, c.amsgrad, c.maximize, c.decoupled_weight_decay, c.grad_scale, c.seeds);
}

void run(c10::DeviceType device, std::initializer_list<Backend> kernels, at::TensorList params, at::TensorList grads,
         at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
         const c10::List<bool>& has_master, at::TensorList steps, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
         at::OptionalIntArrayRef seeds) {
  Call c = check(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1, beta2,
                 eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, seeds);
  if (params.empty()) return;
  const Backend chosen = route(c, device, kernels);
  if (args::skipped(found_inf)) return;
  c.grad_scale = args::scale_of(grad_scale);
  args::BiasCorrections b = args::bias_corrections(steps, lr, beta1, beta2);
  c.step_sizes = std::move(b.step_sizes);
  c.bias_correction2_sqrts = std::move(b.bc2_sqrts);
  switch (chosen) {
    case Backend::kCpu: cpu_kernel(c); break;
    case Backend::kCuda: adam_step_cuda_kernel(c); break;
    case Backend::kTriton: triton_route(c, masters, has_master, b.steps); break;
    default: aten_route(c); break;
  }
  for (size_t i = 0; i < steps.size(); ++i) args::store_step(steps[i], b.steps[i]);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList masters, const c10::List<bool>& has_master,
                   at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool amsgrad, bool maximize, bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, at::OptionalIntArrayRef seeds) {
  run(c10::DeviceType::CPU, {Backend::kCpu}, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
      has_master, steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
      found_inf, seeds);
}

// Our CUDA kernel first; the Triton kernel where it cannot (stochastic rounding) or is not built.
void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList masters, const c10::List<bool>& has_master,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                    at::OptionalIntArrayRef seeds) {
  run(c10::DeviceType::CUDA, {Backend::kCuda, Backend::kTriton}, params, grads, exp_avgs, exp_avg_sqs,
      max_exp_avg_sqs, masters, has_master, steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
      decoupled_weight_decay, grad_scale, found_inf, seeds);
}

// torch.compile: nothing to compute on fake tensors (the op returns nothing; the real call checks its
// arguments, with shapes that may be symbolic here).
void adam_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    const c10::List<bool>&, at::TensorList, double, double, double, double, double, bool, bool, bool,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::OptionalIntArrayRef) {}

}  // namespace

#if !EFFOPS_BUILD_CUDA
void adam_step_cuda_kernel(const AdamStepCall&) { TORCH_CHECK(false, "adam_step: built without CUDA kernels"); }
#endif

}  // namespace effops::adam

// masters: the master copies that exist, has_master: a flag per param (torch.compile's functionalization
// takes no mutable list holding None).
TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, bool[] has_master, Tensor(g!)[] steps, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale, Tensor? found_inf, "
      "int[]? stochastic_round_seeds=None) -> ()");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) { m.impl("adam_step", &effops::adam::adam_step_cpu); }
TORCH_LIBRARY_IMPL(effops, CUDA, m) { m.impl("adam_step", &effops::adam::adam_step_cuda); }
// A sparse gradient reaches the dense implementations, whose checks name it.
TORCH_LIBRARY_IMPL(effops, SparseCPU, m) { m.impl("adam_step", &effops::adam::adam_step_cpu); }
TORCH_LIBRARY_IMPL(effops, SparseCUDA, m) { m.impl("adam_step", &effops::adam::adam_step_cuda); }
TORCH_LIBRARY_IMPL(effops, ADInplaceOrView, m) {
  m.impl("adam_step", torch::CppFunction::makeFromBoxedFunction<&effops::adam_args::run_and_bump_versions>());
}
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("adam_step", &effops::adam::adam_step_meta); }
