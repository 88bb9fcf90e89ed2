"""Modules users swap in for the plain-PyTorch blocks they replace."""
from effops._lazy import lazy_getattr

__all__ = ["SeparableConv2d", "SparseLinear", "Int8Linear"]
__getattr__ = lazy_getattr(__name__, {
    "SeparableConv2d": "effops.nn.separable_conv:SeparableConv2d",
    "SparseLinear": "effops.nn.sparse_linear:SparseLinear",
    "Int8Linear": "effops.nn.int8_linear:Int8Linear",
})
