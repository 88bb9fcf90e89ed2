// Run-time instruction-set levels. Kernels are compiled with per-function target attributes (simd.h)
// and each picks, per call, the best body at or below cpu_isa(): the CPU's level (cpuid, read once),
// lowered by a cap (EFFOPS_CPU_ISA, or set_cpu_isa_cap from Python for tests and benchmarks).
//
// The levels form one ladder; each needs everything below it, so a level is usable when the CPU has
// its own features and those of every level under it:
//   scalar        any CPU (plain C++; the reference every vector body is checked against)
//   avx2          AVX2 + FMA + F16C
//   avx512        AVX-512 F, BW, DQ, VL (512-bit vectors, 32 registers, mask registers)
//   avx512_vnni   + AVX512-VNNI (vpdpbusd: four u8 x s8 products into int32, no 16-bit saturation)
//   avx512_bf16   + AVX512-BF16 (vdpbf16ps: pairs of bf16 products into fp32)
// AMX (tile) int8/bf16 would be the next level; none of the machines this is tested on has it, so it
// has no body. AVX-VNNI (the 256-bit VEX form on AVX2-only CPUs) has no body either.
#pragma once

namespace effops::cpu {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAvx512Bf16 = 4 };
constexpr int kNumCpuIsa = 5;

const char* cpu_isa_name(CpuIsa level);
// Parses a level name ("scalar", "avx2", ...); false when the name is not one.
bool parse_cpu_isa(const char* name, CpuIsa* level);

CpuIsa detected_cpu_isa();  // the highest level this CPU (and OS) supports
CpuIsa cpu_isa();           // the level kernels use now: min(detected, cap)
// Caps the level process-wide (the environment's cap is the initial one). A cap above the CPU's level
// leaves the CPU's level; callers that need that level exactly check detected_cpu_isa() first.
void set_cpu_isa_cap(CpuIsa cap);
CpuIsa cpu_isa_cap();

inline bool cpu_isa_at_least(CpuIsa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }
// The AVX2/FMA bodies (every kernel has one); kept for the kernels that have no wider body.
inline bool has_avx2_fma() { return cpu_isa_at_least(CpuIsa::kAvx2); }

}  // namespace effops::cpu
