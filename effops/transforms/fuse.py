"""fuse(model): every fusion effops has, in one call: inverted-residual blocks first
(fuse_inverted_residual), then the depthwise-separable chains left (fuse_separable), one report.

A block skipped as an inverted residual (a squeeze-excitation block inside, batch statistics, ...) is
reported once, under its expand conv, not again as a depthwise-separable chain.
"""
import warnings

from effops.transforms import _report
from effops.transforms.fuse_inverted_residual import find_and_fuse
from effops.transforms.fuse_separable import fuse_separable


def fuse(model, *, exclude=(), return_report=False):
    """Fuse inverted-residual blocks and depthwise-separable chains of `model`, in place.

    exclude: module names or fnmatch patterns left alone (a name covers everything under it). Returns the
    model, or (model, TransformReport) with return_report=True; the report is also `model.fuse_report`.
    Warns when it fuses nothing, or skips a candidate for a reason other than `exclude`.
    """
    _report.check_model(model)
    patterns = _report.exclude_patterns(exclude)
    _report.warn_unmatched(model, patterns, "fuse")
    report = _report.TransformReport("fuse")
    names = {id(m): name for name, m in model.named_modules()}
    skipped_dw = {names.get(id(m)) for m in find_and_fuse(model, report, patterns)}
    with warnings.catch_warnings():  # fuse_separable's own warnings: this call warns once, below
        warnings.simplefilter("ignore")
        _, separable = fuse_separable(model, exclude=patterns, return_report=True)
    report.changed += separable.changed
    report.skipped += [(name, why) for name, why in separable.skipped if name not in skipped_dw]
    model.fuse_report = report
    return _report.finish(model, report, return_report)
