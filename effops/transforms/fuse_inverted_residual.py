"""fuse_inverted_residual(model): swap expand 1x1 -> [BN] -> act -> depthwise -> [BN] -> act -> project 1x1
-> [BN] [+ x] chains (MobileNetV2/V3, MNASNet, EfficientNet blocks) for effops.nn.InvertedResidual.

Found in the torch.fx trace of the model (as fuse_separable does: a run of module calls, each module
called once in the whole forward, each output used only by the next call; the model keeps its class,
the graph is only read). Swapping the expand conv's module for the fused block and the chain's other
modules for nn.Identity computes the same through the model's own forward. When the chain's output is
added to the chain's input and the module whose forward does that add holds nothing else (the usual
block class: `x + self.block(x)`), that whole module is swapped instead, with the residual in the fused
op; otherwise the add stays where it is.

BatchNorm, activations and train mode follow fuse_separable: eval-mode BatchNorms are folded (the block
then refuses .train()), a train-mode BatchNorm (batch statistics) skips the chain, both activations must
be the same supported one. A squeeze-excitation block after the depthwise conv skips the chain, with that
reason. A model torch.fx cannot trace is left alone, with that reason in the report.
"""
import operator

import torch
import torch.nn as nn

from effops.nn.inverted_residual import InvertedResidual, check_convs
from effops.transforms import _report
from effops.transforms.fuse_separable import (_BATCHNORMS, _ELEMENTWISE, _Tracer, _activation_name, _fold_bn,
                                              _is_depthwise, _se_in_graph)

_ADDS = (operator.add, torch.add)
# Most calls in one chain: expand, BN, act, depthwise, BN, act, project, BN.
_CHAIN = 8


def _is_1x1(module):
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _match(mods, training):
    """(length, plan or None, reason or None) for a chain starting at mods[0] (a 1x1 conv), or None
    when mods is not an inverted-residual chain at all. plan: (expand, depthwise, project, activation,
    folded) with the BatchNorms folded into the convs."""
    expand, i = mods[0], 1
    bns, acts = [None, None, None], [None, None]
    for stage in range(2):
        if i < len(mods) and isinstance(mods[i], _BATCHNORMS):
            bns[stage], i = mods[i], i + 1
        if i < len(mods) and isinstance(mods[i], _ELEMENTWISE):
            acts[stage], i = mods[i], i + 1
        if stage == 0:
            if i >= len(mods) or not _is_depthwise(mods[i]) or mods[i].in_channels != expand.out_channels:
                return None
            dw, i = mods[i], i + 1
    if i >= len(mods) or not _is_1x1(mods[i]) or mods[i].in_channels != dw.out_channels:
        return None
    project, i = mods[i], i + 1
    if i < len(mods) and isinstance(mods[i], _BATCHNORMS) and not mods[i].training and \
            mods[i].running_mean is not None:
        bns[2], i = mods[i], i + 1
    names = [None if a is None else _activation_name(a) for a in acts]
    reason = check_convs(expand, dw, project)
    if reason is None and any(a is not None and n is None for a, n in zip(acts, names)):
        reason = "unsupported activation %s" % next(a for a, n in zip(acts, names) if a is not None and n is None)
    if reason is None and names[0] != names[1]:
        reason = "different activations after the expand and the depthwise conv (%s, %s)" % tuple(acts)
    if reason is None and any(bn is not None and (bn.training or bn.running_mean is None) for bn in bns[:2]):
        reason = "a BatchNorm inside the block uses batch statistics (train mode)"
    if reason is not None:
        return i, None, reason
    convs = [expand, dw, project]
    for k, bn in enumerate(bns):
        if bn is not None:
            convs[k] = _fold_bn(convs[k], bn)
    folded = any(bn is not None for bn in bns) and not training
    return i, (convs[0], convs[1], convs[2], names[0], folded), None


def _residual_owner(model, nodes, add):
    """The name of the module whose forward is exactly `nodes` then `add` (its input + the chain's
    output), or None."""
    stack = add.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    owner = list(stack)[-1]
    inside = [n for n in add.graph.nodes if owner in (n.meta.get("nn_module_stack") or {})]
    return owner if inside == list(nodes) + [add] and owner in dict(model.named_modules()) else None


def _residual_add(nodes):
    """The add of the chain's input to its output, if that is the only use of the output."""
    last, x = nodes[-1], nodes[0].args[0]
    if len(last.users) != 1:
        return None
    add = next(iter(last.users))
    if add.op == "call_function" and add.target in _ADDS and len(add.args) == 2 and not add.kwargs and \
            set(add.args) == {last, x}:
        return add
    return None


def find_and_fuse(model, report, patterns):
    """Swap every chain of `model` (module docstring), recording it in `report`. Returns the depthwise
    convs of the chains it skipped (fuse() reports each block once, not again as a separable chain)."""
    names = {id(m): name for name, m in model.named_modules()}
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001  (any tracing failure: nothing found, said in the report)
        report.skipped.append(("(model)", "torch.fx cannot trace it (%s: %s): inverted-residual blocks are found "
                               "in traced graphs only" % (type(exc).__name__, exc)))
        return []
    calls = {}
    for n in graph.nodes:
        if n.op == "call_module":
            key = id(model.get_submodule(n.target))
            calls[key] = calls.get(key, 0) + 1
    skipped_dw, consumed = [], set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node in consumed or not _is_1x1(model.get_submodule(node.target)):
            continue
        nodes = [node]
        while len(nodes) < _CHAIN and len(nodes[-1].users) == 1 and next(iter(nodes[-1].users)).op == "call_module":
            nodes.append(next(iter(nodes[-1].users)))
        mods = [model.get_submodule(n.target) for n in nodes]
        found = _match(mods, model.training)
        name = names.get(id(mods[0]), node.target)
        if found is None:
            # expand -> act -> depthwise -> act, then a fork: a squeeze-excitation block, if one, is reported.
            dw = next((m for m in mods[1:] if _is_depthwise(m)), None)
            if dw is not None and len(nodes[-1].users) > 1 and _is_1x1(mods[0]) and mods[0].out_channels == \
                    dw.in_channels:
                why = _se_in_graph(model, nodes[-1], dw)
                if why is not None:
                    report.skipped.append((name, why))
                    skipped_dw.append(dw)
            continue
        length, plan, reason = found
        nodes, mods = nodes[:length], mods[:length]
        if reason is None and any(calls[id(m)] > 1 for m in mods):
            shared = next(n for n, m in zip(nodes, mods) if calls[id(m)] > 1)
            reason = "%s is called %d times in forward: swapping it would change its other calls" % (
                shared.target, calls[id(model.get_submodule(shared.target))])
        if reason is None and _report.excluded(name, patterns):
            reason = _report.EXCLUDED
        if reason is not None:
            report.skipped.append((name, reason))
            skipped_dw.append(next(m for m in mods if _is_depthwise(m)))
            continue
        expand, dw, project, activation, folded = plan
        add = _residual_add(nodes)
        owner = _residual_owner(model, nodes, add) if add is not None else None
        block = InvertedResidual.from_convs(expand, dw, project, activation, residual=owner is not None)
        block.folded_batchnorm = folded
        block.training = mods[0].training  # the model's mode (the folded convs are new modules, in train mode)
        consumed.update(nodes)
        if owner is not None:
            parent, _, attr = owner.rpartition(".")
            setattr(model.get_submodule(parent), attr, block)
        else:
            parent, _, attr = nodes[0].target.rpartition(".")
            setattr(model.get_submodule(parent), attr, block)
            for n in nodes[1:]:
                parent, _, attr = n.target.rpartition(".")
                setattr(model.get_submodule(parent), attr, nn.Identity())
        report.changed.append((owner or name, "InvertedResidual(activation=%r, residual=%s%s)" % (
            activation, "in the op" if owner else ("added by the model" if add is not None else "none"),
            ", BatchNorm folded" if folded else "")))
    return skipped_dw


def fuse_inverted_residual(model, *, exclude=(), return_report=False):
    """Replace inverted-residual chains in `model` with InvertedResidual, in place (module docstring).

    exclude: module names or fnmatch patterns whose chains are left alone (a name covers everything under
    it; a chain is named by its expand conv). Returns the model, or (model, TransformReport) with
    return_report=True; the report is also `model.fuse_inverted_residual_report`.
    """
    _report.check_model(model)
    patterns = _report.exclude_patterns(exclude)
    _report.warn_unmatched(model, patterns, "fuse_inverted_residual")
    report = _report.TransformReport("fuse_inverted_residual")
    find_and_fuse(model, report, patterns)
    model.fuse_inverted_residual_report = report
    return _report.finish(model, report, return_report)
