"""effops.nn.SparseLinear / SparseConv1x1 against plain Linear / Conv2d with masked weights."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import effops
from effops.nn import SparseLinear
from effops.demo.distributed import teardown
from effops.nn.sparse_linear import SparseConv1x1

from conftest import TOL

# The ops these tests run, for conftest: a backend with no kernel for them is not offered (an instance
# that could run on no machine).
BACKEND_OPS = ("masked_linear",)


def block_mask(n, k, b=16, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(-(-n // b), -(-k // b), generator=g) < density
    return kept.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].contiguous()


def test_from_linear_matches_masked_linear_and_shares_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    mask = block_mask(40, 48)
    expect_w = lin.weight.detach() * mask
    sparse = SparseLinear.from_linear(lin, mask, pattern="block", block_size=16)
    assert sparse.weight is lin.weight and sparse.bias is lin.bias  # an optimizer made earlier keeps working
    assert torch.equal(sparse.weight.detach(), expect_w)           # pruned weights are exactly zero
    x = torch.randn(2, 3, 48)
    torch.testing.assert_close(sparse(x), x @ expect_w.t() + lin.bias, **TOL[torch.float32])
    assert sparse.density == pytest.approx(mask.float().mean().item())
    assert sparse.sparsity == pytest.approx(1 - sparse.density)


def test_gradients_are_masked_and_to_linear_roundtrips():
    sparse = SparseLinear(37, 29, mask=torch.rand(29, 37) < 0.3)
    x = torch.randn(5, 37)
    sparse(x).square().sum().backward()
    assert not sparse.weight.grad[~sparse.mask].any()
    dense = sparse.to_linear()
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense(x), sparse(x), **TOL[torch.float32])


def test_state_dict_has_mask_and_loads_into_linear_after_to_linear():
    sparse = SparseLinear(32, 16, mask=block_mask(16, 32))
    state = sparse.state_dict()
    assert set(state) == {"weight", "bias", "mask"}
    other = SparseLinear(32, 16)
    other.load_state_dict(state)
    assert torch.equal(other.mask, sparse.mask)
    plain = nn.Linear(32, 16)
    plain.load_state_dict(sparse.to_linear().state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(plain(x), sparse(x), **TOL[torch.float32])


def test_set_mask_zeroes_newly_pruned_weights():
    sparse = SparseLinear(16, 16)
    new = torch.rand(16, 16) < 0.5
    sparse.set_mask(new)
    assert torch.equal(sparse.mask, new)
    assert not sparse.weight[~new].any()


def test_bad_masks_get_clear_errors():
    lin = nn.Linear(32, 16)
    with pytest.raises(ValueError, match="weight's shape"):
        SparseLinear.from_linear(lin, torch.ones(16, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        SparseLinear.from_linear(lin, torch.full((16, 32), 2.0))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        SparseLinear.from_linear(lin, None)
    with pytest.raises(ValueError, match="not constant over 16 x 16 blocks"):
        SparseLinear.from_linear(lin, torch.rand(16, 32) < 0.5, pattern="block", block_size=16)
    with pytest.raises(ValueError, match="more than 2"):
        SparseLinear.from_linear(lin, torch.ones(16, 32), pattern="2:4")
    with pytest.raises(ValueError, match="pattern must be one of"):
        SparseLinear.from_linear(lin, torch.ones(16, 32), pattern="blocky")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 1), torch.ones(3, 3))
    sparse = SparseLinear.from_linear(lin, block_mask(16, 32), pattern="block", block_size=16)
    with pytest.raises(ValueError, match="not constant"):
        sparse.set_mask(torch.rand(16, 32) < 0.5)


def test_sparse_conv1x1_matches_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 20, 1)
    mask = torch.rand(20, 24) < 0.4
    expect = nn.Conv2d(24, 20, 1)
    with torch.no_grad():
        expect.weight.copy_(conv.weight * mask[:, :, None, None])
        expect.bias.copy_(conv.bias)
    sparse = SparseConv1x1.from_conv(conv, mask)
    assert sparse.weight is conv.weight
    x = torch.randn(2, 24, 5, 7)
    torch.testing.assert_close(sparse(x), expect(x), **TOL[torch.float32])
    torch.testing.assert_close(sparse.to_conv()(x), expect(x), **TOL[torch.float32])
    sparse(x).sum().backward()
    assert not sparse.weight.grad[:, :, 0, 0][~mask].any()


def _ddp_worker(rank, world, init_file, result_file):
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    try:
        _ddp_train(rank, result_file)
    finally:
        teardown()  # after _ddp_train returned: its DDP wrapper must not outlive the group


def _ddp_train(rank, result_file):
    model = nn.Sequential(SparseLinear(32, 32, mask=block_mask(32, 32)), nn.ReLU(), nn.Linear(32, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.randn(8, 32, generator=g), torch.randn(8, 4, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, result_file)


def test_ddp_two_processes_keep_pruned_weights_zero_and_agree():
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "state.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), result), nprocs=2, join=True)
        state = torch.load(result)
    mask = state["0.mask"]
    assert not state["0.weight"][~mask].any()
    assert state["0.weight"][mask].abs().sum() > 0

    # Single-process replay with the same data (both ranks' batches averaged) gives the same weights.
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(32, 32, mask=block_mask(32, 32)), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    for _ in range(3):
        batches = [(torch.randn(8, 32, generator=g), torch.randn(8, 4, generator=g)) for g in gens]
        opt.zero_grad()
        sum(nn.functional.mse_loss(model(x), y) for x, y in batches).div(2).backward()
        opt.step()
    torch.testing.assert_close(model.state_dict()["0.weight"], state["0.weight"], atol=1e-5, rtol=1e-5)


def test_compiles_fullgraph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer = SparseLinear(64, 32, mask=block_mask(32, 64))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), layer(x), **TOL[torch.float32])
    assert not counters["graph_break"]


def test_sparse_conv1x1_mask_in_weight_shape_unbatched_input_and_output_format():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1)
    mask = torch.rand(32, 16, 1, 1) < 0.3  # the conv weight's own shape
    sparse = SparseConv1x1.from_conv(copy.deepcopy(conv), mask)
    assert torch.equal(sparse.mask, mask[:, :, 0, 0])
    sparse.set_mask(~mask)
    assert torch.equal(sparse.mask, ~mask[:, :, 0, 0])
    x = torch.randn(2, 16, 5, 4)
    want = nn.functional.conv2d(x, sparse.weight * sparse.mask[:, :, None, None], sparse.bias)
    y = sparse(x)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    assert y.is_contiguous()  # NCHW in, NCHW out, as nn.Conv2d
    cl = sparse(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sparse(x[0]), y[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="x must have 16 channels"):
        sparse(torch.randn(1, 15, 3, 3))


def test_state_dict_mask_must_fit_the_declared_pattern():
    torch.manual_seed(0)
    unstructured = effops.prune(nn.Sequential(nn.Linear(64, 64)), 0.7)
    two_four = effops.prune(nn.Sequential(nn.Linear(64, 64)), 0.5, pattern="2:4")
    with pytest.raises(ValueError, match="state_dict's 0.mask does not fit pattern='2:4'"):
        two_four.load_state_dict(unstructured.state_dict())
    unstructured.load_state_dict(two_four.state_dict())  # a 2:4 mask is a valid unstructured one
    assert torch.equal(unstructured[0].mask, two_four[0].mask)


def _alias(t):
    """A tensor on t's storage with a version counter of its own: what another process's writes to
    shared memory look like to this one (t's version does not move)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _mask(pattern, seed):
    g = torch.Generator().manual_seed(seed)
    if pattern == "block":  # 32 x 32 blocks, ~30% kept
        return (torch.rand(8, 8, generator=g) < 0.3).repeat_interleave(32, 0).repeat_interleave(32, 1)
    return torch.rand(256, 256, generator=g) < 0.1


@pytest.mark.parametrize("pattern", ["block", "unstructured"])
def test_shared_memory_writes_by_another_process_are_seen(pattern):
    # A model shared with worker processes (share_memory(): Hogwild training, evaluation in workers):
    # another process's optimizer writes the weights (and a pruner the mask) behind this process's
    # version counters. The cached W * mask / packed panels / mask indices served the old values
    # (up to 47 apart in a review's two-process run); they are rebuilt for shared tensors.
    torch.manual_seed(0)
    layer = SparseLinear(256, 256, mask=_mask(pattern, 0)).eval()
    layer.share_memory()
    x = torch.randn(64, 256)
    for grad, seed in ((False, 1), (True, 2)):
        with torch.set_grad_enabled(grad):
            layer(x), layer(x)  # caches made
            with torch.no_grad():
                _alias(layer.weight).mul_(-2.0)
            want = torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
            torch.testing.assert_close(layer(x), want, **TOL[torch.float32])
            with torch.no_grad():
                _alias(layer.mask).copy_(_mask(pattern, seed))
            want = torch.nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
            torch.testing.assert_close(layer(x), want, **TOL[torch.float32])


def test_swap_module_params_on_conversion():
    # torch.__future__.set_swap_module_params_on_conversion(True): load_state_dict and .half() swap
    # tensors, which torch.utils.swap_tensors refuses for a tensor with a weak reference (caches of the
    # mask's description once held them and made both fail after any call).
    class User(nn.Module):  # masked_linear in a user's own module (the functional memo)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 16))
            self.register_buffer("mask", torch.rand(8, 16) < 0.5)

        def forward(self, x):
            return effops.ops.masked_linear(x, self.w, self.mask)

    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        x = torch.randn(3, 16)
        for module in (SparseLinear(16, 8, mask=torch.rand(8, 16) < 0.5), User()):
            weight, mask = (module.weight, module.mask) if isinstance(module, SparseLinear) else (module.w, module.mask)
            module(x), module(x)
            module.load_state_dict(type(module)(16, 8).state_dict() if isinstance(module, SparseLinear)
                                   else User().state_dict())
            torch.testing.assert_close(module(x), nn.functional.linear(x, weight * mask, getattr(module, "bias", None)))
            module.half()
            assert weight.dtype == torch.float16  # swapped in place: the same Parameter object
            module.float()
            torch.testing.assert_close(module(x), nn.functional.linear(x, weight * mask, getattr(module, "bias", None)))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("case", ["dense_route", "block_kernel"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_sparse_conv1x1_routes_match_conv2d(case, layout):
    # SparseConv1x1 runs F.conv2d on W * mask where plain PyTorch is chosen (a half-dense mask), and the
    # sparse kernels on x's channels-last view where they win (a 90%-sparse block mask, 256 channels):
    # both against F.conv2d with the masked weight, in inference and training, repeated (the memo).
    torch.manual_seed(0)
    channels, mask = (24, torch.rand(24, 24) < 0.5) if case == "dense_route" else (
        256, (torch.rand(8, 8) < 0.1).repeat_interleave(32, 0).repeat_interleave(32, 1))
    conv = SparseConv1x1.from_conv(nn.Conv2d(channels, channels, 1), mask)
    x = torch.randn(4, channels, 8, 8)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    want_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for grad in (False, True):
        for _ in range(2):
            with torch.set_grad_enabled(grad):
                y = conv(x)
            w = conv.weight * conv.mask.view(channels, channels, 1, 1).to(conv.weight.dtype)
            want = nn.functional.conv2d(x, w, conv.bias)
            assert y.is_contiguous(memory_format=want_format)
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
            if grad:
                gy = torch.randn_like(y)
                got = torch.autograd.grad(y, [conv.weight, conv.bias], gy)
                ref = torch.autograd.grad(want, [conv.weight, conv.bias], gy)
                for g, r in zip(got, ref):
                    torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nn.functional.conv2d(x, w, conv.bias).detach(), **TOL[torch.bfloat16])


def _index_lists(layer):
    return [t.tolist() for t in layer.mask_index]


def _block_mask_90(n=512, k=256):
    g = torch.Generator().manual_seed(5)
    return (torch.rand(n // 32, k // 32, generator=g) < 0.1).repeat_interleave(32, 0).repeat_interleave(32, 1)


def test_mask_index_is_built_where_the_mask_is_set():
    # The layer's mask index is its own state, rebuilt at construction, set_mask, load_state_dict and
    # .to(): after each, it is the index of the layer's current mask.
    from effops.ops.masked_linear import masked_linear_index
    fresh = lambda layer: [t.tolist() for t in masked_linear_index(layer.mask)]  # noqa: E731
    layer = SparseLinear(64, 48, mask=block_mask(48, 64))
    assert _index_lists(layer) == fresh(layer)
    layer.set_mask(torch.rand(48, 64) < 0.2)
    assert layer.mask_index[0][0] == 0 and _index_lists(layer) == fresh(layer)
    other = SparseLinear(64, 48, mask=block_mask(48, 64, b=32, seed=3))
    layer.load_state_dict(other.state_dict())
    assert _index_lists(layer) == _index_lists(other)
    layer.load_state_dict(SparseLinear(64, 48, mask=torch.rand(48, 64) < 0.5).state_dict(), assign=True)
    assert _index_lists(layer) == fresh(layer)
    layer.half()
    assert _index_lists(layer) == fresh(layer)
    conv = SparseConv1x1.from_conv(nn.Conv2d(24, 20, 1), torch.rand(20, 24) < 0.4)
    assert _index_lists(conv) == fresh(conv)
    conv.set_mask(torch.rand(20, 24, 1, 1) < 0.4)
    assert _index_lists(conv) == fresh(conv)
    lin = SparseLinear.from_linear(nn.Linear(64, 48), block_mask(48, 64))
    assert _index_lists(lin) == fresh(lin)
    assert "mask_index" not in lin.state_dict()


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_set_mask_changes_the_backend_and_the_result():
    # Dense mask: plain ATen runs; a 90% block-sparse mask at 64 x 256 -> 512: the cpu block kernel,
    # walking the index set_mask built.
    layer = SparseLinear.from_linear(nn.Linear(256, 512), torch.ones(512, 256, dtype=torch.bool))
    x = torch.randn(64, 256)
    for mask, backend in ((None, "reference"), (_block_mask_90(), "cpu")):
        if mask is not None:
            layer.set_mask(mask)
        with torch.no_grad(), effops._backends.record_choices() as tally:
            y = layer(x)
        assert tally == {"masked_linear": {backend: 1}}
        want = nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)  # 256-term sums in another order


def test_a_mask_written_in_place_needs_rebuild_index():
    # Documented: the index follows the mask's named setters; an in-place write elsewhere is followed
    # once rebuild_index() is called.
    layer = SparseLinear.from_linear(nn.Linear(256, 512), _block_mask_90())
    x = torch.randn(64, 256)
    with torch.no_grad():
        layer.mask.copy_(_block_mask_90().roll(32, 0))
        layer.rebuild_index()
        want = nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("kind", ["block", "unstructured"])
def test_packed_weights_for_inference(kind):
    # pack_weights(): the forward reads the kept weights packed once, until the weights or the mask
    # change through the layer's own methods (repacked) or train() drops them.
    torch.manual_seed(0)
    mask = _block_mask_90() if kind == "block" else torch.rand(512, 256) < 0.1
    layer = SparseLinear.from_linear(nn.Linear(256, 512), mask).eval()
    x = torch.randn(64, 256)
    want = lambda: nn.functional.linear(x, layer.weight * layer.mask, layer.bias)  # noqa: E731
    layer.pack_weights()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want(), atol=1e-4, rtol=1e-4)
        layer.weight.mul_(2)  # behind the packs: the documented contract is to repack
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight * layer.mask / 2, layer.bias),
                                   atol=1e-4, rtol=1e-4)
        layer.pack_weights()
        torch.testing.assert_close(layer(x), want(), atol=1e-4, rtol=1e-4)
        layer.set_mask(layer.mask.roll(32, 1))  # repacked with the new index
        torch.testing.assert_close(layer(x), want(), atol=1e-4, rtol=1e-4)
        layer.half().float()  # repacked after each conversion
        torch.testing.assert_close(layer(x), want(), atol=1e-4, rtol=1e-4)
    layer.train()
    assert layer.weight_packed is None
    with torch.no_grad():
        layer.weight.add_(1).mul_(layer.mask)
        torch.testing.assert_close(layer(x), want(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="packed does not fit"):
        effops.ops.masked_linear(x, layer.weight, layer.mask, index=layer.mask_index,
                                 packed=torch.zeros(3))
