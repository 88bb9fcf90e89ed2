// Unstructured (and 2:4) masked matmul on CPU through a CSR index of the mask. See masked_linear.h.
//
// csr_sparse_mm: the dense operand comes transposed in batch spans (SpannedT, masked_linear.h), so one
// kept weight w[r, c] multiplies 64 contiguous batch values of column c into 64 fp32 accumulators
// (8 AVX2 or 4 AVX-512 registers): one broadcast and 8 (4) loads and FMAs per kept weight and 64 batch
// rows. Only kept
// weights are read. Loop nest per thread: batch spans (at most 256 rows), then rows r of its range,
// then chunks of 64, then the kept columns of r: the chunks after the first find row r's kept columns
// (kept x span floats, ~400 KB at 4096 inputs and 10% density) still in L2. Row r's kept weights are
// gathered from W' into a row buffer first (unless given compressed), so every chunk reads them
// contiguous; with several spans all rows are gathered once ahead instead.
//
// csr_sparse_grad_weight: a sampled dense-dense product: each kept (n, k) is one dot product of two
// contiguous batch runs of gyT and xT, span by span, summed in fp32; nothing is computed for pruned
// weights.
#include "cpu/masked_linear.h"
#include "cpu/masked_linear_micro.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace effops::cpu {
namespace {

constexpr int64_t kChunk = 64;    // batch rows per accumulator set
constexpr int64_t kFewRows = 4;   // at most this many rows: the scalar per-row path
constexpr int64_t kGroup = 32;    // output rows whose sums are written to y together (64 bytes of bf16)

// The most kept weights of one row among rows r0..r1.
inline int64_t most_kept(const int64_t* ptr, int64_t r0, int64_t r1) {
  int64_t most = 0;
  for (int64_t r = r0; r < r1; ++r) most = std::max(most, ptr[r + 1] - ptr[r]);
  return most;
}

// Row r's kept weights of W'[r, c] = w[r * w_rs + c * w_cs], gathered into dst (returned): contiguous
// for the batch chunks that follow, which then find them in L1.
template <typename T>
inline const T* gather_row(const T* w, int64_t w_rs, int64_t w_cs, int64_t r, const int64_t* ptr, const int64_t* idx,
                           T* dst) {
  for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) dst[j - ptr[r]] = w[r * w_rs + idx[j] * w_cs];
  return dst;
}

// The bodies csr_mm_rows runs for one row r, kChunk batch rows from m0 and a run of the row's kept
// weights: tmp[64] += sum over the run of w[j] * aT(cols[j], m0 .. m0 + 64) (fp32; the batch row of
// tmp[p] is batch(p)).
// FmaChunk: fp32 spans, one broadcast weight and 64 / width FMAs per kept weight.
template <class Vec>
struct FmaChunk {
  using S = float;
  static constexpr int64_t batch(int64_t p) { return p; }
  template <typename T>
  EFFOPS_ALWAYS_INLINE static void run(const Spanned<float>& aT, int64_t m0, const T* kept_w, const int64_t* cols,
                                       int64_t n, float* tmp) {
    constexpr int NV = kChunk / Vec::kWidth;
    Vec acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = Vec::load(tmp + v * Vec::kWidth);
    for (int64_t j = 0; j < n; ++j) {
      const Vec wv = Vec::broadcast(to_float(kept_w[j]));
      const float* src = aT.at(cols[j], m0);
      for (int v = 0; v < NV; ++v) acc[v] = Vec::fma(wv, Vec::load(src + v * Vec::kWidth), acc[v]);
    }
    for (int v = 0; v < NV; ++v) acc[v].store(tmp + v * Vec::kWidth);
  }
};

#if EFFOPS_HAVE_X86
// Dpbf16Chunk: bf16 spans, kept weights taken in pairs (j, j + 1) of the row (any two columns): the pair
// of weights is one broadcast 32-bit word, and the two columns' 64 batch values (2 x 32 bf16) are
// interleaved into word pairs by vpunpck{l,h}wd, so one vdpbf16ps adds both products for 16 batch rows.
// Per pair and 64 rows: 4 loads, 4 shuffles, 4 vdpbf16ps, where FmaChunk does 8 loads and 8 FMAs over
// twice the bytes. Products of bf16 are exact in fp32; each vdpbf16ps rounds its two additions to
// fp32 (round to nearest even, bf16 denormals read as zero), fp32 accumulation as FmaChunk. An odd
// last weight pairs with a zero weight and a zero column (never 0 x an input that may be inf / NaN).
// Two accumulator sets (even and odd pairs) give 8 independent sums: 4 alone would wait on the
// instruction's latency. unpack works within 128-bit lanes: tmp lane e of vector v holds batch row
// batch(16 v + e) below.
struct Dpbf16Chunk {
  using S = uint16_t;
  static constexpr int64_t batch(int64_t p) {
    const int64_t v = p / 16, e = p % 16;
    return (v / 2) * 32 + 8 * (e / 4) + (v % 2) * 4 + e % 4;
  }
  EFFOPS_AVX512_BF16_TARGET static inline void pair(const uint16_t* x1, const uint16_t* x2, __m512i wv,
                                                    __m512 (&acc)[4]) {
    const __m512bh w = (__m512bh)wv;
    for (int h = 0; h < 2; ++h) {
      const __m512i a = _mm512_loadu_si512(x1 + 32 * h), b = _mm512_loadu_si512(x2 + 32 * h);
      acc[2 * h] = _mm512_dpbf16_ps(acc[2 * h], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
      acc[2 * h + 1] = _mm512_dpbf16_ps(acc[2 * h + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
    }
  }
  // Weights w[0] (low half) and w[1] (high half), broadcast.
  EFFOPS_AVX512_BF16_TARGET static inline __m512i word(const void* w) {
    uint32_t u;
    std::memcpy(&u, w, 4);
    return _mm512_set1_epi32(static_cast<int>(u));
  }
  template <typename T>
  EFFOPS_AVX512_BF16_TARGET static inline void run(const Spanned<uint16_t>& aT, int64_t m0, const T* kept_w,
                                                   const int64_t* cols, int64_t n, float* tmp) {
    static_assert(sizeof(T) == 2, "bf16 weights only");
    __m512 acc[2][4];
    for (int v = 0; v < 4; ++v) acc[0][v] = _mm512_loadu_ps(tmp + 16 * v), acc[1][v] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      pair(aT.at(cols[j], m0), aT.at(cols[j + 1], m0), word(kept_w + j), acc[0]);
      pair(aT.at(cols[j + 2], m0), aT.at(cols[j + 3], m0), word(kept_w + j + 2), acc[1]);
    }
    if (j + 2 <= n) pair(aT.at(cols[j], m0), aT.at(cols[j + 1], m0), word(kept_w + j), acc[0]), j += 2;
    if (j < n) {
      uint16_t last;
      std::memcpy(&last, kept_w + j, 2);
      alignas(64) static constexpr uint16_t kZeros[64] = {};
      pair(aT.at(cols[j], m0), kZeros, _mm512_set1_epi32(last), acc[1]);
    }
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(tmp + 16 * v, _mm512_add_ps(acc[0][v], acc[1][v]));
  }
};
#endif

// Rows r0..r1 of the product with the chunk body Body. Loop nest: batch spans, groups of kGroup rows,
// chunks of 64 batch rows, the group's rows. A chunk's sums for the group are collected in `sums` and
// written to y as one contiguous run per batch row: writing each row's 64 outputs straight to y put 64
// stores R elements apart (at R = 4096 the same cache set for every one: each store missed, and that
// was most of the bf16 kernel's time). (Walking the rows of a group over blocks of 16 KB of columns,
// so the block stays in L1, measured slower: at 10% density a row keeps ~13 columns of a block, too few
// to pay for carrying its sums from block to block.)
template <class Body, typename T>
EFFOPS_ALWAYS_INLINE void csr_mm_rows(const Spanned<typename Body::S>& aT, int64_t M, const T* w, int64_t w_rs,
                                      int64_t w_cs, int64_t R, const T* bias, const int64_t* ptr, const int64_t* idx,
                                      const T* vals, T* out, int64_t r0, int64_t r1) {
  alignas(64) float sums[kGroup][kChunk];
  // Without vals: a group's kept weights gathered into one run, as vals would hold them.
  std::vector<T> group_vals;
  if (vals == nullptr) {
    int64_t most = 0;
    for (int64_t g0 = r0; g0 < r1; g0 += kGroup) most = std::max(most, ptr[std::min(r1, g0 + kGroup)] - ptr[g0]);
    group_vals.resize(static_cast<size_t>(most));
  }
  for (int64_t span = 0; span < M; span += aT.width)
  for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
    const int64_t g1 = std::min(r1, g0 + kGroup);
    const T* kept_w = vals != nullptr ? vals + ptr[g0] : group_vals.data();  // of row g0, then on
    if (vals == nullptr)
      for (int64_t r = g0; r < g1; ++r) gather_row(w, w_rs, w_cs, r, ptr, idx, group_vals.data() + ptr[r] - ptr[g0]);
    for (int64_t m0 = span; m0 < std::min(M, span + aT.width); m0 += kChunk) {
      for (int64_t r = g0; r < g1; ++r) {
        std::fill(sums[r - g0], sums[r - g0] + kChunk, bias != nullptr ? to_float(bias[r]) : 0.f);
        Body::run(aT, m0, kept_w + (ptr[r] - ptr[g0]), idx + ptr[r], ptr[r + 1] - ptr[r], sums[r - g0]);
      }
      const int64_t rows = std::min(kChunk, M - m0);
      for (int64_t p = 0; p < kChunk; ++p) {
        const int64_t i = Body::batch(p);
        if (i < rows)
          for (int64_t r = g0; r < g1; ++r) out[(m0 + i) * R + r] = from_float<T>(sums[r - g0][p]);
      }
    }
  }
}

// One function per level, each compiled for its instruction set.
template <typename T>
void csr_mm_rows_scalar(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R,
                        const T* bias, const int64_t* ptr, const int64_t* idx, const T* vals, T* out, int64_t r0,
                        int64_t r1) {
  csr_mm_rows<FmaChunk<ScalarVec>, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void csr_mm_rows_avx2(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs,
                                         int64_t R, const T* bias, const int64_t* ptr, const int64_t* idx,
                                         const T* vals, T* out, int64_t r0, int64_t r1) {
  csr_mm_rows<FmaChunk<Avx2Vec>, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
template <typename T>
EFFOPS_AVX512_TARGET void csr_mm_rows_avx512(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs,
                                             int64_t R, const T* bias, const int64_t* ptr, const int64_t* idx,
                                             const T* vals, T* out, int64_t r0, int64_t r1) {
  csr_mm_rows<FmaChunk<Avx512Vec>, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
template <typename T>
EFFOPS_AVX512_BF16_TARGET void csr_mm_rows_dpbf16(const SpannedBf16& aT, int64_t M, const T* w, int64_t w_rs,
                                                  int64_t w_cs, int64_t R, const T* bias, const int64_t* ptr,
                                                  const int64_t* idx, const T* vals, T* out, int64_t r0, int64_t r1) {
  csr_mm_rows<Dpbf16Chunk, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
#endif

template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void csr_gw_rows(const SpannedT& gyT, const SpannedT& xT, int64_t K, const int64_t* ptr,
                                      const int64_t* idx, T* gw, int64_t n0, int64_t n1) {
  constexpr int64_t W = Vec::kWidth;
  // Span by span (as in csr_mm_rows: row n's kept columns stay in L2 within a span), partial dot
  // products summed in fp32 per kept weight, written once at the end.
  std::vector<float> acc(static_cast<size_t>(ptr[n1] - ptr[n0]), 0.f);
  for (int64_t s = 0; s < gyT.spans; ++s) {
    const int64_t m_begin = s * gyT.width;
    for (int64_t n = n0; n < n1; ++n) {
      const float* g = gyT.at(n, m_begin);
      for (int64_t j = ptr[n]; j < ptr[n + 1]; ++j) {
        const float* xr = xT.at(idx[j], m_begin);
        // Four independent sums hide the FMA latency; span widths are multiples of 64.
        Vec s0 = Vec::zero(), s1 = Vec::zero(), s2 = Vec::zero(), s3 = Vec::zero();
        for (int64_t m = 0; m < gyT.width; m += 4 * W) {
          s0 = Vec::fma(Vec::load(g + m), Vec::load(xr + m), s0);
          s1 = Vec::fma(Vec::load(g + m + W), Vec::load(xr + m + W), s1);
          s2 = Vec::fma(Vec::load(g + m + 2 * W), Vec::load(xr + m + 2 * W), s2);
          s3 = Vec::fma(Vec::load(g + m + 3 * W), Vec::load(xr + m + 3 * W), s3);
        }
        acc[j - ptr[n0]] += ((s0 + s1) + (s2 + s3)).reduce_add();
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t j = ptr[n]; j < ptr[n + 1]; ++j) gw[n * K + idx[j]] = from_float<T>(acc[j - ptr[n0]]);
}

template <typename T>
void csr_gw_rows_scalar(const SpannedT& gyT, const SpannedT& xT, int64_t K, const int64_t* ptr, const int64_t* idx,
                        T* gw, int64_t n0, int64_t n1) {
  csr_gw_rows<ScalarVec, T>(gyT, xT, K, ptr, idx, gw, n0, n1);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void csr_gw_rows_avx2(const SpannedT& gyT, const SpannedT& xT, int64_t K, const int64_t* ptr,
                                         const int64_t* idx, T* gw, int64_t n0, int64_t n1) {
  csr_gw_rows<Avx2Vec, T>(gyT, xT, K, ptr, idx, gw, n0, n1);
}
template <typename T>
EFFOPS_AVX512_TARGET void csr_gw_rows_avx512(const SpannedT& gyT, const SpannedT& xT, int64_t K, const int64_t* ptr,
                                             const int64_t* idx, T* gw, int64_t n0, int64_t n1) {
  csr_gw_rows<Avx512Vec, T>(gyT, xT, K, ptr, idx, gw, n0, n1);
}
#endif

int64_t row_grain(int64_t rows) { return std::max<int64_t>(1, rows / (8 * std::max(1, at::get_num_threads()))); }

}  // namespace

// A handful of batch rows (decoding one token, say): 64-wide vectors would be mostly padding, so
// each kept weight does `M` scalar FMAs instead (the weights are the traffic, read once either way).
template <typename T>
void csr_mm_rows_few(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R, const T* bias,
                     const int64_t* ptr, const int64_t* idx, const T* vals, T* out, int64_t r0, int64_t r1) {
  float acc[kFewRows];
  for (int64_t r = r0; r < r1; ++r) {
    const float b = bias != nullptr ? to_float(bias[r]) : 0.f;
    for (int64_t i = 0; i < M; ++i) acc[i] = b;
    for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) {
      const float wv = to_float(vals != nullptr ? vals[j] : w[r * w_rs + idx[j] * w_cs]);  // (each read once)
      const float* src = aT.at(idx[j], 0);  // one span
      for (int64_t i = 0; i < M; ++i) acc[i] += wv * src[i];
    }
    for (int64_t i = 0; i < M; ++i) out[i * R + r] = from_float<T>(acc[i]);
  }
}

bool csr_bf16_spans_run() {
#if EFFOPS_HAVE_X86
  return cpu_isa_at_least(CpuIsa::kAvx512Bf16);
#else
  return false;
#endif
}

template <typename T, typename S>
void csr_sparse_mm(const Spanned<S>& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R, const T* bias,
                   const int64_t* ptr, const int64_t* idx, const T* vals, T* out) {
  const CpuIsa level = cpu_isa();
  // Without vals each row's kept weights are gathered as the row is reached; over several batch spans
  // that would read W' once per span: gather them all once instead (O(kept weights), this call's own).
  std::unique_ptr<T[]> gathered;
  if (vals == nullptr && aT.spans > 1) {
    gathered.reset(new T[static_cast<size_t>(ptr[R])]);
    at::parallel_for(0, R, row_grain(R), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) gather_row(w, w_rs, w_cs, r, ptr, idx, gathered.get() + ptr[r]);
    });
    vals = gathered.get();
  }
  if constexpr (std::is_same_v<S, uint16_t>) {
    if (!csr_bf16_spans_run() || M <= kFewRows)
      throw std::invalid_argument("bf16 spans need the avx512_bf16 level and more than 4 rows");
  }
  at::parallel_for(0, R, row_grain(R), [&](int64_t r0, int64_t r1) {
    if constexpr (std::is_same_v<S, uint16_t>) {
#if EFFOPS_HAVE_X86
      csr_mm_rows_dpbf16<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
#endif
    } else {
      if (M <= kFewRows) return csr_mm_rows_few<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
#if EFFOPS_HAVE_X86
      if (level >= CpuIsa::kAvx512)
        return csr_mm_rows_avx512<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
      if (level >= CpuIsa::kAvx2) return csr_mm_rows_avx2<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
#endif
      csr_mm_rows_scalar<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
    }
  });
}

template <typename T>
void csr_sparse_grad_weight(const SpannedT& gyT, const SpannedT& xT, int64_t N, int64_t K, const int64_t* ptr,
                            const int64_t* idx, T* gw) {
  const CpuIsa level = cpu_isa();
  at::parallel_for(0, N, row_grain(N), [&](int64_t n0, int64_t n1) {
#if EFFOPS_HAVE_X86
    if (level >= CpuIsa::kAvx512) return csr_gw_rows_avx512<T>(gyT, xT, K, ptr, idx, gw, n0, n1);
    if (level >= CpuIsa::kAvx2) return csr_gw_rows_avx2<T>(gyT, xT, K, ptr, idx, gw, n0, n1);
#endif
    csr_gw_rows_scalar<T>(gyT, xT, K, ptr, idx, gw, n0, n1);
  });
}

#define EFFOPS_INSTANTIATE(T)                                                                                \
  template void csr_sparse_mm<T, float>(const SpannedT&, int64_t, const T*, int64_t, int64_t, int64_t,       \
                                        const T*, const int64_t*, const int64_t*, const T*, T*);             \
  template void csr_sparse_grad_weight<T>(const SpannedT&, const SpannedT&, int64_t, int64_t, const int64_t*, \
                                          const int64_t*, T*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE
template void csr_sparse_mm<c10::BFloat16, uint16_t>(const SpannedBf16&, int64_t, const c10::BFloat16*, int64_t,
                                                     int64_t, int64_t, const c10::BFloat16*, const int64_t*,
                                                     const int64_t*, const c10::BFloat16*, c10::BFloat16*);

}  // namespace effops::cpu
