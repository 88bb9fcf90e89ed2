"""The demo's model, a small MobileNet-style CNN, in its two forms.

plain_model:  stem conv -> blocks of [depthwise 3x3 conv, ReLU, pointwise 1x1 conv, BatchNorm, ReLU]
              as people write them in plain PyTorch (two nn.Conv2d per block) -> pool -> 2 Linear.
effops_model: the same network with each depthwise -> ReLU -> pointwise chain replaced by one
              effops.nn.SeparableConv2d (built with SeparableConv2d.from_convs from a plain model,
              so both forms start from the same weights when given the same seed).
"""
import collections
import copy

import torch
from torch import nn

# (in, out, stride) of the separable blocks for width w: 32x32 -> 16x16 -> 8x8 -> 8x8 -> 4x4.
def _block_plan(w):
    return [(w, 2 * w, 2), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2)]


def _plain_block(cin, cout, stride):
    return nn.Sequential(collections.OrderedDict(
        depthwise=nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
        act=nn.ReLU(),
        pointwise=nn.Conv2d(cin, cout, 1),
        bn=nn.BatchNorm2d(cout),
        relu=nn.ReLU(),
    ))


def plain_model(num_classes=10, width=16, in_channels=1, seed=0):
    """The plain-PyTorch model; parameters drawn from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    layers = collections.OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()))
    for i, (cin, cout, stride) in enumerate(_block_plan(width)):
        layers["block%d" % (i + 1)] = _plain_block(cin, cout, stride)
    hidden = 8 * width
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc1=nn.Linear(8 * width, hidden),
                  fc_act=nn.ReLU(), fc2=nn.Linear(hidden, num_classes))
    return nn.Sequential(layers)


def effops_model(num_classes=10, width=16, in_channels=1, seed=0):
    """The effops model: plain_model's weights, each separable chain as one effops.nn.SeparableConv2d.

    Raises ImportError when this build has no effops.nn.SeparableConv2d."""
    from effops.nn import SeparableConv2d
    model = plain_model(num_classes, width, in_channels, seed)
    for name, block in list(model.named_children()):
        if not name.startswith("block"):
            continue
        sep = SeparableConv2d.from_convs(copy.deepcopy(block.depthwise), copy.deepcopy(block.pointwise),
                                         activation="relu")
        setattr(model, name, nn.Sequential(collections.OrderedDict(sep=sep, bn=block.bn, relu=block.relu)))
    return model


def prunable_layers(model):
    """{name: module} of the layers the demo prunes in a plain model: Linear and pointwise 1x1 convs."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1):
            out[name] = m
    return out
