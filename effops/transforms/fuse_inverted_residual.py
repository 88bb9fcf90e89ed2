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
be the same supported one. A squeeze-excitation block after the depthwise conv (MobileNetV3, EfficientNet)
is fused too when it is one module whose forward is exactly pool -> 1x1 conv -> activation -> 1x1 conv ->
gate (nn.Sigmoid or nn.Hardsigmoid) -> multiply (torchvision.ops.SqueezeExcitation and the usual SE class):
that module is swapped for nn.Identity and its convs move into the block. Any other fork after the
depthwise conv skips the chain, with the reason. A model torch.fx cannot trace is left alone, with that
reason in the report.
"""
import operator

import torch
import torch.nn as nn

from effops.nn.inverted_residual import InvertedResidual, check_convs
from effops.transforms import _report
from effops.transforms.fuse_separable import (_BATCHNORMS, _ELEMENTWISE, _Tracer, _activation_name, _fold_bn,
                                              _is_depthwise)

_ADDS = (operator.add, torch.add)
_MULS = (operator.mul, torch.mul)
_GATES = {nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
# Most calls in one chain: expand, BN, act, depthwise, BN, act, project, BN.
_CHAIN = 8


def _is_1x1(module):
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _match(mods, training):
    """(length, plan or None, reason or None) for a chain starting at mods[0] (a 1x1 conv, or the
    depthwise conv of a block without expansion), or None when mods is not an inverted-residual chain at
    all. plan: (expand, depthwise, project, activation, folded) with the BatchNorms folded into the convs."""
    expand, i = mods[0], 1
    if _is_depthwise(expand):
        expand, dw = None, mods[0]
    bns, acts = [None, None, None], [None, None]
    for stage in range(0 if expand is not None else 1, 2):
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
    if reason is None and expand is not None and names[0] != names[1]:
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
    return i, (convs[0], convs[1], convs[2], names[1], folded), None


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


def _owner_of_exactly(model, nodes):
    """The name of the innermost module whose forward calls exactly `nodes` (in order), or None."""
    stack = nodes[-1].meta.get("nn_module_stack") or {}
    for owner in reversed(list(stack)):
        inside = [n for n in nodes[-1].graph.nodes if owner in (n.meta.get("nn_module_stack") or {})]
        if inside == list(nodes):
            return owner if owner in dict(model.named_modules()) else None
        if len(inside) > len(nodes):
            return None
    return None


def _squeeze_excitation(model, last):
    """When `last`'s output forks into a squeeze-excitation module (module docstring): (its nodes in graph
    order, the module's name, (reduce conv, expand conv, activation, gate) as InvertedResidual takes them),
    or (None, None, reason) for an SE that cannot be fused; None when the fork is not one."""
    users = list(last.users)
    pools = [u for u in users if u.op == "call_module" and
             isinstance(model.get_submodule(u.target), nn.AdaptiveAvgPool2d)]
    muls = [u for u in users if u.op == "call_function" and u.target in _MULS and last in u.args]
    if len(users) != 2 or len(pools) != 1 or len(muls) != 1:
        return None
    nodes, mul = [pools[0]], muls[0]
    while len(nodes) < 6 and len(nodes[-1].users) == 1 and next(iter(nodes[-1].users)) is not mul:
        nodes.append(next(iter(nodes[-1].users)))
    if len(nodes[-1].users) != 1 or next(iter(nodes[-1].users)) is not mul or mul.kwargs or \
            set(mul.args) != {last, nodes[-1]}:
        return None
    nodes.append(mul)
    mods = [model.get_submodule(n.target) if n.op == "call_module" else None for n in nodes[:-1]]
    shape = [type(m).__name__ if m is not None else n.op for m, n in zip(mods, nodes)]
    if len(mods) != 5 or mods[0].output_size not in (1, (1, 1)) or not all(_is_1x1(m) for m in (mods[1], mods[3])) \
            or type(mods[4]) not in _GATES or not isinstance(mods[2], _ELEMENTWISE):
        return None, None, "a squeeze-excitation block of another form (%s) after the depthwise conv" % (
            " -> ".join(shape))
    activation = _activation_name(mods[2])
    if activation is None:
        return None, None, "unsupported squeeze-excitation activation %s" % mods[2]
    owner = _owner_of_exactly(model, nodes)
    if owner is None:
        return None, None, "the squeeze-excitation's pool, convs, gate and multiply are not one module's whole " \
                           "forward: it cannot be swapped out"
    return nodes, owner, (mods[1], mods[3], activation, _GATES[type(mods[4])])


def _chain_with_se(model, nodes, mods):
    """For a chain expand -> ... -> depthwise -> [BN] [act] whose output forks (nodes, mods: its calls):
    (nodes in graph order through project [BN], mods without the SE's, SE module name, SE) when an SE
    module and a project conv follow; (None, reason) for a recognisable SE that cannot be fused; None."""
    dw_at = next((i for i, m in enumerate(mods) if _is_depthwise(m)), None)
    if dw_at is None:
        return None
    end = dw_at + 1
    while end < len(mods) and isinstance(mods[end], _BATCHNORMS + _ELEMENTWISE) and end - dw_at <= 2:
        end += 1
    head = nodes[:end]
    found = _squeeze_excitation(model, head[-1])
    if found is None:
        return None
    se_nodes, owner, se = found
    if se_nodes is None:
        return None, se
    tail = [se_nodes[-1]]
    while len(tail) < 3 and len(tail[-1].users) == 1 and next(iter(tail[-1].users)).op == "call_module":
        tail.append(next(iter(tail[-1].users)))
    tail = tail[1:]
    tail_mods = [model.get_submodule(n.target) for n in tail]
    if not tail_mods or not _is_1x1(tail_mods[0]):
        return None, "no 1x1 conv after the squeeze-excitation"
    if len(tail_mods) > 1 and not isinstance(tail_mods[1], _BATCHNORMS):
        tail, tail_mods = tail[:1], tail_mods[:1]
    return head + se_nodes + tail, mods[:end] + tail_mods, owner, se


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
    skipped_dw, consumed, reached = [], set(), set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node in consumed:
            continue
        start = model.get_submodule(node.target)
        # Chains start at an expand conv, or at a depthwise conv no expand chain reached (a block without
        # expansion, fused here only with its squeeze-excitation: without, it is a separable chain).
        if not (_is_1x1(start) or (_is_depthwise(start) and node not in reached)):
            continue
        nodes = [node]
        while len(nodes) < _CHAIN and len(nodes[-1].users) == 1 and next(iter(nodes[-1].users)).op == "call_module":
            nodes.append(next(iter(nodes[-1].users)))
        reached.update(nodes)
        mods = [model.get_submodule(n.target) for n in nodes]
        found = _match(mods, model.training) if not _is_depthwise(start) else None
        name = names.get(id(mods[0]), node.target)
        se = se_owner = None
        if found is None:
            with_se = _chain_with_se(model, nodes, mods)
            if _is_depthwise(start) and (with_se is None or len(with_se) == 2):
                continue  # left to fuse_separable, which reports it
            if with_se is not None and len(with_se) == 2:
                report.skipped.append((name, with_se[1]))
                skipped_dw.append(next(m for m in mods if _is_depthwise(m)))
                continue
            if with_se is not None:
                nodes, mods, se_owner, se = with_se
                found = _match(mods, model.training)
                if found is not None and found[0] != len(mods):
                    found = None
        if found is None:
            continue
        length, plan, reason = found
        if se is None:
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
        block = InvertedResidual.from_convs(expand, dw, project, activation, residual=owner is not None, se=se)
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
                if n.op != "call_module" or (se_owner and n.target.startswith(se_owner + ".")):
                    continue  # the SE module's own calls: the module goes as a whole, below
                parent, _, attr = n.target.rpartition(".")
                setattr(model.get_submodule(parent), attr, nn.Identity())
            if se_owner:
                parent, _, attr = se_owner.rpartition(".")
                setattr(model.get_submodule(parent), attr, nn.Identity())
        report.changed.append((owner or name, "InvertedResidual(activation=%r, residual=%s%s%s)" % (
            activation, "in the op" if owner else ("added by the model" if add is not None else "none"),
            "" if se is None else ", squeeze-excitation (%s, %s)" % se[2:], ", BatchNorm folded" if folded else "")))
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
