// The shared forcing rules and the record_choices() tally (see dispatch.h), and the torch ops through
// which effops/_backends.py sets and reads them.
#include "bindings/dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cpu/cpu_features.h"

namespace effops::dispatch {
namespace {

constexpr const char* kNames[] = {"auto", "reference", "cpu", "cuda", "triton"};

bool parse(const char* name, Backend* out) {
  for (int i = 1; i < 5; ++i) {
    if (std::strcmp(name, kNames[i]) == 0) {
      *out = static_cast<Backend>(i);
      return true;
    }
  }
  return false;
}

thread_local Backend forced_here = Backend::kAuto;  // use_backend() on this thread

std::atomic<int> open_records{0};
std::mutex tally_mutex;
std::map<std::pair<std::string, std::string>, int64_t> tally;  // (op, backend) -> runs, while any is open

bool triton_interprets() {
  const char* v = std::getenv("TRITON_INTERPRET");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

bool runs_on(Backend b, c10::DeviceType device) {
  switch (b) {
    case Backend::kReference: return true;
    case Backend::kCpu: return device == c10::DeviceType::CPU;
    case Backend::kCuda: return device == c10::DeviceType::CUDA;
    case Backend::kTriton: return device == c10::DeviceType::CUDA || (device == c10::DeviceType::CPU && triton_interprets());
    default: return false;
  }
}

}  // namespace

const char* backend_name(Backend b) { return kNames[static_cast<int>(b)]; }

Backend forced_backend() {
  if (forced_here != Backend::kAuto) return forced_here;
  const char* env = std::getenv("EFFOPS_BACKEND");
  if (env == nullptr || *env == '\0') return Backend::kAuto;
  Backend b;
  TORCH_CHECK_VALUE(parse(env, &b), "EFFOPS_BACKEND must be one of ('reference', 'cpu', 'cuda', 'triton'), got '",
                    env, "'");
  return b;
}

Backend forced_on_this_thread() { return forced_here; }

ForwardBackendGuard::ForwardBackendGuard(int64_t at_forward) : previous_(forced_here) {
  TORCH_CHECK(at_forward >= 0 && at_forward < 5, "ForwardBackendGuard: no backend ", at_forward);
  if (forced_here == Backend::kAuto) forced_here = static_cast<Backend>(at_forward);
}

ForwardBackendGuard::~ForwardBackendGuard() { forced_here = previous_; }

Backend choose(const char* op, c10::DeviceType device, Backend ours, const char* cannot, const char* slower) {
  const Backend forced = forced_backend();
  Backend chosen;
  if (forced == Backend::kAuto) {
    chosen = (cannot != nullptr || slower != nullptr) ? Backend::kReference : ours;
  } else {
    TORCH_CHECK_NOT_IMPLEMENTED(runs_on(forced, device), "backend '", backend_name(forced),
                                "' is forced but cannot run on ", c10::DeviceTypeName(device, true), " tensors");
    TORCH_CHECK_NOT_IMPLEMENTED(!(forced == ours && cannot != nullptr), "backend '", backend_name(forced),
                                "' is forced but declines this ", op, " input: ", cannot);
    chosen = forced;
  }
  record(op, chosen);
  return chosen;
}

bool torch_bf16_is_native() {
  if (cpu::detected_cpu_isa() != cpu::CpuIsa::kAvx512Bf16) return false;
  if (at::get_cpu_capability() != "AVX512") return false;  // a string: its enum is not exported
  const char* onednn = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (onednn == nullptr) return true;
  std::string isa(onednn);
  for (char& c : isa) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return isa.empty() || isa == "ALL" || isa == "DEFAULT" || isa.find("BF16") != std::string::npos ||
         isa.find("AMX") != std::string::npos || isa.find("AVX10") != std::string::npos;
}

void record(const char* op, Backend backend) {
  if (open_records.load(std::memory_order_relaxed) == 0) return;
  std::lock_guard<std::mutex> lock(tally_mutex);
  ++tally[{op, backend_name(backend)}];
}

namespace {

// use_backend(name): sets this thread's forced backend ("" for none), returning the previous one.
std::string set_forced_backend(const std::string& name) {
  std::string previous = forced_here == Backend::kAuto ? "" : backend_name(forced_here);
  Backend b = Backend::kAuto;
  TORCH_CHECK_VALUE(name.empty() || parse(name.c_str(), &b),
                    "backend must be one of ('reference', 'cpu', 'cuda', 'triton'), got '", name, "'");
  forced_here = b;
  return previous;
}

// record_choices(): open / close a tally, and read every count so far as "op backend runs" lines.
void record_open() {
  std::lock_guard<std::mutex> lock(tally_mutex);
  ++open_records;
}

void record_close() {
  std::lock_guard<std::mutex> lock(tally_mutex);
  if (--open_records == 0) tally.clear();
}

std::string recorded() {
  std::lock_guard<std::mutex> lock(tally_mutex);
  std::string s;
  for (const auto& [key, runs] : tally) s += key.first + " " + key.second + " " + std::to_string(runs) + "\n";
  return s;
}

}  // namespace
}  // namespace effops::dispatch

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("set_forced_backend(str name) -> str", &effops::dispatch::set_forced_backend);
  m.def("record_open() -> ()", &effops::dispatch::record_open);
  m.def("record_close() -> ()", &effops::dispatch::record_close);
  m.def("recorded() -> str", &effops::dispatch::recorded);
}
