"""effops.ops.inverted_residual on every CPU route (ATen, our kernel at every instruction-set level) against the reference."""
import contextlib
import copy

import pytest
import torch

import effops
from effops import _ext
from effops.ops import inverted_residual
from effops.reference import inverted_residual as reference
from conftest import TOL, backends_on_device, cpu_levels

needs_ext = pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason())
# The backends with an inverted_residual route on CPU tensors: the plain ATen route and our kernel at
# every instruction-set level (the `backend` fixture of conftest forces one per test).
ROUTES = ("reference", "cpu")

# (N, Cin, hidden, Cout, H, W, kernel, stride, activation, residual); hidden == Cin with expand=False below.
# Channel counts off every vector and panel width on purpose; odd sizes; the MobileNet stage shapes' kinds.
CASES = [
    (2, 8, 48, 8, 9, 9, 3, 1, "relu6", True),
    (1, 5, 30, 7, 8, 11, 3, 2, "silu", False),
    (1, 17, 40, 23, 7, 6, 5, 1, "hardswish", False),
    (2, 16, 96, 24, 13, 12, 3, 2, "relu", False),
    (3, 24, 144, 24, 11, 7, 3, 1, "relu6", True),
    (1, 12, 72, 12, 5, 9, 5, 1, "gelu", True),
    (1, 3, 11, 4, 1, 1, 3, 1, None, False),
    (2, 40, 243, 40, 6, 5, 5, 2, "silu", False),
    (1, 8, 24, 8, 37, 40, 3, 1, "relu6", True),  # wide rows: steps of 2 output rows, the ring wraps
    (1, 6, 36, 10, 41, 35, 5, 2, "relu", False),
    # The AVX2 depthwise computes 7 output pixels of a row at a time: a width of 7 (rows 4 above), of 14,
    # of 8 and 18 (the last 7 overlapping the ones before), under 7 (another body); here 3x3 stride 2
    # with 8, 5x5 stride 1 with 14 and 5x5 stride 2 with 7 output pixels.
    (1, 8, 40, 16, 9, 15, 3, 2, "relu6", False),
    (2, 10, 56, 10, 7, 14, 5, 1, "hardswish", True),
    (1, 6, 33, 9, 6, 13, 5, 2, "silu", False),
]
IDS = ["%dx%d-%d-%d@%dx%d_k%d_s%d_%s%s" % (c[:8] + (c[8], "_res" if c[9] else "")) for c in CASES]


def make(case, dtype=torch.float32, layout="channels_last", expand=True, seed=0):
    """The case's tensors and the op's keyword arguments (padding (k - 1) // 2, as in the networks)."""
    N, Cin, Ch, Cout, H, W, k, stride, act, residual = case
    if not expand:
        Ch = Cin
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, H, W, generator=g)
    if layout == "noncontiguous":
        x = torch.randn(N, Cin, H, 2 * W, generator=g)[..., ::2]
    ew = torch.randn(Ch, Cin, 1, 1, generator=g) / Cin ** 0.5 if expand else None
    eb = torch.randn(Ch, generator=g) * 0.3 if expand else None
    dw = torch.randn(Ch, 1, k, k, generator=g) / k
    db = torch.randn(Ch, generator=g) * 0.3
    pw = torch.randn(Cout, Ch, 1, 1, generator=g) / Ch ** 0.5
    pb = torch.randn(Cout, generator=g) * 0.3
    tensors = [None if t is None else t.to(dtype) for t in (x, ew, eb, dw, db, pw, pb)]
    if layout == "channels_last":
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    return tensors, dict(stride=stride, padding=(k - 1) // 2, activation=act, residual=residual)


def expected(tensors, kw):
    """The reference in float64: rounding kept out of the way."""
    t64 = [None if t is None else t.double() for t in tensors]
    return reference.inverted_residual(*t64, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                       kw["residual"])


def kernel(tensors, kw, packed=None):
    """The op with the route the `backend` fixture forces, whatever the speed policy says."""
    return torch.ops.effops.inverted_residual(*tensors, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                              kw["residual"], packed)


@pytest.fixture(params=[p for p in backends_on_device() if p.values[0][0] in ROUTES])
def backend(request):
    """conftest's backend fixture, over the routes this op has."""
    name, level = request.param
    with effops.use_backend(name), (effops.cpu_isa.use_cpu_isa(level) if level else contextlib.nullcontext()):
        yield name if level is None else "%s-%s" % (name, level)


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "noncontiguous"])
def test_matches_reference(backend, case, layout):
    tensors, kw = make(case, layout=layout)
    got = kernel(tensors, kw)
    want = expected(tensors, kw)
    torch.testing.assert_close(got, want.float(), **TOL[torch.float32])
    cl = layout == "channels_last"
    assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@needs_ext
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=[IDS[0], IDS[3], IDS[5]])
def test_without_expansion(backend, case):
    """MobileNetV2's first block: no expand conv, the depthwise reads x itself."""
    tensors, kw = make(case, expand=False)
    got = kernel(tensors, kw)
    torch.testing.assert_close(got, expected(tensors, kw).float(), **TOL[torch.float32])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit(backend, dtype):
    """At most twice the error of torch's own same-precision block against the float64 reference."""
    tensors, kw = make(CASES[4], dtype=dtype)
    want = expected(tensors, kw)
    got = kernel(tensors, kw)
    assert got.dtype == dtype
    torch_err = (reference.inverted_residual(*tensors, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                             kw["residual"]).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= 2 * torch_err
    torch.testing.assert_close(got.double(), want, **TOL[dtype])


@needs_ext
def test_packed_weights(backend):
    """Weights packed once (what a module keeps) give the same result as packing per call."""
    tensors, kw = make(CASES[1])
    packed = torch.ops.effops.inverted_residual_pack(*tensors[1:])
    torch.testing.assert_close(kernel(tensors, kw, packed), kernel(tensors, kw), atol=0, rtol=0)
    if backend.startswith("cpu"):  # the ATen route reads the weights themselves
        with pytest.raises(ValueError, match="packed"):
            kernel(tensors, kw, packed[:-1].clone())


@needs_ext
@pytest.mark.parametrize("activation", reference.ACTIVATIONS, ids=str)
def test_extreme_values(backend, activation):
    """inf, -inf and NaN in x, and values far out on the activations' tails, as the reference gives them."""
    case = (1, 4, 20, 4, 6, 7, 3, 1, activation, True)
    tensors, kw = make(case)
    x, ew, _, dw, _, pw, _ = tensors
    # Half the hidden channels see +inf, half -inf (so each activation's value at both ends is used);
    # positive depthwise and project weights carry them to the output without cancelling.
    ew.abs_()[10:] *= -1
    dw.abs_()
    pw.abs_()
    x[0, :, 1, 1] = float("inf")
    x[0, :, 4, 2] = -float("inf")
    x[0, 2, 3, 5] = float("nan")
    x[0, :, 0, 6] = 1e4
    x[0, :, 5, 0] = -1e4
    want = reference.inverted_residual(*tensors, [1, 1], [1, 1], activation, True)
    got = kernel(tensors, kw)
    assert want.isfinite().any() and not want.isfinite().all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, equal_nan=True)


GRAD_CASES = [(c, e) for c in (CASES[0], CASES[1], CASES[3], CASES[5], CASES[7]) for e in (True, False)]


@needs_ext
@pytest.mark.parametrize("case, expand", GRAD_CASES, ids=lambda c: "%dx%d-%d-%d@%d_s%d_%s" % (
    c[0], c[1], c[2], c[3], c[4], c[7], c[8]) if isinstance(c, tuple) else "expand" if c else "noexpand")
def test_gradients_match_reference_autograd(backend, case, expand):
    """The C++ autograd (x and weights saved, the expanded tensor recomputed per chunk of images) against
    torch's autograd through the float64 reference."""
    check_gradients(case, expand)


@needs_ext
def test_gradients_in_chunks_of_images():
    """4 MiB of expanded tensor per image: the cpu route's backward recomputes it 2 images at a time."""
    with effops.use_backend("cpu"):
        check_gradients((3, 5, 64, 5, 128, 128, 3, 1, "silu", True), True)


@needs_ext
@pytest.mark.parametrize("case", [(1, 5, 30, 7, 9, 11, 7, 2, "gelu", False), (2, 4, 24, 4, 6, 7, 1, 1, "hardswish", True)],
                         ids=["k7_s2", "k1"])
def test_gradients_with_other_kernel_sizes(backend, case):
    """Kernel sizes besides 3 and 5 (the cpu route's depthwise backward has a body for any size beside those)."""
    check_gradients(case, True)


@needs_ext
@pytest.mark.parametrize("n_threads", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[4], CASES[2], CASES[1]], ids=[IDS[4], IDS[2], IDS[1]])
def test_gradients_in_low_precision(backend, case, dtype, n_threads):
    """bf16 / fp16 tensors (the chunked backward stores every intermediate in that dtype as torch's own ops
    do, the fused one keeps them in fp32; sums in fp32). Against the float64 reference, each gradient's
    largest error relative to its largest value is at most 1.25x what torch's own ops give on the same
    inputs (their errors come mostly from ReLU6's edges, where a rounded pre-activation lands on the other
    side of 0 or 6), plus one rounding of the dtype."""
    if backend == "reference":
        pytest.skip("the reference route is torch's ops: it would be compared with itself")

    def errors():
        tensors, kw = make(case, dtype=dtype)
        tensors = [None if t is None else t.requires_grad_() for t in tensors]
        y = inverted_residual(*tensors, **kw)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        grads = torch.autograd.grad(y, [t for t in tensors if t is not None], gy)
        t64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
        want = reference.inverted_residual(*t64, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                           kw["residual"])
        wants = torch.autograd.grad(want, [t for t in t64 if t is not None], gy.double())
        assert all(g.dtype == dtype for g in grads)
        return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(grads, wants)]

    with threads(n_threads):  # one thread: the fused backward for every case; two: for CASES[4] (3 images)
        ours = errors()
    with effops.use_backend("reference"):
        torchs = errors()
    unit = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for name, e, t in zip(("x", "expand_w", "expand_b", "dw_w", "dw_b", "project_w", "project_b"), ours, torchs):
        assert e <= 1.25 * t + unit, (name, e, t)


def check_gradients(case, expand, dtype=torch.float32, tol=dict(atol=3e-5, rtol=1e-4), layout="channels_last",
                    grad_layout="channels_last"):
    tensors, kw = make(case, dtype=dtype, expand=expand, layout=layout)
    tensors = [None if t is None else t.requires_grad_() for t in tensors]
    y = inverted_residual(*tensors, **kw)
    gy = torch.randn_like(y)
    if grad_layout == "nchw":
        gy = gy.contiguous()
    grads = torch.autograd.grad(y, [t for t in tensors if t is not None], gy)
    t64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    want = reference.inverted_residual(*t64, [kw["stride"]] * 2, [kw["padding"]] * 2, kw["activation"],
                                       kw["residual"])
    wants = torch.autograd.grad(want, [t for t in t64 if t is not None], gy.double())
    for g, w in zip(grads, wants):
        # weight gradients sum over every pixel (49k in the largest case): the error grows with the scale
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, atol=tol["atol"] * max(1.0, w.abs().max().item()),
                                   rtol=tol["rtol"])
    assert grads[0].is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                  torch.contiguous_format)


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def backward_ops(case, layout="channels_last", expand=True):
    """The names of the ops one backward of the case runs."""
    tensors, kw = make(case, layout=layout, expand=expand)
    tensors = [None if t is None else t.requires_grad_() for t in tensors]
    y = inverted_residual(*tensors, **kw)
    with torch.profiler.profile() as prof:
        y.backward(torch.ones_like(y))
    return {e.name for e in prof.events()}


# Beside CASES: a 1x1 depthwise of stride 2 on rows of 65 output pixels (steps of one output row: each
# skips an odd input row, read by no tap, and the last row is never read: their gradient is zero) and a 7x7
# one (the general depthwise body).
FUSED_CASES = CASES + [(2, 4, 24, 4, 8, 130, 1, 2, "relu", False), (1, 5, 30, 7, 9, 11, 7, 2, "gelu", False)]


@needs_ext
@pytest.mark.parametrize("level", cpu_levels())
@pytest.mark.parametrize("expand", [True, False], ids=["expand", "noexpand"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=IDS + ["k1_s2", "k7_s2"])
def test_fused_backward_matches_reference_autograd(level, case, expand):
    """With one thread every block, any batch, runs the fully fused backward (none of torch's convolutions
    in it) at every instruction-set level; its gradients against torch's autograd through the float64
    reference, x channels-last with g_y of either layout, and NCHW x."""
    with effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level), threads(1):
        ops = backward_ops(case, expand=expand)
        assert "effops::inverted_residual_backward" in ops and "aten::convolution_backward" not in ops, ops
        check_gradients(case, expand, grad_layout="nchw" if case[0] > 1 else "channels_last")
        if case is CASES[3] or case is CASES[4]:
            check_gradients(case, expand, layout="nchw")


@needs_ext
def test_fused_backward_needs_an_image_per_thread():
    """The fused backward runs images in parallel: with fewer images than threads the chunked backward
    (torch's 1x1 convolutions) runs instead; both give the reference's gradients."""
    with effops.use_backend("cpu"), threads(2):
        for n, fused in ((1, False), (2, True), (3, True)):
            case = (n, 8, 48, 8, 9, 9, 3, 1, "relu6", True)
            ops = backward_ops(case)
            assert ("aten::convolution_backward" not in ops) == fused, (n, ops)
            check_gradients(case, True)


@needs_ext
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_automatic_choice_matches_reference(case):
    """The op as users call it (its CPU implementation chooses the route)."""
    tensors, kw = make(case)
    torch.testing.assert_close(inverted_residual(*tensors, **kw), expected(tensors, kw).float(),
                               **TOL[torch.float32])


def test_op_large_kernel_and_empty_batch():
    """A 9x9 depthwise (beyond the kernel's 8x8) and batch 0 still compute, through ATen."""
    tensors, kw = make((1, 6, 18, 6, 12, 11, 9, 1, "relu6", True))
    torch.testing.assert_close(inverted_residual(*tensors, **kw), expected(tensors, kw).float(), **TOL[torch.float32])
    tensors, kw = make((0, 6, 18, 8, 5, 5, 3, 2, "relu", False))
    y = inverted_residual(*tensors, **kw)
    assert y.shape == (0, 8, 3, 3)


@needs_ext
def test_forced_kernel_declines_what_it_cannot_take():
    """Forced, our kernel raises (never a quiet fallback) where the automatic choice runs ATen."""
    for case, why in (((0, 6, 18, 8, 5, 5, 3, 2, "relu", False), "empty"),
                      ((1, 6, 18, 6, 12, 11, 9, 1, "relu6", True), "8x8")):
        tensors, kw = make(case)
        with effops.use_backend("cpu"), pytest.raises(effops.BackendError, match=why):
            kernel(tensors, kw)


@needs_ext
@pytest.mark.parametrize("change, error, name", [
    (lambda t, kw: t.__setitem__(0, t[0].int()), TypeError, "x"),
    (lambda t, kw: t.__setitem__(0, t[0][0]), ValueError, "x"),
    (lambda t, kw: t.__setitem__(1, t[1][:, :3]), ValueError, "expand_weight"),
    (lambda t, kw: t.__setitem__(2, t[2][:5]), ValueError, "expand_bias"),
    (lambda t, kw: t.__setitem__(3, t[3].double()), TypeError, "dw_weight"),
    (lambda t, kw: t.__setitem__(3, t[3][:7]), ValueError, "dw_weight"),
    (lambda t, kw: t.__setitem__(4, t[4][:, None]), ValueError, "dw_bias"),
    (lambda t, kw: t.__setitem__(5, t[5][:, :4]), ValueError, "project_weight"),
    (lambda t, kw: t.__setitem__(6, t[6][:2]), ValueError, "project_bias"),
    (lambda t, kw: kw.update(activation="tanh"), ValueError, "activation"),
    (lambda t, kw: kw.update(stride=2), ValueError, "residual"),
    (lambda t, kw: kw.update(stride=0), ValueError, "stride"),
    (lambda t, kw: kw.update(stride="1"), TypeError, "stride"),
    (lambda t, kw: kw.update(padding=-1), ValueError, "padding"),
])
def test_bad_arguments(change, error, name):
    tensors, kw = make(CASES[0])
    change(tensors, kw)
    with pytest.raises(error, match=name):
        inverted_residual(*tensors, **kw)


@needs_ext
def test_opcheck_and_compile():
    """The op's schema and Meta implementation (torch.library.opcheck), and torch.compile(fullgraph=True)
    with no graph break."""
    tensors, kw = make(CASES[3])
    args = (*tensors, [2, 2], [1, 1], "relu", False, None)
    torch.library.opcheck(torch.ops.effops.inverted_residual.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(lambda *t: inverted_residual(*t, **kw), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*tensors), expected(tensors, kw).float(), **TOL[torch.float32])
    assert sum(counters["graph_break"].values()) == 0


@needs_ext
def test_automatic_choice_follows_the_policy():
    """fp32: our kernel at every level (measured faster than the ATen route on every benchmarked block,
    the AVX2 body included); bf16 where torch multiplies bf16 natively: the ATen route for a block with
    32M expand multiply-adds or more and under 8 MiB of expanded tensor."""
    tensors, kw = make(CASES[4])
    for level in [lv for lv in ("avx2", "avx512") if lv in effops.cpu_isa.levels()]:
        with effops.cpu_isa.use_cpu_isa(level), effops._backends.record_choices() as tally:
            inverted_residual(*tensors, **kw)
        assert tally["inverted_residual"] == {"cpu": 1}, (level, dict(tally))
    big, kw = make((16, 96, 576, 96, 14, 14, 3, 1, "relu6", True), dtype=torch.bfloat16)
    with effops._backends.record_choices() as tally:
        inverted_residual(*big, **kw)
    native = effops.cpu_isa.cpu_has_native_bf16()
    assert tally["inverted_residual"] == {"reference" if native else "cpu": 1}, dict(tally)


# Small enough for Triton's interpreter: (N, Cin, hidden, Cout, H, W, kernel, stride, activation, residual).
TRITON_CASES = [(1, 8, 40, 8, 6, 7, 3, 1, "relu6", True), (2, 5, 20, 12, 5, 6, 5, 2, "hardswish", False),
                (1, 4, 18, 4, 4, 5, 3, 1, "gelu", True), (1, 6, 36, 7, 3, 4, 3, 2, "silu", False)]
needs_triton = pytest.mark.skipif(not effops.backends()["triton"], reason="triton backend not usable here")


@needs_ext
@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "%s_k%d_s%d" % (c[8], c[6], c[7]))
@pytest.mark.parametrize("layout, expand, dtype", [("channels_last", True, torch.float32),
                                                   ("nchw", True, torch.float32),
                                                   ("channels_last", False, torch.float32),
                                                   ("channels_last", True, torch.float16)],
                         ids=["cl", "nchw", "noexpand", "fp16"])
def test_triton_matches_reference(case, layout, expand, dtype):
    """The Triton forward, forced on CPU tensors: Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""
    tensors, kw = make(case, dtype=dtype, layout=layout, expand=expand)
    with effops.use_backend("triton"):
        got = kernel(tensors, kw)
    torch.testing.assert_close(got.double(), expected(tensors, kw), **TOL[dtype])
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)


@needs_ext
@pytest.mark.parametrize("case, dtype, route", [
    ((2, 8, 48, 8, 9, 9, 3, 1, "relu6", True), torch.float32, "reference"),     # fused backward, 9x9 output
    ((2, 8, 48, 8, 14, 14, 3, 1, "relu6", True), torch.float32, "cpu"),         # fused backward, 14x14 output
    ((1, 8, 48, 8, 14, 14, 3, 1, "relu6", True), torch.float32, "reference"),   # an image for two threads
    ((2, 8, 64, 8, 182, 182, 3, 1, "relu6", True), torch.float32, "cpu"),       # 16 MiB or more
    ((2, 8, 48, 8, 14, 14, 3, 2, "relu6", False), torch.bfloat16, "cpu"),       # 16-bit, fused, stride 2
    ((2, 8, 48, 8, 14, 14, 3, 1, "relu6", True), torch.bfloat16, "reference"),  # 16-bit, fused, stride 1
    ((2, 48, 48, 8, 28, 28, 3, 1, "relu6", False), torch.float32, "reference"),  # no expand conv, < 16 MiB
], ids=["fused-9x9", "fused-14x14", "1-image", "16MiB", "bf16-s2", "bf16-s1", "noexpand"])
def test_training_choice_follows_the_policy(case, dtype, route):
    """In training (two threads), a block the fused backward takes runs ours where it measured ahead (fp32:
    an output of 14x14 pixels or more; 16-bit: stride 2; not blocks without an expand conv); otherwise one
    with less than 16 MiB of expanded tensor runs as torch's ops (autograd saving it), a larger one as ours.
    fp32 gradients match the reference's on both routes, ours in bf16 within two roundings."""
    if effops._backends.forced_backend() is not None:
        pytest.skip("a forced backend takes no policy")
    expand = case[1] != case[2]
    tensors, kw = make(case, dtype=dtype, expand=expand)
    weights = [t.requires_grad_() for t in tensors[1:] if t is not None]
    with threads(2), effops._backends.record_choices() as tally:
        y = inverted_residual(*tensors, **kw)
        y.float().square().mean().backward()
    assert tally["inverted_residual"] == {route: 1}, dict(tally)
    assert ("inverted_residual_backward" in tally) == (route == "cpu")
    t64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors[1:]]
    expected([tensors[0].double()] + t64, kw).square().mean().backward()
    t64 = [t for t in t64 if t is not None]
    for w, w64 in zip(weights, t64):
        if dtype == torch.float32:
            torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-4)
        elif route == "cpu":  # ours keeps fp32 intermediates: within two bf16 roundings of the largest value
            assert (w.grad.double() - w64.grad).abs().max() <= 2 * 2.0 ** -8 * w64.grad.abs().max()
        # (torch's own bf16 route rounds every intermediate: its error is torch's, not under test here)


@needs_ext
@pytest.mark.parametrize("with_se", [False, True], ids=["plain", "se"])
def test_autocast_casts_like_torchs_convolutions(with_se):
    """Under CPU autocast (bf16) fp32 inputs are cast as torch casts a convolution's: the result is the op on
    the cast tensors, bf16, on every route; fp32 packed weights are not used for bf16 weights."""
    from effops.nn import InvertedResidual
    torch.manual_seed(0)
    block = InvertedResidual(8, 32, 8, 3, 1, "hardswish", residual=True,
                             squeeze_channels=8 if with_se else None).eval()
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = block(x)
    assert got.dtype == torch.bfloat16
    want = copy.deepcopy(block).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(got, want(x.to(torch.bfloat16)), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and in training (gradients reach the fp32 weights)
        block.train()(x).float().square().mean().backward()
    assert block.depthwise.weight.grad.dtype == torch.float32 and block.depthwise.weight.grad.abs().sum() > 0
