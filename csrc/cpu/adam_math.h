// The per-element arithmetic of the Adam/AdamW step, shared by the kernels that store the moments
// differently (adam_step.cpp: in the param's dtype or fp32; adam8bit_step.cpp: as 8-bit codes).
// Templates over the vector type of simd.h; each operation is the one torch's vectorized CPU kernels
// use (same FMAs, same order), see adam_step.h for the formulas.
#pragma once

#include "cpu/adam_step.h"
#include "cpu/simd.h"

#define EFFOPS_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace effops::cpu {

// Per-tensor constants in fp32, converted from double exactly as torch converts its Python scalars.
struct AdamCoeffs {
  float lerp_weight;   // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;  // coupled (Adam): g += weight_decay * p
  float decay_factor;  // decoupled (AdamW): p *= 1 - lr * weight_decay
  float neg_step_size;
  float bias_correction2_sqrt;
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t), rounded once from double (adam8bit_step)
  float grad_scale;
  bool amsgrad, maximize, decoupled, has_weight_decay, unscale;
};

inline AdamCoeffs make_adam_coeffs(double step_size, double bias_correction2_sqrt, const AdamHyper& h) {
  AdamCoeffs c;
  c.lerp_weight = static_cast<float>(1.0 - h.beta1);
  c.beta2 = static_cast<float>(h.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  c.eps = static_cast<float>(h.eps);
  c.weight_decay = static_cast<float>(h.weight_decay);
  c.decay_factor = static_cast<float>(1.0 - h.lr * h.weight_decay);
  c.neg_step_size = static_cast<float>(-step_size);
  c.bias_correction2_sqrt = static_cast<float>(bias_correction2_sqrt);
  c.inv_bias_correction2_sqrt = static_cast<float>(1.0 / bias_correction2_sqrt);
  c.grad_scale = static_cast<float>(h.grad_scale);
  c.amsgrad = h.amsgrad;
  c.maximize = h.maximize;
  c.decoupled = h.decoupled_weight_decay;
  c.has_weight_decay = h.weight_decay != 0.0;
  c.unscale = h.unscale;
  return c;
}

// Maximize, weight decay and the two moment updates: g, p, m, v in, the new p (decayed), m, v out.
template <class Vec>
EFFOPS_ALWAYS_INLINE void adam_moments(Vec& p, Vec g, Vec& m, Vec& v, const AdamCoeffs& c) {
  if (c.maximize) g = g * Vec::broadcast(-1.f);
  if (c.has_weight_decay) {
    if (c.decoupled) {
      p = p * Vec::broadcast(c.decay_factor);  // mul_(1 - lr * weight_decay)
    } else {
      g = Vec::fma(p, Vec::broadcast(c.weight_decay), g);  // add(p, alpha=wd): fmadd(p, wd, g)
    }
  }
  // lerp_(g, w): fmadd(w, g - m, m) for |w| < 0.5, fmadd(w - 1, g - m, g) otherwise.
  if (c.lerp_weight < 0.5f) {
    m = Vec::fma(Vec::broadcast(c.lerp_weight), g - m, m);
  } else {
    m = Vec::fma(Vec::broadcast(c.lerp_weight - 1.f), g - m, g);
  }
  // mul_(beta2).addcmul_(g, g, value=1 - beta2): fmadd(value * g, g, v * beta2)
  v = Vec::fma(Vec::broadcast(c.one_minus_beta2) * g, g, v * Vec::broadcast(c.beta2));
}

// The parameter update from m and root = sqrt(v) (or of amsgrad's max):
// addcdiv_(m, sqrt(v) / bias_correction2_sqrt + eps, value=-step_size): p + (value * m) / denom
template <class Vec>
EFFOPS_ALWAYS_INLINE Vec adam_apply(Vec p, Vec m, Vec root, const AdamCoeffs& c) {
  Vec denom = root / Vec::broadcast(c.bias_correction2_sqrt) + Vec::broadcast(c.eps);
  return p + Vec::broadcast(c.neg_step_size) * m / denom;
}

}  // namespace effops::cpu
