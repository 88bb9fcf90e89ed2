"""Reference: F.linear with a masked weight. The definition of correct for every masked_linear kernel."""
import math

import torch
import torch.nn.functional as F


def masked_linear(x, weight, mask, bias=None):
    """y = x @ (weight * mask)^T + bias, over any leading batch dims of x.

    The mask enters as a constant, so autograd gives grad_weight = (grad_y^T x) * mask: masked.
    """
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def masked_linear_backward(grad_y, x, weight, mask, needs_input_grad):
    """(grad_x, grad_weight, grad_bias) of masked_linear; None where not needed.

    Written out rather than taken from autograd: the op layer runs kernels below the autograd key.
    """
    need_x, need_w, need_b = needs_input_grad
    rows = math.prod(x.shape[:-1])  # not reshape(-1, ...): with 0 features the -1 is undetermined
    g2 = grad_y.reshape(rows, grad_y.shape[-1])
    x2 = x.reshape(rows, x.shape[-1])
    grad_x = (g2 @ (weight * mask.to(weight.dtype))).reshape(x.shape) if need_x else None
    grad_w = (g2.t() @ x2) * mask.to(weight.dtype) if need_w else None
    grad_b = g2.sum(0) if need_b else None
    return grad_x, grad_w, grad_b


def masked_linear_mask_gradient(grad_y, x, weight):
    """grad of a float mask that requires grad (a learned or soft mask): (grad_y^T x) * weight, dense,
    as torch's autograd of weight * mask gives. Not part of the kernels: masks are usually constants."""
    rows = math.prod(x.shape[:-1])
    return (grad_y.reshape(rows, grad_y.shape[-1]).t() @ x.reshape(rows, x.shape[-1])) * weight
