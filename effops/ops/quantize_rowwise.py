"""effops.ops.quantize_rowwise: symmetric per-row int8 quantization in one pass per row.

The op, its checks and its policies are C++ (csrc/bindings/quantize_rowwise.cpp). This module adds the
reference inside torch.func transforms and without the extension, and registers the Triton route the
C++ op calls on CUDA tensors (and on CPU tensors in Triton's interpreter, for tests). The result is
integers, so it has no gradient (Int8Linear gives its input a straight-through one).
"""
import importlib.util

import torch

from effops import _backends, _ext
from effops.reference import int8 as reference

BACKENDS = ("reference", "cpu", "triton")  # the backends with a kernel for this op (tests, `effops info`)


def quantize_rowwise(x):
    """(x_int8, scale): x (..., K) float -> x_int8 (..., K) int8 in [-127, 127], scale (...) fp32.

    scale = absmax(row) / 127 (1.0 for an all-zero row), x_int8 = round_half_even(x / scale); so
    x ~= x_int8 * scale[..., None] with an error of at most scale / 2 per element. A row holding NaN
    or inf has no scale: NaN, with x_int8 = 0.
    """
    if _backends.under_transform() or not _ext.load():
        return reference.quantize_rowwise(x)
    return torch.ops.effops.quantize_rowwise.default(x)


def _triton_quantize_rowwise(x):
    from effops.triton_kernels.int8_gemm import quantize_rowwise as launch
    return launch(x)


def _register_triton_route():
    if importlib.util.find_spec("triton") is None or not _ext.load():
        return None
    lib = torch.library.Library("effops", "FRAGMENT")
    lib.define("_quantize_rowwise_triton(Tensor x) -> (Tensor, Tensor)")
    lib.impl("_quantize_rowwise_triton", _backends.on_tensors_device(_triton_quantize_rowwise),
             "CompositeExplicitAutograd")
    return lib


_TRITON_LIBRARY = _register_triton_route()  # kept: the registrations live as long as the Library object
