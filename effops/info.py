"""The environment report behind `python -m effops info`: what to paste into a bug report.

Versions (effops, python, torch, triton, numpy, CUDA), the CPU and its vector features, the GPUs with
their compute capability, how the extension was built (compiler, OpenMP, CUDA kernels), the CPU
instruction-set level and the body each hot path runs there, which backends are usable here and why not, which backends have a kernel for each op,
and the environment variables effops reads.
"""
import importlib
import importlib.util
import os
import platform

import torch

import effops
from effops import _backends, _ext

# Vector features that matter to the CPU kernels (present ones are listed, the rest as absent).
VECTOR_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                   "avx512_bf16", "amx_int8", "amx_bf16")
# _OPENMP (yyyymm of the specification) -> OpenMP version.
OPENMP_VERSIONS = {200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0", 201511: "4.5", 201811: "5.0",
                   202011: "5.1", 202111: "5.2"}
ENV_VARS = ("EFFOPS_BACKEND", "EFFOPS_NO_EXT", "EFFOPS_CPU_ISA", "EFFOPS_DISABLE_AVX2", "EFFOPS_BUILD_CUDA", "TRITON_INTERPRET",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "TORCH_CUDA_ARCH_LIST")


def _version(module):
    if importlib.util.find_spec(module) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(module)
    except PackageNotFoundError:
        return getattr(importlib.import_module(module), "__version__", "?")


def cpu_info():
    """(model name, [present vector features], [absent ones]) from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), [], []
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    if not flags:
        return model, [], []
    return model, [f for f in VECTOR_FEATURES if f in flags], [f for f in VECTOR_FEATURES if f not in flags]


def gpu_lines():
    if not torch.cuda.is_available():
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        return ["gpu: none (%s)" % why]
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append("gpu %d: %s, compute capability %d.%d, %.0f GiB, %d SMs"
                   % (i, p.name, p.major, p.minor, p.total_memory / 2 ** 30, p.multi_processor_count))
    return out


def build_lines():
    """How effops._C was built, from its build_info JSON, or why it is not loaded."""
    if not _ext.load():
        return ["extension effops._C: not loaded: %s" % _ext.reason()]
    from effops import _C
    info = _ext.build_info()
    lines = ["extension effops._C: loaded from %s" % getattr(_C, "__file__", "?")]
    compiler = str(info.get("compiler", "?"))
    if compiler[:1].isdigit():  # GCC's __VERSION__ is the bare version; Clang's names itself
        compiler = "GCC " + compiler
    openmp = info.get("openmp")
    lines.append("  compiler: %s" % compiler)
    lines.append("  openmp: %s" % ("no (kernels run single-threaded)" if openmp is None else "%s (_OPENMP %s)" % (
        OPENMP_VERSIONS.get(openmp, "?"), openmp)))
    cuda = info.get("cuda_kernels")
    lines.append("  cuda kernels: %s" % ("built" if cuda else "not built (needs torch with CUDA and nvcc, or "
                                                               "EFFOPS_BUILD_CUDA=1)"))
    lines += cpu_level_lines(info)
    for key in sorted(set(info) - {"compiler", "openmp", "cuda_kernels", "cpu_isa_detected"}):
        lines.append("  %s: %s" % (key, info[key]))
    return lines


def cpu_level_lines(info):
    """The instruction-set level of the CPU kernels, why it is that one, and the body of each hot path."""
    from effops import cpu_isa
    detected, current = info.get("cpu_isa_detected", "?"), cpu_isa.current()
    if current == detected:
        why = "this CPU's highest level"
    else:
        capped_by = [v for v in (cpu_isa.ENV, "EFFOPS_DISABLE_AVX2") if os.environ.get(v)]
        why = "capped from %s by %s" % (detected, " / ".join("%s=%s" % (v, os.environ[v]) for v in capped_by)
                                         if capped_by else "effops.cpu_isa.use_cpu_isa")
    lines = ["  cpu level: %s (%s; levels here: %s)" % (current, why, ", ".join(cpu_isa.levels()))]
    for path, body in cpu_isa.kernel_bodies().items():
        lines.append("    %-14s %s" % (path, body))
    return lines


def kernel_lines():
    """Per op, the backends with a kernel (each op's policy picks among them: docs/architecture.md)."""
    try:
        ops = importlib.import_module("effops.ops")
    except ImportError as exc:  # a broken install: say so, keep the rest of the report
        return ["kernels per op: effops.ops does not import (%s: %s)" % (type(exc).__name__, exc)]
    lines = ["kernels per op (each op's policy picks ours or torch's own ops, the reference route):"]
    for name in sorted(ops.__all__):
        lines.append("  %-30s %s" % (name, ", ".join(_backends.op_backends(name))))
    return lines


def report():
    py = "python %s (%s)" % (platform.python_version(), platform.platform())
    cuda = torch.version.cuda or "none"
    lines = ["effops %s (%s)" % (effops.__version__, os.path.dirname(os.path.abspath(effops.__file__))), py,
             "torch %s (CUDA %s, cuDNN %s)" % (torch.__version__, cuda,
                                               torch.backends.cudnn.version() if torch.cuda.is_available() else "-"),
             "triton %s" % (_version("triton") or "not installed"),
             "numpy %s" % (_version("numpy") or "not installed")]
    model, present, absent = cpu_info()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()
    lines.append("cpu: %s; %d logical cores; torch threads %d; torch CPU capability %s"
                 % (model, os.cpu_count() or 0, torch.get_num_threads(), capability))
    lines.append("  vector features: %s" % (" ".join(present) or "unknown"))
    if absent:
        lines.append("  absent: %s" % " ".join(absent))
    lines += gpu_lines()
    lines += build_lines()
    lines.append("backends:")
    for name, (ok, why) in _backends.backend_reasons().items():
        lines.append("  %-9s %-8s (%s)" % (name, "usable" if ok else "unusable", why))
    try:
        forced = _backends.forced_backend()
        lines.append("forced backend: %s" % (forced or "none (automatic)"))
    except ValueError as error:  # a bad EFFOPS_BACKEND: the report is where a user finds out
        lines.append("forced backend: INVALID (%s; every op call raises until it is fixed)" % error)
    lines += kernel_lines()
    env = ["%s=%s" % (k, os.environ[k]) for k in ENV_VARS if k in os.environ]
    lines.append("environment: %s" % (" ".join(env) or "none of the variables effops reads is set"))
    return "\n".join(lines)
