// Building masked_linear's mask index (masked_linear_index.h): on CPU by the byte scans of
// csrc/cpu/mask_index.cpp, on other devices by ATen ops.
#include "bindings/masked_linear_index.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "cpu/masked_linear.h"

namespace effops::masked {
namespace {

constexpr int64_t kBlocks[] = {64, 32, 16};

at::Tensor as_bool(const at::Tensor& mask) {
  return (mask.scalar_type() == at::kBool ? mask : mask.ne(0)).contiguous();
}

// (ptr, idx) of the kept entries of a 2-D bool matrix, per row, columns ascending.
std::pair<at::Tensor, at::Tensor> csr_of(const at::Tensor& m) {
  const at::Tensor nz = m.nonzero();
  const at::Tensor rows = nz.select(1, 0);
  at::Tensor ptr = at::zeros({m.size(0) + 1}, nz.options());
  if (m.size(0) > 0) ptr.narrow(0, 1, m.size(0)).copy_(at::bincount(rows, {}, m.size(0)).cumsum(0));
  return {ptr, nz.select(1, 1).contiguous()};
}

// Kept entries per b x b block from those per 16 x 16 block (b a multiple of 16).
at::Tensor coarsen(const at::Tensor& counts16, int64_t f) {
  if (f == 1) return counts16;
  const int64_t r = counts16.size(0), c = counts16.size(1);
  const int64_t rb = (r + f - 1) / f, cb = (c + f - 1) / f;
  return at::constant_pad_nd(counts16, {0, cb * f - c, 0, rb * f - r}).view({rb, f, cb, f}).sum({1, 3});
}

// Entries of each b x b block (edge blocks partial).
at::Tensor block_areas(int64_t N, int64_t K, int64_t b, const at::TensorOptions& options) {
  const int64_t rb = (N + b - 1) / b, cb = (K + b - 1) / b;
  at::Tensor rows = at::full({rb}, b, options), cols = at::full({cb}, b, options);
  rows[rb - 1] = N - (rb - 1) * b;
  cols[cb - 1] = K - (cb - 1) * b;
  return rows.unsqueeze(1) * cols.unsqueeze(0);
}

}  // namespace

Index describe(const at::Tensor& mask) {
  Index index;
  const int64_t N = mask.size(0), K = mask.size(1);
  index.numel = N * K;
  if (N == 0 || K == 0) {
    index.block = kBlocks[0];
    index.kept_blocks = at::zeros({(N + 63) / 64, (K + 63) / 64}, mask.options().dtype(at::kBool));
    return index;
  }
  const at::Tensor m = as_bool(mask);
  at::Tensor counts16;
  if (m.is_cpu()) {
    // Plain loops over the per-16 counts: a few ATen ops per block size cost more than the scan itself
    // on a 192 x 192 mask.
    const int64_t r16 = (N + 15) / 16, c16 = (K + 15) / 16;
    std::vector<int64_t> counts(r16 * c16);
    effops::cpu::mask_block_counts(reinterpret_cast<const uint8_t*>(m.data_ptr<bool>()), N, K, 16, counts.data());
    for (const int64_t c : counts) index.nnz += c;
    for (const int64_t b : kBlocks) {
      const int64_t rb = (N + b - 1) / b, cb = (K + b - 1) / b;
      const int shift = b == 64 ? 2 : b == 32 ? 1 : 0;  // (b / 16 as a shift: a division per count cost 0.4 ms)
      std::vector<int64_t> coarse(rb * cb, 0);
      for (int64_t i = 0; i < r16; ++i) {
        int64_t* line = coarse.data() + (i >> shift) * cb;
        for (int64_t j = 0; j < c16; ++j) line[j >> shift] += counts[i * c16 + j];
      }
      bool constant = true;
      for (int64_t i = 0; i < rb && constant; ++i)
        for (int64_t j = 0; j < cb; ++j) {
          const int64_t area = std::min(b, N - i * b) * std::min(b, K - j * b), c = coarse[i * cb + j];
          if (c != 0 && c != area) {
            constant = false;
            break;
          }
        }
      if (!constant) continue;
      index.block = b;
      index.kept_blocks = at::empty({rb, cb}, m.options());
      bool* kept = index.kept_blocks.data_ptr<bool>();
      for (int64_t i = 0; i < rb * cb; ++i) kept[i] = coarse[i] != 0;
      break;
    }
    return index;
  } else {
    const int64_t rb = (N + 15) / 16, cb = (K + 15) / 16;
    counts16 = at::constant_pad_nd(m.to(at::kInt), {0, cb * 16 - K, 0, rb * 16 - N})
                   .view({rb, 16, cb, 16})
                   .sum({1, 3}, false, at::kLong);
  }
  index.nnz = counts16.sum().item<int64_t>();
  for (const int64_t b : kBlocks) {
    const at::Tensor counts = coarsen(counts16, b / 16);
    const at::Tensor kept = counts.ne(0);
    if (counts.eq(0).logical_or(counts.eq(block_areas(N, K, b, counts.options()))).all().item<bool>()) {
      index.block = b;
      index.kept_blocks = kept;
      break;
    }
  }
  return index;
}

void build_rows(Index& index, const at::Tensor& mask) {
  if (index.has_rows()) return;
  if (index.block) {
    std::tie(index.rows_ptr, index.rows_idx) = csr_of(index.kept_blocks);
    return;
  }
  const at::Tensor m = as_bool(mask);
  if (!m.is_cpu()) {
    std::tie(index.rows_ptr, index.rows_idx) = csr_of(m);
    return;
  }
  const int64_t N = m.size(0), K = m.size(1);
  const auto* bytes = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  index.rows_ptr = at::empty({N + 1}, m.options().dtype(at::kLong));
  const int64_t kept = effops::cpu::mask_row_counts(bytes, N, K, index.rows_ptr.data_ptr<int64_t>());
  index.rows_idx = at::empty({kept}, m.options().dtype(at::kLong));
  effops::cpu::mask_row_lists(bytes, N, K, index.rows_ptr.data_ptr<int64_t>(), index.rows_idx.data_ptr<int64_t>());
}

void build_cols(Index& index, const at::Tensor& mask) {
  if (index.has_cols()) return;
  if (index.block) {
    std::tie(index.cols_ptr, index.cols_idx) = csr_of(index.kept_blocks.t());
    return;
  }
  const at::Tensor m = as_bool(mask);
  if (!m.is_cpu()) {
    std::tie(index.cols_ptr, index.cols_idx) = csr_of(m.t());
    return;
  }
  const int64_t N = m.size(0), K = m.size(1);
  const auto* bytes = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  index.cols_ptr = at::empty({K + 1}, m.options().dtype(at::kLong));
  const int64_t kept = effops::cpu::mask_col_counts(bytes, N, K, index.cols_ptr.data_ptr<int64_t>());
  index.cols_idx = at::empty({kept}, m.options().dtype(at::kLong));
  effops::cpu::mask_col_lists(bytes, N, K, index.cols_ptr.data_ptr<int64_t>(), index.cols_idx.data_ptr<int64_t>());
}

std::vector<at::Tensor> to_list(const Index& index, const at::Tensor& mask) {
  at::Tensor info = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  info[0] = index.block;
  info[1] = index.nnz;
  const at::Tensor none = at::empty({0}, mask.options().dtype(at::kLong));
  return {info, index.has_rows() ? index.rows_ptr : none, index.has_rows() ? index.rows_idx : none,
          index.has_cols() ? index.cols_ptr : none, index.has_cols() ? index.cols_idx : none};
}

Index from_list(at::TensorList list, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(list.size() == 5, "index must be the 5 tensors masked_linear_index(mask) returns, got ",
                    list.size());
  const at::Tensor& info = list[0];
  TORCH_CHECK_VALUE(info.is_cpu() && info.scalar_type() == at::kLong && info.numel() == 2,
                    "index[0] must be masked_linear_index's int64 [block, nnz] on the CPU");
  Index index;
  const int64_t* v = info.data_ptr<int64_t>();
  index.block = v[0];
  index.nnz = v[1];
  index.numel = mask.numel();
  TORCH_CHECK_VALUE(index.block == 0 || index.block == 16 || index.block == 32 || index.block == 64,
                    "index: block must be 0, 16, 32 or 64, got ", index.block);
  const int64_t N = mask.size(0), K = mask.size(1), b = index.block;
  const int64_t rows = b ? (N + b - 1) / b : N, cols = b ? (K + b - 1) / b : K;
  auto take = [&](int i, int64_t n, at::Tensor& ptr, at::Tensor& idx) {
    ptr = list[i];
    idx = list[i + 1];
    TORCH_CHECK_VALUE(ptr.scalar_type() == at::kLong && idx.scalar_type() == at::kLong && ptr.is_contiguous() &&
                          idx.is_contiguous() && ptr.numel() == n + 1 && ptr.device() == mask.device() &&
                          idx.device() == mask.device() && (!ptr.is_cpu() || ptr.data_ptr<int64_t>()[n] == idx.numel()),
                      "index does not fit this mask of shape (", N, ", ", K, "): build it with masked_linear_index(mask)");
  };
  take(1, rows, index.rows_ptr, index.rows_idx);
  take(3, cols, index.cols_ptr, index.cols_idx);
  return index;
}

}  // namespace effops::masked
