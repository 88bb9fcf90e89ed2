// The mask scans behind masked_linear's index (declared in masked_linear.h): per-block counts, and the
// kept (row, column) lists per row and per column. A mask is read as bytes, any nonzero byte kept, so a
// bool mask holding bytes other than 0 and 1 (memory from to_empty) gives a consistent index.
#include "cpu/masked_linear.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

namespace effops::cpu {
namespace {

constexpr uint64_t kLowBits = 0x0101010101010101ULL;

// Kept entries among the 8 bytes of w: each nonzero byte folded onto its lowest bit, then summed by
// one multiply (the sum of eight 0/1 bytes lands in the top byte).
inline int64_t kept_in_word(uint64_t w) {
  w |= w >> 4;
  w |= w >> 2;
  w |= w >> 1;
  return static_cast<int64_t>(((w & kLowBits) * kLowBits) >> 56);
}

inline int64_t kept_in(const uint8_t* p, int64_t n) {
  int64_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    kept += kept_in_word(w);
  }
  for (; i < n; ++i) kept += p[i] != 0;
  return kept;
}

}  // namespace

void mask_block_counts(const uint8_t* m, int64_t N, int64_t K, int64_t b, int64_t* counts) {
  const int64_t nbr = (N + b - 1) / b, nbc = (K + b - 1) / b;
  at::parallel_for(0, nbr, 1, [&](int64_t br0, int64_t br1) {
    for (int64_t br = br0; br < br1; ++br) {
      int64_t* row = counts + br * nbc;
      for (int64_t j = 0; j < nbc; ++j) row[j] = 0;
      for (int64_t n = br * b; n < std::min(N, (br + 1) * b); ++n) {
        const uint8_t* line = m + n * K;
        for (int64_t j = 0; j < nbc; ++j) row[j] += kept_in(line + j * b, std::min(b, K - j * b));
      }
    }
  });
}

void mask_row_lists(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr, int64_t* idx) {
  // Pass 1 counts per row, pass 2 fills: both parallel over rows, each row one contiguous stream.
  ptr[0] = 0;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) ptr[n + 1] = kept_in(m + n * K, K);
  });
  for (int64_t n = 0; n < N; ++n) ptr[n + 1] += ptr[n];
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* line = m + n * K;
      int64_t* out = idx + ptr[n];
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        uint64_t w;
        std::memcpy(&w, line + k, 8);
        if (w == 0) continue;  // most words of a sparse mask
        for (int64_t j = 0; j < 8; ++j)
          if (line[k + j]) *out++ = k + j;
      }
      for (; k < K; ++k)
        if (line[k]) *out++ = k;
    }
  });
}

void mask_col_lists(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr, int64_t* idx) {
  // Parallel over column ranges of 64 (a cache line of each row per range), rows ascending within a
  // column. Counts first, then each column's start, then the fill.
  std::vector<int64_t> counts(K, 0);
  constexpr int64_t kCols = 64;
  const int64_t ranges = (K + kCols - 1) / kCols;
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* line = m + n * K;
      for (int64_t k = r0 * kCols; k < std::min(K, r1 * kCols); ++k) counts[k] += line[k] != 0;
    }
  });
  ptr[0] = 0;
  for (int64_t k = 0; k < K; ++k) ptr[k + 1] = ptr[k] + counts[k];
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    const int64_t k0 = r0 * kCols, k1 = std::min(K, r1 * kCols);
    std::vector<int64_t> next(ptr + k0, ptr + k1);
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* line = m + n * K;
      for (int64_t k = k0; k < k1; ++k)
        if (line[k]) idx[next[k - k0]++] = n;
    }
  });
}

}  // namespace effops::cpu
