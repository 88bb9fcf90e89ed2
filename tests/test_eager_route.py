"""The eager route (effops._backends.eager_route): an automatic eager call that needs no gradient runs
its kernel without the torch.library custom op. Each op must give exactly what its custom op gives, in
the same memory format, and keep its own autograd formula when a gradient is wanted."""
import pytest
import torch
from torch import nn

import effops
from effops import _backends
from effops.ops import quantize_rowwise
from tests.conftest import TOL

needs_cpu = pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")


def _through_custom_op(fn, *args):
    # Forcing the backend the automatic choice took sends the call through the custom op.
    with effops.use_backend("cpu"):
        return fn(*args)


@needs_cpu
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_int8_linear_inference_matches_the_custom_op(mode):
    torch.manual_seed(0)
    layer = effops.nn.Int8Linear.from_linear(nn.Linear(67, 33), mode=mode)
    x = torch.randn(2, 5, 67)
    with torch.no_grad(), _backends.record_choices() as tally:
        y = layer(x)
    assert tally == {"int8_linear_dynamic": {"cpu": 1}}
    with torch.no_grad():
        assert torch.equal(y, _through_custom_op(layer, x))
    q, s = quantize_rowwise(x)
    q2, s2 = _through_custom_op(quantize_rowwise, x)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@needs_cpu
def test_int8_linear_gradient_is_straight_through_not_the_roundings_zero():
    # The reference rounds x, whose autograd gradient would be zero: a call wanting x's gradient must
    # go through the custom op (straight-through: grad_x = grad_y @ dequantized W).
    torch.manual_seed(0)
    layer = effops.nn.Int8Linear.from_linear(nn.Linear(67, 33))
    x = torch.randn(4, 67, requires_grad=True)
    y = layer(x)
    assert "effops_int8_linear_dynamic" in y.grad_fn.name()
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 33) @ layer.dequantized_weight(), **TOL[torch.float32])


@needs_cpu
def test_quantize_rowwise_keeps_the_custom_op_under_modes():
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        quantize_rowwise(torch.randn(3, 16))
    assert any("effops.quantize_rowwise" in name for name in seen)


@needs_cpu
def test_forward_mode_ad_gets_the_references_tangents():
    # Dual tensors carry tangents without requires_grad: a kernel run directly (or the custom op, which
    # has no forward-mode rule) would drop them silently; the reference's torch ops carry them.
    import torch.autograd.forward_ad as fwAD
    from effops.ops import masked_linear
    torch.manual_seed(0)
    mask = (torch.rand(16, 8) < 0.1).repeat_interleave(32, 0).repeat_interleave(32, 1)
    x, t, w = torch.randn(64, 256), torch.randn(64, 256), torch.randn(512, 256)
    with torch.no_grad(), _backends.record_choices() as tally:
        masked_linear(x, w, mask)
    assert tally == {"masked_linear": {"cpu": 1}}  # without the dual level
    with fwAD.dual_level():
        out = masked_linear(fwAD.make_dual(x, t), w, mask)
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, torch.nn.functional.linear(t, w * mask), atol=1e-4, rtol=1e-4)
