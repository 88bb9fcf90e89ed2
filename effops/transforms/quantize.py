"""effops.quantize(model): swap nn.Linear layers for Int8Linear (int8 weights, see effops.nn.Int8Linear)."""
from torch import nn

from effops.nn.int8_linear import MODES, Int8Linear, _check_weight_bits
from effops.nn.sparse_linear import SparseLinear
from effops.ops import _checks


def _skipped(name, skip):
    return any(name == s or name.startswith(s + ".") for s in skip)


# Below this many input or output features a layer stays fp32 by default: there Int8Linear (like torch's
# FBGEMM int8 Linear) is slower than the fp32 nn.Linear it would replace, per-call costs outweighing the
# int8 arithmetic (benchmarks/bench_small_calls.py, quick run 10:16 UTC: Int8Linear / fp32 at batch
# 1 / 16 / 256: 192 features 0.43x / 0.59x / 0.89x, 512 features 0.66x / 1.59x / 1.16x, 1024 features
# 1.8x / 2.3x / 1.7x). A smaller min_features still quantizes smaller layers, for their memory.
DEFAULT_MIN_FEATURES = 1024


def quantize(model, skip=(), min_features=DEFAULT_MIN_FEATURES, mode="auto", weight_bits=8):
    """Replace every nn.Linear of `model` (in place; returns the model) by Int8Linear.from_linear.

    Pruned layers (SparseLinear, from effops.prune) are quantized too, as their masked weight
    (`to_linear()`): the pruned weights stay exactly zero in int8, but the int8 kernels are dense, so
    pruning then saves nothing more at inference.
    skip: a qualified module name or a tuple/list of them (as in model.named_modules()) left alone, with
    everything under them (e.g. "head" for a classifier you keep in floating point). min_features: a layer with fewer input
    or output features stays floating (default 1024: below it int8 ran slower than fp32 here, and small
    layers lose the most accuracy; pass a smaller value to quantize them for memory).
    mode: Int8Linear's mode ("dynamic", "weight_only" or "auto").
    weight_bits: 8 (default) or 7 (opt-in: weights in [-63, 63], a faster CPU kernel; see Int8Linear).
    Linear subclasses that other modules read weights from directly (nn.MultiheadAttention's out_proj)
    and float64 layers (the int8 ops take fp32/bf16/fp16 inputs) are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, (tuple, list)) or not all(isinstance(s, str) for s in skip):
        raise TypeError("skip must be a module name or a tuple/list of them, got %r" % (skip,))
    if not isinstance(min_features, int) or isinstance(min_features, bool) or min_features < 1:
        raise ValueError("min_features must be a positive int, got %r" % (min_features,))
    _checks.choice("mode", mode, MODES)
    _check_weight_bits(weight_bits)
    if type(model) is nn.Linear:
        raise ValueError("quantize swaps submodules: wrap the Linear in a container or use Int8Linear.from_linear")
    swaps = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, SparseLinear) or _skipped(name, skip):
            continue
        if min(module.in_features, module.out_features) < min_features:
            continue
        if module.weight.dtype not in _checks.FLOAT_DTYPES:
            continue  # float64: Int8Linear takes fp32/bf16/fp16 inputs; such a layer stays as it is
        swaps.append(name)
    for name in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if isinstance(linear, SparseLinear):
            linear = linear.to_linear()  # weight * mask: the pruned weights quantize to exact zeros
        setattr(parent, child, Int8Linear.from_linear(linear, mode=mode, weight_bits=weight_bits))
    return model
