// What the int8 ops' bindings (quantize_rowwise.cpp, int8_gemm.cpp, int8_linear_dynamic.cpp) share:
// argument checks worded as the Python API names the arguments, the plain ATen routes (the arithmetic
// of effops/reference/int8.py in ATen ops), and how a route is chosen where the op has two kernels of
// ours (the CPU or CUDA C++ kernel, and the Triton route registered from Python).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

#include "bindings/arg_text.h"
#include "bindings/dispatch.h"

namespace effops::int8 {

using effops::bindings::dtype_name;
using effops::bindings::shape_str;

using dispatch::Backend;

// Largest K for which no int32 accumulator can overflow: K * 128 * 128 < 2**31 (reference.int8.MAX_K).
constexpr int64_t kMaxK = INT64_C(2147483647) / (128 * 128);
// Int8Linear's packed weight: panels of 16 output channels, groups of 4 input features
// (reference.int8.PACK_NR / PACK_KG).
constexpr int64_t kPackNR = 16;
constexpr int64_t kPackKG = 4;

inline int64_t ceil_div(int64_t n, int64_t m) { return (n + m - 1) / m; }

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

inline void check_dtype(const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must have dtype in (", dtype_name(want), "), got ",
                   dtype_name(t.scalar_type()));
}

inline void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, " must have dtype in (float32, bfloat16, float16), got ",
                   dtype_name(t.scalar_type()));
}

inline void check_ndim(const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", shape_str(t.sizes()));
}

inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, name, " must have shape ", shape_str(want), ", got ", shape_str(t.sizes()));
}

inline void check_device(const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.device() == input.device(), name, " must be on ", input.device(), " like the input, got ",
                    t.device());
}

inline void check_k(const char* what, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, what, " must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= kMaxK, what, " must be <= ", kMaxK, " so that the int32 accumulator cannot overflow, got ",
                    k);
}

// Calls f(T{}) with T the kernel element type of a float tensor (fp32, bf16, fp16; checked before).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: return f(float{});
  }
}

// A kernel's (rows, features) output as (*x.shape[:-1], features), as F.linear returns it: not a view
// (a module output that is a view breaks in-place use under FSDP2), so an _unsafe_view as torch's matmul.
inline at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  auto shape = x.sizes().vec();
  shape.back() = y.size(-1);
  return at::_unsafe_view(y, shape);
}

// ---------------------------------------------------------------------------------------------
// The plain ATen routes: reference/int8.py's arithmetic, op for op.
// ---------------------------------------------------------------------------------------------
inline std::tuple<at::Tensor, at::Tensor> quantize_rowwise_aten(const at::Tensor& x) {
  const auto x32 = x.to(at::kFloat);
  const auto absmax = x32.abs().amax(-1);  // NaN or inf where the row holds one
  auto scale = absmax / 127.0;
  scale = at::where(scale > 0, scale, at::ones_like(scale));
  auto q = at::round(x32 / scale.unsqueeze(-1)).clamp(-127, 127);
  const auto finite = at::isfinite(absmax);
  q = at::where(finite.unsqueeze(-1), q, at::zeros_like(q)).to(at::kChar);
  return {q, at::where(finite, scale, at::full_like(scale, NAN))};
}

// fp64 is exact here: every partial sum is an integer below K * 2**14 <= 2**31 < 2**53.
inline at::Tensor int8_mm_aten(const at::Tensor& a, const at::Tensor& b) {
  return at::mm(a.to(at::kDouble), b.to(at::kDouble)).to(at::kInt);
}

inline at::Tensor int8_linear_aten(const at::Tensor& x_int8, const at::Tensor& x_scale, const at::Tensor& w_int8,
                                   const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                   at::ScalarType out_dtype) {
  const int64_t k = x_int8.size(-1), n = w_int8.size(0);
  auto lead = x_int8.sizes().vec();
  lead.back() = n;
  const auto acc = int8_mm_aten(x_int8.reshape({-1, k}), w_int8.t()).reshape(lead);
  auto y = acc.to(at::kFloat) * x_scale.unsqueeze(-1).to(at::kFloat) * w_scale.to(at::kFloat);
  if (bias) y = y + bias->to(at::kFloat);
  return y.to(out_dtype);
}

// reference.int8.unpack_weight: the (N, K) int8 weight of a packed one.
inline at::Tensor unpack_weight(const at::Tensor& packed, int64_t n, int64_t k) {
  return packed.permute({0, 2, 1, 3})
      .reshape({packed.size(0) * kPackNR, packed.size(1) * kPackKG})
      .narrow(0, 0, n)
      .narrow(1, 0, k);
}

inline at::Tensor dequantized_weight(const at::Tensor& packed, const at::Tensor& w_scale, int64_t k) {
  return unpack_weight(packed, w_scale.size(0), k).to(at::kFloat) * w_scale.to(at::kFloat).unsqueeze(1);
}

// ---------------------------------------------------------------------------------------------
// Choosing among our kernels: the native one (CPU or CUDA C++) and the Triton route, a Python op.
// ---------------------------------------------------------------------------------------------
inline bool has_op(const char* name) { return c10::Dispatcher::singleton().findSchema({name, ""}).has_value(); }

// Why the Triton route cannot take this call: its own reason, or the route missing (effops/ops registers
// it only where triton is installed).
inline const char* triton_cannot(const char* route, const char* reason) {
  if (reason != nullptr) return reason;
  return has_op(route) ? nullptr : "triton is not installed";
}

// The Triton kernels index with int32 element offsets.
inline const char* triton_size_cannot(int64_t largest_numel) {
  return largest_numel >= (INT64_C(1) << 31) ? "tensors of 2**31 elements or more (int32 offsets in the Triton kernel)"
                                            : nullptr;
}

// On CPU tensors: the C++ kernel (automatic), or Triton in its interpreter when forced (tests).
inline Backend choose_cpu(const char* op, const char* cpu_cannot, const char* cpu_slower, const char* route,
                          const char* route_cannot) {
  if (dispatch::forced_backend() == Backend::kTriton)
    return dispatch::choose(op, c10::DeviceType::CPU, Backend::kTriton, triton_cannot(route, route_cannot), nullptr);
  return dispatch::choose(op, c10::DeviceType::CPU, Backend::kCpu, cpu_cannot, cpu_slower);
}

// On CUDA tensors: Triton where it takes the input, else the CUDA C++ kernel, else plain ATen. The
// CUDA kernel stages 64 x 64 tiles with plain loads and mma.sync; Triton's is autotuned over pipelined
// 128-wide tiles and compiles to warpgroup MMA on sm_90, so it is expected to be faster (no GPU has
// measured the two side by side yet).
inline Backend choose_cuda(const char* op, const char* cuda_cannot, const char* route, const char* route_cannot) {
#if !EFFOPS_BUILD_CUDA
  if (cuda_cannot == nullptr) cuda_cannot = "effops was built without its CUDA kernels (EFFOPS_BUILD_CUDA)";
#endif
  const char* t_cannot = triton_cannot(route, route_cannot);
  const Backend forced = dispatch::forced_backend();
  if (forced == Backend::kTriton || (forced == Backend::kAuto && t_cannot == nullptr))
    return dispatch::choose(op, c10::DeviceType::CUDA, Backend::kTriton, t_cannot, nullptr);
  return dispatch::choose(op, c10::DeviceType::CUDA, Backend::kCuda, cuda_cannot, nullptr);
}

// An op by name: the op itself (an autograd kernel re-dispatching below autograd), or the internal op
// of a CUDA C++ kernel (csrc/bindings/cuda/; these files are built without CUDA headers).
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace effops::int8
