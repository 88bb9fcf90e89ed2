"""What every transform shares: the report it returns, how `exclude` names modules, when it warns.

* `exclude` (prune, quantize, fuse_separable; quantize's older `skip` is the same): a qualified module
  name as in model.named_modules(), or an fnmatch pattern ("blocks.*.attn"), or a tuple/list of them.
  A name covers the module and everything under it: "heads" leaves "heads.head" alone.
* Each transform returns the model (changed in place), and with return_report=True the pair
  (model, TransformReport). The report lists every module changed and every candidate left alone with
  its reason.
* At most one UserWarning per call: when the transform changed nothing (with the first reasons), or
  else when a candidate was left alone for a reason the caller did not choose (a weight another module
  reads directly, an activation the fused op lacks, ...). Layers excluded by name or below a size
  threshold are in the report only.
"""
import dataclasses
import fnmatch
import warnings

from torch import nn

EXCLUDED = "excluded by name"


@dataclasses.dataclass
class TransformReport:
    """changed: [(name, what it became)]; skipped: [(name, why it was left alone)]."""

    transform: str
    changed: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def skipped_for(self, reason_part):
        """Names of the skipped candidates whose reason contains `reason_part`."""
        return [name for name, why in self.skipped if reason_part in why]

    def __str__(self):
        lines = ["%s: changed %d, skipped %d" % (self.transform, len(self.changed), len(self.skipped))]
        lines += ["  %s -> %s" % item for item in self.changed]
        lines += ["  skipped %s: %s" % item for item in self.skipped]
        return "\n".join(lines)


def check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)


def exclude_patterns(exclude, arg="exclude"):
    """`exclude` as a tuple of str; TypeError naming `arg` otherwise."""
    if isinstance(exclude, str):
        return (exclude,)
    if not isinstance(exclude, (tuple, list)) or not all(isinstance(s, str) for s in exclude):
        raise TypeError("%s must be a module name or a tuple/list of them, got %r" % (arg, exclude))
    return tuple(exclude)


def excluded(name, patterns):
    """True if `name` or one of its ancestors ("a.b" for "a.b.c") matches a pattern."""
    if not patterns or not name:
        return False
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def warn_unmatched(model, patterns, transform):
    """Warn about exclude patterns that name no module (a typo would otherwise exclude nothing quietly)."""
    names = [name for name, _ in model.named_modules() if name]
    for pat in patterns:
        if not any(excluded(name, (pat,)) for name in names):
            warnings.warn("%s: exclude pattern %r matches no module of the model" % (transform, pat), stacklevel=3)


def _fast_path_off(module, args):
    """A forward pre-hook that does nothing: its presence turns off the module's inference fast path."""
    return None


def keep_fast_path_off(model, swapped_names):
    """Turn off nn.TransformerEncoderLayer's inference fast path where one of its Linear layers was swapped.

    In eval mode without autograd, TransformerEncoderLayer.forward runs one native kernel that reads
    linear1.weight and linear2.weight itself instead of calling the modules: an Int8Linear's int8
    weights there fail, a SparseLinear's dense weights run without its sparse kernel. That fast path is
    taken only when no forward hook is attached to the layer or a submodule, so a no-op pre-hook on the
    layer makes it call its (swapped) modules.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.TransformerEncoderLayer):
            continue
        prefix = name + "." if name else ""
        if any(n in (prefix + "linear1", prefix + "linear2") for n in swapped_names) and not any(
                h is _fast_path_off for h in layer._forward_pre_hooks.values()):
            layer.register_forward_pre_hook(_fast_path_off)


def finish(model, report, return_report, quiet_reasons=(EXCLUDED,), warn=True):
    """Warn as the module docstring says; return model or (model, report)."""
    if warn and not report.changed:
        listed = "; ".join("%s (%s)" % item for item in report.skipped[:4])
        more = ", and %d more" % (len(report.skipped) - 4) if len(report.skipped) > 4 else ""
        warnings.warn("%s changed nothing: %s" % (report.transform, "skipped " + listed + more if listed else
                                                  "the model has no candidate"), stacklevel=3)
    elif warn:
        loud = [(n, why) for n, why in report.skipped if not any(q in why for q in quiet_reasons)]
        if loud:
            warnings.warn("%s left %d candidate(s) alone: %s" % (
                report.transform, len(loud), "; ".join("%s (%s)" % item for item in loud)), stacklevel=3)
    return (model, report) if return_report else model
