"""Modules users swap in for the plain-PyTorch blocks they replace."""
from effops._lazy import lazy_getattr

__all__ = ["SeparableConv2d", "InvertedResidual", "SparseLinear", "SparseMultiheadAttention", "Int8Linear"]
__getattr__ = lazy_getattr(__name__, {
    "SeparableConv2d": "effops.nn.separable_conv:SeparableConv2d",
    "InvertedResidual": "effops.nn.inverted_residual:InvertedResidual",
    "SparseLinear": "effops.nn.sparse_linear:SparseLinear",
    "SparseMultiheadAttention": "effops.nn.sparse_attention:SparseMultiheadAttention",
    "Int8Linear": "effops.nn.int8_linear:Int8Linear",
})
