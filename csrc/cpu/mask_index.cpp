// The mask scans behind masked_linear's index (declared in masked_linear.h): per-block counts, and the
// kept (row, column) lists per row and per column, reading the mask 8 bytes at a time.
//
// A mask is a row-major byte array. The lists keep every nonzero byte and size themselves from their
// own counts, so any bytes give consistent, in-bounds lists. The block counts add the bytes, which is the
// kept count for bool masks (bytes 0 and 1); other bytes (memory from to_empty) only skew the counts, so
// the policy's density and the choice of block size, never a list.
#include "cpu/masked_linear.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>  // baseline on x86-64: no per-level body needed
#endif

namespace effops::cpu {
namespace {

constexpr uint64_t kLowBits = 0x0101010101010101ULL;

inline uint64_t load8(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// The sum of the 8 bytes of w when each is 0 or 1: one multiply lands it in the top byte.
inline int64_t byte_sum(uint64_t w) { return static_cast<int64_t>((w * kLowBits) >> 56); }

// One bit per nonzero byte of w, at the byte's lowest bit.
inline uint64_t nonzero_bytes(uint64_t w) {
  w |= w >> 4;
  w |= w >> 2;
  w |= w >> 1;
  return w & kLowBits;
}

inline int64_t bytes_in(const uint8_t* p, int64_t n) {
  int64_t kept = 0, i = 0;
  for (; i + 8 <= n; i += 8) kept += byte_sum(load8(p + i));
  for (; i < n; ++i) kept += p[i];
  return kept;
}

inline int64_t nonzero_in(const uint8_t* p, int64_t n) {
  int64_t kept = 0, i = 0;
#if defined(__SSE2__)
  // 16 bytes a step: compare with zero, keep 1 per nonzero byte, sum by psadbw.
  const __m128i zero = _mm_setzero_si128(), one = _mm_set1_epi8(1);
  __m128i sums = zero;
  for (; i + 16 <= n; i += 16) {
    const __m128i is_zero = _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)), zero);
    sums = _mm_add_epi64(sums, _mm_sad_epu8(_mm_andnot_si128(is_zero, one), zero));
  }
  kept = _mm_cvtsi128_si64(sums) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(sums, sums));
#endif
  for (; i + 8 <= n; i += 8) kept += byte_sum(nonzero_bytes(load8(p + i)));
  for (; i < n; ++i) kept += p[i] != 0;
  return kept;
}

// Calls f(k) for every nonzero byte k of p[k0, k1), ascending.
template <class F>
inline void for_each_kept(const uint8_t* p, int64_t k0, int64_t k1, F&& f) {
  int64_t k = k0;
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  for (; k + 16 <= k1; k += 16) {
    unsigned bits = ~static_cast<unsigned>(
                        _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)), zero))) &
                    0xFFFFu;
    while (bits) {
      f(k + __builtin_ctz(bits));
      bits &= bits - 1;
    }
  }
#endif
  for (; k + 8 <= k1; k += 8) {
    uint64_t bits = nonzero_bytes(load8(p + k));
    while (bits) {
      f(k + (__builtin_ctzll(bits) >> 3));
      bits &= bits - 1;
    }
  }
  for (; k < k1; ++k)
    if (p[k]) f(k);
}

}  // namespace

void mask_block_counts(const uint8_t* m, int64_t N, int64_t K, int64_t b, int64_t* counts) {
  const int64_t nbr = (N + b - 1) / b, nbc = (K + b - 1) / b;
  at::parallel_for(0, nbr, 1, [&](int64_t br0, int64_t br1) {
    for (int64_t br = br0; br < br1; ++br) {
      int64_t* row = counts + br * nbc;
      std::fill(row, row + nbc, 0);
      for (int64_t n = br * b; n < std::min(N, (br + 1) * b); ++n) {
        const uint8_t* line = m + n * K;
        for (int64_t j = 0; j < nbc; ++j) row[j] += bytes_in(line + j * b, std::min(b, K - j * b));
      }
    }
  });
}

int64_t mask_row_counts(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr) {
  ptr[0] = 0;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) ptr[n + 1] = nonzero_in(m + n * K, K);
  });
  for (int64_t n = 0; n < N; ++n) ptr[n + 1] += ptr[n];
  return ptr[N];
}

void mask_row_lists(const uint8_t* m, int64_t N, int64_t K, const int64_t* ptr, int64_t* idx) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t* out = idx + ptr[n];
      for_each_kept(m + n * K, 0, K, [&](int64_t k) { *out++ = k; });
    }
  });
}

int64_t mask_col_counts(const uint8_t* m, int64_t N, int64_t K, int64_t* ptr) {
  // Parallel over column ranges; within one, each row adds its bytes' flags to the range's counts.
  ptr[0] = 0;
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    std::vector<int32_t> counts(k1 - k0, 0);  // (32-bit: the byte compares widen to fewer lanes)
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* line = m + n * K + k0;
      for (int64_t k = 0; k < k1 - k0; ++k) counts[k] += line[k] != 0;
    }
    for (int64_t k = k0; k < k1; ++k) ptr[k + 1] = counts[k - k0];
  });
  for (int64_t k = 0; k < K; ++k) ptr[k + 1] += ptr[k];
  return ptr[K];
}

void mask_col_lists(const uint8_t* m, int64_t N, int64_t K, const int64_t* ptr, int64_t* idx) {
  // Parallel over column ranges of at least 256 (whole cache lines of each row), rows ascending.
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    std::vector<int64_t> next(ptr + k0, ptr + k1);
    for (int64_t n = 0; n < N; ++n)
      for_each_kept(m + n * K, k0, k1, [&](int64_t k) { idx[next[k - k0]++] = n; });
  });
}

}  // namespace effops::cpu
