"""effops.ops.dwpw_conv2d on every backend against the reference (computed in float64)."""
import contextlib
import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import effops
from effops import _backends
from effops.ops import dwpw_conv2d
from effops.reference import dwpw_conv2d as reference
from conftest import TOL, compiled_with_freezing, cpu_levels, device, run_at_every_cpu_level

# The ops these tests run, for conftest: a backend with no kernel for them is not offered (an instance
# that could run on no machine).
BACKEND_OPS = ("dwpw_conv2d",)

dwpw = importlib.import_module("effops.ops.dwpw_conv2d")  # the module (effops.ops.dwpw_conv2d is the function)
ACTIVATIONS = reference.ACTIVATIONS

# (N, C, O, H, W, kernel, stride, padding, dilation, dw_bias, pw_bias, activation): every option of the
# issue appears at least once; channel counts are not multiples of any tile width on purpose.
CASES = [
    (2, 8, 16, 9, 9, 3, 1, 1, 1, True, True, "relu"),
    (1, 5, 7, 8, 11, 3, 2, 1, 1, False, True, "relu6"),
    (2, 13, 9, 10, 7, 5, 1, 2, 2, True, False, "gelu"),
    (1, 17, 33, 12, 12, 7, 2, 3, 1, True, True, "silu"),
    (2, 3, 4, 6, 5, 1, 1, 0, 1, False, False, None),
    (1, 6, 10, 9, 8, 2, 1, (1, 0), 1, True, True, "relu"),
    (1, 9, 5, 11, 13, 4, 2, (2, 1), 2, True, True, "gelu"),
    (3, 4, 12, 7, 9, (3, 5), 1, (1, 2), (2, 1), True, True, "silu"),
    (1, 11, 20, 15, 6, 6, 1, 3, 1, False, True, "relu6"),
    (1, 24, 40, 13, 14, 3, 2, 1, 1, True, True, "relu6"),
    (1, 7, 6, 8, 9, 3, 1, 1, 1, True, True, "hardswish"),
]
IDS = ["k%s_s%s_p%s_d%s_%s" % (c[5], c[6], c[7], c[8], c[11]) for c in CASES]


def make(case, dtype=torch.float32, layout="nchw", requires_grad=False, seed=0, dev=None):
    """The case's tensors on `dev` (default: the test device; tests that force the cpu backend pass "cpu",
    so they still run when the suite runs on CUDA tensors) and its conv arguments."""
    N, C, O, H, W, k, stride, padding, dilation, dwb, pwb, act = case
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        x = torch.randn(N, C, H, 2 * W, generator=g)[..., ::2]
    dw_weight = torch.randn(C, 1, kh, kw, generator=g) / (kh * kw) ** 0.5
    pw_weight = torch.randn(O, C, 1, 1, generator=g) / C ** 0.5
    dw_bias = torch.randn(C, generator=g) * 0.5 if dwb else None
    pw_bias = torch.randn(O, generator=g) * 0.5 if pwb else None
    dev = device() if dev is None else dev
    tensors = [t if t is None else t.to(device=dev, dtype=dtype).requires_grad_(requires_grad)
               for t in (x, dw_weight, pw_weight, dw_bias, pw_bias)]
    if layout == "channels_last":  # .to() may keep it, but make sure the layout under test is the one given
        tensors[0] = tensors[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(requires_grad)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, activation=act)
    return tensors, kwargs


def expected(tensors, kwargs):
    """The reference in float64 (the definition of correct, with rounding kept out of the way)."""
    t64 = [None if t is None else t.detach().double() for t in tensors]
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    return reference.dwpw_conv2d(*t64, pair(kwargs["stride"]), pair(kwargs["padding"]), pair(kwargs["dilation"]),
                                 kwargs["activation"])


def composed(t, kwargs):
    """The two-conv block with autograd, for gradients (t: x, dw_weight, pw_weight, dw_bias, pw_bias)."""
    h = F.conv2d(t[0], t[1], t[3], kwargs["stride"], kwargs["padding"], kwargs["dilation"], groups=t[0].shape[1])
    return F.conv2d(reference.activate(h, kwargs["activation"]), t[2], t[4])


def tiny(case):
    """Small enough for the Triton interpreter."""
    return case[0] * case[3] * case[4] <= 300


# The Triton interpreter costs seconds per launch: its gradient tests take the cases that together cover
# every kernel size parity, stride, dilation, padding form, bias combination and activation.
TRITON_GRAD_CASES = (CASES[1], CASES[2], CASES[4], CASES[5], CASES[7], CASES[10])


def skip_slow_backend(backend, case, grads=False):
    if backend == "triton" and not tiny(case):
        pytest.skip("triton runs in the interpreter here: tiny shapes only")
    if backend == "triton" and grads and os.environ.get("TRITON_INTERPRET") == "1" and case not in TRITON_GRAD_CASES:
        pytest.skip("triton interpreter: gradients checked on TRITON_GRAD_CASES (slow interpreter)")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_fp32(backend, case):
    skip_slow_backend(backend, case)
    tensors, kwargs = make(case)
    y = dwpw_conv2d(*tensors, **kwargs)
    torch.testing.assert_close(y, expected(tensors, kwargs).float(), **TOL[torch.float32])


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7]], ids=[IDS[0], IDS[3], IDS[7]])
def test_forward_layouts(backend, case, layout):
    skip_slow_backend(backend, case)
    tensors, kwargs = make(case, layout=layout)
    y = dwpw_conv2d(*tensors, **kwargs)
    want_cl = layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    torch.testing.assert_close(y, expected(tensors, kwargs).float(), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[9]], ids=[IDS[1], IDS[2], IDS[9]])
def test_forward_low_precision(backend, case, dtype, layout):
    skip_slow_backend(backend, case)
    tensors, kwargs = make(case, dtype=dtype, layout=layout)
    y = dwpw_conv2d(*tensors, **kwargs)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected(tensors, kwargs).float(), **TOL[dtype])


def _grads(case, layout, dtype=torch.float32):
    tensors, kwargs = make(case, layout=layout, dtype=dtype, requires_grad=True)
    y = dwpw_conv2d(*tensors, **kwargs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    leaves = [t for t in tensors if t is not None]
    got = torch.autograd.grad(y, leaves, gy)
    t64 = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    want = torch.autograd.grad(composed(t64, kwargs), [t for t in t64 if t is not None], gy.double())
    return tensors, got, want


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients(backend, case, layout):
    skip_slow_backend(backend, case, grads=True)
    if layout == "channels_last" and case not in (CASES[0], CASES[3], CASES[7]):
        pytest.skip("channels_last gradients: checked on three cases")
    tensors, got, want = _grads(case, layout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-4)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_low_precision(backend, dtype):
    case = CASES[1]
    skip_slow_backend(backend, case)
    tensors, got, want = _grads(case, "nchw", dtype)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_every_gpu_config(monkeypatch, dtype):
    """On a GPU the Triton launchers pick their tiles by shape (_forward_config / _backward_config), so a
    benchmark shape runs one of them, and the interpreter always takes the first: run every
    configuration, forward and gradients, on a shape that no tile divides (72 pixels, 37 channels, 35
    outputs). fp16 takes the GPU's tensor-core dot path in the interpreter too; bf16 only on a GPU (the
    interpreter computes bf16 dots wrongly)."""
    if not effops.backends()["triton"]:
        pytest.skip("triton not usable here")
    if dtype == torch.bfloat16 and device().type == "cpu":
        pytest.skip("bf16 dots: GPU only (the interpreter computes them wrongly; fp16 covers the path here)")
    tk = importlib.import_module("effops.triton_kernels.dwpw_conv2d")
    assert tk._lowp(torch.empty(0, dtype=torch.float16)) and not tk._lowp(torch.empty(0))
    case = (1, 37, 35, 9, 8, 3, 1, 1, 1, True, True, "silu")
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for fwd, bwd in zip(tk.CONFIGS, tk.BWD_CONFIGS, strict=True):
        monkeypatch.setattr(tk, "_forward_config", lambda O, fwd=fwd: fwd)
        monkeypatch.setattr(tk, "_backward_config", lambda bwd=bwd: bwd)
        with effops.use_backend("triton"):
            tensors, got, want = _grads(case, "nchw", dtype)
            y = dwpw_conv2d(*tensors, **make(case)[1])
        torch.testing.assert_close(y.float(), expected(tensors, make(case)[1]).float(), **tol,
                                   msg=lambda m: "forward %s: %s" % (fwd, m))
        for name, g, w in zip(("x", "dw_weight", "pw_weight", "dw_bias", "pw_bias"), got, want):
            torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m: "grad %s %s: %s" % (name, bwd, m))


def test_only_requested_gradients(backend):
    case = CASES[4]
    tensors, kwargs = make(case)
    x = tensors[0].requires_grad_()
    y = dwpw_conv2d(*tensors, **kwargs)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    t64 = [None if t is None else t.detach().double() for t in tensors]
    t64[0].requires_grad_()
    (want,) = torch.autograd.grad(composed(t64, kwargs).sum(), [t64[0]])
    torch.testing.assert_close(gx, want.float(), **TOL[torch.float32])


def test_extreme_values(backend):
    case = CASES[0]
    tensors, kwargs = make(case)
    tensors[0] = tensors[0] * 1e4
    y = dwpw_conv2d(*tensors, **kwargs)
    torch.testing.assert_close(y, expected(tensors, kwargs).float(), atol=1e-2, rtol=1e-5)


def _non_finite_inputs(seed=0):
    """16 channels, 1 x 8 pixels: NaN, +inf and -inf each alone in one channel of one pixel, in an
    x large enough to fill the kernels' vector lanes; 1x1 depthwise so each special value reaches the
    activation unmixed (the pointwise sum then spreads it as torch's does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 8, generator=g)
    x[0, 3, 0, 0], x[0, 9, 0, 1], x[0, 12, 0, 2] = float("nan"), float("inf"), float("-inf")
    x[0, 2, 0, 3] = -100.0  # exp overflow inside silu/gelu, a finite answer
    return x, torch.randn(16, 1, 1, 1, generator=g), torch.randn(8, 16, 1, 1, generator=g)


def non_finite_check(activation):
    """Our op against torch's two convolutions on NaN/inf inputs (same NaN and inf positions)."""
    x, dw, pw = _non_finite_inputs()
    want = F.conv2d(reference.activate(F.conv2d(x, dw, groups=16), activation), pw)
    torch.testing.assert_close(dwpw_conv2d(x.to(device()), dw.to(device()), pw.to(device()), activation=activation),
                               want.to(device()), equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_non_finite_values_propagate_as_in_torch(backend, activation):
    # relu(NaN) is NaN in torch: a max that returned its other operand turned it into 0 (and hid a
    # diverging run); silu(-inf) is NaN as torch's -inf * sigmoid(-inf). (Triton's interpreter computes
    # max with numpy, which propagates NaN anyway: only a GPU run checks the kernels' propagate_nan.)
    non_finite_check(activation)


@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish", "gelu", "silu"])
def test_gradients_at_the_activations_edges(backend, activation):
    # A 1x1 depthwise of weight 1 makes the pre-activation x itself, so act' is taken exactly at relu's 0,
    # relu6's 0 and 6 and hardswish's -3 and 3, where the reference defines it (hardswish: 0 at -3, 1 at 3).
    edges = torch.tensor([-3.0, 3.0, 0.0, 6.0, -3.5, 3.5, -2.5, 2.5])
    x = torch.stack([edges.roll(c) for c in range(16)]).view(1, 16, 1, 8).to(device()).requires_grad_()
    g = torch.Generator().manual_seed(0)
    pw = torch.randn(8, 16, 1, 1, generator=g).to(device())
    grad_y = torch.randn(1, 8, 1, 8, generator=g).to(device())
    y = dwpw_conv2d(x, torch.ones(16, 1, 1, 1, device=device()), pw, activation=activation)
    (gx,) = torch.autograd.grad(y, [x], grad_y)
    grad_a = torch.einsum("nohw,oc->nchw", grad_y, pw.flatten(1))
    want = reference.activation_backward(grad_a, x.detach(), activation)
    torch.testing.assert_close(gx, want, atol=1e-5, rtol=1e-5)


def test_unbatched_input_as_conv2d_takes_it():
    tensors, kwargs = make(CASES[0])
    x = tensors[0][:1]
    want = dwpw_conv2d(x, *tensors[1:], **kwargs)[0]
    torch.testing.assert_close(dwpw_conv2d(x[0], *tensors[1:], **kwargs), want, atol=0, rtol=0)


def test_autocast_casts_to_bf16():
    tensors, kwargs = make(CASES[0])
    with torch.autocast(device().type, dtype=torch.bfloat16):
        y = dwpw_conv2d(*tensors, **kwargs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected(tensors, kwargs).float(), **TOL[torch.bfloat16])


def test_opcheck():
    for case, layout in ((CASES[0], "nchw"), (CASES[7], "channels_last"), (CASES[4], "nchw")):
        tensors, kwargs = make(case, layout=layout, requires_grad=True)
        pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
        args = (*tensors, pair(kwargs["stride"]), pair(kwargs["padding"]), pair(kwargs["dilation"]),
                kwargs["activation"])
        torch.library.opcheck(torch.ops.effops.dwpw_conv2d.default, args)
        y = dwpw_conv2d(*[None if t is None else t.detach() for t in tensors], **kwargs)
        bargs = (torch.randn_like(y), tensors[0].detach(), tensors[1].detach(), tensors[2].detach(),
                 None if tensors[3] is None else tensors[3].detach(), *args[5:], [True] * 5)
        torch.library.opcheck(torch.ops.effops.dwpw_conv2d_backward.default, bargs)


def test_torch_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    tensors, kwargs = make(CASES[1], requires_grad=True)

    def f(x, dw, pw, b2):
        return dwpw_conv2d(x, dw, pw, None, b2, **kwargs).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [tensors[0], tensors[1], tensors[2], tensors[4]]
    out = compiled(*args)
    out.backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    f(*args).backward()
    torch.testing.assert_close(out, f(*args))
    for g, a in zip(grads, args):
        torch.testing.assert_close(g, a.grad)



@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_compiled_nchw_model_hands_the_fused_op_channels_last_tensors():
    """_dwpw_conv2d takes any layout (flexible_layout): in an NCHW model compiled by inductor, whose layout
    optimization runs the convolutions channels-last, the fused op gets those channels-last tensors (no
    conversion around it) and its output follows them; the compiled model computes what eager does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                effops.nn.SeparableConv2d(16, 24, 3, padding=1, activation="relu"),
                                torch.nn.Conv2d(24, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 20, 20)
    got, strides = compiled_with_freezing(model, x)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    assert strides["torch.ops.effops._dwpw_conv2d.default"] == [((2, 24, 20, 20), (9600, 1, 480, 24))]  # channels-last


def test_bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    dw, pw = torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dwpw_conv2d(x.numpy(), dw, pw)
    with pytest.raises(ValueError, match="x must be 4-D"):
        dwpw_conv2d(x[0, 0], dw, pw)
    with pytest.raises(ValueError, match=r"x must have 4 channels for dw_weight of shape \(4, 1, 3, 3\)"):
        dwpw_conv2d(x[:, :3], dw, pw)
    with pytest.raises(TypeError, match="x must have dtype"):
        dwpw_conv2d(x.double(), dw, pw)
    with pytest.raises(ValueError, match="dw_weight must have shape"):
        dwpw_conv2d(x, torch.randn(4, 2, 3, 3), pw)
    with pytest.raises(ValueError, match="pw_weight must have shape"):
        dwpw_conv2d(x, dw, torch.randn(6, 5, 1, 1))
    with pytest.raises(ValueError, match="pw_weight must have shape"):
        dwpw_conv2d(x, dw, torch.randn(6, 4, 3, 3))
    with pytest.raises(ValueError, match="dw_bias must have shape"):
        dwpw_conv2d(x, dw, pw, dw_bias=torch.randn(5))
    with pytest.raises(ValueError, match="pw_bias must have shape"):
        dwpw_conv2d(x, dw, pw, pw_bias=torch.randn(4))
    with pytest.raises(TypeError, match="pw_weight must have dtype torch.float32"):
        dwpw_conv2d(x, dw, pw.half())
    with pytest.raises(ValueError, match="stride must be >= 1"):
        dwpw_conv2d(x, dw, pw, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        dwpw_conv2d(x, dw, pw, padding=-1)
    with pytest.raises(TypeError, match="dilation must be an int or a pair"):
        dwpw_conv2d(x, dw, pw, dilation=(1, 1, 1))
    with pytest.raises(ValueError, match="activation must be one of"):
        dwpw_conv2d(x, dw, pw, activation="tanh")
    with pytest.raises(ValueError, match="too small"):
        dwpw_conv2d(x[..., :2, :2], dw, pw)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_fused_op_checks_a_direct_call(dev):
    # The public op checks its arguments once and its call of _dwpw_conv2d does not check them again;
    # a direct call of _dwpw_conv2d (a user's, or a compiled graph's node) gets the same errors, also
    # right after a public call (the public op's mark ends with its call).
    x = torch.randn(2, 4, 8, 8, device=dev)
    dw, pw = torch.randn(4, 1, 3, 3, device=dev), torch.randn(6, 4, 1, 1, device=dev)
    fused = torch.ops.effops._dwpw_conv2d.default

    def call(x=x, dw=dw, pw=pw, dw_bias=None, stride=(1, 1), activation=None):
        return fused(x, dw, pw, dw_bias, None, list(stride), [0, 0], [1, 1], activation)

    for public_call_first in (False, True):
        if public_call_first:  # on cpu tensors through the fused op (meta ones have no kernel of ours)
            with effops.use_backend("cpu") if dev == "cpu" else contextlib.nullcontext():
                assert dwpw_conv2d(x, dw, pw, activation="relu").shape == (2, 6, 6, 6)
        with pytest.raises(ValueError, match=r"x must have 4 channels for dw_weight of shape \(4, 1, 3, 3\)"):
            call(x=x[:, :3])
        with pytest.raises(TypeError, match="pw_weight must have dtype torch.float32"):
            call(pw=pw.half())
        with pytest.raises(ValueError, match="dw_bias must have shape"):
            call(dw_bias=torch.randn(5, device=dev))
        with pytest.raises(ValueError, match="stride must be >= 1"):
            call(stride=(1, 0))
        with pytest.raises(ValueError, match="activation must be one of"):
            call(activation="tanh")
        with pytest.raises(ValueError, match="too small"):
            call(x=x[..., :2, :2])
    assert call(activation="silu").shape == (2, 6, 6, 6)


# Shapes spanning several pixel tiles and row bands of the cpu kernels (many tiles, both backward
# phases, channel and output tails), checked forward and backward on the fast backends.
LARGE = [
    (2, 37, 45, 40, 33, 3, 1, 1, 1, True, True, "relu6"),
    (1, 130, 21, 29, 30, 5, 2, 2, 1, True, True, "gelu"),
    (3, 20, 70, 23, 61, 7, 1, 3, 2, False, True, "silu"),
]


@pytest.mark.parametrize("case", LARGE, ids=["c37", "c130", "k7d2"])
def test_large_forward_and_gradients(backend, case):
    if backend in ("triton", "reference"):
        pytest.skip("tiling checks: triton runs in the interpreter here (tiny shapes only); the reference has no tiles")
    tensors, kwargs = make(case, layout="channels_last" if case[1] == 130 else "nchw")
    torch.testing.assert_close(dwpw_conv2d(*tensors, **kwargs), expected(tensors, kwargs).float(), atol=1e-4,
                               rtol=1e-4)
    tensors, got, want = _grads(case, "nchw")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), atol=1e-3, rtol=1e-4)


# The cpu forward reads NCHW directly (depthwise along rows into a transposed tile of whole output
# rows, zero-padded lines per stride phase): shapes with several row tiles per image (C large), a row
# wider than a tile (one row per tile), rows shorter than a vector (7x7 maps), stride 2 and 3 with
# odd/even kernels and dilation, odd channel counts. Each in both layouts and in bf16 (the line copy
# converts), output in x's layout.
NCHW_TILES = [
    (2, 300, 19, 9, 7, 3, 1, 1, 1, True, True, "relu6"),
    (1, 70, 21, 23, 37, 4, 2, (2, 1), 2, True, False, "gelu"),
    (1, 40, 9, 3, 600, 5, 1, 2, 1, False, True, "silu"),
    (3, 17, 33, 14, 13, 7, 3, 3, 1, True, True, None),
    (1, 9, 5, 8, 8, 2, 2, 0, 2, False, False, "relu"),
]


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", NCHW_TILES, ids=["c300", "s2d2", "wide", "s3k7", "k2"])
def test_cpu_forward_row_tiles(case, layout, dtype):
    tensors, kwargs = make(case, layout=layout, dtype=dtype, dev="cpu")
    with effops.use_backend("cpu"):
        y = dwpw_conv2d(*tensors, **kwargs)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and y.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y.float(), expected(tensors, kwargs).float(), **tol)


# The cpu backward (csrc/cpu/dwpw_conv2d_backward.cpp) reads x and grad_y each in its own layout
# (NCHW or channels-last, other strides copied to NCHW), writes grad_x in x's layout and dtype, and
# splits images into bands of output rows whose grad_x rows are gathered with a halo: checked here for
# mixed layouts, low precision and several band counts (the count follows the thread count).
def _cpu_backward_vs_reference(case, x_layout, gy_layout, dtype=torch.float32, needs=(True,) * 5):
    tensors, kwargs = make(case, layout=x_layout, dtype=dtype, dev="cpu")
    x, dw, pw, dwb, pwb = tensors
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    conv = (pair(kwargs["stride"]), pair(kwargs["padding"]), pair(kwargs["dilation"]), kwargs["activation"])
    y = reference.dwpw_conv2d(x, dw, pw, dwb, pwb, *conv)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    if gy_layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    elif gy_layout == "noncontiguous":
        gy = torch.cat([gy, gy], dim=3)[..., ::2]
    need = [needs[0], needs[1], needs[2], needs[3] and dwb is not None, needs[4] and pwb is not None]
    with effops.use_backend("cpu"):
        got = torch.ops.effops.dwpw_conv2d_backward(gy, x, dw, pw, dwb, *conv, need)
    want = reference.dwpw_conv2d_backward(gy.double(), x.double(), dw.double(), pw.double(),
                                          None if dwb is None else dwb.double(), *conv, need)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for i, (g, w) in enumerate(zip(got, want)):
        if not need[i]:
            assert g.numel() == 0
            continue
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
    if need[0]:
        fmt = torch.channels_last if x_layout == "channels_last" else torch.contiguous_format
        assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("x_layout,gy_layout", [("nchw", "channels_last"), ("channels_last", "nchw"),
                                                ("noncontiguous", "noncontiguous"),
                                                ("channels_last", "channels_last")])
@pytest.mark.parametrize("case", [CASES[3], CASES[7], LARGE[0]], ids=["k7s2", "k3x5d2", "c37"])
def test_cpu_backward_layouts(case, x_layout, gy_layout):
    _cpu_backward_vs_reference(case, x_layout, gy_layout)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_backward_low_precision(layout, dtype):
    _cpu_backward_vs_reference(CASES[9], layout, layout, dtype)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("case", [LARGE[2], NCHW_TILES[1], (1, 12, 20, 37, 29, 5, 1, 2, 1, True, True, "silu"),
                                  (1, 7, 9, 30, 11, 3, 2, 0, 1, True, False, "relu"),
                                  (1, 16, 8, 80, 300, 3, 2, 2, 2, True, True, "relu"),
                                  (1, 8, 12, 64, 300, 7, 1, 6, 2, True, False, "gelu")],
                         ids=["k7d2", "s2d2", "k5", "s2p0", "wide_s2d2", "wide_k7d2"])
def test_cpu_backward_bands(case, threads):
    """Bands per image grow with the threads when the batch is small; every band count gives the same
    gradients (halo rows, band edges at every stride/dilation/padding, the rows no output row reaches).
    With grad_x wanted a band is at least two chunks tall, and a chunk is ~1000 pixels of 16 channels:
    only the wide, thin images (300 columns: 3-6 rows a chunk, 40-64 output rows) split into several
    bands at 3 and 8 threads, with halos of 1 (3x3 s2 d2) and 12 (7x7 d2) rows."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _cpu_backward_vs_reference(case, "nchw", "nchw")
        _cpu_backward_vs_reference(case, "channels_last", "channels_last", needs=(True, False, True, False, True))
        _cpu_backward_vs_reference(case, "nchw", "nchw", needs=(False, True, True, True, True))
    finally:
        torch.set_num_threads(old)


# Channel counts around every level's micro-kernel blocking (AVX2: 6 pixels x 16 columns; AVX-512:
# 8 pixels x 3 panels of 16 columns): 1, 2 or 3 panels in the last call, a partial panel, odd counts,
# the depthwise channel loop's vector tails (4 vectors, 1 vector, an AVX2 vector inside the AVX-512
# body, scalars), and pixel counts that leave 1..7 rows for the last call. In-process at every level.
WIDE_CHANNELS = [
    (2, 49, 97, 7, 9, 3, 1, 1, 1, True, True, "relu6"),
    (1, 33, 47, 9, 5, 3, 2, 1, 1, False, True, "silu"),
    (3, 71, 33, 5, 7, 5, 1, 2, 1, True, False, "hardswish"),
    (1, 24, 16, 11, 3, 3, 1, 1, 2, True, True, "gelu"),
    (2, 1, 1, 6, 6, 3, 1, 1, 1, True, True, "relu"),
]


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("level", [pytest.param(lv, id=lv) for lv in cpu_levels()])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", WIDE_CHANNELS, ids=["c49o97", "c33o47s2", "c71o33k5", "c24o16d2", "c1o1"])
def test_cpu_channel_tails_at_every_level(case, layout, level):
    with effops.cpu_isa.use_cpu_isa(level):
        tensors, kwargs = make(case, layout=layout, dev="cpu")
        with effops.use_backend("cpu"):
            y = dwpw_conv2d(*tensors, **kwargs)
        torch.testing.assert_close(y, expected(tensors, kwargs).float(), atol=1e-4, rtol=1e-4)
        _cpu_backward_vs_reference(case, layout, "nchw" if layout == "channels_last" else "channels_last")
        _cpu_backward_vs_reference(case, layout, layout, torch.bfloat16)
        _bf16_forward_within_torch_error(case, layout)


def _bf16_forward_within_torch_error(case, layout):
    """bf16 forward (channels-last at avx512_bf16: the depthwise rounded to bf16 pairs and the vdpbf16ps
    pointwise, its A rounded to bf16 as torch rounds its intermediate): error against the float64
    reference at most twice that of torch's own two bf16 convolutions (plus one bf16 ulp of the output's
    scale)."""
    tensors, kwargs = make(case, dtype=torch.bfloat16, layout=layout, dev="cpu")
    with effops.use_backend("cpu"):
        y = dwpw_conv2d(*tensors, **kwargs)
    with effops.use_backend("reference"):
        y_torch = dwpw_conv2d(*tensors, **kwargs)
    want = expected(tensors, kwargs)
    scale = want.abs().max().item()
    err, err_torch = ((t.double() - want).abs().max().item() for t in (y, y_torch))
    assert y.dtype == torch.bfloat16 and y.shape == want.shape, (y.dtype, y.shape)
    assert err <= 2 * err_torch + scale * 2.0 ** -8, (err, err_torch)


# The bf16 channels-last forward of the avx512_bf16 level (dwpw_conv2d.cpp, forward_tile_bf16_pairs):
# the depthwise in strips along rows for 3, 5 and 7 wide kernels at stride 1 and 2 (7 at stride 2 and
# any dilation along rows take the per-pixel form), rows wide enough for strips inside the image and
# at both edges, tiles starting inside a row; channel counts with a 16- and 32-channel tail (masked
# loads) or none; 1 to 5 panels of outputs (blocks of 4, 3 + 2) with a column tail; every activation.
# At every level (the others run their own bodies on the same cases).
BF16_STRIPS = [
    (2, 33, 80, 30, 31, 3, 1, 1, 1, True, True, "relu6"),
    (1, 48, 17, 21, 40, 3, 2, 1, 1, False, True, "gelu"),
    (1, 20, 64, 19, 25, 5, 1, 2, 1, True, False, "silu"),
    (2, 64, 24, 17, 23, 5, 2, 2, 1, True, True, "hardswish"),
    (1, 96, 33, 13, 29, 7, 1, 3, 1, False, False, "relu"),
    (1, 31, 16, 15, 22, 7, 2, 3, 1, True, True, None),
    (1, 16, 1, 12, 26, (3, 5), 1, (0, 2), 1, True, True, "relu6"),
    (1, 40, 50, 9, 20, 3, 1, 0, 1, True, True, "gelu"),
    (1, 32, 96, 8, 70, 3, 1, 1, (1, 2), False, True, "silu"),
]


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("level", [pytest.param(lv, id=lv) for lv in cpu_levels()])
@pytest.mark.parametrize("case", BF16_STRIPS, ids=["k3s1c33o80", "k3s2c48o17", "k5s1c20", "k5s2c64o24", "k7s1c96",
                                                   "k7s2c31", "k3x5p0c16o1", "p0c40", "d12c32o96"])
def test_cpu_bf16_channels_last_forward_at_every_level(case, level):
    with effops.cpu_isa.use_cpu_isa(level):
        _bf16_forward_within_torch_error(case, "channels_last")


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_bf16_channels_last_non_finite(activation, k):
    # NaN and inf through the bf16 channels-last forward (the strips for 3x3, the per-pixel form for
    # 1x1): at the same positions as through torch's own bf16 convolutions.
    x, dw, pw = _non_finite_inputs()
    x = x.expand(2, 16, 3, 8).contiguous(memory_format=torch.channels_last).bfloat16()
    dw = (dw.expand(16, 1, k, k) / k).contiguous().bfloat16()
    pw = pw.bfloat16()
    want = F.conv2d(reference.activate(F.conv2d(x, dw, None, 1, k // 2, 1, 16), activation), pw)
    with effops.use_backend("cpu"):
        got = dwpw_conv2d(x, dw, pw, padding=k // 2, activation=activation)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), want.float(), equal_nan=True, atol=0.1, rtol=0.05)


def _bf16_backward_within_torch_error(case, x_layout, gy_layout, needs=(True,) * 5):
    """bf16 backward (at avx512_bf16: g_a = gy @ W_pw and g_pw = gy^T @ act(h) by vdpbf16ps, act(h) rounded
    to bf16 as torch's bf16 backward takes it): each gradient's error against the float64 reference at
    most twice that of torch's own bf16 autograd through its two convolutions (plus one bf16 ulp of the
    gradient's scale)."""
    tensors, kwargs = make(case, dtype=torch.bfloat16, layout=x_layout, dev="cpu")
    x, dw, pw, dwb, pwb = tensors
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    conv = (pair(kwargs["stride"]), pair(kwargs["padding"]), pair(kwargs["dilation"]), kwargs["activation"])
    t64 = [None if t is None else t.double().requires_grad_() for t in tensors]
    y64 = composed(t64, kwargs)
    gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    if gy_layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    need = [needs[0], needs[1], needs[2], needs[3] and dwb is not None, needs[4] and pwb is not None]
    with effops.use_backend("cpu"):
        got = torch.ops.effops.dwpw_conv2d_backward(gy, x, dw, pw, dwb, *conv, need)
    want = torch.autograd.grad(y64, [t for t in t64 if t is not None], gy.double())
    # torch's error through NCHW copies: its channels-last bf16 depthwise weight gradient with dilation reads
    # memory it never wrote (torch 2.13: NaN 9 times in 10 after a freed tensor of NaN), which made this
    # bound NaN at random; its NCHW route is sound.
    tt = [None if t is None else t.detach().contiguous().requires_grad_() for t in tensors]
    theirs = torch.autograd.grad(composed(tt, kwargs), [t for t in tt if t is not None], gy.contiguous())
    present = [i for i, t in enumerate(tensors) if t is not None]
    for j, i in enumerate(present):
        if not need[i]:
            assert got[i].numel() == 0
            continue
        g, w, t = got[i], want[j], theirs[j]
        assert g.dtype == torch.bfloat16 and g.shape == w.shape, (i, g.dtype, g.shape)
        scale = w.abs().max().item()
        err, err_torch = ((v.double() - w).abs().max().item() for v in (g, t))
        assert err <= 2 * err_torch + scale * 2.0 ** -8, (i, err, err_torch)


# The bf16 backward at every level (the vdpbf16ps products at avx512_bf16): odd and tail channel and
# output counts (pairs over outputs with a pad half, 1-4 panels of 16 channels, 1-6 rows a call), odd
# pixel counts per chunk (pairs over pixels with a pad pixel), stride 2, dilation, every activation and
# none (g_pw from h itself), both layouts of x and gy, subsets of the gradients, several bands.
BF16_BACKWARD = BF16_STRIPS[:6] + [WIDE_CHANNELS[0], WIDE_CHANNELS[4], LARGE[1], NCHW_TILES[3], CASES[10]]


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("level", [pytest.param(lv, id=lv) for lv in cpu_levels()])
@pytest.mark.parametrize("case", BF16_BACKWARD, ids=["k3s1c33o80", "k3s2c48o17", "k5s1c20", "k5s2c64o24",
                                                    "k7s1c96", "k7s2c31", "c49o97", "c1o1", "c130s2", "k7s3c17",
                                                    "hardswish"])
def test_cpu_bf16_backward_at_every_level(case, level):
    with effops.cpu_isa.use_cpu_isa(level):
        _bf16_backward_within_torch_error(case, "channels_last", "channels_last")
        _bf16_backward_within_torch_error(case, "nchw", "nchw")
        _bf16_backward_within_torch_error(case, "channels_last", "nchw", needs=(False, False, True, False, True))
        _bf16_backward_within_torch_error(case, "nchw", "channels_last", needs=(True, True, False, True, False))


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_bf16_backward_bands(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for case in [(1, 16, 8, 80, 300, 3, 2, 2, 2, True, True, "relu"),
                     (1, 8, 12, 64, 300, 7, 1, 6, 2, True, False, "gelu")]:
            _bf16_backward_within_torch_error(case, "channels_last", "channels_last")
            _bf16_backward_within_torch_error(case, "nchw", "nchw", needs=(False, True, True, True, True))
    finally:
        torch.set_num_threads(old)


LEVELS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
import effops
from effops import _ext
assert torch.ops.effops_cpu.cpu_isa() == LEVEL
import test_dwpw_conv2d as t
with effops.use_backend("cpu"):
    for case in (t.CASES[2], t.CASES[3], t.LARGE[0], t.NCHW_TILES[1], t.NCHW_TILES[3]):
        tensors, kwargs = t.make(case)
        torch.testing.assert_close(t.dwpw_conv2d(*tensors, **kwargs), t.expected(tensors, kwargs).float(),
                                   atol=1e-4, rtol=1e-4)
        tensors, got, want = t._grads(case, "nchw")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w.float(), atol=1e-3, rtol=1e-4)
    for layout in ("channels_last", "nchw"):
        t._cpu_backward_vs_reference(t.CASES[7], layout, "channels_last" if layout == "nchw" else "nchw")
    t._cpu_backward_vs_reference(t.CASES[9], "channels_last", "channels_last", torch.bfloat16)
    tensors, kwargs = t.make(t.CASES[9], dtype=torch.bfloat16)
    torch.testing.assert_close(t.dwpw_conv2d(*tensors, **kwargs).float(), t.expected(tensors, kwargs).float(),
                               **t.TOL[torch.bfloat16])
for activation in t.ACTIVATIONS:
    with effops.use_backend("cpu"):
        t.non_finite_check(activation)
"""


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_cpu_every_level_matches_reference():
    run_at_every_cpu_level(LEVELS_SCRIPT)


def _policy_shape(layout, N, C, O, H, device="meta", stride=1, dtype=torch.float32):
    x = torch.empty(N, C, H, H, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, torch.empty(C, 1, 3, 3, device=device, dtype=dtype), torch.empty(O, C, 1, 1, device=device, dtype=dtype),
            None, None, [stride] * 2, [1, 1], [1, 1], "relu6")


@pytest.mark.skipif("avx512" not in cpu_levels(), reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_automatic_choice_at_the_avx512_level(layout, monkeypatch):
    # With the AVX-512 body the fp32 thresholds drop to 8 MiB (forward) and 4 MiB (training step): the
    # body measured faster than torch's AVX-512 convolutions above them on the benchmark's shapes at
    # batch 1, 8 and 32, and slower on some below (docs/dwpw_conv2d.md).
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)

    def reason(N, C, O, H, stride=1, training=False, dtype=torch.float32):
        args = _policy_shape(layout, N, C, O, H, stride=stride, dtype=dtype)
        return dwpw.route_reason(args[0], args[1], args[2], *args[5:8], training=training)

    with effops.cpu_isa.use_cpu_isa("avx512"):
        for shape in [(8, 32, 64, 112), (8, 64, 128, 56), (8, 144, 24, 56), (32, 64, 128, 56)]:
            assert reason(*shape) == "" and reason(*shape, training=True) == "", shape
        assert reason(8, 96, 96, 56, stride=2, training=True) == ""   # x and grad_x 9.6 MB
        # The stride-2 forward measured slower at every batch up to 32 (y 9.6 MB): the 32 MiB line.
        assert "32 MiB" in reason(32, 96, 96, 56, stride=2) and "32 MiB" in reason(8, 96, 96, 56, stride=2)
        for shape in [(32, 512, 512, 7), (8, 256, 256, 14), (1, 32, 64, 112)]:
            assert "avx512 level" in reason(*shape) and "avx512 level" in reason(*shape, training=True), shape
        assert "avx512 level" in reason(32, 256, 256, 14)              # 6.4 MB forward: torch
        assert reason(32, 256, 256, 14, training=True) == ""           # 6.4 MB step: fused
        # fp16 and bf16 keep the 32 MiB rule (not measured with this body); bf16 steps go to torch where
        # its bf16 convolutions are native.
        assert "32 MiB" in reason(8, 64, 128, 56, dtype=torch.float16)
    with effops.cpu_isa.use_cpu_isa("avx2"):  # the AVX2 body: the 32 MiB rule
        assert "32 MiB" in reason(8, 64, 128, 56) and "32 MiB" in reason(8, 64, 128, 56, training=True)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_automatic_choice_follows_the_measured_crossover(layout, monkeypatch):
    # The C++ policy (csrc/bindings/dwpw_conv2d_op.cpp) for the AVX2 and scalar bodies: the fused forward
    # is chosen where torch's largest tensor reaches 32 MiB (measured 2-4x faster there) and for tiny
    # inputs; in between torch's convolutions run. A training step (autograd recording) is fused, forward
    # and backward, where torch's largest tensor of the step (grad_x or the depthwise output / y) reaches
    # 32 MiB. (The AVX-512 body's thresholds: the test above.)
    # Shapes are only described (meta tensors): the rule reads sizes, so 32 x 64 x 112 x 112 costs no memory.
    level = "avx2" if "avx2" in cpu_levels() else "scalar"
    with effops.cpu_isa.use_cpu_isa(level):
        _follows_the_measured_crossover(layout, monkeypatch)


def _follows_the_measured_crossover(layout, monkeypatch):
    def fwd(N, C, O, H, device="meta", stride=1):
        x = torch.empty(N, C, H, H, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, torch.empty(C, 1, 3, 3, device=device), torch.empty(O, C, 1, 1, device=device), None, None,
                [stride] * 2, [1, 1], [1, 1], "relu6")

    def reason(args, training=False):
        return dwpw.route_reason(args[0], args[1], args[2], *args[5:8], training=training)

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert reason(fwd(32, 64, 128, 56)) == ""                  # y = 51 MB
    assert reason(fwd(16, 32, 64, 112)) == ""                  # y = 51 MB
    assert reason(fwd(32, 144, 24, 56)) == ""                  # depthwise output 58 MB
    assert reason(fwd(1, 16, 16, 8)) == ""                     # 16K multiply-adds
    # Training steps: fused where torch's step allocates 32 MiB or more.
    for shape, stride in [((32, 64, 128, 56), 1), ((32, 96, 96, 56), 2), ((32, 144, 24, 56), 1)]:
        assert reason(fwd(*shape, stride=stride), training=True) == "", shape
    assert reason(fwd(32, 96, 96, 56, stride=2)) != ""         # inference: y is 9.6 MB, grad_x is not made
    for shape in [(32, 256, 256, 14), (32, 512, 512, 7), (8, 64, 128, 56), (8, 32, 64, 112)]:
        assert "training step" in reason(fwd(*shape), training=True), shape
    assert reason(fwd(1, 16, 16, 8), training=True) == ""  # a tiny training step: per-call cost, fused wins
    # torch's allocator on huge pages (its own switch) removes the page faults the size rule is about.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert "THP_MEM_ALLOC_ENABLE" in reason(fwd(32, 64, 128, 56))
    if layout == "channels_last":  # torch's channels_last step on huge pages measured as fast as the fused one
        assert "THP_MEM_ALLOC_ENABLE" in reason(fwd(32, 64, 128, 56), training=True)
    else:  # torch's NCHW step stayed 1.2-1.7x slower than the fused one
        assert reason(fwd(32, 64, 128, 56), training=True) == ""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    for shape in [(32, 256, 256, 14), (32, 512, 512, 7), (8, 32, 64, 112), (4, 64, 128, 56)]:
        assert "largest tensor" in reason(fwd(*shape)), shape
    # Through the op, with real tensors: a declined size runs torch's convolutions, a tiny one the kernel.
    real = fwd(4, 256, 256, 14, device="cpu")
    x, dw, pw = (t.normal_() for t in real[:3])
    with torch.no_grad(), _backends.record_choices() as tally:
        dwpw_conv2d(x, dw, pw, padding=1, activation="relu6")
        dwpw_conv2d(*(t.normal_() for t in fwd(1, 16, 16, 8, device="cpu")[:3]), padding=1)
    assert tally == {"dwpw_conv2d": {"reference": 1, "cpu": 1}}
    # The speed rule only steers the automatic choice: forcing cpu still runs the kernel, correctly.
    with effops.use_backend("cpu"), _backends.record_choices() as tally:
        got = dwpw_conv2d(x, dw / 3, pw / 16, padding=1, activation="relu6")
    assert tally == {"dwpw_conv2d": {"cpu": 1}}
    want = reference.dwpw_conv2d(x, dw / 3, pw / 16, None, None, [1, 1], [1, 1], [1, 1], "relu6")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # 256-term fp32 sums


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_the_policy_sees_training_steps():
    # The public op is composite (above autograd), so its policy sees grad mode: a stride-2 block whose
    # x is large and whose output is small is where the step rule (fused: grad_x is big) and the
    # inference rule (torch: y is small) disagree. Meta tensors: sizes only.
    x = torch.empty(32, 32, 112, 112, device="meta")  # x and grad_x 51 MB; depthwise output and y 3.2 MB
    dw, pw = torch.empty(32, 1, 3, 3, device="meta"), torch.empty(32, 32, 1, 1, device="meta")
    assert "largest tensor" in dwpw.route_reason(x, dw, pw, (4, 4), (1, 1), (1, 1))
    assert dwpw.route_reason(x, dw, pw, (4, 4), (1, 1), (1, 1), training=True) == ""


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_training_step_gradients_through_the_fused_pair():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 64, 64, requires_grad=True)
    dw = (torch.randn(32, 1, 3, 3) / 3).requires_grad_()
    pw = (torch.randn(32, 32, 1, 1) / 6).requires_grad_()
    with effops.use_backend("cpu"), _backends.record_choices() as tally:
        y = dwpw_conv2d(x, dw, pw, None, None, 2, 1, 1, "relu")
        y.square().sum().backward()
    assert tally == {"dwpw_conv2d": {"cpu": 1}, "dwpw_conv2d_backward": {"cpu": 1}}
    xr, dwr, pwr = (t.detach().clone().requires_grad_() for t in (x, dw, pw))
    reference.dwpw_conv2d(xr, dwr, pwr, None, None, (2, 2), (1, 1), (1, 1), "relu").square().sum().backward()
    for got, want in ((x.grad, xr.grad), (dw.grad, dwr.grad), (pw.grad, pwr.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_triton_declines_past_grid_z_and_int32_offsets():
    # The Triton kernels put the batch on CUDA grid z (at most 65535) and use int32 offsets within one
    # image. Shapes only (meta tensors): nothing is allocated.
    dw, pw = torch.empty(8, 1, 3, 3, device="meta"), torch.empty(16, 8, 1, 1, device="meta")

    def reason(x):  # (x.half() of a strided view would copy it)
        return dwpw.route_reason(x if x.dtype == torch.half else x.half(), dw.half(), pw.half(), device="cuda")
    if importlib.util.find_spec("triton") is None:
        assert reason(torch.empty(2, 8, 4, 4, device="meta")) == "triton is not installed"
        return
    assert "65535" in reason(torch.empty(65536, 8, 4, 4, device="meta"))
    assert "int32" in reason(torch.empty(1, 8, 16384, 16384, device="meta"))
    assert reason(torch.empty(65535, 8, 4, 4, device="meta")) == ""
    # A channel slice of a wider channels_last tensor: few elements, a span past 2**31 through its strides.
    wide = torch.empty(1, 2 ** 20, 48, 48, device="meta", dtype=torch.half).contiguous(memory_format=torch.channels_last)
    assert 8 * 48 * 48 < 2 ** 31 and "int32" in reason(wide[:, :8])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_is_chosen_automatically_for_16_bit_only():
    # fp32 on CUDA: cuDNN's TF32 convolutions are expected to win (no GPU measurement yet); forcing
    # triton still runs fp32.
    x = torch.empty(2, 8, 6, 6, device="meta")
    dw, pw = torch.empty(8, 1, 3, 3, device="meta"), torch.empty(4, 8, 1, 1, device="meta")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = dwpw.route_reason(x.to(dtype), dw.to(dtype), pw.to(dtype), device="cuda")
        assert (got != "") == (dtype == torch.float32), dtype


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_bf16_rules_where_the_cpu_has_native_bf16(monkeypatch):
    # torch's bf16 convolutions run natively on AVX512-BF16 CPUs (measured at the avx512_bf16 level,
    # docs/dwpw_conv2d.md): a bf16 step and an NCHW forward won below 32 MiB on some shapes and lost
    # above it: the 32 MiB rule, with the level named. A bf16 channels_last forward: the fused one of
    # the avx512_bf16 level (vdpbf16ps) at every size; with the kernels capped below that level, torch.
    # oneDNN capped below AVX512-BF16 is not native.
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    def reason(N, C, O, H, layout="nchw", training=False, dtype=torch.bfloat16, dilation=1):
        args = _policy_shape(layout, N, C, O, H, dtype=dtype)
        return dwpw.route_reason(args[0], args[1], args[2], (1, 1), (dilation,) * 2, (dilation,) * 2,
                                 training=training)

    native = effops.cpu_isa.cpu_has_native_bf16()
    for layout in ("nchw", "channels_last"):
        assert ("avx512_bf16" in reason(8, 64, 128, 56, layout, training=True)) == native  # 6.4 MB step
        assert reason(32, 32, 64, 112, layout, training=True) == ""                        # 51 MB: fused
    if native:  # without native bf16 (AVX2 CPUs, oneDNN capped) the 32 MiB rule alone applies: checked below
        for n in (1, 8, 64):  # the vdpbf16ps forward measured as fast or faster at every batch
            assert reason(n, 64, 128, 56, "channels_last") == "", n
        # torch's native bf16 step is unsound for a dilated channels-last depthwise (docs/dwpw_conv2d.md): ours
        assert reason(8, 64, 128, 56, "channels_last", training=True, dilation=2) == ""
        assert "avx512_bf16" in reason(8, 64, 128, 56, "nchw", training=True, dilation=2)
        with effops.cpu_isa.use_cpu_isa("avx512"):  # the fp32-FMA body on bf16 tensors: torch's won
            assert "avx512_bf16" in reason(8, 64, 128, 56, "channels_last")
    assert reason(64, 64, 128, 56, "nchw") == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert reason(64, 64, 128, 56, "channels_last") == ""
    assert "avx512_bf16" not in reason(8, 64, 128, 56, training=True)
    assert reason(32, 32, 64, 112, dtype=torch.float32, training=True) == ""


def test_settings_keep_their_types():
    # 1 == True == 1.0 in Python: stride=True or padding=1.0 must not pass as 1.
    torch.manual_seed(5)
    x, dw, pw = torch.randn(1, 4, 7, 7), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    y = dwpw_conv2d(x, dw, pw, stride=1, padding=1)
    with pytest.raises(TypeError, match="stride"):
        dwpw_conv2d(x, dw, pw, stride=True, padding=1)
    with pytest.raises(TypeError, match="padding"):
        dwpw_conv2d(x, dw, pw, stride=1, padding=1.0)
    torch.testing.assert_close(dwpw_conv2d(x, dw, pw, stride=(1, 1), padding=[1, 1]), y)
    with pytest.raises(ValueError, match="activation"):
        dwpw_conv2d(x, dw, pw, stride=1, padding=1, activation=["relu"])


def test_forward_mode_ad_gets_the_references_tangents():
    # Dual tensors carry tangents without requires_grad: the fused kernels (no forward-mode rule) would
    # drop them; the reference's torch ops carry them.
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    x, t = torch.randn(1, 8, 9, 7), torch.randn(1, 8, 9, 7)
    dw, pw = torch.randn(8, 1, 3, 3), torch.randn(5, 8, 1, 1)
    with fwAD.dual_level():
        out = dwpw_conv2d(fwAD.make_dual(x, t), dw, pw, None, None, 1, 1, 1, "relu")
        tangent = fwAD.unpack_dual(out).tangent
    h = F.conv2d(x, dw, None, 1, 1, 1, groups=8)
    want = F.conv2d(F.conv2d(t, dw, None, 1, 1, 1, groups=8) * (h > 0), pw)
    torch.testing.assert_close(tangent, want, atol=1e-5, rtol=1e-5)


def test_empty_batch_on_every_backend(backend):
    # Nothing to fuse: every backend, forced or not, returns the empty result and empty gradients.
    N, C, H, W, O = 0, 4, 6, 6, 5
    x = torch.randn(N, C, H, W, device=device(), requires_grad=True)
    dw = torch.randn(C, 1, 3, 3, device=device(), requires_grad=True)
    pw = torch.randn(O, C, 1, 1, device=device(), requires_grad=True)
    y = dwpw_conv2d(x, dw, pw, padding=1, activation="relu")
    assert y.shape == (N, O, H, W)
    y.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert dw.grad.shape == dw.shape and not dw.grad.any()


def test_no_channels_is_refused_as_torch_refuses_it():
    x, dw = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match="at least one channel"):
        dwpw_conv2d(x, dw, torch.randn(0, 4, 1, 1))


def test_tensors_on_another_device_are_named():
    x, dw, pw = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3), torch.randn(5, 4, 1, 1)
    with pytest.raises(ValueError, match="pw_weight must be on cpu like the input, got meta"):
        dwpw_conv2d(x, dw, pw.to("meta"))
    with pytest.raises(ValueError, match="dw_bias must be on cpu like the input, got meta"):
        dwpw_conv2d(x, dw, pw, dw_bias=torch.empty(4, device="meta"))


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_batch_32_of_real_images_at_every_level():
    # Real data (handwritten digits: flat zero background, bright strokes) rather than normal noise, at
    # the demo's batch size, forward and backward against the float64 reference.
    from sklearn.datasets import load_digits
    digits = torch.tensor(load_digits().images[:32], dtype=torch.float32) / 16  # (32, 8, 8) in [0, 1]
    g = torch.Generator().manual_seed(0)
    x = (digits[:, None] * torch.rand(1, 12, 1, 1, generator=g)).contiguous(memory_format=torch.channels_last)
    dw = torch.randn(12, 1, 3, 3, generator=g) / 3
    pw = torch.randn(20, 12, 1, 1, generator=g) / 12 ** 0.5
    gy = torch.randn(32, 20, 8, 8, generator=g)
    t64 = [t.double().requires_grad_() for t in (x, dw, pw)]
    want = reference.dwpw_conv2d(*t64[:3], None, None, [1, 1], [1, 1], [1, 1], "relu6")
    want.backward(gy.double())
    for level in effops.cpu_isa.levels():
        with effops.cpu_isa.use_cpu_isa(level), effops.use_backend("cpu"):
            t = [v.clone().requires_grad_() for v in (x, dw, pw)]
            y = dwpw_conv2d(*t, padding=1, activation="relu6")
            y.backward(gy)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5, msg=level)
        for got, ref in zip(t, t64):
            torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-4, rtol=1e-4, msg=level)
