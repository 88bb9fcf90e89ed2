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


def gelu(h):
    """Exact (erf) GELU, as nn.GELU() by default: x * Phi(x), with infinities as that product gives them
    in IEEE arithmetic: GELU(+inf) = +inf, GELU(-inf) = -inf * 0 = NaN (as torch's silu(-inf) = NaN).

    torch's own vectorized GELU differs per CPU on infinities (its AVX-512 kernel returns NaN for both),
    so they are set here rather than taken from whichever kernel this CPU's torch runs.
    """
    y = F.gelu(h)
    if h.is_floating_point():
        y = torch.where(h.isinf(), h * (h > 0), y)  # +inf * 1 = +inf, -inf * 0 = NaN
    return y


def activate(h, activation):
    if activation is None:
        return h
    if activation == "relu":
        return F.relu(h)
    if activation == "relu6":
        return F.relu6(h)
    if activation == "gelu":
        return gelu(h)
    if activation == "silu":
        return F.silu(h)
    if activation == "hardswish":
        return F.hardswish(h)
    raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))


def activation_backward(grad_a, h, activation):
    """grad of activate(h) given grad of its output, through aten's own backward formulas."""
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
        return torch.ops.aten.hardswish_backward(grad_a, h)
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
