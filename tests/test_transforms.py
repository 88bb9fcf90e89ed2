"""What prune, quantize and fuse_separable share: `exclude` semantics, reports, warnings, and the
layers they must leave alone, on small models built like ViT (nn.MultiheadAttention blocks), BERT
(nn.TransformerEncoderLayer) and a language model with tied embedding / LM-head weights."""
import copy
import warnings

import pytest
import torch
from torch import nn

import effops
from benchmarks import models
from effops.nn import Int8Linear, SparseLinear, SparseMultiheadAttention
from effops.transforms import _report
from effops.transforms.quantize import default_min_features


def TinyViT():
    """ViT's layer structure (torchvision's: nn.MultiheadAttention blocks, heads.head), 64 wide."""
    return models.VisionTransformer(image=32, patch=8, dim=64, depth=2, heads=4, mlp=128, num_classes=10)


class TiedLM(nn.Module):
    def __init__(self, vocab=97, dim=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.hidden(self.embed(ids))))


def test_prune_takes_attention_keeps_an_excluded_out_proj_dense_and_masks_hold_under_adamw():
    torch.manual_seed(0)
    model = TinyViT()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left dense against the caller's will
        _, report = effops.prune(model, 0.9, pattern="block", block_size=16,
                                 exclude=["heads", "layers.1.self_attention.out_proj"], return_report=True)
    assert report.skipped_for(_report.EXCLUDED) == ["layers.1.self_attention.out_proj", "heads.head"]
    assert type(model.heads.head) is nn.Linear  # "heads" covers its child
    for block in model.layers:
        assert isinstance(block.self_attention, SparseMultiheadAttention)
        assert all(isinstance(m, SparseLinear) for m in (block.mlp[0], block.mlp[2], block.self_attention.in_proj))
    assert isinstance(model.layers[0].self_attention.out_proj, SparseLinear)
    assert type(model.layers[1].self_attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(3, 3, 32, 32)).square().mean().backward()
        opt.step()
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 7 and all(not m.weight[~m.mask].any() for m in sparse)
    assert model.layers[1].self_attention.out_proj.weight.count_nonzero() == 64 * 64


def test_prune_leaves_tied_weights_dense():
    torch.manual_seed(0)
    model = TiedLM()
    embed = model.embed.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied to embed.weight"):
        _, report = effops.prune(model, 0.5, return_report=True)
    assert [n for n, _ in report.changed] == ["hidden"] and report.skipped_for("tied") == ["lm_head"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, embed)  # no embedding rows zeroed by a mask meant for the head
    # A module registered in two places is one candidate, swapped in both.
    shared = nn.Linear(32, 32)
    twice = nn.Sequential(nn.Sequential(shared), nn.ReLU(), shared)  # met first as "2", named "0.0"
    effops.prune(twice, 0.5)
    assert isinstance(twice[2], SparseLinear) and twice[0][0] is twice[2]
    # A 1x1 conv with a stride is no candidate for SparseConv1x1: reported, not warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = effops.prune(nn.Sequential(nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1)), 0.5,
                                 return_report=True)
    assert report.skipped_for("stride") == ["0"] and [n for n, _ in report.changed] == ["1"]


def _calls(monkeypatch, cls):
    count = []
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, x: count.append(1) or forward(self, x))
    return count


@pytest.mark.parametrize("transform", ["prune", "quantize"])
def test_transformer_encoder_layer_runs_the_swapped_layers_in_eval(transform, monkeypatch):
    # nn.TransformerEncoderLayer's eval fast path reads linear1/linear2.weight itself: an Int8Linear
    # there failed ("self and mat2 must have the same dtype"), a SparseLinear's sparse kernel never ran.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True) for _ in range(2)])
    model.eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        want = model(x)
    if transform == "prune":
        effops.prune(model, 0.5, exclude="*.self_attn")  # out_proj by name: no warning
        with torch.enable_grad():
            want = model(x).detach()  # the module path (fast path off under autograd), pruned weights
        calls, tol = _calls(monkeypatch, SparseLinear), dict(atol=1e-5, rtol=1e-5)
    else:
        with pytest.warns(UserWarning, match="out_proj"):
            effops.quantize(model, min_features=64)
        calls, tol = _calls(monkeypatch, Int8Linear), dict(atol=0.05, rtol=0.05)
    with torch.no_grad():
        got = model(x)
    assert len(calls) == 4
    torch.testing.assert_close(got, want, **tol)


def test_exclude_means_the_same_in_every_transform():
    names = {"layers.0.mlp.0", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.2", "heads.head"}
    attns = {"layers.0.self_attention", "layers.1.self_attention"}
    for exclude, kept in [("heads", {"heads.head"}), ("layers.*.mlp", names - {"heads.head"}),
                          (["layers.1", "heads.head"], {"layers.1.mlp.0", "layers.1.mlp.2", "heads.head"})]:
        for transform in ("prune", "quantize", "quantize-skip"):
            model = TinyViT()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if transform == "prune":
                    _, report = effops.prune(model, 0.5, exclude=exclude, return_report=True)
                elif transform == "quantize":
                    _, report = effops.quantize(model, min_features=8, exclude=exclude, return_report=True)
                else:
                    _, report = effops.quantize(model, exclude, min_features=8, return_report=True)
            assert set(report.skipped_for(_report.EXCLUDED)) & names == kept, (transform, exclude)
            want = names - kept
            if transform == "prune":  # prune takes the attention modules too
                want |= {a for a in attns if not _report.excluded(a, _report.exclude_patterns(exclude))}
            assert {n for n, _ in report.changed} == want, (transform, exclude)
    with pytest.warns(UserWarning, match="'head' matches no module"):
        effops.prune(TinyViT(), 0.5, exclude=["head", "layers.*.self_attention"])  # "head": not a qualified name
    with pytest.raises(TypeError, match="exclude must be"):
        effops.prune(TinyViT(), 0.5, exclude=3)
    with pytest.raises(TypeError, match="exclude must be"):
        effops.quantize(TinyViT(), exclude=[None])


def test_quantize_reports_skips_and_warns_when_it_swaps_nothing():
    # ViT-B's layers have 768 features on one side: the default policy must take them.
    assert default_min_features() <= 768
    model = TinyViT()  # 64-feature layers: below every default
    with pytest.warns(UserWarning, match="quantize changed nothing: skipped layers.0.self_attention.out_proj"):
        _, report = effops.quantize(model, return_report=True)
    assert not report.changed and "below min_features" in dict(report.skipped)["layers.0.mlp.0"]
    assert "directly" in dict(report.skipped)["layers.1.self_attention.out_proj"]
    with pytest.warns(UserWarning, match="changed nothing: the model has no candidate"):
        effops.quantize(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded and small layers alone are reported, not warned about
        model, report = effops.quantize(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)),
                                        min_features=32, return_report=True)
    assert report.changed == [("0", "Int8Linear")] and report.skipped_for("below") == ["2"]
    tied = TiedLM()
    ref = copy.deepcopy(tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effops.quantize(tied, min_features=32)
    ids = torch.randint(0, 97, (2, 5))
    got, want = tied(ids), ref(ids)
    assert ((got - want).norm() / want.norm()).item() < 0.03  # int8's error, relative to the output's size
    assert torch.equal(tied.embed.weight, ref.embed.weight) and isinstance(tied.lm_head, Int8Linear)
