// effops::quantize_rowwise(x) -> (q, scale): symmetric per-row int8 quantization (reference/int8.py).
// Schema, checks, the CPU / CUDA / Meta implementations and the autograd key (integers: no gradient).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bindings/int8_common.h"
#include "cpu/int8_gemm.h"

namespace effops::int8 {
namespace {

constexpr const char* kOp = "quantize_rowwise";
constexpr const char* kTritonRoute = "effops::_quantize_rowwise_triton";
using Route = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&);

void check(const at::Tensor& x) {
  check_float("x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dims, got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(x.size(-1) >= 1, "x's last dim (the row length) must be >= 1, got shape ", shape_str(x.sizes()));
}

std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& x) {
  return {at::empty(x.sizes(), x.options().dtype(at::kChar)),
          at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> run_cpu_kernel(const at::Tensor& x) {
  auto [q, scale] = empty_outputs(x);
  const int64_t k = x.size(-1), m = x.numel() / k;
  if (m == 0) return {q, scale};
  const auto xc = x.contiguous();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cpu::quantize_rowwise<T>(xc.data_ptr<T>(), m, k, q.data_ptr<int8_t>(), scale.data_ptr<float>());
  });
  return {q, scale};
}

const char* triton_reason(const at::Tensor& x) { return triton_size_cannot(x.numel()); }

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x) {
  check(x);
  switch (choose_cpu(kOp, nullptr, nullptr, kTritonRoute, triton_reason(x))) {
    case Backend::kCpu: return run_cpu_kernel(x);
    case Backend::kTriton: return dispatch::python_route<Route>(kTritonRoute).call(x);
    default: return quantize_rowwise_aten(x);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cuda(const at::Tensor& x) {
  check(x);
  switch (choose_cuda(kOp, "no CUDA C++ kernel for quantize_rowwise (the Triton route serves CUDA tensors)",
                      kTritonRoute, triton_reason(x))) {
    case Backend::kTriton: return dispatch::python_route<Route>(kTritonRoute).call(x);
    default: return quantize_rowwise_aten(x);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_meta(const at::Tensor& x) {
  check(x);
  return empty_outputs(x);
}

// Rounding has no useful derivative: the outputs do not require grad (as torch's quantize_per_tensor),
// rather than failing at backward for want of a formula. Int8Linear gives x a straight-through one.
std::tuple<at::Tensor, at::Tensor> quantize_rowwise_autograd(const at::Tensor& x) {
  at::AutoDispatchBelowADInplaceOrView below;
  static const auto op = find_op<Route>("effops::quantize_rowwise");
  return op.call(x);
}

}  // namespace
}  // namespace effops::int8

TORCH_LIBRARY_FRAGMENT(effops, m) { m.def("quantize_rowwise(Tensor x) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(effops, CPU, m) { m.impl("quantize_rowwise", &effops::int8::quantize_rowwise_cpu); }
TORCH_LIBRARY_IMPL(effops, CUDA, m) { m.impl("quantize_rowwise", &effops::int8::quantize_rowwise_cuda); }
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("quantize_rowwise", &effops::int8::quantize_rowwise_meta); }
TORCH_LIBRARY_IMPL(effops, Autograd, m) { m.impl("quantize_rowwise", &effops::int8::quantize_rowwise_autograd); }
