// Torch glue for the CUDA int8 GEMM (csrc/cuda/int8_gemm.cu): effops_cuda::{int8_mm, int8_linear}.
// Internal ops the CUDA implementations of effops::int8_mm / int8_linear call (csrc/bindings/int8_gemm.cpp):
// inputs arrive validated, 2-D and contiguous, with a float32 bias.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int8_gemm.cuh"

namespace {

using effops::cuda::Int8GemmArgs;
using effops::cuda::Int8OutKind;

Int8OutKind out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Int8OutKind::kFloat;
    case at::kBFloat16: return Int8OutKind::kBFloat16;
    case at::kHalf: return Int8OutKind::kHalf;
    default: TORCH_CHECK(false, "int8_linear: unsupported output dtype ", t);
  }
}

void run(const Int8GemmArgs& args) {
  const cudaError_t err = effops::cuda::int8_gemm(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "effops int8_gemm CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.is_contiguous() && b.is_contiguous() && a.size(1) == b.size(0),
              "int8_mm: expected contiguous (M, K) and (K, N)");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kInt));
  Int8GemmArgs args{a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), out.data_ptr(), nullptr, nullptr, nullptr,
                    static_cast<int>(a.size(0)), static_cast<int>(b.size(1)), static_cast<int>(a.size(1)),
                    a.size(1), b.size(1), b.size(1), true, Int8OutKind::kInt32};
  run(args);
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1),
              "int8_linear: expected contiguous (M, K) and (N, K)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  Int8GemmArgs args{x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), out.data_ptr(), x_scale.data_ptr<float>(),
                    w_scale.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                    static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), K, K, N, false, out_kind(out_dtype)};
  run(args);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cuda, m) {
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(effops_cuda, CUDA, m) {
  m.impl("int8_mm", &int8_mm_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
}
