// effops::dwpw_conv2d: depthwise conv -> activation -> 1x1 conv (docs/architecture.md).
//
//   dwpw_conv2d           the public op: checks its arguments, asks the policy, and runs either the
//                         plain ATen route (the two convolutions, under torch's autograd) or ours;
//                         CompositeImplicitAutograd, so the policy sees grad mode and under
//                         torch.compile the graph holds whichever route was chosen
//   _dwpw_conv2d          our fused forward: CPU kernel, Triton (CUDA, or CPU tensors in the
//                         interpreter), Meta, autocast; checks its arguments when called directly,
//                         not again when the public op has (fused_op_checks); its autograd calls
//   dwpw_conv2d_backward  the fused backward, which recomputes the depthwise output per tile instead of
//                         keeping it: a training step holds only x, not the N x C x H' x W' intermediate
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <utility>

#include "bindings/arg_text.h"
#include "bindings/dispatch.h"
#include "bindings/dwpw_conv2d_kernel.h"
#include "cpu/cpu_features.h"
#include "cpu/dwpw_conv2d.h"

namespace {

using effops::bindings::dtype_name;
using effops::bindings::shape_str;
using effops::dispatch::Backend;
using Needs = std::array<bool, 5>;  // gradients wanted: x, dw_weight, pw_weight, dw_bias, pw_bias

constexpr const char* kActivations[] = {"relu", "relu6", "gelu", "silu", "hardswish"};  // codes 1..5

// ---------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------
// Sizes as ints: under torch.compile with dynamic shapes a size is symbolic, and reading it guards
// (the policy and the checks specialize the graph on the sizes they read).
int64_t size_of(const at::Tensor& t, int64_t d) { return t.sym_size(d).guard_int(__FILE__, __LINE__); }
int64_t numel_of(const at::Tensor& t) { return t.sym_numel().guard_int(__FILE__, __LINE__); }
std::vector<int64_t> sizes_of_tensor(const at::Tensor& t) {
  std::vector<int64_t> v;
  for (int64_t d = 0; d < t.dim(); ++d) v.push_back(size_of(t, d));
  return v;
}

// The activation's code in csrc/cpu/dwpw_conv2d.h (0: none).
int64_t activation_code(const std::optional<c10::string_view>& activation) {
  if (!activation.has_value()) return 0;
  for (int i = 0; i < 5; ++i)
    if (*activation == kActivations[i]) return i + 1;
  TORCH_CHECK_VALUE(false, "activation must be one of (None, 'relu', 'relu6', 'gelu', 'silu', 'hardswish'), got '",
                    std::string(*activation), "'");
}

// Whether autocast is on for tensors of this device (asked only of devices autocast knows: meta has none).
bool autocast_on(c10::DeviceType device) {
  return (device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA) && at::autocast::is_autocast_enabled(device);
}

void check_float(const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, name,
                   " must have dtype in (float32, bfloat16, float16), got ", dtype_name(d));
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on ", x.device(), " like the input, got ", t.device());
}

void check_same_dtype(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " must have dtype torch.", dtype_name(x.scalar_type()),
                   " like the input, got torch.", dtype_name(t.scalar_type()));
}

void check_geometry(const char* name, at::IntArrayRef v, int64_t minimum) {
  TORCH_CHECK_VALUE(v.size() == 2, name, " must be an int or a pair of ints, got ", v);
  TORCH_CHECK_VALUE(v[0] >= minimum && v[1] >= minimum, name, " must be >= ", minimum, ", got ", v);
}

std::array<int64_t, 2> output_hw(const at::Tensor& x, const at::Tensor& dw_weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::array<int64_t, 2> out{};
  for (int i = 0; i < 2; ++i)
    out[i] = (size_of(x, 2 + i) + 2 * padding[i] - dilation[i] * (size_of(dw_weight, 2 + i) - 1) - 1) / stride[i] + 1;
  return out;
}

// ValueError / TypeError naming the argument; returns the activation code.
int64_t check_args(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                   const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                   const std::optional<c10::string_view>& activation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D, got shape ", shape_str(sizes_of_tensor(x)));
  check_float("x", x);
  const int64_t C = size_of(x, 1);
  TORCH_CHECK_VALUE(dw_weight.dim() == 4, "dw_weight must be 4-D, got shape ", shape_str(sizes_of_tensor(dw_weight)));
  check_float("dw_weight", dw_weight);
  check_device("dw_weight", dw_weight, x);
  TORCH_CHECK_VALUE(size_of(dw_weight, 1) == 1, "dw_weight must have shape (C, 1, kh, kw) (one filter per channel), got ",
                    shape_str(sizes_of_tensor(dw_weight)));
  TORCH_CHECK_VALUE(size_of(dw_weight, 0) == C, "x must have ", size_of(dw_weight, 0), " channels for dw_weight of shape ",
                    shape_str(sizes_of_tensor(dw_weight)), ", got x of shape ", shape_str(sizes_of_tensor(x)));
  TORCH_CHECK_VALUE(pw_weight.dim() == 4, "pw_weight must be 4-D, got shape ", shape_str(sizes_of_tensor(pw_weight)));
  check_float("pw_weight", pw_weight);
  check_device("pw_weight", pw_weight, x);
  TORCH_CHECK_VALUE(size_of(pw_weight, 1) == C && size_of(pw_weight, 2) == 1 && size_of(pw_weight, 3) == 1,
                    "pw_weight must have shape (out_channels, C=", C, ", 1, 1), got ", shape_str(sizes_of_tensor(pw_weight)));
  // As torch's convolutions: channels in and out, never none (an empty batch is fine).
  TORCH_CHECK_VALUE(C >= 1 && size_of(pw_weight, 0) >= 1, "x and pw_weight must have at least one channel, got x of shape ",
                    shape_str(sizes_of_tensor(x)), " and pw_weight of shape ", shape_str(sizes_of_tensor(pw_weight)));
  const bool autocasting = autocast_on(x.device().type());
  if (!autocasting) {  // under autocast the fused op casts every tensor to autocast's dtype
    check_same_dtype("dw_weight", dw_weight, x);
    check_same_dtype("pw_weight", pw_weight, x);
  }
  const std::pair<const char*, const std::optional<at::Tensor>*> biases[] = {{"dw_bias", &dw_bias}, {"pw_bias", &pw_bias}};
  for (const auto& [name, bias] : biases) {
    if (!bias->has_value() || !(*bias)->defined()) continue;
    const at::Tensor& b = **bias;
    check_device(name, b, x);
    const int64_t want = name[0] == 'd' ? C : size_of(pw_weight, 0);
    TORCH_CHECK_VALUE(b.dim() == 1 && size_of(b, 0) == want, name, " must have shape (", want, ",), got ",
                      shape_str(sizes_of_tensor(b)));
    if (!autocasting) check_same_dtype(name, b, x);
  }
  check_geometry("stride", stride, 1);
  check_geometry("padding", padding, 0);
  check_geometry("dilation", dilation, 1);
  const int64_t act = activation_code(activation);
  const auto out = output_hw(x, dw_weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(out[0] >= 1 && out[1] >= 1, "x's spatial size ", shape_str(at::IntArrayRef(sizes_of_tensor(x)).slice(2)),
                    " is too small for kernel ", shape_str(at::IntArrayRef(sizes_of_tensor(dw_weight)).slice(2)), " with padding ", padding,
                    " and dilation ", dilation);
  return act;
}

// Checked once per call. The public op checks its arguments and then calls _dwpw_conv2d through the
// dispatcher (autograd, autocast, then the device's implementation). A direct call of _dwpw_conv2d
// (torch.ops.effops._dwpw_conv2d, or a node of a compiled graph) must get the same ValueError /
// TypeError, so the device implementations check too, unless the public op has just done so: it marks
// its call on this thread (CheckedByPublicOp), and the first implementation below takes the mark
// (fused_op_checks), so a nested call checks again. The mark ends with the public op's call whether or
// not an implementation took it (a Python fake kernel, say, takes none).
thread_local bool t_checked_by_public_op = false;

class CheckedByPublicOp {
 public:
  CheckedByPublicOp() : previous_(std::exchange(t_checked_by_public_op, true)) {}
  ~CheckedByPublicOp() { t_checked_by_public_op = previous_; }
  CheckedByPublicOp(const CheckedByPublicOp&) = delete;
  CheckedByPublicOp& operator=(const CheckedByPublicOp&) = delete;

 private:
  bool previous_;
};

// The fused op's checks: check_args, or, when the public op has run them, only the activation's code.
int64_t fused_op_checks(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                        const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        const std::optional<c10::string_view>& activation) {
  if (std::exchange(t_checked_by_public_op, false)) return activation_code(activation);
  return check_args(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
}

// channels_last when x is laid out that way (and not also plainly contiguous), as the reference says.
at::MemoryFormat memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------------
// Policy: our fused kernels or torch's two convolutions
// ---------------------------------------------------------------------------------------------
// Measured with `python benchmarks/dwpw_crossover.py` (fp32, 3x3, ReLU6, CPU time; table in
// docs/dwpw_conv2d.md): where torch's largest tensor is 32 MiB or more, glibc mmaps it fresh on every
// call and each page faults and is zeroed, which the fused kernel (writing only y, on huge pages)
// avoids: 2.2-4.7x faster forward, 1.45-2.65x a training step. Below that, oneDNN's convolutions run
// as fast or faster (0.6-1.09x). Under ~1M multiply-adds the cost is per-call overhead, where the
// fused op wins: 1.4-1.5x inference, 1.65x a training step (benchmarks/bench_small_calls.py's blocks).
constexpr int64_t kTinyMacs = int64_t(1) << 20;
constexpr int64_t kLargeTensorBytes = int64_t(32) << 20;
// The AVX-512 body (avx512 level and up), fp32, against torch's AVX-512 convolutions
// (`python benchmarks/dwpw_levels.py 1|8|32`, one thread, CPU time, Zen 5; table in docs/dwpw_conv2d.md):
// below 32 MiB too it measured faster where torch's largest tensor is 8 MiB or more in a stride-1
// forward (1.09-1.68x at batch 8) and 4 MiB or more in a training step (1.09-3.0x), and slower under
// that on some shapes (512 -> 512 @7 at batch 32, 3.2 MB: forward 0.78-1.00x, step 0.90-0.93x;
// 32 -> 64 @112 at batch 1, 3.2 MB: forward 0.83x). The stride-2 forward (96 -> 96 @56) measured
// 0.69-0.94x at batch 1, 8 and 32 (2.4 and 9.6 MB at batch 8 and 32): it keeps the 32 MiB line.
constexpr int64_t kAvx512ForwardBytes = int64_t(8) << 20;
constexpr int64_t kAvx512StepBytes = int64_t(4) << 20;

struct Sizes {
  int64_t macs;                 // multiply-adds of the pointwise product
  int64_t forward_largest;      // bytes of torch's largest forward tensor (depthwise output or y)
  int64_t step_largest;         // ... of a training step (grad_x too)
  bool strided;                 // a stride above 1
  bool dilated;                 // a dilation above 1
};

Sizes sizes_of(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t element_size) {
  const auto out = output_hw(x, dw_weight, stride, padding, dilation);
  const int64_t N = size_of(x, 0), C = size_of(x, 1), O = size_of(pw_weight, 0);
  const int64_t plane = out[0] * out[1];
  const int64_t largest = N * std::max(C, O) * plane * element_size;
  return {N * plane * C * O, largest, std::max(largest, numel_of(x) * element_size),
          stride.size() == 2 && (stride[0] > 1 || stride[1] > 1),
          dilation.size() == 2 && (dilation[0] > 1 || dilation[1] > 1)};
}

// torch's large tensors are on huge pages too (its THP_MEM_ALLOC_ENABLE switch): then they no longer
// fault page by page and its convolutions measured about as fast as the fused kernels.
bool torch_uses_huge_pages() {
  const char* v = std::getenv("THP_MEM_ALLOC_ENABLE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

const char* cpu_cannot(const at::Tensor& dw_weight) {
  if (size_of(dw_weight, 2) > 7 || size_of(dw_weight, 3) > 7) return "kernel larger than 7x7";
  return nullptr;
}

// No arithmetic to fuse (an empty batch or image): torch's ops give the empty result, whichever route.
bool nothing_to_fuse(const at::Tensor& x) { return numel_of(x) == 0; }

const char* cpu_slower(const Sizes& s, at::ScalarType dtype, bool training, at::MemoryFormat format) {
  if (s.macs < kTinyMacs) return nullptr;
  const bool avx512 = dtype == at::kFloat && effops::cpu::cpu_isa_at_least(effops::cpu::CpuIsa::kAvx512);
  // bf16 where torch's bf16 convolutions are native (AVX512-BF16, oneDNN not capped below it), measured at
  // the avx512_bf16 level (`benchmarks/dwpw_levels.py 8|32|64 ... bf16`, docs/dwpw_conv2d.md): its NCHW
  // forward and both layouts' steps won below 32 MiB on some shapes (fused 0.43-0.99x; the steps with the
  // vdpbf16ps backward products still 0.76-0.91x at 256/512 channels, parity at 64 -> 128 @56) and lost on every
  // shape above it (fused 1.08-4.78x): the 32 MiB rule. Its channels-last forward: the fused forward of
  // the avx512_bf16 level (depthwise straight to bf16 pairs, vdpbf16ps pointwise) measured as fast or
  // faster on every benchmarked block at batch 1, 8 and 32 (docs/dwpw_conv2d.md, "bf16 channels-last
  // forward, rewritten"): fused at every size. Below that level (EFFOPS_CPU_ISA or use_cpu_isa capped
  // at avx512 or lower: the fp32-FMA body on bf16 tensors) torch's won (that body 0.46-0.56x at batch 8): torch.
  const bool native_bf16 = dtype == at::kBFloat16 && effops::dispatch::torch_bf16_is_native();
  if (training) {
    // Never where torch's step is wrong: its native bf16 depthwise weight gradient of a dilated channels-last
    // input reads memory it never wrote (torch 2.13; NaN at random, docs/dwpw_conv2d.md): ours, any size.
    if (native_bf16 && s.dilated && format == at::MemoryFormat::ChannelsLast) return nullptr;
    if (native_bf16 && s.step_largest < kLargeTensorBytes)
      return "bf16 training step under 32 MiB at the avx512_bf16 level: torch's native bf16 convolutions measured "
             "faster on some shapes (the fused step with vdpbf16ps backward products 0.76-0.91x)";
    if (avx512 && s.step_largest < kAvx512StepBytes)
      return "fp32 training step whose largest tensor is under 4 MiB at the avx512 level: torch's autograd measured "
             "as fast or faster on some shapes";
    if (!avx512 && s.step_largest < kLargeTensorBytes)
      return "training step whose largest tensor is under 32 MiB (malloc recycles it): torch's autograd measured "
             "as fast or faster";
    if (s.step_largest >= kLargeTensorBytes && torch_uses_huge_pages() && format == at::MemoryFormat::ChannelsLast)
      return "training step with THP_MEM_ALLOC_ENABLE=1 on channels_last: torch's autograd measured about as fast";
    return nullptr;
  }
  if (native_bf16 && format == at::MemoryFormat::ChannelsLast) {
    if (effops::cpu::dwpw::forward_takes_bf16_pairs(/*nchw=*/false)) return nullptr;
    return "bf16 channels_last forward with the kernels capped below the avx512_bf16 level: torch's native bf16 "
           "convolutions measured faster (the fp32-FMA body 0.46-0.56x at batch 8)";
  }
  if (avx512 && !s.strided && s.forward_largest < kAvx512ForwardBytes)
    return "fp32 forward whose largest tensor is under 8 MiB at the avx512 level: torch's convolutions measured as "
           "fast or faster on some shapes";
  if ((!avx512 || s.strided) && s.forward_largest < kLargeTensorBytes)
    return "torch's largest tensor is under 32 MiB (malloc recycles it): its convolutions measured as fast or faster";
  if (s.forward_largest >= kLargeTensorBytes && torch_uses_huge_pages())
    return "THP_MEM_ALLOC_ENABLE=1: torch's large tensors are on huge pages, where its convolutions measured about "
           "as fast";
  return nullptr;
}

bool has_triton_route() {
  return c10::Dispatcher::singleton().findSchema({"effops::_dwpw_conv2d_triton", ""}).has_value();
}

// The Triton kernels put the batch on grid z and index within one image with int32 offsets.
const char* triton_cannot(const at::Tensor& x, const at::Tensor& pw_weight, int64_t out_plane) {
  if (!has_triton_route()) return "triton is not installed";
  if (size_of(x, 0) > 65535) return "a batch above 65535 images (the Triton kernels' CUDA grid z)";
  int64_t span = 1;
  for (int d = 1; d < 4; ++d) span += (size_of(x, d) - 1) * x.stride(d);
  if (std::max({span, numel_of(x) / std::max<int64_t>(size_of(x, 0), 1), size_of(pw_weight, 0) * out_plane}) >= (int64_t(1) << 31))
    return "an image spanning 2**31 elements or more (int32 offsets in the Triton kernels)";
  return nullptr;
}

// No GPU run has measured a crossover yet. In fp32 the fused kernel multiplies in exact fp32 on the CUDA
// cores while cuDNN takes TF32 tensor cores by default, so it is not expected to win there.
const char* triton_slower(at::ScalarType dtype) {
  return dtype == at::kFloat ? "fp32: cuDNN's TF32 convolutions are expected to be faster (no GPU measurement yet)"
                             : nullptr;
}

// ---------------------------------------------------------------------------------------------
// The plain ATen route (the reference's arithmetic: effops/reference/dwpw_conv2d.py)
// ---------------------------------------------------------------------------------------------
bool may_read_values(const at::Tensor& h) {
  const auto keys = h.key_set();
  return h.is_cpu() && !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::FuncTorchBatched) &&
         !keys.has(c10::DispatchKey::FuncTorchGradWrapper);
}

// activation(h) as torch computes it, with the values at +-inf the reference defines (_AT_INFINITY:
// each formula in IEEE arithmetic; torch's vectorized kernels differ per CPU there).
at::Tensor activate(const at::Tensor& h, int64_t act) {
  at::Tensor y;
  double at_pos_inf = INFINITY, at_neg_inf = NAN;
  switch (act) {
    case 0: return h;
    case 1: y = at::relu(h), at_neg_inf = 0.0; break;
    case 2: y = at::hardtanh(h, 0.0, 6.0), at_pos_inf = 6.0, at_neg_inf = 0.0; break;
    case 3: y = at::gelu(h); break;
    case 4: y = at::silu(h); break;
    default: y = at::hardswish(h); break;
  }
  // relu and relu6 are clamps: torch's give the table's values on every CPU, no fix needed. Otherwise one
  // summing pass where the values can be read (plain eager CPU tensors): no infinity or NaN, no fix.
  if (act == 1 || act == 2 || (may_read_values(h) && at::isfinite(h.sum()).item<bool>())) return y;
  const at::Tensor at_infinity =
      at::where(h > 0, at::scalar_tensor(at_pos_inf, h.options()), at::scalar_tensor(at_neg_inf, h.options()));
  return at::where(h.isnan(), h, at::where(h.isinf(), at_infinity, y));
}

at::Tensor activation_backward(const at::Tensor& grad_a, const at::Tensor& h, int64_t act) {
  switch (act) {
    case 0: return grad_a;
    case 1: return at::threshold_backward(grad_a, h, 0);
    case 2: return at::hardtanh_backward(grad_a, h, 0.0, 6.0);
    case 3: return at::gelu_backward(grad_a, h);
    case 4: return at::silu_backward(grad_a, h);
    default: return at::hardswish_backward(grad_a, h);
  }
}

at::Tensor aten_forward(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                        const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  // One name for the intermediate: the pre-activation is freed before the 1x1 conv allocates its output.
  at::Tensor h = at::conv2d(x, dw_weight, dw_bias, stride, padding, dilation, size_of(x, 1));
  h = activate(h, act);
  return at::conv2d(h, pw_weight, pw_bias).contiguous(memory_format(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aten_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
    const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t act, const Needs& need) {
  const int64_t C = size_of(x, 1), O = size_of(pw_weight, 0);
  const bool need_h = need[0] || need[1] || need[3];
  at::Tensor h = at::conv2d(x, dw_weight, dw_bias, stride, padding, dilation, C);
  at::Tensor a = activate(h, act);
  auto [grad_a, grad_pw, grad_pwb] = at::convolution_backward(grad_y, a, pw_weight, at::IntArrayRef{O}, {1, 1}, {0, 0},
                                                              {1, 1}, false, {0, 0}, 1, {need_h, need[2], need[4]});
  a.reset();
  at::Tensor grad_x, grad_dw, grad_dwb;
  if (need_h) {
    const at::Tensor grad_h = activation_backward(grad_a, h, act);
    std::tie(grad_x, grad_dw, grad_dwb) = at::convolution_backward(
        grad_h, x, dw_weight, at::IntArrayRef{C}, stride, padding, dilation, false, {0, 0}, C, {need[0], need[1], need[3]});
    if (need[0]) grad_x = grad_x.contiguous(memory_format(x));
  }
  return {grad_x, grad_dw, grad_pw, grad_dwb, grad_pwb};
}

// ---------------------------------------------------------------------------------------------
// The fused op's implementations
// ---------------------------------------------------------------------------------------------
using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                              std::optional<c10::string_view>);
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardSig = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                          std::optional<c10::string_view>, std::array<bool, 5>);

// An unneeded gradient travels as an empty tensor (an op cannot return None).
at::Tensor or_empty(const at::Tensor& g, const at::Tensor& x) { return g.defined() ? g : at::empty({0}, x.options()); }

// The gradients as the Meta implementation promises them: grad_x in x's layout, the others contiguous.
Grads in_layout(const Grads& g, const at::Tensor& x, const Needs& need) {
  const auto& [gx, gdw, gpw, gdwb, gpwb] = g;
  const auto dense = [&](const at::Tensor& t) { return or_empty(t, x).contiguous(); };
  return {need[0] && gx.defined() ? gx.contiguous(memory_format(x)) : or_empty(gx, x), dense(gdw), dense(gpw),
          dense(gdwb), dense(gpwb)};
}

Needs needs_of(std::array<bool, 5> needs_input_grad) { return needs_input_grad; }

at::Tensor fused_forward_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                             const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             std::optional<c10::string_view> activation) {
  const int64_t act = fused_op_checks(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
  switch (effops::dispatch::forced_backend()) {
    case Backend::kTriton:
      return effops::dispatch::python_route<ForwardSig>("effops::_dwpw_conv2d_triton")
          .call(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)
          .contiguous(memory_format(x));
    case Backend::kReference:
      return aten_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, act);
    default:
      if (cpu_cannot(dw_weight) != nullptr || nothing_to_fuse(x))
        return aten_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, act);
      return effops::bindings::dwpw_forward_cpu(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, act);
  }
}

at::Tensor fused_forward_cuda(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                              const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              std::optional<c10::string_view> activation) {
  const int64_t act = fused_op_checks(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
  if (effops::dispatch::forced_backend() == Backend::kReference || !has_triton_route())
    return aten_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, act);
  return effops::dispatch::python_route<ForwardSig>("effops::_dwpw_conv2d_triton")
      .call(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)
      .contiguous(memory_format(x));
}

at::Tensor fused_forward_meta(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                              const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              std::optional<c10::string_view> activation) {
  fused_op_checks(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
  const auto out = output_hw(x, dw_weight, stride, padding, dilation);
  return at::empty({size_of(x, 0), size_of(pw_weight, 0), out[0], out[1]}, x.options().memory_format(memory_format(x)));
}

Grads backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                   const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<c10::string_view> activation,
                   std::array<bool, 5> needs_input_grad) {
  const int64_t act = check_args(x, dw_weight, pw_weight, dw_bias, std::nullopt, stride, padding, dilation, activation);
  const Needs need = needs_of(needs_input_grad);
  const Backend forced = effops::dispatch::forced_backend();
  Grads g;
  if (forced == Backend::kTriton) {
    g = effops::dispatch::python_route<BackwardSig>("effops::_dwpw_conv2d_backward_triton")
            .call(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation, needs_input_grad);
    effops::dispatch::record("dwpw_conv2d_backward", Backend::kTriton);
  } else if (forced == Backend::kReference || cpu_cannot(dw_weight) != nullptr || nothing_to_fuse(x)) {
    g = aten_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, act, need);
    effops::dispatch::record("dwpw_conv2d_backward", Backend::kReference);
  } else {
    int64_t bits = 0;
    for (int i = 0; i < 5; ++i) bits |= int64_t(need[i]) << i;
    g = effops::bindings::dwpw_backward_cpu(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, act,
                                            bits);
    effops::dispatch::record("dwpw_conv2d_backward", Backend::kCpu);
  }
  return in_layout(g, x, need);
}

Grads backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<c10::string_view> activation,
                    std::array<bool, 5> needs_input_grad) {
  const int64_t act = check_args(x, dw_weight, pw_weight, dw_bias, std::nullopt, stride, padding, dilation, activation);
  const Needs need = needs_of(needs_input_grad);
  Grads g;
  if (effops::dispatch::forced_backend() == Backend::kReference || !has_triton_route()) {
    g = aten_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, act, need);
  } else {
    g = effops::dispatch::python_route<BackwardSig>("effops::_dwpw_conv2d_backward_triton")
            .call(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation, needs_input_grad);
  }
  return in_layout(g, x, need);
}

Grads backward_meta(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, std::optional<c10::string_view> activation,
                    std::array<bool, 5> needs_input_grad) {
  check_args(x, dw_weight, pw_weight, dw_bias, std::nullopt, stride, padding, dilation, activation);
  const Needs need = needs_of(needs_input_grad);
  const auto empty = [&](bool wanted, std::vector<int64_t> shape) {
    return at::empty(wanted ? shape : std::vector<int64_t>{0}, x.options());
  };
  return {need[0] ? at::empty_symint(x.sym_sizes(), x.options().memory_format(memory_format(x))) : empty(false, {}),
          empty(need[1], sizes_of_tensor(dw_weight)), empty(need[2], sizes_of_tensor(pw_weight)),
          empty(need[3], {size_of(dw_weight, 0)}), empty(need[4], {size_of(pw_weight, 0)})};
}

// ---------------------------------------------------------------------------------------------
// Autograd and autocast of the fused op
// ---------------------------------------------------------------------------------------------
c10::TypedOperatorHandle<ForwardSig> fused_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("effops::_dwpw_conv2d", "").typed<ForwardSig>();
  return op;
}

c10::TypedOperatorHandle<BackwardSig> backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("effops::dwpw_conv2d_backward", "").typed<BackwardSig>();
  return op;
}

class FusedDwpw : public torch::autograd::Function<FusedDwpw> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& dw_weight,
                            const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_bias,
                            const std::optional<at::Tensor>& pw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, std::optional<c10::string_view> activation) {
    // Only the inputs are kept: the backward recomputes the depthwise output tile by tile.
    ctx->save_for_backward({x, dw_weight, pw_weight, dw_bias.value_or(at::Tensor())});
    ctx->saved_data["forced_backend"] = static_cast<int64_t>(effops::dispatch::forced_on_this_thread());
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["activation"] = activation.has_value() ? std::string(*activation) : std::string();
    const bool wanted[5] = {x.requires_grad(), dw_weight.requires_grad(), pw_weight.requires_grad(),
                            defined(dw_bias) && dw_bias->requires_grad(), defined(pw_bias) && pw_bias->requires_grad()};
    int64_t bits = 0;
    for (int i = 0; i < 5; ++i) bits |= int64_t(wanted[i]) << i;
    ctx->saved_data["needs"] = bits;
    at::AutoDispatchBelowADInplaceOrView below;
    return fused_op().call(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const effops::dispatch::ForwardBackendGuard forward_backend(ctx->saved_data["forced_backend"].toInt());
    const auto saved = ctx->get_saved_variables();
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector(),
               dilation = ctx->saved_data["dilation"].toIntVector();
    const std::string act = ctx->saved_data["activation"].toStringRef();
    const int64_t bits = ctx->saved_data["needs"].toInt();
    std::array<bool, 5> needs{};
    for (int i = 0; i < 5; ++i) needs[i] = (bits >> i) & 1;
    const std::optional<at::Tensor> dw_bias = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    const std::optional<c10::string_view> activation =
        act.empty() ? std::nullopt : std::optional<c10::string_view>(c10::string_view(act));
    auto [gx, gdw, gpw, gdwb, gpwb] = backward_op().call(grad_outputs[0].contiguous(memory_format(grad_outputs[0])),
                                                         saved[0], saved[1], saved[2], dw_bias, stride, padding,
                                                         dilation, activation, needs);
    const auto keep = [&](const at::Tensor& g, int i) { return needs[i] ? g : at::Tensor(); };
    return {keep(gx, 0), keep(gdw, 1), keep(gpw, 2), keep(gdwb, 3), keep(gpwb, 4),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor fused_forward_autograd(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                                  const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  std::optional<c10::string_view> activation) {
  return FusedDwpw::apply(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
}

// Under autocast every tensor is cast to autocast's dtype, as torch's convolutions are.
template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
at::Tensor fused_forward_autocast(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                                  const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  std::optional<c10::string_view> activation) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  const auto cast_opt = [&](const std::optional<at::Tensor>& t) {
    return defined(t) ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  };
  return fused_op().call(cast(x), cast(dw_weight), cast(pw_weight), cast_opt(dw_bias), cast_opt(pw_bias), stride,
                         padding, dilation, activation);
}

// ---------------------------------------------------------------------------------------------
// The public op
// ---------------------------------------------------------------------------------------------
struct Policy {
  Backend ours;
  const char* cannot;  // why our kernel cannot take the input (nullptr: it can)
  const char* slower;  // why torch's convolutions are faster here (nullptr: ours are, or unmeasured)
};

Policy policy(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, bool training, c10::DeviceType device,
              at::ScalarType dtype) {
  if (device == c10::DeviceType::CPU) {
    const char* cannot = cpu_cannot(dw_weight);
    if (cannot != nullptr) return {Backend::kCpu, cannot, nullptr};
    const Sizes sizes = sizes_of(x, dw_weight, pw_weight, stride, padding, dilation, c10::elementSize(dtype));
    return {Backend::kCpu, nullptr, cpu_slower(sizes, dtype, training, memory_format(x))};
  }
  if (device == c10::DeviceType::CUDA) {
    const auto out = output_hw(x, dw_weight, stride, padding, dilation);
    const char* cannot = triton_cannot(x, pw_weight, out[0] * out[1]);
    return {Backend::kTriton, cannot, cannot == nullptr ? triton_slower(dtype) : nullptr};
  }
  return {Backend::kCpu, "no effops kernel for this device", nullptr};
}

bool requires_grad(const std::optional<at::Tensor>& t) { return defined(t) && t->requires_grad(); }

at::Tensor dwpw_conv2d(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                       const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       std::optional<c10::string_view> activation) {
  const int64_t act = check_args(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
  const auto device = x.device().type();
  const bool training = at::GradMode::is_enabled() && (x.requires_grad() || dw_weight.requires_grad() ||
                                                       pw_weight.requires_grad() || requires_grad(dw_bias) ||
                                                       requires_grad(pw_bias));
  const at::ScalarType dtype =
      autocast_on(device) ? at::autocast::get_autocast_dtype(device) : x.scalar_type();
  const Policy p = policy(x, dw_weight, pw_weight, stride, padding, dilation, training, device, dtype);
  const Backend forced = effops::dispatch::forced_backend();
  TORCH_CHECK_NOT_IMPLEMENTED(forced != Backend::kCuda || device != c10::DeviceType::CUDA,
                              "backend 'cuda' is forced but has no kernel for dwpw_conv2d");
  TORCH_CHECK_NOT_IMPLEMENTED(forced != Backend::kTriton || has_triton_route(),
                              "backend 'triton' is forced but triton is not installed");
  const Backend route = effops::dispatch::choose("dwpw_conv2d", device, p.ours, p.cannot, p.slower);
  if (route == Backend::kReference) return aten_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, act);
  const CheckedByPublicOp checked;  // the fused op's implementation skips check_args, run above
  return fused_op().call(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation);
}

// The policy's answer for tensors of `device` ("cpu" or "cuda") with these shapes and dtype: "" where
// our kernels run, else why not (for tests and `python -m effops info`: meta tensors will do).
std::string route_reason(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool training,
                         c10::string_view device) {
  TORCH_CHECK_VALUE(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda', got '", std::string(device), "'");
  const Policy p = policy(x, dw_weight, pw_weight, stride, padding, dilation, training,
                          device == "cpu" ? c10::DeviceType::CPU : c10::DeviceType::CUDA, x.scalar_type());
  return p.cannot != nullptr ? p.cannot : p.slower != nullptr ? p.slower : "";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("dwpw_conv2d(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_bias=None, Tensor? pw_bias=None, "
        "int[2] stride=1, int[2] padding=0, int[2] dilation=1, str? activation=None) -> Tensor");
  // Any strides in, the output in x's memory format: inductor may pass the channels-last tensors of its
  // layout optimization instead of converting them back to the strides seen in eager (as inverted_residual).
  m.def("_dwpw_conv2d(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_bias, Tensor? pw_bias, "
        "int[2] stride, int[2] padding, int[2] dilation, str? activation) -> Tensor",
        {at::Tag::flexible_layout});
  m.def("dwpw_conv2d_backward(Tensor grad_y, Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_bias, "
        "int[2] stride, int[2] padding, int[2] dilation, str? activation, bool[5] needs_input_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(effops, CompositeImplicitAutograd, m) { m.impl("dwpw_conv2d", &dwpw_conv2d); }

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("_dwpw_conv2d", &fused_forward_cpu);
  m.impl("dwpw_conv2d_backward", &backward_cpu);
}

TORCH_LIBRARY_IMPL(effops, CUDA, m) {
  m.impl("_dwpw_conv2d", &fused_forward_cuda);
  m.impl("dwpw_conv2d_backward", &backward_cuda);
}

TORCH_LIBRARY_IMPL(effops, Meta, m) {
  m.impl("_dwpw_conv2d", &fused_forward_meta);
  m.impl("dwpw_conv2d_backward", &backward_meta);
}

TORCH_LIBRARY_IMPL(effops, Autograd, m) { m.impl("_dwpw_conv2d", &fused_forward_autograd); }

TORCH_LIBRARY_IMPL(effops, AutocastCPU, m) {
  m.impl("_dwpw_conv2d", &fused_forward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(effops, AutocastCUDA, m) {
  m.impl("_dwpw_conv2d", &fused_forward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("dwpw_conv2d_route_reason(Tensor x, Tensor dw_weight, Tensor pw_weight, int[2] stride, int[2] padding, "
        "int[2] dilation, bool training, str device) -> str", &route_reason);
}
