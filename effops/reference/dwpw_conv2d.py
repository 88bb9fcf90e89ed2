"""Reference: depthwise conv -> activation -> 1x1 conv, with plain PyTorch. The definition of correct.

Shapes follow nn.Conv2d: x (N, C, H, W); dw_weight (C, 1, kh, kw); dw_bias (C,); pw_weight (O, C, 1, 1);
pw_bias (O,). The output takes x's memory format (channels_last in, channels_last out).
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "relu6", "gelu", "silu", "hardswish")


def memory_format(x):
    """channels_last when x is laid out that way (and not also plainly contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# torch's own activation of each name (gelu: the exact erf form, as nn.GELU() by default).
_TORCH_ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish}
# Each activation's values at +inf and -inf, as its formula gives them in IEEE arithmetic (NaN stays
# NaN): relu max(0, x); relu6 min(6, max(0, x)); gelu x * Phi(x) and silu x * sigmoid(x), so -inf * 0 =
# NaN at -inf; hardswish x * relu6(x + 3) / 6, -inf * 0 = NaN. torch's own vectorized kernels differ per
# CPU there (its AVX-512 GELU returns NaN for +inf too), so effops defines them here and every backend
# follows this table, not whichever kernel this CPU's torch runs.
_AT_INFINITY = {"relu": (float("inf"), 0.0), "relu6": (6.0, 0.0), "gelu": (float("inf"), float("nan")),
                "silu": (float("inf"), float("nan")), "hardswish": (float("inf"), float("nan"))}


# torch.func transforms (vmap, grad) wrap their tensors: those cannot steer Python control flow.
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: True)


def _may_branch_on_values(h):
    """Whether activate may test h's values in Python (a plain eager CPU tensor: no device sync, no
    tracing, no torch.func transform); elsewhere it sets the values at infinity without a test."""
    return h.device.type == "cpu" and not torch.compiler.is_compiling() and not _functorch_wrapped(h)


def activate(h, activation):
    """activation(h) as torch computes it, with the values at infinity and NaN of _AT_INFINITY."""
    if activation is None:
        return h
    if activation not in _TORCH_ACTIVATIONS:
        raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))
    y = _TORCH_ACTIVATIONS[activation](h)
    if _may_branch_on_values(h) and torch.isfinite(h.sum()):
        return y  # no infinity or NaN: one summing pass (a sum that overflows just takes the path below)
    at_pos_inf, at_neg_inf = _AT_INFINITY[activation]
    at_infinity = torch.where(h > 0, at_pos_inf, at_neg_inf).to(y.dtype)
    return torch.where(h.isnan(), h, torch.where(h.isinf(), at_infinity, y))


def activation_backward(grad_a, h, activation):
    """grad of activate(h) given grad of its output, through aten's own backward formulas (hardswish's
    written out)."""
    if activation is None:
        return grad_a
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad_a, h, 0)
    if activation == "relu6":
        return torch.ops.aten.hardtanh_backward(grad_a, h, 0.0, 6.0)
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a, h)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_a, h)
    if activation == "hardswish":
        # Written out, not aten's: torch moved the edges in 2.7 (pytorch/pytorch#148049; before, h / 3 + 1/2
        # on [-3, 3] with both ends). Defined as torch 2.7+ gives it: 0 up to -3 included, h / 3 + 1/2 on
        # (-3, 3), 1 from 3 on and for NaN.
        return torch.where(h <= -3, torch.zeros_like(grad_a), torch.where(h < 3, grad_a * (h / 3 + 0.5), grad_a))
    raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))


def _depthwise(x, dw_weight, dw_bias, stride, padding, dilation):
    return F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=x.shape[1])


def dwpw_conv2d(x, dw_weight, pw_weight, dw_bias=None, pw_bias=None, stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), activation=None):
    """F.conv2d(act(F.conv2d(x, dw_weight, dw_bias, groups=C)), pw_weight, pw_bias)."""
    # One name for the intermediate: the pre-activation tensor is freed before the 1x1 conv allocates its
    # output, as in the plain two-conv block (kept alive, it made the output a fresh allocation that
    # page-faults: 0.8x of the plain block at 64 x 24 -> 48, 32x32).
    h = _depthwise(x, dw_weight, dw_bias, stride, padding, dilation)
    h = activate(h, activation)
    y = F.conv2d(h, pw_weight, pw_bias)
    return y.contiguous(memory_format=memory_format(x))


def dwpw_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation,
                         needs_input_grad):
    """(grad_x, grad_dw_weight, grad_pw_weight, grad_dw_bias, grad_pw_bias); None where not needed.

    Written out rather than taken from autograd (kernels run below the autograd key). The depthwise
    output is recomputed here instead of being saved by the forward: that is what saves memory.
    """
    need_x, need_dw, need_pw, need_dwb, need_pwb = needs_input_grad
    C, O = x.shape[1], pw_weight.shape[0]
    need_a = need_x or need_dw or need_dwb
    h = _depthwise(x, dw_weight, dw_bias, stride, padding, dilation)
    a = activate(h, activation)
    # aten's convolution_backward is what autograd runs for F.conv2d: same kernels, same speed.
    grad_a, grad_pw, grad_pwb = torch.ops.aten.convolution_backward(
        grad_y, a, pw_weight, [O], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_a, need_pw, need_pwb])
    grad_x = grad_dw = grad_dwb = None
    if need_a:
        del a
        grad_h = activation_backward(grad_a, h, activation)
        del grad_a, h
        grad_x, grad_dw, grad_dwb = torch.ops.aten.convolution_backward(
            grad_h, x, dw_weight, [C], list(stride), list(padding), list(dilation), False, [0, 0], C,
            [need_x, need_dw, need_dwb])
        if grad_x is not None:
            grad_x = grad_x.contiguous(memory_format=memory_format(x))
    return grad_x, grad_dw, grad_pw, grad_dwb, grad_pwb
