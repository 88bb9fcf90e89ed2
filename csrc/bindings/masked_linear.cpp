// Torch glue for the CPU masked_linear kernels (csrc/cpu/masked_linear.h): shape checks, output
// allocation, dtype dispatch. The Python side (effops/ops/masked_linear.py) owns argument validation
// and the cached mask index; these ops assume contiguous inputs and a matching index.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/masked_linear.h"

// fp32, bf16, fp16 only (the op layer rejects other dtypes; no double instantiation needed).
#define EFFOPS_DISPATCH_FLOAT(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

void check_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t rows) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && idx.scalar_type() == at::kLong, "index must be int64");
  TORCH_CHECK(ptr.is_contiguous() && idx.is_contiguous(), "index must be contiguous");
  TORCH_CHECK(ptr.numel() == rows + 1, "index ptr has ", ptr.numel(), " entries, expected ", rows + 1);
}

// The kept blocks of W' = weight (transpose_w false) or weight^T (true), packed as fp32 panels.
at::Tensor block_pack(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx, int64_t block,
                      bool transpose_w) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous 2-D");
  TORCH_CHECK(block == 16 || block == 32 || block == 64, "block must be 16, 32 or 64");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N, C = transpose_w ? N : K;
  const int64_t w_rs = transpose_w ? 1 : K, w_cs = transpose_w ? K : 1;
  const int64_t nbr = (R + block - 1) / block;
  check_index(ptr, idx, nbr);
  at::Tensor packed = at::empty({ptr[nbr].item<int64_t>() * block * block}, weight.options().dtype(at::kFloat));
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_block_pack", [&] {
    effops::cpu::block_sparse_pack<scalar_t>(weight.data_ptr<scalar_t>(), w_rs, w_cs, R, C, ptr.data_ptr<int64_t>(),
                                             idx.data_ptr<int64_t>(), block, packed.data_ptr<float>());
  });
  return packed;
}

// out[M, R] = a @ W'^T (+ bias) with W' packed by block_pack.
at::Tensor block_mm(const at::Tensor& a, const at::Tensor& packed, int64_t R, const std::optional<at::Tensor>& bias,
                    const at::Tensor& ptr, const at::Tensor& idx, int64_t block) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be contiguous 2-D");
  TORCH_CHECK(block == 16 || block == 32 || block == 64, "block must be 16, 32 or 64");
  const int64_t nbr = (R + block - 1) / block;
  check_index(ptr, idx, nbr);
  TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.numel() == ptr[nbr].item<int64_t>() * block * block,
              "packed does not match the index");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == a.scalar_type());
  at::Tensor out = at::empty({a.size(0), R}, a.options());
  EFFOPS_DISPATCH_FLOAT(a.scalar_type(), "masked_linear_block_mm", [&] {
    effops::cpu::block_sparse_mm<scalar_t>(a.data_ptr<scalar_t>(), a.size(0), a.size(1), R,
                                           has_bias ? bias->data_ptr<scalar_t>() : nullptr, ptr.data_ptr<int64_t>(),
                                           idx.data_ptr<int64_t>(), block, packed.data_ptr<float>(),
                                           out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor block_grad_weight(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& ptr,
                             const at::Tensor& idx, int64_t block) {
  TORCH_CHECK(gy.dim() == 2 && x.dim() == 2 && gy.is_contiguous() && x.is_contiguous() && gy.size(0) == x.size(0),
              "gy and x must be contiguous 2-D with equal rows");
  TORCH_CHECK(block == 16 || block == 32 || block == 64, "block must be 16, 32 or 64");
  TORCH_CHECK(gy.scalar_type() == x.scalar_type(), "gy and x dtypes differ");
  const int64_t M = x.size(0), N = gy.size(1), K = x.size(1);
  check_index(ptr, idx, (N + block - 1) / block);
  at::Tensor gw = at::zeros({N, K}, x.options());
  EFFOPS_DISPATCH_FLOAT(x.scalar_type(), "masked_linear_block_grad_weight", [&] {
    effops::cpu::block_sparse_grad_weight<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, N, K,
                                                    ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), block,
                                                    gw.data_ptr<scalar_t>());
  });
  return gw;
}

// out[M, R] = a @ W'^T (+ bias) with aT = a^T as fp32 [C, Mpad], Mpad a multiple of 64.
at::Tensor csr_mm(const at::Tensor& aT, int64_t M, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w,
                  const std::optional<at::Tensor>& vals) {
  TORCH_CHECK(aT.dim() == 2 && aT.is_contiguous() && aT.scalar_type() == at::kFloat, "aT must be contiguous fp32 2-D");
  TORCH_CHECK((aT.size(1) % 64 == 0 && aT.size(1) >= M) || (M <= 4 && aT.size(1) == M),
              "aT's rows must be padded to a multiple of 64 (or, for at most 4 rows, not padded)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous 2-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N, C = transpose_w ? N : K;
  const int64_t w_rs = transpose_w ? 1 : K, w_cs = transpose_w ? K : 1;
  TORCH_CHECK(aT.size(0) == C, "aT has ", aT.size(0), " rows, expected ", C);
  check_index(ptr, idx, R);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == weight.scalar_type());
  const bool has_vals = vals.has_value() && vals->defined();
  if (has_vals)
    TORCH_CHECK(vals->is_contiguous() && vals->numel() == idx.numel() && vals->scalar_type() == weight.scalar_type(),
                "vals must hold one value per kept weight, in weight's dtype");
  at::Tensor out = at::empty({M, R}, weight.options());
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_csr_mm", [&] {
    effops::cpu::csr_sparse_mm<scalar_t>(aT.data_ptr<float>(), M, aT.size(1), weight.data_ptr<scalar_t>(), w_rs, w_cs,
                                         R, has_bias ? bias->data_ptr<scalar_t>() : nullptr, ptr.data_ptr<int64_t>(),
                                         idx.data_ptr<int64_t>(), has_vals ? vals->data_ptr<scalar_t>() : nullptr,
                                         out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor csr_grad_weight(const at::Tensor& gyT, const at::Tensor& xT, const at::Tensor& ptr, const at::Tensor& idx,
                           at::ScalarType dtype) {
  TORCH_CHECK(gyT.dim() == 2 && xT.dim() == 2 && gyT.is_contiguous() && xT.is_contiguous() &&
                  gyT.scalar_type() == at::kFloat && xT.scalar_type() == at::kFloat && gyT.size(1) == xT.size(1) &&
                  gyT.size(1) % 64 == 0,
              "gyT and xT must be contiguous fp32 2-D with equal padded rows");
  const int64_t N = gyT.size(0), K = xT.size(0);
  check_index(ptr, idx, N);
  at::Tensor gw = at::zeros({N, K}, gyT.options().dtype(dtype));
  EFFOPS_DISPATCH_FLOAT(dtype, "masked_linear_csr_grad_weight", [&] {
    effops::cpu::csr_sparse_grad_weight<scalar_t>(gyT.data_ptr<float>(), xT.data_ptr<float>(), gyT.size(1), N, K,
                                                  ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
                                                  gw.data_ptr<scalar_t>());
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("masked_linear_block_pack(Tensor weight, Tensor ptr, Tensor idx, int block, bool transpose_w) -> Tensor");
  m.def("masked_linear_block_mm(Tensor a, Tensor packed, int R, Tensor? bias, Tensor ptr, Tensor idx, int block) "
        "-> Tensor");
  m.def("masked_linear_block_grad_weight(Tensor gy, Tensor x, Tensor ptr, Tensor idx, int block) -> Tensor");
  m.def("masked_linear_csr_mm(Tensor aT, int M, Tensor weight, Tensor? bias, Tensor ptr, Tensor idx, "
        "bool transpose_w, Tensor? vals=None) -> Tensor");
  m.def("masked_linear_csr_grad_weight(Tensor gyT, Tensor xT, Tensor ptr, Tensor idx, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(effops_cpu, CPU, m) {
  m.impl("masked_linear_block_pack", &block_pack);
  m.impl("masked_linear_block_mm", &block_mm);
  m.impl("masked_linear_block_grad_weight", &block_grad_weight);
  m.impl("masked_linear_csr_mm", &csr_mm);
  m.impl("masked_linear_csr_grad_weight", &csr_grad_weight);
}
