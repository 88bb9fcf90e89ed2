// Runs csrc/cuda/int8_gemm.cu's effops::cuda::int8_gemm under the host emulation, one case per
// directory argument. params.txt: M N K lda ldb ldo b_is_kn out_kind has_bias a_offset b_offset
// o_offset; inputs a.bin b.bin [row_scale.bin col_scale.bin [bias.bin]]; writes out.bin (the output
// span, its padding prefilled with 0xCD bytes) and status.txt.
#include EFFOPS_EMU_KERNEL_SOURCE

#include <random>

#include "harness_io.h"

namespace {

using effops::cuda::Int8GemmArgs;
using effops::cuda::Int8OutKind;

size_t span(long long rows, long long cols, long long ld) { return rows > 0 && cols > 0 ? (rows - 1) * ld + cols : 0; }

size_t out_elem(Int8OutKind k) { return k == Int8OutKind::kBFloat16 || k == Int8OutKind::kHalf ? 2 : 4; }

// Shared memory here is static storage that persists across blocks and launches (and starts as
// zeros). One full-tile launch per instantiation on random bytes leaves it holding nonzero stale
// data, so a kernel that read a tile element it had not staged (say, a missing zero fill of a
// tail) would read garbage instead of a lucky zero.
void dirty_shared_memory() {
  std::mt19937 rng(1234);
  std::vector<int8_t> a(64 * 64), b(64 * 64);
  for (auto& x : a) x = static_cast<int8_t>(rng());
  for (auto& x : b) x = static_cast<int8_t>(rng());
  std::vector<float> scale(64, 1.f);
  // A margin of one tile row on both sides: a planted store out of range (the tests' mutants) must
  // reach the case's own checks, not corrupt the heap here first.
  std::vector<int32_t> out_with_margins(3 * 64 * 64);
  int32_t* out = out_with_margins.data() + 64 * 64;
  for (int kind = 0; kind < 4; ++kind) {
    const Int8OutKind k = static_cast<Int8OutKind>(kind);
    Int8GemmArgs p{a.data(), b.data(), out, scale.data(), scale.data(), nullptr, 64, 64, 64, 64, 64, 64,
                   k == Int8OutKind::kInt32, k};
    if (effops::cuda::int8_gemm(p, nullptr) != cudaSuccess) harness::die("dirtying launch failed");
  }
  effops_emu::g_launches.clear();
}

void run_case(const std::string& dir) {
  const std::vector<long long> v = harness::read_params(dir);
  if (v.size() != 12) harness::die("params.txt of " + dir + ": expected 12 integers");
  const long long M = v[0], N = v[1], K = v[2], lda = v[3], ldb = v[4], ldo = v[5];
  const bool b_is_kn = v[6] != 0, has_bias = v[8] != 0;
  const Int8OutKind kind = static_cast<Int8OutKind>(v[7]);
  const bool scaled = kind != Int8OutKind::kInt32;
  harness::Buffer a = harness::read_buffer(dir + "/a.bin", span(M, K, lda), v[9]);
  harness::Buffer b = harness::read_buffer(dir + "/b.bin", b_is_kn ? span(K, N, ldb) : span(N, K, ldb), v[10]);
  harness::Buffer rs, cs, bias;
  if (scaled) {
    rs = harness::read_buffer(dir + "/row_scale.bin", 4 * M);
    cs = harness::read_buffer(dir + "/col_scale.bin", 4 * N);
    if (has_bias) bias = harness::read_buffer(dir + "/bias.bin", 4 * N);
  }
  harness::Buffer out(span(M, N, ldo) * out_elem(kind), v[11], 0xCD);
  Int8GemmArgs p{reinterpret_cast<const int8_t*>(a.ptr), reinterpret_cast<const int8_t*>(b.ptr), out.ptr,
                 scaled ? reinterpret_cast<const float*>(rs.ptr) : nullptr,
                 scaled ? reinterpret_cast<const float*>(cs.ptr) : nullptr,
                 has_bias ? reinterpret_cast<const float*>(bias.ptr) : nullptr,
                 static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), lda, ldb, ldo, b_is_kn, kind};
  effops_emu::g_launches.clear();
  cudaError_t err = effops::cuda::int8_gemm(p, nullptr);
  if (err == cudaSuccess) err = cudaGetLastError();
  for (const harness::Buffer* buf : {&a, &b, &rs, &cs, &bias, &out})
    if (buf->base && !buf->prefix_intact()) harness::die("a write before the start of a buffer in " + dir);
  harness::write_bytes(dir + "/out.bin", out.ptr, out.bytes);
  harness::write_status(dir, static_cast<int>(err));
}

}  // namespace

int main(int argc, char** argv) {
  const int first = harness::parse_options(argc, argv);
  dirty_shared_memory();
  for (int i = first; i < argc; ++i) run_case(argv[i]);
  return 0;
}
