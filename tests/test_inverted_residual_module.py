"""effops.nn.InvertedResidual: the module around effops.ops.inverted_residual and its packed weights."""
import copy

import pytest
import torch
import torch.nn as nn

import effops
from effops import _ext
from effops.nn import InvertedResidual
from effops.reference import inverted_residual as reference
from conftest import TOL

needs_ext = pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason())


def block(seed=0, residual=True, stride=1, activation="relu6", expand=True):
    torch.manual_seed(seed)
    m = InvertedResidual(12, 60 if expand else 12, 12 if residual else 20, 3, stride, activation, residual, expand)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.repack().eval()


def expected(m, x):
    e, d, p = m.expand, m.depthwise, m.project
    with torch.no_grad():
        return reference.inverted_residual(x, None if e is None else e.weight, None if e is None else e.bias, d.weight,
                                           d.bias, p.weight, p.bias, d.stride, d.padding, m.activation, m.residual)


@pytest.mark.parametrize("kw", [dict(), dict(residual=False, stride=2, activation="hardswish"),
                                dict(residual=False, expand=False, activation="silu")], ids=["res", "s2", "noexp"])
def test_forward_matches_reference(kw):
    m = block(**kw)
    x = torch.randn(2, 12, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected(m, x), **TOL[torch.float32])
    assert "packed" not in m.state_dict()


@needs_ext
def test_load_state_dict_and_eval_rebuild_the_packed_weights():
    a, b = block(0), block(1)
    x = torch.randn(1, 12, 7, 7)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
        b.train()
        b.depthwise.weight.mul_(-1)  # a training step, say
        b.eval()
        torch.testing.assert_close(b(x), expected(b, x), **TOL[torch.float32])
        c = copy.deepcopy(b).to(torch.bfloat16)
        torch.testing.assert_close(c(x.bfloat16()).float(), expected(b, x), **TOL[torch.bfloat16])


@needs_ext
def test_packed_is_what_the_kernel_reads_in_eval():
    """Eval passes the packed buffer (so the kernel does not pack per call): a stale one shows."""
    m = block()
    x = torch.randn(1, 12, 6, 6)
    with torch.no_grad(), effops.use_backend("cpu"):
        before = m(x)
        m.project.weight.mul_(2)  # in place, without repack(): documented as the caller's to rebuild
        torch.testing.assert_close(m(x), before, atol=0, rtol=0)
        m.repack()
        torch.testing.assert_close(m(x), expected(m, x), **TOL[torch.float32])


def test_gradients_match_the_reference_autograd():
    m = block().train()
    x = torch.randn(2, 12, 8, 8, requires_grad=True)
    m(x).square().sum().backward()
    got = [x.grad] + [p.grad for p in m.parameters()]
    x2 = x.detach().clone().requires_grad_()
    ref = copy.deepcopy(m)
    for p in ref.parameters():
        p.grad = None
    e, d, p = ref.expand, ref.depthwise, ref.project
    reference.inverted_residual(x2, e.weight, e.bias, d.weight, d.bias, p.weight, p.bias, d.stride, d.padding,
                                m.activation, True).square().sum().backward()
    for g, w in zip(got, [x2.grad] + [q.grad for q in ref.parameters()]):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


def test_folded_batchnorm_refuses_train_and_bad_settings_are_named():
    m = block()
    m.folded_batchnorm = True
    with pytest.raises(RuntimeError, match="folded"):
        m.train()
    with pytest.raises(ValueError, match="residual"):
        InvertedResidual(8, 16, 8, stride=2, residual=True)
    with pytest.raises(ValueError, match="activation"):
        InvertedResidual(8, 16, 8, activation="tanh")
    with pytest.raises(ValueError, match="depthwise"):
        InvertedResidual.from_convs(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1))
