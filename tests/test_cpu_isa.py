"""The instruction-set levels of the CPU kernels: detection, the caps (EFFOPS_CPU_ISA, the older
EFFOPS_DISABLE_AVX2, effops.cpu_isa.use_cpu_isa) and the bodies they select. The kernels themselves are
checked at every level through the `backend` fixture (conftest.py)."""
import os
import subprocess
import sys

import pytest
import torch

import effops
from effops import _ext, cpu_isa

pytestmark = pytest.mark.skipif(not _ext.load(), reason="cpu kernels not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(env, code):
    caps = ("EFFOPS_CPU_ISA", "EFFOPS_DISABLE_AVX2", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # only env's own
    env = dict({k: v for k, v in os.environ.items() if k not in caps}, **env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip(), proc.stderr


def test_levels_start_at_scalar_and_end_at_the_detected_level():
    levels = cpu_isa.levels()
    assert levels[0] == "scalar" and levels[-1] == cpu_isa.detected()
    assert levels == cpu_isa.LEVELS[:len(levels)]
    assert cpu_isa.current() == cpu_isa.detected()  # the suite runs uncapped


@pytest.mark.parametrize("env, want", [({"EFFOPS_CPU_ISA": "avx2"}, "avx2"), ({"EFFOPS_CPU_ISA": "scalar"}, "scalar"),
                                       ({"EFFOPS_DISABLE_AVX2": "1"}, "scalar")])
def test_environment_caps_the_level(env, want):
    if want not in cpu_isa.levels():
        pytest.skip("this CPU lacks %s" % want)
    out, _ = _run(env, "import effops; print(effops.cpu_isa.current(), effops.cpu_isa.kernel_bodies()['int8_gemm'])")
    assert out.split()[0] == want and out.split()[1] == want


def test_a_level_above_the_cpu_in_the_environment_leaves_the_cpu_level():
    out, _ = _run({"EFFOPS_CPU_ISA": "avx512_bf16"}, "import effops; print(effops.cpu_isa.current())")
    assert out == cpu_isa.detected()


def test_an_unknown_level_in_the_environment_disables_the_cpu_backend_loudly(monkeypatch):
    out, err = _run({"EFFOPS_CPU_ISA": "avx512f"},
                    "import effops; from effops import _ext; print(effops.backends()['cpu'], _ext.reason())")
    assert out.startswith("False") and "EFFOPS_CPU_ISA must be one of" in out and "'avx512f'" in out
    assert "RuntimeWarning" in err
    monkeypatch.setenv("EFFOPS_CPU_ISA", "avx512f")
    error = cpu_isa.env_level_error()
    assert isinstance(error, ValueError) and "EFFOPS_CPU_ISA must be one of" in str(error)
    monkeypatch.setenv("EFFOPS_CPU_ISA", "avx2")
    assert cpu_isa.env_level_error() is None


def test_use_cpu_isa_caps_every_body_and_restores_the_previous_cap():
    top = cpu_isa.current()
    for level in cpu_isa.levels():
        with cpu_isa.use_cpu_isa(level):
            assert cpu_isa.current() == level
            bodies = cpu_isa.kernel_bodies()
            assert set(bodies) == {"int8_gemm", "masked_linear", "dwpw_conv2d", "inverted_residual", "adam_step"}
            for body in bodies.values():  # no body above the level runs
                assert cpu_isa.LEVELS.index(body.split()[0]) <= cpu_isa.LEVELS.index(level)
            if level == "scalar":
                assert all(b == "scalar" for b in bodies.values())
            if level in ("avx512_vnni", "avx512_bf16"):
                assert bodies["int8_gemm"].startswith("avx512_vnni")
        assert cpu_isa.current() == top
    with cpu_isa.use_cpu_isa("scalar"):
        with cpu_isa.use_cpu_isa(cpu_isa.levels()[-1]):  # nested: a higher cap inside, then back to scalar
            assert cpu_isa.current() == top
        assert cpu_isa.current() == "scalar"
    assert cpu_isa.current() == top


def test_use_cpu_isa_refuses_unknown_levels_and_levels_above_the_cpu():
    with pytest.raises(ValueError, match="level must be one of"):
        with cpu_isa.use_cpu_isa("avx512f"):
            pass
    with pytest.raises(ValueError, match="level must be one of"):
        torch.ops.effops_cpu.set_cpu_isa_cap("sse2")
    if cpu_isa.detected() != cpu_isa.LEVELS[-1]:
        with pytest.raises(ValueError, match="above this CPU"):
            with cpu_isa.use_cpu_isa(cpu_isa.LEVELS[-1]):
                pass


def test_int8_results_are_the_same_exact_integers_at_every_level():
    # The int8 bodies differ per level in their arithmetic (vpmaddubsw pairs with a sign trick, VNNI
    # with a + 128 and a column correction): all must give the exact product, -128 included.
    g = torch.Generator().manual_seed(3)
    for m, k, n in [(1, 4099, 33), (4, 64, 16), (5, 130, 70), (7, 3, 17), (301, 260, 129)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
        a[0, :7], b[:7, 0] = -128, -128
        want = (a.long() @ b.long()).int()
        for level in cpu_isa.levels():
            with cpu_isa.use_cpu_isa(level), effops.use_backend("cpu"):
                assert torch.equal(effops.ops.int8_mm(a, b), want), (m, k, n, level)


def test_native_bf16_follows_the_cpu_and_torchs_own_caps():
    code = "import effops; print(effops.cpu_isa.cpu_has_native_bf16())"
    out, _ = _run({}, code)
    assert out == str(cpu_isa.detected() == "avx512_bf16")
    for env in ({"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}):
        assert _run(env, code)[0] == "False", env  # torch's bf16 is not native when capped below it
    # capping effops alone leaves torch's bf16 as it is
    assert _run({"EFFOPS_CPU_ISA": "avx2"}, code)[0] == str(cpu_isa.detected() == "avx512_bf16")
