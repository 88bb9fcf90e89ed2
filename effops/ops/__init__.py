"""The ops: each a torch.library custom op (effops::name) behind a checking Python function."""
import importlib

from effops._lazy import lazy_getattr

# Public name -> module defining it. Importing a module registers its custom ops and kernels.
_OPS = {
    "dwpw_conv2d": "effops.ops.dwpw_conv2d:dwpw_conv2d",
    "masked_linear": "effops.ops.masked_linear:masked_linear",
    "quantize_rowwise": "effops.ops.quantize_rowwise:quantize_rowwise",
    "int8_linear": "effops.ops.int8_gemm:int8_linear",
    "int8_mm": "effops.ops.int8_gemm:int8_mm",
    "adam_step": "effops.ops.adam_step:adam_step",
}
__all__ = sorted(_OPS) + ["load_all"]
__getattr__ = lazy_getattr(__name__, _OPS)


def load_all():
    """Import every op module, registering all effops:: custom ops and their kernels."""
    for target in sorted(set(t.partition(":")[0] for t in _OPS.values())):
        importlib.import_module(target)
