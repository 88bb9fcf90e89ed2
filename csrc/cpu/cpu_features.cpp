#include "cpu/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace effops::cpu {
namespace {

constexpr const char* kNames[kNumCpuIsa] = {"scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};

CpuIsa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wider register state (XCR0).
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return CpuIsa::kScalar;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")))
    return CpuIsa::kAvx2;
  if (!__builtin_cpu_supports("avx512vnni")) return CpuIsa::kAvx512;
  if (!__builtin_cpu_supports("avx512bf16")) return CpuIsa::kAvx512Vnni;
  return CpuIsa::kAvx512Bf16;
#else
  return CpuIsa::kScalar;
#endif
}

// The environment's cap: EFFOPS_CPU_ISA=<level>, or the older EFFOPS_DISABLE_AVX2=1 (= scalar). An
// unknown name caps nothing here; the Python loader refuses it with a ValueError naming the variable.
CpuIsa env_cap() {
  CpuIsa cap = static_cast<CpuIsa>(kNumCpuIsa - 1);
  const char* off = std::getenv("EFFOPS_DISABLE_AVX2");
  if (off != nullptr && std::strcmp(off, "1") == 0) cap = CpuIsa::kScalar;
  const char* name = std::getenv("EFFOPS_CPU_ISA");
  CpuIsa level;
  if (name != nullptr && *name != '\0' && parse_cpu_isa(name, &level) &&
      static_cast<int>(level) < static_cast<int>(cap))
    cap = level;
  return cap;
}

std::atomic<int>& cap_slot() {
  static std::atomic<int> cap{static_cast<int>(env_cap())};
  return cap;
}

}  // namespace

const char* cpu_isa_name(CpuIsa level) { return kNames[static_cast<int>(level)]; }

bool parse_cpu_isa(const char* name, CpuIsa* level) {
  for (int i = 0; i < kNumCpuIsa; ++i)
    if (std::strcmp(name, kNames[i]) == 0) {
      *level = static_cast<CpuIsa>(i);
      return true;
    }
  return false;
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa value = detect();
  return value;
}

CpuIsa cpu_isa() {
  const int cap = cap_slot().load(std::memory_order_relaxed);
  const int cpu = static_cast<int>(detected_cpu_isa());
  return static_cast<CpuIsa>(cap < cpu ? cap : cpu);
}

void set_cpu_isa_cap(CpuIsa cap) { cap_slot().store(static_cast<int>(cap), std::memory_order_relaxed); }

CpuIsa cpu_isa_cap() { return static_cast<CpuIsa>(cap_slot().load(std::memory_order_relaxed)); }

}  // namespace effops::cpu
