"""Which backends exist, which are usable here, and forcing one.

The choice itself is each op's, in C++ (docs/architecture.md): its device implementation checks its
arguments, asks its policy, and runs our kernel or torch's own ops. This module gives the Python side
of that: `use_backend` (this thread) and `EFFOPS_BACKEND` force a backend, `record_choices` counts what
ran, and `backends()` / `backend_reasons()` say what is usable here.

Triton on CPU tensors runs only in its interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported): that is for tests, so the automatic choice never picks it.
"""
import collections
import contextlib
import contextvars
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# A forced backend cannot run (unusable here, no kernel for this op, or it cannot take the input). The
# same class as the ops' C++ implementations raise (torch turns TORCH_CHECK_NOT_IMPLEMENTED into it).
BackendError = NotImplementedError

_forced = contextvars.ContextVar("effops_forced_backend", default=None)


def _triton_interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _status(name):
    """(usable, reason) for a backend on this machine, independent of any device."""
    from effops import _ext

    if name == "reference":
        return True, "plain PyTorch"
    if name == "cpu":
        return (True, "compiled CPU kernels") if _ext.load() else (False, _ext.reason())
    if name == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if not _ext.load():
            return False, _ext.reason()
        if not _ext.build_info().get("cuda_kernels"):
            return False, "extension built without CUDA kernels (EFFOPS_BUILD_CUDA)"
        return True, "compiled CUDA kernels"
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        if torch.cuda.is_available():
            return True, "Triton on CUDA"
        if _triton_interpreting():
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
    raise ValueError("unknown backend %r; expected one of %s" % (name, BACKENDS))


def backend_reasons():
    """{backend: (usable, reason)} for `python -m effops info`."""
    return {name: _status(name) for name in BACKENDS}


def backends():
    """{backend name: usable here}."""
    return {name: ok for name, (ok, _) in backend_reasons().items()}


def runs_on(backend, device_type):
    """Whether `backend` can run on tensors of `device_type` at all (as the C++ ops decide it)."""
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpreting())
    return False


def op_backends(name):
    """The backends with a kernel for the public op `name` (effops.ops.<name>), as the module defining
    it declares them (its BACKENDS); () for a name that is no public op."""
    import sys
    import effops.ops
    fn = getattr(effops.ops, name, None)
    return tuple(getattr(sys.modules.get(getattr(fn, "__module__", ""), None), "BACKENDS", ()))


def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError("%s must be one of %s, got %r" % (source, BACKENDS, name))


def forced_backend():
    """The backend forced by `use_backend` (innermost wins) or EFFOPS_BACKEND, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("EFFOPS_BACKEND") or None
    if env is not None:
        _check_name(env, "EFFOPS_BACKEND")
    return env


def _cpp_ops():
    """torch.ops.effops_cpu when the compiled ops are loaded (they hold the forced backend, per thread,
    and the record_choices tally: csrc/bindings/dispatch.cpp), else None."""
    from effops import _ext
    return torch.ops.effops_cpu if _ext.load() else None


@contextlib.contextmanager
def use_backend(name):
    """Run every effops op inside the block, on this thread, on backend `name`; raises BackendError if
    it is unusable here."""
    _check_name(name, "use_backend(name)")
    ok, why = _status(name)
    if not ok:
        raise BackendError("backend %r is not usable here: %s" % (name, why))
    token = _forced.set(name)
    cpp = _cpp_ops()
    previous = cpp.set_forced_backend(name) if cpp is not None else None
    try:
        yield
    finally:
        _forced.reset(token)
        if cpp is not None:
            cpp.set_forced_backend(previous)


def on_tensors_device(fn):
    """fn run with the CUDA device of its first tensor argument current. Triton launches its kernels on
    the current device, not on the tensors': given cuda:1 tensors while cuda:0 is current, a kernel
    would run on the wrong GPU with the other GPU's addresses."""
    def run(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            device = next((a[0].device for a in args if isinstance(a, (list, tuple)) and a
                           and isinstance(a[0], torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    run.__wrapped__ = fn
    return run


def under_transform():
    """True inside a torch.func transform (vmap, grad, jvp: their tensors look plain but wrap others) or
    a forward-mode AD level (dual tensors carry tangents without requires_grad): the ops' C++ kernels
    would drop what they carry, so the Python functions run the reference there. False while
    torch.compile traces: the ops have fake kernels and autograd, and the graph must hold them (dynamo
    reports a functorch interpreter while it traces, which would put the reference in every graph)."""
    if torch.compiler.is_compiling():
        return False
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


@contextlib.contextmanager
def record_choices():
    """Count which backend ran each op inside the block: yields {op: {backend: calls}}, complete when the
    block ends (the compiled ops count in C++; their counts are added then)."""
    tally = collections.defaultdict(dict)
    cpp = _cpp_ops()
    if cpp is None:
        yield tally
        return
    cpp.record_open()
    before = _cpp_counts(cpp)
    try:
        yield tally
    finally:
        for (op, name), runs in _cpp_counts(cpp).items():
            runs -= before.get((op, name), 0)
            if runs:
                tally[op][name] = tally[op].get(name, 0) + runs
        cpp.record_close()


def _cpp_counts(cpp):
    counts = {}
    for line in cpp.recorded().splitlines():
        op, name, runs = line.split()
        counts[(op, name)] = int(runs)
    return counts
