"""A module's memo of its last few eager calls (and a functional op's memo of its recent ones): the checked,
chosen way to run it, reused while nothing it depends on changed.

The op layer's per-call work (argument checks, the backend choice with its size and density rules,
building the call) costs 30-100 microseconds in Python: as much as a whole small layer's arithmetic.
A module calls the same op with the same parameters over and over, so after one full call it keeps
(for its last CallPlan.RECENT keys) the runner the op built (a function of x and the module's tensors, holding the chosen kernel and what
the op derived from the tensors whose versions the key holds) under a key of everything the checks and
the choice read:

* x: its type, shape, strides, dtype, device and requires_grad;
* grad mode and inference mode;
* each of the module's tensors: the object itself (the memo holds it, so its id cannot be reused),
  its data pointer, shape, strides, dtype, device and requires_grad; and for the tensors whose
  values steer the choice or a derived cache (a mask's density, int8 weights' correction) their
  version counter, which every in-place write moves (an inference tensor has none, and one in shared
  CPU memory may be written by another process: no memo then);
* the module's own settings that reach the op (stride, activation, mode...), passed as `extra`;
* the registry's generation (a kernel registered later changes the choice);
* under torch.autocast, its dtype: the runner is then given x and the tensors cast as the op casts
  them (the module's `cast`, the op's autocast_args), per call, since the weights change.

No memo is made or used where the op must see the call itself: under torch.compile or torch.jit.trace, a forced
backend, a dispatch or function mode, a torch.func transform or forward-mode AD, a tensor subclass, a
sparse or meta x, or while record_choices() is counting. The values of weights that do not steer the
choice (a Linear weight during training) are not in the key: the runner is given them at each call.

A functional op (`effops.ops.masked_linear(x, w, mask)` in a user's own module) has no module to keep
a memo on: it keeps a FunctionMemo of its recent calls instead, under the same key plus the call's
non-tensor arguments with their types (stride=True must still raise), holding the tensors only
weakly (an entry goes when any of its tensors dies, so neither a dead weight's id nor its derived
caches live on; a runner must therefore not hold the tensors it is given), with the versions of the
value-steering tensors kept in the entry (an in-place edit replaces it, not adds one).

Not seen by the key, as with torch's own caches: writes through `.data` (a tensor whose version counter
is not the parameter's) and edits of the ops' private tuning constants (`_CPU_LIMITS` and the like,
read when a memo is built: a module moved with `.to()` or reloaded builds a new one).
"""
import weakref

import torch

from effops import _backends


class CallPlan:
    """One module's memo: its RECENT last calls' (key, runner, tensors), most recent first, as one tuple
    written and read in one step, so that threads calling the module at once never pair one call's key
    with another's runner. A few, not one: a server's mixed batch sizes (or train and eval steps
    taking turns) would rebuild on every call. Dropped on copy and pickle (a runner holds closures over
    the module's tensors: a copy rebuilds its own on first use)."""

    __slots__ = ("recent",)
    RECENT = 4

    def __init__(self):
        self.recent = ()

    def __reduce__(self):
        return CallPlan, ()


class RemembersCalls:
    """Mixin of the modules that keep a memo: .to(), .cuda(), .half() and the like (Module._apply) and
    load_state_dict drop it, so the memo does not keep the tensors they replaced alive until the next call."""

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_call_plan", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_call_plan", None)  # Int8Linear repacks into new buffers; assign=True replaces all
        return super()._load_from_state_dict(*args, **kwargs)


_X_FIELDS = 10  # eager_key's fields before the tensors


def eager_key(x, tensors, versioned=(), extra=()):
    """The memo key of a call on x with the module's `tensors` (versioned: indices into tensors whose
    version counts), or None where no memo may stand in for the op (see the module docstring).
    One flat list, built in one pass: it runs on every call, where each microsecond shows."""
    if torch.compiler.is_compiling():  # first: dynamo traces the op, never the memo
        return None
    if type(x) is not torch.Tensor or _backends._recorders or _backends.forced_backend() is not None:
        return None
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace: a memo's derived tensors would be
        return None                               # frozen into the graph as constants
    if torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack():
        return None
    if _backends.under_transform():  # torch.func's wrapped tensors have no data pointer to key on
        return None
    device = x.device
    device_type = device.type
    if x.layout is not torch.strided or device_type not in _backends.AUTO_ORDER:
        return None  # sparse or meta x: the op's own checks answer (no strides to key on)
    key = [x.shape, x.stride(), x.dtype, device, x.requires_grad, torch.is_grad_enabled(),
           torch.is_inference_mode_enabled(), _backends.autocast_dtype(device_type), _backends.generation(), extra]
    # (the first _X_FIELDS describe x, the modes and settings; the rest the tensors)
    for i, t in enumerate(tensors):
        if t is None:
            key.append(None)
            continue
        if type(t) not in _backends._PLAIN_TENSOR_TYPES:
            return None
        key += (id(t), t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
        if i in versioned:
            if t.is_inference() or _backends.shared_cpu(t):  # no version counter, or not the only writer's
                return None
            key.append(t._version)
    return key


def call(module, x, tensors, build, run_op, cast, versioned=(), extra=()):
    """The module's op on x: through its memo when the key matches, else build() (the op's checks and
    choice, returning a runner of (x, *tensors) or None) and remember the runner; run_op() where no
    runner can be made (the op must see the call). cast(x, tensors, dtype): the op's own autocast casts."""
    key = eager_key(x, tensors, versioned, extra)
    if key is None:
        return run_op()
    plan = module.__dict__.get("_call_plan")
    if plan is None:
        plan = module.__dict__["_call_plan"] = CallPlan()
    recent = plan.recent
    for i, entry in enumerate(recent):
        if key == entry[0]:
            if i:  # to the front
                plan.recent = (entry,) + recent[:i] + recent[i + 1:]
            return _run(entry[1], x, tensors, cast)
    run = build()
    if run is None:
        return run_op()
    # Entries kept only for the same tensors at the same versions (other shapes or modes of x): one for
    # a replaced weight or an edited mask would keep the old tensors and what the runner derived from
    # them (a dense W * mask) alive. (tensors: their ids in the key stay theirs while the entry lives)
    tail = key[_X_FIELDS:]
    plan.recent = ((key, run, tensors),) + tuple(e for e in recent if e[0][_X_FIELDS:] == tail)[:CallPlan.RECENT - 1]
    return _run(run, x, tensors, cast)


def _run(run, x, tensors, cast):
    dtype = _backends.autocast_dtype(x.device.type)
    if dtype is not None and not isinstance(run, CastsItself):
        x, tensors = cast(x, tensors, dtype)
    return run(x, *tensors)


class CastsItself:
    """A runner the memo gives the module's tensors uncast under autocast: plain PyTorch, whose own ops
    (linear, conv2d) autocast in C++ to the values the op's Python casts would give."""

    __slots__ = ("run",)

    def __init__(self, run):
        self.run = run

    def __call__(self, *args):
        return self.run(*args)


class FunctionMemo:
    """A functional op's memo: runners of recent calls by key, least recently used first. An entry holds
    its tensors weakly and is dropped when any of them dies (so the ids in its key always name live
    tensors); past `limit` entries the least recently used goes. The versions of the tensors whose
    values steer the choice are kept in the entry, not the key: an in-place edit replaces the entry
    rather than adding one per version.

    Threads may call the op at once, and the weakref callbacks run in whichever thread drops a tensor
    (inside any line, under the garbage collector): every change of `entries` is one dict operation
    that tolerates a missing key, never a look-then-act pair, and no lock is taken (a callback taking
    it inside the locked region of its own thread would deadlock)."""

    __slots__ = ("entries", "limit", "__weakref__")

    def __init__(self, limit=1024):
        self.entries, self.limit = {}, limit  # a plain dict keeps insertion order: the first is the oldest

    def __reduce__(self):
        return FunctionMemo, (self.limit,)


class _Entry:
    __slots__ = ("run", "refs", "versions")


def call_function(memo, x, tensors, settings, build, run_op, cast, versioned=()):
    """A functional op on x and `tensors` with its non-tensor `settings`: through `memo` when a call with
    the same key ran before, else build() (the op's checks and choice, returning a runner of
    (x, *tensors) or None) and remember the runner; run_op() where no runner can be made. As `call`.
    A runner must not hold the tensors themselves (they are held weakly), only what it derived."""
    key = eager_key(x, tensors, (), _typed(settings))
    if key is None or torch.__future__.get_swap_module_params_on_conversion():
        return run_op()  # (the entry's weak references would make torch.utils.swap_tensors refuse them)
    versions = []
    for i in versioned:
        t = tensors[i]
        if t is not None:
            if t.is_inference() or _backends.shared_cpu(t):  # no version counter, or another process writes it:
                return run_op()                     # an edit could not be seen
            versions.append(t._version)
    try:
        key = tuple(key)
        entry = memo.entries.get(key)
    except TypeError:  # a setting that cannot be hashed (the op's checks will name it)
        return run_op()
    if entry is not None and entry.versions == versions and all(
            ref() is t for ref, t in zip(entry.refs, tensors) if t is not None):
        if memo.entries.pop(key, None) is not None:  # to the end: the most recently used (unless another
            memo.entries[key] = entry                  # thread or a dying tensor removed it meanwhile)
        return _run(entry.run, x, tensors, cast)
    run = build()
    if run is None:
        return run_op()
    entry = _Entry()
    entry.run, entry.versions = run, versions
    memo_ref = weakref.ref(memo)  # the callbacks hold neither the memo nor the entry (no cycles)

    def forget(_, key=key):
        owner = memo_ref()
        if owner is not None:
            owner.entries.pop(key, None)  # an entry under this key holds the dying tensor

    entry.refs = tuple(None if t is None else weakref.ref(t, forget) for t in tensors)
    entries = memo.entries
    entries.pop(key, None)  # a replaced entry (new versions) moves to the end too
    entries[key] = entry
    while len(entries) > memo.limit:
        try:
            entries.pop(next(iter(entries)), None)
        except (RuntimeError, StopIteration):  # changed by another thread between iter() and next()
            pass
    return _run(run, x, tensors, cast)


def _typed(values):
    """Settings as a key that tells their types apart (1, 1.0 and True compare equal in Python), lists
    as tuples."""
    return tuple((type(v), _typed(v)) if isinstance(v, (tuple, list)) else (type(v), v) for v in values)
