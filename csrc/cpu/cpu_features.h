// Run-time CPU feature detection. Kernels are compiled with per-function target attributes
// (see simd.h) and pick the AVX2/FMA body only when the CPU running them has it.
#pragma once

namespace effops::cpu {

// True when the running CPU supports AVX2 and FMA (and the OS saves YMM state).
// EFFOPS_DISABLE_AVX2=1 in the environment forces the scalar bodies (used by the tests).
bool has_avx2_fma();

}  // namespace effops::cpu
