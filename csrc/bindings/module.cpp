// effops._C: the Python module whose import loads every CPU (and, when built, CUDA) kernel.
// Kernels register themselves as torch ops in the `effops_cpu` / `effops_cuda` namespaces
// (TORCH_LIBRARY_FRAGMENT in each bindings file); the Python op layer calls them through
// torch.ops. This file only adds the module entry point and the build report.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_features.h"

#ifndef EFFOPS_BUILD_CUDA
#define EFFOPS_BUILD_CUDA 0
#endif

namespace {

// A JSON object the Python side reads for `python -m effops info` and for backend discovery.
std::string build_info() {
  std::string s = "{";
  s += "\"cuda_kernels\": " + std::string(EFFOPS_BUILD_CUDA ? "true" : "false");
  s += ", \"cpu_avx2_fma_runtime\": " + std::string(effops::cpu::has_avx2_fma() ? "true" : "false");
  s += ", \"compiler\": \"" __VERSION__ "\"";
#ifdef _OPENMP
  s += ", \"openmp\": " + std::to_string(_OPENMP);
#else
  s += ", \"openmp\": null";
#endif
  s += "}";
  return s;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("build_info() -> str", &build_info);
}

static PyModuleDef effops_c_module = {PyModuleDef_HEAD_INIT, "_C", "effops compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&effops_c_module); }
