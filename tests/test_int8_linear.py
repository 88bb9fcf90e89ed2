"""Int8Linear and effops.quantize: modes, gradients, state_dict, the transform, and accuracy on a
small MLP trained on real data (sklearn digits)."""
import contextlib
import copy
import importlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.nn import Int8Linear
from effops.reference import int8 as reference
from tests.conftest import backends_on_device, device
from tests.test_int8_ops import KERNELS


def _linear(k=129, n=45, bias=True):
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias).to(device())


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


# ---------------------------------------------------------------------------------------------
# Module: forward in every mode, on every backend
# ---------------------------------------------------------------------------------------------
def _module_params():
    """(backend, mode) pairs with a kernel: triton has no weight-only one."""
    return [pytest.param(p.values[0], mode, marks=p.marks, id="%s-%s" % (p.id, mode))
            for mode in ("dynamic", "weight_only", "auto") for p in backends_on_device()
            if p.values[0][0] in KERNELS["int8_linear_dynamic" + (" weight_only" if mode == "weight_only" else "")]]


def test_bias_parametrized_or_absent_reaches_the_op():
    """forward reads a registered bias from _parameters; a parametrized bias (a property in place of the
    Parameter) or no bias at all must still be what the op gets."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, b):
            return 2 * b

    lin = _linear()
    x = torch.randn(3, lin.in_features, device=device())
    m = Int8Linear.from_linear(lin, mode="dynamic")
    with torch.no_grad():
        plain = m(x)
        parametrize.register_parametrization(m, "bias", Double())
        torch.testing.assert_close(m(x), plain + m.bias / 2, rtol=1e-5, atol=1e-5)
        no_bias = Int8Linear.from_linear(_linear(bias=False), mode="dynamic")
        torch.testing.assert_close(no_bias(x), plain - lin.bias.detach().float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend,mode", _module_params(), indirect=["backend"])
@pytest.mark.parametrize("lead", [(1,), (2, 3, 2), (0,)])
def test_int8_linear_module_matches_reference_and_fp32(backend, mode, lead):
    lin = _linear()
    m = Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(*lead, 129, device=device())
    y = m(x)
    assert y.shape == (*lead, 45) and y.dtype == x.dtype
    rows = x.numel() // x.shape[-1]
    weight_only = mode == "weight_only" or (mode == "auto" and rows <= effops.nn.int8_linear.AUTO_ROWS)
    ref = reference.int8_linear_dynamic(x, m.weight_packed, m.weight_scale, m.bias, 45, weight_only)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() if ref.numel() else 0.0))
    # And close to the fp32 layer it replaces (8-bit weights, 8-bit activations per row).
    if x.numel():
        assert _rel_err(y, lin(x)) < 0.02


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_cpu_weight_only_many_rows_runs_aten_automatically_and_the_kernel_when_forced():
    # Past 16 rows dequantizing once and an fp32 GEMM is faster than the weight-only kernel: a speed
    # rule, so the automatic choice takes the ATen route while a forced cpu backend still runs the kernel.
    from effops import _backends
    m = Int8Linear.from_linear(_linear().cpu(), mode="weight_only")
    big = torch.randn(17, 129)
    expected = reference.int8_linear_dynamic(big, m.weight_packed, m.weight_scale, m.bias, 45, True)
    for forced, ran in ((None, "reference"), ("cpu", "cpu")):
        with _backends.record_choices() as tally, (effops.use_backend(forced) if forced else contextlib.nullcontext()):
            got = m(big)
        assert tally["int8_linear_dynamic"] == {ran: 1}
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with _backends.record_choices() as tally:
        m(big[:16])
    assert tally["int8_linear_dynamic"] == {"cpu": 1}


def test_mode_changed_after_calls():
    torch.manual_seed(5)
    m = Int8Linear.from_linear(nn.Linear(40, 24).to(device()))
    x = torch.randn(3, 40, device=device())

    def expected(weight_only):
        return reference.int8_linear_dynamic(x, m.weight_packed, m.weight_scale, m.bias, 24, weight_only)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected(False), atol=1e-4, rtol=1e-5)
        m.mode = "weight_only"
        torch.testing.assert_close(m(x), expected(True), atol=1e-4, rtol=1e-5)


def test_autocast_casts_the_input_only():
    m = Int8Linear.from_linear(_linear(), mode="dynamic")
    x = torch.randn(4, 129, device=device())
    with torch.autocast(device().type, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and m.weight_scale.dtype == torch.float32
    assert torch.equal(y, m(x.to(torch.bfloat16)))


def test_int8_linear_output_dtype_follows_input():
    m = Int8Linear.from_linear(_linear(), mode="dynamic")
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 129, device=device(), dtype=dtype)
        y = m(x)
        assert y.dtype == dtype
        assert _rel_err(y, _linear()(x.float())) < 0.03


def test_weight_is_int8_per_channel_and_frozen():
    lin = _linear()
    m = Int8Linear.from_linear(lin)
    w_q, w_s = reference.quantize_rowwise(lin.weight.detach())
    assert torch.equal(m.weight, w_q) and torch.equal(m.weight_scale, w_s)
    assert m.weight.dtype == torch.int8 and m.weight.abs().max() <= 127
    assert [n for n, p in m.named_parameters() if p.requires_grad] == []
    assert {n for n, _ in m.named_buffers()} == {"weight_packed", "weight_scale", "weight_corr"}


# ---------------------------------------------------------------------------------------------
# Gradients: straight-through to the input; bias when enabled
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_gradient_flows_to_input(mode):
    m = Int8Linear.from_linear(_linear(), mode=mode)
    m.bias.requires_grad_(True)
    x = torch.randn(2, 3, 129, device=device(), requires_grad=True)
    g = torch.randn(2, 3, 45, device=device())
    m(x).backward(g)
    w_deq = m.dequantized_weight()
    torch.testing.assert_close(x.grad, g @ w_deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, g.reshape(-1, 45).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_torch_func_transforms_and_forward_ad(mode):
    # jvp, grad, vmap and forward-mode AD differentiate torch's ops: the custom op dropped their
    # tangents (jvp gave zeros). The straight-through derivative is the dequantized weight.
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(32, 16), mode=mode)
    x, t = torch.randn(4, 32), torch.randn(4, 32)
    w_deq = q.dequantized_weight()
    y, tangent = torch.func.jvp(q, (x,), (t,))
    torch.testing.assert_close(y, q(x))
    torch.testing.assert_close(tangent, t @ w_deq.t())
    torch.testing.assert_close(torch.func.grad(lambda x: q(x).sum())(x), w_deq.sum(0).expand(4, 32))
    with torch.autograd.forward_ad.dual_level():
        out = q(torch.autograd.forward_ad.make_dual(x, t))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, t @ w_deq.t())
    xs = torch.randn(3, 4, 32)
    torch.testing.assert_close(torch.func.vmap(q)(xs), q(xs))


def test_frozen_int8_base_under_trainable_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 129), nn.ReLU(), nn.Linear(129, 45), nn.ReLU(), nn.Linear(45, 4)).to(device())
    effops.quantize(model, skip=("4",), min_features=32, mode="dynamic")
    assert isinstance(model[2], Int8Linear) and isinstance(model[0], Int8Linear) and type(model[4]) is nn.Linear
    model[0] = nn.Linear(32, 129).to(device())  # a trainable layer below the frozen int8 one
    loss = model(torch.randn(8, 32, device=device())).square().mean()
    loss.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[4].weight.grad is not None


# ---------------------------------------------------------------------------------------------
# state_dict: plain int8 weight, about a quarter of fp32 on disk, loads back (repacked)
# ---------------------------------------------------------------------------------------------
def _saved_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def test_state_dict_roundtrip_and_size():
    lin = nn.Linear(512, 384).to(device())
    m = Int8Linear.from_linear(lin, mode="dynamic")
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (384, 512)
    ratio = _saved_bytes(sd) / _saved_bytes(lin.state_dict())
    assert 0.24 < ratio < 0.28, ratio
    fresh = Int8Linear(512, 384, mode="dynamic", device=device())
    fresh.load_state_dict(sd)
    x = torch.randn(5, 512, device=device())
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.weight_packed, m.weight_packed)


def test_load_state_dict_errors():
    m = Int8Linear(16, 8)
    bad = dict(m.state_dict(), weight=torch.zeros(8, 16))
    with pytest.raises(RuntimeError, match="expected an int8 tensor"):
        m.load_state_dict(bad)
    missing = {k: v for k, v in m.state_dict().items() if k != "weight"}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        m.load_state_dict(missing)


def test_module_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(4, 4, mode="int4")
    with pytest.raises(ValueError, match="in_features"):
        Int8Linear(0, 4)
    with pytest.raises(TypeError, match="out_features"):
        Int8Linear(4, 4.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Conv2d(3, 3, 1))
    m = Int8Linear(16, 8)
    with pytest.raises(ValueError, match="in_features 16"):
        m(torch.randn(3, 15))
    with pytest.raises(TypeError, match="x must have dtype"):
        m(torch.zeros(3, 16, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
        self.attn = nn.MultiheadAttention(256, 4, batch_first=True)
        self.small = nn.Linear(256, 16)
        self.head = nn.Linear(256, 256)

    def forward(self, x):
        h = self.encoder(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h), self.small(h)


def test_quantize_transform_skip_and_min_size():
    torch.manual_seed(0)
    net = _Net().to(device()).eval()
    x = torch.randn(2, 5, 256, device=device())
    with torch.no_grad():
        ref = net(x)
    with pytest.warns(UserWarning, match="attn.out_proj .nn.MultiheadAttention reads out_proj.weight directly"):
        out = effops.quantize(net, skip=("head",), min_features=32, mode="dynamic")
    assert out is net
    assert isinstance(net.encoder[0], Int8Linear) and isinstance(net.encoder[2], Int8Linear)
    assert type(net.head) is nn.Linear                     # skipped by name
    assert type(net.small) is nn.Linear                    # 16 outputs < min_features
    assert type(net.attn.out_proj) is not Int8Linear       # MultiheadAttention reads its weight directly
    with torch.no_grad():
        got = net(x)
    assert _rel_err(got[0], ref[0]) < 0.03 and _rel_err(got[1], ref[1]) < 0.03
    # Save and load into a freshly quantized copy of the architecture.
    with pytest.warns(UserWarning, match="out_proj"):
        fresh = effops.quantize(_Net().to(device()).eval(), skip=("head",), min_features=32, mode="dynamic")
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], got[0])


def test_quantize_takes_pruned_layers_and_a_single_skip_name():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    effops.prune(net, 0.5, exclude="4")
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = net(x)
    masked_weight = net[2].weight * net[2].mask
    effops.quantize(net, skip="4", min_features=16)
    assert isinstance(net[0], Int8Linear) and isinstance(net[2], Int8Linear) and type(net[4]) is nn.Linear
    assert torch.equal(net[2].weight == 0, masked_weight == 0)  # pruned weights are exact int8 zeros
    with pytest.warns(UserWarning, match="changed nothing: skipped 0 .torch.float64 weight"):
        double = effops.quantize(nn.Sequential(nn.Linear(32, 32).double()), min_features=16)
    assert type(double[0]) is nn.Linear  # float64 stays: the int8 ops take fp32/bf16/fp16 inputs
    with torch.no_grad():
        assert _rel_err(net(x), ref) < 0.03


def test_float_casts_keep_int8_weights_and_fp32_scales_and_bias():
    # model.to(torch.bfloat16) / .half() on a quantized model: integers stay, scales and bias stay fp32
    # (the kernels take them so), and the output follows x's dtype.
    torch.manual_seed(0)
    m = Int8Linear.from_linear(nn.Linear(96, 40))
    x = torch.randn(3, 96, device=device())
    m = m.to(device())
    want = {dtype: m(x.to(dtype)) for dtype in (torch.bfloat16, torch.float16)}
    scale, bias = m.weight_scale.clone(), m.bias.detach().clone()
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.double().float(), torch.float16)):
        m = cast(m)
        assert m.weight_packed.dtype == torch.int8 and m.weight_scale.dtype == torch.float32
        assert torch.equal(m.weight_scale, scale) and torch.equal(m.bias, bias) and not m.bias.requires_grad
        assert torch.equal(m(x.to(dtype)), want[dtype])


def test_meta_device_answers_shapes():
    m = Int8Linear(32, 16, device="meta")
    y = m(torch.empty(2, 3, 32, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 16)


def test_quantize_bad_arguments():
    net = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(TypeError, match="skip"):
        effops.quantize(net, skip=0)
    with pytest.raises(TypeError, match="skip"):
        effops.quantize(net, skip=("0", 1))
    with pytest.raises(ValueError, match="min_features"):
        effops.quantize(net, min_features=0)
    with pytest.raises(ValueError, match="mode"):
        effops.quantize(net, mode="fp4")
    with pytest.raises(TypeError, match="nn.Module"):
        effops.quantize("model")
    with pytest.raises(ValueError, match="wrap the Linear"):
        effops.quantize(nn.Linear(8, 8))


# ---------------------------------------------------------------------------------------------
# Accuracy on realistic activations: an MLP trained for a few seconds on sklearn's digits
# ---------------------------------------------------------------------------------------------
def _digits_mlp():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread avoids waiting on a busy second core
    try:
        for _ in range(100):  # full batch: well under a second on a quiet core
            opt.zero_grad()
            F.cross_entropy(model(x[train]), y[train]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), x[test].to(device()), y[test].to(device())


def test_accuracy_on_trained_mlp_and_after_save_load():
    model, x, y = _digits_mlp()
    model = model.to(device())
    with torch.no_grad():
        logits = model(x)
        acc_fp32 = (logits.argmax(1) == y).float().mean().item()
        hidden = model[:4](x)
    assert acc_fp32 > 0.9
    q_model = effops.quantize(copy.deepcopy(model), min_features=8, mode="dynamic")
    assert all(isinstance(q_model[i], Int8Linear) for i in (0, 2, 4))
    with torch.no_grad():
        q_logits = q_model(x)
        q_hidden = q_model[:4](x)
    acc_int8 = (q_logits.argmax(1) == y).float().mean().item()
    # Reported numbers: relative error of the hidden activations and logits, and the accuracy change.
    print("digits MLP: fp32 acc %.4f, int8 acc %.4f, rel err hidden %.4f logits %.4f"
          % (acc_fp32, acc_int8, _rel_err(q_hidden, hidden), _rel_err(q_logits, logits)))
    assert abs(acc_int8 - acc_fp32) <= 0.01
    assert _rel_err(q_hidden, hidden) < 0.02 and _rel_err(q_logits, logits) < 0.02
    # The saved int8 model loads into a fresh quantized model with the same accuracy.
    buf = io.BytesIO()
    torch.save(q_model.state_dict(), buf)
    buf.seek(0)
    fresh = effops.quantize(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                          nn.Linear(256, 10)).to(device()), min_features=8, mode="dynamic")
    fresh.load_state_dict(torch.load(buf))
    with torch.no_grad():
        assert torch.equal(fresh(x), q_logits)


def test_quantize_default_leaves_layers_where_int8_is_slower_alone(monkeypatch):
    # The default min_features follows this CPU's instruction set (benchmarks/int8_min_features.py);
    # smaller layers are quantized only when asked.
    transform = importlib.import_module("effops.transforms.quantize")  # the module; the package's name is the function
    for capability, threshold in [("AVX512", 512), ("AVX2", 768), ("DEFAULT", 1024)]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert transform.default_min_features() == threshold
        net = nn.Sequential(nn.Linear(1024, 768), nn.ReLU(), nn.Linear(768, 384), nn.ReLU(), nn.Linear(384, 10))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, report = effops.quantize(net, return_report=True)
        assert isinstance(net[0], Int8Linear) == (threshold <= 768), capability
        assert [str(w.message).startswith("quantize changed nothing") for w in caught] == (
            [True] if threshold > 768 else []), capability
        assert all(type(net[i]) is nn.Linear for i in (2, 4)) and len(report.skipped) == 2 + (threshold > 768)
    effops.quantize(net, min_features=384)
    assert isinstance(net[2], Int8Linear) and type(net[4]) is nn.Linear


@pytest.mark.parametrize("weight_bits", [8, 7])
def test_load_state_dict_inside_inference_mode_keeps_buffers_usable_for_gradients(weight_bits):
    torch.manual_seed(0)
    src = Int8Linear.from_linear(nn.Linear(24, 16), weight_bits=weight_bits)
    m = Int8Linear(24, 16, weight_bits=weight_bits)
    with torch.inference_mode():
        m.load_state_dict(src.state_dict())
    assert not m.weight_packed.is_inference()
    x = torch.randn(3, 24, requires_grad=True)
    m(x).sum().backward()  # raised: inference tensors cannot be saved for backward
    torch.testing.assert_close(x.grad, src.dequantized_weight().sum(0).expand(3, 24))
