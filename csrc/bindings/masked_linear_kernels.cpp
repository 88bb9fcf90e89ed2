// Tensor-level calls of the CPU masked_linear kernels (csrc/cpu/masked_linear.h): output allocation,
// dtype dispatch, the operand layouts the kernels take. Arguments were checked by the op
// (masked_linear.cpp): these assume contiguous inputs and an index built from the same mask.
#include "bindings/masked_linear_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "cpu/masked_linear.h"

// fp32, bf16, fp16 only (the op rejects other dtypes).
#define EFFOPS_DISPATCH_FLOAT(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace effops::masked {

static void check_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t rows) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && idx.scalar_type() == at::kLong, "index must be int64");
  TORCH_CHECK(ptr.is_contiguous() && idx.is_contiguous(), "index must be contiguous");
  TORCH_CHECK(ptr.numel() == rows + 1, "index ptr has ", ptr.numel(), " entries, expected ", rows + 1);
}

// The dtype of the packed panels for weights of dtype t: bf16 pairs for bf16, fp32 otherwise.
static at::ScalarType packed_dtype(at::ScalarType t) { return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

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

// out[M, R] = a @ W'^T (+ bias), W' = weight or weight^T, or given packed by block_pack.
at::Tensor block_mm(const at::Tensor& a, const at::Tensor& weight, bool transpose_w,
                    const std::optional<at::Tensor>& packed, const std::optional<at::Tensor>& bias,
                    const at::Tensor& ptr, const at::Tensor& idx, int64_t block) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "a must be contiguous 2-D");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == a.scalar_type(),
              "weight must be contiguous 2-D in a's dtype");
  TORCH_CHECK(block == 16 || block == 32 || block == 64, "block must be 16, 32 or 64");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N;
  TORCH_CHECK(a.size(1) == (transpose_w ? N : K), "a has ", a.size(1), " columns, expected ", transpose_w ? N : K);
  const int64_t nbr = (R + block - 1) / block;
  check_index(ptr, idx, nbr);
  const bool has_packed = packed.has_value() && packed->defined();
  if (has_packed)
    TORCH_CHECK(packed->scalar_type() == packed_dtype(a.scalar_type()) && packed->is_contiguous() &&
                    packed->numel() == ptr[nbr].item<int64_t>() * block * block,
                "packed does not match the index");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == a.scalar_type());
  at::Tensor out = at::empty({a.size(0), R}, a.options());
  EFFOPS_DISPATCH_FLOAT(a.scalar_type(), "masked_linear_block_mm", [&] {
    effops::cpu::block_sparse_mm<scalar_t>(a.data_ptr<scalar_t>(), a.size(0), a.size(1), R,
                                           has_bias ? bias->data_ptr<scalar_t>() : nullptr, ptr.data_ptr<int64_t>(),
                                           idx.data_ptr<int64_t>(), block, has_packed ? packed->data_ptr() : nullptr,
                                           weight.data_ptr<scalar_t>(), transpose_w ? 1 : K, transpose_w ? K : 1,
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

// aT: a^T in batch spans as the CSR kernels take it (effops::cpu::Spanned): [spans, C, width] fp32 (or
// bf16 for the vdpbf16ps body), width a multiple of 64 covering M rows (or, for at most 4 rows, one
// unpadded span).
template <typename S>
static effops::cpu::Spanned<S> spanned(const at::Tensor& t, int64_t M, int64_t C, const char* name) {
  const at::ScalarType dtype = std::is_same_v<S, float> ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be contiguous [spans, C, width] of ", dtype);
  TORCH_CHECK(t.size(1) == C, name, " has ", t.size(1), " columns, expected ", C);
  const int64_t spans = t.size(0), width = t.size(2);
  TORCH_CHECK((width % 64 == 0 && width > 0 && spans * width >= M && (spans - 1) * width < M) ||
                  (M <= 4 && spans == 1 && width == M),
              name, "'s spans must be multiples of 64 rows covering the batch (or one unpadded span of <= 4 rows)");
  return {static_cast<const S*>(t.data_ptr()), C, spans, width};
}

// out[M, R] = a @ W'^T (+ bias) with a given as aT (above).
at::Tensor csr_mm(const at::Tensor& aT, int64_t M, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w,
                  const std::optional<at::Tensor>& vals) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be contiguous 2-D");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N, C = transpose_w ? N : K;
  const int64_t w_rs = transpose_w ? 1 : K, w_cs = transpose_w ? K : 1;
  const bool bf16_spans = aT.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16_spans || (weight.scalar_type() == at::kBFloat16 && M > 4 && effops::cpu::csr_bf16_spans_run()),
              "bf16 aT is for bf16 weights, more than 4 rows, at the avx512_bf16 level");
  check_index(ptr, idx, R);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == R && bias->scalar_type() == weight.scalar_type());
  const bool has_vals = vals.has_value() && vals->defined();
  if (has_vals)
    TORCH_CHECK(vals->is_contiguous() && vals->numel() == idx.numel() && vals->scalar_type() == weight.scalar_type(),
                "vals must hold one value per kept weight, in weight's dtype");
  at::Tensor out = at::empty({M, R}, weight.options());
  if (bf16_spans) {
    using T = c10::BFloat16;
    effops::cpu::csr_sparse_mm<T, uint16_t>(spanned<uint16_t>(aT, M, C, "aT"), M, weight.data_ptr<T>(), w_rs, w_cs, R,
                                            has_bias ? bias->data_ptr<T>() : nullptr, ptr.data_ptr<int64_t>(),
                                            idx.data_ptr<int64_t>(), has_vals ? vals->data_ptr<T>() : nullptr,
                                            out.data_ptr<T>());
    return out;
  }
  const effops::cpu::SpannedT a = spanned<float>(aT, M, C, "aT");
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_csr_mm", [&] {
    effops::cpu::csr_sparse_mm<scalar_t, float>(a, M, weight.data_ptr<scalar_t>(), w_rs, w_cs, R,
                                                has_bias ? bias->data_ptr<scalar_t>() : nullptr,
                                                ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
                                                has_vals ? vals->data_ptr<scalar_t>() : nullptr,
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
  const effops::cpu::SpannedT g = spanned<float>(gyT, rows, N, "gyT"), x = spanned<float>(xT, rows, K, "xT");
  check_index(ptr, idx, N);
  at::Tensor gw = at::zeros({N, K}, gyT.options().dtype(dtype));
  EFFOPS_DISPATCH_FLOAT(dtype, "masked_linear_csr_grad_weight", [&] {
    effops::cpu::csr_sparse_grad_weight<scalar_t>(g, x, N, K, ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(),
                                                  gw.data_ptr<scalar_t>());
  });
  return gw;
}

at::Tensor spanned_t(const at::Tensor& a, bool few_rows_ok, int64_t columns, bool bf16) {
  const int64_t m = a.size(0), c = a.size(1);
  if (few_rows_ok && m <= 4) return a.t().to(at::kFloat).contiguous().unsqueeze(0);
  TORCH_CHECK(!bf16 || a.scalar_type() == at::kBFloat16, "bf16 spans of a ", a.scalar_type(), " operand");
  // A span of ~6 MB at most: at 4096 inputs 256 rows; at 11008 inputs 128 rows (measured 256 x 4096 x
  // 11008, 90% unstructured: 1.4-2.2x dense with 256-row spans, 2.2-3.0x with 128).
  // (bf16 spans take the same rows: 64 or 256 rows per span measured the same for the vdpbf16ps body)
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(4, (6 << 20) / (4 * 64 * std::max<int64_t>(std::max(columns, c), 1))));
  const int64_t chunks = (m + 63) / 64;
  const int64_t spans = (chunks + max_chunks - 1) / max_chunks;
  const int64_t width = 64 * ((chunks + spans - 1) / spans);
  at::Tensor out = at::zeros({spans, c, width}, a.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  for (int64_t s = 0; s < spans; ++s) {
    const int64_t rows = std::min(width, m - s * width);
    out.select(0, s).narrow(1, 0, rows).copy_(a.narrow(0, s * width, rows).t());
  }
  return out;
}

bool csr_bf16_spans(at::ScalarType dtype, int64_t rows) {
  return dtype == at::kBFloat16 && rows > 4 && effops::cpu::csr_bf16_spans_run();
}

at::Tensor gather_values(const at::Tensor& weight, const at::Tensor& ptr, const at::Tensor& idx, bool transpose_w) {
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t R = transpose_w ? K : N;
  const int64_t rs = transpose_w ? 1 : K, cs = transpose_w ? K : 1;
  check_index(ptr, idx, R);
  at::Tensor vals = at::empty({idx.numel()}, weight.options());
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_gather_values", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t* p = ptr.data_ptr<int64_t>();
    const int64_t* c = idx.data_ptr<int64_t>();
    scalar_t* v = vals.data_ptr<scalar_t>();
    at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = p[r]; j < p[r + 1]; ++j) v[j] = w[r * rs + c[j] * cs];
    });
  });
  return vals;
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask, bool in_place) {
  if (!weight.is_cpu() || !weight.is_contiguous() || !mask.is_contiguous() ||
      (mask.scalar_type() != at::kBool && mask.scalar_type() != weight.scalar_type())) {
    const at::Tensor m = mask.scalar_type() == weight.scalar_type() ? mask : mask.to(weight.scalar_type());
    return in_place ? weight.mul_(m) : weight * m;
  }
  // ATen's multiply by a bool tensor converts it element by element through its generic cast (5x the
  // cost of a float multiply at 192 x 192): one pass here, w * 0 or w * 1 as the product computes it.
  at::Tensor out = in_place ? weight : at::empty_like(weight);
  const int64_t n = weight.numel();
  EFFOPS_DISPATCH_FLOAT(weight.scalar_type(), "masked_linear_masked_weight", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (mask.scalar_type() == at::kBool && !std::is_same_v<scalar_t, float>) {
      // 16-bit weights by their bits (converting each to fp32 and back cost 3x the product): w * 1 is w,
      // w * 0 is a zero of w's sign, unless w is inf or NaN (then NaN): such ranges are redone in fp32.
      const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());  // bytes 0 or 1
      const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
      uint16_t* ob = reinterpret_cast<uint16_t*>(o);
      const uint16_t exponent = std::is_same_v<scalar_t, c10::BFloat16> ? 0x7F80 : 0x7C00;
      at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
        int non_finite = 0;
        for (int64_t i = i0; i < i1; ++i) {
          const uint16_t keep = static_cast<uint16_t>(0) - static_cast<uint16_t>(m[i]);  // 0xFFFF or 0
          ob[i] = static_cast<uint16_t>((wb[i] & keep) | (wb[i] & 0x8000));
          non_finite |= (wb[i] & exponent) == exponent;
        }
        if (non_finite)
          for (int64_t i = i0; i < i1; ++i)
            o[i] = static_cast<scalar_t>(static_cast<float>(w[i]) * static_cast<float>(m[i]));
      });
    } else if (mask.scalar_type() == at::kBool) {
      const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());  // bytes 0 or 1
      at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) o[i] = w[i] * static_cast<float>(m[i]);
      });
    } else {
      const scalar_t* m = mask.data_ptr<scalar_t>();
      at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) o[i] = w[i] * m[i];
      });
    }
  });
  return out;
}

bool holds_only_zeros_and_ones(const at::Tensor& mask, double* found) {
  const at::Tensor m = mask.contiguous();
  bool ok = true;
  EFFOPS_DISPATCH_FLOAT(m.scalar_type(), "masked_linear_check_binary", [&] {
    const scalar_t* p = m.data_ptr<scalar_t>();
    const int64_t n = m.numel();
    // Chunks checked without branches (vectorised), the first bad value looked up only on failure.
    for (int64_t i0 = 0; i0 < n && ok; i0 += 4096) {
      const int64_t i1 = std::min(n, i0 + 4096);
      int bad = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const float v = static_cast<float>(p[i]);
        bad |= (v != 0.0f) & (v != 1.0f);
      }
      if (!bad) continue;
      for (int64_t i = i0; i < i1; ++i) {
        const float v = static_cast<float>(p[i]);
        if (v != 0.0f && v != 1.0f) {
          *found = v;
          break;
        }
      }
      ok = false;
    }
  });
  return ok;
}

}  // namespace effops::masked
