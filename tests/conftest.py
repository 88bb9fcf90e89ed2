"""Shared test setup.

TRITON_INTERPRET=1 must be set before Triton is imported (it is read when @triton.jit decorates a
kernel), so it is set here, before any test module imports effops' Triton kernels. Triton kernels then
run on CPU tensors in the interpreter; on a CUDA machine (`make gpu-check`) set EFFOPS_TEST_DEVICE=cuda
and TRITON_INTERPRET=0 to run every backend on the GPU instead.
"""
import os

TEST_DEVICE = os.environ.get("EFFOPS_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import effops  # noqa: E402
from effops import _backends, _ext  # noqa: E402

# Tolerances per dtype against an fp32-or-better reference, declared once.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def device():
    return torch.device(TEST_DEVICE)


def backends_on_device():
    """Backends that can run on the test device, each with the reason it is skipped if it cannot."""
    out = []
    for name in _backends.BACKENDS:
        ok, why = _backends.backend_reasons()[name]
        runs = _backends._runs_on(name, device().type)
        mark = [] if ok and runs else [pytest.mark.skip(reason="%s backend: %s" % (name, why if not ok else
                                                                                    "cannot run on " + TEST_DEVICE))]
        out.append(pytest.param(name, marks=mark, id=name))
    return out


@pytest.fixture(params=backends_on_device())
def backend(request):
    """Run the test body with one backend forced."""
    with effops.use_backend(request.param):
        yield request.param


def pytest_report_header(config):
    _ext.load()
    lines = ["effops backends: " + ", ".join("%s=%s" % (k, "yes" if ok else "no (%s)" % why)
                                             for k, (ok, why) in _backends.backend_reasons().items())]
    lines.append("test device: %s; TRITON_INTERPRET=%s" % (TEST_DEVICE, os.environ.get("TRITON_INTERPRET")))
    return lines


def run_scalar_path(script, timeout=240):
    """Run `script` in a fresh Python with EFFOPS_DISABLE_AVX2=1, so the cpu kernels take their scalar
    bodies (the variable is read once per process), on the cpu test device, with this checkout on the
    path. Asserts that it exits 0 and prints "scalar ok"."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, EFFOPS_DISABLE_AVX2="1", EFFOPS_TEST_DEVICE="cpu")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and "scalar ok" in proc.stdout, proc.stderr[-3000:]
