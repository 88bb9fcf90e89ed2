// effops::adam8bit_step: one fused Adam/AdamW step with 8-bit moments over lists of tensors, in place:
// schema, argument checks, the policy, the plain ATen route, and the CPU / CUDA / Meta registrations.
//
// The moments are block-wise quantized (effops/reference/adam8bit.py defines the maps): per param,
// exp_avg as flat int8 codes and exp_avg_sq as flat uint8 codes (one per element, in row-major order)
// with one fp32 scale per block of 256 elements each. The order of a call is adam_step's
// (bindings/adam_step.cpp): checks, route, found_inf, the route, then the step counts.
//
// Routes: our CPU kernel (csrc/cpu/adam8bit_step.cpp), the Triton kernel (registered from Python as
// effops::_adam8bit_step_triton: on CUDA, and on CPU tensors under TRITON_INTERPRET=1), or the plain
// ATen route (effops/reference/adam8bit.py in ATen ops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/adam_args.h"
#include "bindings/dispatch.h"
#include "cpu/adam8bit_step.h"

namespace effops::adam {
namespace {

using dispatch::Backend;
namespace args = effops::adam_args;

constexpr const char* kTritonRoute = "effops::_adam8bit_step_triton";
constexpr int64_t kBlock = cpu::kAdam8bitBlock;

int64_t num_blocks(int64_t numel) { return (numel + kBlock - 1) / kBlock; }

struct Call {
  at::TensorList params, grads, m_codes, m_scales, v_codes, v_scales, steps;
  std::vector<at::Tensor> masters;  // per param, undefined where none
  std::vector<double> step_sizes, bc2_sqrts;
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize, decoupled_weight_decay;
  std::optional<double> grad_scale;
};

void check_codes(const at::Tensor& t, const char* name, int64_t i, at::ScalarType dtype, int64_t numel,
                 const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, "[", i, "] must have dtype in (", args::dtype_name(dtype),
                   "), got ", args::dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == numel, name, "[", i, "] must have shape (", numel, ",), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, "[", i, "] must be on ", device, " like params[0], got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, "[", i, "] must be contiguous");
}

Call check(at::TensorList params, at::TensorList grads, at::TensorList m_codes, at::TensorList m_scales,
           at::TensorList v_codes, at::TensorList v_scales, at::TensorList masters, const c10::List<bool>& has_master,
           at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
           bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
           const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  args::check_count("grads", grads.size(), n);
  args::check_count("exp_avg_codes", m_codes.size(), n);
  args::check_count("exp_avg_scales", m_scales.size(), n);
  args::check_count("exp_avg_sq_codes", v_codes.size(), n);
  args::check_count("exp_avg_sq_scales", v_scales.size(), n);
  args::check_count("steps", steps.size(), n);
  args::check_hyper(lr, beta1, beta2, eps, weight_decay);
  args::check_scalar(grad_scale, "grad_scale");
  args::check_scalar(found_inf, "found_inf");
  Call c;
  c.masters = args::masters_per_param(masters, has_master, n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& master = c.masters[i];
    const at::ScalarType dtype = p.scalar_type();
    const bool low = dtype == at::kBFloat16 || dtype == at::kHalf;
    TORCH_CHECK_TYPE(dtype == at::kFloat || low, "params[", i, "] must have dtype in (float32, bfloat16, float16), got ",
                     args::dtype_name(dtype));
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "params[", i, "] must be a strided tensor");
    const at::Device device = params[0].device();
    args::check_grad_layout("adam8bit_step", grads[i], i);
    args::check_like(p, "params", i, dtype, "the param's", p.sizes(), device);
    args::check_like(grads[i], "grads", i, dtype, "the param's", p.sizes(), device);
    if (master.defined()) {
      TORCH_CHECK_VALUE(low, "master_params[", i, "] is only for bf16/fp16 params; params[", i, "] is ",
                        args::dtype_name(dtype));
      args::check_like(master, "master_params", i, at::kFloat, "fp32", p.sizes(), device);
    }
    const int64_t numel = p.numel();
    check_codes(m_codes[i], "exp_avg_codes", i, at::kChar, numel, device);
    check_codes(m_scales[i], "exp_avg_scales", i, at::kFloat, num_blocks(numel), device);
    check_codes(v_codes[i], "exp_avg_sq_codes", i, at::kByte, numel, device);
    check_codes(v_scales[i], "exp_avg_sq_scales", i, at::kFloat, num_blocks(numel), device);
    args::check_step(steps[i], i);
  }
  c.params = params;
  c.grads = grads;
  c.m_codes = m_codes;
  c.m_scales = m_scales;
  c.v_codes = v_codes;
  c.v_scales = v_scales;
  c.steps = steps;
  c.lr = lr;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.eps = eps;
  c.weight_decay = weight_decay;
  c.maximize = maximize;
  c.decoupled_weight_decay = decoupled_weight_decay;
  return c;
}

// Policy: the kernels walk codes in row-major order, so the params, grads and master copies must be
// contiguous. No speed rule (the kernels move 16 bytes per parameter once; the ATen route many times more).
std::string cannot(const Call& c, Backend kernel) {
  if (kernel == Backend::kCuda) return "no CUDA C++ kernel for adam8bit_step";
  if (kernel == Backend::kTriton && !args::has_op(kTritonRoute)) return "the Triton route is not registered";
  for (size_t i = 0; i < c.params.size(); ++i) {
    if (!(c.params[i].is_contiguous() && c.grads[i].is_contiguous() &&
          (!c.masters[i].defined() || c.masters[i].is_contiguous()))) {
      return "params[" + std::to_string(i) + "], its grad or master copy is not contiguous";
    }
  }
  return "";
}

Backend route(const Call& c, c10::DeviceType device, Backend ours) {
  const Backend forced = dispatch::forced_backend();
  if (forced != Backend::kAuto && forced != Backend::kReference) ours = forced;
  const std::string why = cannot(c, ours);
  return dispatch::choose("adam8bit_step", device, ours, why.empty() ? nullptr : why.c_str(), nullptr);
}

// ---------------------------------------------------------------------------------------------------
// The plain ATen route: effops/reference/adam8bit.py op for op.
// ---------------------------------------------------------------------------------------------------
at::Tensor per_element(const at::Tensor& scales, int64_t numel) {
  return scales.repeat_interleave(kBlock).slice(0, 0, numel);
}

at::Tensor block_max(const at::Tensor& x) {
  const int64_t pad = num_blocks(x.numel()) * kBlock - x.numel();
  return at::constant_pad_nd(x, {0, pad}).view({-1, kBlock}).amax(1);
}

at::Tensor inverse_scales(const at::Tensor& scales) {
  return at::where(scales > 0, scales.reciprocal(), at::zeros_like(scales));
}

std::pair<at::Tensor, at::Tensor> quantize_signed(const at::Tensor& m) {
  at::Tensor scales = block_max(m.abs());
  at::Tensor x = m.abs() * per_element(inverse_scales(scales), m.numel());
  at::Tensor q = at::round(at::sqrt(x) * 127.0).clamp_(0, 127);
  return {at::where(m < 0, -q, q).to(at::kChar), scales};
}

std::pair<at::Tensor, at::Tensor> quantize_unsigned_sqrt(const at::Tensor& r) {
  at::Tensor scales = block_max(r);
  at::Tensor x = r * per_element(inverse_scales(scales), r.numel());
  at::Tensor q = at::round(at::sqrt(x) * 256.0) - 1.0;
  return {q.clamp_(0, 255).to(at::kByte), scales};
}

void aten_route(const Call& c) {
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& param = c.params[i];
    const int64_t n = param.numel();
    if (n == 0) continue;
    const at::Tensor& master = c.masters[i];
    at::Tensor theta = (master.defined() ? master : param).reshape(-1).to(at::kFloat).clone();
    at::Tensor grad = c.grads[i].reshape(-1).to(at::kFloat);
    if (c.grad_scale.has_value()) {
      grad = grad / *c.grad_scale;
      c.grads[i].copy_(grad.view_as(c.grads[i]));
    }
    if (c.maximize) grad = -grad;
    if (c.weight_decay != 0) {
      if (c.decoupled_weight_decay) {
        theta.mul_(1 - c.lr * c.weight_decay);
      } else {
        grad = grad.add(theta, c.weight_decay);
      }
    }
    const at::Tensor mc = c.m_codes[i].to(at::kFloat);
    at::Tensor m = (mc * mc.abs()) * per_element(c.m_scales[i] / 16129.0, n);  // 127^2
    const at::Tensor c1 = c.v_codes[i].to(at::kFloat) + 1.0;
    at::Tensor r = (c1 * c1) * per_element(c.v_scales[i] * (1.0 / 65536.0), n);
    at::Tensor v = r * r;
    m.lerp_(grad, 1 - c.beta1);
    v.mul_(c.beta2).addcmul_(grad, grad, 1 - c.beta2);
    r = v.sqrt();
    // a multiply by 1 / sqrt(1 - beta2^t), as the kernels (one division per element fewer)
    const at::Tensor denom = (r * (1.0 / c.bc2_sqrts[i])).add_(c.eps);
    theta.addcdiv_(m, denom, -c.step_sizes[i]);
    auto [m_codes, m_scales] = quantize_signed(m);
    auto [v_codes, v_scales] = quantize_unsigned_sqrt(r);
    c.m_codes[i].copy_(m_codes);
    c.m_scales[i].copy_(m_scales);
    c.v_codes[i].copy_(v_codes);
    c.v_scales[i].copy_(v_scales);
    if (master.defined()) master.copy_(theta.view_as(master));
    param.copy_(theta.view_as(param));
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------
void cpu_kernel(const Call& c) {
  std::vector<cpu::Adam8bitTensor> tensors;
  tensors.reserve(c.params.size());
  for (size_t i = 0; i < c.params.size(); ++i) {
    const at::Tensor& p = c.params[i];
    if (p.numel() == 0) continue;
    const at::Tensor& master = c.masters[i];
    const at::ScalarType s = p.scalar_type();
    const cpu::AdamDtype dtype = s == at::kFloat ? cpu::AdamDtype::kFloat32
                                 : s == at::kBFloat16 ? cpu::AdamDtype::kBFloat16 : cpu::AdamDtype::kFloat16;
    tensors.push_back({p.data_ptr(), c.grads[i].data_ptr(), c.m_codes[i].data_ptr<int8_t>(),
                       c.m_scales[i].data_ptr<float>(), c.v_codes[i].data_ptr<uint8_t>(),
                       c.v_scales[i].data_ptr<float>(), master.defined() ? master.data_ptr<float>() : nullptr,
                       p.numel(), dtype, c.step_sizes[i], c.bc2_sqrts[i]});
  }
  const cpu::AdamHyper hyper{c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, false, c.maximize,
                             c.decoupled_weight_decay, c.grad_scale.has_value(), c.grad_scale.value_or(1.0)};
  cpu::adam8bit_step(tensors.data(), static_cast<int64_t>(tensors.size()), &hyper);
}

void triton_route(const Call& c, at::TensorList masters, const c10::List<bool>& has_master,
                  const std::vector<double>& steps) {
  static const auto op =
      dispatch::python_route<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                  at::TensorList, at::TensorList, const c10::List<bool>&, at::ArrayRef<double>, double,
                                  double, double, double, double, bool, bool, std::optional<double>)>(kTritonRoute);
  op.call(c.params, c.grads, c.m_codes, c.m_scales, c.v_codes, c.v_scales, masters, has_master, steps, c.lr, c.beta1,
          c.beta2, c.eps, c.weight_decay, c.maximize, c.decoupled_weight_decay, c.grad_scale);
}

void run(c10::DeviceType device, Backend ours, at::TensorList params, at::TensorList grads, at::TensorList m_codes,
         at::TensorList m_scales, at::TensorList v_codes, at::TensorList v_scales, at::TensorList masters,
         const c10::List<bool>& has_master, at::TensorList steps, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool maximize, bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
         const std::optional<at::Tensor>& found_inf) {
  Call c = check(params, grads, m_codes, m_scales, v_codes, v_scales, masters, has_master, steps, lr, beta1, beta2, eps,
                 weight_decay, maximize, decoupled_weight_decay, grad_scale, found_inf);
  if (params.empty()) return;
  const Backend chosen = route(c, device, ours);
  if (args::skipped(found_inf)) return;
  c.grad_scale = args::scale_of(grad_scale);
  args::BiasCorrections b = args::bias_corrections(steps, lr, beta1, beta2);
  c.step_sizes = std::move(b.step_sizes);
  c.bc2_sqrts = std::move(b.bc2_sqrts);
  switch (chosen) {
    case Backend::kCpu: cpu_kernel(c); break;
    case Backend::kTriton: triton_route(c, masters, has_master, b.steps); break;
    default: aten_route(c); break;
  }
  for (size_t i = 0; i < steps.size(); ++i) args::store_step(steps[i], b.steps[i]);
}

#define EFFOPS_ADAM8BIT_PARAMS                                                                                        \
  at::TensorList params, at::TensorList grads, at::TensorList m_codes, at::TensorList m_scales,                     \
      at::TensorList v_codes, at::TensorList v_scales, at::TensorList masters, const c10::List<bool>& has_master,    \
      at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,   \
      bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,                                     \
      const std::optional<at::Tensor>& found_inf
#define EFFOPS_ADAM8BIT_ARGS                                                                                          \
  params, grads, m_codes, m_scales, v_codes, v_scales, masters, has_master, steps, lr, beta1, beta2, eps,             \
      weight_decay, maximize, decoupled_weight_decay, grad_scale, found_inf

void adam8bit_step_cpu(EFFOPS_ADAM8BIT_PARAMS) { run(c10::DeviceType::CPU, Backend::kCpu, EFFOPS_ADAM8BIT_ARGS); }
void adam8bit_step_cuda(EFFOPS_ADAM8BIT_PARAMS) { run(c10::DeviceType::CUDA, Backend::kTriton, EFFOPS_ADAM8BIT_ARGS); }
// torch.compile: nothing to compute on fake tensors (as adam_step's).
void adam8bit_step_meta(EFFOPS_ADAM8BIT_PARAMS) {}

}  // namespace
}  // namespace effops::adam

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def(
      "adam8bit_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avg_codes, "
      "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_codes, Tensor(f!)[] exp_avg_sq_scales, "
      "Tensor(g!)[] masters, bool[] has_master, Tensor(h!)[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool maximize, bool decoupled_weight_decay, Tensor? grad_scale, Tensor? found_inf) -> ()");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) { m.impl("adam8bit_step", &effops::adam::adam8bit_step_cpu); }
TORCH_LIBRARY_IMPL(effops, CUDA, m) { m.impl("adam8bit_step", &effops::adam::adam8bit_step_cuda); }
// A sparse gradient reaches the dense implementations, whose checks name it.
TORCH_LIBRARY_IMPL(effops, SparseCPU, m) { m.impl("adam8bit_step", &effops::adam::adam8bit_step_cpu); }
TORCH_LIBRARY_IMPL(effops, SparseCUDA, m) { m.impl("adam8bit_step", &effops::adam::adam8bit_step_cuda); }
TORCH_LIBRARY_IMPL(effops, ADInplaceOrView, m) {
  m.impl("adam8bit_step", torch::CppFunction::makeFromBoxedFunction<&effops::adam_args::run_and_bump_versions>());
}
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("adam8bit_step", &effops::adam::adam8bit_step_meta); }
