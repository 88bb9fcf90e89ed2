"""effops.prune and effops.GradualPruner: which weights go, the patterns, training keeps exact zeros."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.nn import SparseLinear
from effops.nn.sparse_linear import SparseConv1x1
from effops.ops.masked_linear import mask_fits


def mlp(seed=0, width=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def test_unstructured_layer_scope_removes_the_smallest_weights():
    model = mlp()
    before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    effops.prune(model, 0.75)
    layers = [m for m in model if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    for layer, w in zip(layers, before):
        assert layer.sparsity == pytest.approx(0.75, abs=1 / w.numel())
        kept, pruned = w.abs()[layer.mask], w.abs()[~layer.mask]
        assert kept.min() >= pruned.max()
        assert torch.equal(layer.weight.detach(), w * layer.mask)


def test_block_pattern_gives_block_constant_masks():
    model = mlp(width=96)
    effops.prune(model, 0.5, pattern="block", block_size=16)
    for layer in model:
        if isinstance(layer, SparseLinear):
            assert layer.mask_index[0][0] >= 16  # the op walks it as a block mask
            assert layer.pattern == "block" and layer.block_size == 16


def test_two_of_four_keeps_the_two_largest_of_each_group():
    model = mlp()
    w = model[0].weight.detach().clone()
    effops.prune(model, 0.5, pattern="2:4")
    mask = model[0].mask
    assert mask_fits(mask, "2:4") is None
    groups_w, groups_m = w.abs().view(64, -1, 4), mask.view(64, -1, 4)
    assert (groups_m.sum(-1) == 2).all()
    kept_min = torch.where(groups_m, groups_w, torch.inf).amin(-1)
    pruned_max = torch.where(groups_m, -torch.inf, groups_w).amax(-1)
    assert (kept_min >= pruned_max).all()
    with pytest.raises(ValueError, match="sparsity must be 0.5"):
        effops.prune(mlp(), 0.75, pattern="2:4")


def test_global_scope_meets_the_total_and_differs_per_layer():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(10)  # a layer with large weights keeps more of them under a global threshold
    effops.prune(model, 0.8, scope="global")
    layers = [m for m in model if isinstance(m, SparseLinear)]
    total = sum(m.mask.numel() for m in layers)
    kept = sum(int(m.mask.sum()) for m in layers)
    # The total, plus at most one weight for each layer the ranking would have emptied (kept: its best).
    assert round(0.2 * total) <= kept <= round(0.2 * total) + len(layers)
    assert layers[0].density > 0.5 > layers[1].density


@pytest.mark.parametrize("pattern,scope", [("block", "layer"), ("unstructured", "global"), ("block", "global")])
def test_no_layer_is_pruned_away_entirely(pattern, scope):
    # 64 x 64 in 32-blocks at 90% keeps round(0.4) = 0 of 4 blocks; a global ranking can take every weight
    # of a small-weighted layer: each keeps its best weight (block), or its output is its bias alone.
    model = mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # the head: smallest weights, first to go under a global threshold
        heads = model[4].weight.detach().clone()
    effops.prune(model, 0.99 if scope == "global" else 0.9, pattern=pattern, block_size=32, scope=scope)
    for layer in model:
        if isinstance(layer, SparseLinear):
            assert layer.mask.any()
    best = heads.abs().flatten().argmax() if pattern == "unstructured" else None
    if best is not None:
        assert model[4].mask.flatten()[best]
    y = model[4](torch.randn(2, 64))
    assert not torch.allclose(y[0], y[1])  # the head still reads its input (not its bias alone)
    effops.prune(mlp(), 1.0, pattern=pattern, scope=scope)  # sparsity 1 still removes everything


def test_layers_without_outputs_or_inputs():
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3))
    effops.prune(model, 0.5)
    x = torch.randn(2, 4, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 3) and torch.equal(y, model[1].bias.expand(2, 3))
    y.sum().backward()
    assert x.grad.shape == (2, 4) and model[0].weight.grad.shape == (0, 4)


def test_exclude_and_convs():
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 4, 5))
    effops.prune(model, 0.5, exclude=["3"])
    assert isinstance(model[0], SparseConv1x1)
    assert type(model[1]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert model[0].sparsity == pytest.approx(0.5)
    assert model(torch.randn(2, 8, 2, 2)).shape == (2, 5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sparsity must be in"):
        effops.prune(mlp(), 1.5)
    with pytest.raises(TypeError, match="sparsity must be a number"):
        effops.prune(mlp(), "half")
    with pytest.raises(ValueError, match="pattern must be one of"):
        effops.prune(mlp(), 0.5, pattern="rows")
    with pytest.raises(ValueError, match="block_size must be one of"):
        effops.prune(mlp(), 0.5, pattern="block", block_size=8)
    with pytest.raises(ValueError, match="scope must be one of"):
        effops.prune(mlp(), 0.5, scope="model")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        effops.prune([nn.Linear(2, 2)], 0.5)
    with pytest.raises(ValueError, match="begin_step < end_step"):
        effops.GradualPruner(mlp(), 0.9, end_step=0)


def test_cubic_schedule():
    pruner = effops.GradualPruner(mlp(), 0.9, begin_step=10, end_step=110, frequency=10)
    assert pruner.sparsity_at(0) == 0.0 and pruner.sparsity_at(10) == 0.0
    assert pruner.sparsity_at(60) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert pruner.sparsity_at(110) == pytest.approx(0.9) and pruner.sparsity_at(500) == pytest.approx(0.9)
    s = [pruner.sparsity_at(t) for t in range(10, 111, 10)]
    assert all(b >= a for a, b in zip(s, s[1:]))
    # Cubic: most of the pruning happens early.
    assert pruner.sparsity_at(35) > 0.9 * 0.5


@pytest.mark.parametrize("optim", ["sgd_momentum", "adamw"])
def test_gradual_block_pruning_to_90_percent_keeps_exact_zeros_and_trains(optim):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    model = nn.Sequential(nn.Linear(64, 320), nn.ReLU(), nn.Linear(320, 320), nn.ReLU(), nn.Linear(320, 8))
    if optim == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    pruner = effops.GradualPruner(model, 0.9, begin_step=20, end_step=120, frequency=10, pattern="block",
                                  block_size=32, exclude=["0", "4"], optimizer=opt)
    middle = model[2]
    assert isinstance(middle, SparseLinear) and type(model[0]) is nn.Linear
    losses = []
    for step in range(160):
        x = torch.randn(64, 64)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the pruner's post-hook re-masks
        losses.append(loss.item())
        assert not middle.weight[~middle.mask].any(), "pruned weight moved at step %d" % step
    assert middle.sparsity == pytest.approx(0.9)
    assert middle.mask_index[0][0] >= 32
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


def test_static_pruning_then_adam_with_weight_decay_keeps_zeros_without_a_pruner():
    model = mlp()
    effops.prune(model, 0.7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 48)).square().mean().backward()
        opt.step()
    for layer in model:
        if isinstance(layer, SparseLinear):
            assert not layer.weight[~layer.mask].any()


def test_meta_device_model_pruned_then_materialized_and_loaded():
    # Large models are built on the meta device and loaded afterwards: pruning there makes the structure
    # (no values to rank: the masks come with the state_dict), and the modules answer shapes.
    torch.manual_seed(0)
    real = effops.prune(mlp(), 0.75, pattern="block", block_size=16)
    with torch.device("meta"):
        lazy = effops.prune(mlp(), 0.75, pattern="block", block_size=16)
    assert lazy(torch.empty(3, 48, device="meta")).shape == (3, 10)
    assert "density=nan" in repr(lazy)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(real.state_dict())
    x = torch.randn(5, 48)
    torch.testing.assert_close(lazy(x), real(x), atol=0, rtol=0)


@pytest.mark.parametrize("order", ["prune-separable", "prune-then-fuse"])
def test_pruned_pointwise_conv_of_a_separable_block_stays_pruned(order):
    # The fused op is dense: it must run the pointwise weight * mask (masked gradient). It ran the raw
    # weight, so pruned weights got gradients and grew back under AdamW after a static prune.
    torch.manual_seed(0)
    if order == "prune-separable":
        model = nn.Sequential(effops.nn.SeparableConv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(1024, 10))
        effops.prune(model, 0.75, exclude=["2"])
    else:
        model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
                              nn.Linear(1024, 10))
        effops.prune(model, 0.75, exclude=["4"])
        effops.fuse_separable(model)  # train mode: fuses the chain around the SparseConv1x1
    block = next(m for m in model.modules() if isinstance(m, effops.nn.SeparableConv2d))
    pw = block.pointwise
    assert isinstance(pw, SparseConv1x1)
    opt = effops.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 8, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        y = model(x)
        y.square().mean().backward()
        assert (pw.weight.grad.view(16, -1)[~pw.mask] == 0).all()
        opt.step()
    assert (pw.weight.view(16, -1)[~pw.mask] == 0).all()
    dw = block.depthwise  # and the block computes with the masked weight
    want = F.conv2d(F.relu(F.conv2d(x, dw.weight, dw.bias, padding=1, groups=8)),
                    pw.weight * pw.mask[:, :, None, None], pw.bias)
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)


def test_gradual_pruner_resumes_from_its_state_dict():
    def run(steps, resume_from=None):
        torch.manual_seed(0)
        model = mlp()
        opt = effops.optim.AdamW(model.parameters(), lr=1e-2)
        pruner = effops.GradualPruner(model, 0.8, end_step=10, frequency=2, optimizer=opt)
        if resume_from is not None:
            model.load_state_dict(resume_from["model"])
            opt.load_state_dict(resume_from["opt"])
            pruner.load_state_dict(resume_from["pruner"])
        for _ in range(steps):
            x = torch.randn(8, 48, generator=torch.Generator().manual_seed(pruner.step_count))  # per step
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return model, opt, pruner

    full, _, full_pruner = run(10)
    half, opt, pruner = run(5)
    saved = {"model": copy.deepcopy(half.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "pruner": pruner.state_dict()}
    resumed, _, resumed_pruner = run(5, resume_from=saved)
    # It restarted the schedule at 0 (final sparsity 0.75, weights 1.0 apart); now it resumes exactly.
    assert resumed_pruner.step_count == full_pruner.step_count == 10
    assert resumed_pruner.current_sparsity == pytest.approx(0.8)
    for a, b in zip(resumed.state_dict().values(), full.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="GradualPruner.state_dict"):
        pruner.load_state_dict({"step": 3})


def test_gradual_pruner_does_not_count_steps_grad_scaler_skipped():
    torch.manual_seed(0)
    model = mlp()
    opt = effops.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = effops.GradualPruner(model, 0.8, end_step=4, optimizer=opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for _ in range(4):
        opt.zero_grad()
        loss = model(torch.randn(8, 48)).square().mean() * float("inf")  # every gradient inf: skipped
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert pruner.step_count == 0 and pruner.current_sparsity == 0.0


def test_gradual_pruning_of_attention_ramps_its_projections_and_keeps_exact_zeros():
    from effops.nn import SparseMultiheadAttention

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # built before: from_mha keeps the Parameters
    pruner = effops.GradualPruner(model, 0.75, end_step=4, frequency=2, pattern="block", block_size=16,
                                  exclude="head", optimizer=opt)
    attn = model.attn
    assert isinstance(attn, SparseMultiheadAttention) and attn.in_proj.density == 1.0
    densities = []
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 5, 64)), torch.randint(0, 10, (8,))).backward()
        opt.step()
        assert model.attn is attn  # re-pruned in place
        densities.append(attn.in_proj.density)
        for layer in (attn.in_proj, attn.out_proj):
            assert not layer.weight[~layer.mask].any()
            state = opt.state[layer.weight]
            assert not state["exp_avg"][~layer.mask].any()  # cleared where newly pruned
    assert densities == sorted(densities, reverse=True) and densities[-1] == 0.25 == attn.out_proj.density
    for part in attn.in_proj.mask.split(64):  # q, k, v each at the target
        assert part.float().mean().item() == 0.25
