"""The weights' column correction (w_corr, Int8Linear.weight_corr) for 8-bit weights.

weight_corr = -128 x the column sums of the packed weight (reference.int8.weight_correction): the CPU
kernels multiply a + 128 (unsigned) by the weights and start their sums there, so the VNNI body need not
sum the weight's columns per call. It is derived module state: built at from_linear and load_state_dict,
moved by .to(), never saved. The op takes it for 8-bit weights too (weight_bits=8) and must give the exact
integers with it and without it, for every int8 weight (-128 included) and every row count.
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
from tests.conftest import device
from tests.test_int8_ops import with_backends
from tests.test_int8_weight7 import _exact, _integer_rows  # rows of +-127 integers; float() of exact sums

MAX_K = reference.MAX_K
cpu_only = pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")


def _full_range_weights(n, k):
    """(n, k) int8 with the extreme columns first: all -128, all 127, -128/127 alternating, then random."""
    cols = [torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8),
            torch.tensor([-128 if j % 2 else 127 for j in range(k)], dtype=torch.int8)]
    cols += [torch.randint(-128, 128, (k,), dtype=torch.int8) for _ in range(n - 3)]
    return torch.stack(cols[:n])


def test_weight_correction_definition():
    w = _full_range_weights(21, 67)
    corr = reference.weight_correction(reference.pack_weight(w))
    assert corr.dtype == torch.int32 and corr.shape == (32,)
    assert torch.equal(corr[:21], -128 * w.int().sum(1)) and (corr[21:] == 0).all()


def test_module_state_built_at_named_points():
    torch.manual_seed(0)
    lin = nn.Linear(70, 37).to(device())
    m = Int8Linear.from_linear(lin)
    assert m.weight_corr.dtype == torch.int32 and m.weight_corr.shape == (48,)
    assert torch.equal(m.weight_corr, reference.weight_correction(m.weight_packed))
    assert torch.equal(m.weight_corr[:37], -128 * m.weight.int().sum(1))
    # Not saved (derived), rebuilt by loading: from other weights, it follows them.
    sd = m.state_dict()
    assert "weight_corr" not in sd and "weight_packed" not in sd
    other = Int8Linear.from_linear(nn.Linear(70, 37).to(device()))
    assert not torch.equal(other.weight_corr, m.weight_corr)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.weight_corr, m.weight_corr)
    x = torch.randn(9, 70, device=device())
    assert torch.equal(other(x), m(x))
    # -128 in a loaded 8-bit weight: the correction holds it too.
    w = _full_range_weights(37, 70).to(device())
    other.load_state_dict({"weight": w, "weight_scale": torch.ones(37, device=device()), "bias": torch.zeros(37)})
    assert torch.equal(other.weight_corr[:37], -128 * w.int().sum(1))
    # .to(): moved with the module, stays int32 under float casts.
    moved = copy.deepcopy(m).to(torch.bfloat16)
    assert moved.weight_corr.dtype == torch.int32 and torch.equal(moved.weight_corr, m.weight_corr)
    meta = copy.deepcopy(m).to("meta")
    assert meta.weight_corr.device.type == "meta" and meta.weight_corr.shape == (48,)


@with_backends("int8_linear_dynamic")
def test_exact_with_and_without_w_corr(backend):
    # Every int8 weight (-128 included) against rows of +-127 (a + 128 = 1 and 255): the exact integers,
    # with the correction given and summed by the kernel. Row counts: the few-row kernels (1-8), 6-row
    # micro-tiles (13, 17), two 144-row tiles (150), past a 256-row chunk (300); K not a multiple of 4.
    torch.manual_seed(1)
    for k, n, rows in ((3, 5, (1, 4, 8, 13)), (130, 37, (1, 2, 5, 7, 8, 9, 13, 17, 150, 300)), (4099, 21, (1, 8, 13))):
        w = _full_range_weights(n, k).to(device())
        packed, ones = reference.pack_weight(w), torch.ones(n, device=device())
        corr = reference.weight_correction(packed)
        for m in rows:
            x = _integer_rows(m, k).to(device())
            want = _exact(x.cpu(), w.cpu())
            for c in (None, corr):
                got = int8_linear_dynamic(x, packed, ones, None, n, False, c)
                assert torch.equal(got.cpu(), want), (k, n, m, c is not None)


@cpu_only
def test_vnni_body_starts_from_the_given_correction():
    # On VNNI the 8-bit kernel takes the given correction as its starting sums (no pass over the
    # weights checks it, see the op's docstring): a correction shifted by d shifts the output by d. Below
    # VNNI the 8-bit kernel does not read it. A kernel that ignored it would fail here.
    w = _full_range_weights(19, 64)
    packed, ones = reference.pack_weight(w), torch.ones(19)
    shifted = reference.weight_correction(packed) + 256
    for level in effops.cpu_isa.levels():
        with effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level):
            for m in (1, 8, 20):
                x = _integer_rows(m, 64)
                got = int8_linear_dynamic(x, packed, ones, None, 19, False, shifted)
                vnni = level in ("avx512_vnni", "avx512_bf16")
                assert torch.equal(got, _exact(x, w) + (256 if vnni else 0)), (level, m)


@cpu_only
def test_exact_at_max_k_full_range():
    # K = MAX_K with -128 weights: |-128 x column sum| = 16384 K = 2147467264 just fits int32, and so
    # do the products of -127 rows with -128 columns (127 * 128 * K).
    k = MAX_K
    w = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8),
                     torch.randint(-128, 128, (k,), dtype=torch.int8)])
    x = torch.stack([torch.full((k,), -127.0), torch.full((k,), 127.0),
                     torch.tensor([127.0] + [(-1.0) ** j for j in range(k - 1)])])
    packed = reference.pack_weight(w)
    corr = reference.weight_correction(packed)
    assert corr[0].item() == 128 * 128 * k
    for level in effops.cpu_isa.levels():
        with effops.use_backend("cpu"), effops.cpu_isa.use_cpu_isa(level):
            for c in (None, corr):
                got = int8_linear_dynamic(x, packed, torch.ones(3), None, 3, False, c)
                assert torch.equal(got, _exact(x, w)), (level, c is not None)
    assert got[0, 0].item() == torch.tensor(127 * 128 * k).float().item()


def test_bad_w_corr_and_weight_bits():
    m = Int8Linear.from_linear(nn.Linear(8, 8))
    x = torch.randn(2, 8)
    args = (x, m.weight_packed, m.weight_scale, m.bias, 8, False)
    with pytest.raises(TypeError, match="w_corr must have dtype"):
        int8_linear_dynamic(*args, m.weight_corr.long())
    with pytest.raises(ValueError, match="w_corr must have shape"):
        int8_linear_dynamic(*args, m.weight_corr[:8])
    with pytest.raises(ValueError, match="w_corr must have shape"):  # a correction of another layer's size
        int8_linear_dynamic(*args, torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="w_corr must be on cpu like the input"):
        int8_linear_dynamic(*args, m.weight_corr.to("meta"))
    with pytest.raises(ValueError, match="w_corr must be given with weight_bits=7"):
        int8_linear_dynamic(*args, None, 7)
    for bad in (6, 9, 0):
        with pytest.raises(ValueError, match="weight_bits must be 8 or 7"):
            int8_linear_dynamic(*args, m.weight_corr, bad)


def test_opcheck_with_w_corr():
    m = Int8Linear.from_linear(nn.Linear(24, 10).to(device()))
    x = torch.randn(3, 24, device=device(), requires_grad=True)
    torch.library.opcheck(torch.ops.effops.int8_linear_dynamic.default,
                          (x, m.weight_packed, m.weight_scale, m.bias, 10, False, m.weight_corr, 8))
