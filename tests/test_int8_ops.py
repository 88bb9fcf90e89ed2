"""quantize_rowwise, int8_mm, int8_linear (and Int8Linear's op): every backend against the reference.

Integer results (int8_mm, the quantized values and scales) are compared exactly; int8_linear's float
output against the fp32 reference within one rounding to the output dtype (ONE_ROUNDING) plus fp32
slack (the epilogue may contract into an FMA).
"""
import importlib

import pytest
import torch

import effops
from effops import ops
from effops.reference import int8 as reference
from tests.conftest import backends_on_device, device, run_at_every_cpu_level

MAX_K = reference.MAX_K


def _exact_mm(a, b):
    return (a.cpu().long() @ b.cpu().long()).to(torch.int32)


# The backends with a kernel for each op ("reference": the plain ATen route), as the op modules declare
# them. Tests of an op take the `backend` fixture with these only, so no instance is generated that no
# machine can run.
_GEMM = importlib.import_module("effops.ops.int8_gemm")
KERNELS = {
    "quantize_rowwise": importlib.import_module("effops.ops.quantize_rowwise").BACKENDS,
    "int8_mm": _GEMM.BACKENDS,
    "int8_linear": _GEMM.BACKENDS,
    "int8_linear_dynamic": _GEMM.DYNAMIC_BACKENDS,
    "int8_linear_dynamic weight_only": tuple(b for b in _GEMM.DYNAMIC_BACKENDS if b != "triton"),
}


def with_backends(op):
    """Parametrize the `backend` fixture (tests/conftest.py) with the backends that have a kernel for op."""
    return pytest.mark.parametrize("backend", [p for p in backends_on_device() if p.values[0][0] in KERNELS[op]],
                                   indirect=True)


def dynamic_reference_fp32(x, packed, w_scale, bias, n, weight_only):
    """reference.int8_linear_dynamic before its cast to x's dtype."""
    w = reference.unpack_weight(packed, n, x.shape[-1])
    if weight_only:
        return torch.nn.functional.linear(x.float(), w.float() * w_scale[:, None], bias)
    q, s = reference.quantize_rowwise(x)
    return reference.int8_linear(q, s, w, w_scale, bias, torch.float32)


def _weight_only_params(op="int8_linear_dynamic"):
    """(backend, weight_only) pairs with a kernel: triton has no weight-only one."""
    return [pytest.param(p.values[0], wo, marks=p.marks, id="%s-%s" % (p.id, "weight_only" if wo else "dynamic"))
            for wo in (False, True) for p in backends_on_device()
            if p.values[0][0] in KERNELS[op + (" weight_only" if wo else "")]]


# Low-precision outputs are one rounding of the fp32 epilogue's value: compared with the fp32 reference,
# each element is off by at most half a unit in the last place, i.e. 2**-8 (bf16) or 2**-11 (fp16) of
# its magnitude. (Looser, a 1% error in a scale would pass: the conftest TOL of 2e-2 did.)
ONE_ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _close_to_fp32(got, ref32, dtype, backend=None):
    """got (in dtype) against the fp32 reference ref32: one rounding to dtype, plus fp32 slack (the
    epilogue may contract into an FMA; the weight-only sums run in another order). Triton's interpreter
    stores bf16 by truncation: one whole unit there (its rounding is checked on the GPU run)."""
    rtol = ONE_ROUNDING[dtype] * 1.01
    if backend == "triton" and device().type == "cpu" and dtype == torch.bfloat16:
        rtol *= 2
    scale = ref32.float().abs().max().clamp_min(1.0) if ref32.numel() else 1.0  # max() of nothing raises
    torch.testing.assert_close(got.float(), ref32.float(), rtol=rtol, atol=1e-5 * scale)


def _randi8(*shape, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, device=device())


# ---------------------------------------------------------------------------------------------
# int8_mm: exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 64, 16), (5, 7, 3), (97, 123, 35), (33, 300, 17)])
def test_int8_mm_exact(backend, m, k, n):
    a, b = _randi8(m, k), _randi8(k, n)
    got = ops.int8_mm(a, b)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got.cpu(), _exact_mm(a, b))


def test_int8_mm_extreme_values(backend):
    # Rows and columns of 127, -127 and -128: the largest products and pair sums, which a saturating
    # 16-bit intermediate would clip. b without -128 takes the cpu's s8 path, b with -128 its s16 path.
    k = 256
    a = torch.stack([torch.full((k,), v, dtype=torch.int8) for v in (127, -127, -128, 0)]
                    + [_randi8(k).cpu()]).to(device())
    for col_values in ((127, -127, 1), (127, -127, -128)):
        b = torch.stack([torch.full((k,), v, dtype=torch.int8) for v in col_values]
                        + [_randi8(k).cpu()], dim=1).to(device())
        assert torch.equal(ops.int8_mm(a, b).cpu(), _exact_mm(a, b))
        # Alternating signs inside each group of 4 k: |a| * sign(a) * b per byte.
        alt = a.clone()
        alt[:, 1::2] = -alt[:, 1::2].clamp(-127, 127)
        assert torch.equal(ops.int8_mm(alt, b).cpu(), _exact_mm(alt, b))


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_int8_mm_long_k_cpu():
    with effops.use_backend("cpu"):
        for k in (16384, MAX_K):
            a = torch.tensor([[-128] * k, [127] * k, [-127] * k], dtype=torch.int8)
            a = torch.cat([a, torch.randint(-128, 128, (2, k), dtype=torch.int8)])
            b = torch.stack([torch.full((k,), v, dtype=torch.int8) for v in (-128, 127, -127)]
                            + [torch.randint(-128, 128, (k,), dtype=torch.int8)], dim=1)
            got = ops.int8_mm(a, b)
            assert torch.equal(got, _exact_mm(a, b))
            assert got[0, 0].item() == 128 * 128 * k  # no int32 overflow up to MAX_K
            b2 = b.clamp(-127, 127)  # the s8 path
            assert torch.equal(ops.int8_mm(a, b2), _exact_mm(a, b2))


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_int8_mm_cpu_abs_b_kernel_every_row_count():
    # A without -128 (always so for quantize_rowwise's output) takes the cpu's 6-row |b| kernel, whose
    # pairs |b| * (a * sign(b)) reach 2 * 127 * 127; every micro-tile height 1..6 (M = 1..13 deals rows
    # as e.g. 13 = 5 + 4 + 4, 17 = 6 + 6 + 5), K = 16384 and K not a multiple of 4, N not a multiple of 16.
    torch.manual_seed(1)
    with effops.use_backend("cpu"):
        for k, n in ((16384, 37), (4099, 21), (3, 5)):
            extremes = torch.tensor([[127] * k, [-127] * k, [(-1) ** j * 127 for j in range(k)]], dtype=torch.int8)
            b = torch.stack([torch.full((k,), v, dtype=torch.int8) for v in (127, -127)]
                            + [torch.tensor([(-1) ** (j // 2) * 127 for j in range(k)], dtype=torch.int8)]
                            + [torch.randint(-127, 128, (k,), dtype=torch.int8) for _ in range(n - 3)], dim=1)
            for m in [*range(1, 14), 17] if k != 16384 else (1, 5, 6, 13):
                a = torch.cat([extremes, torch.randint(-127, 128, (max(0, m - 3), k), dtype=torch.int8)])[:m]
                assert torch.equal(ops.int8_mm(a, b), _exact_mm(a, b)), (m, k, n)
        # One -128 as the very last element of A sends the call to the |a| kernel (the |b| kernel
        # would compute -(-128) * 127 wrongly): the scan for it must cover all of A.
        a = torch.randint(-127, 128, (7, 5000), dtype=torch.int8)
        a[6, 4999] = -128
        b = torch.randint(-127, 128, (5000, 19), dtype=torch.int8)
        b[4999] = -127
        assert torch.equal(ops.int8_mm(a, b), _exact_mm(a, b))


def test_int8_mm_non_contiguous(backend):
    a = _randi8(40, 17).t()  # (17, 40) with strides (1, 17)
    b = _randi8(9, 40).t()   # (40, 9)
    assert torch.equal(ops.int8_mm(a, b).cpu(), _exact_mm(a, b))


def test_int8_mm_bad_inputs():
    a = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="a must have dtype"):
        ops.int8_mm(a.float(), a.t())
    with pytest.raises(ValueError, match="b's first dim"):
        ops.int8_mm(a, a)
    with pytest.raises(ValueError, match="b must be 2-D"):
        ops.int8_mm(a, a[0])
    with pytest.raises(ValueError, match="overflow"):
        ops.int8_mm(torch.zeros(1, MAX_K + 1, dtype=torch.int8), torch.zeros(MAX_K + 1, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match=">= 1"):
        ops.int8_mm(torch.zeros(2, 0, dtype=torch.int8), torch.zeros(0, 3, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------
# quantize_rowwise: exact (bit-identical q and scale)
# ---------------------------------------------------------------------------------------------
@with_backends("quantize_rowwise")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (97, 1025)])
def test_quantize_rowwise_matches_reference(backend, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype).to(device())
    q, s = ops.quantize_rowwise(x)
    q_ref, s_ref = reference.quantize_rowwise(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == shape[:-1]
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    # Invariants, independent of the reference: in range, the row max maps to +-127, error <= scale/2.
    assert q.abs().max() <= 127
    assert torch.equal(q.abs().amax(-1), torch.full_like(s, 127, dtype=torch.int8))
    err = (q.float() * s.unsqueeze(-1) - x.float()).abs()
    # (x / scale is rounded to fp32 before the integer rounding: allow that one fp32 rounding of slack)
    assert (err <= s.unsqueeze(-1) / 2 + 1e-6 * x.float().abs()).all()


@with_backends("quantize_rowwise")
def test_quantize_rowwise_zero_rows_ties_and_extremes(backend):
    x = torch.zeros(6, 40)
    x[1, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # scale 1: exact ties
    x[2] = 1e30                                                   # huge
    x[3, 0] = 1e-44                                               # absmax / 127 underflows to 0
    x[4] = -torch.arange(40.0)                                    # negative extreme -> -127
    x[5, 0] = 3.0                                                 # one nonzero in a zero row
    x = x.to(device())
    q, s = ops.quantize_rowwise(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert s[0].item() == 1.0 and (q[0] == 0).all()
    assert q[1, :6].tolist() == [127, 0, 2, 2, 0, -2]              # round half to even
    assert (q[2] == 127).all()
    assert s[3].item() == 1.0 and (q[3] == 0).all()
    assert q[4, -1].item() == -127
    q_ref, s_ref = reference.quantize_rowwise(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def near_tie_rows(rows=64, k=515):
    """Rows whose quotients x / scale sit on and a few ulps around half-integers (n + 0.5), over row scales
    from 2^-70 to 2^100: the rounding of the quotient (half to even, after an IEEE division; a reciprocal
    would miss about 4% of these) and of the conversion to codes must both be the reference's. Each row's
    first element is its absmax, 127 x a chosen scale."""
    g = torch.Generator().manual_seed(7)
    scales = torch.pow(2.0, torch.empty(rows).uniform_(-70, 100, generator=g)) * (1 + torch.rand(rows, generator=g))
    x = torch.empty(rows, k)
    for i, c in enumerate(scales.tolist()):
        s = (torch.tensor(127 * c, dtype=torch.float32) / 127).item()  # the scale the quantizer will compute
        n = torch.randint(-127, 127, (k,), generator=g).float() + 0.5
        v = (n.double() * s).float()
        ulps = torch.randint(-3, 4, (k,), generator=g)
        for _ in range(3):  # nudge by up to 3 ulps either way
            v = torch.where(ulps > 0, torch.nextafter(v, torch.tensor(float("inf"))), v)
            v = torch.where(ulps < 0, torch.nextafter(v, torch.tensor(float("-inf"))), v)
            ulps = ulps - ulps.sign()
        x[i] = v.clamp(-127 * c, 127 * c)
        x[i, 0] = 127 * c
    return x


@with_backends("quantize_rowwise")
def test_quantize_rowwise_near_ties_bit_identical(backend):
    x = near_tie_rows().to(device())
    q, s = ops.quantize_rowwise(x)
    q_ref, s_ref = reference.quantize_rowwise(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


def non_finite_rows():
    """Rows with +inf, NaN and -inf each at a position the vector loop reads and one its tail reads,
    a zero row and a normal one: the expected (q, scale) per row is independent of any backend."""
    x = torch.randn(8, 37)
    x[0, 3], x[1, 30], x[2, 36], x[3, 0] = float("inf"), float("nan"), float("-inf"), float("nan")
    x[4] = 0.0
    return x


def non_finite_long_rows():
    """The same for rows of 2 x 64 + 5 values, which the AVX-512 body's 64-value passes read (its absmax
    pass takes the largest bit pattern of |x|, so an inf or a NaN, of either sign, is the pattern it must
    see): +inf, NaN, -inf and a NaN with its sign bit set inside those passes, NaN in the tail; then a
    zero row, a row of -0.0, a row of tiny values (1e-35), and a normal row
    whose absmax is a negative value in the last 64-value block."""
    x = torch.randn(10, 133)
    x[0, 5], x[1, 63], x[2, 127], x[4, 131] = float("inf"), float("nan"), float("-inf"), float("nan")
    x[3, 100] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # 0xffc00000: -NaN
    x[5], x[6] = 0.0, -0.0
    x[7] = torch.linspace(-1e-35, 1e-35, 133)
    x[8, 120] = -50.0
    return x


def check_non_finite_rows(quantize):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = non_finite_rows().to(dtype).to(device())
        q, s = quantize(x)
        assert torch.isnan(s[:4]).all() and (q[:4] == 0).all()  # no scale, no values: NaN downstream
        assert s[4].item() == 1.0 and (q[4] == 0).all() and torch.isfinite(s[5:]).all()
        q_ref, s_ref = reference.quantize_rowwise(x)
        assert torch.equal(q, q_ref)
        torch.testing.assert_close(s, s_ref, equal_nan=True, atol=0, rtol=0)
        x = non_finite_long_rows().to(dtype).to(device())
        q, s = quantize(x)
        assert torch.isnan(s[:5]).all() and (q[:5] == 0).all()
        assert (s[5:7] == 1.0).all() and (q[5:7] == 0).all() and torch.isfinite(s[5:]).all()
        assert q[8, 120].item() == -127
        q_ref, s_ref = reference.quantize_rowwise(x)
        assert torch.equal(q, q_ref)
        torch.testing.assert_close(s, s_ref, equal_nan=True, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_quantize_rowwise_subnormal_rows_cpu():
    """Rows of subnormal values (their bit patterns, which the AVX-512 absmax pass compares as integers,
    are the smallest), long enough for its 64-value passes, as the reference quantizes them."""
    x = torch.linspace(-1e-39, 1e-39, 3 * 133).reshape(3, 133)
    x[1, 70] = -3e-39
    x[2] *= 1e-6  # a few denormal steps only
    for dtype in (torch.float32, torch.bfloat16):
        with effops.use_backend("cpu"):
            q, s = ops.quantize_rowwise(x.to(dtype))
        q_ref, s_ref = reference.quantize_rowwise(x.to(dtype))
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
        assert q[1, 70].item() == -127


@with_backends("quantize_rowwise")
def test_quantize_rowwise_rows_with_nan_or_inf(backend):
    # A NaN or inf gave the cpu kernel [-127, 0, ...] (a sign flip) or finite garbage with a valid
    # scale: silently wrong values downstream. Such a row has no scale: NaN, with q = 0.
    check_non_finite_rows(ops.quantize_rowwise)


def test_int8_linear_module_gives_nan_rows_for_non_finite_inputs():
    torch.manual_seed(0)
    for kwargs in (dict(mode="dynamic"), dict(mode="dynamic", weight_bits=7), dict(mode="weight_only")):
        m = effops.nn.Int8Linear.from_linear(torch.nn.Linear(37, 24), **kwargs).to(device())
        x = non_finite_rows().to(device())
        y = m(x)
        assert not torch.isfinite(y[:4]).any(), kwargs  # F.linear gives NaN or inf there too
        assert torch.isfinite(y[4:]).all(), kwargs


@with_backends("int8_linear_dynamic")
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2-D", "3-D"])
def test_linear_outputs_are_not_views(backend, lead):
    # As F.linear's (a view breaks in-place use of a module output under FSDP2).
    m = effops.nn.Int8Linear.from_linear(torch.nn.Linear(64, 32)).to(device())
    x = torch.randn(*lead, 64, device=device())
    y = m(x)
    assert y.shape == (*lead, 32) and not y._is_view()
    q, s = ops.quantize_rowwise(x)
    w = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device=device())
    assert not ops.int8_linear(q, s, w, torch.ones(32, device=device()))._is_view()


def test_no_gradient_through_quantization_says_so_up_front():
    x = torch.randn(3, 8, device=device(), requires_grad=True)
    q, s = ops.quantize_rowwise(x)
    assert not q.requires_grad and not s.requires_grad  # was: a backward that raised "no autograd formula"
    w = torch.randint(-127, 128, (4, 8), dtype=torch.int8, device=device())
    for name, args in (("x_scale", (s.detach().requires_grad_(), torch.ones(4, device=device()), None)),
                       ("w_scale", (s, torch.ones(4, device=device(), requires_grad=True), None)),
                       ("bias", (s, torch.ones(4, device=device()), torch.zeros(4, device=device(), requires_grad=True)))):
        with pytest.raises(ValueError, match="int8_linear has no gradient: %s requires grad" % name):
            ops.int8_linear(q, args[0], w, args[1], args[2])
    with torch.no_grad():  # no gradient wanted: fine
        ops.int8_linear(q, s.detach().requires_grad_(), w, torch.ones(4, device=device()))


@with_backends("quantize_rowwise")
def test_quantize_rowwise_non_contiguous(backend):
    x = torch.randn(33, 20, device=device()).t()
    q, s = ops.quantize_rowwise(x)
    q_ref, s_ref = reference.quantize_rowwise(x.contiguous())
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_rowwise_bad_inputs():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.quantize_rowwise(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 1 dims"):
        ops.quantize_rowwise(torch.tensor(1.0))
    with pytest.raises(ValueError, match="row length"):
        ops.quantize_rowwise(torch.zeros(3, 0))
    with pytest.raises(RuntimeError, match="Expected a value of type 'Tensor' for argument 'x'"):
        ops.quantize_rowwise([1.0, 2.0])  # torch's schema check, as for any ATen op


# ---------------------------------------------------------------------------------------------
# int8_linear: fused epilogue within tolerance
# ---------------------------------------------------------------------------------------------
def _linear_inputs(lead, k, n, w_low=-127):
    x = torch.randn(*lead, k, device=device()) * 2
    x_int8, x_scale = reference.quantize_rowwise(x)
    w_int8 = _randi8(n, k, low=w_low)
    w_scale = torch.rand(n, device=device()) * 0.02 + 0.001
    bias = torch.randn(n, device=device())
    return x_int8, x_scale, w_int8, w_scale, bias


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [((1,), 64, 16), ((5,), 7, 3), ((97,), 123, 35), ((2, 3), 129, 45)])
def test_int8_linear_matches_reference(backend, out_dtype, lead, k, n):
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs(lead, k, n)
    for b in (bias, None):
        got = ops.int8_linear(x_int8, x_scale, w_int8, w_scale, b, out_dtype=out_dtype)
        ref32 = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, b, torch.float32)
        assert got.dtype == out_dtype and got.shape == (*lead, n)
        _close_to_fp32(got, ref32, out_dtype, backend)


def test_int8_linear_weights_with_min_value(backend):
    # A -128 in the weights (allowed here, never produced by quantize_rowwise) needs the widening path.
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((9,), 70, 20, w_low=-128)
    w_int8[0] = -128
    x_int8[0] = -128
    got = ops.int8_linear(x_int8, x_scale, w_int8, w_scale, bias)
    _close_to_fp32(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias), torch.float32)


def _strided(t):
    """t's values in a tensor whose last dim has stride 2 (a view of a larger buffer)."""
    out = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]
    out.copy_(t)
    return out


def test_int8_linear_strided_scales_and_bias(backend):
    # Vectors viewed out of larger buffers: a kernel reading them at unit stride gives wrong sums.
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((9,), 70, 20)
    got = ops.int8_linear(x_int8, _strided(x_scale.unsqueeze(0)).squeeze(0), w_int8, _strided(w_scale), _strided(bias))
    _close_to_fp32(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias), torch.float32)


def test_int8_linear_bad_inputs():
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((4,), 8, 5)
    with pytest.raises(ValueError, match="x_scale must have shape"):
        ops.int8_linear(x_int8, x_scale[:2], w_int8, w_scale)
    with pytest.raises(TypeError, match="x_scale must have dtype"):
        ops.int8_linear(x_int8, x_scale.double(), w_int8, w_scale)
    with pytest.raises(ValueError, match="w_int8 must have shape"):
        ops.int8_linear(x_int8, x_scale, w_int8[:, :4], w_scale)
    with pytest.raises(ValueError, match="w_scale must have shape"):
        ops.int8_linear(x_int8, x_scale, w_int8, w_scale[:2])
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_linear(x_int8, x_scale, w_int8, w_scale, bias[:2])
    with pytest.raises(ValueError, match="out_dtype"):
        ops.int8_linear(x_int8, x_scale, w_int8, w_scale, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="Expected a value of type 'int' for argument 'out_dtype'"):
        ops.int8_linear(x_int8, x_scale, w_int8, w_scale, out_dtype="float32")  # torch's schema check
    with pytest.raises(TypeError, match="x_int8 must have dtype"):
        ops.int8_linear(x_int8.float(), x_scale, w_int8, w_scale)


def test_device_mismatch_is_refused():
    # Every tensor argument on the input's device: a meta tensor beside CPU ones dispatches to the Meta
    # implementation, whose checks are the same.
    x_int8, x_scale, w_int8, w_scale, bias = (t.cpu() for t in _linear_inputs((4,), 8, 5))
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="b must be on cpu like the input, got meta"):
        ops.int8_mm(x_int8, w_int8.t().to(meta))
    for i, name in ((1, "x_scale"), (2, "w_int8"), (3, "w_scale"), (4, "bias")):
        args = [x_int8, x_scale, w_int8, w_scale, bias]
        args[i] = args[i].to(meta)
        with pytest.raises(ValueError, match="%s must be on cpu like the input, got meta" % name):
            ops.int8_linear(*args)
    w_q, w_s = reference.quantize_rowwise(torch.randn(5, 8))
    args = [torch.randn(3, 8), reference.pack_weight(w_q), w_s, torch.zeros(5), 5, False, None]
    for i, name in ((1, "w_packed"), (2, "w_scale"), (3, "bias")):
        bad = list(args)
        bad[i] = bad[i].to(meta)
        with pytest.raises(ValueError, match="%s must be on cpu like the input, got meta" % name):
            ops.int8_linear_dynamic(*bad)


@pytest.mark.parametrize("m,n", [(0, 5), (3, 0), (0, 0)])
def test_empty_batches_and_no_output_features(backend, m, n):
    a, b = _randi8(m, 8), _randi8(8, n)
    got = ops.int8_mm(a, b)
    assert got.shape == (m, n) and got.dtype == torch.int32
    x_int8, x_scale = _randi8(2, m, 8), torch.rand(2, m, device=device())
    y = ops.int8_linear(x_int8, x_scale, _randi8(n, 8), torch.rand(n, device=device()), torch.rand(n, device=device()),
                        out_dtype=torch.bfloat16)
    assert y.shape == (2, m, n) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("backend,weight_only", _weight_only_params(), indirect=["backend"])
@pytest.mark.parametrize("m,n", [(0, 5), (3, 0)])
def test_dynamic_and_quantize_empty(backend, weight_only, m, n):
    x = torch.randn(2, m, 8, device=device())
    if backend in KERNELS["quantize_rowwise"]:
        q, s = ops.quantize_rowwise(x)
        assert q.shape == (2, m, 8) and s.shape == (2, m)
    w_q, w_s = reference.quantize_rowwise(torch.randn(n, 8, device=device()))
    y = ops.int8_linear_dynamic(x, reference.pack_weight(w_q), w_s, None, n, weight_only)
    assert y.shape == (2, m, n) and y.dtype == torch.float32


def test_dispatch_modes_see_the_op():
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder():
        ops.quantize_rowwise(torch.randn(3, 16, device=device()))
    assert any("effops.quantize_rowwise" in name for name in seen)


# ---------------------------------------------------------------------------------------------
# Int8Linear's op (dynamic and weight-only) on every backend that has it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,weight_only", _weight_only_params(), indirect=["backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [((1,), 33, 17), ((2, 3), 129, 45), ((17,), 64, 40)])
def test_int8_linear_dynamic_matches_reference(backend, weight_only, dtype, lead, k, n):
    torch.manual_seed(0)
    x = torch.randn(*lead, k, device=device()).to(dtype)
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(n, k, device=device()))
    packed, bias = reference.pack_weight(w_int8), torch.randn(n, device=device())
    got = ops.int8_linear_dynamic(x, packed, w_scale, bias, n, weight_only)
    assert got.dtype == dtype and got.shape == (*lead, n)
    _close_to_fp32(got, dynamic_reference_fp32(x, packed, w_scale, bias, n, weight_only), dtype, backend)


@with_backends("int8_linear_dynamic")
@pytest.mark.parametrize("m", [1, 6, 8, 13, 150])
@pytest.mark.parametrize("k", [256, 258])
def test_int8_linear_dynamic_exact_integers(backend, m, k):
    """The 8-bit dynamic path's int32 sums are exact for weights over the full int8 range (-128 included)
    and activations at +-127: rows of integers with absmax 127 quantize to themselves (scale 1), so with
    unit weight scales and no bias the fp32 output is the integer product itself (|C| < 2**24). K = 256:
    on VNNI the GEMM reads the quantized rows in place (a + 128); K = 258: it packs them. M covers one
    few-row tile (1, 6, 8), 6-row groups with a tail (13) and more than one row tile (150)."""
    gen = torch.Generator().manual_seed(m * 1000 + k)
    n = 37
    x = torch.randint(-127, 128, (m, k), generator=gen)
    x[:, 0] = 127
    x[::2, 1:9] = -127
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    w[::3, :16] = -128
    got = ops.int8_linear_dynamic(x.float().to(device()), reference.pack_weight(w.to(device())),
                                  torch.ones(n, device=device()), None, n)
    want = (x.double() @ w.double().T).float()
    assert torch.equal(got.cpu(), want)


@with_backends("int8_linear_dynamic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_dynamic_every_row_count_and_panel_mix(backend, dtype, with_bias):
    """M = 1..9 (each few-row micro-tile height, and 9: a 6-row group and a 3-row tail) and 13, 20 (6-row
    groups with 1- and 2-row tails), against N that are whole 16-column panels (16, 64, 128: the AVX-512
    micro-kernels store the output themselves) or end in a partial one (69, 130: that micro-tile goes
    through the scratch tile and the generic epilogue), in every output dtype, with and without bias."""
    torch.manual_seed(1)
    k = 132
    for n in (16, 64, 69, 128, 130):
        w_int8, w_scale = reference.quantize_rowwise(torch.randn(n, k, device=device()))
        packed = reference.pack_weight(w_int8)
        bias = torch.randn(n, device=device()) if with_bias else None
        for m in (*range(1, 10), 13, 20):
            x = (torch.randn(m, k, device=device()) * 2).to(dtype)
            got = ops.int8_linear_dynamic(x, packed, w_scale, bias, n)
            assert got.dtype == dtype and got.shape == (m, n)
            _close_to_fp32(got, dynamic_reference_fp32(x, packed, w_scale, bias, n, False), dtype, backend)


def _bit_identical_cases(weight_bits):
    """(x, packed, w_scale, bias, corr) for test_int8_linear_dynamic_cpu_bit_identical_to_reference."""
    gen = torch.Generator().manual_seed(weight_bits)
    # (K, N, rows, dtypes): N of 4 whole panels, 11 (two runs of 4, then 3), 12 and a partial one, and
    # 37.5 over three panel blocks (K = 1024: 16 panels a block) with a 1-row tail tile.
    shapes = [(68, 64, (1, 5, 8, 9, 13, 143, 145, 399, 400, 401, 513), (torch.float32, torch.bfloat16, torch.float16)),
              (130, 69, (1, 9, 13, 145, 401), (torch.float32, torch.bfloat16, torch.float16)),
              (68, 176, (7, 12, 20, 150, 400), (torch.float32, torch.float16)),
              (132, 200, (11, 18, 149, 257), (torch.float32, torch.bfloat16)),
              (1024, 600, (145,), (torch.float32,))]
    for k, n, rows, dtypes in shapes:
        lo, hi = (-63, 64) if weight_bits == 7 else (-128, 128)
        w = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
        packed, w_scale = reference.pack_weight(w), torch.rand(n, generator=gen) / 50 + 1e-3
        corr = reference.weight_correction(packed)
        for m in rows:
            x = torch.randn(m, k, generator=gen) * 3
            for bias in (None, torch.randn(n, generator=gen)):
                for dtype in dtypes:
                    yield x.to(dtype), packed, w_scale, bias, corr


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
@pytest.mark.parametrize("weight_bits", [8, 7])
def test_int8_linear_dynamic_cpu_bit_identical_to_reference(weight_bits):
    """At every CPU level the op's output equals reference.int8_linear_dynamic bit for bit, bias and
    all: the epilogue's (acc * xs) * ws is rounded before the bias is added, as the reference's separate
    ops do (an FMA there gave 1-ulp differences that depended on a row's place in its micro-tile). Rows:
    few-row tiles (1-9), 6-row groups with tails, and around the row tiles and chunks (143-145, 399-401,
    513); K a multiple of 4 (rows read in place) and not (packed); N of whole and partial panels, several
    4-panel micro-tiles in a row (the AVX-512 bodies' runs of micro-tiles, micro_run) and the leftovers
    after them; with the weight correction given and (8-bit: int8_gemm_u8s8 sums the columns per tile)
    without."""
    for x, packed, w_scale, bias, corr in _bit_identical_cases(weight_bits):
        n = w_scale.numel()
        want = reference.int8_linear_dynamic(x, packed, w_scale, bias, n, False)
        for level in effops.cpu_isa.levels():
            with effops.cpu_isa.use_cpu_isa(level), effops.use_backend("cpu"):
                got = ops.int8_linear_dynamic(x, packed, w_scale, bias, n, False, corr, weight_bits)
                assert torch.equal(got, want), (level, x.shape, n, bias is None, x.dtype)
                if weight_bits == 8:
                    got = ops.int8_linear_dynamic(x, packed, w_scale, bias, n, False, None, 8)
                    assert torch.equal(got, want), (level, x.shape, n, bias is None, x.dtype, "no w_corr")


@with_backends("int8_mm")
def test_int8_mm_exact_every_row_count_and_panel_mix(backend):
    """int8_mm's int32 output through the same store paths (whole panels stored by the micro-kernel,
    a partial last panel through the scratch tile, runs of 6 x 4 micro-tiles with the column correction
    computed per tile), M = 1..9, 13, 20 and 151, extreme values in both operands."""
    for n in (16, 64, 69, 130, 200):
        for m in (*range(1, 10), 13, 20, 151):
            a, b = _randi8(m, 67), _randi8(67, n)
            a[0, :5], b[:5, 0] = -128, -128
            assert torch.equal(ops.int8_mm(a, b).cpu(), _exact_mm(a, b)), (m, n)


def test_int8_linear_dynamic_is_exported_with_the_other_int8_ops():
    assert "int8_linear_dynamic" in ops.__all__ and ops.int8_linear_dynamic is _GEMM.int8_linear_dynamic


@pytest.mark.parametrize("backend,weight_only", _weight_only_params(), indirect=["backend"])
@pytest.mark.parametrize("lead,k,n", [((), 97, 23), ((3, 1, 5), 123, 33), ((4,), 1, 17), ((0,), 31, 7),
                                      ((2, 0, 3), 5, 1)], ids=["1-D", "4-D", "k1", "empty", "empty-4-D"])
def test_int8_linear_dynamic_batch_dims_and_empty_input(backend, weight_only, lead, k, n):
    # Through effops.ops: no leading dim, several, K = 1, and empty batches, against the reference.
    torch.manual_seed(1)
    x = torch.randn(*lead, k, device=device())
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(n, k, device=device()))
    packed, bias = reference.pack_weight(w_int8), torch.randn(n, device=device())
    got = ops.int8_linear_dynamic(x, packed, w_scale, bias, n, weight_only)
    want = reference.int8_linear_dynamic(x, packed, w_scale, bias, n, weight_only)
    assert got.shape == want.shape == (*lead, n) and got.dtype == torch.float32
    _close_to_fp32(got, dynamic_reference_fp32(x, packed, w_scale, bias, n, weight_only), torch.float32, backend)


@pytest.mark.parametrize("backend,weight_only", _weight_only_params(), indirect=["backend"])
def test_int8_linear_dynamic_strided_operands(backend, weight_only):
    x = torch.randn(5, 70, device=device())
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(20, 70, device=device()))
    packed, bias = reference.pack_weight(w_int8), torch.randn(20, device=device())
    got = ops.int8_linear_dynamic(x, _strided(packed), _strided(w_scale), _strided(bias), 20, weight_only)
    _close_to_fp32(got, reference.int8_linear_dynamic(x, packed, w_scale, bias, 20, weight_only), torch.float32)


def test_triton_every_gpu_config(monkeypatch):
    """On a GPU the Triton GEMM autotunes over CONFIGS and keeps the fastest, so the others never run;
    the interpreter runs one tile. Launch each configuration directly (its tile, and on a GPU its warps
    and stages) on sizes that no tile divides, for the three ways the kernel is used: int8_mm's int32
    store, int8_linear's epilogue, Int8Linear's packed weights."""
    if not effops.backends()["triton"]:
        pytest.skip("triton not usable here")
    import importlib
    tk = importlib.import_module("effops.triton_kernels.int8_gemm")
    monkeypatch.setattr(tk, "_interpreting", lambda t: True)  # the direct launch, with the config below
    m, k, n = 131, 200, 133  # > 1 tile in M and N with the 128-wide tiles, 4 k steps of 64, last one partial
    a, b = _randi8(m, k), _randi8(k, n)
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((m,), k, n)
    x = torch.randn(m, k, device=device())
    w_q, w_s = reference.quantize_rowwise(torch.randn(n, k, device=device()))
    packed = reference.pack_weight(w_q)
    for bm, bn, bk, warps, stages in tk.CONFIGS:
        config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        if device().type == "cuda":
            config.update(num_warps=warps, num_stages=stages)
        monkeypatch.setattr(tk, "_INTERPRETER_CONFIG", config)
        with effops.use_backend("triton"):
            assert torch.equal(ops.int8_mm(a, b).cpu(), _exact_mm(a, b)), config
            got = ops.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype=torch.bfloat16)
            dyn = ops.int8_linear_dynamic(x, packed, w_s, bias, n, False)
        _close_to_fp32(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias), torch.bfloat16, "triton")
        _close_to_fp32(dyn, reference.int8_linear_dynamic(x, packed, w_s, bias, n, False), torch.float32)


on_cuda = pytest.mark.skipif(device().type != "cuda", reason="the CUDA policy runs on CUDA tensors")


@on_cuda
def test_cuda_policy_prefers_triton_and_the_cuda_kernel_declines_its_grid_limit():
    # Automatic on CUDA tensors: Triton where it is installed (autotuned, pipelined; expected faster than
    # the plain mma.sync kernel), the CUDA C++ kernel where it is not. The CUDA kernel puts 64-wide column
    # tiles on grid.y (<= 65535): one more column would fail at launch, so forcing it there raises.
    from effops import _backends
    a = _randi8(2, 8)
    with _backends.record_choices() as tally:
        ops.int8_mm(a, _randi8(8, 5))
    assert tally["int8_mm"] == {"triton" if effops.backends()["triton"] else "cuda": 1}
    b = torch.zeros(8, 65535 * 64 + 1, dtype=torch.int8, device=device())
    with effops.use_backend("cuda"), pytest.raises(effops.BackendError, match="grid.y"):
        ops.int8_mm(a, b)


def test_triton_declines_weight_only():
    if not effops.backends()["triton"]:
        pytest.skip("triton not usable here")
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(16, 8, device=device()))
    with effops.use_backend("triton"):
        with pytest.raises(effops.BackendError, match="weight_only"):
            ops.int8_linear_dynamic(torch.randn(2, 8, device=device()), reference.pack_weight(w_int8), w_scale, None,
                                    16, True)


def test_pack_unpack_roundtrip():
    w = _randi8(37, 71, low=-127)
    packed = reference.pack_weight(w)
    assert packed.shape == (3, 18, reference.PACK_NR, reference.PACK_KG)
    assert torch.equal(reference.unpack_weight(packed, 37, 71), w)
    # The documented address formula of element (k, n).
    n, k = 21, 66
    flat = packed.reshape(-1)
    assert flat[(n // 16) * 72 * 16 + (k // 4) * 64 + (n % 16) * 4 + k % 4] == w[n, k]


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_all_ops():
    x = torch.randn(5, 24, device=device())
    a, b = _randi8(5, 24), _randi8(24, 7)
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((5,), 24, 7)
    w_q, w_s = reference.quantize_rowwise(torch.randn(7, 24, device=device()))
    packed = reference.pack_weight(w_q)
    cases = [
        (torch.ops.effops.quantize_rowwise.default, (x,)),
        (torch.ops.effops.int8_mm.default, (a, b)),
        (torch.ops.effops.int8_linear.default, (x_int8, x_scale, w_int8, w_scale, bias, torch.bfloat16)),
        (torch.ops.effops.int8_linear.default, (x_int8, x_scale, w_int8, w_scale, None, torch.float32)),
        (torch.ops.effops.int8_linear_dynamic.default, (x.clone().requires_grad_(), packed, w_s, bias, 7, False)),
        (torch.ops.effops.int8_linear_dynamic.default, (x.clone().requires_grad_(), packed, w_s, None, 7, True)),
        (torch.ops.effops.int8_linear_dynamic_backward.default, (torch.randn(5, 7, device=device()), packed, w_s, 24,
                                                                  True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lin = effops.nn.Int8Linear.from_linear(torch.nn.Linear(24, 10).to(device()), mode="dynamic")

    def fn(x, a, b, w_int8, w_scale):
        q, s = ops.quantize_rowwise(x)
        y = ops.int8_linear(q, s, w_int8, w_scale, None, out_dtype=torch.float32)
        return y, ops.int8_mm(a, b), lin(x)

    x = torch.randn(6, 24, device=device())
    a, b = _randi8(6, 24), _randi8(24, 5)
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(10, 24, device=device()))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, ref in zip(compiled(x, a, b, w_int8, w_scale), fn(x, a, b, w_int8, w_scale)):
        torch.testing.assert_close(got, ref)
    assert torch._dynamo.utils.counters["graph_break"] == {}


# ---------------------------------------------------------------------------------------------
# The cpu kernels at every instruction-set level this CPU runs (scalar included), against the reference.
# ---------------------------------------------------------------------------------------------
_LEVELS_SCRIPT = r"""
import sys
import torch, effops
from effops import ops
from effops.reference import int8 as R
sys.path.insert(0, "tests")
import test_int8_ops as t
assert torch.ops.effops_cpu.cpu_isa() == LEVEL
torch.manual_seed(0)
# M = 13, 17: three and more 6-row micro-tiles, past the 8-row few-row path; 150: two 144-row tiles.
with effops.use_backend("cpu"):
    # (8, 68, 64), (3, 64, 80): whole 16-column panels, which the AVX-512 micro-kernels store themselves,
    # beside a partial one (80 = 64 + 16: a 4-panel and a 1-panel micro-tile).
    for m, k, n in [(1, 1, 1), (5, 7, 3), (13, 64, 16), (17, 64, 16), (33, 130, 37), (150, 67, 21), (8, 68, 64),
                    (3, 64, 80)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        b[0, 0] = -128
        for bb in (b, b.clamp(-127, 127)):
            assert torch.equal(ops.int8_mm(a, bb), (a.long() @ bb.long()).int()), (m, k, n)
        # Integer rows holding a +-127 (row scale exactly 1) and weight scales 1: the output is the
        # float of the exact int32 sum, for the 8-bit and the 7-bit weight kernels.
        xi = torch.randint(-127, 128, (m, k)).float()
        xi[:, 0] = 127.0
        for lim, corr in ((127, False), (63, True)):
            w = torch.randint(-lim, lim + 1, (n, k), dtype=torch.int8)
            packed = R.pack_weight(w)
            got = ops.int8_linear_dynamic(xi, packed, torch.ones(n), None, n, False,
                                          R.weight_correction(packed) if corr else None, 7 if corr else 8)
            assert torch.equal(got, (xi.long() @ w.long().t()).float()), (m, k, n, lim)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(m, k) * 3).to(dt)
            q, s = ops.quantize_rowwise(x)
            qr, sr = R.quantize_rowwise(x)
            assert torch.equal(q, qr) and torch.equal(s, sr)
            w, ws = R.quantize_rowwise(torch.randn(n, k))
            bias = torch.randn(n)
            t._close_to_fp32(ops.int8_linear(q, s, w, ws, bias, out_dtype=dt),
                             R.int8_linear(q, s, w, ws, bias, torch.float32), dt)
            packed = R.pack_weight(w)
            for wo in (False, True):  # forced, the cpu kernel runs weight_only at any row count
                got = ops.int8_linear_dynamic(x, packed, ws, bias, n, wo)
                t._close_to_fp32(got, t.dynamic_reference_fp32(x, packed, ws, bias, n, wo), dt)
    t.check_non_finite_rows(ops.quantize_rowwise)
"""


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_cpu_every_level_matches_reference():
    run_at_every_cpu_level(_LEVELS_SCRIPT)
