"""The GPU check's harness, checked on CPU: conftest's skip of tests that force a backend lacking the op's
kernel, benchmarks/gpu_check.sh's packing when parts fail or time out, and benchmarks.run's results written
after every module. (`make gpu-check` itself needs a GPU machine: docs/gpu-check.md.)"""
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOOK_TESTS = textwrap.dedent("""
    import pytest
    from effops._backends import BackendError

    @pytest.fixture(params=["cuda", "triton"])
    def backend(request):  # stands for conftest's fixture, with cuda among the backends of the test device
        return request.param

    def test_no_kernel(backend):
        raise BackendError("backend %r is forced but has no kernel for dwpw_conv2d" % backend)

    def test_no_kernel_raised_from(backend):
        try:
            raise BackendError("backend %r is forced but has no kernel for masked_linear" % backend)
        except BackendError as e:
            raise RuntimeError("compiled call failed") from e

    def test_declines(backend):
        raise BackendError("backend %r is forced but declines this dwpw_conv2d input: odd" % backend)

    def test_other_backend_named(backend):
        raise BackendError("backend 'reference' is forced but has no kernel for dwpw_conv2d")

    def test_during_handling(backend):
        try:
            raise BackendError("backend %r is forced but has no kernel for dwpw_conv2d" % backend)
        except BackendError:
            assert False, "a bug while handling it"

    def test_assertion(backend):
        assert False

    def test_without_the_fixture():
        raise BackendError("backend 'cuda' is forced but has no kernel for dwpw_conv2d")
""")


def test_only_a_missing_kernel_of_the_forced_partial_backend_is_skipped(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_hook.py").write_text(HOOK_TESTS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--junitxml", str(tmp_path / "report.xml"), "test_hook.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    import xml.etree.ElementTree as ET
    outcome = {}
    for case in ET.parse(tmp_path / "report.xml").iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        outcome[case.get("name")] = (kinds or ["passed"])[0]
        if kinds == ["skipped"]:
            assert "cuda backend has no kernel for" in case.find("skipped").get("message"), proc.stdout
    assert outcome == {
        "test_no_kernel[cuda]": "skipped", "test_no_kernel[triton]": "failure",
        "test_no_kernel_raised_from[cuda]": "skipped", "test_no_kernel_raised_from[triton]": "failure",
        "test_declines[cuda]": "failure", "test_declines[triton]": "failure",
        "test_other_backend_named[cuda]": "failure", "test_other_backend_named[triton]": "failure",
        "test_during_handling[cuda]": "failure", "test_during_handling[triton]": "failure",
        "test_assertion[cuda]": "failure", "test_assertion[triton]": "failure",
        "test_without_the_fixture": "failure",
    }, proc.stdout[-3000:] + proc.stderr[-3000:]


# A stand-in for the GPU machine's python: the build hangs (a timeout), pytest prints per-test lines and
# is stopped by the SIGINT at its limit (printing its summary, as pytest does), the benchmark finishes.
STUB_PYTHON = r"""#!/usr/bin/env bash
case "$*" in
  *"torch.version.cuda"*) printf 'torch 2.11.0 cuda 13.0 triton 3.6.0\n9.0\n\n' ;;
  *"xdist.__version__"*) exit 0 ;;  # xdist >= 3.2
  *"import "*) exit 1 ;;
  *setup.py*) echo "$TORCH_CUDA_ARCH_LIST $EFFOPS_BUILD_CUDA" > "$STUB_ARGS.build"; sleep 60 & wait ;;
  *"-m effops info"*) printf 'cuda kernels: built\nbackends:\n  reference usable\n  cuda      usable\nforced backend: none\n' ;;
  *"-m pytest"*)
    trap 'echo "FAILED tests/test_a.py::test_b - AssertionError"; echo "==== 1 failed, 1 passed, 1 skipped in 2.50s ===="; exit 2' INT
    echo "$*" > "$STUB_ARGS"
    printf '[gw0] [ 10%%] PASSED tests/test_a.py::test_a\n[gw1] [ 20%%] FAILED tests/test_a.py::test_b\n'
    printf '[gw1] [ 30%%] SKIPPED tests/test_a.py::test_c\n'
    sleep 60 & wait ;;
  *benchmarks.run*) mkdir -p "${@: -1}"; printf '### op\n| case | impl |\n|---|---|\n| a | b |\n' > "${@: -1}/results.md" ;;
  *) exit 3 ;;
esac
"""


def test_gpu_check_script_packs_every_part_when_some_fail_or_time_out(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), STUB_ARGS=str(tmp_path / "args"), GPU_CHECK_BUILD_S="2",
               GPU_CHECK_TOTAL_S="9", GPU_CHECK_BENCH_S="3", EFFOPS_COMMIT="abc123", TMPDIR=str(tmp_path))
    os.mkdir(tmp_path / "elsewhere")
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "out"], cwd=tmp_path / "elsewhere",
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the build and the tests did not pass
    out = tmp_path / "elsewhere" / "out"  # relative to where it was called from
    assert sorted(os.listdir(out)) == ["gpu-check.tgz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    for needle in ("commit abc123 (EFFOPS_COMMIT)", "torch 2.11.0 cuda 13.0 triton 3.6.0", "build: TIMEOUT",
                   "tests: TIMEOUT", "bench: ok", "cuda kernels: built", "pytest: ==== 1 failed, 1 passed",
                   "per-test lines: 1 passed 1 failed 1 skipped 0 error", "FAILED tests/test_a.py::test_b",
                   "| a | b |"):
        assert needle in summary, summary
    with tarfile.open(out / "gpu-check.tgz") as tar:
        names = {os.path.normpath(n) for n in tar.getnames()}
    assert {"machine.txt", "build.log", "info.txt", "tests.log", "bench.log", "bench/results.md",
            "summary.txt", "status.txt"} <= names
    assert (tmp_path / "args.build").read_text().split() == ["9.0a", "1"]  # this GPU's architecture only
    args = (tmp_path / "args").read_text()
    assert "-n 8 --dist worksteal" in args and "--ignore=tests/test_demo.py" in args and "--timeout" not in args
    assert "-ra" in args and "--durations=15" in args and "-v" in args and " -x" not in args
    assert not [p for p in os.listdir(tmp_path) if p.startswith("effops-gpu-check")]  # scratch folder removed


def test_bench_run_writes_results_after_each_module_and_survives_a_failing_one(tmp_path, monkeypatch):
    import types

    from benchmarks import run

    row = dict(op="toy", case="n=1", impl="ours", baseline="ours", time_ms=1.0, speedup=1.0)

    def boom(quick, device):
        # The first module's rows are on disk before the next module runs (a time limit would keep them).
        assert json.loads((tmp_path / "results.json").read_text())["rows"] == [row]
        raise RuntimeError("kernel never run before")

    monkeypatch.setattr(run.glob, "glob", lambda pattern: ["bench_a.py", "bench_b.py", "bench_c.py"])
    monkeypatch.setitem(sys.modules, "benchmarks.bench_a", types.SimpleNamespace(run=lambda quick, device: [row]))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_b", types.SimpleNamespace(run=boom))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_c",
                        types.SimpleNamespace(run=lambda quick, device: [dict(row, op="toy2")]))
    monkeypatch.setitem(sys.modules, "benchmarks.plots", types.SimpleNamespace(write_plots=lambda rows, out: None))
    monkeypatch.setattr(sys, "argv", ["run", "--quick", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="failed: b"):
        run.main()
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["op"] for r in result["rows"]] == ["toy", "toy2"]
    assert result["benchmarks"] == ["a", "c"] and result["pending"] == []
    assert "kernel never run before" in result["errors"]["b"]
    md = (tmp_path / "results.md").read_text()
    assert "### toy " in md and "### toy2 " in md and "failed: b" in md
