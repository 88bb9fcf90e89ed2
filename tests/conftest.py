"""Shared test setup.

TRITON_INTERPRET=1 must be set before Triton is imported (it is read when @triton.jit decorates a
kernel), so it is set here, before any test module imports effops' Triton kernels. Triton kernels then
run on CPU tensors in the interpreter; on a CUDA machine (`make gpu-check`) set EFFOPS_TEST_DEVICE=cuda
and TRITON_INTERPRET=0 to run every backend on the GPU instead.
"""
import contextlib
import os
import re

TEST_DEVICE = os.environ.get("EFFOPS_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import effops  # noqa: E402
from effops import _backends, _ext  # noqa: E402

if torch.device(TEST_DEVICE).type == "cuda":
    # cuDNN runs fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32 = True): ~10 bits of
    # mantissa, so the references and nn.Conv2d baselines computed on the GPU would miss the fp32 tolerances
    # below (1e-5) by orders of magnitude and every fp32 comparison would fail spuriously. The matmul flag
    # is already False by default; set here too so a changed default or an import cannot turn it on.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Tolerances per dtype against an fp32-or-better reference, declared once.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
# A low-precision value computed in fp32 and rounded once when stored (the optimizer kernels), against
# the same arithmetic rounded once: at most one unit in the last place apart (fp16: subnormals too).
ROUNDED_ONCE = {
    torch.bfloat16: dict(atol=0.0, rtol=2.0 ** -7),
    torch.float16: dict(atol=2.0 ** -24, rtol=2.0 ** -10),
}


def device():
    return torch.device(TEST_DEVICE)


def cpu_levels():
    """The instruction-set levels this CPU runs, lowest first (effops.cpu_isa), or () without the extension."""
    return effops.cpu_isa.levels() if _ext.load() else ()


def backends_on_device():
    """Backends that can run on the test device, each with the reason it is skipped if it cannot. The cpu
    backend comes once per instruction-set level this CPU runs (ids cpu-scalar, cpu-avx2, ...), so every
    CPU kernel test proves every body this machine can execute."""
    out = []
    for name in _backends.BACKENDS:
        ok, why = _backends.backend_reasons()[name]
        runs = _backends.runs_on(name, device().type)
        mark = [] if ok and runs else [pytest.mark.skip(reason="%s backend: %s" % (name, why if not ok else
                                                                                    "cannot run on " + TEST_DEVICE))]
        if name == "cpu" and ok and runs:
            out += [pytest.param((name, level), id="%s-%s" % (name, level)) for level in cpu_levels()]
        else:
            out.append(pytest.param((name, None), marks=mark, id=name))
    return out


@pytest.fixture(params=backends_on_device())
def backend(request):
    """Run the test body with one backend forced (the cpu backend at one instruction-set level)."""
    name, level = request.param
    with effops.use_backend(name), (effops.cpu_isa.use_cpu_isa(level) if level else contextlib.nullcontext()):
        yield name


# Backends that lack kernels for some ops on purpose: the `backend` fixture offers cuda on a CUDA test
# device, but dwpw_conv2d, masked_linear (so SeparableConv2d, SparseLinear) and parts of int8 have no
# CUDA C++ kernel, and forcing it raises BackendError("backend 'cuda' is forced but has no kernel for
# <op>"). Such a test is skipped with that reason. Only that exact error, raised while the test forces the
# same backend through the fixture, is turned into a skip; a missing kernel of any other backend still fails.
PARTIAL_BACKENDS = ("cuda",)
_NO_KERNEL = re.compile(r"backend '(\w+)' is forced but has no kernel for (\w+)")


def _missing_kernel_reason(item, exc):
    backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
    if isinstance(backend, tuple):  # (name, cpu level): the fixture below
        backend = backend[0]
    if backend not in PARTIAL_BACKENDS or "backend" not in getattr(item, "fixturenames", ()):
        return None
    while exc is not None:  # the error itself, or one it was explicitly raised from (`raise ... from`)
        if isinstance(exc, _backends.BackendError):
            m = _NO_KERNEL.fullmatch(str(exc))
            if m and m.group(1) == backend:
                return "%s backend has no kernel for %s" % (backend, m.group(2))
        exc = exc.__cause__
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except Exception as exc:
        reason = _missing_kernel_reason(item, exc)
        if reason is None:
            raise
        pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    """Drop instances that can run on no machine: the `backend` fixture forcing a backend that has no
    kernel for any op of the test module (its BACKEND_OPS). Modules without BACKEND_OPS keep them all."""
    import effops.ops  # noqa: F401  (registers every op's kernels)
    keep, drop = [], []
    for item in items:
        backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        ops = getattr(item.module, "BACKEND_OPS", None)
        if isinstance(backend, tuple) and ops and not any(backend[0] in _backends.op_backends(op) for op in ops):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    _ext.load()
    lines = ["effops backends: " + ", ".join("%s=%s" % (k, "yes" if ok else "no (%s)" % why)
                                             for k, (ok, why) in _backends.backend_reasons().items())]
    lines.append("test device: %s; TRITON_INTERPRET=%s" % (TEST_DEVICE, os.environ.get("TRITON_INTERPRET")))
    return lines


def run_at_every_cpu_level(script):
    """Run `script` (Python source) once per instruction-set level this CPU runs, scalar included, with
    the cpu kernels capped to that level (effops.cpu_isa.use_cpu_isa) and LEVEL set to its name."""
    for level in cpu_levels():
        with effops.cpu_isa.use_cpu_isa(level):
            exec(compile(script, "<script at %s>" % level, "exec"), {"__name__": "__level_script__", "LEVEL": level})


def compiled_with_freezing(model, x):
    """model(x) under torch.compile (inductor, freezing on, no_grad), compiled fresh: (the output, the
    sizes and strides inductor's generated code asserts for each op's outputs, {op: [(sizes, strides)]})."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    try:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            got, code = run_and_get_code(torch.compile(model), x)
    finally:
        torch._dynamo.reset()
    strides = {}
    for sizes, st, op in re.findall(r"assert_size_stride\(\w+, \(([\d, ]*)\), \(([\d, ]*)\), '([\w.]+)'\)",
                                    "\n".join(code)):
        strides.setdefault(op, []).append((tuple(int(v) for v in sizes.split(",") if v.strip()),
                                           tuple(int(v) for v in st.split(",") if v.strip())))
    return got, strides
