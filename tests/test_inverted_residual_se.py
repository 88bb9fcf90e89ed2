"""effops.ops.inverted_residual with squeeze-excitation (MobileNetV3, EfficientNet blocks) on every CPU route
(ATen, our two-pass kernel at every instruction-set level) against the reference."""
import pytest
import torch
from torch import nn

import effops
from effops import _ext
from effops.nn import InvertedResidual
from effops.ops import inverted_residual
from effops.reference import inverted_residual as reference
from conftest import TOL, cpu_levels
from test_inverted_residual import backend, make, threads  # noqa: F401  (backend: the fixture, one route per test)

needs_ext = pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason())

# (block case as in test_inverted_residual, squeeze channels, se activation, gate)
SE_CASES = [
    ((2, 8, 48, 8, 9, 9, 3, 1, "hardswish", True), 12, "relu", "hardsigmoid"),  # MobileNetV3
    ((1, 5, 30, 7, 8, 11, 3, 2, "silu", False), 2, "silu", "sigmoid"),  # EfficientNet, squeeze = Cin // 4
    ((2, 16, 96, 24, 13, 12, 5, 2, "relu", False), 24, "relu", "hardsigmoid"),
    ((1, 17, 40, 23, 7, 6, 5, 1, "silu", False), 5, "silu", "sigmoid"),
    ((1, 8, 24, 8, 37, 40, 3, 1, "hardswish", True), 8, "relu", "hardsigmoid"),  # wide rows: several bands' sums
    ((3, 6, 36, 6, 1, 1, 3, 1, "relu6", True), 9, "relu", "sigmoid"),  # one output pixel
    # d of more than kKeepDBytesPerImage (4 MiB) per image, 92 x 90 x 128 fp32: the second pass computes d
    # again, not keeps it
    ((1, 4, 128, 4, 92, 90, 3, 1, "silu", True), 8, "silu", "sigmoid"),
]
SE_IDS = ["%s_sq%d_%s_%s%s" % (c[8], sq, a, g, "_s2" if c[7] == 2 else "") for c, sq, a, g in SE_CASES]


def make_se(case, squeeze, se_act, gate, dtype=torch.float32, layout="channels_last", expand=True, seed=1):
    tensors, kw = make(case, dtype=dtype, layout=layout, expand=expand)
    hidden = tensors[3].shape[0]
    g = torch.Generator().manual_seed(seed)
    rw = torch.randn(squeeze, hidden, 1, 1, generator=g) / hidden ** 0.5
    rb = torch.randn(squeeze, generator=g) * 0.3
    sw = torch.randn(hidden, squeeze, 1, 1, generator=g) / squeeze ** 0.5
    sb = torch.randn(hidden, generator=g) * 0.3 + 1.0  # gates mostly open, as trained networks have them
    se = [t.to(dtype) for t in (rw, rb, sw, sb)]
    return tensors + se, dict(kw, se_activation=se_act, se_gate=gate)


def call_reference(tensors, kw):
    return reference.inverted_residual(*tensors[:7], [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                       kw["residual"], *tensors[7:], kw["se_activation"], kw["se_gate"])


def expected(tensors, kw):
    """The reference in float64: rounding kept out of the way."""
    return call_reference([None if t is None else t.double() for t in tensors], kw)


def call_op(tensors, kw):
    """effops.ops.inverted_residual as users call it (the route by the speed policy)."""
    se = dict(zip(("se_reduce_weight", "se_reduce_bias", "se_expand_weight", "se_expand_bias"), tensors[7:]))
    return inverted_residual(*tensors[:7], **kw, **se)


def kernel(tensors, kw, packed=None):
    """The op with the route the `backend` fixture forces, whatever the speed policy says."""
    return torch.ops.effops.inverted_residual(*tensors[:7], [kw["stride"]] * 2, [kw["padding"]] * 2,
                                              kw["activation"], kw["residual"], packed, *tensors[7:],
                                              kw["se_activation"], kw["se_gate"])


@needs_ext
@pytest.mark.parametrize("se_case", SE_CASES, ids=SE_IDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "noncontiguous"])
def test_matches_reference(backend, se_case, layout):  # noqa: F811
    tensors, kw = make_se(*se_case, layout=layout)
    got = kernel(tensors, kw)
    torch.testing.assert_close(got, expected(tensors, kw).float(), **TOL[torch.float32])
    cl = layout == "channels_last"
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@needs_ext
def test_the_gate_changes_the_output(backend):  # noqa: F811
    """The squeeze-excitation is applied: the block without it gives another answer (a kernel that
    dropped the scale would pass nothing above with gates near 1 otherwise)."""
    tensors, kw = make_se(*SE_CASES[0])
    tensors[10] = tensors[10] - 3.0  # hardsigmoid(z - 3): gates well inside (0, 1)
    with_se = kernel(tensors, kw)
    torch.testing.assert_close(with_se, expected(tensors, kw).float(), **TOL[torch.float32])
    without = torch.ops.effops.inverted_residual(*tensors[:7], [1, 1], [1, 1], kw["activation"], True)
    assert (with_se - without).abs().max() > 0.1


@needs_ext
@pytest.mark.parametrize("se_case", [SE_CASES[0], SE_CASES[1]], ids=SE_IDS[:2])
def test_without_expansion(backend, se_case):  # noqa: F811
    """MobileNetV3-Small's first block: no expand conv, squeeze-excitation on the depthwise output."""
    tensors, kw = make_se(*se_case, expand=False)
    torch.testing.assert_close(kernel(tensors, kw), expected(tensors, kw).float(), **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit(backend, dtype):  # noqa: F811
    """At most twice the error of torch's own same-precision block against the float64 reference."""
    tensors, kw = make_se(*SE_CASES[2], dtype=dtype)
    want = expected(tensors, kw)
    got = kernel(tensors, kw)
    assert got.dtype == dtype
    torch_err = (call_reference(tensors, kw).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= 2 * torch_err
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@needs_ext
def test_packed_weights(backend):  # noqa: F811
    """Packed block weights (the squeeze-excitation's are read as they are) give the per-call result."""
    tensors, kw = make_se(*SE_CASES[1])
    packed = torch.ops.effops.inverted_residual_pack(*tensors[1:7])
    torch.testing.assert_close(kernel(tensors, kw, packed), kernel(tensors, kw), atol=0, rtol=0)


GRAD_CASES = [SE_CASES[0], SE_CASES[1], SE_CASES[3], SE_CASES[5]]


@needs_ext
@pytest.mark.parametrize("se_case", GRAD_CASES, ids=[SE_IDS[i] for i in (0, 1, 3, 5)])
@pytest.mark.parametrize("expand", [True, False], ids=["expand", "noexpand"])
def test_gradients_match_reference_autograd(backend, se_case, expand):  # noqa: F811
    """The C++ backward (the squeeze-excitation's gradients by hand, d recomputed) against torch's autograd
    through the float64 reference, for every input and weight."""
    check_gradients(se_case, expand)


@needs_ext
def test_gradients_in_chunks_of_images():
    """4 MiB of expanded tensor per image: the cpu route's backward recomputes it 2 images at a time,
    each chunk's squeeze-excitation on its own images."""
    with effops.use_backend("cpu"):
        check_gradients(((3, 5, 64, 5, 128, 128, 3, 1, "silu", True), 4, "silu", "sigmoid"), True)


@needs_ext
@pytest.mark.parametrize("level", cpu_levels())
@pytest.mark.parametrize("expand", [True, False], ids=["expand", "noexpand"])
@pytest.mark.parametrize("se_case", SE_CASES, ids=SE_IDS)
def test_fused_backward_matches_reference_autograd(level, se_case, expand):
    """With one thread a squeeze-excitation block runs the fused backward (a first pass for d's means and
    the gradient at the gate; torch's convolutions only in the SE's own backward, on [N, Ch, 1, 1] tensors:
    2 calls, where the chunked backward makes 3 or 4): every gradient against torch's autograd through the
    float64 reference, at every instruction-set level."""
    with effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level), threads(1):
        tensors, kw = make_se(*se_case, expand=expand)
        tensors = [None if t is None else t.requires_grad_() for t in tensors]
        y = call_op(tensors, kw)
        with torch.profiler.profile() as prof:
            y.backward(torch.ones_like(y))
        calls = [e.name for e in prof.events()].count("aten::convolution_backward")
        assert calls == 2, calls
        check_gradients(se_case, expand)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fused_backward_in_low_precision(dtype):
    """16-bit tensors through the fused backward (one thread): its intermediates are fp32 and only the
    gradients are rounded to the dtype, so each gradient's largest error against the float64 reference on
    the same (rounded) inputs is within 1.5 units of the dtype's rounding of its largest value (measured up
    to 0.83)."""
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    with effops.use_backend("cpu"), threads(1):
        tensors, kw = make_se(*SE_CASES[0], dtype=dtype)
        tensors = [t.requires_grad_() for t in tensors]
        y = call_op(tensors, kw)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        grads = torch.autograd.grad(y, tensors, gy)
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    wants = torch.autograd.grad(call_reference(t64, kw), t64, gy.double())
    for i, (g, w) in enumerate(zip(grads, wants)):
        assert g.dtype == dtype
        assert (g.double() - w).abs().max() <= 1.5 * unit * w.abs().max(), i


@needs_ext
@pytest.mark.parametrize("size, route", [(28, "cpu"), (14, "reference")], ids=["28x28", "14x14"])
def test_training_choice_follows_the_policy(size, route):
    """In training (two threads, fp32), a squeeze-excitation block the fused backward takes runs ours where
    its output has 28x28 pixels or more (measured ahead there; at 14x14 0.87-1.94x), else, below 16 MiB of
    expanded tensor, torch's ops."""
    if effops._backends.forced_backend() is not None:
        pytest.skip("a forced backend takes no policy")
    tensors, kw = make_se((2, 8, 48, 8, size, size, 3, 1, "hardswish", True), 12, "relu", "hardsigmoid")
    tensors = [t.requires_grad_() for t in tensors if t is not None]
    with threads(2), effops._backends.record_choices() as tally:
        call_op(tensors, kw).square().mean().backward()
    assert tally["inverted_residual"] == {route: 1}, dict(tally)
    assert ("inverted_residual_backward" in tally) == (route == "cpu")


def check_gradients(se_case, expand, only=None):
    tensors, kw = make_se(*se_case, expand=expand)
    tensors = [None if t is None else t.requires_grad_(only is None or i in only) for i, t in enumerate(tensors)]
    y = call_op(tensors, kw)
    gy = torch.randn_like(y)
    inputs = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, inputs, gy)
    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    wants = torch.autograd.grad(call_reference(t64, kw), [t for t in t64 if t is not None and t.requires_grad],
                                gy.double())
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w.float(), atol=3e-5 * max(1.0, w.abs().max().item()), rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("only", [(7,), (9, 10), (0,), (3, 8)], ids=["se_reduce_w", "se_expand", "x", "dw+se_rb"])
def test_gradients_of_some_inputs(only):
    """Only some inputs need gradients: the backward's edges line up with the given optional inputs."""
    check_gradients(SE_CASES[0], True, only=only)


def test_empty_batch_and_large_kernel():
    """Batch 0 and a 9x9 depthwise (beyond the kernel's 8x8) still compute, through ATen."""
    tensors, kw = make_se((1, 6, 18, 6, 12, 11, 9, 1, "relu6", True), 5, "relu", "sigmoid")
    torch.testing.assert_close(call_op(tensors, kw), expected(tensors, kw).float(), **TOL[torch.float32])
    tensors, kw = make_se((0, 6, 18, 8, 5, 5, 3, 2, "relu", False), 5, "relu", "sigmoid")
    assert call_op(tensors, kw).shape == (0, 8, 3, 3)


@needs_ext
@pytest.mark.parametrize("change, error, name", [
    (lambda t, kw: t.__setitem__(7, t[7][:, :5]), ValueError, "se_reduce_weight"),
    (lambda t, kw: t.__setitem__(7, t[7].double()), TypeError, "se_reduce_weight"),
    (lambda t, kw: t.__setitem__(8, t[8][:3]), ValueError, "se_reduce_bias"),
    (lambda t, kw: t.__setitem__(9, t[9][:, :3]), ValueError, "se_expand_weight"),
    (lambda t, kw: t.__setitem__(10, t[10][:7]), ValueError, "se_expand_bias"),
    (lambda t, kw: t.__setitem__(9, None), ValueError, "se_expand_weight"),
    (lambda t, kw: (t.__setitem__(7, None), t.__setitem__(9, None)), ValueError, "se_reduce_bias"),
    (lambda t, kw: kw.update(se_gate="tanh"), ValueError, "se_gate"),
    (lambda t, kw: kw.update(se_activation="tanh"), ValueError, "activation"),
])
def test_bad_arguments(change, error, name):
    tensors, kw = make_se(*SE_CASES[0])
    change(tensors, kw)
    with pytest.raises(error, match=name):
        call_op(tensors, kw)


@needs_ext
def test_opcheck_and_compile():
    """The extended schema, the Meta implementation and the autograd registration (opcheck), and
    torch.compile(fullgraph=True) with no graph break."""
    tensors, kw = make_se(*SE_CASES[1])
    args = (*tensors[:7], [2, 2], [1, 1], "silu", False, None, *tensors[7:], "silu", "sigmoid")
    torch.library.opcheck(torch.ops.effops.inverted_residual.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(lambda *t: call_op(t, kw), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*tensors), expected(tensors, kw).float(), **TOL[torch.float32])
    assert sum(counters["graph_break"].values()) == 0


@needs_ext
def test_triton_forced_runs_squeeze_excitation():
    """Forced "triton" runs a squeeze-excitation block through the Triton kernels (on CPU tensors: Triton's
    interpreter; tests/test_inverted_residual_se_triton.py has the rest), not the CPU kernel nor the reference."""
    pytest.importorskip("triton")
    if not effops._backends.runs_on("triton", "cpu"):
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET)")
    tensors, kw = make_se(*SE_CASES[0])
    with effops.use_backend("triton"), effops._backends.record_choices() as tally:
        got = kernel(tensors, kw)
    assert tally["inverted_residual"] == {"triton": 1}, dict(tally)
    torch.testing.assert_close(got, expected(tensors, kw).float(), **TOL[torch.float32])


def plain_block(block):
    """The same block as plain torch modules (what a model writes), sharing the fused block's parameters."""
    from benchmarks.models import SqueezeExcitation
    acts = {"relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "relu6": nn.ReLU6}
    gates = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
    se = SqueezeExcitation(block.se_reduce.in_channels, block.se_reduce.out_channels, act=acts[block.se_activation],
                           gate=gates[block.se_gate])
    se.fc1, se.fc2 = block.se_reduce, block.se_expand
    layers = ([block.expand, acts[block.activation]()] if block.expand is not None else []) + [
        block.depthwise, acts[block.activation](), se, block.project]
    return nn.Sequential(*layers)


@needs_ext
@pytest.mark.parametrize("expand", [True, False], ids=["expand", "noexpand"])
def test_module_trains_and_evaluates_as_the_plain_block(expand):
    torch.manual_seed(0)
    block = InvertedResidual(16, 64 if expand else 16, 24, 5, 2, activation="silu", expand=expand,
                             squeeze_channels=4, se_activation="silu", se_gate="sigmoid")
    plain = plain_block(block)
    x = torch.randn(2, 16, 15, 14).contiguous(memory_format=torch.channels_last)
    block(x).square().mean().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    plain(x).square().mean().backward()
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    block.eval()
    assert block.packed is not None
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x), **TOL[torch.float32])
    assert "se_gate='sigmoid'" in repr(block)
    restored = InvertedResidual(16, 64 if expand else 16, 24, 5, 2, activation="silu", expand=expand,
                                squeeze_channels=4, se_activation="silu", se_gate="sigmoid").eval()
    restored.load_state_dict(block.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(x), block(x), atol=0, rtol=0)


@pytest.mark.parametrize("kw, match", [
    (dict(se_gate="tanh"), "se_gate"),
    (dict(se_activation=None), "se_activation"),
])
def test_module_refuses_bad_squeeze_excitation(kw, match):
    with pytest.raises(ValueError, match=match):
        InvertedResidual(8, 32, 8, squeeze_channels=8, **kw)
    with pytest.raises(ValueError, match="squeeze"):
        InvertedResidual.from_convs(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                    nn.Conv2d(32, 8, 1), se=(nn.Conv2d(32, 8, 1), nn.Conv2d(4, 32, 1), "relu",
                                                             "sigmoid"))
