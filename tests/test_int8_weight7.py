"""Int8Linear(weight_bits=7): weights quantized to [-63, 63], activations the exact 8-bit spec.

The CPU kernel multiplies a + 128 (unsigned) by the 7-bit weights and starts its sums at -128 times
the weights' column sums (csrc/cpu/int8_gemm.h, int8_gemm_u8s7). Its integers must equal the exact
products: with activation rows of integers holding a +-127 (so the row scale is exactly 1 and q == x)
and weight scales 1, the output is float(exact int32 sum), so it is compared with torch.equal. Also:
the reference's 7-bit quantization, every backend against the reference, the scalar path, state_dict,
gradients, torch.compile, argument checks, and the accuracy on a small trained MLP.
"""
import copy
import io

import pytest
import torch
from torch import nn

import effops
from effops.nn import Int8Linear
from effops.ops.int8_gemm import int8_linear_dynamic
from effops.reference import int8 as reference
from tests.conftest import device, run_at_every_cpu_level
from tests.test_int8_linear import _digits_mlp, _module_params, _rel_err
from tests.test_int8_ops import _close_to_fp32, dynamic_reference_fp32, with_backends

MAX_K = reference.MAX_K
cpu_only = pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")


def _module_with(w_int8, mode="dynamic"):
    """An Int8Linear(weight_bits=7) holding exactly w_int8 (values in [-63, 63]), scales 1, no bias."""
    n, k = w_int8.shape
    m = Int8Linear(k, n, bias=False, mode=mode, weight_bits=7, device=w_int8.device)
    m.load_state_dict({"weight": w_int8, "weight_scale": torch.ones(n, device=w_int8.device)})
    return m


def _extreme_weights(k, n):
    cols = [torch.full((k,), v, dtype=torch.int8) for v in (63, -63)]
    cols.append(torch.tensor([(-1) ** (j // 2) * 63 for j in range(k)], dtype=torch.int8))  # sign flips in a pair
    cols += [torch.randint(-63, 64, (k,), dtype=torch.int8) for _ in range(n - 3)]
    return torch.stack(cols)  # (n, k)


def _integer_rows(m, k):
    """Float rows of integers in [-127, 127], each holding a +-127: quantize_rowwise gives scale 1, q == x."""
    rows = [torch.full((k,), 127.0), torch.full((k,), -127.0), torch.tensor([(-1.0) ** j * 127 for j in range(k)])]
    while len(rows) < m:
        r = torch.randint(-127, 128, (k,)).float()
        r[torch.randint(0, k, ())] = 127.0 * (-1) ** len(rows)
        rows.append(r)
    return torch.stack(rows[:m])


def _exact(x, w_int8):
    return (x.long() @ w_int8.long().t()).float()  # float() of the exact sums, as the epilogue with scales 1


@cpu_only
def test_cpu_kernel_exact_extremes_every_row_count():
    # Every micro-tile height (M = 1..13 and 17 deal rows as e.g. 13 = 5 + 4 + 4), K not a multiple of 4,
    # K = 16384, N not a multiple of 16; rows of +-127 against columns of +-63 are the largest pairs
    # (a + 128 = 255 times 63, twice: 32130 < 32767).
    torch.manual_seed(0)
    with effops.use_backend("cpu"):
        for k, n in ((3, 5), (4099, 21), (16384, 37)):
            w = _extreme_weights(k, n)
            mod = _module_with(w)
            for m in ([*range(1, 14), 17] if k != 16384 else (1, 6, 13)):
                x = _integer_rows(m, k)
                assert torch.equal(mod(x), _exact(x, w)), (m, k, n)


@cpu_only
def test_cpu_kernel_exact_at_max_k():
    # K = MAX_K: the unsigned sums reach 255 * 63 * K = 2.1e9, just below 2**31, and the correction
    # brings them back to the exact product.
    w = torch.stack([torch.full((MAX_K,), v, dtype=torch.int8) for v in (63, -63)]
                    + [torch.randint(-63, 64, (MAX_K,), dtype=torch.int8)])
    small = torch.tensor([127.0] + [(-1.0) ** j for j in range(MAX_K - 1)])  # sums small enough for fp32 to hold exactly
    x = torch.cat([_integer_rows(3, MAX_K), small[None]])
    with effops.use_backend("cpu"):
        got = _module_with(w)(x)
    assert torch.equal(got, _exact(x, w))
    assert got[0, 0].item() == torch.tensor(127 * 63 * MAX_K).float().item()
    assert got[3, 0].item() == 127 * 63 and got[3, 1].item() == -127 * 63


@with_backends("int8_linear_dynamic")
def test_exact_on_every_backend(backend):
    torch.manual_seed(1)
    w = _extreme_weights(67, 19).to(device())
    x = _integer_rows(7, 67).to(device())
    assert torch.equal(_module_with(w)(x).cpu(), _exact(x.cpu(), w.cpu()))


@pytest.mark.parametrize("backend,mode", [p for p in _module_params() if p.values[1] != "auto"], indirect=["backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (2, 3, 2), (3, 7)])
def test_module_matches_reference(backend, mode, dtype, lead):
    torch.manual_seed(2)
    lin = nn.Linear(131, 45).to(device())
    m = Int8Linear.from_linear(lin, mode=mode, weight_bits=7)
    x = (torch.randn(*lead, 131, device=device()) * 3).to(dtype)
    y = m(x)
    ref32 = dynamic_reference_fp32(x, m.weight_packed, m.weight_scale, m.bias, 45, mode == "weight_only")
    assert y.dtype == dtype and y.shape == (*lead, 45)
    _close_to_fp32(y, ref32, dtype, backend)
    assert _rel_err(y, lin(x.float())) < 0.03  # 7-bit weights, 8-bit activations


def test_reference_7bit_quantization_and_weights():
    torch.manual_seed(3)
    w = torch.randn(40, 77) * 0.1
    w[3] = 0.0
    q, s = reference.quantize_rowwise(w, bits=7)
    assert q.dtype == torch.int8 and q.abs().max() <= 63
    assert torch.equal(q[torch.arange(40) != 3].abs().amax(1), torch.full((39,), 63, dtype=torch.int8))
    assert s[3].item() == 1.0 and (q[3] == 0).all()
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    # from_linear stores exactly these, and the kernel's correction is -128 times the column sums
    lin = nn.Linear(77, 40)
    with torch.no_grad():
        lin.weight.copy_(w)
    m = Int8Linear.from_linear(lin, weight_bits=7)
    assert torch.equal(m.weight.cpu(), q) and torch.equal(m.weight_scale.cpu(), s)
    corr = m.weight_corr.cpu()
    assert corr.dtype == torch.int32 and corr.shape == (48,)
    assert torch.equal(corr[:40], -128 * q.int().sum(1)) and (corr[40:] == 0).all()
    m8 = Int8Linear.from_linear(lin)  # the default 8-bit module keeps its weights' correction too
    assert torch.equal(m8.weight_corr.cpu()[:40], -128 * m8.weight.cpu().int().sum(1))
    assert "weight_bits=7" in repr(m)


def test_state_dict_roundtrip_and_mismatched_bits():
    torch.manual_seed(4)
    lin = nn.Linear(64, 32).to(device())
    m7 = Int8Linear.from_linear(lin, weight_bits=7)
    x = torch.randn(5, 64, device=device())
    buf = io.BytesIO()
    torch.save(m7.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    fresh = Int8Linear(64, 32, weight_bits=7, device=device())
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight_corr, m7.weight_corr) and torch.equal(fresh(x), m7(x))
    moved = copy.deepcopy(m7).to(torch.bfloat16)  # .to() keeps the derived forms beside the weight
    assert torch.equal(moved.weight_corr, m7.weight_corr) and moved.weight_corr.dtype == torch.int32
    # 7-bit weights loaded into an 8-bit module: its kernel computes the same integers.
    m8 = Int8Linear(64, 32, device=device())
    m8.load_state_dict(sd)
    assert torch.equal(m8.weight_corr, m7.weight_corr) and torch.equal(m8(x), m7(x))
    # An 8-bit state_dict cannot go into a 7-bit module (its products would saturate the 7-bit kernel).
    with pytest.raises(RuntimeError, match=r"weight_bits=7 needs weights in \[-63, 63\]"):
        Int8Linear(64, 32, weight_bits=7, device=device()).load_state_dict(Int8Linear.from_linear(lin).state_dict())


def test_gradient_compile_and_opcheck():
    torch.manual_seed(5)
    m = Int8Linear.from_linear(nn.Linear(24, 10).to(device()), weight_bits=7)
    x = torch.randn(3, 24, device=device(), requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, m.dequantized_weight().sum(0).expand(3, 24))
    # Without a gradient (no graph node) and with one: the same values.
    with torch.no_grad():
        y_fast = m(x)
    assert torch.equal(y_fast, m(x).detach())
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: m(t), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach()), y_fast)
    torch.library.opcheck(torch.ops.effops.int8_linear_dynamic.default,
                          (x.detach().clone().requires_grad_(), m.weight_packed, m.weight_scale, m.bias, 10, False,
                           m.weight_corr, 7))


def test_no_autograd_path_respects_forced_backend():
    from effops import _backends
    m = Int8Linear.from_linear(nn.Linear(16, 8).to(device()), weight_bits=7)
    x = torch.randn(2, 16, device=device())
    with torch.no_grad(), effops.use_backend("reference"), _backends.record_choices() as tally:
        m(x)
    assert tally["int8_linear_dynamic"] == {"reference": 1}


def test_bad_arguments():
    lin = nn.Linear(8, 8)
    for bad in (6, 9, True, "7", 7.0, None):
        with pytest.raises(ValueError, match="weight_bits"):
            Int8Linear.from_linear(lin, weight_bits=bad)
        with pytest.raises(ValueError, match="weight_bits"):
            effops.quantize(nn.Sequential(nn.Linear(8, 8)), min_features=1, weight_bits=bad)
    m = Int8Linear.from_linear(lin, weight_bits=7)
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="w_corr must have dtype"):
        int8_linear_dynamic(x, m.weight_packed, m.weight_scale, m.bias, 8, False, m.weight_corr.long())
    with pytest.raises(ValueError, match="w_corr must have shape"):
        int8_linear_dynamic(x, m.weight_packed, m.weight_scale, m.bias, 8, False, m.weight_corr[:8])
    with pytest.raises(ValueError, match="w_corr must be on cpu like the input"):
        int8_linear_dynamic(x, m.weight_packed, m.weight_scale, m.bias, 8, False, m.weight_corr.to("meta"))
    # The module checks K once (its forward skips the op's checks): int32 sums must stay exact.
    with pytest.raises(ValueError, match="in_features must be <="):
        Int8Linear(reference.MAX_K + 1, 1)


def test_7bit_module_refuses_minus_128_weights():
    # abs(-128) wraps to -128 in int8: a state_dict holding -128 must still be refused by a 7-bit
    # module, whose kernel would saturate on it (255 * -128 + 255 * -63 < -32768).
    lin = nn.Linear(8, 4)
    sd = Int8Linear.from_linear(lin, weight_bits=7).state_dict()
    sd["weight"] = sd["weight"].clone()
    sd["weight"][0, 0], sd["weight"][0, 1] = -128, -63
    with pytest.raises(RuntimeError, match=r"weight_bits=7 needs weights in \[-63, 63\]"):
        Int8Linear(8, 4, weight_bits=7).load_state_dict(sd)


def test_quantize_transform_and_accuracy_on_trained_mlp():
    model, x, y = _digits_mlp()
    model = model.to(device())
    with torch.no_grad():
        logits = model(x)
        acc_fp32 = (logits.argmax(1) == y).float().mean().item()
        q8 = effops.quantize(copy.deepcopy(model), min_features=8, mode="dynamic")(x)
        q7_model = effops.quantize(copy.deepcopy(model), min_features=8, mode="dynamic", weight_bits=7)
        q7 = q7_model(x)
    assert all(q7_model[i].weight_bits == 7 for i in (0, 2, 4))
    acc8, acc7 = ((q.argmax(1) == y).float().mean().item() for q in (q8, q7))
    print("digits MLP: fp32 acc %.4f; 8-bit weights acc %.4f rel err %.4f; 7-bit weights acc %.4f rel err %.4f"
          % (acc_fp32, acc8, _rel_err(q8, logits), acc7, _rel_err(q7, logits)))
    assert abs(acc7 - acc_fp32) <= 0.01 and _rel_err(q7, logits) < 0.02


_LEVELS_SCRIPT = r"""
import torch, effops
from effops import _ext
from effops.nn import Int8Linear
from effops.reference import int8 as R
assert torch.ops.effops_cpu.cpu_isa() == LEVEL
torch.manual_seed(0)
with effops.use_backend("cpu"):
    for m, k, n in [(1, 1, 1), (5, 7, 3), (13, 130, 37), (6, 4099, 17)]:
        w = torch.randint(-63, 64, (n, k), dtype=torch.int8)
        w[0] = 63
        if n > 1:
            w[1] = -63
        mod = Int8Linear(k, n, bias=False, weight_bits=7)
        mod.load_state_dict({"weight": w, "weight_scale": torch.ones(n)})
        x = torch.randint(-127, 128, (m, k)).float()
        x[:, 0] = 127.0
        x[0] = -127.0
        assert torch.equal(mod(x), (x.long() @ w.long().t()).float()), (m, k, n)
        lin = torch.nn.Linear(k, n)
        mod = Int8Linear.from_linear(lin, weight_bits=7)
        for dt in (torch.float32, torch.bfloat16):
            xf = (torch.randn(m, k) * 3).to(dt)
            ref = R.int8_linear_dynamic(xf, mod.weight_packed, mod.weight_scale, mod.bias, n, False)
            torch.testing.assert_close(mod(xf).float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
"""


@cpu_only
def test_cpu_every_level_exact():
    run_at_every_cpu_level(_LEVELS_SCRIPT)


@cpu_only
@pytest.mark.parametrize("weight_bits", [8, 7])
def test_cpu_row_chunks(weight_bits):
    # The cpu op quantizes and multiplies large inputs in 256-row chunks: 600 rows = 256 + 256 + 88, each
    # chunk's scales and output rows at their own offsets (a mix-up would swap or repeat rows).
    torch.manual_seed(6)
    w = _extreme_weights(40, 20) if weight_bits == 7 else torch.randint(-127, 128, (20, 40), dtype=torch.int8)
    m = Int8Linear(40, 20, bias=False, weight_bits=weight_bits)
    m.load_state_dict({"weight": w, "weight_scale": torch.ones(20)})
    x = _integer_rows(600, 40) * torch.linspace(0.5, 2.0, 600)[:, None]  # row scales differ: 0.5 .. 2.0
    with effops.use_backend("cpu"):
        got = m(x)
    ref = reference.int8_linear_dynamic(x, m.weight_packed, m.weight_scale, None, 20, False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@cpu_only
@pytest.mark.parametrize("weight_bits", [8, 7])
def test_cpu_few_row_multi_panel_kernels(weight_bits):
    # 1 row takes a kernel reading 4 panels of 16 columns per pass, 2 and 3 rows one reading 2 (when
    # the tile has that many left; 7 rows = 4 + 3 mixes both kinds): N = 64, 100 (passes, then single
    # panels, the last one partial), 130; extremes in every column group; K = 4096, 4099 (tail group)
    # and 16384.
    torch.manual_seed(7)
    lim = 63 if weight_bits == 7 else 127
    for k in (4096, 4099, 16384):
        for n in (64, 100, 130):
            w = _extreme_weights(k, n).clamp(-lim, lim) * (2 if weight_bits == 8 else 1)
            w = w.clamp(-lim, lim)
            w[torch.randperm(n)[: n // 4]] = torch.randint(-lim, lim + 1, (n // 4, k), dtype=torch.int8)
            m = Int8Linear(k, n, bias=False, weight_bits=weight_bits)
            m.load_state_dict({"weight": w, "weight_scale": torch.ones(n)})
            with effops.use_backend("cpu"):
                for rows in (1, 2, 3, 7):
                    x = _integer_rows(rows, k)[torch.randperm(rows)]
                    assert torch.equal(m(x), _exact(x, w)), (rows, k, n)
