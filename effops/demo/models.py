"""The demo's model, a small MobileNetV2-style CNN of inverted-residual blocks, and its effops forms.

plain_model: stem conv -> six inverted-residual blocks [expand 1x1, BN, ReLU6, depthwise 3x3, BN, ReLU6,
             project 1x1, BN (+ x)] as people write them in plain PyTorch -> pool -> 2 Linear.
The effops side starts from the same module tree and weights (effops_model) and changes its form per
stage with effops.fuse:
- inference (every stage): effops.fuse on an eval-mode copy, each block one effops.nn.InvertedResidual
  with its BatchNorms folded in;
- fine-tuning with frozen BatchNorm (fuse_for_frozen_bn_training): the blocks fused in train mode, so the
  training step runs the fused op forward and its recomputing backward.
Training from scratch normalizes by batch statistics, which no fused block computes: there the effops
model is the plain module tree (effops.optim.AdamW is its only effops piece).
"""
import collections

import torch
from torch import nn

EXPANSION = 6


# (in, out, stride) of the blocks for width w, at 32x32 -> 32x32 -> 16x16 -> 16x16 -> 8x8 -> 8x8 -> 8x8. The
# last block widens to 16 w features so that fc1 (16 w x 16 w) reaches effops.quantize's min_features of
# 128 at the default width 8.
def _block_plan(w):
    return [(w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 16 * w, 1)]


class InvertedResidualBlock(nn.Module):
    """MobileNetV2's block in plain PyTorch: `conv` is the expand/depthwise/project Sequential; the input
    is added when stride is 1 and the channels match."""

    def __init__(self, cin, cout, stride, expansion=EXPANSION):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(collections.OrderedDict(
            expand=nn.Conv2d(cin, hidden, 1, bias=False), bn1=nn.BatchNorm2d(hidden), act1=nn.ReLU6(),
            depthwise=nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            bn2=nn.BatchNorm2d(hidden), act2=nn.ReLU6(),
            project=nn.Conv2d(hidden, cout, 1, bias=False), bn3=nn.BatchNorm2d(cout),
        ))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def plain_model(num_classes=10, width=8, in_channels=1, seed=0):
    """The plain-PyTorch model; parameters drawn from torch.manual_seed(seed). Its weights are channels_last,
    so its convolutions (and the fused op, which reads channels-last) run in torch's faster layout here."""
    torch.manual_seed(seed)
    layers = collections.OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU6()))
    for i, (cin, cout, stride) in enumerate(_block_plan(width)):
        layers["block%d" % (i + 1)] = InvertedResidualBlock(cin, cout, stride)
    features = _block_plan(width)[-1][1]
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc1=nn.Linear(features, features),
                  fc_act=nn.ReLU(), fc2=nn.Linear(features, num_classes))
    return nn.Sequential(layers).to(memory_format=torch.channels_last)


def effops_model(num_classes=10, width=8, in_channels=1, seed=0):
    """plain_model, for the effops side: the same modules and weights, fused per stage by effops.fuse.

    Raises ImportError when this build has no effops.nn.InvertedResidual or effops.fuse."""
    from effops.nn import InvertedResidual  # noqa: F401  (the piece every fused form needs)
    from effops.transforms import fuse  # noqa: F401
    return plain_model(num_classes, width, in_channels, seed)


def freeze_batchnorm(model):
    """Put model's BatchNorms in eval mode for good (running statistics, not batch ones) and mark the
    model, so that train.train_step's model.train() keeps them there. Returns model."""
    model.batchnorm_frozen = True
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def fuse_for_frozen_bn_training(model):
    """model (its BatchNorms frozen) with each inverted-residual block fused in train mode: the
    BatchNorms folded into new conv parameters, the block one InvertedResidual whose training step
    runs the fused op. Returns (model, fuse report)."""
    import warnings

    from effops.transforms import fuse
    freeze_batchnorm(model.train())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says what was fused; the table's notes print it
        model, report = fuse(model, return_report=True)
    return freeze_batchnorm(model), report


def prunable_layers(model):
    """{name: module} of the layers the demo prunes in a plain model: the Linear classifier head. The
    blocks' 1x1 convs stay dense: in a fused InvertedResidual they are read by the fused op, which has no
    sparse kernel."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
