"""The backend registry: availability, automatic choice, forcing, declining."""
import os
import subprocess
import sys

import pytest
import torch

import effops
from effops import _backends, _ext


def test_backends_reports_each_name():
    status = effops.backends()
    assert set(status) == set(_backends.BACKENDS)
    assert status["reference"] is True
    assert status["cuda"] == (torch.cuda.is_available() and _ext.build_info().get("cuda_kernels", False))


@pytest.mark.skipif(os.environ.get("EFFOPS_NO_EXT") == "1", reason="pure-Python install requested")
def test_extension_is_built_and_loaded():
    # `make test` builds the extension: a missing build must fail here, not quietly skip every kernel.
    assert _ext.load(), _ext.reason()
    assert effops.backends()["cpu"]
    assert _ext.build_info()["cpu_isa_detected"] in effops.cpu_isa.LEVELS


def test_forcing_an_unusable_backend_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    with pytest.raises(effops.BackendError, match="cuda.*not usable"):
        with effops.use_backend("cuda"):
            pass


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="use_backend"):
        with effops.use_backend("tpu"):
            pass


def test_import_is_fast_and_does_not_import_triton():
    code = ("import time, sys; import torch; t = time.perf_counter(); import effops; "
            "print(time.perf_counter() - t, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, TRITON_INTERPRET="0")).stdout.split()
    assert float(out[0]) < 0.5, "import effops (after torch) took %s s" % out[0]
    assert out[1] == "False"


def test_info_report_names_backends_and_versions():
    from effops.info import report
    text = report()
    for needle in ("torch " + torch.__version__, "backends:", "reference", "triton"):
        assert needle in text


def test_triton_kernels_run_with_their_tensors_cuda_device_current(monkeypatch):
    # Triton launches on the current CUDA device: a kernel given cuda:1 tensors must run with cuda:1
    # current. Checked without a GPU: fake CUDA tensors and a recording stand-in for torch.cuda.device.
    from torch._subclasses.fake_tensor import FakeTensorMode
    entered = []

    class _Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", _Device)
    calls = []
    launch = _backends.on_tensors_device(lambda *args: calls.append(len(entered)) or "ran")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, device="cuda:1")
    assert launch(x, 3) == "ran"
    assert entered == [torch.device("cuda:1")] and calls == [1]
    assert launch([x], 3) == "ran"  # a list of tensors (adam)
    assert entered[-1] == torch.device("cuda:1")
    assert launch(torch.zeros(2), 3) == "ran"  # CPU: no guard
    assert len(entered) == 2


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_use_backend_sets_the_compiled_ops_forced_backend_per_thread():
    import threading
    cpp = torch.ops.effops_cpu
    seen = {}
    with effops.use_backend("cpu"):
        with effops.use_backend("reference"):
            seen["inner"] = cpp.set_forced_backend("reference")  # returns what was set: the inner one
        seen["restored"] = cpp.set_forced_backend("cpu")
        other = threading.Thread(target=lambda: seen.update(thread=cpp.set_forced_backend("")))
        other.start()
        other.join()
    seen["after"] = cpp.set_forced_backend("")
    assert seen == {"inner": "reference", "restored": "cpu", "thread": "", "after": ""}
    with pytest.raises(ValueError, match="backend must be one of"):
        cpp.set_forced_backend("gpu")


# Forcing, as the C++ ops apply it (csrc/bindings/dispatch.cpp), through dwpw_conv2d.
def _dwpw_args():
    return torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_compiled_ops_follow_the_forced_backend_and_the_environment(monkeypatch):
    args = _dwpw_args()
    with _backends.record_choices() as tally:
        effops.ops.dwpw_conv2d(*args)
        with effops.use_backend("reference"):
            effops.ops.dwpw_conv2d(*args)
        monkeypatch.setenv("EFFOPS_BACKEND", "reference")
        effops.ops.dwpw_conv2d(*args)
        with effops.use_backend("cpu"):  # use_backend wins over the environment
            effops.ops.dwpw_conv2d(*args)
    assert tally == {"dwpw_conv2d": {"cpu": 2, "reference": 2}}
    monkeypatch.setenv("EFFOPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="EFFOPS_BACKEND must be one of"):
        effops.ops.dwpw_conv2d(*args)


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_compiled_graphs_call_the_ops_not_the_reference():
    # A graph of torch.compile holds effops' ops (their kernels run, and are recorded), not the Python
    # reference the functions use inside torch.func transforms.
    torch._dynamo.reset()
    x = torch.randn(3, 24)
    lin = effops.nn.Int8Linear.from_linear(torch.nn.Linear(24, 16), mode="dynamic")

    def fn(x, *dwpw):
        q, s = effops.ops.quantize_rowwise(x)
        return q, s, lin(x), effops.ops.dwpw_conv2d(*dwpw, activation="relu6")

    from torch._functorch.aot_autograd import aot_module_simplified
    graph_ops = set()

    def backend(gm, example_inputs):  # aot_eager, noting the ops of the graph it runs
        def forward(g, _):
            graph_ops.update(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward)

    args = _dwpw_args()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with effops.use_backend("cpu"):
        compiled(x, *args)  # traced under "cpu": dwpw_conv2d's choice is made while tracing
        with _backends.record_choices() as tally:
            got = compiled(x, *args)
    assert tally == {"quantize_rowwise": {"cpu": 1}, "int8_linear_dynamic": {"cpu": 1}}
    assert "effops._dwpw_conv2d.default" in graph_ops  # the fused kernel's op, not the reference's convolutions
    assert "aten.convolution.default" not in graph_ops
    for g, want in zip(got, fn(x, *args)):
        torch.testing.assert_close(g, want)


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_a_forced_backend_that_cannot_run_raises_never_falls_back(monkeypatch):
    args = _dwpw_args()
    monkeypatch.setenv("EFFOPS_BACKEND", "cuda")  # (use_backend itself refuses an unusable backend)
    with pytest.raises(effops.BackendError, match="backend 'cuda' is forced but cannot run on cpu tensors"):
        effops.ops.dwpw_conv2d(*args)
    monkeypatch.delenv("EFFOPS_BACKEND")
    with effops.use_backend("cpu"):
        with pytest.raises(effops.BackendError, match="declines this dwpw_conv2d input: kernel larger than 7x7"):
            effops.ops.dwpw_conv2d(torch.randn(1, 4, 12, 12), torch.randn(4, 1, 9, 9), args[2])


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_a_forced_backend_holds_on_its_own_thread_only():
    import threading
    args = _dwpw_args()
    with _backends.record_choices() as tally:
        with effops.use_backend("reference"):
            other = threading.Thread(target=lambda: effops.ops.dwpw_conv2d(*args))
            other.start()
            other.join()
            effops.ops.dwpw_conv2d(*args)
    assert tally == {"dwpw_conv2d": {"cpu": 1, "reference": 1}}


@pytest.mark.skipif(not _ext.load(), reason="compiled ops not built")
def test_a_backward_takes_the_backend_forced_at_its_forward():
    # torch runs a CUDA tensor's backward on a device thread of the autograd engine, where use_backend()
    # around the forward would not reach; here the backward runs on another thread the same way.
    import threading
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = [torch.randn(24, 8, 1, 1, generator=g), torch.randn(24, generator=g), torch.randn(24, 1, 3, 3, generator=g),
               torch.randn(24, generator=g), torch.randn(8, 24, 1, 1, generator=g), torch.randn(8, generator=g)]
    weights = [w.requires_grad_() for w in weights]

    def forward():
        return effops.ops.inverted_residual(x, *weights, 1, 1, "relu6", True)

    with effops.use_backend("reference"):
        y = forward()
    with _backends.record_choices() as tally:
        other = threading.Thread(target=lambda: y.sum().backward())
        other.start()
        other.join()
    assert tally == {"inverted_residual_backward": {"reference": 1}}
    with effops.use_backend("reference"):
        y = forward()
    with _backends.record_choices() as tally, effops.use_backend("cpu"):  # the backward's own thread forces: it wins
        y.sum().backward()
    assert tally == {"inverted_residual_backward": {"cpu": 1}}
