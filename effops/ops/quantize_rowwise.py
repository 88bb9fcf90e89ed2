"""effops::quantize_rowwise: symmetric per-row int8 quantization in one pass per row.

The public function checks arguments; the custom op (schema, fake kernel) dispatches to a backend.
The result is integers, so it has no gradient (Int8Linear gives its input a straight-through one).
"""
from typing import Tuple

import torch
from torch import Tensor

from effops import _backends
from effops.ops import _checks
from effops.reference import int8 as reference

_backends.register_kernel("quantize_rowwise", "reference", reference.quantize_rowwise)


def _cpu_quantize_rowwise(x):
    q, s = torch.ops.effops_cpu.quantize_rowwise(x.reshape(-1, x.shape[-1]).contiguous())
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


_backends.register_kernel("quantize_rowwise", "cpu", _cpu_quantize_rowwise)
_backends.register_kernel("quantize_rowwise", "triton", "effops.triton_kernels.int8_gemm:quantize_rowwise")


def quantize_rowwise(x):
    """(x_int8, scale): x (..., K) float -> x_int8 (..., K) int8 in [-127, 127], scale (...) fp32.

    scale = absmax(row) / 127 (1.0 for an all-zero row), x_int8 = round_half_even(x / scale); so
    x ~= x_int8 * scale[..., None] with an error of at most scale / 2 per element.
    """
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if x.shape[-1] < 1:
        raise ValueError("x's last dim (the row length) must be >= 1, got shape %s" % (tuple(x.shape),))
    route = _backends.eager_route("quantize_rowwise", x.device, x)
    if route is not None and route.direct:  # eager, no gradient needed: skip the custom op's dispatch
        return route.fn(x)
    return _backends.through_custom_op(route, "quantize_rowwise", torch.ops.effops.quantize_rowwise, x)


@torch.library.custom_op("effops::quantize_rowwise", mutates_args=())
def _quantize_rowwise(x: Tensor) -> Tuple[Tensor, Tensor]:
    return _backends.dispatch("quantize_rowwise", x.device, x)


@_quantize_rowwise.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    # Rounding has no useful derivative: the outputs do not require grad (as torch's quantize_per_tensor),
    # rather than failing at backward for want of a formula. Int8Linear gives x a straight-through one.
    ctx.mark_non_differentiable(*output)


_quantize_rowwise.register_autograd(lambda ctx, grad_q, grad_scale: None, setup_context=_setup_context)
