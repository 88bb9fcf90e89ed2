// Fused Adam/AdamW step with 8-bit moments (see adam8bit_step.h for the quantization).
//
// Loop nest: each tensor is cut into blocks of 256 elements (the quantization blocks); chunks of
// kChunkBlocks whole blocks are spread over at::parallel_for's threads, so a block is never split
// between threads. Per block, two passes over data that stays in L1:
//   1. per vector: dequantize m and v, the Adam step (adam_math.h), store the param (and master);
//      keep the new m and r = sqrt(v) in block buffers and their running maxima;
//   2. per vector: requantize m and r against the block's new maxima, store codes and scales.
// A tensor's last, short block runs its tail vector on a zero-padded copy. The kernel is a template
// over the vector type (simd.h, simd_codes.h), the param dtype and master weights: one body.
#include "cpu/adam8bit_step.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/adam_math.h"
#include "cpu/cpu_features.h"
#include "cpu/simd.h"
#include "cpu/simd_codes.h"

namespace effops::cpu {
namespace {

constexpr int64_t kBlock = kAdam8bitBlock;
// 128 blocks = 32K elements per chunk (16 bytes of traffic each): adam_step's chunk size.
constexpr int64_t kChunkBlocks = 128;
// Below this many elements in total the step runs on the calling thread (as adam_step).
constexpr int64_t kParallelMin = 1 << 16;
constexpr float kSignedMax = 127.f;           // m codes -127..127
constexpr float kUnsignedLevels = 256.f;      // r codes 0..255 stand for (c + 1) / 256

// Pass 1 for one vector: the step on the dequantized moments. m_unit = scale / 127^2,
// r_unit = scale / 2^16: decoding is one multiply of an exact integer (c * |c|, (c + 1)^2).
template <class Vec, class P, bool kMaster>
EFFOPS_ALWAYS_INLINE void step_vector(P* param, P* grad, float* master, const int8_t* m_codes,
                                      const uint8_t* r_codes, float m_unit, float r_unit, const AdamCoeffs& c,
                                      float* m_out, float* r_out, Vec& m_max, Vec& r_max) {
  Vec g = Vec::load(grad);
  if (c.unscale) {
    g = g / Vec::broadcast(c.grad_scale);
    g.store(grad);
  }
  Vec p = kMaster ? Vec::load(master) : Vec::load(param);
  const Vec cm = load_codes(Vec{}, m_codes);
  Vec m = cm * vabs(cm) * Vec::broadcast(m_unit);
  const Vec c1 = load_codes(Vec{}, r_codes) + Vec::broadcast(1.f);
  Vec r = c1 * c1 * Vec::broadcast(r_unit);
  Vec v = r * r;
  adam_moments(p, g, m, v, c);
  r = Vec::sqrt(v);
  // adam_apply's division by sqrt(1 - beta2^t) as a multiply by its inverse (one division per
  // element fewer; the reference does the same): p + (-step_size * m) / (r * inv + eps)
  const Vec denom = r * Vec::broadcast(c.inv_bias_correction2_sqrt) + Vec::broadcast(c.eps);
  p = p + Vec::broadcast(c.neg_step_size) * m / denom;
  if (kMaster) p.store(master);
  p.store(param);
  m.store(m_out);
  r.store(r_out);
  m_max = Vec::max(m_max, vabs(m));
  r_max = Vec::max(r_max, r);
}

// Pass 2 for one vector: codes of m and r against their block maxima (m_inv = 1 / max |m|, r_inv =
// 1 / max r, 0 for an all-zero block). sqrt(|x| * inv) <= 1 + a few ulp, so the codes stay in range.
// The roots only choose codes: sqrt_for_codes (simd_codes.h) may pick the neighbouring code where the
// exact root sits within a few 1e-7 of a rounding boundary; the step itself uses the exact sqrt.
template <class Vec>
EFFOPS_ALWAYS_INLINE void encode_vector(const float* m, const float* r, float m_inv, float r_inv, int8_t* m_codes,
                                        uint8_t* r_codes) {
  const Vec x = Vec::load(m);
  const Vec qm = sqrt_for_codes(vabs(x) * Vec::broadcast(m_inv));
  store_codes(vcopysign(vround(qm * Vec::broadcast(kSignedMax)), x), m_codes);
  const Vec qr = sqrt_for_codes(Vec::load(r) * Vec::broadcast(r_inv));
  store_codes(Vec::max(vround(qr * Vec::broadcast(kUnsignedLevels)) - Vec::broadcast(1.f), Vec::zero()), r_codes);
}

// One quantization block (index b) of one tensor.
template <class Vec, class P, bool kMaster>
EFFOPS_ALWAYS_INLINE void block_step(const Adam8bitTensor& t, const AdamCoeffs& c, int64_t b) {
  constexpr int W = Vec::kWidth;
  const int64_t start = b * kBlock;
  const int64_t n = std::min(kBlock, t.numel - start);
  P* param = static_cast<P*>(t.param) + start;
  P* grad = static_cast<P*>(t.grad) + start;
  float* master = kMaster ? t.master + start : nullptr;
  int8_t* m_codes = t.exp_avg_codes + start;
  uint8_t* r_codes = t.exp_avg_sq_codes + start;
  // The reference divides the scale by 127^2 in fp32; so do we (not a multiply by its inverse).
  const float m_unit = t.exp_avg_scales[b] / (kSignedMax * kSignedMax);
  const float r_unit = t.exp_avg_sq_scales[b] * (1.f / 65536.f);  // exact: a power of two

  alignas(64) float m_buf[kBlock];
  alignas(64) float r_buf[kBlock];
  Vec m_max = Vec::zero(), r_max = Vec::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    step_vector<Vec, P, kMaster>(param + i, grad + i, kMaster ? master + i : nullptr, m_codes + i, r_codes + i,
                                 m_unit, r_unit, c, m_buf + i, r_buf + i, m_max, r_max);
  }
  float m_amax = hmax(m_max), r_amax = hmax(r_max);
  const int64_t rest = n - i;
  if (rest) {
    // Padding lanes: zero codes and gradients; their results are neither stored nor counted in the maxima.
    P p_pad[W] = {}, g_pad[W] = {};
    float master_pad[W] = {}, m_pad[W], r_pad[W];
    int8_t mc_pad[W] = {};
    uint8_t rc_pad[W] = {};
    for (int64_t k = 0; k < rest; ++k) {
      p_pad[k] = param[i + k];
      g_pad[k] = grad[i + k];
      if (kMaster) master_pad[k] = master[i + k];
      mc_pad[k] = m_codes[i + k];
      rc_pad[k] = r_codes[i + k];
    }
    Vec unused_m = Vec::zero(), unused_r = Vec::zero();
    step_vector<Vec, P, kMaster>(p_pad, g_pad, master_pad, mc_pad, rc_pad, m_unit, r_unit, c, m_pad, r_pad, unused_m,
                                 unused_r);
    for (int64_t k = 0; k < rest; ++k) {
      param[i + k] = p_pad[k];
      if (c.unscale) grad[i + k] = g_pad[k];
      if (kMaster) master[i + k] = master_pad[k];
      m_buf[i + k] = m_pad[k];
      r_buf[i + k] = r_pad[k];
      m_amax = std::max(m_amax, std::fabs(m_pad[k]));
      r_amax = std::max(r_amax, r_pad[k]);
    }
  }

  t.exp_avg_scales[b] = m_amax;
  t.exp_avg_sq_scales[b] = r_amax;
  const float m_inv = m_amax > 0.f ? 1.f / m_amax : 0.f;
  const float r_inv = r_amax > 0.f ? 1.f / r_amax : 0.f;
  if (n == kBlock) {
    for (int64_t j = 0; j < n; j += W) encode_vector<Vec>(m_buf + j, r_buf + j, m_inv, r_inv, m_codes + j, r_codes + j);
    return;
  }
  // A short last block: encode whole vectors into local codes (buffers zero-padded), keep n of them.
  const int64_t padded = (n + W - 1) / W * W;
  std::fill(m_buf + n, m_buf + padded, 0.f);
  std::fill(r_buf + n, r_buf + padded, 0.f);
  int8_t m_local[kBlock];
  uint8_t r_local[kBlock];
  for (int64_t j = 0; j < padded; j += W) encode_vector<Vec>(m_buf + j, r_buf + j, m_inv, r_inv, m_local + j, r_local + j);
  std::memcpy(m_codes, m_local, n);
  std::memcpy(r_codes, r_local, n);
}

using BlocksFn = void (*)(const Adam8bitTensor&, const AdamCoeffs&, int64_t, int64_t);

template <class Vec, class P, bool kMaster>
EFFOPS_ALWAYS_INLINE void blocks(const Adam8bitTensor& tensor, const AdamCoeffs& coeffs, int64_t first, int64_t last) {
  // Local copies: stores through float pointers could alias the caller's structs (as adam_step.cpp).
  const AdamCoeffs c = coeffs;
  const Adam8bitTensor t = tensor;
  for (int64_t b = first; b < last; ++b) block_step<Vec, P, kMaster>(t, c, b);
}

template <class P, bool kMaster>
void blocks_scalar(const Adam8bitTensor& t, const AdamCoeffs& c, int64_t first, int64_t last) {
  blocks<ScalarVec, P, kMaster>(t, c, first, last);
}

#if EFFOPS_HAVE_X86
template <class P, bool kMaster>
EFFOPS_AVX2_TARGET void blocks_avx2(const Adam8bitTensor& t, const AdamCoeffs& c, int64_t first, int64_t last) {
  blocks<Avx2Vec, P, kMaster>(t, c, first, last);
}
template <class P, bool kMaster>
EFFOPS_AVX512_TARGET void blocks_avx512(const Adam8bitTensor& t, const AdamCoeffs& c, int64_t first, int64_t last) {
  blocks<Avx512Vec, P, kMaster>(t, c, first, last);
}
#endif

template <class P, bool kMaster>
BlocksFn pick(CpuIsa level) {
#if EFFOPS_HAVE_X86
  if (level >= CpuIsa::kAvx512) return &blocks_avx512<P, kMaster>;
  if (level >= CpuIsa::kAvx2) return &blocks_avx2<P, kMaster>;
#endif
  return &blocks_scalar<P, kMaster>;
}

BlocksFn blocks_fn(const Adam8bitTensor& t, CpuIsa level) {
  const bool master = t.master != nullptr;
  switch (t.dtype) {
    case AdamDtype::kFloat32:
      return pick<float, false>(level);
    case AdamDtype::kBFloat16:
      return master ? pick<c10::BFloat16, true>(level) : pick<c10::BFloat16, false>(level);
    case AdamDtype::kFloat16:
      return master ? pick<c10::Half, true>(level) : pick<c10::Half, false>(level);
  }
  return nullptr;
}

struct Chunk {
  int32_t tensor;
  int64_t first, last;  // blocks
};

}  // namespace

void adam8bit_step(const Adam8bitTensor* tensors, int64_t count, const AdamHyper* hypers) {
  const CpuIsa level = cpu_isa();
  std::vector<Chunk> chunks;
  std::vector<BlocksFn> fns(count);
  std::vector<AdamCoeffs> coeffs(count);
  int64_t total = 0;
  for (int64_t k = 0; k < count; ++k) {
    const Adam8bitTensor& t = tensors[k];
    fns[k] = blocks_fn(t, level);
    coeffs[k] = make_adam_coeffs(t.step_size, t.bias_correction2_sqrt, hypers[t.hyper]);
    total += t.numel;
    const int64_t nblocks = (t.numel + kBlock - 1) / kBlock;
    for (int64_t b = 0; b < nblocks; b += kChunkBlocks) {
      chunks.push_back({static_cast<int32_t>(k), b, std::min(b + kChunkBlocks, nblocks)});
    }
  }
  auto run = [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const Chunk& ch = chunks[j];
      fns[ch.tensor](tensors[ch.tensor], coeffs[ch.tensor], ch.first, ch.last);
    }
  };
  const int64_t n = static_cast<int64_t>(chunks.size());
  if (total < kParallelMin) {
    run(0, n);
  } else {
    at::parallel_for(0, n, 1, run);
  }
}

}  // namespace effops::cpu
