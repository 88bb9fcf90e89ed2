"""quantize_rowwise, int8_mm, int8_linear (and Int8Linear's op): every backend against the reference.

Integer results (int8_mm, the quantized values and scales) are compared exactly; int8_linear's float
output within the stated tolerance (fp32: 1e-5 relative to the output's magnitude; the epilogue may
contract into an FMA; bf16/fp16: one rounding of the same fp32 value, conftest's TOL).
"""

import pytest
import torch

import effops
from effops import ops
from effops.reference import int8 as reference
from tests.conftest import TOL, device, run_at_every_cpu_level

MAX_K = reference.MAX_K


def _exact_mm(a, b):
    return (a.cpu().long() @ b.cpu().long()).to(torch.int32)


def _need_kernel(op, backend):
    """Skip (with the reason) when `backend` has no kernel for `op` (e.g. cuda has no quantize kernel:
    the Triton one serves CUDA tensors); forcing it would raise BackendError by design."""
    from effops import _backends
    ops.quantize_rowwise, ops.int8_mm  # noqa: B018  (first access imports the op modules: registers kernels)
    if backend not in _backends._kernels.get(op, {}):
        pytest.skip("%s backend has no %s kernel" % (backend, op))


def _randi8(*shape, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, device=device())


def _close(got, ref, dtype):
    scale = ref.float().abs().max().clamp_min(1.0)
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol["rtol"], atol=tol["atol"] * scale)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5, 37), (97, 1025)])
def test_quantize_rowwise_matches_reference(backend, dtype, shape):
    _need_kernel("quantize_rowwise", backend)
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


def test_quantize_rowwise_zero_rows_ties_and_extremes(backend):
    _need_kernel("quantize_rowwise", backend)
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


def non_finite_rows():
    """Rows with +inf, NaN and -inf each at a position the vector loop reads and one its tail reads,
    a zero row and a normal one: the expected (q, scale) per row is independent of any backend."""
    x = torch.randn(8, 37)
    x[0, 3], x[1, 30], x[2, 36], x[3, 0] = float("inf"), float("nan"), float("-inf"), float("nan")
    x[4] = 0.0
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


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
def test_quantize_rowwise_rows_with_nan_or_inf(backend):
    # A NaN or inf gave the cpu kernel [-127, 0, ...] (a sign flip) or finite garbage with a valid
    # scale: silently wrong values downstream. Such a row has no scale: NaN, with q = 0.
    _need_kernel("quantize_rowwise", backend)
    check_non_finite_rows(ops.quantize_rowwise)


def test_int8_linear_module_gives_nan_rows_for_non_finite_inputs():
    torch.manual_seed(0)
    for kwargs in (dict(mode="dynamic"), dict(mode="dynamic", weight_bits=7), dict(mode="weight_only")):
        m = effops.nn.Int8Linear.from_linear(torch.nn.Linear(37, 24), **kwargs).to(device())
        x = non_finite_rows().to(device())
        y = m(x)
        assert not torch.isfinite(y[:4]).any(), kwargs  # F.linear gives NaN or inf there too
        assert torch.isfinite(y[4:]).all(), kwargs


@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2-D", "3-D"])
def test_linear_outputs_are_not_views(backend, lead):
    # As F.linear's (a view breaks in-place use of a module output under FSDP2).
    _need_kernel("int8_linear_dynamic", backend)
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


def test_quantize_rowwise_non_contiguous(backend):
    _need_kernel("quantize_rowwise", backend)
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
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.quantize_rowwise([1.0, 2.0])


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
        ref = reference.int8_linear(x_int8, x_scale, w_int8, w_scale, b, out_dtype)
        assert got.dtype == out_dtype and got.shape == (*lead, n)
        _close(got, ref, out_dtype)


def test_int8_linear_weights_with_min_value(backend):
    # A -128 in the weights (allowed here, never produced by quantize_rowwise) needs the widening path.
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((9,), 70, 20, w_low=-128)
    w_int8[0] = -128
    x_int8[0] = -128
    got = ops.int8_linear(x_int8, x_scale, w_int8, w_scale, bias)
    _close(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias), torch.float32)


def _strided(t):
    """t's values in a tensor whose last dim has stride 2 (a view of a larger buffer)."""
    out = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2]
    out.copy_(t)
    return out


def test_int8_linear_strided_scales_and_bias(backend):
    # Vectors viewed out of larger buffers: a kernel reading them at unit stride gives wrong sums.
    x_int8, x_scale, w_int8, w_scale, bias = _linear_inputs((9,), 70, 20)
    got = ops.int8_linear(x_int8, _strided(x_scale.unsqueeze(0)).squeeze(0), w_int8, _strided(w_scale), _strided(bias))
    _close(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias), torch.float32)


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
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_linear(x_int8, x_scale, w_int8, w_scale, out_dtype="float32")
    with pytest.raises(TypeError, match="x_int8 must have dtype"):
        ops.int8_linear(x_int8.float(), x_scale, w_int8, w_scale)


# ---------------------------------------------------------------------------------------------
# Int8Linear's op (dynamic and weight-only) on every backend that has it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((1,), 33, 17), ((2, 3), 129, 45)])
def test_int8_linear_dynamic_matches_reference(backend, weight_only, dtype, lead, k, n):
    _need_kernel("int8_linear_dynamic", backend)
    if backend == "triton" and weight_only:
        pytest.skip("triton declines weight_only (no kernel): covered by test_triton_declines_weight_only")
    x = torch.randn(*lead, k, device=device()).to(dtype)
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(n, k, device=device()))
    packed, bias = reference.pack_weight(w_int8), torch.randn(n, device=device())
    from effops.ops.int8_gemm import int8_linear_dynamic
    got = int8_linear_dynamic(x, packed, w_scale, bias, n, weight_only)
    ref = reference.int8_linear_dynamic(x, packed, w_scale, bias, n, weight_only)
    assert got.dtype == dtype and got.shape == (*lead, n)
    _close(got, ref, dtype if not weight_only else dtype)


@pytest.mark.parametrize("weight_only", [False, True])
def test_int8_linear_dynamic_strided_operands(backend, weight_only):
    _need_kernel("int8_linear_dynamic", backend)
    if backend == "triton" and weight_only:
        pytest.skip("triton declines weight_only (no kernel): covered by test_triton_declines_weight_only")
    x = torch.randn(5, 70, device=device())
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(20, 70, device=device()))
    packed, bias = reference.pack_weight(w_int8), torch.randn(20, device=device())
    from effops.ops.int8_gemm import int8_linear_dynamic
    got = int8_linear_dynamic(x, _strided(packed), _strided(w_scale), _strided(bias), 20, weight_only)
    _close(got, reference.int8_linear_dynamic(x, packed, w_scale, bias, 20, weight_only), torch.float32)


def test_triton_every_gpu_config(monkeypatch):
    """On a GPU the Triton GEMM autotunes over CONFIGS and keeps the fastest, so the others never run;
    the interpreter runs one tile. Launch each configuration directly (its tile, and on a GPU its warps
    and stages) on sizes that no tile divides, for the three ways the kernel is used: int8_mm's int32
    store, int8_linear's epilogue, Int8Linear's packed weights."""
    if not effops.backends()["triton"]:
        pytest.skip("triton not usable here")
    import importlib
    from effops.ops.int8_gemm import int8_linear_dynamic
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
            dyn = int8_linear_dynamic(x, packed, w_s, bias, n, False)
        _close(got, reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, torch.bfloat16), torch.bfloat16)
        _close(dyn, reference.int8_linear_dynamic(x, packed, w_s, bias, n, False), torch.float32)


def test_cuda_gemm_yields_to_triton_in_the_automatic_choice(monkeypatch):
    # Not measured on a GPU yet: the autotuned, pipelined Triton GEMM is expected to beat the plain
    # mma.sync kernel, so the cuda kernels decline the automatic choice (`faster`) where Triton is
    # usable and takes the input, and stay the choice where Triton is missing or declines (2**31
    # elements: its int32 offsets; the next in line would be the fp64 reference). Forcing
    # use_backend("cuda") ignores `faster`.
    from effops import _backends
    ops.int8_mm  # noqa: B018  (registers the kernels)

    def inputs(m):
        a = torch.empty(m, 1024, dtype=torch.int8, device="meta")
        b = torch.empty(1024, 64, dtype=torch.int8, device="meta")
        return {"int8_mm": (a, b),
                "int8_linear": (a, torch.empty(m, device="meta"), b.t(), torch.empty(64, device="meta"), None,
                                torch.float32)}
    for triton_usable in (True, False):
        monkeypatch.setattr(_backends, "_usable", lambda name, ok=triton_usable: ok if name == "triton" else True)
        for m, triton_takes_it in ((4, True), (2 ** 21, False)):  # 2**21 x 1024 = 2**31 elements
            for op, args in inputs(m).items():
                reason = _backends._kernels[op]["cuda"].faster(*args)
                assert bool(reason) == (triton_usable and triton_takes_it), (op, m, triton_usable, reason)


def test_cuda_gemm_declines_more_columns_than_its_grid_launches():
    # Column tiles on grid.y (<= 65535): one more column would fail at launch ("CUDA launch failed",
    # seen in tests/test_cuda_emulation.py); declining lets the next backend take it.
    from effops import _backends
    from effops.ops.int8_gemm import CUDA_MAX_N
    ops.int8_mm  # noqa: B018  (registers the kernels)
    a = torch.empty(2, 8, dtype=torch.int8, device="meta")
    for n in (CUDA_MAX_N, CUDA_MAX_N + 1):
        b = torch.empty(8, n, dtype=torch.int8, device="meta")
        scales = (torch.empty(2, device="meta"), torch.empty(n, device="meta"))
        want = n > CUDA_MAX_N
        assert bool(_backends._kernels["int8_mm"]["cuda"].supports(a, b)) == want
        assert bool(_backends._kernels["int8_linear"]["cuda"].supports(a, scales[0], b.t(), scales[1], None,
                                                                       torch.float32)) == want


def test_triton_declines_weight_only():
    if not effops.backends()["triton"]:
        pytest.skip("triton not usable here")
    from effops.ops.int8_gemm import int8_linear_dynamic
    w_int8, w_scale = reference.quantize_rowwise(torch.randn(16, 8, device=device()))
    with effops.use_backend("triton"):
        with pytest.raises(effops.BackendError, match="weight_only"):
            int8_linear_dynamic(torch.randn(2, 8, device=device()), reference.pack_weight(w_int8), w_scale, None, 16,
                                True)


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
import torch, effops
from effops import ops, _ext
from effops.ops.int8_gemm import int8_linear_dynamic
from effops.reference import int8 as R
assert torch.ops.effops_cpu.cpu_isa() == LEVEL
torch.manual_seed(0)
with effops.use_backend("cpu"):
    for m, k, n in [(1, 1, 1), (5, 7, 3), (17, 64, 16), (33, 130, 37)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        b[0, 0] = -128
        for bb in (b, b.clamp(-127, 127)):
            assert torch.equal(ops.int8_mm(a, bb), (a.long() @ bb.long()).int())
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = (torch.randn(m, k) * 3).to(dt)
            q, s = ops.quantize_rowwise(x)
            qr, sr = R.quantize_rowwise(x)
            assert torch.equal(q, qr) and torch.equal(s, sr)
            w, ws = R.quantize_rowwise(torch.randn(n, k))
            y = ops.int8_linear(q, s, w, ws, torch.randn(n), out_dtype=dt)
            packed = R.pack_weight(w)
            for wo in (False, True) if m <= 16 else (False,):  # cpu declines weight_only above 16 rows
                got = int8_linear_dynamic(x, packed, ws, None, n, wo)
                ref = R.int8_linear_dynamic(x, packed, ws, None, n, wo)
                torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
import sys
sys.path.insert(0, "tests")
import test_int8_ops as t
with effops.use_backend("cpu"):
    t.check_non_finite_rows(ops.quantize_rowwise)
"""


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_cpu_every_level_matches_reference():
    run_at_every_cpu_level(_LEVELS_SCRIPT)
