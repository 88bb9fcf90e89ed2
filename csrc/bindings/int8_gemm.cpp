// Torch glue for the CPU int8 kernels: effops_cpu::{quantize_rowwise, int8_mm, int8_linear,
// int8_linear_dynamic}. Inputs arrive validated and contiguous from effops/ops/*.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/int8_gemm.h"

namespace {

using namespace effops::cpu;

Int8Out out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Int8Out::kFloat;
    case at::kBFloat16: return Int8Out::kBFloat16;
    case at::kHalf: return Int8Out::kHalf;
    case at::kInt: return Int8Out::kInt32;
    default: TORCH_CHECK(false, "int8 gemm: unsupported output dtype ", t);
  }
}

// Calls f(T{}) with T the kernel element type of a float tensor (fp32, bf16, fp16; never fp64).
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

// C = A @ B for A (M, K) int8 and B given by its element (k, n) = b[k*stride_k + n*stride_n]:
// packs B (s8 layout when this CPU's s8 body takes any B or B has no -128, else the widening s16
// layout) and runs the kernel.
void gemm_any_b(const at::Tensor& a, const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t N,
                const Int8Epilogue& epi) {
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t panels_cols = ceil_to(N, kInt8NR);
  if (int8_s8_takes_any_b() || !int8_contains_min(b, K * N)) {
    auto packed = at::empty({panels_cols * ceil_to(K, kInt8KG)}, a.options().dtype(at::kChar));
    int8_pack_b_s8(b, stride_k, stride_n, K, N, packed.data_ptr<int8_t>());
    int8_gemm_s8(a.data_ptr<int8_t>(), K, M, K, packed.data_ptr<int8_t>(), N, epi);
  } else {
    auto packed = at::empty({panels_cols * ceil_to(K, kInt16KG)}, a.options().dtype(at::kShort));
    int8_pack_b_s16(b, stride_k, stride_n, K, N, packed.data_ptr<int16_t>());
    int8_gemm_s16(a.data_ptr<int8_t>(), K, M, K, packed.data_ptr<int16_t>(), N, epi);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "quantize_rowwise: x must be 2-D contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  dispatch_float(x.scalar_type(), "quantize_rowwise", [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_rowwise<scalar_t>(x.data_ptr<scalar_t>(), M, K, q.data_ptr<int8_t>(), scale.data_ptr<float>());
  });
  return {q, scale};
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.is_contiguous() && b.is_contiguous() && a.size(1) == b.size(0),
              "int8_mm: expected contiguous (M, K) and (K, N)");
  const int64_t M = a.size(0), N = b.size(1);
  auto out = at::empty({M, N}, a.options().dtype(at::kInt));
  Int8Epilogue epi{Int8Out::kInt32, out.data_ptr(), N, nullptr, nullptr, nullptr};
  gemm_any_b(a, b.data_ptr<int8_t>(), N, 1, N, epi);
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1),
              "int8_linear: expected contiguous (M, K) and (N, K)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  Int8Epilogue epi{out_kind(out_dtype), out.data_ptr(), N, x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                   bias ? bias->data_ptr<float>() : nullptr};
  gemm_any_b(x, w.data_ptr<int8_t>(), 1, K, N, epi);
  return out;
}

// Int8Linear's op: w_packed is the s8 layout (reference/int8.py pack_weight), never holding -128.
// w_corr (int32, ceil(N/16)*16) is given for 7-bit weights (all in [-63, 63]): -128 * the column sums,
// the correction of int8_gemm_u8s7, which then runs instead of int8_gemm_s8.
at::Tensor int8_linear_dynamic_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& bias, int64_t N, bool weight_only,
                                   const std::optional<at::Tensor>& w_corr) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w_packed.is_contiguous(), "int8_linear_dynamic: bad layout");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w_packed.numel() == ceil_to(N, kInt8NR) * ceil_to(K, kInt8KG), "int8_linear_dynamic: w_packed size");
  auto out = at::empty({M, N}, x.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), "int8_linear_dynamic", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (weight_only) {
      int8_weight_only_linear<scalar_t>(x.data_ptr<scalar_t>(), M, K, w_packed.data_ptr<int8_t>(), N,
                                        w_scale.data_ptr<float>(), b, out.data_ptr<scalar_t>());
      return;
    }
    const bool u8s7 = w_corr.has_value();
    if (u8s7)
      TORCH_CHECK(w_corr->scalar_type() == at::kInt && w_corr->is_contiguous() &&
                      w_corr->numel() == ceil_to(N, kInt8NR), "int8_linear_dynamic: w_corr must be int32 of ",
                  ceil_to(N, kInt8NR), " elements");
    // Rows in chunks of kRowChunk, each quantized right before its GEMM: the chunk's int8 rows (256 x K
    // bytes) are still in L2/L3 when the GEMM re-reads them once per block of weight panels, where
    // quantizing all of a large M first left them to be re-read from memory (one thread, K = N = 4096,
    // M = 2048: one call took 1.06x (8-bit) and 1.15x (7-bit weights) the time of eight 256-row calls).
    constexpr int64_t kRowChunk = 256;
    const int64_t chunk = std::min(M, kRowChunk);
    auto q = at::empty({chunk, K}, x.options().dtype(at::kChar));
    auto xs = at::empty({M}, x.options().dtype(at::kFloat));
    for (int64_t i0 = 0; i0 < M; i0 += chunk) {
      const int64_t rows = std::min(chunk, M - i0);
      quantize_rowwise<scalar_t>(x.data_ptr<scalar_t>() + i0 * K, rows, K, q.data_ptr<int8_t>(),
                                 xs.data_ptr<float>() + i0, u8s7);
      Int8Epilogue epi{out_kind(x.scalar_type()), static_cast<scalar_t*>(out.data_ptr()) + i0 * N, N,
                       xs.data_ptr<float>() + i0, w_scale.data_ptr<float>(), b};
      if (u8s7)
        int8_gemm_u8s7(reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>()), K, rows, K, w_packed.data_ptr<int8_t>(),
                       N, w_corr->data_ptr<int32_t>(), epi);
      else
        int8_gemm_s8(q.data_ptr<int8_t>(), K, rows, K, w_packed.data_ptr<int8_t>(), N, epi);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("quantize_rowwise(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor x_scale, Tensor w, Tensor w_scale, Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def("int8_linear_dynamic(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, int out_features, "
        "bool weight_only, Tensor? w_corr=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(effops_cpu, CPU, m) {
  m.impl("quantize_rowwise", &quantize_rowwise_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_dynamic", &int8_linear_dynamic_cpu);
}
