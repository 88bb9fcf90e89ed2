// torch glue for the optimizer's eager CPU fast path: torch.classes.effops_cpu.AdamPlan.
//
// effops.optim.Adam builds a plan once (after a step that created the state) holding every param of
// every group with its state tensors, and then steps through `plan.step(hyper, flags)`: one call per
// optimizer step with no per-tensor Python work. Each step the plan reads the gradients from the
// params themselves (p.grad), re-checks every tensor (dtype, shape, device, dense layout shared with
// the param) and the hyper-parameters, computes the bias corrections from the step counts (the same
// double arithmetic as torch's single-tensor Adam), runs the kernel of csrc/cpu/adam_step.cpp on all
// groups at once, increments the step counts and bumps the version counters of everything written.
//
// step() returns false, having touched nothing, whenever anything differs from what the plan was
// built for or from what the kernel accepts (a param gained or lost its gradient, a dtype or shape
// changed, a sparse or badly laid out gradient, an out-of-range hyper-parameter, ...): the optimizer
// then drops the plan and takes its checked path, which adapts the state or raises the named error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "bindings/adam_step_checks.h"
#include "cpu/adam_step.h"

namespace {

using effops::cpu::AdamDtype;
using effops::cpu::AdamHyper;
using effops::cpu::AdamTensor;

constexpr size_t kHyperPerGroup = 5;  // lr, beta1, beta2, eps, weight_decay
constexpr size_t kFlagsPerGroup = 3;  // amsgrad, maximize, decoupled_weight_decay

bool dtype_code(at::ScalarType s, AdamDtype* out) {
  switch (s) {
    case at::kFloat: *out = AdamDtype::kFloat32; return true;
    case at::kBFloat16: *out = AdamDtype::kBFloat16; return true;
    case at::kHalf: *out = AdamDtype::kFloat16; return true;
    default: return false;
  }
}

// What the kernel needs of every tensor of a param: a dense CPU tensor of `dtype` with the param's
// shape and element order (the same rule as the op's glue, csrc/bindings/adam_step_checks.h).
bool like(const at::Tensor& t, const at::Tensor& param, at::ScalarType dtype) {
  // Inference tensors are left to the checked path: their version counters cannot be bumped.
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.scalar_type() != dtype ||
      t.sizes() != param.sizes() || t.is_inference()) {
    return false;
  }
  return t.numel() == 0 || (t.is_non_overlapping_and_dense() && effops::adam_glue::same_order(t, param));
}

bool step_ok(const at::Tensor& s) {
  return s.defined() && s.layout() == at::kStrided && s.device().is_cpu() && s.numel() == 1 && !s.is_inference() &&
         (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble);
}

class AdamPlan : public torch::CustomClassHolder {
 public:
  // params, exp_avgs, exp_avg_sqs, steps: one per param, groups one after the other (group g ends
  // before index group_ends[g]); max_exp_avg_sqs: one per param of the groups with amsgrad[g];
  // masters: one per param with has_master[i]; absent: the params of the groups without a gradient.
  AdamPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
           std::vector<at::Tensor> max_exp_avg_sqs, std::vector<at::Tensor> masters, std::vector<int64_t> has_master,
           std::vector<at::Tensor> steps, std::vector<int64_t> group_ends, std::vector<int64_t> amsgrad,
           std::vector<at::Tensor> absent)
      : params_(std::move(params)), exp_avgs_(std::move(exp_avgs)), exp_avg_sqs_(std::move(exp_avg_sqs)),
        steps_(std::move(steps)), group_ends_(std::move(group_ends)), amsgrad_(std::move(amsgrad)),
        absent_(std::move(absent)) {
    const size_t n = params_.size();
    TORCH_CHECK(exp_avgs_.size() == n && exp_avg_sqs_.size() == n && steps_.size() == n && has_master.size() == n,
                "AdamPlan: every per-param list needs one entry per param (", n, ")");
    TORCH_CHECK(amsgrad_.size() == group_ends_.size(), "AdamPlan: one amsgrad flag per group");
    max_.resize(n);
    masters_.resize(n);
    size_t next_max = 0, next_master = 0, g = 0;
    group_of_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      while (g < group_ends_.size() && static_cast<int64_t>(i) >= group_ends_[g]) ++g;
      TORCH_CHECK(g < group_ends_.size(), "AdamPlan: group_ends must cover every param");
      group_of_[i] = static_cast<int32_t>(g);
      if (amsgrad_[g]) {
        TORCH_CHECK(next_max < max_exp_avg_sqs.size(), "AdamPlan: too few max_exp_avg_sqs");
        max_[i] = max_exp_avg_sqs[next_max++];
      }
      if (has_master[i]) {
        TORCH_CHECK(next_master < masters.size(), "AdamPlan: too few masters");
        masters_[i] = masters[next_master++];
      }
    }
    TORCH_CHECK(next_max == max_exp_avg_sqs.size() && next_master == masters.size(),
                "AdamPlan: more max_exp_avg_sqs or masters than params that take them");
  }

  // One step of every group: hyper holds (lr, beta1, beta2, eps, weight_decay) per group, flags
  // (amsgrad, maximize, decoupled_weight_decay) per group. False: nothing was touched (see the top).
  bool step(std::vector<double> hyper, std::vector<int64_t> flags) {
    const size_t groups = group_ends_.size();
    if (hyper.size() != kHyperPerGroup * groups || flags.size() != kFlagsPerGroup * groups) return false;
    std::vector<AdamHyper> hypers(groups);
    for (size_t g = 0; g < groups; ++g) {
      const double* h = &hyper[kHyperPerGroup * g];
      const int64_t* f = &flags[kFlagsPerGroup * g];
      // The op's ranges (NaN fails every comparison, so it fails here too).
      if (!(h[0] >= 0.0 && h[1] >= 0.0 && h[1] < 1.0 && h[2] >= 0.0 && h[2] < 1.0 && h[3] >= 0.0 && h[4] >= 0.0)) {
        return false;
      }
      if ((f[0] != 0) != (amsgrad_[g] != 0)) return false;
      hypers[g] = AdamHyper{h[0], h[1], h[2], h[3], h[4], f[0] != 0, f[1] != 0, f[2] != 0, false, 1.0};
    }
    for (const at::Tensor& p : absent_) {
      if (p.grad().defined()) return false;  // a param gained a gradient: its state may need creating
    }
    const size_t n = params_.size();
    grads_.resize(n);
    new_steps_.resize(n);
    tensors_.clear();
    tensors_.reserve(n);
    // Bias corrections are computed once per distinct (step, group): usually once per group.
    double last_step = -1.0, step_size = 0.0, bc2_sqrt = 0.0;
    int32_t last_group = -1;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor& grad = p.grad();
      AdamDtype dtype;
      if (!p.defined() || !dtype_code(p.scalar_type(), &dtype)) return false;
      const bool has_master = masters_[i].defined();
      if (has_master && dtype == AdamDtype::kFloat32) return false;
      const at::ScalarType state_dtype = has_master ? at::kFloat : p.scalar_type();
      const int32_t g = group_of_[i];
      if (!like(p, p, p.scalar_type()) || !like(grad, p, p.scalar_type()) || !like(exp_avgs_[i], p, state_dtype) ||
          !like(exp_avg_sqs_[i], p, state_dtype) || (amsgrad_[g] && !like(max_[i], p, state_dtype)) ||
          (has_master && !like(masters_[i], p, at::kFloat)) || !step_ok(steps_[i])) {
        return false;
      }
      grads_[i] = grad;
      // The count after this step, in the step tensor's own dtype (torch: step_t += 1, then
      // step = step_t.item()), then the bias corrections in double as torch's single-tensor path:
      // 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5.
      const at::Tensor& s = steps_[i];
      const double step = s.scalar_type() == at::kFloat ? static_cast<double>(*s.const_data_ptr<float>() + 1.0f)
                                                        : *s.const_data_ptr<double>() + 1.0;
      new_steps_[i] = step;
      if (step != last_step || g != last_group) {
        const AdamHyper& h = hypers[g];
        step_size = h.lr / (1.0 - std::pow(h.beta1, step));
        bc2_sqrt = std::pow(1.0 - std::pow(h.beta2, step), 0.5);
        last_step = step;
        last_group = g;
      }
      if (p.numel() == 0) continue;
      tensors_.push_back(AdamTensor{p.data_ptr(), grad.data_ptr(), exp_avgs_[i].data_ptr(),
                                    exp_avg_sqs_[i].data_ptr(), amsgrad_[g] ? max_[i].data_ptr() : nullptr,
                                    has_master ? masters_[i].data_ptr<float>() : nullptr, p.numel(), dtype,
                                    step_size, bc2_sqrt, g});
    }
    effops::cpu::adam_step(tensors_.data(), static_cast<int64_t>(tensors_.size()), hypers.data());
    // Only now, with every tensor written: the counts, and the version counters of everything the
    // step mutates (as the op's eager path and torch's fused step do; grads too, as they are
    // declared mutated for GradScaler's in-kernel unscale).
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& s = steps_[i];
      if (s.scalar_type() == at::kFloat) {
        *s.data_ptr<float>() = static_cast<float>(new_steps_[i]);
      } else {
        *s.data_ptr<double>() = new_steps_[i];
      }
      for (const at::Tensor* t : {&params_[i], &grads_[i], &exp_avgs_[i], &exp_avg_sqs_[i], &max_[i], &masters_[i],
                                   &steps_[i]}) {
        if (t->defined()) t->unsafeGetTensorImpl()->bump_version();
      }
    }
    // Do not keep the gradients alive beyond the step (zero_grad(set_to_none=True) frees them).
    for (at::Tensor& g : grads_) g.reset();
    return true;
  }

 private:
  std::vector<at::Tensor> params_, exp_avgs_, exp_avg_sqs_, max_, masters_, steps_;
  std::vector<int64_t> group_ends_, amsgrad_;
  std::vector<at::Tensor> absent_;
  std::vector<int32_t> group_of_;
  // Scratch reused across steps (no allocation per step once sized).
  std::vector<at::Tensor> grads_;
  std::vector<double> new_steps_;
  std::vector<AdamTensor> tensors_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.class_<AdamPlan>("AdamPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<at::Tensor>>())
      .def("step", &AdamPlan::step);
}
