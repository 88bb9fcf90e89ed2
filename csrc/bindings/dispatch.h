// What every op's device implementation asks before it runs: which backend is forced, and where a call
// is counted for record_choices(). The choice itself (our kernel or the plain ATen route) is each op's
// own small policy, in its bindings file; this header only gives the shared rules for forcing.
//
// Backends, as the Python API names them:
//   reference  the plain ATen route: the reference's arithmetic through ATen ops (torch's own kernels)
//   cpu        our C++ kernels on CPU tensors
//   cuda       our CUDA C++ kernels
//   triton     our Triton kernels (on CPU tensors only under TRITON_INTERPRET=1, for tests)
// A backend is forced by effops.use_backend(name) (this thread) or the EFFOPS_BACKEND environment
// variable; forced, it runs or raises NotImplementedError (effops.BackendError) saying why, never falls
// back to another.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceType.h>

#include <string>

namespace effops::dispatch {

enum class Backend : int { kAuto = 0, kReference, kCpu, kCuda, kTriton };

const char* backend_name(Backend b);

// The backend this thread runs: the innermost use_backend(), else EFFOPS_BACKEND (read on every call:
// it may change at run time), else kAuto. An EFFOPS_BACKEND that names no backend raises ValueError.
Backend forced_backend();

// The backend use_backend() forces on this thread (kAuto where none; EFFOPS_BACKEND, the same on every
// thread, is not part of it).
Backend forced_on_this_thread();

// For an autograd Function's backward: the backend use_backend() forced when its forward ran
// (forced_on_this_thread(), saved in the context), in force for the backward's scope unless the
// backward's own thread forces one. torch runs a backward on another thread than the forward's where the
// tensors are on CUDA (a device thread of the autograd engine), where the forward's use_backend() would
// otherwise not reach it and the backward would quietly run the automatic choice.
class ForwardBackendGuard {
 public:
  explicit ForwardBackendGuard(int64_t at_forward);
  ~ForwardBackendGuard();
  ForwardBackendGuard(const ForwardBackendGuard&) = delete;
  ForwardBackendGuard& operator=(const ForwardBackendGuard&) = delete;

 private:
  Backend previous_;
};

// The route of one call on `device` tensors, by the op's policy:
//   cannot: why our kernel cannot compute this input (nullptr: it can);
//   slower: why plain ATen is faster here (nullptr: our kernel is, or no measurement says otherwise).
// Automatic: `ours` unless either reason is given, then kReference. Forced: the forced backend, or
// NotImplementedError when it cannot run here (another device's backend, `cannot` for ours); the speed
// rule never applies to a forced backend. kTriton on CPU tensors is returned only when Triton interprets
// (TRITON_INTERPRET=1): the op then calls its Python-registered Triton route.
// The chosen route is counted for record_choices() under `op`.
Backend choose(const char* op, c10::DeviceType device, Backend ours, const char* cannot, const char* slower);

// Counts one run of `op` on `backend` while a record_choices() block is open (one relaxed atomic load
// when none is).
void record(const char* op, Backend backend);

// Whether torch's own bf16 GEMMs and convolutions run natively here (oneDNN on AVX512-BF16, about 2.8x
// their fp32 speed), which the speed rules of bf16 inputs compare against: the CPU has AVX512-BF16 (by
// cpuid: capping effops does not slow torch down) and torch is not capped below it (ATEN_CPU_CAPABILITY,
// ONEDNN_MAX_CPU_ISA, read per call as torch reads them at start).
bool torch_bf16_is_native();

// The op `name` registered from Python (a Triton route the CPU implementation calls when kTriton is
// forced on CPU tensors), looked up on each use: it exists only once its Python module is imported.
template <class Signature>
c10::TypedOperatorHandle<Signature> python_route(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace effops::dispatch
