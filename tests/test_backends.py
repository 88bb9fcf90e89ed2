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


@pytest.fixture
def toy_op():
    """A private op with a reference kernel and a cpu kernel that cannot take odd sizes and is slower
    than the reference on sizes above 100."""
    name = "_test_toy_op"
    _backends.register_kernel(name, "reference", lambda x: ("reference", x + 1))
    _backends.register_kernel(name, "cpu", lambda x: ("cpu", x + 1),
                              supports=lambda x: "odd size" if x.numel() % 2 else None,
                              faster=lambda x: "reference faster" if x.numel() > 100 else None)
    yield name
    _backends._kernels.pop(name)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_automatic_choice_prefers_cpu_and_falls_back_when_declined(toy_op):
    even, odd = torch.zeros(4), torch.zeros(3)
    assert _backends.dispatch(toy_op, "cpu", even)[0] == "cpu"
    assert _backends.dispatch(toy_op, "cpu", odd)[0] == "reference"
    assert _backends.select(toy_op, "cpu", odd) == "reference"


def test_use_backend_forces_and_restores(toy_op):
    with effops.use_backend("reference"):
        assert _backends.dispatch(toy_op, "cpu", torch.zeros(4))[0] == "reference"
        assert _backends.forced_backend() == "reference"
    assert _backends.forced_backend() is None


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_speed_rule_applies_to_the_automatic_choice_only(toy_op):
    big = torch.zeros(102)
    assert _backends.select(toy_op, "cpu", big) == "reference"
    with effops.use_backend("cpu"):
        assert _backends.dispatch(toy_op, "cpu", big)[0] == "cpu"


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_forced_backend_that_declines_raises_instead_of_falling_back(toy_op):
    with effops.use_backend("cpu"):
        with pytest.raises(effops.BackendError, match="declines.*odd size"):
            _backends.dispatch(toy_op, "cpu", torch.zeros(3))


def test_forcing_an_unusable_backend_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("cuda is usable here")
    with pytest.raises(effops.BackendError, match="cuda.*not usable"):
        with effops.use_backend("cuda"):
            pass


def test_forcing_a_backend_without_a_kernel_for_the_op(toy_op):
    if not _backends._status("triton")[0] or not _backends._runs_on("triton", "cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    with effops.use_backend("triton"):
        with pytest.raises(effops.BackendError, match="no kernel"):
            _backends.dispatch(toy_op, "cpu", torch.zeros(4))


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="use_backend"):
        with effops.use_backend("tpu"):
            pass


def test_environment_variable_forces_a_backend(monkeypatch, toy_op):
    monkeypatch.setenv("EFFOPS_BACKEND", "reference")
    assert _backends.dispatch(toy_op, "cpu", torch.zeros(4))[0] == "reference"
    monkeypatch.setenv("EFFOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="EFFOPS_BACKEND"):
        _backends.dispatch(toy_op, "cpu", torch.zeros(4))
    monkeypatch.delenv("EFFOPS_BACKEND")  # read on every call (from os.environ's live dict): set, changed, gone
    assert _backends.forced_backend() is None


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


def test_record_choices_counts_the_backend_of_each_dispatch(toy_op):
    with _backends.record_choices() as tally:
        with effops.use_backend("reference"):
            _backends.dispatch(toy_op, "cpu", torch.zeros(4))
            _backends.dispatch(toy_op, "cpu", torch.zeros(3))
    _backends.dispatch(toy_op, "cpu", torch.zeros(4))  # outside the block: not counted
    assert tally == {toy_op: {"reference": 2}}


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_eager_route_skips_the_custom_op_only_where_nothing_depends_on_it(toy_op):
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    even = torch.zeros(4)
    name, fn, direct = _backends.eager_route(toy_op, "cpu", even)
    assert name == "cpu" and fn(even)[0] == "cpu" and direct
    assert _backends.eager_route(toy_op, "cpu", torch.zeros(3))[:3:2] == ("reference", True)
    # Forced backends and modes that must see the op as one node keep the custom op.
    with effops.use_backend("cpu"):
        assert _backends.eager_route(toy_op, "cpu", even) is None
    with TorchFunctionMode():
        assert _backends.eager_route(toy_op, "cpu", even) is None
    with TorchDispatchMode():
        assert _backends.eager_route(toy_op, "cpu", even) is None
    # A kernel's output needs the custom op's autograd formula when a gradient is wanted (not direct:
    # the custom op runs, with the choice made here, where grad mode is visible)...
    wants_grad = torch.zeros(4, requires_grad=True)
    assert _backends.eager_route(toy_op, "cpu", wants_grad)[:3:2] == ("cpu", False)
    with torch.no_grad():
        assert _backends.eager_route(toy_op, "cpu", wants_grad)[:3:2] == ("cpu", True)
    # ...while the reference's plain ops are recorded by torch's own autograd, where the op says that
    # gives its own formula (not so for a reference that rounds, like int8's straight-through gradient).
    odd_wants_grad = torch.zeros(3, requires_grad=True)
    assert _backends.eager_route(toy_op, "cpu", odd_wants_grad, reference_autograd=True)[:3:2] == ("reference", True)
    assert _backends.eager_route(toy_op, "cpu", odd_wants_grad)[:3:2] == ("reference", False)
    # A tensor subclass may carry its own dispatch: custom op. A module's Parameter is plain.
    class Tagged(torch.Tensor):
        pass
    assert _backends.eager_route(toy_op, "cpu", even.as_subclass(Tagged)) is None
    with torch.no_grad():
        assert _backends.eager_route(toy_op, "cpu", torch.nn.Parameter(even))[:3:2] == ("cpu", True)
    # A direct route is counted here; one through the custom op by dispatch, once, with the choice made here.
    with _backends.record_choices() as tally:
        _backends.eager_route(toy_op, "cpu", even)
        route = _backends.eager_route(toy_op, "cpu", wants_grad)
        assert _backends.through_custom_op(route, toy_op, lambda x: _backends.dispatch(toy_op, "cpu", x),
                                           torch.zeros(3))[0] == "cpu"  # odd: would choose reference itself
    assert tally == {toy_op: {"cpu": 2}}


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
    _backends.register_kernel("_test_guard_op", "triton", lambda *args: calls.append(len(entered)) or "ran")
    _backends.register_kernel("_test_guard_op", "cpu", lambda *args: calls.append(len(entered)) or "ran")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(2, device="cuda:1")
        assert _backends._kernels["_test_guard_op"]["triton"].fn(x, 3) == "ran"
        assert entered == [torch.device("cuda:1")] and calls == [1]
        assert _backends._kernels["_test_guard_op"]["triton"].fn([x], 3) == "ran"  # a list of tensors (adam)
        assert entered[-1] == torch.device("cuda:1")
        assert _backends._kernels["_test_guard_op"]["triton"].fn(torch.zeros(2), 3) == "ran"  # CPU: no guard
        assert _backends._kernels["_test_guard_op"]["cpu"].fn(x) == "ran"  # other backends: no guard
        assert len(entered) == 2
    finally:
        del _backends._kernels["_test_guard_op"]


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
