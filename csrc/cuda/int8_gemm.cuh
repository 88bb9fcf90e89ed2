// int8 tensor-core GEMM (mma.sync m16n8k32 s8 x s8 -> s32, sm_80 and later) with a fused epilogue.
// Torch-free: raw pointers, sizes and a stream; the torch glue is csrc/bindings/cuda/int8_gemm.cpp.
//
//   C[i, n] = sum_k A[i, k] * B(k, n)                        int32, exact (K <= 131071)
//   out[i, n] = C[i, n]                                        (int8_mm: kInt32)
//   out[i, n] = cast(C[i, n] * row_scale[i] * col_scale[n] + bias[n])   (int8_linear: fp32/bf16/fp16)
//
// A is (M, K) row-major with row stride lda. B is either (N, K) row-major (a linear layer's weight,
// b_is_kn = false) or (K, N) row-major (int8_mm's b, b_is_kn = true), row stride ldb.
// Supported pairs: b_is_kn with kInt32 (int8_mm), and the (N, K) weight with a float output
// (int8_linear); any other pair returns cudaErrorInvalidValue.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace effops::cuda {

enum class Int8OutKind : int { kInt32 = 0, kFloat = 1, kBFloat16 = 2, kHalf = 3 };

struct Int8GemmArgs {
  const int8_t* a;
  const int8_t* b;
  void* out;               // M x N row-major, row stride ldo
  const float* row_scale;  // M (not for kInt32)
  const float* col_scale;  // N (not for kInt32)
  const float* bias;       // N or nullptr
  int M, N, K;
  int64_t lda, ldb, ldo;
  bool b_is_kn;
  Int8OutKind out_kind;
};

cudaError_t int8_gemm(const Int8GemmArgs& args, cudaStream_t stream);

}  // namespace effops::cuda
