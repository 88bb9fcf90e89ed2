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

// The dtype of the packed panels for weights of dtype t: bf16 pairs for bf16, fp32 otherwise.
at::ScalarType packed_dtype(at::ScalarType t) { return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// The kept blocks of W' = weight (transpose_w false) or weight^T (true), packed as panels.
at::Tensor block_pack(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx, int64_t block,
                      bool transpose_w) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous 2-D");
  TORCH_CHECK(block == 16 || block == 32 || block == 64, "block must be 16, 32 or 64");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N, C = transpose_w ? N : K;
  const int64_t w_rs = transpose_w ? 1 : K, w_cs = transpose_w ? K : 1;
  const int64_t nbr = (R + block - 1) / block;
  check_index(ptr, idx, nbr);
  at::Tensor packed = at::empty({ptr[nbr].item<int64_t>() * block * block},
                                weight.options().dtype(packed_dtype(weight.scalar_type())));
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_block_pack", [&] {
    effops::cpu::block_sparse_pack<scalar_t>(weight.data_ptr<scalar_t>(), w_rs, w_cs, R, C, ptr.data_ptr<int64_t>(),
                                             idx.data_ptr<int64_t>(), block, packed.data_ptr());
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
  TORCH_CHECK(packed.scalar_type() == packed_dtype(a.scalar_type()) && packed.is_contiguous() &&
                  packed.numel() == ptr[nbr].item<int64_t>() * block * block,
              "packed does not match the index");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == a.scalar_type());
  at::Tensor out = at::empty({a.size(0), R}, a.options());
  EFFOPS_DISPATCH_FLOAT(a.scalar_type(), "masked_linear_block_mm", [&] {
    effops::cpu::block_sparse_mm<scalar_t>(a.data_ptr<scalar_t>(), a.size(0), a.size(1), R,
                                           has_bias ? bias->data_ptr<scalar_t>() : nullptr, ptr.data_ptr<int64_t>(),
                                           idx.data_ptr<int64_t>(), block, packed.data_ptr(),
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

// aT: a^T in batch spans as the CSR kernels take it (effops::cpu::SpannedT): fp32 [spans, C, width],
// width a multiple of 64 covering M rows (or, for at most 4 rows, one unpadded span).
effops::cpu::SpannedT spanned(const at::Tensor& t, int64_t M, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == at::kFloat, name,
              " must be contiguous fp32 [spans, C, width]");
  TORCH_CHECK(t.size(1) == C, name, " has ", t.size(1), " columns, expected ", C);
  const int64_t spans = t.size(0), width = t.size(2);
  TORCH_CHECK((width % 64 == 0 && width > 0 && spans * width >= M && (spans - 1) * width < M) ||
                  (M <= 4 && spans == 1 && width == M),
              name, "'s spans must be multiples of 64 rows covering the batch (or one unpadded span of <= 4 rows)");
  return {t.data_ptr<float>(), C, spans, width};
}

// out[M, R] = a @ W'^T (+ bias) with a given as aT (above).
at::Tensor csr_mm(const at::Tensor& aT, int64_t M, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w,
                  const std::optional<at::Tensor>& vals) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous 2-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N, C = transpose_w ? N : K;
  const int64_t w_rs = transpose_w ? 1 : K, w_cs = transpose_w ? K : 1;
  const effops::cpu::SpannedT a = spanned(aT, M, C, "aT");
  check_index(ptr, idx, R);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == weight.scalar_type());
  const bool has_vals = vals.has_value() && vals->defined();
  if (has_vals)
    TORCH_CHECK(vals->is_contiguous() && vals->numel() == idx.numel() && vals->scalar_type() == weight.scalar_type(),
                "vals must hold one value per kept weight, in weight's dtype");
  at::Tensor out = at::empty({M, R}, weight.options());
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_csr_mm", [&] {
    effops::cpu::csr_sparse_mm<scalar_t>(a, M, weight.data_ptr<scalar_t>(), w_rs, w_cs, R,
                                         has_bias ? bias->data_ptr<scalar_t>() : nullptr, ptr.data_ptr<int64_t>(),
                                         idx.data_ptr<int64_t>(), has_vals ? vals->data_ptr<scalar_t>() : nullptr,
                                         out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor csr_grad_weight(const at::Tensor& gyT, const at::Tensor& xT, const at::Tensor& ptr, const at::Tensor& idx,
                           at::ScalarType dtype) {
  TORCH_CHECK(gyT.dim() == 3 && xT.dim() == 3 && gyT.size(0) == xT.size(0) && gyT.size(2) == xT.size(2) &&
                  gyT.size(2) % 64 == 0,
              "gyT and xT must be [spans, C, width] with equal spans padded to multiples of 64");
  const int64_t N = gyT.size(1), K = xT.size(1), rows = gyT.size(0) * gyT.size(2);
  const effops::cpu::SpannedT g = spanned(gyT, rows, N, "gyT"), x = spanned(xT, rows, K, "xT");
  check_index(ptr, idx, N);
  at::Tensor gw = at::zeros({N, K}, gyT.options().dtype(dtype));
  EFFOPS_DISPATCH_FLOAT(dtype, "masked_linear_csr_grad_weight", [&] {
    effops::cpu::csr_sparse_grad_weight<scalar_t>(g, x, N, K, ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
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
