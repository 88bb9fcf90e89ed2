// Fused multi-tensor Adam/AdamW step (see adam_step.cuh).
//
// Tiling: every tensor is cut into chunks of kChunk elements; one thread block steps one chunk,
// each thread kIlp elements per iteration (loads issued before the math, to keep enough bytes in
// flight for HBM). The host packs (tensor, chunk) pairs into a launch table passed by value
// (under the 4 KB kernel-parameter limit) and launches whenever the tensor or block slots fill up.
#include "cuda/adam_step.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace effops::cuda {
namespace {

constexpr int kMaxTensors = 32;
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kIlp = 4;

struct LaunchTable {
  AdamTensorArgs tensors[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// P: param/grad storage type; S: moment storage type (float with master weights).
template <typename P, typename S, bool kMaster>
__global__ void __launch_bounds__(kThreads) adam_step_kernel(LaunchTable table, AdamHyperArgs h) {
  const AdamTensorArgs& t = table.tensors[table.block_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;
  P* param = static_cast<P*>(t.param);
  P* grad = static_cast<P*>(t.grad);
  S* exp_avg = static_cast<S*>(t.exp_avg);
  S* exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  S* max_sq = static_cast<S*>(t.max_exp_avg_sq);

  for (int64_t base = begin + threadIdx.x; base < end; base += static_cast<int64_t>(kThreads) * kIlp) {
    float g[kIlp], p[kIlp], m[kIlp], v[kIlp], vm[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * kThreads;
      if (i < end) {
        g[k] = to_float(grad[i]);
        p[k] = kMaster ? t.master[i] : to_float(param[i]);
        m[k] = to_float(exp_avg[i]);
        v[k] = to_float(exp_avg_sq[i]);
        vm[k] = h.amsgrad ? to_float(max_sq[i]) : 0.f;
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + static_cast<int64_t>(k) * kThreads;
      if (i >= end) continue;
      float gk = g[k], pk = p[k];
      if (h.unscale) {
        gk = __fdiv_rn(gk, h.grad_scale);
        grad[i] = from_float<P>(gk);
      }
      if (h.maximize) gk = -gk;
      if (h.has_weight_decay) {
        if (h.decoupled) pk = __fmul_rn(pk, h.decay_factor);
        else gk = __fmaf_rn(pk, h.weight_decay, gk);
      }
      const float diff = __fsub_rn(gk, m[k]);
      const float mk = h.lerp_weight < 0.5f ? __fmaf_rn(h.lerp_weight, diff, m[k])
                                            : __fmaf_rn(h.lerp_weight - 1.f, diff, gk);
      const float vk = __fmaf_rn(__fmul_rn(h.one_minus_beta2, gk), gk, __fmul_rn(v[k], h.beta2));
      float vhat = vk;
      if (h.amsgrad) {
        vhat = fmaxf(vm[k], vk);
        max_sq[i] = from_float<S>(vhat);
      }
      const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vhat), t.bias_correction2_sqrt), h.eps);
      pk = __fadd_rn(pk, __fdiv_rn(__fmul_rn(t.neg_step_size, mk), denom));
      exp_avg[i] = from_float<S>(mk);
      exp_avg_sq[i] = from_float<S>(vk);
      if (kMaster) t.master[i] = pk;
      param[i] = from_float<P>(pk);
    }
  }
}

template <typename P, typename S, bool kMaster>
cudaError_t launch_all(const AdamTensorArgs* tensors, int64_t count, const AdamHyperArgs& h, cudaStream_t stream) {
  LaunchTable table;
  int n_tensors = 0, n_blocks = 0;
  for (int64_t k = 0; k < count; ++k) {
    if (tensors[k].numel == 0) continue;
    const int64_t chunks = (tensors[k].numel + kChunk - 1) / kChunk;
    table.tensors[n_tensors] = tensors[k];
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_tensor[n_blocks] = static_cast<unsigned char>(n_tensors);
      table.block_chunk[n_blocks] = static_cast<int>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = n_tensors + 1 == kMaxTensors && last_chunk;
      if (n_blocks == kMaxBlocks || tensors_full) {
        adam_step_kernel<P, S, kMaster><<<n_blocks, kThreads, 0, stream>>>(table, h);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        n_blocks = 0;
        if (last_chunk) {
          n_tensors = -1;  // the next tensor starts a fresh table
        } else {
          table.tensors[0] = tensors[k];  // the rest of this tensor continues in slot 0
          n_tensors = 0;
        }
      }
    }
    ++n_tensors;
  }
  if (n_blocks > 0) {
    adam_step_kernel<P, S, kMaster><<<n_blocks, kThreads, 0, stream>>>(table, h);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_adam_step(const AdamTensorArgs* tensors, int64_t count, AdamDtype dtype, bool master,
                             const AdamHyperArgs& hyper, cudaStream_t stream) {
  switch (dtype) {
    case AdamDtype::kFloat32:
      return launch_all<float, float, false>(tensors, count, hyper, stream);
    case AdamDtype::kBFloat16:
      return master ? launch_all<__nv_bfloat16, float, true>(tensors, count, hyper, stream)
                    : launch_all<__nv_bfloat16, __nv_bfloat16, false>(tensors, count, hyper, stream);
    case AdamDtype::kFloat16:
      return master ? launch_all<__half, float, true>(tensors, count, hyper, stream)
                    : launch_all<__half, __half, false>(tensors, count, hyper, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace effops::cuda
