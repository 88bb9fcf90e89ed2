"""`python -m effops info`: the report a user pastes into a bug report."""
import os
import subprocess
import sys

import torch

import effops

from effops import _backends, _ext, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_info(**env):
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    proc = subprocess.run([sys.executable, "-m", "effops", "info"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_report_has_versions_cpu_gpu_and_every_backend_with_its_reason():
    text = info.report()
    assert "torch %s" % torch.__version__ in text and "numpy" in text and "triton" in text
    assert "vector features:" in text
    assert ("gpu 0:" in text) == torch.cuda.is_available()
    for name, (ok, why) in _backends.backend_reasons().items():
        assert "%-9s %-8s (%s)" % (name, "usable" if ok else "unusable", why) in text


def test_report_lists_the_build_options_of_the_extension():
    text = info.report()
    if not _ext.load():
        assert "not loaded: %s" % _ext.reason() in text
        return
    build = _ext.build_info()
    assert "compiler: " in text and str(build["compiler"]) in text
    assert "openmp: " in text and (build["openmp"] is None or str(build["openmp"]) in text)
    assert "cuda kernels: %s" % ("built" if build["cuda_kernels"] else "not built") in text
    assert "cpu level: %s" % effops.cpu_isa.current() in text
    for path, body in effops.cpu_isa.kernel_bodies().items():
        assert "%-14s %s" % (path, body) in text


def test_cpu_features_come_from_the_cpu_flags():
    model, present, absent = info.cpu_info()
    assert set(present).isdisjoint(absent)
    if os.path.exists("/proc/cpuinfo"):
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split()
        assert present == [f for f in info.VECTOR_FEATURES if f in flags]


def test_report_lists_kernels_per_op():
    text = info.report()
    assert "kernels per op" in text
    assert any(line.strip().startswith("masked_linear ") and "reference" in line for line in text.splitlines())


def test_command_line_without_the_extension_says_why_cpu_is_unusable():
    out = _run_info(EFFOPS_NO_EXT="1", EFFOPS_BACKEND="reference")
    assert "extension effops._C: not loaded: disabled by EFFOPS_NO_EXT=1" in out
    assert "cpu       unusable (disabled by EFFOPS_NO_EXT=1)" in out
    assert "forced backend: reference" in out
    assert "EFFOPS_NO_EXT=1" in out.splitlines()[-1]


def test_report_names_a_bad_effops_backend_instead_of_failing(monkeypatch):
    monkeypatch.setenv("EFFOPS_BACKEND", "bogus")
    text = info.report()
    assert "forced backend: INVALID" in text and "'bogus'" in text
    assert "torch %s" % torch.__version__ in text  # the rest of the report is there
