"""The backend registry: which implementations exist, which are usable here, and which one runs.

Each op registers one kernel per backend with `register_kernel(op, backend, supports=..., faster=...)`.
Both callables receive the op's arguments and return None to accept them or a short reason to decline:
`supports` for what the kernel cannot compute (a dtype it lacks, a layout), `faster` for inputs it can
compute but where plain PyTorch (measured) or another backend (where no GPU has measured yet, the
one expected faster, said so in the reason) should run instead. `dispatch` then picks:

* forced (``use_backend(name)`` or ``EFFOPS_BACKEND``): that backend, or a clear error when it is
  unusable here, has no kernel for the op, or its `supports` declines the input. Forcing never falls
  back quietly; the speed rule (`faster`) does not apply, so a forced kernel runs wherever it is correct.
* automatic: the first usable backend in ``AUTO_ORDER[device type]`` whose kernel accepts the input
  under both rules. ``reference`` (plain PyTorch) accepts everything, so every input has an answer.

Triton on CPU tensors runs only in its interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported): that is for tests, so the automatic choice never picks it.
"""
import collections
import contextlib
import contextvars
import importlib
import importlib.util
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Best first, per device type of the op's tensors.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_forced = contextvars.ContextVar("effops_forced_backend", default=None)
_chosen_outside = contextvars.ContextVar("effops_chosen_outside", default=None)  # (op, backend) or None
_kernels = {}  # op name -> {backend name -> _Kernel}
_recorders = []  # open record_choices() tallies
_generation = [0]  # moves with every register_kernel: memos of earlier choices (effops._call_plan) lapse


# A forced backend cannot run (unusable here, no kernel for this op, or it declined the input). The same
# class as the ops' C++ implementations raise (torch turns TORCH_CHECK_NOT_IMPLEMENTED into it).
BackendError = NotImplementedError


class _Kernel:
    def __init__(self, fn, supports, faster, on_tensors_device=False):
        self._fn = fn  # a callable, or "module:function" imported on first use (keeps Triton lazy)
        self.supports = supports
        self.faster = faster
        self._on_tensors_device = on_tensors_device
        self._resolved = None

    @property
    def fn(self):
        if self._resolved is None or self._resolved[0] is not self._fn:  # tests may swap _fn
            fn = self._fn
            if isinstance(fn, str):
                module, name = fn.split(":")
                fn = self._fn = getattr(importlib.import_module(module), name)
            self._resolved = (fn, on_tensors_device(fn) if self._on_tensors_device else fn)
        return self._resolved[1]


def _first_device(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return None


def on_tensors_device(fn):
    """fn run with the CUDA device of its first tensor argument current. Triton launches its kernels on
    the current device, not on the tensors': given cuda:1 tensors while cuda:0 is current, a kernel
    would run on the wrong GPU with the other GPU's addresses."""
    def run(*args, **kwargs):
        device = _first_device(args)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    run.__wrapped__ = fn
    return run


def register_kernel(op, backend, fn=None, *, supports=None, faster=None):
    """Register `fn` as `backend`'s kernel for `op`. Usable as a decorator when `fn` is omitted.

    supports(*args) / faster(*args): None to accept, else the reason to decline (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError("backend must be one of %s, got %r" % (BACKENDS, backend))

    def add(f):
        _kernels.setdefault(op, {})[backend] = _Kernel(f, supports, faster, on_tensors_device=backend == "triton")
        _generation[0] += 1
        return f

    return add if fn is None else add(fn)


# ---------------------------------------------------------------------------------------------
# Which backends are usable here
# ---------------------------------------------------------------------------------------------
def shared_cpu(t):
    """t lives in shared CPU memory (Tensor.share_memory_(), a model shared with worker processes):
    another process may write it without moving this process's version counter, so nothing derived
    from it may be reused on its version alone. (Storage.is_shared: ~0.1 us against Tensor.is_shared's
    ~2 us; CUDA storages always count as shared, hence CPU only.)"""
    return t.is_cpu and t.untyped_storage().is_shared()


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


_usable_cache = {}


def _usable(name):
    """_status(name)[0], remembered per process for the backends whose usability cannot change in one
    (the extension loads once; CUDA is there or not). Triton's depends on TRITON_INTERPRET: asked each time."""
    usable = _usable_cache.get(name)
    if usable is None:
        usable = _status(name)[0]
        if name != "triton":
            _usable_cache[name] = usable
    return usable


def generation():
    """A number that changes whenever the registry does (a kernel registered or replaced)."""
    return _generation[0]


def backend_reasons():
    """{backend: (usable, reason)} for `python -m effops info`."""
    return {name: _status(name) for name in BACKENDS}


def backends():
    """{backend name: usable here}."""
    return {name: ok for name, (ok, _) in backend_reasons().items()}


def _runs_on(backend, device_type):
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpreting())
    return False


# ---------------------------------------------------------------------------------------------
# Forcing a backend
# ---------------------------------------------------------------------------------------------
def _check_name(name, source):
    if name not in BACKENDS:
        raise ValueError("%s must be one of %s, got %r" % (source, BACKENDS, name))


# EFFOPS_BACKEND is read on every op call (it may change at run time). os.environ.get costs ~1.3 us
# (it encodes the key each time); the live dict behind os.environ with the key encoded once, ~0.05 us.
try:
    _ENV, _ENV_KEY, _ENV_DECODE = os.environ._data, os.environ.encodekey("EFFOPS_BACKEND"), os.environ.decodevalue
except AttributeError:  # not CPython's os._Environ: the public way
    _ENV = None


def _env_backend():
    if _ENV is None:
        return os.environ.get("EFFOPS_BACKEND")
    value = _ENV.get(_ENV_KEY)
    return None if value is None else _ENV_DECODE(value)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "ipu", "mtia", "maia", "privateuseone")


def autocast_dtype(device_type):
    """The dtype autocast asks for on this device, or None when autocast is off (or has no notion of
    the device: meta tensors, where torch's query raises). Used by the ops and the modules' memo."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def forced_backend():
    """The backend forced by `use_backend` (innermost wins) or EFFOPS_BACKEND, else None."""
    name = _forced.get()
    if name is not None:
        return name
    env = _env_backend() or None
    if env is not None:
        _check_name(env, "EFFOPS_BACKEND")
    return env


@contextlib.contextmanager
def use_backend(name):
    """Run every effops op inside the block on backend `name`; raises BackendError if it is unusable."""
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


def _cpp_ops():
    """torch.ops.effops_cpu when the compiled ops are loaded (they hold their own forced backend, per
    thread, and their own record_choices tally: csrc/bindings/dispatch.cpp), else None."""
    from effops import _ext
    return torch.ops.effops_cpu if _ext.load() else None


# ---------------------------------------------------------------------------------------------
# Choosing and running
# ---------------------------------------------------------------------------------------------
def select(op, device, *args, **kwargs):
    """Name of the backend that would run `op` on tensors of `device` with these arguments."""
    return _choose(op, torch.device(device).type, args, kwargs)[0]


def _choose(op, device_type, args, kwargs):
    table = _kernels.get(op)
    if not table:
        raise KeyError("no kernels registered for op %r" % op)
    forced = forced_backend()
    if forced is not None:
        ok, why = _status(forced)
        if not ok:
            raise BackendError("backend %r is forced but not usable here: %s" % (forced, why))
        if not _runs_on(forced, device_type):
            raise BackendError("backend %r is forced but cannot run on %s tensors" % (forced, device_type))
        kernel = table.get(forced)
        if kernel is None:
            raise BackendError("backend %r is forced but has no kernel for %s" % (forced, op))
        declined = kernel.supports(*args, **kwargs) if kernel.supports else None
        if declined:
            raise BackendError("backend %r is forced but declines this %s input: %s" % (forced, op, declined))
        return forced, kernel
    return _choose_automatically(op, table, device_type, args, kwargs)


def _choose_automatically(op, table, device_type, args, kwargs):
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        kernel = table.get(name)
        if kernel is None or not _usable(name):
            continue
        if kernel.supports is not None and kernel.supports(*args, **kwargs):
            continue
        if kernel.faster is not None and kernel.faster(*args, **kwargs):
            continue
        return name, kernel
    raise BackendError("no backend accepts this %s input on %s" % (op, device_type))


def dispatch(op, device, *args, **kwargs):
    """Run `op` on the chosen backend (or the one chosen_outside named). `device`: the op's tensors' device."""
    outside = _chosen_outside.get()
    if outside is not None and outside[0] == op:
        name, kernel = outside[1], _kernels[op][outside[1]]
    else:
        name, kernel = _choose(op, torch.device(device).type, args, kwargs)
    for tally in _recorders:
        tally[op][name] = tally[op].get(name, 0) + 1
    return kernel.fn(*args, **kwargs)


@contextlib.contextmanager
def chosen_outside(op, backend):
    """Inside the block, dispatch of `op` runs `backend`: the choice made by eager_route, where grad mode
    is visible. A custom op's implementation runs below the autograd key with grad mode off, so a rule
    that depends on training (dwpw_conv2d: a fused forward worth taking only with its fused backward)
    must be applied outside it; and the op then does not choose a second time."""
    token = _chosen_outside.set((op, backend))
    try:
        yield
    finally:
        _chosen_outside.reset(token)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # Parameter disables __torch_function__


def under_transform():
    """True inside a torch.func transform (vmap, grad, jvp: their tensors look plain but wrap others) or
    a forward-mode AD level (dual tensors carry tangents without requires_grad): a kernel run directly,
    or the custom op, would drop what they carry (eager_route runs the reference there)."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.forward_ad._current_level >= 0)


class Route(collections.namedtuple("Route", "name fn direct")):
    """eager_route's answer: the automatic choice `name` (kernel `fn`) for an eager call; direct: the
    public function may run it itself (fn, or for `reference` its own plain-PyTorch form); otherwise
    the custom op must run (its autograd formula is wanted): through_custom_op(route, ...)."""


def eager_route(op, device, *args, reference_autograd=False, **kwargs):
    """The Route of an eager call of `op`, or None where the custom op must choose for itself.

    Going through a torch.library custom op costs ~0.2 ms a call on this CPU (its Python dispatch and
    autograd wrapper), more than a small kernel's whole run. Where it adds nothing, the op's public
    function runs the chosen kernel itself (route.direct): no tensor argument needs a gradient, or the
    choice is `reference` and reference_autograd=True (the op's reference is differentiable by torch's
    autograd with the op's own formula; not so for int8's straight-through gradient). A call that needs
    the custom op's autograd still gets the choice made here, where grad mode is visible
    (through_custom_op). None, the custom op choosing inside: torch.compile (dynamo traces the op, not
    its kernel), torch.jit.trace (the graph keeps the op, not this call's kernel or its derived tensors),
    forced backends (tests exercise the op's dispatch through them), tensor subclasses,
    dispatch or function modes (FakeTensor, DTensor, profilers' modes see the op as one node). Under
    torch.func transforms and forward-mode AD the reference runs (where it is the op's formula).
    A direct route is recorded for record_choices() here; the others by dispatch.
    """
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the ContextVar read below
        return None
    if forced_backend() is not None or torch._C._get_tracing_state() is not None:
        return None  # (torch.jit.trace records the custom op as one node, not the kernel chosen now)
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors):
        return None
    table = _kernels.get(op)
    if not table:
        raise KeyError("no kernels registered for op %r" % op)
    if under_transform():
        # torch.func transforms and forward-mode AD batch and differentiate torch's own ops, not our
        # kernels (a custom op has no forward-mode rule: its tangents would be dropped silently). The
        # reference runs where torch's autograd of it is the op's formula; elsewhere the custom op.
        if not reference_autograd:
            return None
        name, kernel, direct = "reference", table["reference"], True
    else:
        name, kernel = _choose_automatically(op, table, device.type if isinstance(device, torch.device)
                                             else torch.device(device).type, args, kwargs)
        direct = (not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                  or (name == "reference" and reference_autograd))
    if direct:
        for tally in _recorders:
            tally[op][name] = tally[op].get(name, 0) + 1
    return Route(name, kernel.fn, direct)


def through_custom_op(route, op, custom_op, *args):
    """custom_op(*args), dispatching to the route's choice when eager_route made one (else it chooses)."""
    if route is None:
        return custom_op(*args)
    with chosen_outside(op, route.name):
        return custom_op(*args)


@contextlib.contextmanager
def record_choices():
    """Count which backend ran each op inside the block: yields {op: {backend: calls}}, complete when the
    block ends (the compiled ops' counts are added then)."""
    tally = collections.defaultdict(dict)
    cpp = _cpp_ops()
    if cpp is not None:
        cpp.record_open()
        before = _cpp_counts(cpp)
    _recorders.append(tally)
    try:
        yield tally
    finally:
        _recorders.remove(tally)
        if cpp is not None:
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
