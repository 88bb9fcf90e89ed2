#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace effops::cpu {

static bool detect_avx2_fma() {
  const char* off = std::getenv("EFFOPS_DISABLE_AVX2");
  if (off != nullptr && std::strcmp(off, "1") == 0) return false;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool has_avx2_fma() {
  // Read once: the environment switch is a process-wide choice.
  static const bool value = detect_avx2_fma();
  return value;
}

}  // namespace effops::cpu
