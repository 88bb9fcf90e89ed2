"""effops.ops.dwpw_conv2d: depthwise conv -> activation -> 1x1 pointwise conv, fused.

The op, its checks, its speed policy and its autograd are C++ (csrc/bindings/dwpw_conv2d_op.cpp):
torch.ops.effops.dwpw_conv2d runs either torch's two convolutions or the fused kernels, whose backward
recomputes the depthwise output instead of keeping it. This module adds what only Python can do (ints
taken as pairs, unbatched inputs, the reference inside torch.func transforms) and registers the Triton
route the C++ op calls on CUDA tensors (and on CPU tensors in Triton's interpreter, for tests).
"""
import importlib.util

import torch

from effops import _backends, _ext
from effops.ops import _checks
from effops.reference import dwpw_conv2d as reference

ACTIVATIONS = reference.ACTIVATIONS
BACKENDS = ("reference", "cpu", "triton")  # the backends with a kernel for this op (tests, `effops info`)


def dwpw_conv2d(x, dw_weight, pw_weight, dw_bias=None, pw_bias=None, stride=1, padding=0, dilation=1,
                activation=None):
    """y = conv1x1(act(depthwise_conv(x))) in one op.

    x: (N, C, H, W), NCHW or channels_last, or unbatched (C, H, W); dw_weight: (C, 1, kh, kw); pw_weight: (O, C, 1, 1);
    dw_bias: (C,) or None; pw_bias: (O,) or None; stride/padding/dilation: int or pair (of the
    depthwise conv); activation: None, "relu", "relu6", "gelu" (exact erf form), "silu" or "hardswish".
    Returns (N, O, H', W') in x's memory format and dtype (autocast's under autocast).
    """
    _checks.tensor("x", x)
    if x.dim() == 3:  # unbatched (C, H, W), as F.conv2d takes
        return dwpw_conv2d(x.unsqueeze(0), dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                           activation).squeeze(0)
    _checks.tensor("dw_weight", dw_weight)
    _checks.tensor("pw_weight", pw_weight)
    stride = _checks.int_pair("stride", stride, minimum=1)
    padding = _checks.int_pair("padding", padding, minimum=0)
    dilation = _checks.int_pair("dilation", dilation, minimum=1)
    if activation is not None and not isinstance(activation, str):
        _checks.choice("activation", activation, ACTIVATIONS)  # (the op's schema would take no list)
    if _backends.under_transform() or not _ext.load():
        # torch.func transforms and forward-mode AD differentiate and batch torch's own ops: the reference.
        _checks.choice("activation", activation, ACTIVATIONS)
        return reference.dwpw_conv2d(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)
    return torch.ops.effops.dwpw_conv2d(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                                        activation)


def output_size(in_hw, kernel_hw, stride, padding, dilation):
    return [(in_hw[i] + 2 * padding[i] - dilation[i] * (kernel_hw[i] - 1) - 1) // stride[i] + 1 for i in range(2)]


def route_reason(x, dw_weight, pw_weight, stride=(1, 1), padding=(0, 0), dilation=(1, 1), training=False,
                 device="cpu"):
    """Why the automatic choice runs torch's convolutions for an input of these shapes and dtype on
    `device` ("cpu" or "cuda"), or "" where it runs the fused kernels. Meta tensors will do."""
    _ext.load()
    return torch.ops.effops_cpu.dwpw_conv2d_route_reason(x, dw_weight, pw_weight, list(stride), list(padding),
                                                         list(dilation), training, device)


# ---------------------------------------------------------------------------------------------
# The Triton route (the kernels are imported on first use: Triton stays out of `import effops`)
# ---------------------------------------------------------------------------------------------
def _triton_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    from effops.triton_kernels.dwpw_conv2d import dwpw_conv2d_forward
    return dwpw_conv2d_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)


def _triton_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation, needs_input_grad):
    from effops.triton_kernels.dwpw_conv2d import dwpw_conv2d_backward
    grads = dwpw_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation,
                                 list(needs_input_grad))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _register_triton_route():
    if importlib.util.find_spec("triton") is None or not _ext.load():
        return
    lib = torch.library.Library("effops", "FRAGMENT")
    lib.define("_dwpw_conv2d_triton(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_bias, Tensor? pw_bias, "
               "int[2] stride, int[2] padding, int[2] dilation, str? activation) -> Tensor")
    lib.define("_dwpw_conv2d_backward_triton(Tensor grad_y, Tensor x, Tensor dw_weight, Tensor pw_weight, "
               "Tensor? dw_bias, int[2] stride, int[2] padding, int[2] dilation, str? activation, "
               "bool[5] needs_input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
    lib.impl("_dwpw_conv2d_triton", _backends.on_tensors_device(_triton_forward), "CompositeExplicitAutograd")
    lib.impl("_dwpw_conv2d_backward_triton", _backends.on_tensors_device(_triton_backward), "CompositeExplicitAutograd")
    return lib


_TRITON_LIBRARY = _register_triton_route()  # kept: the registrations live as long as the Library object
