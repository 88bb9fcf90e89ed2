"""8-bit Adam states: effops::adam8bit_step on every backend against effops/reference/adam8bit.py, and
effops.optim.Adam8bit / AdamW8bit (training, checkpoints, torch checkpoints, master weights,
GradScaler, refusals).

Tolerance of the kernels against the reference: the arithmetic is the same operations in the same
order, except where torch's reference ops round differently (torch's CPU sqrt is not always the
IEEE one; the Triton interpreter and the scalar body do a * b + c in two roundings where the AVX2
body fuses it). A last-bit difference in a moment moves its code only when the value sits on a
rounding boundary between two codes: so codes are equal or one apart, and differ in a small share
of elements; scales (block maxima) and params are within fp32 rounding.
"""
import io

import pytest
import torch
import torch.nn.functional as F

import effops
from effops.ops import adam8bit_step
from effops.optim import AdamW, AdamW8bit, Adam8bit, state_bytes_per_param
from effops.reference import adam8bit as ref
from effops import _backends
from tests.conftest import ROUNDED_ONCE, TOL, device, run_at_every_cpu_level

BACKEND_OPS = ("adam8bit_step",)  # no CUDA C++ kernel: the `backend` fixture offers no cuda instance
SIZES = [1, 255, 256, 257, 1000, 0, 4099]  # partial blocks, one element, empty, a tail of 3 past 8 lanes
CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)]
OPTIONS = {
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "adam_l2": dict(weight_decay=0.05),
    "maximize_scaled": dict(maximize=True, grad_scale=4.0),
    "low_beta1": dict(beta1=0.3, beta2=0.9),  # lerp weight >= 0.5: torch's other lerp formula
}


def make_state(sizes, dtype, master, seed=0, dev=None):
    """Params, grads and quantized moments as mid-training would have them (moments spread over
    orders of magnitude within a block, as real ones are)."""
    g = torch.Generator().manual_seed(seed)
    dev = dev or device()
    s = dict(params=[], grads=[], exp_avg_codes=[], exp_avg_scales=[], exp_avg_sq_codes=[], exp_avg_sq_scales=[],
             master_params=[], steps=[])
    for n in sizes:
        p = torch.randn(n, generator=g)
        spread = torch.logspace(-4, 0, n) if n else torch.zeros(0)
        m = torch.randn(n, generator=g) * 0.1 * spread
        v = (torch.randn(n, generator=g) * 0.1 * spread).square()
        for key, t in zip(("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"),
                          ref.quantize_state(m, v)):
            s[key].append(t.to(dev))
        s["params"].append(p.to(dtype).to(dev))
        s["master_params"].append(p.to(dev) if master else None)
        s["grads"].append((torch.randn(n, generator=g) * spread).to(dtype).to(dev))
        s["steps"].append(torch.tensor(float(3 + len(s["steps"]))))
    return s


def clone(s):
    return {k: [None if t is None else t.clone() for t in v] for k, v in s.items()}


def run(s, backend, options, lr=1e-2):
    options = dict(options)
    if options.get("grad_scale") is not None:
        options["grad_scale"] = torch.tensor(options["grad_scale"])
    masters = s["master_params"] if any(m is not None for m in s["master_params"]) else None
    with effops.use_backend(backend):
        adam8bit_step(s["params"], s["grads"], s["exp_avg_codes"], s["exp_avg_scales"], s["exp_avg_sq_codes"],
                      s["exp_avg_sq_scales"], s["steps"], lr=lr, master_params=masters, **options)


def reference_run(s, options, lr=1e-2):
    """The definition of correct on state s: effops/reference/adam8bit.py, then the step counts advanced."""
    options = dict(dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                        decoupled_weight_decay=False), **options)
    with torch.no_grad():
        ref.adam8bit_step(s["params"], s["grads"], s["exp_avg_codes"], s["exp_avg_scales"], s["exp_avg_sq_codes"],
                          s["exp_avg_sq_scales"], s["master_params"], [t.item() + 1 for t in s["steps"]], lr=lr,
                          **options)
    for t in s["steps"]:
        t.add_(1)


def assert_codes_close(got, want, name):
    diff = (got.int() - want.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= 1, "%s: codes differ by %d" % (name, diff.max().item())
    assert diff.float().sum().item() <= max(2, 0.01 * diff.numel()), "%s: %d of %d codes differ" % (
        name, (diff > 0).sum().item(), diff.numel())


def assert_state_close(got, want):
    for i, p in enumerate(want["params"]):
        stored = ROUNDED_ONCE.get(p.dtype) or TOL[p.dtype]  # computed in fp32, rounded once
        torch.testing.assert_close(got["params"][i], p, **stored)
        torch.testing.assert_close(got["grads"][i], want["grads"][i], **stored)
        if want["master_params"][i] is not None:
            torch.testing.assert_close(got["master_params"][i], want["master_params"][i], **TOL[torch.float32])
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            assert_codes_close(got[key][i], want[key][i], "%s[%d]" % (key, i))
        for key in ("exp_avg_scales", "exp_avg_sq_scales"):
            torch.testing.assert_close(got[key][i], want[key][i], **TOL[torch.float32])
        assert torch.equal(got["steps"][i], want["steps"][i])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype,master", CASES, ids=[("%s%s" % (str(d)[6:], "+master" if m else "")) for d, m in CASES])
def test_matches_reference(backend, dtype, master, option):
    s = make_state(SIZES, dtype, master, seed=hash(option) % 1000)
    want = clone(s)
    reference_run(want, OPTIONS[option])
    run(s, backend, OPTIONS[option])
    assert_state_close(s, want)
    # It stepped: params and both moments moved (a kernel that skips a write-back fails here).
    start = make_state(SIZES, dtype, master, seed=hash(option) % 1000)
    for key in ("params", "exp_avg_codes", "exp_avg_sq_codes"):
        assert not torch.equal(s[key][-1], start[key][-1]), key


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_reaches_the_chosen_kernel(backend, found):
    """GradScaler's flag on every backend, after the backend was chosen: 0 steps with the gradients
    unscaled in the kernel, anything else leaves every tensor and count untouched."""
    s = make_state([300, 5, 0], torch.bfloat16, True, seed=21)
    s["master_params"][1] = None
    before, want = clone(s), clone(s)
    reference_run(want, OPTIONS["maximize_scaled"])
    with _backends.record_choices() as tally, effops.use_backend(backend):
        adam8bit_step(s["params"], s["grads"], s["exp_avg_codes"], s["exp_avg_scales"], s["exp_avg_sq_codes"],
                      s["exp_avg_sq_scales"], s["steps"], lr=1e-2, master_params=s["master_params"], maximize=True,
                      grad_scale=torch.tensor(4.0), found_inf=torch.tensor(found))
    assert tally["adam8bit_step"] == {backend: 1}
    if found:
        for key in s:
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(s[key], before[key])), key
    else:
        assert_state_close(s, want)


def test_cpu_every_level_matches_reference():
    code = (
        "import torch\n"
        "from tests.test_optim_adam8bit import make_state, clone, run, reference_run, assert_state_close, OPTIONS, CASES, SIZES\n"
        "for dtype, master in CASES:\n"
        "    for name, opt in OPTIONS.items():\n"
        "        s = make_state(SIZES, dtype, master, seed=5)\n"
        "        want = clone(s)\n"
        "        reference_run(want, opt)\n"
        "        run(s, 'cpu', opt)\n"
        "        assert_state_close(s, want)\n")
    if not effops.backends()["cpu"]:
        pytest.skip("cpu kernel not built")
    run_at_every_cpu_level(code)


def test_second_moment_is_written_back_and_decodes_to_the_update():
    """From the zero state, one step stores m = (1 - beta1) g and v = (1 - beta2) g^2 (up to the
    maps' resolution): fails if a kernel drops either moment's codes or scales."""
    n = 1000
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(n, generator=g).to(device())
    for backend in [b for b in ("reference", "cpu", "triton") if effops.backends()[b]]:
        if backend == "cpu" and device().type != "cpu":
            continue
        s = dict(params=[torch.zeros(n, device=device())], grads=[grad.clone()],
                 exp_avg_codes=[torch.zeros(n, dtype=torch.int8, device=device())],
                 exp_avg_scales=[torch.zeros(ref.num_blocks(n), device=device())],
                 exp_avg_sq_codes=[torch.zeros(n, dtype=torch.uint8, device=device())],
                 exp_avg_sq_scales=[torch.zeros(ref.num_blocks(n), device=device())],
                 master_params=[None], steps=[torch.tensor(0.0)])
        run(s, backend, {})
        m = ref.dequantize_signed(s["exp_avg_codes"][0], s["exp_avg_scales"][0])
        _, v = ref.dequantize_unsigned_sqrt(s["exp_avg_sq_codes"][0], s["exp_avg_sq_scales"][0])
        # square maps: relative error of a code step 2/|c|; checked where the value is > 5% of the max
        big = grad.abs() > 0.05 * grad.abs().max()
        torch.testing.assert_close(m[big], 0.1 * grad[big], rtol=0.1, atol=0, msg=backend)
        torch.testing.assert_close(v[big], 0.001 * grad[big] ** 2, rtol=0.1, atol=0, msg=backend)


def test_maps_round_trip_and_never_zero_a_second_moment():
    x = torch.randn(1000) * torch.logspace(-6, 0, 1000)
    codes, scales = ref.quantize_signed(x)
    back = ref.dequantize_signed(codes, scales)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    big = x.abs() > 0.01 * x.abs().max()
    assert ((back[big] - x[big]).abs() / x[big].abs()).max() < 0.1
    r = x.abs()
    codes, scales = ref.quantize_unsigned_sqrt(r)
    back, _ = ref.dequantize_unsigned_sqrt(codes, scales)
    assert (back > 0).all()  # no zero in the second moment's map: small values round up, never to 0
    assert (back[big] - r[big]).abs().div(r[big]).max() < 0.1
    # an all-zero block stays zero
    codes, scales = ref.quantize_unsigned_sqrt(torch.zeros(300))
    assert torch.equal(ref.dequantize_unsigned_sqrt(codes, scales)[0], torch.zeros(300))


def test_failed_check_touches_nothing():
    s = make_state([300, 20], torch.float32, False)
    before = clone(s)
    s["exp_avg_scales"][1] = torch.zeros(3)  # 20 elements need 1 scale
    with pytest.raises(ValueError, match=r"exp_avg_scales\[1\] must have shape \(1,\)"):
        run(s, "reference", {})
    for key in ("params", "exp_avg_codes", "exp_avg_sq_codes", "steps"):
        assert all(torch.equal(a, b) for a, b in zip(s[key], before[key]))
    s = make_state([10], torch.float32, False)
    s["exp_avg_codes"][0] = s["exp_avg_codes"][0].to(torch.uint8)
    with pytest.raises(TypeError, match=r"exp_avg_codes\[0\] must have dtype in \(int8\)"):
        run(s, "reference", {})


# ---------------------------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------------------------
def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 96), torch.nn.Tanh(),
                            torch.nn.Linear(96, 5))
    return m.to(device=device(), dtype=dtype)


def train(model, opt, steps, seed=1, scaler=None):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(128, 32, generator=g).to(device(), dtype)
    y = torch.randn(128, 5, generator=g).to(device(), dtype)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(loss.item())
    return losses


def flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("cls,torch_cls", [(AdamW8bit, torch.optim.AdamW), (Adam8bit, torch.optim.Adam)])
def test_trains_like_fp32_adam_and_keeps_small_tensors_fp32(cls, torch_cls):
    a, b = mlp(), mlp()
    oa = cls(a.parameters(), lr=3e-3, weight_decay=0.01, min_8bit_size=1000)
    ob = torch_cls(b.parameters(), lr=3e-3, weight_decay=0.01)
    la, lb = train(a, oa, 150), train(b, ob, 150)
    assert la[-1] < 0.5 * la[0]
    assert abs(la[-1] - lb[-1]) <= 0.05 * lb[-1] + 1e-3, (la[-1], lb[-1])
    st = oa.state[a[2].weight]  # 96 x 96 = 9216 elements: quantized
    assert st["exp_avg_codes"].dtype == torch.int8 and st["exp_avg_sq_codes"].dtype == torch.uint8
    assert st["exp_avg_scales"].shape == (36,) and "exp_avg" not in st
    assert "exp_avg" in oa.state[a[2].bias] and "exp_avg_codes" not in oa.state[a[2].bias]


def test_state_bytes_per_param_about_two():
    model = torch.nn.Linear(1024, 1024).to(device())
    opt = AdamW8bit(model.parameters())
    model(torch.randn(4, 1024, device=device())).sum().backward()
    opt.step()
    # codes 2 B + scales 8 B per 256 params, the bias (1024 fp32 moments) and the step counts
    assert 2.03 <= state_bytes_per_param(opt) <= 2.05


def test_state_dict_round_trip_continues_bit_for_bit():
    a = mlp()
    opt = AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=1000)
    train(a, opt, 10)
    buf = io.BytesIO()
    torch.save(dict(model=a.state_dict(), opt=opt.state_dict()), buf)
    sd = opt.state_dict()
    assert set(sd["state"][2]) == {"step", "exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"}
    buf.seek(0)
    ck = torch.load(buf)
    b = mlp(seed=9)
    b.load_state_dict(ck["model"])
    ob = AdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=1000)
    ob.load_state_dict(ck["opt"])
    for p, q in zip(a.parameters(), b.parameters()):
        for key, t in opt.state[p].items():
            assert ob.state[q][key].dtype == t.dtype and torch.equal(ob.state[q][key], t), key
    train(a, opt, 10, seed=3)
    train(b, ob, 10, seed=3)
    assert torch.equal(flat(a), flat(b))


def test_torch_adamw_checkpoint_is_quantized_on_load():
    a = mlp()
    ta = torch.optim.AdamW(a.parameters(), lr=3e-3)
    train(a, ta, 10)
    o8 = AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=1000)
    o8.load_state_dict(ta.state_dict())
    w = a[2].weight
    st = o8.state[w]
    assert "exp_avg" not in st and st["exp_avg_codes"].dtype == torch.int8 and st["step"].item() == 10
    m = ref.dequantize_signed(st["exp_avg_codes"], st["exp_avg_scales"])
    want = ta.state[w]["exp_avg"].flatten()
    big = want.abs() > 0.05 * want.abs().max()
    torch.testing.assert_close(m[big], want[big], rtol=0.1, atol=0)
    assert "exp_avg" in o8.state[a[2].bias]  # small: stays fp32
    before = flat(a)
    train(a, o8, 5)  # and continues
    assert not torch.equal(flat(a), before)


def test_master_weights_and_bf16():
    low = mlp(torch.bfloat16)
    opt = AdamW8bit(low.parameters(), lr=3e-3, master_weights=True, min_8bit_size=1000)
    losses = train(low, opt, 60)
    assert losses[-1] < 0.7 * losses[0]
    for p in low.parameters():
        st = opt.state[p]
        assert st["master_param"].dtype == torch.float32
        assert torch.equal(p.detach(), st["master_param"].to(torch.bfloat16))


def test_grad_scaler_skips_an_inf_step_and_matches_unscaled_training():
    a, b = mlp(), mlp()
    oa = AdamW8bit(a.parameters(), lr=3e-3, min_8bit_size=1000)
    ob = AdamW8bit(b.parameters(), lr=3e-3, min_8bit_size=1000)
    assert oa._step_supports_amp_scaling
    scaler = torch.amp.GradScaler(device().type, init_scale=256.0)
    train(a, oa, 5, scaler=scaler)
    train(b, ob, 5)
    torch.testing.assert_close(flat(a), flat(b), **TOL[torch.float32])
    # an overflow: nothing moves
    before = (flat(a), {k: v.clone() for k, v in oa.state[a[2].weight].items()})
    oa.zero_grad()
    scaler.scale(a(torch.randn(4, 32, device=device())).sum()).backward()
    a[2].weight.grad[0, 0] = float("inf")
    scaler.step(oa)
    scaler.update()
    assert torch.equal(flat(a), before[0])
    for k, v in oa.state[a[2].weight].items():
        assert torch.equal(v, before[1][k]), k


def test_complex64_empty_and_non_contiguous_params():
    g = torch.Generator().manual_seed(4)
    c = torch.nn.Parameter(torch.randn(3000, dtype=torch.complex64, generator=g).to(device()))
    e = torch.nn.Parameter(torch.zeros(0, device=device()))
    init = torch.randn(70, 90, generator=g).to(device())
    t = torch.nn.Parameter(init.clone().t())  # non-contiguous: runs the reference
    u = torch.nn.Parameter(init.t().contiguous())  # the same values, contiguous: the compiled kernel
    opt = AdamW8bit([c, e, t], lr=1e-2, min_8bit_size=1000)
    ou = AdamW8bit([u], lr=1e-2, min_8bit_size=1000)
    c0 = c.detach().clone()
    for _ in range(3):
        c.grad = torch.randn(3000, dtype=torch.complex64, generator=g).to(device())
        e.grad = torch.zeros(0, device=device())
        grad = torch.randn(90, 70, generator=g).to(device())
        t.grad = torch.empty_strided(t.shape, t.stride(), device=device()).copy_(grad)
        u.grad = grad.clone()
        opt.step()
        ou.step()
    assert opt.state[c]["exp_avg_codes"].numel() == 6000  # the real view: two values per element
    assert not torch.equal(c.detach(), c0)
    assert opt.state[e]["step"].item() == 3
    torch.testing.assert_close(t.detach(), u.detach(), **TOL[torch.float32])
    assert not torch.equal(t.detach(), init.t())


@pytest.mark.parametrize("cls", [Adam8bit, AdamW8bit])
def test_refusals_at_construction(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="does not support amsgrad"):
        cls([p], amsgrad=True)
    with pytest.raises(ValueError, match="does not support amsgrad"):
        cls([p]).add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], amsgrad=True))
    for dtype in (torch.float64, torch.complex128):
        with pytest.raises(TypeError, match=r"\['params'\]\[1\] has dtype %s; %s steps" % (str(dtype)[6:],
                                                                                           cls.__name__)):
            cls([p, torch.nn.Parameter(torch.zeros(3, dtype=dtype))])
    with pytest.raises(ValueError, match="min_8bit_size must be an int >= 1"):
        cls([p], min_8bit_size=0)

    class ShardLike(torch.Tensor):  # what the optimizers take for a DTensor: a subclass with a device mesh
        device_mesh = None

    with pytest.raises(TypeError, match=r"\['params'\]\[0\] is a DTensor"):
        cls([torch.zeros(3).as_subclass(ShardLike)])


def test_opcheck():
    s = make_state([300, 5], torch.bfloat16, True, seed=13)
    s["master_params"][1] = None
    masters = [m for m in s["master_params"] if m is not None]
    args = (s["params"], s["grads"], s["exp_avg_codes"], s["exp_avg_scales"], s["exp_avg_sq_codes"],
            s["exp_avg_sq_scales"], masters, [m is not None for m in s["master_params"]], s["steps"], 1e-2, 0.9,
            0.999, 1e-8, 0.1, False, True, None, None)
    torch.library.opcheck(torch.ops.effops.adam8bit_step.default, args)
