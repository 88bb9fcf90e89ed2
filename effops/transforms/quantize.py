"""effops.quantize(model): swap nn.Linear layers for Int8Linear (int8 weights, see effops.nn.Int8Linear)."""
import torch
from torch import nn

from effops.nn.int8_linear import MODES, Int8Linear, _check_weight_bits
from effops.nn.sparse_linear import SparseLinear
from effops.ops import _checks
from effops.transforms import _report

# The default size policy: a layer with fewer input or output features than this stays floating, by
# torch's CPU capability (the instruction set torch's own kernels and ours run with). Set where
# Int8Linear beat the fp32 nn.Linear it replaces at 1, 50 and 800 rows (`python -m
# benchmarks.int8_min_features`, docs/int8.md): on AVX512 (Zen 4) every size from 384 features up ran
# 1.8-2.6x faster, 256 x 1024 1.17x at one row, 192 x 192 0.44x at one row. AVX2: the 768 x 3072
# transformer layers (ViT-B, BERT-base) were faster there too. Elsewhere nothing was measured: the old
# conservative 1024. Smaller layers also lose the most accuracy; a smaller min_features still
# quantizes them, for their memory. Re-measure with the script above when the int8 kernels change.
MIN_FEATURES_BY_CPU = {"AVX512": 512, "AVX2": 768}
MIN_FEATURES_UNMEASURED = 1024


def default_min_features():
    """quantize's min_features when none is given: MIN_FEATURES_BY_CPU for this machine's CPU capability."""
    return MIN_FEATURES_BY_CPU.get(torch.backends.cpu.get_cpu_capability(), MIN_FEATURES_UNMEASURED)


def quantize(model, skip=(), min_features=None, mode="auto", weight_bits=8, *, exclude=(), return_report=False):
    """Replace the nn.Linear layers of `model` (in place; returns the model, or (model, TransformReport)
    with return_report=True) by Int8Linear.from_linear.

    Pruned layers (SparseLinear, from effops.prune) are quantized too, as their masked weight
    (`to_linear()`): the pruned weights stay exactly zero in int8, but the int8 kernels are dense, so
    pruning then saves nothing more at inference.
    exclude (or its older name skip, same meaning; both may be given): module names or fnmatch patterns
    left alone, each with everything under it (e.g. "head" for a classifier kept in floating point).
    min_features: a layer with fewer input or output features stays floating; None (default):
    default_min_features(), where int8 ran faster than fp32 on this CPU's instruction set.
    mode: Int8Linear's mode ("dynamic", "weight_only" or "auto").
    weight_bits: 8 (default) or 7 (opt-in: weights in [-63, 63], a faster CPU kernel; see Int8Linear).
    Left alone and reported: layers below min_features, float64 layers (the int8 ops take fp32/bf16/fp16
    inputs), nn.MultiheadAttention's out_proj (attention reads its weight directly) and other nn.Linear
    subclasses (Int8Linear would drop their own forward). Warns when nothing was swapped.
    """
    _report.check_model(model)
    patterns = _report.exclude_patterns(skip, "skip") + _report.exclude_patterns(exclude)
    if min_features is None:
        min_features = default_min_features()
    if not isinstance(min_features, int) or isinstance(min_features, bool) or min_features < 1:
        raise ValueError("min_features must be a positive int, got %r" % (min_features,))
    _checks.choice("mode", mode, MODES)
    _check_weight_bits(weight_bits)
    if type(model) is nn.Linear:
        raise ValueError("quantize swaps submodules: wrap the Linear in a container or use Int8Linear.from_linear")
    _report.warn_unmatched(model, patterns, "quantize")
    report = _report.TransformReport("quantize")
    swaps = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        why = _why_floating(model, name, module, patterns, min_features)
        if why:
            report.skipped.append((name, why))
        else:
            swaps.append(name)
    for name in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if isinstance(linear, SparseLinear):
            linear = linear.to_linear()  # weight * mask: the pruned weights quantize to exact zeros
        setattr(parent, child, Int8Linear.from_linear(linear, mode=mode, weight_bits=weight_bits))
        report.changed.append((name, "Int8Linear"))
    _report.keep_fast_path_off(model, swaps)
    return _report.finish(model, report, return_report, quiet_reasons=(_report.EXCLUDED, _BELOW))


_BELOW = "features, below min_features"


def _why_floating(model, name, module, patterns, min_features):
    """None if the Linear `name` is to become Int8Linear, else why it stays."""
    if _report.excluded(name, patterns):
        return _report.EXCLUDED
    parent_name, _, child = name.rpartition(".")
    if isinstance(model.get_submodule(parent_name), nn.MultiheadAttention) and child == "out_proj":
        return "nn.MultiheadAttention reads out_proj.weight directly: an Int8Linear there would never run"
    if type(module) not in (nn.Linear, SparseLinear):
        return "%s is a subclass of nn.Linear: Int8Linear would replace its own forward" % type(module).__name__
    if min(module.in_features, module.out_features) < min_features:
        return "%d x %d %s %d" % (module.in_features, module.out_features, _BELOW, min_features)
    if module.weight.dtype not in _checks.FLOAT_DTYPES:
        return "%s weight: the int8 ops take fp32/bf16/fp16 inputs" % module.weight.dtype
    return None
