// int8 GEMM with int32 accumulation and a fused dequantizing epilogue, on prepacked B.
//
//   C[i, n] = sum_k A[i, k] * B[k, n]          (int32, exact)
//   out[i, n] = C[i, n] * row_scale[i] * col_scale[n] + bias[n]   cast to fp32/bf16/fp16  (or C itself)
//
// B is packed once into panels of 16 output columns (reference/int8.py, PACK_NR/PACK_KG):
//   s8 layout  [N/16][K/4][16][4] int8   element (k, n) at (n/16)*Kp*16 + (k/4)*64 + (n%16)*4 + k%4
//   s16 layout [N/16][K/2][16][2] int16  (the widening path)
// so that one 32-byte load holds 8 columns x 4 k (s8) or 8 columns x 2 k (s16): the operand order of
// vpmaddubsw / vpmaddwd with one broadcast of A's 4 (or 2) bytes per row.
//
// Saturation trap: vpmaddubsw multiplies unsigned by signed bytes and adds pairs into *saturating*
// int16. The s8 path feeds |a| (unsigned, <= 128) and sign(a) * b (needs b in [-127, 127]), so a pair
// is at most 2 * 128 * 127 = 32512 < 32767: exact for any A as long as B has no -128. A B with -128
// (general int8_mm inputs) goes through the s16 path: A and B sign-extended to int16, vpmaddwd into
// int32, exact for everything. K <= 131071 keeps every int32 sum from overflowing (checked in Python).
#pragma once

#include <cstdint>

namespace effops::cpu {

constexpr int64_t kInt8NR = 16;   // columns per packed panel: two vectors of 8 int32 accumulators
constexpr int64_t kInt8KG = 4;    // k per group, s8 layout
constexpr int64_t kInt16KG = 2;   // k per group, s16 layout

inline int64_t ceil_to(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Pack B, whose element (k, n) is b[k * stride_k + n * stride_n], zero padded. `out` holds
// ceil(N/16)*16 * ceil(K/KG)*KG elements.
void int8_pack_b_s8(const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t N, int8_t* out);
void int8_pack_b_s16(const int8_t* b, int64_t stride_k, int64_t stride_n, int64_t K, int64_t N, int16_t* out);
bool int8_contains_min(const int8_t* p, int64_t n);  // any -128?

enum class Int8Out { kInt32, kFloat, kBFloat16, kHalf };

// The epilogue's product (acc * xs) * ws, rounded, before the bias is added: GCC contracts x * y + z
// into one FMA (its default -ffp-contract=fast, -std=c++20 included), which rounds once where the
// reference's multiply and add round twice, so 1-ulp differences that depended on where a row fell in
// its micro-tile. The empty asm makes the value opaque: the add after it stays an add.
template <class V>
inline __attribute__((always_inline)) V int8_epilogue_rounded(V v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#endif
  return v;
}

struct Int8Epilogue {
  Int8Out kind;
  void* out;                // M x N, row stride ldo, element type per `kind`
  int64_t ldo;
  const float* row_scale;   // M    (unused for kInt32)
  const float* col_scale;   // N    (unused for kInt32)
  const float* bias;        // N or nullptr
};

// A: M x K int8, row stride lda. b_packed: s8 layout; no -128 in it below the avx512_vnni level
// (int8_s8_takes_any_b() says whether this CPU's body takes any int8 B).
void int8_gemm_s8(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                  const Int8Epilogue& epi);
// The 7-bit-weight path (Int8Linear's weight_bits=7): a_u = a + 128 (a in [-127, 127], so a_u in
// [1, 255], unsigned bytes; quantize_rowwise(..., offset128=true) writes it), b_packed in the s8 layout
// with every value in [-63, 63], col_corr[n] = -128 * sum_k b[k, n] for n < ceil(N/16)*16 (zero in the
// padding). vpmaddubsw(a_u, b) pairs are at most 2 * 255 * 63 = 32130 < 32767, so they never saturate
// and need neither vpsignb nor vpabsb (3 uops per row, 8 columns and 4 k instead of 4); the sums start
// at col_corr, so C = sum (a_u - 128) b = sum a b exactly. No partial sum leaves int32: with P / Q the
// sums of the positive b / of |negative b| over all k, every partial sum lies in
// [-128 P - 127 Q, 128 Q + 127 P], within +-128 * 63 * K ~ +-1.06e9 for K <= 131071.
void int8_gemm_u8s7(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                    const int32_t* col_corr, const Int8Epilogue& epi);
bool int8_s8_takes_any_b();
// Int8Linear's 8-bit path with A already shifted: a_u = a + 128 for int8 a (any value; quantize_rowwise(...,
// offset128=true) writes it), B any int8 on VNNI (s8 layout). C = sum a b exactly: the VNNI body starts
// the sums at -128 * the column sums of B and reads a_u in place when K is a multiple of 4, so no
// per-call copy of A is made. col_corr: nullptr, or those starting sums, -128 * sum_k b[k, n] for
// n < ceil(N/16)*16 (zero in the padding; reference.int8.weight_correction, which Int8Linear keeps as
// module state): the VNNI body then starts from them instead of summing B's columns per call
// (int8_gemm_avx512.cpp). Overflow: |sum_k b| <= 128 K, so |col_corr| <= 16384 K < 2**31 for
// K <= 131071, and the result |sum a b| <= 16384 K too; vpdpbusd's int32 adds wrap (no saturation), so a
// partial sum that leaves int32 on the way still ends at the exact result. Below VNNI it undoes the
// shift into a copy and runs int8_gemm_s8, ignoring col_corr (int8_gemm_u8s8_direct() says whether this
// level takes a_u as it is).
void int8_gemm_u8s8(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                    const int32_t* col_corr, const Int8Epilogue& epi);
bool int8_gemm_u8s8_direct();
// The 512-bit bodies (int8_gemm_avx512.cpp), which the two entry points above run at the avx512 level
// and up; false when they do not take the call (below that level, or A holding -128 without VNNI).
bool int8_gemm_s8_avx512(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                         const Int8Epilogue& epi);
bool int8_gemm_u8s7_avx512(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                           const int32_t* col_corr, const Int8Epilogue& epi);
bool int8_gemm_u8s8_avx512(const uint8_t* a_u, int64_t lda, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                           const int32_t* col_corr, const Int8Epilogue& epi);
// Which body int8_gemm_s8 / int8_gemm_u8s7 run at the current level (for `python -m effops info`).
const char* int8_gemm_body();
// Any int8 values: A is widened to int16 internally, b_packed in the s16 layout.
void int8_gemm_s16(const int8_t* a, int64_t lda, int64_t M, int64_t K, const int16_t* b_packed, int64_t N,
                   const Int8Epilogue& epi);

// Row-wise symmetric quantization of x (M x K, contiguous): scale = absmax / 127 (1 for a zero row),
// q = clamp(round_half_even(x / scale), -127, 127). Bit-identical to reference/int8.py.
// offset128: store q + 128 (as the byte q ^ 0x80) instead, the unsigned operand of int8_gemm_u8s7.
template <typename T>
void quantize_rowwise(const T* x, int64_t M, int64_t K, int8_t* q, float* scale, bool offset128 = false);

// Weight-only: out = x (M x K, float type T) @ dequant(B)^T + bias, B in the s8 layout with per-column
// scales, fp32 accumulation, out in T.
template <typename T>
void int8_weight_only_linear(const T* x, int64_t M, int64_t K, const int8_t* b_packed, int64_t N,
                             const float* col_scale, const float* bias, T* out);

}  // namespace effops::cpu
