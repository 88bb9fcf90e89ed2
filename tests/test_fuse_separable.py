"""effops.fuse_separable on MobileNetV2/V3-style models built here: same outputs, blocks swapped, the
chains left alone reported with their reasons (squeeze-excitation, train-mode BN, activations)."""
import copy
import warnings

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
def test_eval_mode_fuses_every_block_and_folds_batchnorm(layout):
    torch.manual_seed(0)
    model = mobilenet_v2_style()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused, report = effops.fuse_separable(copy.deepcopy(model), return_report=True)
    assert len(report.changed) == 6 and report.skipped == [] and fused.fuse_separable_report is report
    assert report.changed[1] == ("2.conv.1.0", "SeparableConv2d(activation='relu6', BatchNorm folded)")
    assert count(fused, SeparableConv2d) == 6
    with torch.no_grad():
        got = fused(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Every depthwise conv is now inside a SeparableConv2d; what remains outside is not depthwise.
    loose = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    inside = [m for s in fused.modules() if isinstance(s, SeparableConv2d) for m in (s.depthwise,)]
    assert len(loose) == len(inside) == 6


def test_train_mode_skips_blocks_with_batchnorm_between_and_says_so():
    model = mobilenet_v2_style().train()
    with pytest.warns(UserWarning, match="fuse_separable changed nothing: skipped 1.conv.0.0 .BatchNorm"):
        fused, report = effops.fuse_separable(model, return_report=True)
    assert report.changed == [] and len(report.skipped) == 6
    assert all("batch statistics" in why for _, why in report.skipped)
    assert count(fused, SeparableConv2d) == 0


def test_a_model_fused_with_folded_batchnorm_refuses_train():
    # Its weights hold the running statistics; in train mode the original normalizes by batch statistics
    # (issue #17: a MobileNetV3 put back into .train() silently computed something else).
    model = mobilenet_v2_style()
    randomize_bn(model)
    fused = effops.fuse_separable(copy.deepcopy(model).eval())
    with pytest.raises(RuntimeError, match="BatchNorm running statistics folded"):
        fused.train()
    fused.eval()  # eval stays allowed; so does training a model fused in train mode (no folding)
    plain = effops.fuse_separable(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 8, 1)))
    assert plain.train().training and isinstance(plain[0], SeparableConv2d)
    # Training with frozen BatchNorm (train-mode model, eval-mode BNs): folded, and it trains as the original.
    frozen = copy.deepcopy(model).train()
    for m in frozen.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    fused = effops.fuse_separable(copy.deepcopy(frozen))
    blocks = [m for m in fused.modules() if isinstance(m, SeparableConv2d)]
    assert len(blocks) == 6 and all(b.train().training for b in blocks)  # model.train() would unfreeze the BNs
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused(x), frozen(x), atol=1e-4, rtol=1e-4)


def test_train_mode_fuses_plain_chains_and_trains_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(), nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Sequential(nn.Conv2d(12, 12, 5, stride=2, padding=2, groups=12), nn.GELU()), nn.Conv2d(12, 6, 1),
        nn.Conv2d(6, 6, 3, groups=6), nn.LeakyReLU(), nn.Conv2d(6, 4, 1),  # unsupported activation: skipped
        nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.Conv2d(4, 5, 1),  # no activation: fused
    ).train()
    plain = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"left 1 candidate\(s\) alone: 9 \(unsupported activation LeakyReLU"):
        fused, rep = effops.fuse_separable(model, return_report=True)
    assert len(rep.changed) == 3 and rep.skipped_for("LeakyReLU") == ["9"]  # named by its place in the model
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
    with pytest.warns(UserWarning, match="changed nothing: the model has no candidate"):
        again, report = effops.fuse_separable(model, return_report=True)
    assert report.changed == report.skipped == []
    assert count(again, SeparableConv2d) == 6
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        effops.fuse_separable("resnet")


class SqueezeExcitation(nn.Module):
    """MobileNetV3's (torchvision.ops.SqueezeExcitation): pool, 1x1 down, ReLU, 1x1 up, Hardsigmoid, scale."""

    def __init__(self, channels, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


class Bottleneck(nn.Module):
    """A non-Sequential inverted residual as much published code writes it: layers as attributes, the
    residual in forward, an optional squeeze-excitation between the depthwise and the projecting conv."""

    def __init__(self, cin, hidden, cout, se):
        super().__init__()
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn0, self.act0 = nn.BatchNorm2d(hidden), nn.ReLU()
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(hidden), nn.Hardswish()  # MobileNetV3's
        self.se = SqueezeExcitation(hidden, 8) if se else nn.Identity()
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = cin == cout

    def forward(self, x):
        h = self.act1(self.bn1(self.dw(self.act0(self.bn0(self.expand(x))))))
        h = self.bn2(self.project(self.se(h)))
        return x + h if self.residual else h


class Net(nn.Module):
    def __init__(self, se=(False, True, False)):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList([Bottleneck(16, 32, 16, se[0]), Bottleneck(16, 48, 24, se[1]),
                                     Bottleneck(24, 48, 24, se[2])])
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def test_traced_non_sequential_model_fuses_and_reports_squeeze_excitation():
    torch.manual_seed(0)
    model = Net()
    randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="blocks.1.dw .a squeeze-excitation block"):
        fused, report = effops.fuse_separable(model, return_report=True)
    assert [n for n, _ in report.changed] == ["blocks.0.dw", "blocks.2.dw"]
    assert report.skipped_for("squeeze-excitation") == ["blocks.1.dw"]
    assert type(fused) is Net and isinstance(fused.blocks[0].dw, SeparableConv2d)
    assert all(isinstance(getattr(fused.blocks[0], n), nn.Identity) for n in ("bn1", "act1", "project", "bn2"))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-4)
    # The same network excluded by name, and one whose every chain has a squeeze-excitation: warned.
    with pytest.warns(UserWarning, match="left 1 candidate.s. alone: blocks.1.dw"):  # not the excluded one
        _, report = effops.fuse_separable(Net().eval(), exclude="blocks.0", return_report=True)
    assert report.skipped_for("excluded") == ["blocks.0.dw"]
    with pytest.warns(UserWarning, match="changed nothing: skipped blocks.0.dw .a squeeze-excitation"):
        effops.fuse_separable(Net(se=(True, True, True)).eval())


def test_a_module_called_twice_is_not_fused():
    # Swapping a module used in two places would change the other use too: a traced chain needs each
    # of its modules called once.
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.act, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.pw(self.act(self.dw(x))) + self.act(x)

    model = Twice()
    with pytest.warns(UserWarning, match="changed nothing: skipped dw .act is called 2 times in forward"):
        effops.fuse_separable(model)
    assert type(model.dw) is nn.Conv2d


def test_squeeze_excitation_in_a_sequential_that_does_not_trace():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.ReLU(), SqueezeExcitation(16, 4),
                nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1))

        def forward(self, x):
            if x.sum() > 1e30:  # data-dependent control flow: torch.fx cannot trace this model
                return x
            return self.body(x)

    model = Untraceable().eval()
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match=r"body.0 \(a squeeze-excitation block \(SqueezeExcitation\)"):
        _, report = effops.fuse_separable(model, return_report=True)
    assert [n for n, _ in report.changed] == ["body.5"] and report.skipped_for("squeeze") == ["body.0"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)
