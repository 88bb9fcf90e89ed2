"""Peak arithmetic rates of this CPU, the yardsticks the CPU benchmarks report "% of peak" against:
loops of independent 512-bit vpdpbusd (int8, 4 multiply-adds per int32 lane), vdpbf16ps (bf16, 2 per
fp32 lane) and vfmadd231ps (fp32), 12 accumulators per thread.

The loop body is inline asm: written in C, the 12 accumulators start equal and see the same operands,
so gcc merges them into one chain (gcc 12 -O2 left a single vpdpbusd / vdpbf16ps / vfmadd231ps in each
loop), and the loop measured 12 x a latency-bound rate instead of the throughput. The asm statement
names its 12 accumulators as separate in/out registers, so every instruction is issued.

Each thread times itself in its own CPU time (CLOCK_THREAD_CPUTIME_ID), so time slices taken by other
processes on a shared machine do not count; an n-thread figure is the sum of the threads' rates.

A microbenchmark compiled here with the instructions it measures (-mavx512vnni etc.: for this loop
only; effops itself is never built with -march flags). Returns {} where gcc or the instructions are
missing. Run alone: PYTHONPATH=. python benchmarks/cpu_peak.py (1 thread and torch's thread count).
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
#include <time.h>
static double thread_cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
/* One iteration: INS x, y, acc_j for 12 accumulators, each its own "+v" operand (named variables:
   an array would be stored to memory after every iteration). */
#define REP12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(j) __m512i c##j = _mm512_setzero_si512();
#define SUM(j) sink += _mm512_reduce_add_epi32(c##j);
#define ASM12(INS)                                                                              \
  __asm__ volatile(INS " %[x], %[y], %[c0]\n\t" INS " %[x], %[y], %[c1]\n\t"                    \
                   INS " %[x], %[y], %[c2]\n\t" INS " %[x], %[y], %[c3]\n\t"                    \
                   INS " %[x], %[y], %[c4]\n\t" INS " %[x], %[y], %[c5]\n\t"                    \
                   INS " %[x], %[y], %[c6]\n\t" INS " %[x], %[y], %[c7]\n\t"                    \
                   INS " %[x], %[y], %[c8]\n\t" INS " %[x], %[y], %[c9]\n\t"                    \
                   INS " %[x], %[y], %[c10]\n\t" INS " %[x], %[y], %[c11]"                      \
                   : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4),  \
                     [c5] "+v"(c5), [c6] "+v"(c6), [c7] "+v"(c7), [c8] "+v"(c8), [c9] "+v"(c9),      \
                     [c10] "+v"(c10), [c11] "+v"(c11)                                           \
                   : [x] "v"(x), [y] "v"(y))
/* ops per instruction: 16 lanes x 4 (int8) / 2 (bf16) / 1 (fp32) multiply-adds, 2 ops each. */
#define LOOP(name, INS, ops_per_instr)                                                          \
  {                                                                                             \
    double rate = 0, sink = 0;                                                                  \
    _Pragma("omp parallel num_threads(threads) reduction(+ : rate, sink)")                      \
    {                                                                                           \
      /* 1.0f: normal floats for the fp32 / bf16 loops (no denormal operands), small bytes for int8 */ \
      __m512i x = _mm512_castps_si512(_mm512_set1_ps(1.0f)), y = x;                             \
      REP12(DECL)                                                                               \
      double t0 = thread_cpu();                                                                 \
      for (long i = 0; i < iters; ++i) ASM12(INS);                                              \
      double dt = thread_cpu() - t0;                                                            \
      rate += (double)iters * 12 * ops_per_instr / dt / 1e9;                                    \
      REP12(SUM)                                                                                \
    }                                                                                           \
    printf("%s %.1f %g\n", name, rate, sink);                                                   \
  }
int main(int argc, char** argv) {
  long iters = atol(argv[1]);
  int threads = atoi(argv[2]);
  LOOP("int8_vnni_gops", "vpdpbusd", 128)
  LOOP("bf16_dot_gflops", "vdpbf16ps", 64)
  LOOP("fp32_fma_gflops", "vfmadd231ps", 32)
  return 0;
}
"""


def _binary(tmp):
    src, exe = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
    with open(src, "w") as f:
        f.write(SOURCE)
    subprocess.run(["gcc", "-O2", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512bf16",
                    src, "-o", exe], check=True, capture_output=True, timeout=60)
    return exe


@functools.lru_cache(maxsize=None)
def measure(iters=20_000_000, threads=None):
    """{"int8_vnni_gops": ..., "bf16_dot_gflops": ..., "fp32_fma_gflops": ...} on `threads` threads (torch's
    thread count by default): the sum of each thread's rate in its own CPU time."""
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = _binary(tmp)
            out = subprocess.run([exe, str(iters), str(threads)], check=True, capture_output=True, text=True,
                                 timeout=120)
        except (OSError, subprocess.SubprocessError):
            return {}
    return {line.split()[0]: float(line.split()[1]) for line in out.stdout.splitlines()}


if __name__ == "__main__":
    for n in sorted({1, torch.get_num_threads()}):
        print("%d thread%s: %s" % (n, "" if n == 1 else "s", measure(threads=n)))
