"""effops.fuse / effops.fuse_inverted_residual on the benchmark networks (benchmarks/models.py) and on
hand-written blocks: what is fused, what is skipped and why, and that the fused model computes the same."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import effops
from effops.nn import InvertedResidual, SeparableConv2d
from effops.nn.sparse_linear import SparseConv1x1
from benchmarks import models
from conftest import compiled_with_freezing

SIZE = 64  # small images: the networks' structure is what matters here


def calibrated(name):
    torch.manual_seed(0)
    return models.calibrate_batchnorm(models.MODELS[name](), batches=1, batch=2, size=SIZE)


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


# name: (InvertedResidual blocks, of which with the residual in the op, SeparableConv2d, skipped)
EXPECTED = {"mobilenet_v2": (16, 10, 1, 0), "mnasnet1_0": (16, 10, 1, 0), "mobilenet_v3_large": (14, 9, 1, 0),
            "efficientnet_b0": (16, 9, 0, 0)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_networks(name):
    model = calibrated(name)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, report = effops.fuse(copy.deepcopy(model), return_report=True)
    blocks, in_op, separable, skipped = EXPECTED[name]
    assert count(fused, InvertedResidual) == blocks
    assert sum(m.residual for m in fused.modules() if isinstance(m, InvertedResidual)) == in_op
    assert count(fused, SeparableConv2d) == separable
    assert not any(m.training or m.packed is None for m in fused.modules() if isinstance(m, InvertedResidual))
    assert len(report.changed) == blocks + separable and len(report.skipped) == skipped
    assert len(report.skipped_for("squeeze-excitation")) == skipped
    assert len(caught) == (1 if skipped else 0) and fused.fuse_report is report
    with torch.no_grad():
        got = fused(x)
        got_cl = fused.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    scale = want.abs().max()
    # fp32 through ~50 layers with BatchNorm folded into the weights: ~1e-5 of the output scale
    assert (got - want).abs().max() <= 1e-4 * scale and (got_cl - want).abs().max() <= 1e-4 * scale
    if blocks:
        with pytest.raises(RuntimeError, match="folded"):
            fused.train()


class Plain(nn.Module):
    """A block whose forward does more than the add: the add stays in the model, the rest is fused."""

    def __init__(self, c=8, act=nn.ReLU6):
        super().__init__()
        self.expand, self.act1 = nn.Conv2d(c, 4 * c, 1), act()
        self.dw, self.act2 = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), act()
        self.project = nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        y = x + self.project(self.act2(self.dw(self.act1(self.expand(x)))))
        return y * 0.5


def test_residual_kept_in_the_model_when_its_owner_does_more():
    model = Plain().eval()
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        want = model(x)
        effops.fuse_inverted_residual(model)
        assert isinstance(model.expand, InvertedResidual) and not model.expand.residual
        assert isinstance(model.project, nn.Identity)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_unsupported_and_mixed_activations_exclude_and_untraceable_are_reported():
    model = nn.Sequential(Plain(act=nn.LeakyReLU), Plain(), Plain())
    model[2].act2 = nn.SiLU()
    with pytest.warns(UserWarning, match="changed nothing"):
        _, report = effops.fuse_inverted_residual(model, exclude="1", return_report=True)
    reasons = dict(report.skipped)
    assert "unsupported activation" in reasons["0.expand"] and reasons["1.expand"] == "excluded by name"
    assert "different activations" in reasons["2.expand"] and not report.changed

    class Branchy(Plain):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    with pytest.warns(UserWarning, match="changed nothing"):
        _, report = effops.fuse_inverted_residual(Branchy(), return_report=True)
    assert "cannot trace" in report.skipped[0][1]


def test_train_mode_skips_batch_statistics_and_frozen_batchnorm_trains():
    model = calibrated("mobilenet_v2").train()
    with pytest.warns(UserWarning, match="changed nothing"):
        _, report = effops.fuse(copy.deepcopy(model), return_report=True)
    # 16 blocks, and the first (no expand conv) as a separable chain; each reported once
    assert count(model, InvertedResidual) == 0 and len(report.skipped) == len(report.skipped_for("batch stat")) == 17
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            m.eval()  # frozen BatchNorm: folded, and the fused model trains (no dropout: outputs comparable)
    x = torch.randn(2, 3, SIZE, SIZE)
    want = model(x)
    fused = effops.fuse(copy.deepcopy(model))
    assert count(fused, InvertedResidual) == 16 and not any(
        m.folded_batchnorm for m in fused.modules() if isinstance(m, InvertedResidual))
    got = fused(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    got.square().mean().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_prune_leaves_a_fused_blocks_convs_dense_and_says_so():
    # InvertedResidual reads its convs' weights itself (packed): a SparseConv1x1 there would not enforce
    # its mask (and the packed weights would go stale), so prune leaves them dense and reports why.
    model = Plain().eval()
    effops.fuse_inverted_residual(model)
    x = torch.randn(1, 8, 7, 9)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning):
        _, report = effops.prune(model, 0.5, return_report=True)
    assert count(model, SparseConv1x1) == 0
    assert any("InvertedResidual reads its convs" in why for _, why in report.skipped)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=0, rtol=0)


class SEBlock(nn.Module):
    """A MobileNetV3/EfficientNet block written as model code does: expand, depthwise, a squeeze-excitation
    module, project, the residual add in forward."""

    def __init__(self, c=8, hidden=24, se=None, act=nn.Hardswish, expand=True):
        super().__init__()
        layers = [nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()] if expand else []
        layers += [nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [se if se is not None else models.SqueezeExcitation(hidden, 8)]
        layers += [nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


def _random_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("expand", [True, False], ids=["expand", "no_expand"])
def test_squeeze_excitation_block_is_fused_with_its_residual(expand):
    torch.manual_seed(0)
    model = _random_bn(nn.Sequential(SEBlock(hidden=24 if expand else 8, expand=expand), SEBlock(
        hidden=24 if expand else 8, expand=expand, act=nn.SiLU,
        se=models.SqueezeExcitation(24 if expand else 8, 4, act=nn.SiLU, gate=nn.Sigmoid))))
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        want = model(x)
    _, report = effops.fuse_inverted_residual(model, return_report=True)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 2 and all(b.residual and b.se_reduce is not None for b in blocks)
    assert [(b.se_activation, b.se_gate) for b in blocks] == [("relu", "hardsigmoid"), ("silu", "sigmoid")]
    assert (blocks[0].expand is None) == (not expand)
    assert all("squeeze-excitation" in what for _, what in report.changed) and not report.skipped
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


class GateTanh(models.SqueezeExcitation):
    def __init__(self, c):
        super().__init__(c, 4, gate=nn.Tanh)


class SEDoesMore(models.SqueezeExcitation):
    def __init__(self, c):
        super().__init__(c, 4)

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) + 1.0


@pytest.mark.parametrize("se, reason", [(GateTanh, "another form"), (SEDoesMore, "not one module's whole")])
def test_squeeze_excitation_that_cannot_be_fused_is_reported(se, reason):
    model = _random_bn(SEBlock(se=se(24)))
    with pytest.warns(UserWarning, match="changed nothing"):
        _, report = effops.fuse(model, return_report=True)
    assert len(report.skipped) == 1 and reason in report.skipped[0][1] and not report.changed


def test_squeeze_excitation_block_trains_with_frozen_batchnorm():
    """Fused in train mode with frozen BatchNorm: the SE's convs are the model's own parameters and
    receive the gradients the unfused model gives them."""
    torch.manual_seed(0)
    model = _random_bn(SEBlock()).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    fused = effops.fuse_inverted_residual(copy.deepcopy(model))
    assert count(fused, InvertedResidual) == 1
    x = torch.randn(2, 8, 9, 7)
    model(x).square().mean().backward()
    fused(x).square().mean().backward()
    se, se_fused = model.block[6], next(m for m in fused.modules() if isinstance(m, InvertedResidual))
    torch.testing.assert_close(se_fused.se_reduce.weight.grad, se.fc1.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(se_fused.se_expand.bias.grad, se.fc2.bias.grad, atol=1e-5, rtol=1e-4)


def test_compiled_nchw_model_keeps_channels_last_through_fused_blocks():
    """Under torch.compile with inductor's freezing, an NCHW model's convolutions run channels-last (inductor's
    layout optimization); the fused ops take any layout (flexible_layout), so inductor hands them those
    channels-last tensors instead of converting to NCHW and back around every block. The compiled fused model
    computes what the eager original does."""
    model = calibrated("mnasnet1_0").eval()
    fused = effops.fuse(copy.deepcopy(model))
    x = torch.randn(2, 3, SIZE, SIZE)
    got, strides = compiled_with_freezing(fused, x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    # the strides inductor checks on every fused block's output: channels-last (C's stride 1), as its input's
    outputs = strides["torch.ops.effops.inverted_residual.default"]
    assert len(outputs) == EXPECTED["mnasnet1_0"][0]
    for sizes, st in outputs:
        assert st[1] == 1, (sizes, st)
