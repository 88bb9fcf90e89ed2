"""effops::masked_linear: F.linear(x, weight * mask, bias) touching only kept weights.

The public function checks arguments and applies autocast; the custom op (schema, fake kernel,
autograd) dispatches to a backend. The weight gradient is masked: pruned weights stay pruned.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from effops import _backends
from effops.ops import _checks
from effops.reference import masked_linear as reference

_backends.register_kernel("masked_linear", "reference", reference.masked_linear)
_backends.register_kernel("masked_linear_backward", "reference", reference.masked_linear_backward)


def masked_linear(x, weight, mask, bias=None):
    """y = x @ (weight * mask)^T + bias for x of shape (..., in_features).

    weight: (out_features, in_features); mask: same shape, bool or 0/1 in weight's dtype;
    bias: (out_features,) or None. Output has x's leading dims and dtype (autocast's under autocast).
    """
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    _checks.tensor("mask", mask, device=x.device)
    _checks.shape("mask", mask, weight.shape)
    if mask.dtype not in (torch.bool, weight.dtype):
        raise TypeError("mask must be bool or have weight's dtype %s, got %s" % (weight.dtype, mask.dtype))
    if x.shape[-1] != weight.shape[1]:
        raise ValueError("x's last dim must equal weight's in_features %d, got shape %s"
                         % (weight.shape[1], tuple(x.shape)))
    _checks.optional_tensor("bias", bias, device=x.device)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],))
    cast = _checks.autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    _checks.same_dtype("weight", weight, x.dtype)
    _checks.same_dtype("bias", bias, x.dtype)
    return torch.ops.effops.masked_linear(x, weight, mask, bias)


@torch.library.custom_op("effops::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _backends.dispatch("masked_linear", x.device, x, weight, mask, bias)


@_masked_linear.register_fake
def _(x, weight, mask, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("effops::masked_linear_backward", mutates_args=())
def _masked_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mask: Tensor,
                            needs_input_grad: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    grads = _backends.dispatch("masked_linear_backward", x.device, grad_y, x, weight, mask, needs_input_grad)
    # A custom op cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_masked_linear_backward.register_fake
def _(grad_y, x, weight, mask, needs_input_grad):
    need_x, need_w, need_b = needs_input_grad
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0),
            x.new_empty(weight.shape[0]) if need_b else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, mask = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
    grad_x, grad_w, grad_b = torch.ops.effops.masked_linear_backward(grad_y, x, weight, mask, need)
    return (grad_x if need[0] else None, grad_w if need[1] else None, None, grad_b if need[2] else None)


_masked_linear.register_autograd(_backward, setup_context=_setup_context)
