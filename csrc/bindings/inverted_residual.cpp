// effops::inverted_residual: schema, argument checks, the CPU implementation (our fused kernel or the
// plain ATen route, by a small speed policy), the CUDA implementation (the Triton forward, registered
// from Python as effops::inverted_residual_triton, or the ATen route), the Meta implementation for
// torch.compile, and the
// weight packing op whose result modules keep as state (csrc/cpu/inverted_residual.h). The backward
// and the autograd registration are in inverted_residual_backward.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include "bindings/inverted_residual.h"

#include "bindings/dispatch.h"
#include "cpu/cpu_features.h"

namespace effops::bindings::inverted_residual {

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

int activation_code(const std::optional<c10::string_view>& name) {
  if (!name.has_value() || *name == "none") return ir::kNone;
  if (*name == "relu") return ir::kRelu;
  if (*name == "relu6") return ir::kRelu6;
  if (*name == "gelu") return ir::kGelu;
  if (*name == "silu") return ir::kSilu;
  if (*name == "hardswish") return ir::kHardswish;
  TORCH_CHECK_VALUE(false, "activation must be one of None, 'relu', 'relu6', 'gelu', 'silu', 'hardswish', got '",
                    *name, "'");
}

void check_weight(const at::Tensor& w, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                   w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", w.device());
}

void check_bias(const OptTensor& b, const char* name, int64_t channels, const at::Tensor& x) {
  if (!given(b)) return;
  check_weight(*b, name, x);
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == channels, name, " must have shape (", channels, "), got ",
                    b->sizes());
}

ir::Shape checked_shape(const at::Tensor& x, const OptTensor& expand_weight, const OptTensor& expand_bias,
                        const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                        const OptTensor& project_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        const std::optional<c10::string_view>& activation, bool residual) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "stride must be two positive ints, got ",
                    stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
                    "padding must be two non-negative ints, got ", padding);
  ir::Shape s{};
  s.N = x.size(0), s.Cin = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.expand = given(expand_weight);
  TORCH_CHECK_VALUE(s.expand || !given(expand_bias), "expand_bias given without expand_weight");
  if (s.expand) {
    const at::Tensor& ew = *expand_weight;
    check_weight(ew, "expand_weight", x);
    TORCH_CHECK_VALUE(ew.dim() == 4 && ew.size(1) == s.Cin && ew.size(2) == 1 && ew.size(3) == 1,
                      "expand_weight must have shape (hidden, ", s.Cin, ", 1, 1) for x's ", s.Cin,
                      " channels, got ", ew.sizes());
    s.Ch = ew.size(0);
    check_bias(expand_bias, "expand_bias", s.Ch, x);
  } else {
    s.Ch = s.Cin;
  }
  check_weight(dw_weight, "dw_weight", x);
  TORCH_CHECK_VALUE(dw_weight.dim() == 4 && dw_weight.size(0) == s.Ch && dw_weight.size(1) == 1,
                    "dw_weight must have shape (", s.Ch, ", 1, kh, kw) (depthwise over the ", s.Ch,
                    " expanded channels), got ", dw_weight.sizes());
  check_bias(dw_bias, "dw_bias", s.Ch, x);
  check_weight(project_weight, "project_weight", x);
  TORCH_CHECK_VALUE(project_weight.dim() == 4 && project_weight.size(1) == s.Ch && project_weight.size(2) == 1 &&
                        project_weight.size(3) == 1,
                    "project_weight must have shape (out, ", s.Ch, ", 1, 1), got ", project_weight.sizes());
  s.Cout = project_weight.size(0);
  check_bias(project_bias, "project_bias", s.Cout, x);
  s.KH = dw_weight.size(2), s.KW = dw_weight.size(3);
  s.SH = stride[0], s.SW = stride[1], s.PH = padding[0], s.PW = padding[1];
  const int64_t oh = s.H + 2 * s.PH - s.KH, ow = s.W + 2 * s.PW - s.KW;
  TORCH_CHECK_VALUE(oh >= 0 && ow >= 0, "the depthwise kernel ", s.KH, "x", s.KW, " does not fit x's ", s.H, "x",
                    s.W, " with padding ", padding);
  s.OH = oh / s.SH + 1, s.OW = ow / s.SW + 1;
  s.act = activation_code(activation);
  s.residual = residual;
  TORCH_CHECK_VALUE(!residual || (s.Cout == s.Cin && s.OH == s.H && s.OW == s.W),
                    "residual needs an output of x's shape (out channels ", s.Cout, " vs ", s.Cin, ", size ", s.OH,
                    "x", s.OW, " vs ", s.H, "x", s.W, ")");
  return s;
}

Se checked_se(const at::Tensor& x, const ir::Shape& s, const OptTensor& reduce_w, const OptTensor& reduce_b,
              const OptTensor& expand_w, const OptTensor& expand_b, c10::string_view act, c10::string_view gate) {
  Se se;
  se.on = given(reduce_w) || given(expand_w);
  if (!se.on) {
    TORCH_CHECK_VALUE(!given(reduce_b) && !given(expand_b), "se_reduce_bias / se_expand_bias given without the "
                      "squeeze-excitation weights");
    return se;
  }
  TORCH_CHECK_VALUE(given(reduce_w) && given(expand_w), "se_reduce_weight and se_expand_weight come together (",
                    given(reduce_w) ? "se_expand_weight" : "se_reduce_weight", " is missing)");
  check_weight(*reduce_w, "se_reduce_weight", x);
  TORCH_CHECK_VALUE(reduce_w->dim() == 4 && reduce_w->size(1) == s.Ch && reduce_w->size(2) == 1 &&
                        reduce_w->size(3) == 1 && reduce_w->size(0) > 0,
                    "se_reduce_weight must have shape (squeeze, ", s.Ch, ", 1, 1) for the ", s.Ch,
                    " expanded channels, got ", reduce_w->sizes());
  const int64_t squeeze = reduce_w->size(0);
  check_bias(reduce_b, "se_reduce_bias", squeeze, x);
  check_weight(*expand_w, "se_expand_weight", x);
  TORCH_CHECK_VALUE(expand_w->dim() == 4 && expand_w->size(0) == s.Ch && expand_w->size(1) == squeeze &&
                        expand_w->size(2) == 1 && expand_w->size(3) == 1,
                    "se_expand_weight must have shape (", s.Ch, ", ", squeeze, ", 1, 1), got ", expand_w->sizes());
  check_bias(expand_b, "se_expand_bias", s.Ch, x);
  se.reduce_w = reduce_w, se.reduce_b = given(reduce_b) ? reduce_b : std::nullopt;
  se.expand_w = expand_w, se.expand_b = given(expand_b) ? expand_b : std::nullopt;
  se.act = activation_code(std::optional<c10::string_view>(act));
  TORCH_CHECK_VALUE(gate == "sigmoid" || gate == "hardsigmoid", "se_gate must be 'sigmoid' or 'hardsigmoid', got '",
                    gate, "'");
  se.gate = gate == "sigmoid" ? kSigmoid : kHardsigmoid;
  return se;
}

SeGate se_gate(const Se& se, const at::Tensor& pooled) {
  const auto cast = [&](const OptTensor& t) -> OptTensor {
    return given(t) ? OptTensor(t->to(pooled.scalar_type())) : std::nullopt;
  };
  SeGate r;
  r.z1 = at::conv2d(pooled, se.reduce_w->to(pooled.scalar_type()), cast(se.reduce_b));
  r.a1 = activate(r.z1, se.act);
  r.z2 = at::conv2d(r.a1, se.expand_w->to(pooled.scalar_type()), cast(se.expand_b));
  r.g = se.gate == kSigmoid ? at::sigmoid(r.z2) : at::hardsigmoid(r.z2);
  return r;
}

at::MemoryFormat format_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
}

// [R, K, 1, 1] -> [ceil(R/16)][K][16] fp32, zero past R, written at dst.
void pack_panels(const at::Tensor& w, float* dst) {
  const int64_t R = w.size(0), K = w.size(1), Rp = ir::padded(R);
  at::Tensor padded = at::zeros({Rp, K}, w.options().dtype(at::kFloat).device(at::kCPU));
  padded.narrow(0, 0, R).copy_(w.reshape({R, K}));
  at::from_blob(dst, {Rp / ir::kPanel, K, ir::kPanel}, at::kFloat)
      .copy_(padded.view({Rp / ir::kPanel, ir::kPanel, K}).permute({0, 2, 1}));
}

// [R] (or zeros when absent) -> [padded(R)] fp32 at dst.
void pack_vector(const OptTensor& b, int64_t R, float* dst) {
  at::Tensor out = at::from_blob(dst, {ir::padded(R)}, at::kFloat);
  out.zero_();
  if (given(b)) out.narrow(0, 0, R).copy_(*b);
}

at::Tensor pack(const ir::Shape& s, const OptTensor& expand_weight, const OptTensor& expand_bias,
                const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                const OptTensor& project_bias) {
  at::Tensor packed = at::zeros({ir::packed_size(s)}, at::kFloat);
  const ir::Packed v = ir::packed_views(s, packed.data_ptr<float>());
  const int64_t Chp = ir::padded(s.Ch);
  if (s.expand) {
    pack_panels(*expand_weight, const_cast<float*>(v.expand_w));
    pack_vector(expand_bias, s.Ch, const_cast<float*>(v.expand_b));
  }
  // [Ch, 1, KH, KW] -> [KH*KW][Chp]: a tap's channels contiguous.
  at::from_blob(const_cast<float*>(v.dw_w), {s.KH * s.KW, Chp}, at::kFloat)
      .narrow(1, 0, s.Ch)
      .copy_(dw_weight.reshape({s.Ch, s.KH * s.KW}).t());
  pack_vector(dw_bias, s.Ch, const_cast<float*>(v.dw_b));
  pack_panels(project_weight, const_cast<float*>(v.project_w));
  pack_vector(project_bias, s.Cout, const_cast<float*>(v.project_b));
  return packed;
}

// The packed weights for pack's shape (a Shape needs x only for N, H, W, which packing ignores).
at::Tensor pack_op(const OptTensor& expand_weight, const OptTensor& expand_bias, const at::Tensor& dw_weight,
                   const OptTensor& dw_bias, const at::Tensor& project_weight, const OptTensor& project_bias) {
  const int64_t cin = given(expand_weight) ? expand_weight->size(1) : dw_weight.size(0);
  const at::Tensor probe = at::empty({0, cin, dw_weight.size(2), dw_weight.size(3)},
                                     dw_weight.options());
  const ir::Shape s = checked_shape(probe, expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                    project_bias, {1, 1}, {0, 0}, std::nullopt, false);
  return pack(s, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias);
}

// torch's own relu, relu6, silu and hardswish give effops' values at +-inf; its AVX-512 GELU returns
// NaN at +inf, so GELU is corrected where h is infinite.
at::Tensor activate(const at::Tensor& h, int act) {
  switch (act) {
    case ir::kRelu: return at::relu(h);
    case ir::kRelu6: return at::hardtanh(h, 0, 6);
    case ir::kSilu: return at::silu(h);
    case ir::kHardswish: return at::hardswish(h);
    case ir::kGelu: {
      at::Tensor y = at::gelu(h);
      const at::Tensor inf = h.isinf();
      if (!inf.any().item<bool>()) return y;
      return at::where(inf, at::where(h > 0, at::full({}, INFINITY, h.options()), at::full({}, NAN, h.options())), y);
    }
    default: return h;
  }
}


// The same block through ATen's convolutions (oneDNN), each tensor in memory.
at::Tensor aten_route(const ir::Shape& s, const at::Tensor& x, const OptTensor& expand_weight,
                      const OptTensor& expand_bias, const at::Tensor& dw_weight, const OptTensor& dw_bias,
                      const at::Tensor& project_weight, const OptTensor& project_bias, const Se& se) {
  at::Tensor h = x;
  if (s.expand) h = activate(at::conv2d(x, *expand_weight, expand_bias), s.act);
  h = activate(at::conv2d(h, dw_weight, dw_bias, {s.SH, s.SW}, {s.PH, s.PW}, {1, 1}, s.Ch), s.act);
  if (se.on) h = h * se_gate(se, h.mean({2, 3}, /*keepdim=*/true)).g;
  at::Tensor y = at::conv2d(h, project_weight, project_bias);
  if (s.residual) y.add_(x);
  return y.contiguous(format_of(x));
}

// In training, torch's own convolutions (autograd saving the expanded tensor) against our forward plus our
// backward. `python -m benchmarks.bench_inverted_residual --train --cpu-time --batches 16,1` (one thread,
// CPU time, forward and backward of each block; AMD Zen 5; docs/inverted_residual.md, "Backward"):
// - the fused backward (fused_backward: expansion, an image per thread), fp32, without squeeze-excitation:
//   1.10-6.1x torch's at the avx512 body and 1.03-4.8x at avx2 (torch capped too) where the output has
//   14x14 pixels or more, batch 16 and 1; at 7x7 0.91-0.97x (b16), 0.83-1.15x (b1). With
//   THP_MEM_ALLOC_ENABLE=1 (torch's large tensors on huge pages, its step faster) still 1.06-2.65x at 14x14
//   and up. With squeeze-excitation (one more pass): 1.05-4.1x where the output has 28x28 pixels or more,
//   0.87-1.94x at 14x14, 0.71-1.34x at 7x7. bf16 without squeeze-excitation (torch's native there):
//   3.7-8.3x on the stride-2 blocks, 0.57-1.0x on most stride-1 ones. Blocks without an expand conv
//   (MobileNetV3's and EfficientNet-B0's first, 112x112): 1.18-3.05x at b16, but at b1 down to 0.81x
//   (avx2, with squeeze-excitation): the 16 MiB rule below takes them (ours at b16, torch's at b1).
// - the chunked backward (the other blocks): 2.1-2.9x where torch's expanded tensor is 24 MiB or more
//   (fresh tensors that large are mmapped and page-fault on every step), 0.72-1.25x below 16 MiB.
// So: ours where the fused backward measured ahead, otherwise below kTrainMinExpandedBytes (or with
// THP_MEM_ALLOC_ENABLE=1) torch's ops (their gradients are torch's), above it ours.
constexpr int64_t kTrainMinExpandedBytes = 16ll << 20;
constexpr int64_t kTrainFusedMinPixels = 14 * 14, kTrainFusedSeMinPixels = 28 * 28;

const char* training_aten_faster(const ir::Shape& s, at::ScalarType dtype, bool fused_backward, bool se) {
  if (fused_backward && s.expand) {
    if (dtype == at::kFloat && s.OH * s.OW >= (se ? kTrainFusedSeMinPixels : kTrainFusedMinPixels)) return nullptr;
    if (dtype != at::kFloat && !se && (s.SH > 1 || s.SW > 1)) return nullptr;
  }
  const int64_t expanded_bytes = s.N * s.Ch * s.H * s.W * static_cast<int64_t>(c10::elementSize(dtype));
  const char* thp = std::getenv("THP_MEM_ALLOC_ENABLE");
  if (thp != nullptr && std::string(thp) == "1")
    return "in training with THP_MEM_ALLOC_ENABLE=1, torch's convolutions saving the expanded tensor are faster";
  if (expanded_bytes < kTrainMinExpandedBytes)
    return "in training, torch's convolutions saving the expanded tensor are as fast or faster below 16 MiB of it";
  return nullptr;
}

}  // namespace effops::bindings::inverted_residual

namespace {

using namespace effops::bindings::inverted_residual;

// Why our kernel cannot take this input, or nullptr.
const char* kernel_declines(const ir::Shape& s, const at::Tensor& x) {
  if (s.KH > 8 || s.KW > 8) return "depthwise kernels above 8x8";
  if (x.numel() == 0 || s.Cout == 0 || s.Ch == 0) return "empty tensor";
  return nullptr;
}

at::Tensor kernel_route(const ir::Shape& s, const at::Tensor& x, const OptTensor& expand_weight,
                        const OptTensor& expand_bias, const at::Tensor& dw_weight, const OptTensor& dw_bias,
                        const at::Tensor& project_weight, const OptTensor& project_bias, const OptTensor& packed,
                        const Se& se) {
  at::Tensor weights;
  if (given(packed)) {
    TORCH_CHECK_VALUE(packed->scalar_type() == at::kFloat && packed->dim() == 1 &&
                          packed->numel() == ir::packed_size(s) && packed->is_contiguous(),
                      "packed must be the float32 vector inverted_residual_pack makes for these weights (",
                      ir::packed_size(s), " values), got ", packed->scalar_type(), " ", packed->sizes());
    weights = *packed;
  } else {
    weights = pack(s, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias);
  }
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({s.N, s.Cout, s.OH, s.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto run = [&](auto type) {  // T: x's dtype (float, bf16 or fp16: checked)
    using T = decltype(type);
    const T* xp = xc.data_ptr<T>();
    const float* wp = weights.data_ptr<float>();
    at::Tensor scale, d_kept;
    if (se.on) {  // two passes: d's means, the gate from them (fp32 through ATen: N x Ch values), d scaled
      at::Tensor means = at::empty({s.N, s.Ch}, x.options().dtype(at::kFloat));
      if (ir::keep_d(s)) d_kept = at::empty({ir::kept_d_size(s)}, means.options());
      ir::depthwise_means<T>(s, xp, wp, means.data_ptr<float>(), d_kept.defined() ? d_kept.data_ptr<float>() : nullptr);
      scale = at::zeros({s.N, ir::padded(s.Ch)}, means.options());
      scale.narrow(1, 0, s.Ch).copy_(se_gate(se, means.view({s.N, s.Ch, 1, 1})).g.view({s.N, s.Ch}));
    }
    ir::forward<T>(s, xp, wp, y.data_ptr<T>(), se.on ? scale.data_ptr<float>() : nullptr,
                   d_kept.defined() ? d_kept.data_ptr<float>() : nullptr);
  };
  with_storage_type(x.scalar_type(), run);
  return format_of(x) == at::MemoryFormat::ChannelsLast ? y : y.contiguous();
}

// The speed policy: why plain ATen is faster for this input, or nullptr. Measured with
// `python -m benchmarks.bench_inverted_residual --cpu-time [--dtype bfloat16]` (one thread, CPU time of
// the thread, the 13 blocks of MobileNetV2 / MobileNetV3-Large / MNASNet at batch 1 and 16, AMD Zen 5,
// 2026-12-07; docs/inverted_residual.md):
// - fp32, AVX-512 body: our kernel 1.11-2.5x the ATen route at 7x7-28x28, 1.7-11x at 56x56-112x112.
// - fp32, AVX2 body (torch capped to AVX2 too, as on the AVX2 machines; 2026-12-07 04:00, after the
//   micro-kernel's spill fix): 1.08-2.8x on the 13 blocks at batch 1 and 16. With squeeze-excitation
//   (9 blocks): 0.74-1.63x at batch 1 (0.74x and 1.19x the two whose second pass expands again, the same
//   time won and lost), 0.91-1.12x at batch 16 below 16 MiB of torch's expanded tensor, 1.6-2.4x above
//   (torch's fresh tensors that large are mmapped and page-fault on every call, docs/dwpw_conv2d.md).
//   No exception pays: our kernel at every level.
// - bf16 where torch has native bf16 (AVX512-BF16: oneDNN's vdpbf16ps, our kernel multiplies in fp32):
//   0.65-0.99x at batch 16 on the 7x7-28x28 blocks, 1.06-1.8x at batch 1 (below 32M expand multiply-
//   adds), 4.4-5.2x where the expanded tensor is 14-38 MB.
constexpr int64_t kBf16MinExpandedBytes = 8ll << 20;
constexpr int64_t kBf16MaxExpandMacs = 32ll << 20;

const char* aten_faster(const ir::Shape& s, at::ScalarType dtype) {
  const int64_t expanded_bytes = s.N * s.Ch * s.H * s.W * static_cast<int64_t>(c10::elementSize(dtype));
  const char* thp = std::getenv("THP_MEM_ALLOC_ENABLE");
  const bool torch_faults = thp == nullptr || std::string(thp) != "1";
  // Measured against the AVX-512 body; below it (effops capped) ours is slower still.
  if (dtype == at::kBFloat16 && effops::dispatch::torch_bf16_is_native() &&
      s.N * s.H * s.W * s.Cin * s.Ch >= kBf16MaxExpandMacs &&
      !(torch_faults && expanded_bytes >= kBf16MinExpandedBytes))
    return "bf16 with native bf16 in oneDNN (vdpbf16ps) is faster where the block is large and its tensors "
           "are recycled by malloc";
  return nullptr;
}

// Why the Triton forward (the CUDA route) cannot take this input, or nullptr.
const char* triton_declines(const ir::Shape& s, const at::Tensor& x) {
  if (!c10::Dispatcher::singleton().findSchema({"effops::inverted_residual_triton", ""}).has_value())
    return "triton is not installed";
  if (x.numel() == 0 || s.Cout == 0 || s.Ch == 0) return "empty tensor";
  if (s.N > 65535) return "a batch above 65535 images (the Triton kernels' CUDA grid z)";
  int64_t span = 1;  // elements one image of x reaches
  for (int d = 1; d < 4; ++d) span += (x.size(d) - 1) * x.stride(d);
  if (std::max({span, s.Cout * s.OH * s.OW, s.Cout * s.Ch, s.Ch * s.Cin}) >= (int64_t(1) << 31))
    return "an image or weight spanning 2**31 elements or more (int32 offsets in the Triton kernels)";
  return nullptr;
}

// The op on `kDevice` tensors. CPU: our kernel or the ATen route by the speed policy above; "triton"
// forced runs the Triton forward in Triton's interpreter (tests). CUDA: the Triton forward (no speed
// rule: it has never been measured against cuDNN), the ATen route when forced or when Triton cannot
// take the input.
template <c10::DeviceType kDevice>
at::Tensor forward_impl(const at::Tensor& x, const OptTensor& expand_weight, const OptTensor& expand_bias,
                        const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                        const OptTensor& project_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        std::optional<c10::string_view> activation, bool residual, const OptTensor& packed,
                        const OptTensor& se_reduce_weight, const OptTensor& se_reduce_bias,
                        const OptTensor& se_expand_weight, const OptTensor& se_expand_bias,
                        c10::string_view se_activation, c10::string_view se_gate_name) {
  const ir::Shape s = checked_shape(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias,
                                    stride, padding, activation, residual);
  const Se se = checked_se(x, s, se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias, se_activation,
                           se_gate_name);
  using effops::dispatch::Backend;
  constexpr bool kCpu = kDevice == c10::DeviceType::CPU;
  const Backend route =
      kCpu ? effops::dispatch::choose("inverted_residual", kDevice, Backend::kCpu, kernel_declines(s, x),
                                      aten_faster(s, x.scalar_type()))
           : effops::dispatch::choose("inverted_residual", kDevice, Backend::kTriton, triton_declines(s, x), nullptr);
  switch (route) {
    case Backend::kCpu:
      return kernel_route(s, x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, packed,
                          se);
    case Backend::kReference:
      return aten_route(s, x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, se);
    case Backend::kTriton:  // registered from Python; packed is the CPU kernel's layout, which Triton never reads
      return effops::dispatch::python_route<decltype(forward_impl<kDevice>)>("effops::inverted_residual_triton")
          .call(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, stride, padding,
                activation, residual, std::nullopt, se_reduce_weight, se_reduce_bias, se_expand_weight,
                se_expand_bias, se_activation, se_gate_name);
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, "backend '", effops::dispatch::backend_name(route),
                                  "' is forced but has no kernel for inverted_residual");
  }
}

at::Tensor forward_meta(const at::Tensor& x, const OptTensor& expand_weight, const OptTensor& expand_bias,
                        const at::Tensor& dw_weight, const OptTensor& dw_bias, const at::Tensor& project_weight,
                        const OptTensor& project_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                        std::optional<c10::string_view> activation, bool residual, const OptTensor& packed,
                        const OptTensor& se_reduce_weight, const OptTensor& se_reduce_bias,
                        const OptTensor& se_expand_weight, const OptTensor& se_expand_bias,
                        c10::string_view se_activation, c10::string_view se_gate_name) {
  const ir::Shape s = checked_shape(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias,
                                    stride, padding, activation, residual);
  checked_se(x, s, se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias, se_activation, se_gate_name);
  return at::empty({s.N, s.Cout, s.OH, s.OW}, x.options().memory_format(format_of(x)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops, m) {
  // flexible_layout: any strides in, the output in x's memory format (channels_last or contiguous). Under
  // torch.compile inductor may then hand the op the channels-last tensors its layout optimization made of
  // an NCHW model, instead of converting them back to NCHW around every block (what needs_exact_strides, the
  // default for custom ops, does: 1.3x slower on MNASNet's compiled NCHW model at batch 16,
  // docs/perf/models.md).
  m.def("inverted_residual(Tensor x, Tensor? expand_weight, Tensor? expand_bias, Tensor dw_weight, "
        "Tensor? dw_bias, Tensor project_weight, Tensor? project_bias, int[2] stride, int[2] padding, "
        "str? activation, bool residual, Tensor? packed=None, Tensor? se_reduce_weight=None, "
        "Tensor? se_reduce_bias=None, Tensor? se_expand_weight=None, Tensor? se_expand_bias=None, "
        "str se_activation='relu', str se_gate='hardsigmoid') -> Tensor",
        {at::Tag::flexible_layout});
  m.def("inverted_residual_pack(Tensor? expand_weight, Tensor? expand_bias, Tensor dw_weight, Tensor? dw_bias, "
        "Tensor project_weight, Tensor? project_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("inverted_residual", &forward_impl<c10::DeviceType::CPU>);
  m.impl("inverted_residual_pack", &pack_op);
}

TORCH_LIBRARY_IMPL(effops, CUDA, m) { m.impl("inverted_residual", &forward_impl<c10::DeviceType::CUDA>); }

TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("inverted_residual", &forward_meta); }
