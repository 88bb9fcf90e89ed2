"""Peak arithmetic rates of this CPU, the yardsticks the CPU benchmarks report "% of peak" against:
loops of independent 512-bit vpdpbusd (int8, 4 multiply-adds per int32 lane), vdpbf16ps (bf16, 2 per
fp32 lane) and vfmadd231ps (fp32), 12 accumulators per thread, on as many threads as torch uses.

A microbenchmark compiled here with the instructions it measures (-mavx512vnni etc.: for this loop
only; effops itself is never built with -march flags). Returns {} where gcc or the instructions are
missing. Run alone: PYTHONPATH=. python benchmarks/cpu_peak.py
"""
import functools
import os
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
/* 12 named accumulators (an array whose address escapes would live in memory). */
#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(j) T acc##j = ZERO;
#define STEP(j) acc##j = OP(acc##j);
#define SUM(j) s += REDUCE(acc##j);
#define LOOP(name, ops_per_instr)                                                       \
  {                                                                                     \
    double t0 = omp_get_wtime(), total = 0;                                             \
    _Pragma("omp parallel reduction(+ : total)")                                        \
    {                                                                                   \
      REP12(DECL)                                                                       \
      for (long i = 0; i < iters; ++i) { REP12(STEP) }                                  \
      double s = 0;                                                                     \
      REP12(SUM)                                                                        \
      total += s;                                                                       \
    }                                                                                   \
    double dt = omp_get_wtime() - t0;                                                   \
    printf("%s %.1f %g\n", name, (double)iters * 12 * ops_per_instr * omp_get_max_threads() / dt / 1e9, total); \
  }
int main(int argc, char** argv) {
  long iters = atol(argv[1]);
  {
#define T __m512i
#define ZERO _mm512_setzero_si512()
#define OP(x) _mm512_dpbusd_epi32(x, a, b)
#define REDUCE(x) _mm512_reduce_add_epi32(x)
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
    LOOP("int8_vnni_gops", 128)
#undef T
#undef ZERO
#undef OP
#undef REDUCE
  }
  {
#define T __m512
#define ZERO _mm512_setzero_ps()
#define OP(x) _mm512_dpbf16_ps(x, a, b)
#define REDUCE(x) _mm512_reduce_add_ps(x)
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = a;
    LOOP("bf16_dot_gflops", 64)
#undef OP
#define OP(x) _mm512_fmadd_ps(c, d, x)
    const __m512 c = _mm512_set1_ps(1e-9f), d = _mm512_set1_ps(1.f);
    LOOP("fp32_fma_gflops", 32)
  }
  return 0;
}
"""


@functools.lru_cache(maxsize=None)
def measure(iters=20_000_000):
    """{"int8_vnni_gops": ..., "bf16_dot_gflops": ..., "fp32_fma_gflops": ...} on torch's thread count."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(src, "w") as f:
            f.write(SOURCE)
        try:
            subprocess.run(["gcc", "-O2", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512bf16",
                            src, "-o", exe], check=True, capture_output=True, timeout=60)
            env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
            out = subprocess.run([exe, str(iters)], check=True, capture_output=True, text=True, timeout=120, env=env)
        except (OSError, subprocess.SubprocessError):
            return {}
    return {line.split()[0]: float(line.split()[1]) for line in out.stdout.splitlines()}


if __name__ == "__main__":
    print(measure())
