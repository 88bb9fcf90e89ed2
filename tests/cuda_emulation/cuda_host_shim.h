// Host emulation of the CUDA execution model, for running effops' CUDA kernels on a CPU in tests.
// Force-included (g++ -include) before a kernel source whose `kernel<<<...>>>(...)` launches were
// rewritten into effops_emu::launch calls (tests/cuda_emulation/build.py). Test-only: nothing in
// effops uses it.
//
// What it models: a grid of blocks run one block at a time; the threads of a block as fibers on one
// OS thread (ucontext), each running until it reaches a barrier (__syncthreads, or the warp barriers
// inside the emulated mma), then the next fiber runs: a thread that read shared memory before the
// barrier that should have protected it would see data other threads have not yet written. A
// barrier that some threads never reach (a divergent __syncthreads, an mma executed by part of a
// warp) is reported as a deadlock. __shared__ variables are static storage shared by the block's
// fibers (one block runs at a time). Float intrinsics are the host's IEEE fp32 operations (SSE, no
// contraction: the harness compiles with -ffp-contract=off); bf16/fp16 conversions are the host
// paths of CUDA's own cuda_bf16.h / cuda_fp16.h.
//
// What it does not model: timing, concurrency between blocks, the GPU memory model (no race
// detection beyond barrier placement), warp-synchronous code without barriers, tensor-core hardware
// (mma is computed from the PTX ISA's documented fragment layout, see mma_m16n8k32_s8 below).
#pragma once

#ifndef EFFOPS_CUDA_HOST_EMULATION
#error "cuda_host_shim.h is for the host emulation build only (define EFFOPS_CUDA_HOST_EMULATION)"
#endif

// CUDA's own headers are host-usable with g++: the real dim3/uint3/uint4, cudaError_t, cudaStream_t,
// __nv_bfloat16 and __half with their host conversion routines.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

static_assert(FLT_EVAL_METHOD == 0, "fp32 intrinsics must round every operation to fp32");

// ---- keywords ------------------------------------------------------------------------------------
// cuda_runtime.h defines __global__/__device__/__host__ as nothing and __forceinline__ as inline for a
// host compiler; the rest only nvcc defines.
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#undef __shared__
#define __shared__ static

namespace effops_emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "effops_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// ---- fibers and barriers ---------------------------------------------------------------------------
struct Barrier {
  int expected = 0, arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  bool done = false;
  uint3 tid;
  int linear = 0;
  unsigned mma_count = 0;
  const struct Barrier* waiting_on = nullptr;  // the barrier this thread waits at, and its generation
  unsigned wait_generation = 0;
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
#endif
};

// The 32 lanes' operands of one warp's mma in flight.
struct WarpMma {
  uint32_t a[32][4], b[32][2];
  int c[32][4];
  unsigned seq[32];
};

constexpr size_t kStackBytes = 256 * 1024;

struct BlockState {
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpMma> warp_mma;
  std::function<void()> body;
  ucontext_t scheduler;
  int current = -1;
#if defined(__SANITIZE_ADDRESS__)
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

inline BlockState g_block;
inline uint3 g_thread_idx, g_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline cudaError_t g_last_error = cudaSuccess;
// The order in which a block's threads run between barriers. Round robin: each runnable thread in
// turn runs to its next barrier (warps advance in near lockstep). Priority: always the first
// runnable thread, so one warp runs as far ahead of the others as the barriers allow (a warp that
// overwrites a tile the others still read, for want of a barrier, is caught this way). Reverse:
// threads taken from the last.
enum class Schedule { kRoundRobin, kPriority };
inline Schedule g_schedule = Schedule::kRoundRobin;
inline bool g_reverse_order = false;
struct LaunchRecord {
  dim3 grid, block;
};
inline std::vector<LaunchRecord> g_launches;

inline Fiber& current_fiber() {
  if (g_block.current < 0) fail("a device function ran outside a kernel launch");
  return g_block.fibers[g_block.current];
}

// Fiber -> scheduler.
inline void yield_to_scheduler() {
  Fiber& f = current_fiber();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&f.fake_stack, g_block.sched_stack_bottom, g_block.sched_stack_size);
#endif
  swapcontext(&f.ctx, &g_block.scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, &g_block.sched_stack_bottom, &g_block.sched_stack_size);
#endif
}

inline void barrier_wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {  // the last to arrive releases the others and runs on
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber& f = current_fiber();
  f.waiting_on = &b;
  f.wait_generation = gen;
  while (b.generation == gen) yield_to_scheduler();
  f.waiting_on = nullptr;
}

inline void fiber_entry() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g_block.sched_stack_bottom, &g_block.sched_stack_size);
#endif
  g_block.body();
  Fiber& f = current_fiber();
  f.done = true;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(nullptr, g_block.sched_stack_bottom, g_block.sched_stack_size);
#endif
  // returning resumes uc_link, the scheduler
}

// Scheduler -> fiber i.
inline void resume(int i) {
  Fiber& f = g_block.fibers[i];
  g_block.current = i;
  g_thread_idx = f.tid;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&g_block.scheduler, &f.ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_block.current = -1;
}

inline void run_block(int nthreads) {
  BlockState& s = g_block;
  if (static_cast<int>(s.fibers.size()) < nthreads) s.fibers.resize(nthreads);
  const int nwarps = (nthreads + 31) / 32;
  s.block_barrier = Barrier{nthreads, 0, 0};
  s.warp_barriers.assign(nwarps, Barrier{});
  for (int w = 0; w < nwarps; ++w) s.warp_barriers[w].expected = (w + 1) * 32 <= nthreads ? 32 : nthreads - w * 32;
  s.warp_mma.resize(nwarps);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    if (!f.stack) {
      void* mem = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mem == MAP_FAILED) fail("mmap of a fiber stack failed");
      f.stack = static_cast<char*>(mem);
    }
    f.done = false;
    f.mma_count = 0;
    f.waiting_on = nullptr;
    f.linear = t;
    f.tid = uint3{static_cast<unsigned>(t % g_block_dim.x), static_cast<unsigned>((t / g_block_dim.x) % g_block_dim.y),
                  static_cast<unsigned>(t / (g_block_dim.x * g_block_dim.y))};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const auto runnable = [&](int t) {
    const Fiber& f = s.fibers[t];
    return !f.done && (f.waiting_on == nullptr || f.waiting_on->generation != f.wait_generation);
  };
  int alive = nthreads;
  while (alive > 0) {
    bool ran = false;
    for (int k = 0; k < nthreads; ++k) {
      const int t = g_reverse_order ? nthreads - 1 - k : k;
      if (!runnable(t)) continue;
      resume(t);
      ran = true;
      if (s.fibers[t].done) --alive;
      if (g_schedule == Schedule::kPriority) break;  // rescan from the first thread
    }
    if (alive > 0 && !ran) {
      int at_block = 0, at_warp = 0;
      for (int t = 0; t < nthreads; ++t) {
        if (s.fibers[t].done) continue;
        if (s.fibers[t].waiting_on == &s.block_barrier) ++at_block;
        else ++at_warp;
      }
      char msg[256];
      std::snprintf(msg, sizeof msg,
                    "deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp barrier "
                    "(mma), %d exited",
                    g_block_idx.x, g_block_idx.y, g_block_idx.z, at_block, at_warp, nthreads - alive);
      fail(msg);
    }
  }
}

inline bool valid_config(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535 &&
         block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
         threads <= 1024;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t sm = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(sm), stream(st) {}
};

template <typename... P>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

// kernel<<<grid, block, smem, stream>>>(args...): runs synchronously (the stream is ignored); an
// invalid configuration sets the error cudaGetLastError returns, as a real launch does.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), LaunchConfig cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with a wrong argument count");
  static_assert(param_bytes<std::decay_t<P>...>() <= 4096, "kernel parameters exceed the 4 KB parameter space");
  if (!valid_config(cfg.grid, cfg.block) || cfg.smem > 48 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  g_launches.push_back({cfg.grid, cfg.block});
  // Converted once to the parameter types, as the launch copies them into the parameter space;
  // every thread then receives its own by-value copy.
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  g_block.body = [&] { std::apply(kernel, params); };
  g_grid_dim = cfg.grid;
  g_block_dim = cfg.block;
  const int nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        run_block(nthreads);
      }
  g_block.body = nullptr;
}

// ---- mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 ----------------------------------------------
// Fragment layout from the PTX ISA, section 9.7.14.5.10 "Matrix Fragments for mma.m16n8k32"
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16832),
// .s8/.u8 rows, transcribed from the spec text, not from the kernel:
//   groupID = %laneid >> 2, threadID_in_group = %laneid % 4
//   A (16 x 32, four .b32 registers holding a0..a15, low to high):
//     row = groupID for ai with 0 <= i < 4 || 8 <= i < 12, groupID + 8 otherwise
//     col = threadID_in_group * 4 + (i & 0x3) for i < 8, + 16 for i >= 8
//   B (32 x 8, two .b32 registers holding b0..b7):
//     row = threadID_in_group * 4 + (i & 0x3) for i < 4, + 16 for i >= 4;  col = groupID
//   C/D (16 x 8, four .s32 c0..c3):
//     row = groupID for i < 2, groupID + 8 for i >= 2;  col = threadID_in_group * 2 + (i & 0x1)
// "Elements (low to high)": element j of a register is its byte j (bits 8j..8j+7).
struct FragPos {
  int lane, elem;
};

struct MmaLayout {
  FragPos a_at[16][32];  // (row, k) -> which lane/element holds A[row][k]
  FragPos b_at[32][8];   // (k, col) -> B[k][col]
  int c_row[32][4], c_col[32][4];

  MmaLayout() {
    bool a_seen[16][32] = {}, b_seen[32][8] = {}, c_seen[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
      const int group = lane >> 2, tig = lane % 4;
      for (int i = 0; i < 16; ++i) {
        const int row = ((0 <= i && i < 4) || (8 <= i && i < 12)) ? group : group + 8;
        const int col = tig * 4 + (i & 0x3) + (i >= 8 ? 16 : 0);
        if (a_seen[row][col]) fail("mma layout: A element held twice");
        a_seen[row][col] = true;
        a_at[row][col] = {lane, i};
      }
      for (int i = 0; i < 8; ++i) {
        const int row = tig * 4 + (i & 0x3) + (i >= 4 ? 16 : 0);
        const int col = group;
        if (b_seen[row][col]) fail("mma layout: B element held twice");
        b_seen[row][col] = true;
        b_at[row][col] = {lane, i};
      }
      for (int i = 0; i < 4; ++i) {
        c_row[lane][i] = i < 2 ? group : group + 8;
        c_col[lane][i] = tig * 2 + (i & 0x1);
        if (c_seen[c_row[lane][i]][c_col[lane][i]]) fail("mma layout: C element held twice");
        c_seen[c_row[lane][i]][c_col[lane][i]] = true;
      }
    }
    // 512 A, 256 B and 128 C elements over 32 lanes: with no duplicates, each is held exactly once.
  }
};

inline const MmaLayout& mma_layout() {
  static const MmaLayout layout;
  return layout;
}

inline int8_t frag_byte(uint32_t reg, int j) { return static_cast<int8_t>(static_cast<uint8_t>(reg >> (8 * j))); }

// Warp-collective: every lane deposits its fragments, waits for the whole warp, computes its own
// four D elements from all lanes' A and B, and waits again before its deposit may be overwritten.
inline void mma_m16n8k32_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const MmaLayout& L = mma_layout();
  Fiber& f = current_fiber();
  const int warp = f.linear / 32, lane = f.linear % 32;
  if (g_block.warp_barriers[warp].expected != 32) fail("mma.sync.aligned executed by a partial warp");
  WarpMma& w = g_block.warp_mma[warp];
  std::memcpy(w.a[lane], a, sizeof w.a[lane]);
  std::memcpy(w.b[lane], b, sizeof w.b[lane]);
  std::memcpy(w.c[lane], c, sizeof w.c[lane]);
  w.seq[lane] = ++f.mma_count;
  barrier_wait(g_block.warp_barriers[warp]);
  for (int l = 0; l < 32; ++l)
    if (w.seq[l] != w.seq[lane]) fail("mma.sync.aligned: the lanes of a warp executed different mma instances");
  int d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = L.c_row[lane][i], col = L.c_col[lane][i];
    uint32_t acc = static_cast<uint32_t>(w.c[lane][i]);  // .s32 accumulation wraps (no .satfinite)
    for (int k = 0; k < 32; ++k) {
      const FragPos pa = L.a_at[row][k], pb = L.b_at[k][col];
      const int av = frag_byte(w.a[pa.lane][pa.elem / 4], pa.elem % 4);
      const int bv = frag_byte(w.b[pb.lane][pb.elem / 4], pb.elem % 4);
      acc += static_cast<uint32_t>(av * bv);
    }
    d[i] = static_cast<int>(acc);
  }
  barrier_wait(g_block.warp_barriers[warp]);
  std::memcpy(c, d, sizeof d);
}

}  // namespace effops_emu

// ---- built-in variables and device functions -------------------------------------------------------
// Read-only, as on the device.
#define threadIdx (static_cast<const uint3&>(::effops_emu::g_thread_idx))
#define blockIdx (static_cast<const uint3&>(::effops_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::effops_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::effops_emu::g_grid_dim))

inline void __syncthreads() { ::effops_emu::barrier_wait(::effops_emu::g_block.block_barrier); }

// IEEE round-to-nearest-even fp32 operations (device intrinsics of the same names).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

// Defined here, not linked from libcudart: the harness is one translation unit.
extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ::effops_emu::g_last_error;
  ::effops_emu::g_last_error = cudaSuccess;
  return e;
}
