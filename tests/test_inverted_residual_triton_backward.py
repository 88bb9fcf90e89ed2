"""The backward of effops.ops.inverted_residual with "triton" forced: its depthwise middle in Triton
(triton_kernels/inverted_residual_backward.py), the 1x1 convolutions' and squeeze-excitation's backward through
torch's ops, against torch's autograd through the float64 reference.

On CPU tensors the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before Triton is
imported), at Python speed: small shapes, chosen so that pixels span more than one BLOCK_P block, hidden
channels more than one BLOCK_C block and input channels more than one BLOCK_CIN chunk somewhere. With
EFFOPS_TEST_DEVICE=cuda the same tests run the compiled kernels on the GPU.
"""
import pytest
import torch

import effops
from effops import _backends, _ext
from effops.ops import inverted_residual
from effops.reference import inverted_residual as reference
from effops.reference.dwpw_conv2d import activate
from conftest import TOL, device
from test_inverted_residual_se import make_se

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason()),
    pytest.mark.skipif(not _backends.runs_on("triton", device().type),
                       reason="triton cannot run on %s tensors here" % device().type),
]

# ((N, Cin, hidden, Cout, H, W, kernel, stride, activation, residual), squeeze channels (0: no SE), se activation,
# gate, layout, expand); hidden is Cin without expansion. Every activation, kernels 1, 3, 5, 7, strides 1 and 2.
CASES = [
    ((2, 8, 40, 8, 6, 7, 3, 1, "relu6", True), 0, None, None, "channels_last", True),  # MobileNetV2
    ((1, 5, 40, 5, 9, 8, 3, 1, "hardswish", True), 10, "relu", "hardsigmoid", "nchw", True),  # MobileNetV3, 72 px
    ((2, 5, 20, 12, 5, 6, 5, 2, "silu", False), 5, "silu", "sigmoid", "channels_last", True),  # EfficientNet
    ((1, 4, 4, 7, 9, 8, 3, 2, "relu", False), 0, None, None, "nchw", False),  # no expansion
    ((1, 6, 6, 6, 7, 6, 3, 1, "silu", True), 2, "silu", "sigmoid", "channels_last", False),  # EfficientNet-B0's first
    ((1, 6, 18, 6, 5, 7, 7, 2, "gelu", False), 0, None, None, "channels_last", True),
    ((2, 4, 24, 4, 6, 5, 1, 1, None, True), 0, None, None, "nchw", True),
    ((1, 3, 33, 4, 11, 3, 5, 1, "relu6", False), 4, "relu", "sigmoid", "channels_last", True),  # 33 px in, k5 halo
    ((2, 37, 24, 6, 5, 4, 3, 2, "hardswish", False), 0, None, None, "nchw", True),  # Cin: two BLOCK_CIN chunks
]
IDS = ["%s_k%d_s%d%s%s_%s%s" % (c[8], c[6], c[7], "_res" if c[9] else "", "_se" if sq else "",
                                "cl" if layout == "channels_last" else "nchw", "" if expand else "_noexpand")
       for c, sq, _, _, layout, expand in CASES]


def leaves(case, squeeze, se_act, gate, layout, expand, dtype=torch.float32):
    tensors, kw = make_se(case, max(squeeze, 1), se_act or "relu", gate or "sigmoid", dtype=dtype, layout=layout,
                          expand=expand)
    if not squeeze:
        tensors, kw = tensors[:7], {k: v for k, v in kw.items() if not k.startswith("se_")}
    return [None if t is None else t.to(device()) for t in tensors], kw


def backward_op(tensors, kw, gy):
    """effops::inverted_residual_backward itself, every gradient asked for. Called directly, on this thread: on
    CUDA tensors autograd would run it on its device thread, which a use_backend() block does not reach."""
    se = list(tensors[7:]) + [None] * (11 - len(tensors))
    return torch.ops.effops.inverted_residual_backward(
        gy, *tensors[:7], [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"], kw["residual"], *se,
        kw.get("se_activation", "relu"), kw.get("se_gate", "sigmoid"), [True] * 11)


def grads(tensors, kw, backend="triton"):
    """(gy, the gradients of the given tensors) with `backend` forced."""
    se = dict(zip(("se_reduce_weight", "se_reduce_bias", "se_expand_weight", "se_expand_bias"), tensors[7:]))
    with effops.use_backend(backend), _backends.record_choices() as tally, torch.no_grad():
        y = inverted_residual(*tensors[:7], **kw, **se)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
        out = backward_op(tensors, kw, gy)
    assert tally["inverted_residual_backward"] == {backend: 1}, dict(tally)
    return gy, [g for g, t in zip(out, tensors) if t is not None]


def reference_grads(tensors, kw, gy):
    t64 = [None if t is None else t.detach().cpu().double().requires_grad_() for t in tensors]
    se = t64[7:] + [kw["se_activation"], kw["se_gate"]] if len(t64) > 7 else []
    want = reference.inverted_residual(*t64[:7], [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                       kw["residual"], *se)
    return torch.autograd.grad(want, [t for t in t64 if t is not None], gy.cpu().double())


@pytest.mark.parametrize("case, squeeze, se_act, gate, layout, expand", CASES, ids=IDS)
def test_gradients_match_reference(case, squeeze, se_act, gate, layout, expand):
    tensors, kw = leaves(case, squeeze, se_act, gate, layout, expand)
    gy, got = grads(tensors, kw)
    for g, w, t in zip(got, reference_grads(tensors, kw, gy), [t for t in tensors if t is not None]):
        assert g.dtype == torch.float32 and g.shape == t.shape
        torch.testing.assert_close(g.cpu().double(), w, atol=3e-5 * max(1.0, w.abs().max().item()), rtol=1e-4)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=mf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[IDS[0], IDS[2]])
def test_gradients_in_low_precision(case, dtype):
    """16-bit tensors: each gradient's largest error against the float64 reference, relative to its largest value,
    at most 1.25x that of torch's ops on the same inputs (forced "reference"), plus one rounding of the dtype.
    The squeeze-excitation's weight gradients come from torch's 16-bit ops on both routes, from d: ours is closer
    to the float64 d (e is never rounded), and on the SE case torch's ops given the float64 d rounded to bf16 err
    by 1.5e-2 where given torch's own d they happen to err by 4e-3. They are held to the dtype's tolerance
    (conftest's TOL) instead when that is larger."""
    def errors(backend):
        tensors, kw = leaves(*case, dtype=dtype)
        gy, got = grads(tensors, kw, backend=backend)
        assert all(g.dtype == dtype for g in got)
        return [((g.cpu().double() - w).abs().max() / w.abs().max()).item()
                for g, w in zip(got, reference_grads(tensors, kw, gy))]

    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for i, (e, t) in enumerate(zip(errors("triton"), errors("reference"))):
        assert e <= max(1.25 * t + unit, TOL[dtype]["rtol"] if i >= 7 else 0.0), (i, e, t)


@pytest.mark.parametrize("activation", reference.ACTIVATIONS, ids=str)
def test_activation_derivatives_at_their_edges(activation):
    """The middle alone, with pre_e and pre_d exactly on the activations' edges (0, 6, -3, 3): the derivatives
    there are torch's *_backward ops' (relu' 0 at 0; relu6' 0 at 0 and 6; hardswish' 0 at -3 and 1 at 3 since
    torch 2.7). An identity expand conv without bias and a 1x1 depthwise by 1 make pre_e = x and pre_d = e exactly.
    (Not NaN: torch's vectorized and scalar hardswish_backward differ there.)"""
    from effops.triton_kernels.inverted_residual_backward import depthwise_act, depthwise_act_backward
    edges = torch.tensor([-3.0, 0.0, 3.0, 6.0, -1.5, 2.0, 7.0, -4.0])
    x = edges[torch.arange(5 * 6 * 7) % 8].reshape(1, 5, 6, 7).to(device()).requires_grad_()
    ew = torch.eye(5, device=device()).reshape(5, 5, 1, 1)
    dw = torch.ones(5, 1, 1, 1, device=device())
    g_d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
    e = activate(x, activation)
    want = torch.autograd.grad(e, x, g_d, retain_graph=True)[0]  # no expansion: d = act(x)
    got = depthwise_act_backward(g_d, x.detach(), None, None, dw, None, [1, 1], [0, 0], activation)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    d = depthwise_act(x.detach(), ew, None, dw, None, [1, 1], [0, 0], activation)
    torch.testing.assert_close(d, activate(e, activation), atol=1e-6, rtol=1e-6)
    want = torch.autograd.grad(activate(e, activation), x, g_d)[0]  # through both activations
    got = depthwise_act_backward(g_d, x.detach(), ew, None, dw, None, [1, 1], [0, 0], activation)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_bf16_stores_round_to_nearest():
    """d and the gradient at e leave the kernels rounded to nearest even from fp32, as torch rounds (the interpreter's
    own conversion truncates: the kernels round on the bits there). A 1x1 depthwise by 1/3, no activation: each
    value is one fp32 product, rounded once."""
    from effops.triton_kernels.inverted_residual_backward import depthwise_act, depthwise_act_backward
    e = torch.randn(2, 40, 9, 7, generator=torch.Generator().manual_seed(4)).to(device(), torch.bfloat16)
    dw = torch.full((40, 1, 1, 1), 1 / 3, device=device()).to(torch.bfloat16)
    want = (e.float() * dw.float().flatten()[:, None, None]).to(torch.bfloat16)
    torch.testing.assert_close(depthwise_act(e, None, None, dw, None, [1, 1], [0, 0], None), want, atol=0, rtol=0)
    got = depthwise_act_backward(e, e, None, None, dw, None, [1, 1], [0, 0], None)[0]  # grad_d = e: the same products
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_empty_batch_and_declined_input():
    """Batch 0: no chunk runs, the gradients are zeros on the triton route; a block with no output channels is
    declined (forced, it raises rather than running another route)."""
    tensors, kw = leaves(*CASES[2])  # 5 x 6 pixels, k5 s2 pad 2: 3 x 3 out
    empty = [tensors[0][:0]] + tensors[1:]
    with effops.use_backend("triton"), _backends.record_choices() as tally:
        out = backward_op(empty, kw, torch.empty(0, 12, 3, 3, device=device()))
    assert tally["inverted_residual_backward"] == {"triton": 1}, dict(tally)
    assert out[0].shape == empty[0].shape
    assert all(o.shape == t.shape and not o.any() for o, t in zip(out[1:], empty[1:]))
    no_outputs = tensors[:5] + [tensors[5][:0], tensors[6][:0]] + tensors[7:]
    with effops.use_backend("triton"), pytest.raises(effops.BackendError, match="declines .* empty tensor"):
        backward_op(no_outputs, kw, torch.empty(2, 0, 3, 3, device=device()))
