"""fuse_separable(model): swap depthwise conv -> [BN] -> [activation] -> 1x1 conv -> [BN] chains for
SeparableConv2d.

Where chains are found:
* In a model torch.fx can trace (most published model code, nn.Sequential or not): the traced graph
  shows which module calls feed which. A chain is a run of module calls, each called once in the whole
  forward, each output used only by the next call. Swapping the depthwise conv's module for the fused
  block and the chain's other modules for nn.Identity then computes the same thing through the model's
  own forward (the model stays its own class; the graph is only read).
* Otherwise, inside nn.Sequential containers (how MobileNet-style models are written), looking through
  nested plain Sequentials (torchvision's Conv2dNormActivation is one), so a chain may start in a nested
  [dw conv, BN, ReLU6] and end at the 1x1 conv that follows it.

* A BatchNorm in eval mode (running statistics) is folded into the conv it follows. In a model fused in
  eval mode the fused block then refuses .train() (a RuntimeError): the original would compute with
  batch statistics there. A train-mode model with frozen (eval-mode) BatchNorms trains as fused.
* A BatchNorm in train mode normalizes with batch statistics, which no fixed weights reproduce: a chain
  with one between the convs is skipped; one after the 1x1 conv is left in place after the fused block.
* Activations fused: ReLU, ReLU6 (and Hardtanh(0, 6)), GELU (exact form), SiLU, Hardswish. Others
  (tanh-GELU, LeakyReLU, ...) make the chain skipped, with the reason.
* A squeeze-excitation block between the depthwise and the 1x1 conv (MobileNetV3, EfficientNet) makes
  the chain skipped, with that reason: the fused op has no place for it.

Returns the model, changed in place, or (model, TransformReport) with return_report=True; the report
is also kept as `model.fuse_separable_report`. Warns as every transform does (effops.transforms._report).
"""
import collections

import torch
import torch.fx
import torch.nn as nn

from effops.nn.int8_linear import Int8Linear
from effops.nn.separable_conv import SeparableConv2d, check_depthwise, check_pointwise
from effops.nn.sparse_linear import SparseConv1x1, SparseLinear
from effops.transforms import _report

_BATCHNORMS = (nn.BatchNorm2d,)
# Modules that may stand between the two convs of a chain (so a chain is recognised and, if one is not
# fusable, reported as skipped rather than silently ignored).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.PReLU)
_SE = "squeeze-excitation"
# How far past the depthwise conv's (activated) output a 1x1 conv is looked for in a traced graph, to
# tell a squeeze-excitation block (pool, two small convs, gate, multiply) from an unrelated fork.
_SE_SEARCH_NODES = 16


def _activation_name(module):
    """The dwpw_conv2d activation computing `module`, or None if it has none."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.ReLU6 or (type(module) is nn.Hardtanh and module.min_val == 0 and module.max_val == 6):
        return "relu6"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.Hardswish:
        return "hardswish"
    return None


def _is_plain_sequential(module):
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _slots(seq, out, nested):
    """Flatten `seq` into (container, name, module) slots, expanding nested plain Sequentials."""
    for name, child in seq.named_children():
        if _is_plain_sequential(child):
            nested.add(id(child))
            _slots(child, out, nested)
        else:
            out.append((seq, name, child))
    return out


def _fold_bn(conv, bn):
    """A copy of `conv` whose output equals bn(conv(x)) with bn's running statistics."""
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        bias = (bias - bn.running_mean) * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        folded.bias.copy_(bias.to(conv.weight.dtype))
    return folded


def _is_depthwise(module):
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _is_pointwise_after(module, dw):
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and module.in_channels == dw.out_channels)


def _squeeze_excitation(module):
    """True for a module that looks like a squeeze-excitation block (a global pool inside, or the name)."""
    name = type(module).__name__.lower()
    return ("squeeze" in name or "excit" in name or name.startswith("se") or
            any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in module.modules()))


def _match(slots, i):
    """Try a chain starting at slots[i]. Returns (end index, plan or None, reason or None) or None."""
    dw = slots[i][2]
    if not _is_depthwise(dw):
        return None
    j, bn1, act = i + 1, None, None
    while j < len(slots) and isinstance(slots[j][2], nn.Identity):
        j += 1
    if j < len(slots) and isinstance(slots[j][2], _BATCHNORMS):
        bn1, j = slots[j][2], j + 1
    if j < len(slots) and isinstance(slots[j][2], _ELEMENTWISE):
        act, j = slots[j][2], j + 1
    while j < len(slots) and isinstance(slots[j][2], nn.Identity):
        j += 1
    if j >= len(slots):
        return None
    pw = slots[j][2]
    if not _is_pointwise_after(pw, dw):
        if _squeeze_excitation(pw) and j + 1 < len(slots) and _is_pointwise_after(slots[j + 1][2], dw):
            return j + 1, None, _se_reason(type(pw).__name__)
        return None
    end, bn2 = j, None
    if j + 1 < len(slots) and isinstance(slots[j + 1][2], _BATCHNORMS) and not slots[j + 1][2].training:
        bn2, end = slots[j + 1][2], j + 1
    reason = check_depthwise(dw) or check_pointwise(pw, dw)
    activation = None if act is None else _activation_name(act)
    if reason is None and act is not None and activation is None:
        reason = "unsupported activation %s" % act
    if reason is None and bn1 is not None and (bn1.training or bn1.running_mean is None):
        reason = "BatchNorm between the convs uses batch statistics (train mode)"
    if reason is not None:
        return end, None, reason
    folded = False
    if bn1 is not None:
        dw, folded = _fold_bn(dw, bn1), True
    if bn2 is not None:
        if bn2.running_mean is None:
            bn2, end = None, j
        else:
            pw, folded = _fold_bn(pw, bn2), True
    block = SeparableConv2d.from_convs(dw, pw, activation=activation)
    # An eval-mode model's .train() would switch its BatchNorms to batch statistics: the block refuses it.
    # A train-mode model with eval-mode (frozen) BatchNorms keeps them frozen: nothing to refuse.
    block.folded_batchnorm = folded and not slots[i][2].training
    return end, block, None


def _se_reason(what):
    return ("a %s block (%s) between the depthwise and the 1x1 conv: the fused op has no place for it"
            % (_SE, what))


class _Tracer(torch.fx.Tracer):
    """Treats effops' own modules as single calls (their forwards check shapes in Python)."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (SeparableConv2d, SparseLinear, SparseConv1x1, Int8Linear)):
            return True
        return super().is_leaf_module(m, qualname)


def _graph_chains(model):
    """Chains of module calls from a torch.fx trace: [(slots, reason or None)], or None if the model
    does not trace. slots: (parent, attribute, module), each module called once in the forward and its
    output used only by the next slot's call; reason: why a chain that looks fusable cannot be (a
    squeeze-excitation block, a module called more than once)."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001  (any tracing failure: fall back to nn.Sequential containers)
        return None
    calls = collections.Counter(id(model.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module")

    def slot(node):
        parent, _, attr = node.target.rpartition(".")
        return model.get_submodule(parent), attr, model.get_submodule(node.target)

    def times(node):
        return calls[id(model.get_submodule(node.target))] if node.op == "call_module" else 0

    def shared(node):
        return ("%s is called %d times in forward: swapping it for the fused block or nn.Identity would change "
                "its other calls" % (node.target, times(node)))

    chains, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or not _is_depthwise(model.get_submodule(node.target)):
            continue
        if times(node) > 1:
            if id(model.get_submodule(node.target)) not in seen:
                seen.add(id(model.get_submodule(node.target)))
                chains.append(([slot(node)], shared(node)))
            continue
        nodes = [node]
        while len(nodes) < 6 and len(nodes[-1].users) == 1 and times(next(iter(nodes[-1].users))):
            nodes.append(next(iter(nodes[-1].users)))
        chain = [slot(n) for n in nodes]
        found = _match(chain, 0)
        first_shared = next((i for i, n in enumerate(nodes) if times(n) > 1), len(nodes))
        reason = None
        if found is not None and first_shared <= found[0]:
            reason = shared(nodes[first_shared])  # a chain but for a module with other calls (one self.act)
        elif found is None and len(nodes[-1].users) > 1:
            reason = _se_in_graph(model, nodes[-1], chain[0][2])
        chains.append((chain[:first_shared], reason))
    return chains


def _se_in_graph(model, node, dw):
    """A squeeze-excitation reason if `node`'s output forks and, within a few nodes, reaches a 1x1 conv
    taking dw's channels through a multiply (the gate), else None."""
    seen, frontier, where = set(), [(node, False)], "traced: pool, gate and multiply"
    while frontier and len(seen) < _SE_SEARCH_NODES:
        cur, through_mul = frontier.pop(0)
        for user in cur.users:
            if user in seen:
                continue
            seen.add(user)
            mul = through_mul or (user.op == "call_function"
                                  and getattr(user.target, "__name__", "") in ("mul", "mul_"))
            if user.op == "call_module":
                if _is_pointwise_after(model.get_submodule(user.target), dw):
                    if mul:
                        return _se_reason(where)
                    continue
                parent = user.target.rpartition(".")[0]
                if parent and _squeeze_excitation(model.get_submodule(parent)):
                    where = "%s %s" % (type(model.get_submodule(parent)).__name__, parent)
            frontier.append((user, mul))
    return None


def fuse_separable(model, *, exclude=(), return_report=False):
    """Replace depthwise-separable chains in `model` with SeparableConv2d, in place (module docstring).

    exclude: module names or fnmatch patterns whose chains are left alone (a name covers everything
    under it). Returns the model, or (model, TransformReport) with return_report=True; the report is
    also `model.fuse_separable_report` (.changed: the fused chains by their depthwise conv's name;
    .skipped: the chains left alone, with the reason).
    """
    _report.check_model(model)
    patterns = _report.exclude_patterns(exclude)
    _report.warn_unmatched(model, patterns, "fuse_separable")
    report = _report.TransformReport("fuse_separable")
    names = {id(m): name for name, m in model.named_modules()}  # before any swap: where each chain sits
    chains = _graph_chains(model)
    traced = chains is not None
    if not traced:
        chains = [(slots, None) for slots in _sequential_runs(model)]
    for slots, reason in chains:
        if reason is not None:
            report.skipped.append((names.get(id(slots[0][2]), "?"), reason))
            continue
        i = 0
        while i < len(slots):
            found = _match(slots, i)
            if found is None:
                if traced:  # a traced chain starts at its depthwise conv; a later one has its own chain
                    break
                i += 1
                continue
            end, block, reason = found
            name = names.get(id(slots[i][2]), "?")
            if reason is None and _report.excluded(name, patterns):
                reason = _report.EXCLUDED
            if block is None or reason is not None:
                report.skipped.append((name, reason))
            else:
                container, attr, _ = slots[i]
                setattr(container, attr, block)
                for container, attr, _ in slots[i + 1:end + 1]:
                    setattr(container, attr, nn.Identity())
                report.changed.append((name, "SeparableConv2d(activation=%r%s)" % (
                    block.activation, ", BatchNorm folded" if block.folded_batchnorm else "")))
            i = end + 1
            if traced:
                break
    model.fuse_separable_report = report
    return _report.finish(model, report, return_report)


def _sequential_runs(model):
    """The flattened slots of each outermost plain nn.Sequential of `model`."""
    nested, runs = set(), []
    for module in list(model.modules()):
        if _is_plain_sequential(module) and id(module) not in nested:
            runs.append(_slots(module, [], nested))
    return runs
