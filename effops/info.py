"""The environment report behind `python -m effops info`."""
import importlib.util
import platform

import torch

import effops
from effops import _backends, _ext


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(l.split(":", 1)[1].split() for l in f if l.startswith("flags"))
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    except (OSError, StopIteration):
        return platform.processor() or platform.machine(), []
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return model, [f for f in wanted if f in flags]


def report():
    lines = ["effops %s" % effops.__version__,
             "python %s, torch %s (CUDA %s)" % (platform.python_version(), torch.__version__, torch.version.cuda)]
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version
        triton_version = version("triton")
    lines.append("triton %s" % (triton_version or "not installed"))
    model, flags = _cpu_flags()
    lines.append("cpu: %s; threads %d; vector features: %s" % (model, torch.get_num_threads(), " ".join(flags) or "?"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append("gpu %d: %s, compute capability %d.%d" % (i, torch.cuda.get_device_name(i), *cap))
    else:
        lines.append("gpu: none visible to torch")
    lines.append("extension effops._C: %s" % ("loaded" if _ext.load() else _ext.reason()))
    for key, value in _ext.build_info().items():
        lines.append("  build %s: %s" % (key, value))
    lines.append("backends:")
    for name, (ok, why) in _backends.backend_reasons().items():
        lines.append("  %-9s %s  (%s)" % (name, "usable" if ok else "unusable", why))
    forced = _backends.forced_backend()
    lines.append("forced backend: %s" % (forced or "none (automatic)"))
    return "\n".join(lines)
