"""effops::inverted_residual: expand 1x1 -> act -> depthwise k x k -> act -> project 1x1 [+ x], fused.

The op is defined in C++ (csrc/bindings/inverted_residual.cpp: schema, argument checks, the CPU
implementation with its speed policy, the Meta implementation for torch.compile); this function is a
thin call of torch.ops.effops.inverted_residual. Semantics: effops/reference/inverted_residual.py.
Its autograd is C++ too (csrc/bindings/inverted_residual_backward.cpp: only x and the weights are
saved; the backward recomputes the expanded tensor a chunk of images at a time). Without the compiled
extension (EFFOPS_NO_EXT=1, a pure-Python install) and inside torch.func transforms the reference runs
(torch differentiates and batches it). On CUDA tensors the C++ op calls the Triton forward
(triton_kernels/inverted_residual.py, defined here as effops::inverted_residual_triton); the backward
recomputes per chunk of images with its depthwise middle in Triton (triton_kernels/inverted_residual_backward.py,
defined here as effops::inverted_residual_depthwise_triton and effops::inverted_residual_depthwise_backward_triton;
they recompute the expanded tensor per tile from x) and the 1x1 convolutions' and squeeze-excitation's backward
through torch's CUDA ops. None of it has run on a
GPU.
"""
import importlib.util

import torch
import torch.nn.functional as F

from effops import _ext
from effops.ops import _checks
from effops.reference import inverted_residual as reference
from effops.reference.dwpw_conv2d import activate

ACTIVATIONS = reference.ACTIVATIONS
SE_GATES = tuple(reference.SE_GATES)
BACKENDS = ("reference", "cpu", "triton")  # the backends with a kernel for this op (tests, `effops info`)
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _se_gate(means, se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias, se_activation, se_gate):
    """The squeeze-excitation gate from d's means (fp32 [N, hidden]): two tiny 1x1 convs as matrix products,
    in fp32 whatever x's dtype (as the CPU kernel's gate); fp32 [N, hidden]."""
    rw, rb, ew, eb = (None if t is None else t.to(torch.float32) for t in (se_reduce_weight, se_reduce_bias,
                                                                           se_expand_weight, se_expand_bias))
    squeezed = activate(F.linear(means, rw.flatten(1), rb), se_activation)
    return reference.SE_GATES[se_gate](F.linear(squeezed, ew.flatten(1), eb))


def _triton_forward(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, stride, padding,
                    activation, residual, packed=None, se_reduce_weight=None, se_reduce_bias=None,
                    se_expand_weight=None, se_expand_bias=None, se_activation="relu", se_gate="hardsigmoid"):
    from effops.triton_kernels import inverted_residual as kernels
    scale = None
    if se_reduce_weight is not None or se_expand_weight is not None:
        # Two passes, as the CPU kernel: d's per-channel means (no project), the gate from them in torch
        # (N x hidden values), then the block with d scaled by the gate.
        means = kernels.inverted_residual_means(x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding,
                                                activation)
        scale = _se_gate(means, se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias, se_activation,
                         se_gate)
    return kernels.inverted_residual_forward(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                             project_bias, stride, padding, activation, residual, scale)


def _triton_depthwise(x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding, activation):
    from effops.triton_kernels import inverted_residual_backward as kernels
    return kernels.depthwise_act(x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding, activation)


def _triton_depthwise_backward(grad_d, x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding,
                               activation):
    from effops.triton_kernels import inverted_residual_backward as kernels
    return kernels.depthwise_act_backward(grad_d, x, expand_weight, expand_bias, dw_weight, dw_bias, stride, padding,
                                          activation)


def _define_triton_route():
    """The Triton routes the C++ ops call on CUDA tensors and when "triton" is forced on CPU tensors (Triton's
    interpreter, tests only): effops::inverted_residual_triton (the forward) and, for the backward's depthwise
    middle, effops::inverted_residual_depthwise_triton (d = act(depthwise(e) + b), e = act(expand(x)) recomputed
    per tile) and effops::inverted_residual_depthwise_backward_triton (the gradients at the expand conv's output,
    or at x without one, and of the depthwise weight and bias). Defined at import when Triton is installed (Triton itself is imported on
    the first call)."""
    if importlib.util.find_spec("triton") is None:
        return None
    lib = torch.library.Library("effops", "FRAGMENT")
    lib.define("inverted_residual_triton(Tensor x, Tensor? expand_weight, Tensor? expand_bias, Tensor dw_weight, "
               "Tensor? dw_bias, Tensor project_weight, Tensor? project_bias, int[2] stride, int[2] padding, "
               "str? activation, bool residual, Tensor? packed=None, Tensor? se_reduce_weight=None, "
               "Tensor? se_reduce_bias=None, Tensor? se_expand_weight=None, Tensor? se_expand_bias=None, "
               "str se_activation='relu', str se_gate='hardsigmoid') -> Tensor")
    lib.define("inverted_residual_depthwise_triton(Tensor x, Tensor? expand_weight, Tensor? expand_bias, "
               "Tensor dw_weight, Tensor? dw_bias, int[2] stride, int[2] padding, str? activation) -> Tensor")
    lib.define("inverted_residual_depthwise_backward_triton(Tensor grad_d, Tensor x, Tensor? expand_weight, "
               "Tensor? expand_bias, Tensor dw_weight, Tensor? dw_bias, int[2] stride, int[2] padding, "
               "str? activation) -> (Tensor, Tensor, Tensor)")
    for key in ("CPU", "CUDA"):
        lib.impl("inverted_residual_triton", _triton_forward, key)
        lib.impl("inverted_residual_depthwise_triton", _triton_depthwise, key)
        lib.impl("inverted_residual_depthwise_backward_triton", _triton_depthwise_backward, key)
    return lib


_TRITON_LIB = _define_triton_route()


def inverted_residual(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias, stride=1,
                      padding=1, activation="relu6", residual=False, packed=None, se_reduce_weight=None,
                      se_reduce_bias=None, se_expand_weight=None, se_expand_bias=None, se_activation="relu",
                      se_gate="hardsigmoid"):
    """y = project(se(act(depthwise(act(expand(x)))))) [+ x], BatchNorms folded into the convs' weights.

    expand_weight (hidden, Cin, 1, 1) or None (no expansion); dw_weight (hidden, 1, kh, kw);
    project_weight (Cout, hidden, 1, 1); biases or None; stride and padding of the depthwise conv (int or
    pair); activation None, "relu", "relu6", "gelu", "silu" or "hardswish"; residual adds x (stride 1,
    Cout == Cin). packed: inverted_residual_pack of the same weights (a module builds it once), else the
    CPU kernel packs them per call. The output takes x's memory format.

    Squeeze-excitation between the depthwise and the project conv (MobileNetV3, EfficientNet) when
    se_reduce_weight (squeeze, hidden, 1, 1) and se_expand_weight (hidden, squeeze, 1, 1) are given, with
    their biases, se_activation (as activation) and se_gate ("sigmoid" or "hardsigmoid"); the CPU kernel
    computes it in two passes, the first only for d's per-channel means (effops/reference/inverted_residual.py).
    """
    stride, padding = _checks.int_pair("stride", stride, minimum=1), _checks.int_pair("padding", padding, minimum=0)
    if not _ext.load() or (not torch.compiler.is_compiling() and _functorch_wrapped(x)):
        return reference.inverted_residual(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                           project_bias, stride, padding, activation, residual, se_reduce_weight,
                                           se_reduce_bias, se_expand_weight, se_expand_bias, se_activation, se_gate)
    return torch.ops.effops.inverted_residual(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                              project_bias, stride, padding, activation, residual, packed,
                                              se_reduce_weight, se_reduce_bias, se_expand_weight, se_expand_bias,
                                              se_activation, se_gate)


def inverted_residual_pack(expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias):
    """The weights in the CPU kernel's order (one float32 vector; csrc/cpu/inverted_residual.h), or None
    without the compiled extension."""
    if not _ext.load():
        return None
    return torch.ops.effops.inverted_residual_pack(expand_weight, expand_bias, dw_weight, dw_bias, project_weight,
                                                   project_bias)
