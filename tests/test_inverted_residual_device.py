"""effops.ops.inverted_residual on the test device's tensors (CPU here; CUDA under `make gpu-check`, where the
forward is Triton and the backward recomputes per chunk with its depthwise middle in Triton, the 1x1 convolutions'
and squeeze-excitation's backward through torch's CUDA ops): a training step's forward and gradients against the
float64 reference, the routes each records, and what each device registers."""
import contextlib

import pytest
import torch

import effops
from effops import _ext
from effops.reference import inverted_residual as reference
from conftest import TOL, device
from test_inverted_residual_se import SE_CASES, call_op, make_se

needs_ext = pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason())
needs_triton = pytest.mark.skipif(not effops.backends()["triton"], reason="triton backend not usable here")

# SE_CASES[0] (MobileNetV3-like, residual) and [1] (EfficientNet-like, stride 2, sigmoid gate)
DEVICE_CASES = [(SE_CASES[0], True), (SE_CASES[0], False), (SE_CASES[1], True)]
DEVICE_IDS = ["mnv3_se", "mnv3_plain", "effnet_se"]


def on_device(case, with_se):
    tensors, kw = make_se(*case)
    if not with_se:
        tensors, kw = tensors[:7], {k: v for k, v in kw.items() if not k.startswith("se_")}
    leaves = [t.detach().to(device()).requires_grad_() for t in tensors]
    leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return leaves, kw


def reference_grads(leaves, kw, gy):
    t64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    se = t64[7:] + [kw["se_activation"], kw["se_gate"]] if len(t64) > 7 else []
    want = reference.inverted_residual(*t64[:7], [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                       kw["residual"], *se)
    return want, torch.autograd.grad(want, t64, gy.cpu().double())


# The backward's route on the test device, automatic or forced. CPU automatic: these small blocks train as
# torch's ops under its autograd (no backward op). CUDA forced: not asserted, because autograd runs a CUDA backward
# on its device thread, which a use_backend() block on this thread does not reach (it is thread-local).
BACKWARD_ROUTE = {("cuda", None): "triton", ("cpu", "reference"): "reference"}


@needs_ext
@pytest.mark.parametrize("forced", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("case, with_se", DEVICE_CASES, ids=DEVICE_IDS)
def test_training_step_on_the_test_device(forced, case, with_se):
    leaves, kw = on_device(case, with_se)
    with effops.use_backend(forced) if forced else contextlib.nullcontext(), \
            effops._backends.record_choices() as tally:
        y = call_op(leaves, kw) if with_se else effops.ops.inverted_residual(*leaves, **kw)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, gy)
    route = BACKWARD_ROUTE.get((device().type, forced))
    if route is not None:
        assert tally["inverted_residual_backward"] == {route: 1}, dict(tally)
    want, wants = reference_grads(leaves, kw, gy)
    assert y.device == leaves[0].device and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu(), want.float(), **TOL[torch.float32])
    for g, w in zip(grads, wants):
        assert g.device == leaves[0].device
        torch.testing.assert_close(g.cpu(), w.float(), atol=3e-5 * max(1.0, w.abs().max().item()), rtol=1e-4)


@needs_ext
def test_both_ops_have_a_cuda_kernel_from_the_extension():
    """The CUDA implementations are C++ (the forward's route policy, the recomputing backward): a training step
    on CUDA tensors finds a backward kernel. Checked through the dispatcher, so it holds on CPU-only torch too."""
    for op in ("effops::inverted_residual", "effops::inverted_residual_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@needs_ext
@needs_triton
@pytest.mark.skipif(device().type != "cpu", reason="Triton's interpreter on CPU tensors")
def test_forced_triton_trains_on_its_kernels():
    """With "triton" forced the forward and the backward's depthwise middle run Triton's kernels (the interpreter
    here), recorded as such, and give the reference's gradients."""
    leaves, kw = on_device(SE_CASES[1], False)
    with effops.use_backend("triton"), effops._backends.record_choices() as tally:
        y = effops.ops.inverted_residual(*leaves, **kw)
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, gy)
    assert dict(tally) == {"inverted_residual": {"triton": 1}, "inverted_residual_backward": {"triton": 1}}, \
        dict(tally)
    for g, w in zip(grads, reference_grads(leaves, kw, gy)[1]):
        torch.testing.assert_close(g, w.float(), atol=3e-5 * max(1.0, w.abs().max().item()), rtol=1e-4)


@needs_ext
@pytest.mark.skipif(device().type != "cuda" or not effops.backends()["cuda"],
                    reason="the cuda backend on CUDA tensors")
def test_forced_cuda_has_no_backward_kernel():
    """No CUDA C++ kernel exists for the backward: forced "cuda", the op names what is missing (called on this
    thread: a backward through autograd would run on its device thread, outside the forcing)."""
    leaves, kw = on_device(SE_CASES[1], False)
    x, ew, eb, dw, db, pw, pb = [t.detach() for t in leaves]
    y = effops.ops.inverted_residual(x, ew, eb, dw, db, pw, pb, **kw)
    with effops.use_backend("cuda"), pytest.raises(
            NotImplementedError, match=r"^backend 'cuda' is forced but has no kernel for inverted_residual_backward"):
        torch.ops.effops.inverted_residual_backward(
            torch.ones_like(y), x, ew, eb, dw, db, pw, pb, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
            kw["residual"], None, None, None, None, "relu", "sigmoid", [True] * 11)
