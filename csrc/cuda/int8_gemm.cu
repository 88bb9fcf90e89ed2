// int8 tensor-core GEMM with a fused epilogue (see int8_gemm.cuh).
//
// Tiling: a block of 4 warps owns a 64 x 64 tile of C and walks K in steps of 64 bytes. Each step
// stages A (64 rows x 64 k) and B (64 columns x 64 k, k contiguous: the "col" operand order of mma)
// in shared memory, rows padded to 80 bytes so the fragment loads (8 rows x 4 threads, 4 bytes each)
// hit 32 distinct banks. Each warp computes a 32 x 32 sub-tile as 2 x 4 mma.m16n8k32 per 32 k, with
// 32 int32 accumulators per thread. The epilogue converts, scales, adds the bias and casts in
// registers, and stores once.
#include "cuda/int8_gemm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace effops::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 64, kLds = kBK + 16, kThreads = 128;

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(EFFOPS_CUDA_HOST_EMULATION)
  // Test-only host emulation (tests/cuda_emulation; never defined by nvcc builds): the same
  // warp-collective instruction, modelled from the PTX ISA's fragment layout.
  effops_emu::mma_m16n8k32_s8(c, a, b);
#endif
}

// Stage a 64 x 64-byte tile whose element (r, c) is src[(r0 + r) * ld + k0 + c] (zero outside rows
// < rows, k < K): 16-byte loads when the whole row segment is in bounds and aligned, bytes otherwise.
__device__ __forceinline__ void load_rows(int8_t* dst, const int8_t* src, int64_t ld, int r0, int rows, int k0, int K,
                                          bool vec_ok) {
  for (int i = threadIdx.x; i < kBM * kBK / 16; i += kThreads) {
    const int r = i / (kBK / 16), c = (i % (kBK / 16)) * 16;
    const int gr = r0 + r, gk = k0 + c;
    int8_t* d = dst + r * kLds + c;
    if (vec_ok && gr < rows && gk + 16 <= K) {
      *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + gr * ld + gk);
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) d[j] = (gr < rows && gk + j < K) ? src[gr * ld + gk + j] : int8_t(0);
    }
  }
}

// B given as (K, N) row-major: transpose into [n][k] while staging (reads coalesced along n).
__device__ __forceinline__ void load_kn(int8_t* dst, const int8_t* src, int64_t ld, int n0, int N, int k0, int K) {
  for (int i = threadIdx.x; i < kBN * kBK; i += kThreads) {
    const int k = i / kBN, n = i % kBN;
    const int gk = k0 + k, gn = n0 + n;
    dst[n * kLds + k] = (gk < K && gn < N) ? src[gk * ld + gn] : int8_t(0);
  }
}

template <typename OutT> __device__ __forceinline__ OutT cast_out(float v);
template <> __device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half(v); }

template <typename OutT>
__device__ __forceinline__ void store_one(const Int8GemmArgs& p, int i, int n, int acc) {
  if (i >= p.M || n >= p.N) return;
  OutT* out = static_cast<OutT*>(p.out) + i * p.ldo + n;
  if constexpr (std::is_same_v<OutT, int32_t>) {  // int8_mm: the raw sum
    *out = acc;
  } else {
    // Same order as the reference: (acc * row_scale) * col_scale + bias, in fp32.
    float v = __fmul_rn(__fmul_rn(static_cast<float>(acc), p.row_scale[i]), p.col_scale[n]);
    if (p.bias) v = __fadd_rn(v, p.bias[n]);
    *out = cast_out<OutT>(v);
  }
}

template <bool kBIsKN, typename OutT>
__global__ void __launch_bounds__(kThreads) int8_gemm_kernel(Int8GemmArgs p) {
  __shared__ __align__(16) int8_t As[kBM * kLds];
  __shared__ __align__(16) int8_t Bs[kBN * kLds];
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;  // row tiles on x: see launch()
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int g = lane / 4, t = lane % 4;
  const bool a_vec = (p.lda % 16 == 0) && (reinterpret_cast<uintptr_t>(p.a) % 16 == 0);
  const bool b_vec = (p.ldb % 16 == 0) && (reinterpret_cast<uintptr_t>(p.b) % 16 == 0);

  int acc[2][4][4] = {};
  for (int k0 = 0; k0 < p.K; k0 += kBK) {
    load_rows(As, p.a, p.lda, m0, p.M, k0, p.K, a_vec);
    if constexpr (kBIsKN) load_kn(Bs, p.b, p.ldb, n0, p.N, k0, p.K);
    else load_rows(Bs, p.b, p.ldb, n0, p.N, k0, p.K, b_vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int8_t* r = As + (wm + mi * 16 + g) * kLds + kk + t * 4;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(r);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(r + 8 * kLds);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(r + 16);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(r + 8 * kLds + 16);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int8_t* c = Bs + (wn + ni * 8 + g) * kLds + kk + t * 4;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(c);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(c + 16);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int i = m0 + wm + mi * 16 + g, n = n0 + wn + ni * 8 + t * 2;
      store_one<OutT>(p, i, n, acc[mi][ni][0]);
      store_one<OutT>(p, i, n + 1, acc[mi][ni][1]);
      store_one<OutT>(p, i + 8, n, acc[mi][ni][2]);
      store_one<OutT>(p, i + 8, n + 1, acc[mi][ni][3]);
    }
}

template <bool kBIsKN, typename OutT>
cudaError_t launch(const Int8GemmArgs& p, cudaStream_t stream) {
  // Row tiles on grid.x (up to 2^31 - 1 blocks): the token count has no practical bound, while
  // grid.y stops at 65535 tiles (4.19M rows on y; as columns, 4.19M output features).
  const dim3 grid((p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN);
  int8_gemm_kernel<kBIsKN, OutT><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// Instantiated for the two uses only: int8_mm (B as (K, N), int32 out) and int8_linear (B as the
// (N, K) weight, float out). (A (K, N) B with a bf16/fp16 epilogue made ptxas spill 8 bytes.)
cudaError_t int8_gemm(const Int8GemmArgs& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.b_is_kn != (p.out_kind == Int8OutKind::kInt32)) return cudaErrorInvalidValue;
  switch (p.out_kind) {
    case Int8OutKind::kInt32: return launch<true, int32_t>(p, stream);
    case Int8OutKind::kFloat: return launch<false, float>(p, stream);
    case Int8OutKind::kBFloat16: return launch<false, __nv_bfloat16>(p, stream);
    case Int8OutKind::kHalf: return launch<false, __half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace effops::cuda
