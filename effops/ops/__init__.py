"""The ops: each a torch.library custom op (effops::name) behind a checking Python function.

Each op lives in a module of the same name (effops/ops/masked_linear.py defines masked_linear), so
the functions are imported eagerly here: a lazy lookup would lose to the import system, which binds
the submodule itself to the package attribute of the same name once anything imports it. Importing
these modules is cheap (no Triton; kernels load on first use) and registers every effops:: op.
"""
from effops.ops.adam8bit_step import adam8bit_step
from effops.ops.adam_step import adam_step
from effops.ops.dwpw_conv2d import dwpw_conv2d
from effops.ops.int8_gemm import int8_linear, int8_linear_dynamic, int8_mm
from effops.ops.inverted_residual import inverted_residual
from effops.ops.masked_linear import masked_linear
from effops.ops.quantize_rowwise import quantize_rowwise

__all__ = ["adam8bit_step", "adam_step", "dwpw_conv2d", "int8_linear", "int8_linear_dynamic", "int8_mm",
           "inverted_residual", "masked_linear", "quantize_rowwise"]
