"""benchmarks/models.py: the full-size models build with their papers' parameter counts, and the
transforms find in them what the issue counted (fusable chains, squeeze-excitation breaks, attention)."""
import copy
import warnings

import pytest
import torch

import effops
from benchmarks import models
from effops.nn import Int8Linear, SeparableConv2d


@pytest.mark.parametrize("name", list(models.MODELS))
def test_builds_with_the_papers_parameter_count(name):
    model = models.MODELS[name]()
    assert models.count_params(model) == models.PARAMS[name]


# (fused, skipped for squeeze-excitation) per CNN: every chain of MobileNetV2 and MNASNet; MobileNetV3-
# Large's 7 without SE (4 of them with Hardswish); none of EfficientNet-B0's, all 16 broken by SE.
CHAINS = {"mobilenet_v2": (17, 0), "mobilenet_v3_large": (7, 8), "mnasnet1_0": (17, 0), "efficientnet_b0": (0, 16)}


@pytest.mark.parametrize("name", list(models.CNNS))
def test_fuse_separable_finds_every_chain_and_keeps_the_outputs(name):
    torch.manual_seed(0)
    model = models.calibrate_batchnorm(models.CNNS[name](), batches=1, batch=2, size=64)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the squeeze-excitation skips warn
        fused, report = effops.fuse_separable(copy.deepcopy(model), return_report=True)
    assert (len(report.changed), len(report.skipped_for("squeeze-excitation"))) == CHAINS[name]
    assert len(report.skipped) == CHAINS[name][1]
    assert sum(isinstance(m, SeparableConv2d) for m in fused.modules()) == CHAINS[name][0]
    with torch.no_grad():
        got = fused(x)
    # Against the model in float64: the fused model's error at most twice the original's fp32 error.
    err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got) <= 2 * err(want) + 1e-6, (err(got), err(want))


def test_vit_b_32_prune_takes_attention_and_mlp_quantize_leaves_attention_dense():
    model = models.VisionTransformer(depth=2).eval()  # ViT-B/32's layers, 2 of its 12 blocks (time)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense against the caller's will
        _, report = effops.prune(copy.deepcopy(model), 0.9, pattern="block", block_size=32, exclude="heads",
                                 return_report=True)
    assert len(report.changed) == 6 and report.skipped == [("heads.head", "excluded by name")]
    assert [n for n, _ in report.changed if n.endswith("self_attention")] == ["layers.0.self_attention",
                                                                            "layers.1.self_attention"]
    with pytest.warns(UserWarning, match="out_proj"):
        _, report = effops.quantize(model, return_report=True)  # the default size policy takes 768-wide layers
    assert len(report.changed) == 5 and sum(isinstance(m, Int8Linear) for m in model.modules()) == 5
