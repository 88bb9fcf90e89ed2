// effops._C: the Python module whose import loads every CPU (and, when built, CUDA) kernel.
// Kernels register themselves as torch ops in the `effops_cpu` / `effops_cuda` namespaces
// (TORCH_LIBRARY_FRAGMENT in each bindings file); the Python op layer calls them through
// torch.ops. This file only adds the module entry point and the build report.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/adam_step.h"
#include "cpu/cpu_features.h"
#include "cpu/dwpw_conv2d.h"
#include "cpu/int8_gemm.h"
#include "cpu/inverted_residual.h"
#include "cpu/masked_linear.h"

#ifndef EFFOPS_BUILD_CUDA
#define EFFOPS_BUILD_CUDA 0
#endif

namespace {

namespace cpu = effops::cpu;

// A JSON object the Python side reads for `python -m effops info` and for backend discovery.
std::string build_info() {
  std::string s = "{";
  s += "\"cuda_kernels\": " + std::string(EFFOPS_BUILD_CUDA ? "true" : "false");
  s += ", \"cpu_isa_detected\": \"" + std::string(cpu::cpu_isa_name(cpu::detected_cpu_isa())) + "\"";
  s += ", \"compiler\": \"" __VERSION__ "\"";
#ifdef _OPENMP
  s += ", \"openmp\": " + std::to_string(_OPENMP);
#else
  s += ", \"openmp\": null";
#endif
  s += "}";
  return s;
}

// The instruction-set level the CPU kernels use now (after the cap), and its cap.
std::string cpu_isa() { return cpu::cpu_isa_name(cpu::cpu_isa()); }
std::string cpu_isa_cap() { return cpu::cpu_isa_name(cpu::cpu_isa_cap()); }

void set_cpu_isa_cap(const std::string& level) {
  cpu::CpuIsa cap;
  TORCH_CHECK_VALUE(cpu::parse_cpu_isa(level.c_str(), &cap),
                    "level must be one of scalar, avx2, avx512, avx512_vnni, avx512_bf16, got '", level, "'");
  cpu::set_cpu_isa_cap(cap);
}

// Per hot path, the body each kernel family runs at the current level (JSON object of strings).
std::string kernel_bodies() {
  const std::pair<const char*, std::string> rows[] = {
      {"int8_gemm", cpu::int8_gemm_body()},
      {"masked_linear", cpu::masked_linear_body()},
      {"dwpw_conv2d", cpu::dwpw::dwpw_body()},
      {"inverted_residual", cpu::ir::inverted_residual_body()},
      {"adam_step", cpu::adam_step_body()},
  };
  std::string s = "{";
  for (const auto& [name, body] : rows) s += (s.size() > 1 ? ", \"" : "\"") + std::string(name) + "\": \"" + body + "\"";
  return s + "}";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("build_info() -> str", &build_info);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isa_cap() -> str", &cpu_isa_cap);
  m.def("set_cpu_isa_cap(str level) -> ()", &set_cpu_isa_cap);
  m.def("kernel_bodies() -> str", &kernel_bodies);
}

static PyModuleDef effops_c_module = {PyModuleDef_HEAD_INIT, "_C", "effops compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&effops_c_module); }
