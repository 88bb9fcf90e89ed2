// The mask scans behind masked_linear's index (declared in masked_linear.h): per-block counts, and the
// kept (row, column) lists per row and per column, reading the mask 16 or 64 bytes at a time. The
// functional op runs them on every call, so they are written to run near memory speed.
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

// sums[k] += line[k] for k < n, bytes wrapping.
inline void add_bytes(uint8_t* sums, const uint8_t* line, int64_t n) {
  int64_t k = 0;
#if defined(__SSE2__)
  for (; k + 16 <= n; k += 16) {
    __m128i* s = reinterpret_cast<__m128i*>(sums + k);
    _mm_storeu_si128(s, _mm_add_epi8(_mm_loadu_si128(s), _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + k))));
  }
#endif
  for (; k < n; ++k) sums[k] = static_cast<uint8_t>(sums[k] + line[k]);
}

// The sum of the bytes p[0, n).
inline int64_t sum_bytes(const uint8_t* p, int64_t n) {
  int64_t total = 0, k = 0;
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  for (; k + 16 <= n; k += 16) {
    const __m128i s = _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k)), zero);
    total += _mm_cvtsi128_si64(s) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(s, s));
  }
#endif
  for (; k < n; ++k) total += p[k];
  return total;
}

// One bit per nonzero byte of p[0, 64), bit i for byte i.
inline uint64_t nonzero_bits64(const uint8_t* p) {
#if defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  uint64_t zeros = 0;
  for (int q = 0; q < 4; ++q) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * q));
    zeros |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(v, zero)))) << (16 * q);
  }
  return ~zeros;
#else
  uint64_t bits = 0;
  for (int i = 0; i < 64; ++i) bits |= static_cast<uint64_t>(p[i] != 0) << i;
  return bits;
#endif
}

// The lowest set bit of a nonzero w; for w == 0 a defined 63 (callers write it only past their count).
inline int64_t lowest_bit(uint64_t w) { return __builtin_ctzll(w | (uint64_t{1} << 63)); }

// Calls f(k) for every nonzero byte k of p[k0, k1), ascending. 64 bytes a step: the loop over one
// step's bits ends once per 64 bytes (a branch miss each; per 16 bytes they cost more than the scan).
template <class F>
inline void for_each_kept(const uint8_t* p, int64_t k0, int64_t k1, F&& f) {
  int64_t k = k0;
  for (; k + 64 <= k1; k += 64)
    for (uint64_t bits = nonzero_bits64(p + k); bits; bits &= bits - 1) f(k + lowest_bit(bits));
  for (; k < k1; ++k)
    if (p[k]) f(k);
}

// Writes base + the positions of the set bits of `bits`, ascending, at out; returns out + their count.
// Branch-light (after Lemire's bitset decoding): 8 positions are written whatever the count, then 8
// more when there are more than 8, so out needs room for 16 entries whatever the count.
inline int64_t* write_kept(uint64_t bits, int64_t base, int64_t* out) {
  const int count = __builtin_popcountll(bits);
  for (int i = 0; i < 8; ++i, bits &= bits - 1) out[i] = base + lowest_bit(bits);
  if (count > 8) {
    for (int i = 8; i < 16; ++i, bits &= bits - 1) out[i] = base + lowest_bit(bits);
    for (int i = 16; i < count; ++i, bits &= bits - 1) out[i] = base + lowest_bit(bits);
  }
  return out + count;
}

}  // namespace

void mask_block_counts(const uint8_t* m, int64_t N, int64_t K, int64_t b, int64_t* counts) {
  const int64_t nbr = (N + b - 1) / b, nbc = (K + b - 1) / b;
  // A block-row's lines are added byte by byte into one line of column sums (16 bytes an instruction: the
  // scan runs near memory speed, where summing each b-byte run on its own took 1.9 ms at 4096 x 4096),
  // then each block's b columns are added. Exact for bytes 0 and 1 (b <= 255).
  at::parallel_for(0, nbr, 1, [&](int64_t br0, int64_t br1) {
    std::vector<uint8_t> column_sums(static_cast<size_t>(K));
    uint8_t* __restrict sums = column_sums.data();
    for (int64_t br = br0; br < br1; ++br) {
      std::fill(sums, sums + K, uint8_t{0});
      for (int64_t n = br * b; n < std::min(N, (br + 1) * b); ++n) {
        const uint8_t* __restrict line = m + n * K;
        add_bytes(sums, line, K);
      }
      int64_t* row = counts + br * nbc;
      for (int64_t j = 0; j < nbc; ++j) {
        row[j] = sum_bytes(sums + j * b, std::min(b, K - j * b));
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
      const uint8_t* line = m + n * K;
      int64_t* out = idx + ptr[n];
      int64_t* const end = idx + ptr[n + 1];
      int64_t k = 0;
      // write_kept's spare writes stay inside the row's own list: near its end, one at a time.
      for (; k + 64 <= K && end - out >= 16; k += 64) out = write_kept(nonzero_bits64(line + k), k, out);
      for_each_kept(line, k, K, [&](int64_t kk) { *out++ = kk; });
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
