"""Loading the compiled kernels (effops._C), tolerantly.

A missing or broken build is not an error: the `cpu`/`cuda` backends report themselves unusable with
the reason, a warning names it once, and the remaining backends run.
"""
import importlib.util
import json
import os
import threading
import warnings

_state = {"loaded": None, "reason": None, "info": {}}
_lock = threading.Lock()  # two threads' first calls: one imports, the other waits (find_spec raced)


def load():
    """Import effops._C once. Returns True when the kernels are registered with torch."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        return _load_locked()


def _load_locked():
    if _state["loaded"] is not None:
        return _state["loaded"]
    if os.environ.get("EFFOPS_NO_EXT") == "1":
        _state.update(loaded=False, reason="disabled by EFFOPS_NO_EXT=1")
        return False
    from effops.cpu_isa import env_level_error
    bad_level = env_level_error()
    if bad_level is not None:  # the kernels would ignore it: say so rather than run at another level
        _state.update(loaded=False, reason=str(bad_level))
        warnings.warn("effops: %s; the cpu backend is unusable until it is fixed" % bad_level, RuntimeWarning,
                      stacklevel=2)
        return False
    if importlib.util.find_spec("effops._C") is None:
        reason = "extension effops._C not built (pure-Python install, or run `make build`)"
        _state.update(loaded=False, reason=reason)
        warnings.warn("effops: %s; using the reference backend" % reason, RuntimeWarning, stacklevel=2)
        return False
    try:
        import torch
        from effops import _C  # noqa: F401  (its import registers torch.ops.effops_cpu.*)
        _state["info"] = json.loads(torch.ops.effops_cpu.build_info())
        _state.update(loaded=True, reason=None)
    except Exception as exc:  # ImportError, undefined symbols from a stale build, ...
        reason = "extension effops._C not loaded (%s: %s)" % (type(exc).__name__, exc)
        _state.update(loaded=False, reason=reason)
        warnings.warn("effops: %s; using the remaining backends" % reason, RuntimeWarning, stacklevel=2)
    return _state["loaded"]


def reason():
    """Why the extension is not loaded (None when it is)."""
    load()
    return _state["reason"]


def build_info():
    """The build report of the loaded extension: {"cuda_kernels": bool, "cpu_isa_detected": ...}."""
    load()
    return dict(_state["info"])
