// effops::int8_linear_dynamic: Int8Linear's op on float x (..., K) with a packed int8 weight
// (reference.int8.pack_weight): x quantized per row at run time, the int8 GEMM and the dequantizing
// epilogue; or, weight_only, float x times the dequantized weight. Output in x's dtype (autocast's
// under autocast). x gets a straight-through gradient (its rounding treated as identity), computed by
// effops::int8_linear_dynamic_backward; the bias its usual one.
//
// w_corr (optional, int32, (ceil(N/16)*16,)): reference.int8.weight_correction(w_packed), -128 x the
// weight's column sums, the starting sums of the CPU kernels that multiply a + 128 (unsigned) by the
// weights. With it the VNNI body skips summing the weight's columns per call; weight_bits=7 (a promise
// that every weight is in [-63, 63], Int8Linear's weight_bits=7) requires it and runs the 7-bit-weight
// body at every level. It is derived state the caller keeps consistent with w_packed (Int8Linear builds
// both at conversion and loading): its dtype, device and shape are checked, its values are not (that
// would cost a pass over the weights per call, the whole cost of a one-row call).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "bindings/int8_common.h"
#include "cpu/int8_gemm.h"

namespace effops::int8 {
namespace {

using cpu::Int8Epilogue;
using cpu::Int8Out;
using OptTensor = std::optional<at::Tensor>;

using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, bool,
                       const OptTensor&, int64_t);
using RouteSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                       bool);
constexpr const char* kOp = "int8_linear_dynamic";
constexpr const char* kTritonRoute = "effops::_int8_linear_dynamic_triton";

// The weight-only kernel re-reads the int8 weights for every row: past this many rows, dequantizing
// once and an fp32 GEMM (the ATen route) is as fast or faster (benchmarks/int8_rows.py).
constexpr int64_t kWeightOnlyMaxRows = 16;

void check(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale, const OptTensor& bias,
           int64_t n, const OptTensor& w_corr, int64_t weight_bits) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dims, got shape ", shape_str(x.sizes()));
  const int64_t k = x.size(-1);
  check_k("x's last dim (in_features)", k);
  TORCH_CHECK_VALUE(n >= 0, "out_features must be >= 0, got ", n);
  check_dtype("w_packed", w_packed, at::kChar);
  check_device("w_packed", w_packed, x);
  check_shape("w_packed", w_packed, {ceil_div(n, kPackNR), ceil_div(k, kPackKG), kPackNR, kPackKG});
  check_dtype("w_scale", w_scale, at::kFloat);
  check_device("w_scale", w_scale, x);
  check_shape("w_scale", w_scale, {n});
  if (bias) {
    check_dtype("bias", *bias, at::kFloat);
    check_device("bias", *bias, x);
    check_shape("bias", *bias, {n});
  }
  TORCH_CHECK_VALUE(weight_bits == 8 || weight_bits == 7, "weight_bits must be 8 or 7, got ", weight_bits);
  TORCH_CHECK_VALUE(weight_bits == 8 || w_corr.has_value(),
                    "w_corr must be given with weight_bits=7 (reference.int8.weight_correction(w_packed)), got None");
  if (w_corr) {
    check_dtype("w_corr", *w_corr, at::kInt);
    check_device("w_corr", *w_corr, x);
    check_shape("w_corr", *w_corr, {ceil_div(n, kPackNR) * kPackNR});
  }
}

at::Tensor output(const at::Tensor& x, int64_t n) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return at::empty(shape, x.options());
}

// reference.int8.int8_linear_dynamic in ATen ops.
at::Tensor aten_route(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale, const OptTensor& bias,
                      int64_t n, bool weight_only) {
  const int64_t k = x.size(-1);
  if (weight_only)
    return at::linear(x.to(at::kFloat), dequantized_weight(w_packed, w_scale, k), bias).to(x.scalar_type());
  const auto [q, s] = quantize_rowwise_aten(x);
  return int8_linear_aten(q, s, unpack_weight(w_packed, n, k), w_scale, bias, x.scalar_type());
}

at::Tensor cpu_kernel(const at::Tensor& x_in, const at::Tensor& w_packed_in, const at::Tensor& w_scale_in,
                      const OptTensor& bias_in, int64_t N, bool weight_only, const OptTensor& w_corr_in,
                      int64_t weight_bits) {
  const int64_t K = x_in.size(-1), M = x_in.numel() / K;
  if (M == 0 || N == 0) return output(x_in, N);
  const auto x = (x_in.dim() == 2 ? x_in : x_in.reshape({M, K})).contiguous();
  const auto w_packed = w_packed_in.contiguous(), w_scale = w_scale_in.contiguous();
  const OptTensor bias = bias_in ? OptTensor(bias_in->contiguous()) : std::nullopt;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (weight_only) {
      cpu::int8_weight_only_linear<T>(x.data_ptr<T>(), M, K, w_packed.data_ptr<int8_t>(), N, w_scale.data_ptr<float>(),
                                      b, out.data_ptr<T>());
      return;
    }
    const OptTensor w_corr = w_corr_in ? OptTensor(w_corr_in->contiguous()) : std::nullopt;
    const Int8Out kind = std::is_same_v<T, float> ? Int8Out::kFloat
                         : std::is_same_v<T, c10::BFloat16> ? Int8Out::kBFloat16 : Int8Out::kHalf;
    // Rows in chunks, each quantized right before its GEMM: the chunk's int8 rows (256 x K bytes) are
    // still in L2/L3 when the GEMM re-reads them once per block of weight panels, where quantizing all
    // of a large M first left them to be re-read from memory (one thread, K = N = 4096, M = 2048: one
    // call took 1.06x (8-bit) and 1.15x (7-bit weights) the time of eight 256-row calls).
    constexpr int64_t kRowChunk = 256;
    const int64_t chunk = std::min(M, kRowChunk);
    // Scratch, not tensors: two at::empty cost ~0.5 us of a one-row call's ~4 us fixed cost.
    const std::unique_ptr<int8_t[]> q(new int8_t[chunk * K]);
    std::vector<float> xs(M);
    // On VNNI the 8-bit GEMM wants A as a + 128 too (int8_gemm_u8s8): quantized so, it reads it in place.
    const bool w7 = weight_bits == 7, shifted = w7 || cpu::int8_gemm_u8s8_direct();
    const int32_t* corr = w_corr ? w_corr->data_ptr<int32_t>() : nullptr;
    for (int64_t i0 = 0; i0 < M; i0 += chunk) {
      const int64_t rows = std::min(chunk, M - i0);
      cpu::quantize_rowwise<T>(x.data_ptr<T>() + i0 * K, rows, K, q.get(), xs.data() + i0, shifted);
      const Int8Epilogue epi{kind, out.data_ptr<T>() + i0 * N, N, xs.data() + i0, w_scale.data_ptr<float>(), b};
      const auto* q_u = reinterpret_cast<const uint8_t*>(q.get());
      if (w7)
        cpu::int8_gemm_u8s7(q_u, K, rows, K, w_packed.data_ptr<int8_t>(), N, corr, epi);
      else if (shifted)
        cpu::int8_gemm_u8s8(q_u, K, rows, K, w_packed.data_ptr<int8_t>(), N, corr, epi);
      else
        cpu::int8_gemm_s8(q.get(), K, rows, K, w_packed.data_ptr<int8_t>(), N, epi);
    }
  });
  return with_leading_dims(out, x_in);
}

const char* triton_reason(const at::Tensor& x, const at::Tensor& w_packed, int64_t n, bool weight_only) {
  if (weight_only) return "weight_only has no Triton kernel";
  return triton_size_cannot(std::max({x.numel(), w_packed.numel(), x.numel() / x.size(-1) * n}));
}

// The Triton GEMM is exact for any int8 weights, 7-bit ones included: it needs no w_corr.
at::Tensor triton_route(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                        const OptTensor& bias, int64_t n) {
  return dispatch::python_route<RouteSig>(kTritonRoute).call(x, w_packed, w_scale, bias, n);
}

at::Tensor int8_linear_dynamic_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                   const OptTensor& bias, int64_t n, bool weight_only, const OptTensor& w_corr,
                                   int64_t weight_bits) {
  check(x, w_packed, w_scale, bias, n, w_corr, weight_bits);
  const bool many_rows = x.numel() / x.size(-1) > kWeightOnlyMaxRows;
  const char* slower = weight_only && many_rows
                           ? "weight_only with more than 16 rows: dequantizing once and an fp32 GEMM is faster"
                           : nullptr;
  switch (choose_cpu(kOp, nullptr, slower, kTritonRoute, triton_reason(x, w_packed, n, weight_only))) {
    case Backend::kCpu: return cpu_kernel(x, w_packed, w_scale, bias, n, weight_only, w_corr, weight_bits);
    case Backend::kTriton: return triton_route(x, w_packed, w_scale, bias, n);
    default: return aten_route(x, w_packed, w_scale, bias, n, weight_only);
  }
}

at::Tensor int8_linear_dynamic_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                    const OptTensor& bias, int64_t n, bool weight_only, const OptTensor& w_corr,
                                    int64_t weight_bits) {
  check(x, w_packed, w_scale, bias, n, w_corr, weight_bits);
  switch (choose_cuda(kOp, "no CUDA C++ kernel for int8_linear_dynamic (the Triton route serves CUDA tensors)",
                      kTritonRoute, triton_reason(x, w_packed, n, weight_only))) {
    case Backend::kTriton: return triton_route(x, w_packed, w_scale, bias, n);
    default: return aten_route(x, w_packed, w_scale, bias, n, weight_only);
  }
}

at::Tensor int8_linear_dynamic_meta(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                    const OptTensor& bias, int64_t n, bool weight_only, const OptTensor& w_corr,
                                    int64_t weight_bits) {
  check(x, w_packed, w_scale, bias, n, w_corr, weight_bits);
  return output(x, n);
}

// ---------------------------------------------------------------------------------------------
// The straight-through gradient: grad_x = grad_y @ (w_int8 * w_scale), in fp32, in grad_y's dtype;
// grad_bias = grad_y summed over rows (an empty tensor when not needed: an op returns no None).
// One route on every device: ATen's GEMM on the dequantized weight.
// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> int8_linear_dynamic_backward(const at::Tensor& grad_y, const at::Tensor& w_packed,
                                                                const at::Tensor& w_scale, int64_t in_features,
                                                                bool need_bias) {
  dispatch::record("int8_linear_dynamic_backward", Backend::kReference);
  const auto g = grad_y.to(at::kFloat);
  auto grad_x = at::matmul(g, dequantized_weight(w_packed, w_scale, in_features)).to(grad_y.scalar_type());
  auto grad_b = need_bias ? g.reshape({-1, g.size(-1)}).sum(0) : at::empty({0}, g.options());
  return {grad_x, grad_b};
}

class StraightThrough : public torch::autograd::Function<StraightThrough> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_packed,
                            const at::Tensor& w_scale, const OptTensor& bias, int64_t n, bool weight_only,
                            const OptTensor& w_corr, int64_t weight_bits) {
    ctx->save_for_backward({w_packed, w_scale});
    ctx->saved_data["forced_backend"] = static_cast<int64_t>(effops::dispatch::forced_on_this_thread());
    ctx->saved_data["in_features"] = x.size(-1);
    ctx->saved_data["has_bias"] = bias.has_value();
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = find_op<Sig>("effops::int8_linear_dynamic");
    return op.call(x, w_packed, w_scale, bias, n, weight_only, w_corr, weight_bits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const effops::dispatch::ForwardBackendGuard forward_backend(ctx->saved_data["forced_backend"].toInt());
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: bias is the fourth where it is given.
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
    static const auto op = find_op<BackwardSig>("effops::int8_linear_dynamic_backward");
    auto [grad_x, grad_b] = op.call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["in_features"].toInt(),
                                    need_bias);
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), at::Tensor(), at::Tensor(),
            need_bias ? grad_b : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor int8_linear_dynamic_autograd(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                        const OptTensor& bias, int64_t n, bool weight_only, const OptTensor& w_corr,
                                        int64_t weight_bits) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || (bias && bias->requires_grad())))
    return StraightThrough::apply(x, w_packed, w_scale, bias, n, weight_only, w_corr, weight_bits);
  // No gradient wanted (inference): no graph node to build.
  at::AutoDispatchBelowADInplaceOrView below;
  static const auto op = find_op<Sig>("effops::int8_linear_dynamic");
  return op.call(x, w_packed, w_scale, bias, n, weight_only, w_corr, weight_bits);
}

// Under autocast the op casts x only: the int8 weight, the fp32 scales and bias stay as they are.
template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor int8_linear_dynamic_autocast(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                        const OptTensor& bias, int64_t n, bool weight_only, const OptTensor& w_corr,
                                        int64_t weight_bits) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  static const auto op = find_op<Sig>("effops::int8_linear_dynamic");
  return op.call(x.to(at::autocast::get_autocast_dtype(device)), w_packed, w_scale, bias, n, weight_only, w_corr,
                 weight_bits);
}

}  // namespace
}  // namespace effops::int8

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("int8_linear_dynamic(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, int out_features, "
        "bool weight_only=False, Tensor? w_corr=None, int weight_bits=8) -> Tensor");
  m.def("int8_linear_dynamic_backward(Tensor grad_y, Tensor w_packed, Tensor w_scale, int in_features, "
        "bool need_bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) { m.impl("int8_linear_dynamic", &effops::int8::int8_linear_dynamic_cpu); }
TORCH_LIBRARY_IMPL(effops, CUDA, m) { m.impl("int8_linear_dynamic", &effops::int8::int8_linear_dynamic_cuda); }
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("int8_linear_dynamic", &effops::int8::int8_linear_dynamic_meta); }
TORCH_LIBRARY_IMPL(effops, Autograd, m) {
  m.impl("int8_linear_dynamic", &effops::int8::int8_linear_dynamic_autograd);
}
TORCH_LIBRARY_IMPL(effops, AutocastCPU, m) {
  m.impl("int8_linear_dynamic",
         &effops::int8::int8_linear_dynamic_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(effops, AutocastCUDA, m) {
  m.impl("int8_linear_dynamic",
         &effops::int8::int8_linear_dynamic_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
TORCH_LIBRARY_IMPL(effops, CompositeExplicitAutograd, m) {
  m.impl("int8_linear_dynamic_backward", &effops::int8::int8_linear_dynamic_backward);
}
