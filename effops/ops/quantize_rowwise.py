"""quantize_rowwise: symmetric per-row int8 quantization in one pass per row.

The op is C++ (csrc/bindings/quantize_rowwise.cpp): schema, checks, the CPU and CUDA policies. Here: the
Python function, and the Triton route those implementations call. The result is integers, so it has
no gradient (Int8Linear gives its input a straight-through one).
"""
import importlib.util
from typing import Tuple

import torch
from torch import Tensor

from effops.ops.int8_gemm import on_device, runs_reference
from effops.reference import int8 as reference


def quantize_rowwise(x):
    """(x_int8, scale): x (..., K) float -> x_int8 (..., K) int8 in [-127, 127], scale (...) fp32.

    scale = absmax(row) / 127 (1.0 for an all-zero row), x_int8 = round_half_even(x / scale); so
    x ~= x_int8 * scale[..., None] with an error of at most scale / 2 per element. A row holding NaN
    or inf has no scale: NaN, with x_int8 = 0.
    """
    if runs_reference():
        return reference.quantize_rowwise(x)
    return torch.ops.effops.quantize_rowwise.default(x)


if importlib.util.find_spec("triton") is not None:
    @torch.library.custom_op("effops::quantize_rowwise_triton", mutates_args=())
    def _quantize_rowwise_triton(x: Tensor) -> Tuple[Tensor, Tensor]:
        from effops.triton_kernels import int8_gemm
        with on_device(x):
            return int8_gemm.quantize_rowwise(x)
