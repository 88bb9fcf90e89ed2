"""effops.fuse_separable on a MobileNetV2-style model built here: same outputs, blocks swapped."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

import effops
from effops.nn import SeparableConv2d


def conv_bn_act(cin, cout, k, stride=1, groups=1):
    """torchvision's Conv2dNormActivation: a plain Sequential [conv, BN, ReLU6]."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (+ BN), residual when shapes allow."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_act(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_style(width=8, num_classes=10):
    # (expand, out channels, repeats, first stride) as in MobileNetV2, narrowed for a quick test.
    settings = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1)]
    layers, cin = [conv_bn_act(3, width, 3, 2)], width
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [conv_bn_act(cin, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def randomize_bn(model):
    # Non-trivial running statistics, so that folding them is actually tested.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_mode_fuses_every_block_and_folds_batchnorm(layout, caplog):
    torch.manual_seed(0)
    model = mobilenet_v2_style()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level(logging.INFO, logger="effops"):
        fused = effops.fuse_separable(copy.deepcopy(model))
    assert fused.fuse_separable_report["fused"] == 6 and fused.fuse_separable_report["skipped"] == 0
    assert count(fused, SeparableConv2d) == 6
    assert "fused 6" in caplog.text
    with torch.no_grad():
        got = fused(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Every depthwise conv is now inside a SeparableConv2d; what remains outside is not depthwise.
    loose = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    inside = [m for s in fused.modules() if isinstance(s, SeparableConv2d) for m in (s.depthwise,)]
    assert len(loose) == len(inside) == 6


def test_train_mode_skips_blocks_with_batchnorm_between_and_says_so():
    model = mobilenet_v2_style().train()
    fused = effops.fuse_separable(model)
    assert fused.fuse_separable_report["fused"] == 0
    assert fused.fuse_separable_report["skipped"] == 6
    assert "batch statistics" in fused.fuse_separable_report["reasons"][0]
    assert count(fused, SeparableConv2d) == 0


def test_train_mode_fuses_plain_chains_and_trains_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(), nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Sequential(nn.Conv2d(12, 12, 5, stride=2, padding=2, groups=12), nn.GELU()), nn.Conv2d(12, 6, 1),
        nn.Conv2d(6, 6, 3, groups=6), nn.Hardswish(), nn.Conv2d(6, 4, 1),  # unsupported activation: skipped
        nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.Conv2d(4, 5, 1),  # no activation: fused
    ).train()
    plain = copy.deepcopy(model)
    fused = effops.fuse_separable(model)
    rep = fused.fuse_separable_report
    assert (rep["fused"], rep["skipped"]) == (3, 1) and "Hardswish" in rep["reasons"][0]
    assert rep["reasons"][0].startswith("9 (Conv2d): ")  # the skipped chain named by its place in the model
    assert [m.activation for m in fused.modules() if isinstance(m, SeparableConv2d)] == ["silu", "gelu", None]
    assert isinstance(fused[5], nn.BatchNorm2d)  # a train-mode BN after the 1x1 conv stays in place
    x = torch.randn(2, 3, 13, 11)
    y, want = fused(x), plain(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()
    # Parameters are shared, not copied, in train mode: the same tensors receive the same gradients.
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_idempotent_and_rejects_non_modules():
    model = mobilenet_v2_style().eval()
    effops.fuse_separable(model)
    again = effops.fuse_separable(model)
    assert again.fuse_separable_report == {"fused": 0, "skipped": 0, "reasons": []}
    assert count(again, SeparableConv2d) == 6
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        effops.fuse_separable("resnet")
