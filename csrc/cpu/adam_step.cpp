// Fused Adam/AdamW step (see adam_step.h for the arithmetic).
//
// Loop nest: the tensors are cut into chunks of kChunk elements (a small tensor is one chunk);
// at::parallel_for spreads the chunks over threads; each chunk runs the vector body (8 fp32 lanes
// with AVX2/FMA, or the scalar body), its tail through the same body on a padded copy. The kernel is a
// template over the vector type, the param dtype and master weights: one body, instantiated per
// combination, never copied per dtype.
#include "cpu/adam_step.h"

#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "cpu/adam_math.h"
#include "cpu/cpu_features.h"
#include "cpu/simd.h"
#include "cpu/stochastic_round.h"

namespace effops::cpu {
namespace {

// Elements per chunk: 32K elements move about 1 MB at fp32 (28 bytes per element), enough to hide
// the per-chunk setup, small enough to balance threads over a few large tensors.
constexpr int64_t kChunk = 1 << 15;
// Below this many elements in total the step runs on the calling thread: waking a thread team
// costs more than the work (torch's own elementwise kernels use a 32K-element grain as well).
constexpr int64_t kParallelMin = 1 << 16;

using Coeffs = AdamCoeffs;

Coeffs make_coeffs(const AdamTensor& t, const AdamHyper& h) {
  return make_adam_coeffs(t.step_size, t.bias_correction2_sqrt, h);
}

// Where one vector's elements live: in the tensors, or in a stack buffer for a tensor's tail.
template <class P, class S>
struct Ptrs {
  P* param;
  P* grad;
  S* exp_avg;
  S* exp_avg_sq;
  S* max_exp_avg_sq;
  float* master;
};

// One vector (Vec::kWidth elements). P: param/grad dtype; S: moment dtype. Each operation is the
// one torch's vectorized CPU kernels use (same FMAs, same order), so one AVX2 step matches
// torch.optim.Adam(foreach=False) on fp32 to the last bit in most elements; over many steps they drift
// apart by float32 rounding (sqrt: IEEE here, MKL's in torch; docs/adam.md). The scalar body rounds
// a * b + c twice (ScalarVec::fma: no FMA instruction on the CPUs it serves), so it can differ by more
// where Adam's normalisation amplifies a last-bit difference (g + wd * p nearly cancelling, beta2 = 0).
template <class Vec, class P, class S, bool kMaster>
EFFOPS_ALWAYS_INLINE void adam_vector(const Ptrs<P, S>& x, const Coeffs& c, int64_t sr_seed, int64_t index) {
  Vec g = Vec::load(x.grad);
  if (c.unscale) {
    g = g / Vec::broadcast(c.grad_scale);
    g.store(x.grad);
  }
  Vec p = kMaster ? Vec::load(x.master) : Vec::load(x.param);
  Vec m = Vec::load(x.exp_avg);
  Vec v = Vec::load(x.exp_avg_sq);
  adam_moments(p, g, m, v, c);
  Vec vhat = v;
  if (c.amsgrad) {
    vhat = Vec::max(Vec::load(x.max_exp_avg_sq), v);
    vhat.store(x.max_exp_avg_sq);
  }
  p = adam_apply(p, m, Vec::sqrt(vhat), c);

  m.store(x.exp_avg);
  v.store(x.exp_avg_sq);
  if (kMaster) p.store(x.master);
  if constexpr (std::is_same_v<P, c10::BFloat16> && !kMaster) {
    if (sr_seed >= 0) {
      store_bf16_stochastic(p, x.param, static_cast<uint32_t>(sr_seed), index);
      return;
    }
  }
  p.store(x.param);
}

template <class P, class S>
Ptrs<P, S> ptrs_at(const AdamTensor& t, int64_t i) {
  return {static_cast<P*>(t.param) + i, static_cast<P*>(t.grad) + i, static_cast<S*>(t.exp_avg) + i,
          static_cast<S*>(t.exp_avg_sq) + i, t.max_exp_avg_sq ? static_cast<S*>(t.max_exp_avg_sq) + i : nullptr,
          t.master ? t.master + i : nullptr};
}

// Elements [begin, end) of one tensor: full vectors, then the tail (fewer than kWidth elements)
// through the same vector body on a zero-padded copy, so every element gets the same arithmetic.
template <class Vec, class P, class S, bool kMaster>
EFFOPS_ALWAYS_INLINE void adam_span(const AdamTensor& tensor, const Coeffs& coeffs, int64_t begin, int64_t end) {
  // Local copies: the stores through float pointers below could alias the caller's structs, which
  // would make the compiler reload every coefficient and pointer after each store.
  const Coeffs c = coeffs;
  const AdamTensor t = tensor;
  int64_t i = begin;
  for (; i + Vec::kWidth <= end; i += Vec::kWidth) {
    adam_vector<Vec, P, S, kMaster>(ptrs_at<P, S>(t, i), c, t.stochastic_round_seed, i);
  }
  const int64_t rest = end - i;
  if (rest == 0) return;
  constexpr int W = Vec::kWidth;
  P param[W] = {}, grad[W] = {};
  S exp_avg[W] = {}, exp_avg_sq[W] = {}, max_sq[W] = {};
  float master[W] = {};
  // Padding lanes compute sqrt(0) / b + eps > 0: no division by zero, and they are never stored.
  Ptrs<P, S> src = ptrs_at<P, S>(t, i);
  Ptrs<P, S> buf{param, grad, exp_avg, exp_avg_sq, max_sq, master};
  for (int64_t k = 0; k < rest; ++k) {
    param[k] = src.param[k];
    grad[k] = src.grad[k];
    exp_avg[k] = src.exp_avg[k];
    exp_avg_sq[k] = src.exp_avg_sq[k];
    if (src.max_exp_avg_sq) max_sq[k] = src.max_exp_avg_sq[k];
    if (kMaster) master[k] = src.master[k];
  }
  adam_vector<Vec, P, S, kMaster>(buf, c, t.stochastic_round_seed, i);
  for (int64_t k = 0; k < rest; ++k) {
    src.param[k] = param[k];
    if (c.unscale) src.grad[k] = grad[k];
    src.exp_avg[k] = exp_avg[k];
    src.exp_avg_sq[k] = exp_avg_sq[k];
    if (src.max_exp_avg_sq) src.max_exp_avg_sq[k] = max_sq[k];
    if (kMaster) src.master[k] = master[k];
  }
}

using SpanFn = void (*)(const AdamTensor&, const Coeffs&, int64_t, int64_t);

template <class P, class S, bool kMaster>
void span_scalar(const AdamTensor& t, const Coeffs& c, int64_t begin, int64_t end) {
  adam_span<ScalarVec, P, S, kMaster>(t, c, begin, end);
}

#if EFFOPS_HAVE_X86
template <class P, class S, bool kMaster>
EFFOPS_AVX2_TARGET void span_avx2(const AdamTensor& t, const Coeffs& c, int64_t begin, int64_t end) {
  adam_span<Avx2Vec, P, S, kMaster>(t, c, begin, end);
}
#endif

// The AVX2 body at every level above it too: the step moves 28 bytes per fp32 parameter and is
// memory-bound, and a 512-bit body measured the same (17.4 vs 17.0 ms one thread, 17.4 vs 18.4 ms two,
// 29M parameters; docs/cpu-isa.md), so it was not kept.
template <class P, class S, bool kMaster>
SpanFn pick(CpuIsa level) {
#if EFFOPS_HAVE_X86
  if (level >= CpuIsa::kAvx2) return &span_avx2<P, S, kMaster>;
#endif
  return &span_scalar<P, S, kMaster>;
}

// The body for one tensor's dtype combination; fp32 params never carry a master copy.
SpanFn span_fn(const AdamTensor& t, CpuIsa level) {
  const bool master = t.master != nullptr;
  switch (t.dtype) {
    case AdamDtype::kFloat32:
      return pick<float, float, false>(level);
    case AdamDtype::kBFloat16:
      return master ? pick<c10::BFloat16, float, true>(level) : pick<c10::BFloat16, c10::BFloat16, false>(level);
    case AdamDtype::kFloat16:
      return master ? pick<c10::Half, float, true>(level) : pick<c10::Half, c10::Half, false>(level);
  }
  return nullptr;
}

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

}  // namespace

void adam_step(const AdamTensor* tensors, int64_t count, const AdamHyper* hypers) {
  const CpuIsa level = cpu_isa();
  std::vector<Chunk> chunks;
  int64_t total = 0;
  std::vector<SpanFn> fns(count);
  std::vector<Coeffs> coeffs(count);
  for (int64_t k = 0; k < count; ++k) {
    fns[k] = span_fn(tensors[k], level);
    coeffs[k] = make_coeffs(tensors[k], hypers[tensors[k].hyper]);
    total += tensors[k].numel;
    for (int64_t b = 0; b < tensors[k].numel; b += kChunk) {
      chunks.push_back({static_cast<int32_t>(k), b, std::min(b + kChunk, tensors[k].numel)});
    }
  }
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const Chunk& ch = chunks[j];
      fns[ch.tensor](tensors[ch.tensor], coeffs[ch.tensor], ch.begin, ch.end);
    }
  };
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total < kParallelMin) {
    run(0, n);
  } else {
    at::parallel_for(0, n, 1, run);
  }
}

const char* adam_step_body() {
  if (cpu_isa_at_least(CpuIsa::kAvx512)) return "avx2 (256-bit; memory-bound) / 8-bit states: avx512 (512-bit)";
  return has_avx2_fma() ? "avx2 (256-bit)" : "scalar";
}

}  // namespace effops::cpu
