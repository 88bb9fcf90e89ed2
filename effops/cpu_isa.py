"""The instruction-set level of effops' CPU kernels: which body (scalar, AVX2, AVX-512, VNNI, BF16) runs.

The compiled kernels read the CPU's level once (cpuid) and use the best body at or below it; the
environment variable EFFOPS_CPU_ISA caps it for a process (EFFOPS_DISABLE_AVX2=1, the older switch, is
``scalar``), and :func:`use_cpu_isa` caps it for a block of code (tests and benchmarks run every level
the machine has this way). Levels, lowest first::

    scalar        any CPU
    avx2          AVX2 + FMA + F16C
    avx512        AVX-512 F/BW/DQ/VL
    avx512_vnni   + AVX512-VNNI (int8 vpdpbusd)
    avx512_bf16   + AVX512-BF16 (vdpbf16ps)

torch's own kernels are not affected: to see a whole AVX2 machine from an AVX-512 one, cap torch too
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``; FBGEMM reads cpuid
itself and ignores them).
"""
import contextlib
import functools
import json
import os
import threading

import torch

from effops import _ext

LEVELS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16")
ENV = "EFFOPS_CPU_ISA"
_lock = threading.Lock()


def env_level_error():
    """The ValueError for a bad EFFOPS_CPU_ISA, or None when it is unset or names a level."""
    value = os.environ.get(ENV)
    if value is None or value == "" or value in LEVELS:
        return None
    return ValueError("%s must be one of %s, got %r" % (ENV, ", ".join(LEVELS), value))


def _require_ext():
    if not _ext.load():
        raise RuntimeError("effops CPU kernels are not loaded: %s" % _ext.reason())


def detected():
    """The highest level this CPU supports (its cpuid), whatever the cap."""
    _require_ext()
    return _ext.build_info()["cpu_isa_detected"]


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16():
    """True when torch's own bf16 GEMMs and convolutions (oneDNN) run natively here, at about 2.8x their
    fp32 speed: the CPU has AVX512-BF16 (cpuid: capping effops does not slow torch down) and torch is not
    capped below it (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA). The ops' speed rules compare against that."""
    if not _ext.load() or _ext.build_info().get("cpu_isa_detected") != "avx512_bf16":
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return onednn in ("", "ALL", "DEFAULT") or any(tag in onednn for tag in ("BF16", "AMX", "AVX10"))


def levels():
    """Every level this CPU can run, lowest first (scalar included)."""
    return LEVELS[:LEVELS.index(detected()) + 1]


def current():
    """The level the CPU kernels use now: the CPU's, lowered by the cap."""
    _require_ext()
    return torch.ops.effops_cpu.cpu_isa()


def kernel_bodies():
    """Per hot path, the body its CPU kernels run at the current level: {"int8_gemm": "avx512_vnni ...", ...}."""
    _require_ext()
    return json.loads(torch.ops.effops_cpu.kernel_bodies())


@contextlib.contextmanager
def use_cpu_isa(level):
    """Run the CPU kernels at `level` (one of LEVELS) inside the block; the previous cap comes back after.

    The cap is process-wide (the kernels read it on every call, from any thread). A level this CPU
    cannot run raises ValueError: a forced level never falls back quietly.
    """
    if level not in LEVELS:
        raise ValueError("level must be one of %s, got %r" % (", ".join(LEVELS), level))
    if level not in levels():
        raise ValueError("level %r is above this CPU's (%s): it supports %s"
                         % (level, detected(), ", ".join(levels())))
    with _lock:
        previous = torch.ops.effops_cpu.cpu_isa_cap()
        torch.ops.effops_cpu.set_cpu_isa_cap(level)
    try:
        yield level
    finally:
        with _lock:
            torch.ops.effops_cpu.set_cpu_isa_cap(previous)
