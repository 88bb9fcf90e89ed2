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
#include <memory>
#include <vector>

namespace effops::cpu {
namespace {

constexpr int64_t kChunk = 64;    // batch rows per accumulator set
constexpr int64_t kFewRows = 4;   // at most this many rows: the scalar per-row path

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

template <class Vec, typename T>
EFFOPS_ALWAYS_INLINE void csr_mm_rows(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R,
                                      const T* bias, const int64_t* ptr, const int64_t* idx, const T* vals, T* out,
                                      int64_t r0, int64_t r1) {
  constexpr int NV = kChunk / Vec::kWidth;
  alignas(32) float tmp[kChunk];
  std::vector<T> row_vals(vals == nullptr ? static_cast<size_t>(most_kept(ptr, r0, r1)) : 0);
  for (int64_t span = 0; span < M; span += aT.width)
  for (int64_t r = r0; r < r1; ++r) {
    const T* kept_w = vals != nullptr ? vals + ptr[r] : gather_row(w, w_rs, w_cs, r, ptr, idx, row_vals.data());
    for (int64_t m0 = span; m0 < std::min(M, span + aT.width); m0 += kChunk) {
      const int64_t rows = std::min(kChunk, M - m0);
      Vec acc[NV];
      const Vec init = Vec::broadcast(bias != nullptr ? to_float(bias[r]) : 0.f);
      for (int v = 0; v < NV; ++v) acc[v] = init;
      for (int64_t j = ptr[r]; j < ptr[r + 1]; ++j) {
        const int64_t c = idx[j];
        const Vec wv = Vec::broadcast(to_float(kept_w[j - ptr[r]]));
        const float* src = aT.at(c, m0);
        for (int v = 0; v < NV; ++v) acc[v] = Vec::fma(wv, Vec::load(src + v * Vec::kWidth), acc[v]);
      }
      for (int v = 0; v < NV; ++v) acc[v].store(tmp + v * Vec::kWidth);
      for (int64_t i = 0; i < rows; ++i) out[(m0 + i) * R + r] = from_float<T>(tmp[i]);
    }
  }
}

// One function per level, each compiled for its instruction set.
template <typename T>
void csr_mm_rows_scalar(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R,
                        const T* bias, const int64_t* ptr, const int64_t* idx, const T* vals, T* out, int64_t r0,
                        int64_t r1) {
  csr_mm_rows<ScalarVec, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
#if EFFOPS_HAVE_X86
template <typename T>
EFFOPS_AVX2_TARGET void csr_mm_rows_avx2(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs,
                                         int64_t R, const T* bias, const int64_t* ptr, const int64_t* idx,
                                         const T* vals, T* out, int64_t r0, int64_t r1) {
  csr_mm_rows<Avx2Vec, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
}
template <typename T>
EFFOPS_AVX512_TARGET void csr_mm_rows_avx512(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs,
                                             int64_t R, const T* bias, const int64_t* ptr, const int64_t* idx,
                                             const T* vals, T* out, int64_t r0, int64_t r1) {
  csr_mm_rows<Avx512Vec, T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
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

template <typename T>
void csr_sparse_mm(const SpannedT& aT, int64_t M, const T* w, int64_t w_rs, int64_t w_cs, int64_t R, const T* bias,
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
  at::parallel_for(0, R, row_grain(R), [&](int64_t r0, int64_t r1) {
    if (M <= kFewRows) return csr_mm_rows_few<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
#if EFFOPS_HAVE_X86
    if (level >= CpuIsa::kAvx512) return csr_mm_rows_avx512<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
    if (level >= CpuIsa::kAvx2) return csr_mm_rows_avx2<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
#endif
    csr_mm_rows_scalar<T>(aT, M, w, w_rs, w_cs, R, bias, ptr, idx, vals, out, r0, r1);
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
  template void csr_sparse_mm<T>(const SpannedT&, int64_t, const T*, int64_t, int64_t, int64_t, const T*,    \
                                 const int64_t*, const int64_t*, const T*, T*);                              \
  template void csr_sparse_grad_weight<T>(const SpannedT&, const SpannedT&, int64_t, int64_t, const int64_t*, \
                                          const int64_t*, T*);
EFFOPS_INSTANTIATE(float)
EFFOPS_INSTANTIATE(c10::BFloat16)
EFFOPS_INSTANTIATE(c10::Half)
#undef EFFOPS_INSTANTIATE

}  // namespace effops::cpu
