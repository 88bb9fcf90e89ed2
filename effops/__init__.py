"""effops: fused kernels for efficient PyTorch training and inference.

    effops.ops        dwpw_conv2d, inverted_residual, masked_linear, quantize_rowwise, int8_linear, int8_mm,
                      adam_step, adam8bit_step
    effops.nn         SeparableConv2d, InvertedResidual, SparseLinear, Int8Linear
    effops.optim      Adam, AdamW
    effops.fuse / effops.fuse_inverted_residual / effops.fuse_separable / effops.prune / effops.quantize
                                                             model transforms
    effops.backends() / effops.use_backend(name)             backend choice (also EFFOPS_BACKEND)
    effops.cpu_isa.current() / .use_cpu_isa(level)           CPU instruction-set level (also EFFOPS_CPU_ISA)
"""
from effops._backends import BackendError, backends, use_backend
from effops._lazy import lazy_getattr

__version__ = "0.1.0"
__all__ = ["ops", "nn", "optim", "transforms", "backends", "use_backend", "BackendError",
           "fuse", "fuse_inverted_residual", "fuse_separable", "prune", "quantize", "GradualPruner", "cpu_isa"]

__getattr__ = lazy_getattr(__name__, {
    "ops": "effops.ops",
    "nn": "effops.nn",
    "optim": "effops.optim",
    "transforms": "effops.transforms",
    "cpu_isa": "effops.cpu_isa",
    "fuse": "effops.transforms:fuse",
    "fuse_inverted_residual": "effops.transforms:fuse_inverted_residual",
    "fuse_separable": "effops.transforms:fuse_separable",
    "prune": "effops.transforms:prune",
    "GradualPruner": "effops.transforms:GradualPruner",
    "quantize": "effops.transforms:quantize",
})
