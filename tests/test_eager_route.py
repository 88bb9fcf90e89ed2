"""The eager route (effops._backends.eager_route): an automatic eager call that needs no gradient runs
its kernel without the torch.library custom op. Each op must give exactly what its custom op gives, in
the same memory format, and keep its own autograd formula when a gradient is wanted."""
import pytest
import torch

import effops
from effops import _backends

needs_cpu = pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")


def _through_custom_op(fn, *args):
    # Forcing the backend the automatic choice took sends the call through the custom op.
    with effops.use_backend("cpu"):
        return fn(*args)


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
