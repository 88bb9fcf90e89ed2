// File I/O shared by the emulation harnesses: a case is a directory holding params.txt (whitespace-
// separated integers) and raw little-endian arrays; results are written beside them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <sanitizer/asan_interface.h>  // ASAN_(UN)POISON_MEMORY_REGION: no-ops without -fsanitize=address

namespace harness {

[[noreturn]] inline void die(const std::string& what) {
  std::fprintf(stderr, "harness: %s\n", what.c_str());
  std::exit(2);
}

inline std::vector<long long> read_params(const std::string& dir) {
  FILE* f = std::fopen((dir + "/params.txt").c_str(), "r");
  if (!f) die("cannot open " + dir + "/params.txt");
  std::vector<long long> v;
  long long x;
  while (std::fscanf(f, "%lld", &x) == 1) v.push_back(x);
  std::fclose(f);
  return v;
}

// A device-like buffer: exactly `bytes` usable bytes starting `offset` bytes past a 64-byte boundary
// (so AddressSanitizer flags any access past its end, and misaligned bases can be tested). The
// `offset` bytes before it hold kGuard and are poisoned for AddressSanitizer, which can only poison
// whole 8-byte granules below the buffer's own: a read there in the buffer's granule goes unseen, a
// write anywhere there is caught by prefix_intact().
constexpr unsigned char kGuard = 0x5A;

struct Buffer {
  char* base = nullptr;
  char* ptr = nullptr;
  size_t bytes = 0;
  Buffer() = default;
  Buffer(size_t n, size_t offset, unsigned char fill) : bytes(n) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, offset + n + (offset + n == 0)) != 0) die("out of memory");
    base = static_cast<char*>(p);
    ptr = base + offset;
    std::memset(base, kGuard, offset);
    std::memset(ptr, fill, n);
    ASAN_POISON_MEMORY_REGION(base, offset);
  }
  bool prefix_intact() const {
    ASAN_UNPOISON_MEMORY_REGION(base, ptr - base);
    bool ok = true;
    for (const char* q = base; q < ptr; ++q) ok = ok && static_cast<unsigned char>(*q) == kGuard;
    ASAN_POISON_MEMORY_REGION(base, ptr - base);
    return ok;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : base(o.base), ptr(o.ptr), bytes(o.bytes) { o.base = o.ptr = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(base, o.base);
    std::swap(ptr, o.ptr);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Buffer() {
    if (base) ASAN_UNPOISON_MEMORY_REGION(base, ptr - base);
    std::free(base);
  }
};

inline Buffer read_buffer(const std::string& path, size_t bytes, size_t offset = 0) {
  Buffer b(bytes, offset, 0);
  if (bytes == 0) return b;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  if (std::fread(b.ptr, 1, bytes, f) != bytes) die("short read " + path);
  std::fclose(f);
  return b;
}

inline void write_bytes(const std::string& path, const void* p, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot write " + path);
  if (bytes && std::fwrite(p, 1, bytes, f) != bytes) die("short write " + path);
  std::fclose(f);
}

inline void write_status(const std::string& dir, int err) {
  FILE* f = std::fopen((dir + "/status.txt").c_str(), "w");
  if (!f) die("cannot write status");
  std::fprintf(f, "%d %zu\n", err, effops_emu::g_launches.size());
  for (const auto& l : effops_emu::g_launches)
    std::fprintf(f, "%u %u %u %u %u %u\n", l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y, l.block.z);
  std::fclose(f);
}

// Harness options before the case directories: --reverse (threads taken from the last), --priority
// (the first runnable thread always runs; see effops_emu::Schedule).
inline int parse_options(int argc, char** argv) {
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; ++i) {
    if (std::strcmp(argv[i], "--reverse") == 0) effops_emu::g_reverse_order = true;
    else if (std::strcmp(argv[i], "--priority") == 0) effops_emu::g_schedule = effops_emu::Schedule::kPriority;
    else die(std::string("unknown option ") + argv[i]);
  }
  return i;
}

}  // namespace harness
