"""fuse_separable(model): swap depthwise conv -> [BN] -> [activation] -> 1x1 conv -> [BN] chains for
SeparableConv2d.

Chains are found inside nn.Sequential containers (how MobileNet-style models are written), looking
through nested plain Sequentials (torchvision's Conv2dNormActivation is one), so a chain may start in a
nested [dw conv, BN, ReLU6] and end at the 1x1 conv that follows it. The dw conv's slot takes the
SeparableConv2d; the other slots of the chain become nn.Identity.

* A BatchNorm in eval mode (running statistics) is folded into the conv it follows.
* A BatchNorm in train mode normalizes with batch statistics, which no fixed weights reproduce: a chain
  with one between the convs is skipped; one after the 1x1 conv is left in place after the fused block.
* Activations fused: ReLU, ReLU6 (and Hardtanh(0, 6)), GELU (exact form), SiLU. Others (Hardswish,
  tanh-GELU, ...) make the chain skipped, with the reason.

The model is changed in place and returned; `model.fuse_separable_report` holds {"fused", "skipped",
"reasons"} and the counts are logged on the "effops" logger.
"""
import logging

import torch
import torch.nn as nn

from effops.nn.separable_conv import SeparableConv2d, check_depthwise, check_pointwise

log = logging.getLogger("effops")

_BATCHNORMS = (nn.BatchNorm2d,)
# Modules that may stand between the two convs of a chain (so a chain is recognised and, if one is not
# fusable, reported as skipped rather than silently ignored).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
                nn.ELU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.PReLU)


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


def _match(slots, i):
    """Try a chain starting at slots[i]. Returns (end index, plan or None, reason or None) or None."""
    dw = slots[i][2]
    if not isinstance(dw, nn.Conv2d) or dw.groups == 1 or dw.groups != dw.in_channels:
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
    if not (isinstance(pw, nn.Conv2d) and tuple(pw.kernel_size) == (1, 1) and pw.in_channels == dw.out_channels):
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
    if bn1 is not None:
        dw = _fold_bn(dw, bn1)
    if bn2 is not None:
        if bn2.running_mean is None:
            bn2, end = None, j
        else:
            pw = _fold_bn(pw, bn2)
    return end, SeparableConv2d.from_convs(dw, pw, activation=activation), None


def fuse_separable(model):
    """Replace depthwise-separable chains in `model`'s nn.Sequentials with SeparableConv2d, in place.

    Returns the model; `model.fuse_separable_report` = {"fused": int, "skipped": int, "reasons": [str]}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError("model must be an nn.Module, got %s" % type(model).__name__)
    fused, reasons, nested = 0, [], set()
    names = {id(m): name for name, m in model.named_modules()}  # before any swap: where each chain sits
    for module in list(model.modules()):
        if not _is_plain_sequential(module) or id(module) in nested:
            continue
        slots = _slots(module, [], nested)
        i = 0
        while i < len(slots):
            found = _match(slots, i)
            if found is None:
                i += 1
                continue
            end, block, reason = found
            if block is None:
                first = slots[i][2]
                reasons.append("%s (%s): %s" % (names.get(id(first), "?"), type(first).__name__, reason))
            else:
                container, name, _ = slots[i]
                setattr(container, name, block)
                for container, name, _ in slots[i + 1:end + 1]:
                    setattr(container, name, nn.Identity())
                fused += 1
            i = end + 1
    report = {"fused": fused, "skipped": len(reasons), "reasons": reasons}
    log.info("fuse_separable: fused %d depthwise-separable block(s), skipped %d%s", fused, len(reasons),
             "".join("\n  skipped: " + r for r in reasons))
    model.fuse_separable_report = report
    return model
