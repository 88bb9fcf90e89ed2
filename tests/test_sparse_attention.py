"""SparseMultiheadAttention against nn.MultiheadAttention holding the same (masked) weights, and prune's swap."""
import copy

import pytest
import torch
from torch import nn

import effops
from benchmarks import models
from effops.nn import SparseLinear, SparseMultiheadAttention
from conftest import TOL

E, H = 96, 4  # 96: three 32-blocks per projection; head_dim 24


def pair(batch_first=True, dropout=0.0, bias=True, seed=0, density=0.3):
    """(nn.MultiheadAttention, SparseMultiheadAttention.from_mha of a copy) with the same masked weights."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, dropout=dropout, bias=bias, batch_first=batch_first)
    with torch.no_grad():  # nonzero biases, so their handling is checked too
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    masks = (torch.rand(3 * E, E) < density, torch.rand(E, E) < density)
    sparse = SparseMultiheadAttention.from_mha(copy.deepcopy(mha), masks)
    with torch.no_grad():
        mha.in_proj_weight.mul_(masks[0])
        mha.out_proj.weight.mul_(masks[1])
    return mha, sparse


def inputs(batch_first, n, tgt, src, mode, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda s: (n, s, E) if batch_first else (s, n, E)) if n is not None else (lambda s: (s, E))
    q = torch.randn(shape(tgt), generator=g)
    if mode == "self":
        return q, q, q
    k = torch.randn(shape(src), generator=g)
    return (q, k, k) if mode == "kv" else (q, k, torch.randn(shape(src), generator=g))


def leaves(qkv):
    """Distinct input tensors as leaves that require grad, keeping which of q, k, v are the same tensor."""
    seen = {}
    for t in qkv:
        seen.setdefault(id(t), t.detach().clone().requires_grad_())
    return [seen[id(t)] for t in qkv], list(seen.values())


def check_against_mha(mha, sparse, qkv, fw_kwargs, grads=True):
    (q1, k1, v1), ins1 = leaves(qkv)
    (q2, k2, v2), ins2 = leaves(qkv)
    want, want_w = mha(q1, k1, v1, **fw_kwargs)
    got, got_w = sparse(q2, k2, v2, **fw_kwargs)
    torch.testing.assert_close(got, want, **TOL[torch.float32], equal_nan=True)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, **TOL[torch.float32], equal_nan=True)
    if not grads:
        return
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    for a, b in zip(ins2, ins1):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32])
    in_mask, out_mask = sparse.in_proj.mask, sparse.out_proj.mask
    # Ours are masked: pruned weights get no gradient.
    torch.testing.assert_close(sparse.in_proj.weight.grad, mha.in_proj_weight.grad * in_mask, **TOL[torch.float32])
    torch.testing.assert_close(sparse.out_proj.weight.grad, mha.out_proj.weight.grad * out_mask, **TOL[torch.float32])
    assert not sparse.in_proj.weight.grad[~in_mask].any() and not sparse.out_proj.weight.grad[~out_mask].any()
    if mha.in_proj_bias is not None:
        torch.testing.assert_close(sparse.in_proj.bias.grad, mha.in_proj_bias.grad, **TOL[torch.float32])
        torch.testing.assert_close(sparse.out_proj.bias.grad, mha.out_proj.bias.grad, **TOL[torch.float32])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["self", "kv", "qkv"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_matches_multihead_attention(batch_first, mode, need_weights, average):
    mha, sparse = pair(batch_first)
    qkv = inputs(batch_first, 3, 7, 7 if mode == "self" else 11, mode)
    check_against_mha(mha, sparse, qkv, dict(need_weights=need_weights, average_attn_weights=average))


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_and_empty_batch_and_no_bias(batch_first):
    mha, sparse = pair(batch_first, bias=False)
    assert sparse.in_proj.bias is None and sparse.out_proj.bias is None
    for need_weights in (True, False):
        check_against_mha(mha, sparse, inputs(batch_first, None, 5, 5, "self"), dict(need_weights=need_weights))
        check_against_mha(mha, sparse, inputs(batch_first, None, 5, 8, "qkv"), dict(need_weights=need_weights))
        out, _ = sparse(*inputs(batch_first, 0, 5, 5, "self"), need_weights=need_weights)
        assert out.shape == ((0, 5, E) if batch_first else (5, 0, E))


def _masks(n, tgt, src, kind, seed=2):
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(n, src, dtype=torch.bool)
    pad[0, -3:] = True  # every row keeps some keys: a fully masked row is NaN in both, compared too below
    pad[1, :2] = True
    attn2 = torch.rand(tgt, src, generator=g) < 0.3
    attn2[:, 0] = False
    attn3 = torch.rand(n * H, tgt, src, generator=g) < 0.3
    attn3[..., 4] = False
    if kind == "bool":
        return pad, attn2, attn3
    to_float = lambda m: torch.zeros(m.shape).masked_fill(m, float("-inf")) + torch.randn(m.shape, generator=g) * 0.1  # noqa: E731
    return to_float(pad), to_float(attn2), to_float(attn3)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_key_padding_and_attention_masks(batch_first, kind, need_weights):
    mha, sparse = pair(batch_first)
    n, tgt, src = 3, 6, 9
    pad, attn2, attn3 = _masks(n, tgt, src, kind)
    qkv = inputs(batch_first, n, tgt, src, "kv")
    for kw in (dict(key_padding_mask=pad), dict(attn_mask=attn2), dict(attn_mask=attn3),
               dict(key_padding_mask=pad, attn_mask=attn2), dict(key_padding_mask=pad, attn_mask=attn3)):
        mha.zero_grad()
        sparse.zero_grad()
        check_against_mha(mha, sparse, qkv, dict(kw, need_weights=need_weights))


def test_fully_masked_rows_attend_to_nothing():
    """Defined here, not taken from torch (which gives NaN with explicit weights, zeros through SDPA's fused
    kernels): a query whose keys are all masked has zero weights and a zero attention output, so the
    output is out_proj's bias, whichever path runs; the other rows are nn.MultiheadAttention's."""
    mha, sparse = pair()
    q, k, v = inputs(True, 2, 4, 5, "kv")
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1] = True
    causal_row = torch.zeros(4, 5, dtype=torch.bool)
    causal_row[2] = True  # one query of each image sees no key
    for need_weights in (True, False):
        got, got_w = sparse(q, k, v, key_padding_mask=pad, need_weights=need_weights)
        want, want_w = mha(q[:1], k[:1], v[:1], need_weights=need_weights)
        torch.testing.assert_close(got[:1], want, **TOL[torch.float32])
        torch.testing.assert_close(got[1], sparse.out_proj.bias.expand(4, E), atol=0, rtol=0)
        if need_weights:
            torch.testing.assert_close(got_w[:1], want_w, **TOL[torch.float32])
            assert not got_w[1].any()
        got, got_w = sparse(q, k, v, attn_mask=causal_row, need_weights=need_weights)
        torch.testing.assert_close(got[:, 2], sparse.out_proj.bias.expand(2, E), atol=0, rtol=0)
        assert got.isfinite().all() and (got_w is None or not got_w[:, 2].any())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_padding", [False, True])
def test_is_causal(batch_first, need_weights, with_padding):
    mha, sparse = pair(batch_first)
    n, length = 3, 8
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    pad = _masks(n, length, length, "bool")[0] if with_padding else None
    pad = None if pad is None else pad & torch.arange(length).gt(0)  # key 0 stays: no empty causal row
    check_against_mha(mha, sparse, inputs(batch_first, n, length, length, "self"),
                      dict(attn_mask=causal, is_causal=True, key_padding_mask=pad, need_weights=need_weights))
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        sparse(*inputs(batch_first, n, length, length, "self"), is_causal=True)


def test_dropout_in_training_only():
    mha, sparse = pair(dropout=0.5)
    x = inputs(True, 2, 6, 6, "self")
    sparse.eval()
    mha.eval()
    check_against_mha(mha, sparse, x, dict(need_weights=False), grads=False)
    sparse.train()
    for need_weights in (True, False):
        torch.manual_seed(3)
        a = sparse(*x, need_weights=need_weights)[0]
        torch.manual_seed(4)
        b = sparse(*x, need_weights=need_weights)[0]
        assert not torch.allclose(a, b)  # dropout ran


def test_from_mha_shares_parameters_and_refuses_what_it_cannot_do():
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    in_w, out_w = mha.in_proj_weight, mha.out_proj.weight
    sparse = SparseMultiheadAttention.from_mha(mha, 0.75, pattern="block", block_size=32)
    assert sparse.in_proj.weight is in_w and sparse.out_proj.weight is out_w and sparse.in_proj_weight is in_w
    assert sparse.in_proj.pattern == "block" and sparse.out_proj.pattern == "block"
    for part in [*sparse.in_proj.mask.split(E), sparse.out_proj.mask]:  # q, k, v, out each a layer of 9 blocks
        assert part.sum().item() == 2 * 32 * 32  # round(0.25 * 9) blocks kept
    dense_out = SparseMultiheadAttention.from_mha(nn.MultiheadAttention(E, H), (torch.rand(3 * E, E) < 0.5, None))
    assert type(dense_out.out_proj) is not SparseLinear and isinstance(dense_out.in_proj, SparseLinear)
    for kwargs, match in ((dict(kdim=32), "kdim"), (dict(vdim=32), "kdim"), (dict(add_bias_kv=True), "add_bias_kv"),
                          (dict(add_zero_attn=True), "add_zero_attn")):
        with pytest.raises(ValueError, match=match):
            SparseMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, **kwargs), 0.5)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        SparseMultiheadAttention.from_mha(nn.Linear(E, E), 0.5)
    with pytest.raises(ValueError, match="shape"):
        SparseMultiheadAttention.from_mha(nn.MultiheadAttention(E, H), (torch.ones(E, E), None))
    with pytest.raises(ValueError, match="divisible"):
        SparseMultiheadAttention(E, 5)


def test_masks_hold_under_optimizer_steps_and_an_optimizer_built_before_keeps_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, E), nn.MultiheadAttention(E, H, batch_first=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built before pruning
    before = model[1].in_proj_weight.detach().clone()

    class Net(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner[0](x)
            return self.inner[1](h, h, h, need_weights=False)[0]
    net = Net(model)
    _, report = effops.prune(net, 0.9, pattern="block", block_size=32, return_report=True)
    attn = model[1]
    assert isinstance(attn, SparseMultiheadAttention) and "inner.1" in dict(report.changed)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 5, E)).square().mean().backward()
        for layer in (attn.in_proj, attn.out_proj):
            assert not layer.weight.grad[~layer.mask].any()
        opt.step()
    for layer in (attn.in_proj, attn.out_proj):
        assert not layer.weight[~layer.mask].any()  # exact zeros through AdamW's decay and momentum
    kept = attn.in_proj.mask
    assert not torch.equal(attn.in_proj_weight[kept], before[kept])  # the old optimizer trained them


def test_state_dict_loads_into_a_fresh_pruned_model_exactly():
    torch.manual_seed(0)
    model = models.VisionTransformer(image=32, patch=8, dim=64, depth=2, heads=4, mlp=128, num_classes=10)
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # other weights, so other masks than fresh's
    effops.prune(model, 0.75, pattern="block", block_size=16, exclude="heads")
    effops.prune(fresh, 0.75, pattern="block", block_size=16, exclude="heads")
    state = model.state_dict()
    assert "layers.0.self_attention.in_proj.mask" in state and "layers.0.self_attention.out_proj.mask" in state
    assert not torch.equal(state["layers.0.self_attention.in_proj.mask"],
                           fresh.state_dict()["layers.0.self_attention.in_proj.mask"])
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_prune_swaps_every_attention_of_vit_b_32():
    torch.manual_seed(0)
    # ViT-B/32's structure, its 12 blocks, narrower (time): benchmarks.models builds vit_b_32 the same way
    model = models.VisionTransformer(image=64, patch=32, dim=96, depth=12, heads=4, mlp=192).eval()
    x = torch.randn(2, 3, 64, 64)
    _, report = effops.prune(model, 0.9, pattern="block", block_size=32, exclude="heads", return_report=True)
    attns = ["layers.%d.self_attention" % i for i in range(12)]
    assert [n for n, _ in report.changed if n.endswith("self_attention")] == attns
    assert report.skipped == [("heads.head", "excluded by name")]
    assert all(isinstance(block.self_attention, SparseMultiheadAttention) for block in model.layers)
    reference = copy.deepcopy(model)
    for block in reference.layers:  # back to nn.MultiheadAttention with the pruned weights
        sparse = block.self_attention
        mha = nn.MultiheadAttention(96, 4, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(sparse.in_proj_weight)
            mha.in_proj_bias.copy_(sparse.in_proj_bias)
            mha.out_proj.weight.copy_(sparse.out_proj.weight)
            mha.out_proj.bias.copy_(sparse.out_proj.bias)
        block.self_attention = mha.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), **TOL[torch.float32])


def _count_calls(monkeypatch):
    calls = []
    forward = SparseMultiheadAttention.forward
    monkeypatch.setattr(SparseMultiheadAttention, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    return calls


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_runs_the_sparse_attention(batch_first, monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
    # enable_nested_tensor: a padded batch would reach the layers as a nested tensor (batch_first only)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 9, 64) if batch_first else torch.randn(9, 3, 64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, -4:] = True
    effops.prune(encoder, 0.5, pattern="block", block_size=16)
    assert all(isinstance(m.self_attn, SparseMultiheadAttention) for m in encoder.layers)
    reference = copy.deepcopy(encoder)  # the same pruned weights in nn.MultiheadAttention, module path
    for m in reference.layers:
        mha = nn.MultiheadAttention(64, 4, batch_first=batch_first)
        mha.load_state_dict({"in_proj_weight": m.self_attn.in_proj_weight, "in_proj_bias": m.self_attn.in_proj_bias,
                             "out_proj.weight": m.self_attn.out_proj.weight, "out_proj.bias": m.self_attn.out_proj.bias})
        m.self_attn = mha.eval()
    calls = _count_calls(monkeypatch)
    for kwargs in (dict(), dict(src_key_padding_mask=pad), dict(mask=nn.Transformer.generate_square_subsequent_mask(9),
                                                                 is_causal=True)):
        with torch.no_grad():  # eval without autograd: where the native fast paths would run
            got = encoder(x, **kwargs)
        with torch.enable_grad():
            want = reference(x, **kwargs).detach()
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert len(calls) == 6  # every layer, every call: the fast paths are off


def test_transformer_encoder_layer_fast_path_with_a_hand_swapped_module_is_correct(monkeypatch):
    # Swapped by hand (no effops.prune), the layer's native fast path runs: it reads in_proj_weight,
    # which holds the pruned weights as zeros, so the values are those of the sparse module.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    layer.self_attn = SparseMultiheadAttention.from_mha(layer.self_attn, 0.5)
    x = torch.randn(2, 7, 64)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        fast = layer(x)
    assert not calls  # the native path ran
    with torch.enable_grad():
        slow = layer(x).detach()
    assert len(calls) == 1
    torch.testing.assert_close(fast, slow, **TOL[torch.float32])


def test_compiles_fullgraph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    _, sparse = pair()
    compiled = torch.compile(sparse, fullgraph=True, backend="aot_eager")
    q, k, v = inputs(True, 2, 7, 9, "kv")
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, -2:] = True
    for args, kw in (((q, q, q), dict(need_weights=False)), ((q, k, v), dict(key_padding_mask=pad))):
        want = sparse(*args, **kw)
        got = compiled(*args, **kw)
        torch.testing.assert_close(got[0], want[0], **TOL[torch.float32])
    assert not counters["graph_break"]
