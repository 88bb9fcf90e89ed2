// effops::int8_mm(a, b): (M, K) int8 @ (K, N) int8 -> (M, N) int32, exact (as torch._int_mm).
// effops::int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype): the same product with the
// row and column scales, the bias and the cast in the epilogue; no gradient.
// Schemas, checks, the CPU / CUDA / Meta implementations and the autograd key.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "bindings/int8_common.h"
#include "cpu/int8_gemm.h"

namespace effops::int8 {
namespace {

using cpu::Int8Epilogue;
using cpu::Int8Out;

using MmSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, at::ScalarType);
constexpr const char* kMmRoute = "effops::_int8_mm_triton";
constexpr const char* kLinearRoute = "effops::_int8_linear_triton";

// The CUDA kernel puts 64-wide column tiles on grid.y, which stops at 65535 (csrc/cuda/int8_gemm.cu).
constexpr int64_t kCudaMaxN = INT64_C(65535) * 64;

const char* cuda_cannot(int64_t n) {
  return n > kCudaMaxN ? "more output columns than the CUDA kernel launches (65535 64-wide tiles on grid.y)" : nullptr;
}

Int8Out out_kind(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return Int8Out::kBFloat16;
    case at::kHalf: return Int8Out::kHalf;
    case at::kInt: return Int8Out::kInt32;
    default: return Int8Out::kFloat;
  }
}

// C = A @ B for A (M, K) int8 and B given by its element (k, n) = b[k*stride_k + n*stride_n]: packs B
// (the s8 layout when this CPU's s8 body takes any B or B has no -128, else the widening s16 layout)
// and runs the kernel.
void gemm_any_b(const at::Tensor& a, const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t N,
                const Int8Epilogue& epi) {
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t panel_cols = cpu::ceil_to(N, cpu::kInt8NR);
  if (cpu::int8_s8_takes_any_b() || !cpu::int8_contains_min(b, K * N)) {
    auto packed = at::empty({panel_cols * cpu::ceil_to(K, cpu::kInt8KG)}, a.options().dtype(at::kChar));
    cpu::int8_pack_b_s8(b, stride_k, stride_n, K, N, packed.data_ptr<int8_t>());
    cpu::int8_gemm_s8(a.data_ptr<int8_t>(), K, M, K, packed.data_ptr<int8_t>(), N, epi);
  } else {
    auto packed = at::empty({panel_cols * cpu::ceil_to(K, cpu::kInt16KG)}, a.options().dtype(at::kShort));
    cpu::int8_pack_b_s16(b, stride_k, stride_n, K, N, packed.data_ptr<int16_t>());
    cpu::int8_gemm_s16(a.data_ptr<int8_t>(), K, M, K, packed.data_ptr<int16_t>(), N, epi);
  }
}

// ---------------------------------------------------------------------------------------------
// int8_mm
// ---------------------------------------------------------------------------------------------
void check_mm(const at::Tensor& a, const at::Tensor& b) {
  check_dtype("a", a, at::kChar);
  check_ndim("a", a, 2);
  check_dtype("b", b, at::kChar);
  check_ndim("b", b, 2);
  check_device("b", b, a);
  TORCH_CHECK_VALUE(a.size(1) == b.size(0), "b's first dim must equal a's second dim ", a.size(1), ", got b of shape ",
                    shape_str(b.sizes()));
  check_k("a's second dim (K)", a.size(1));
}

at::Tensor int8_mm_kernel(const at::Tensor& a_in, const at::Tensor& b_in) {
  const int64_t M = a_in.size(0), N = b_in.size(1);
  auto out = at::empty({M, N}, a_in.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const auto a = a_in.contiguous(), b = b_in.contiguous();
  const Int8Epilogue epi{Int8Out::kInt32, out.data_ptr(), N, nullptr, nullptr, nullptr};
  gemm_any_b(a, b.data_ptr<int8_t>(), N, 1, N, epi);
  return out;
}

const char* mm_triton_reason(const at::Tensor& a, const at::Tensor& b) {
  return triton_size_cannot(std::max({a.numel(), b.numel(), a.size(0) * b.size(1)}));
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_mm(a, b);
  switch (choose_cpu("int8_mm", nullptr, nullptr, kMmRoute, mm_triton_reason(a, b))) {
    case Backend::kCpu: return int8_mm_kernel(a, b);
    case Backend::kTriton: return dispatch::python_route<MmSig>(kMmRoute).call(a, b);
    default: return int8_mm_aten(a, b);
  }
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_mm(a, b);
  switch (choose_cuda("int8_mm", cuda_cannot(b.size(1)), kMmRoute, mm_triton_reason(a, b))) {
    case Backend::kCuda: return find_op<MmSig>("effops_cuda::int8_mm").call(a.contiguous(), b.contiguous());
    case Backend::kTriton: return dispatch::python_route<MmSig>(kMmRoute).call(a, b);
    default: return int8_mm_aten(a, b);
  }
}

at::Tensor int8_mm_meta(const at::Tensor& a, const at::Tensor& b) {
  check_mm(a, b);
  return at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kInt));
}

// Integer inputs never require grad: the autograd key only steps below itself.
at::Tensor int8_mm_autograd(const at::Tensor& a, const at::Tensor& b) {
  at::AutoDispatchBelowADInplaceOrView below;
  static const auto op = find_op<MmSig>("effops::int8_mm");
  return op.call(a, b);
}

// ---------------------------------------------------------------------------------------------
// int8_linear
// ---------------------------------------------------------------------------------------------
void check_linear(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_dtype("x_int8", x, at::kChar);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x_int8 must have at least 1 dims, got shape ", shape_str(x.sizes()));
  check_dtype("x_scale", x_scale, at::kFloat);
  check_device("x_scale", x_scale, x);
  check_shape("x_scale", x_scale, x.sizes().slice(0, x.dim() - 1));
  check_dtype("w_int8", w, at::kChar);
  check_ndim("w_int8", w, 2);
  check_device("w_int8", w, x);
  TORCH_CHECK_VALUE(w.size(1) == x.size(-1), "w_int8 must have shape (N, ", x.size(-1),
                    ") to match x_int8's last dim, got ", shape_str(w.sizes()));
  check_k("x_int8's last dim (K)", x.size(-1));
  check_dtype("w_scale", w_scale, at::kFloat);
  check_device("w_scale", w_scale, x);
  check_shape("w_scale", w_scale, {w.size(0)});
  if (bias) {
    check_float("bias", *bias);
    check_device("bias", *bias, x);
    check_shape("bias", *bias, {w.size(0)});
  }
  TORCH_CHECK_VALUE(is_float(out_dtype), "out_dtype must be one of (float32, bfloat16, float16), got ",
                    dtype_name(out_dtype));
}

std::optional<at::Tensor> fp32_bias(const std::optional<at::Tensor>& bias) {
  if (!bias) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

at::Tensor linear_output(const at::Tensor& x, int64_t n, at::ScalarType out_dtype) {
  auto shape = x.sizes().vec();
  shape.back() = n;
  return at::empty(shape, x.options().dtype(out_dtype));
}

at::Tensor int8_linear_kernel(const at::Tensor& x_int8, const at::Tensor& x_scale, const at::Tensor& w_int8,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype) {
  const int64_t K = x_int8.size(-1), N = w_int8.size(0), M = x_int8.numel() / K;
  if (M == 0 || N == 0) return linear_output(x_int8, N, out_dtype);
  const auto x = x_int8.reshape({M, K}).contiguous(), xs = x_scale.reshape({M}).contiguous();
  const auto w = w_int8.contiguous(), ws = w_scale.contiguous();
  const auto b = fp32_bias(bias);
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  const Int8Epilogue epi{out_kind(out_dtype), out.data_ptr(), N, xs.data_ptr<float>(), ws.data_ptr<float>(),
                         b ? b->data_ptr<float>() : nullptr};
  gemm_any_b(x, w.data_ptr<int8_t>(), 1, K, N, epi);
  return with_leading_dims(out, x_int8);
}

const char* linear_triton_reason(const at::Tensor& x, const at::Tensor& w) {
  return triton_size_cannot(std::max({x.numel(), w.numel(), x.numel() / x.size(-1) * w.size(0)}));
}

at::Tensor linear_triton(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  return dispatch::python_route<LinearSig>(kLinearRoute).call(x, x_scale, w, w_scale, fp32_bias(bias), out_dtype);
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  check_linear(x, x_scale, w, w_scale, bias, out_dtype);
  switch (choose_cpu("int8_linear", nullptr, nullptr, kLinearRoute, linear_triton_reason(x, w))) {
    case Backend::kCpu: return int8_linear_kernel(x, x_scale, w, w_scale, bias, out_dtype);
    case Backend::kTriton: return linear_triton(x, x_scale, w, w_scale, bias, out_dtype);
    default: return int8_linear_aten(x, x_scale, w, w_scale, bias, out_dtype);
  }
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype) {
  check_linear(x, x_scale, w, w_scale, bias, out_dtype);
  switch (choose_cuda("int8_linear", cuda_cannot(w.size(0)), kLinearRoute, linear_triton_reason(x, w))) {
    case Backend::kCuda: {
      const int64_t K = x.size(-1), M = x.numel() / K;
      if (M == 0 || w.size(0) == 0) return linear_output(x, w.size(0), out_dtype);
      const auto y = find_op<LinearSig>("effops_cuda::int8_linear")
                         .call(x.reshape({M, K}).contiguous(), x_scale.reshape({M}).contiguous(), w.contiguous(),
                               w_scale.contiguous(), fp32_bias(bias), out_dtype);
      return with_leading_dims(y, x);
    }
    case Backend::kTriton: return linear_triton(x, x_scale, w, w_scale, bias, out_dtype);
    default: return int8_linear_aten(x, x_scale, w, w_scale, bias, out_dtype);
  }
}

at::Tensor int8_linear_meta(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            at::ScalarType out_dtype) {
  check_linear(x, x_scale, w, w_scale, bias, out_dtype);
  return linear_output(x, w.size(0), out_dtype);
}

// No gradient: a scale or bias that requires one is refused up front rather than at backward.
at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                                const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                at::ScalarType out_dtype) {
  if (at::GradMode::is_enabled()) {
    const std::pair<const char*, const at::Tensor*> floats[] = {
        {"x_scale", &x_scale}, {"w_scale", &w_scale}, {"bias", bias ? &*bias : nullptr}};
    for (const auto& [name, t] : floats)
      TORCH_CHECK_VALUE(t == nullptr || !t->requires_grad(), "int8_linear has no gradient: ", name,
                        " requires grad (detach it; Int8Linear gives its floating input a straight-through gradient)");
  }
  at::AutoDispatchBelowADInplaceOrView below;
  static const auto op = find_op<LinearSig>("effops::int8_linear");
  return op.call(x, x_scale, w, w_scale, bias, out_dtype);
}

}  // namespace
}  // namespace effops::int8

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_linear(Tensor x_int8, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias=None, "
        "ScalarType out_dtype=float) -> Tensor");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("int8_mm", &effops::int8::int8_mm_cpu);
  m.impl("int8_linear", &effops::int8::int8_linear_cpu);
}

TORCH_LIBRARY_IMPL(effops, CUDA, m) {
  m.impl("int8_mm", &effops::int8::int8_mm_cuda);
  m.impl("int8_linear", &effops::int8::int8_linear_cuda);
}

TORCH_LIBRARY_IMPL(effops, Meta, m) {
  m.impl("int8_mm", &effops::int8::int8_mm_meta);
  m.impl("int8_linear", &effops::int8::int8_linear_meta);
}

TORCH_LIBRARY_IMPL(effops, Autograd, m) {
  m.impl("int8_mm", &effops::int8::int8_mm_autograd);
  m.impl("int8_linear", &effops::int8::int8_linear_autograd);
}
