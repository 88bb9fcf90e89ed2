"""effops.optim.Adam / AdamW as drop-ins for torch.optim.Adam / AdamW.

Parity: 200 steps of a small MLP against torch.optim.AdamW/Adam(foreach=False). On the reference
backend the numbers are bit-identical (same ops in the same order). The compiled kernels match
torch's fused CPU/GPU kernels in technique (FMA placement, IEEE sqrt) but torch's CPU sqrt goes
through MKL (up to 0.75 ulp), so they differ by float32 rounding per step; the stated tolerance is
atol=rtol=1e-5 after 200 steps at lr=1e-3 (measured: below 5e-7, the same as torch's own
fused=True against foreach=False). One configuration that amplifies rounding is judged against
torch's own drift instead (test_parity_on_a_rounding_sensitive_configuration).
"""
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F

import effops
from effops import _backends
from effops.optim import Adam, AdamW
from tests.conftest import TOL, device

PARITY_TOL = dict(atol=1e-5, rtol=1e-5)
STEPS = 200


@pytest.fixture(autouse=True)
def one_thread():
    """These runs are thousands of tiny ops: on a shared 2-core machine, OpenMP thread teams made
    them 10x slower. The multi-threaded kernel path is covered in test_adam_step.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 31), torch.nn.Tanh(),
                            torch.nn.Linear(31, 5))
    return m.to(device=device(), dtype=dtype)


def data(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(64, 13, generator=g).to(device(), dtype), torch.randn(64, 5, generator=g).to(device(), dtype))


def train(model, opt, steps, scheduler=None, x_y=None, skip_param=None):
    x, y = x_y or data(dtype=next(model.parameters()).dtype)
    # maximize=True climbs -loss: the same well-behaved problem (an unbounded climb would amplify
    # float32 rounding into large differences between any two correct implementations).
    sign = -1.0 if opt.param_groups[0].get("maximize") else 1.0
    for i in range(steps):
        opt.zero_grad()
        (sign * F.mse_loss(model(x + 0.01 * i), y)).backward()
        if skip_param is not None:
            skip_param.grad = None  # a param without a gradient this step is skipped
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def flat(model):
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def groups(model, per_group):
    layers = [model[0], model[2], model[4]]
    return [dict(params=list(layer.parameters()), **kw) for layer, kw in zip(layers, per_group)]


COMBOS = {
    "defaults": dict(),
    "amsgrad_wd": dict(amsgrad=True, weight_decay=0.1),
    "maximize_eps_betas": dict(maximize=True, eps=1e-6, betas=(0.9, 0.99)),
    "all": dict(amsgrad=True, maximize=True, weight_decay=0.05, betas=(0.9, 0.995)),
    "tensor_lr": dict(lr=torch.tensor(1e-3)),
}


def _parity_backends():
    names = ["reference"] + (["cpu"] if effops.backends()["cpu"] and device().type == "cpu" else [])
    if device().type == "cuda":
        names += [b for b in ("cuda", "triton") if effops.backends()[b]]
    return names


@pytest.mark.parametrize("backend_name", _parity_backends())
@pytest.mark.parametrize("adamw,combo", [(True, c) for c in COMBOS] + [(False, "amsgrad_wd"), (False, "all")],
                         ids=["AdamW-" + c for c in COMBOS] + ["Adam-amsgrad_wd", "Adam-all"])
def test_parity_200_steps(backend_name, combo, adamw):
    kw = dict(dict(lr=1e-3), **COMBOS[combo])
    ours_cls, torch_cls = (AdamW, torch.optim.AdamW) if adamw else (Adam, torch.optim.Adam)
    a, b = mlp(), mlp()
    with effops.use_backend(backend_name):
        train(a, ours_cls(a.parameters(), **kw), STEPS)
    train(b, torch_cls(b.parameters(), foreach=False, **kw), STEPS)
    if backend_name == "reference" and combo != "tensor_lr":  # torch does tensor-lr math in float32
        assert torch.equal(flat(a), flat(b))
    else:
        torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    assert not torch.equal(flat(a), flat(mlp()))


def test_parity_on_a_rounding_sensitive_configuration():
    """With betas=(0.8, 0.99) this training amplifies float32 rounding: torch's own fused=True and
    foreach=False end 3e-4 apart after 200 steps. There the yardstick is torch's own drift: ours
    may be no farther from foreach=False than twice that drift plus 1e-4."""
    kw = dict(lr=1e-3, betas=(0.8, 0.99))
    single, fused, ours = mlp(), mlp(), mlp()
    train(single, torch.optim.AdamW(single.parameters(), foreach=False, **kw), STEPS)
    train(fused, torch.optim.AdamW(fused.parameters(), fused=True, **kw), STEPS)
    train(ours, AdamW(ours.parameters(), **kw), STEPS)
    drift = (flat(fused) - flat(single)).abs().max().item()
    assert (flat(ours) - flat(single)).abs().max().item() <= 2 * drift + 1e-4


@pytest.mark.skipif(not effops.backends()["triton"], reason="triton cannot run here")
def test_parity_triton_short():
    """Triton through the optimizer (20 steps: the interpreter is slow)."""
    a, b = mlp(), mlp()
    with effops.use_backend("triton"):
        train(a, AdamW(a.parameters(), lr=1e-3, amsgrad=True), 20)
    train(b, torch.optim.AdamW(b.parameters(), lr=1e-3, amsgrad=True, foreach=False), 20)
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)


def test_param_groups_none_grads_and_add_param_group():
    per_group = [dict(lr=2e-3, weight_decay=0.0), dict(betas=(0.7, 0.9), amsgrad=True), dict(weight_decay=0.3)]
    a, b = mlp(), mlp()
    oa = AdamW(groups(a, per_group[:2]), lr=1e-3)
    ob = torch.optim.AdamW(groups(b, per_group[:2]), lr=1e-3, foreach=False)
    train(a, oa, 30, skip_param=a[2].bias)
    train(b, ob, 30, skip_param=b[2].bias)
    oa.add_param_group(dict(params=list(a[4].parameters()), **per_group[2]))
    ob.add_param_group(dict(params=list(b[4].parameters()), **per_group[2]))
    train(a, oa, 30)
    train(b, ob, 30)
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    assert oa.state[a[2].bias]["step"].item() == 30 and oa.state[a[4].weight]["step"].item() == 30


def test_follows_gradients_and_hyper_parameters_changing_between_steps():
    """Every step gathers the params that have a gradient now, with the group's settings now: a param
    losing and regaining its gradient, lr and betas edited by hand, as torch's own AdamW follows them."""
    def run(model, opt):
        x, y = data()
        for i in range(8):
            opt.zero_grad()
            F.mse_loss(model(x + 0.01 * i), y).backward()
            if i % 3 == 1:
                model[2].weight.grad = None
            if i < 3:
                model[4].bias.grad = None
            opt.param_groups[0]["lr"] = 1e-3 * (i + 1)
            opt.param_groups[0]["betas"] = (0.9 - 0.05 * i, 0.999)
            opt.step()
    a, b = mlp(), mlp()
    oa = AdamW(a.parameters(), lr=1e-3)
    run(a, oa)
    run(b, torch.optim.AdamW(b.parameters(), lr=1e-3, foreach=False))
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    assert oa.state[a[4].bias]["step"].item() == 5 and oa.state[a[2].weight]["step"].item() == 8 - 3


def test_one_op_call_per_group_bumping_versions_and_holding_no_gradient():
    model = mlp()
    opt = AdamW([dict(params=model[0].parameters()), dict(params=model[4].parameters(), lr=2e-3)], lr=1e-3)
    train(model, opt, 2)
    x, y = data()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    p = model[0].weight
    state = opt.state[p]
    tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]]
    before = [t._version for t in tensors]
    with _backends.record_choices() as tally:
        opt.step()
    expected = "cpu" if device().type == "cpu" and effops.backends()["cpu"] else None
    if expected:
        assert tally["adam_step"] == {expected: 2}
    assert all(t._version > v for t, v in zip(tensors, before))
    del tensors
    grad = weakref.ref(p.grad)
    opt.zero_grad()  # set_to_none frees the gradients: nothing kept them
    assert grad() is None


def test_a_bad_hyper_parameter_or_gradient_names_itself():
    model = mlp()
    opt = AdamW([dict(params=model[0].parameters()), dict(params=model[4].parameters())], lr=1e-3)
    train(model, opt, 2)
    before = flat(model).clone()
    model[4].bias.grad_dtype = None  # (allows a gradient of another dtype)
    model[4].bias.grad = model[4].bias.grad.double()
    opt.param_groups[0]["params"], opt.param_groups[1]["params"] = opt.param_groups[1]["params"], \
        opt.param_groups[0]["params"]  # the bad gradient in the first group called: nothing stepped yet
    with pytest.raises(TypeError, match=r"grads\[1\] must have dtype float32"):
        opt.step()
    assert torch.equal(flat(model), before)
    model[4].bias.grad = model[4].bias.grad.float()
    opt.param_groups[1]["eps"] = "small"
    with pytest.raises(TypeError, match="eps must be a float"):
        opt.step()
    opt.param_groups[1]["eps"] = 1e-8
    opt.param_groups[1]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        opt.step()
    assert torch.equal(flat(model), before)


def test_float32_step_counts_stop_where_torchs_do():
    """float32 step counts stop growing at 2**24 (torch: step_t += 1 in float32)."""
    a, b = mlp(), mlp()
    oa, ob = AdamW(a.parameters(), lr=1e-3), torch.optim.AdamW(b.parameters(), lr=1e-3, foreach=False)
    train(a, oa, 1)
    train(b, ob, 1)
    for opt in (oa, ob):
        for s in opt.state.values():
            s["step"].fill_(2.0 ** 24 - 2)
    train(a, oa, 3)
    train(b, ob, 3)
    assert all(s["step"].item() == 2.0 ** 24 for s in oa.state.values())
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)


def test_lr_schedulers_unchanged():
    """OneCycleLR moves lr and beta1 every step; ReduceLROnPlateau-free chain of two schedulers."""
    def run(opt_cls, model, **kw):
        opt = opt_cls(model.parameters(), lr=1e-3, **kw)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=60)
        train(model, opt, 60, scheduler=sched)
        return opt
    a, b = mlp(), mlp()
    oa, ob = run(AdamW, a), run(torch.optim.AdamW, b, foreach=False)
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]


def test_sparse_gradient_is_a_clear_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        AdamW(emb.parameters()).step()


def test_bad_constructor_arguments():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for kw, match in [(dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
                      (dict(eps=-1.0), "epsilon"), (dict(weight_decay=-1.0), "weight_decay"),
                      (dict(capturable=True), "capturable")]:
        with pytest.raises(ValueError, match=match):
            AdamW(p, **kw)


def test_bad_param_group_settings_raise_where_the_group_is_added():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    for kw, error, match in [(dict(lr="x"), TypeError, r"param_groups\[1\]\['lr'\]"),
                             (dict(betas=(0.9,)), ValueError, r"param_groups\[1\]\['betas'\] must be a pair"),
                             (dict(betas=(0.9, 1.0)), ValueError, r"\['betas'\] must be >= 0 and < 1"),
                             (dict(eps="1e-8"), TypeError, r"\['eps'\]"),
                             (dict(amsgrad=2), TypeError, r"\['amsgrad'\] must be a bool")]:
        with pytest.raises(error, match=match):
            AdamW([{"params": [p]}, {"params": [q], **kw}])
        opt = AdamW([p])
        with pytest.raises(error, match=match):
            opt.add_param_group({"params": [q], **kw})
        assert len(opt.param_groups) == 1  # not left half-added
    opt = AdamW([p], amsgrad=1)  # torch takes any truthy flag: 0/1 become bools
    assert opt.param_groups[0]["amsgrad"] is True
    # numpy scalars, as torch's AdamW takes them (a config loaded with numpy), step as floats do
    import numpy as np
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    mine = AdamW([a], lr=np.float32(1e-2), eps=np.float32(1e-8), weight_decay=np.float32(0.01), amsgrad=np.bool_(True))
    ref = torch.optim.AdamW([b], lr=1e-2, eps=float(np.float32(1e-8)), weight_decay=float(np.float32(0.01)),
                            amsgrad=True)
    for _ in range(3):
        a.grad, b.grad = torch.full((5,), 0.5), torch.full((5,), 0.5)
        mine.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), **PARITY_TOL)


def test_a_failing_group_leaves_every_group_untouched():
    a = mlp()
    opt = AdamW(groups(a, [dict(), dict(), dict()]), lr=1e-3)
    train(a, opt, 3)
    x, y = data()
    opt.zero_grad()
    F.mse_loss(a(x), y).backward()
    opt.param_groups[2]["lr"] = -1.0  # the last group is invalid
    before = flat(a).clone()
    steps = [s["step"].item() for s in opt.state.values()]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.step()
    assert torch.equal(flat(a), before)
    assert steps == [s["step"].item() for s in opt.state.values()]


# ---------------------------------------------------------------------------------------------
# Checkpoints both ways
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["effops_to_torch", "torch_to_effops"])
def test_checkpoint_both_ways_continues_with_same_numbers(direction, tmp_path):
    kw = dict(lr=1e-3, amsgrad=True, weight_decay=0.02)
    first, second = (AdamW, torch.optim.AdamW) if direction == "effops_to_torch" else (torch.optim.AdamW, AdamW)
    a = mlp()
    opt = first(a.parameters(), **kw)
    train(a, opt, 50)
    torch.save(dict(model=a.state_dict(), opt=opt.state_dict()), tmp_path / "ckpt.pt")
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].device.type == "cpu"

    # Resume in the other implementation, and in the same one, from the file: same numbers after 50 more.
    resumed = []
    for cls in (second, first):
        ck = torch.load(tmp_path / "ckpt.pt")
        m = mlp(seed=5)
        m.load_state_dict(ck["model"])
        o = cls(m.parameters(), **kw)
        o.load_state_dict(ck["opt"])
        train(m, o, 50)
        resumed.append(flat(m))
    torch.testing.assert_close(resumed[0], resumed[1], **PARITY_TOL)


# ---------------------------------------------------------------------------------------------
# GradScaler (fused protocol) and master weights
# ---------------------------------------------------------------------------------------------
def test_grad_scaler_fused_protocol_and_inf_skip():
    assert AdamW([torch.nn.Parameter(torch.zeros(1))])._step_supports_amp_scaling
    a, b = mlp(), mlp()
    oa = AdamW(a.parameters(), lr=1e-3)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3, foreach=False)
    sa, sb = torch.amp.GradScaler(device().type, init_scale=1024.0), torch.amp.GradScaler(device().type,
                                                                                       init_scale=1024.0)
    x, y = data()
    for i in range(12):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            s.scale(F.mse_loss(m(x + 0.01 * i), y)).backward()
            if i == 5:  # an overflow: the step must be skipped and the scale lowered
                m[0].weight.grad[0, 0] = float("inf")
            if m is a and i == 5:
                before = (flat(a).clone(), [(st["step"].item(), st["exp_avg"].clone()) for st in oa.state.values()])
            s.step(o)
            s.update()
            if m is a and i == 5:
                assert torch.equal(flat(a), before[0])
                for st, (step, exp_avg) in zip(oa.state.values(), before[1]):
                    assert st["step"].item() == step and torch.equal(st["exp_avg"], exp_avg)
    assert sa.get_scale() == sb.get_scale() == 512.0
    assert all(st["step"].item() == 11 for st in oa.state.values())
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    # Gradients are left unscaled, as torch's fused Adam leaves them.
    torch.testing.assert_close(a[0].weight.grad, b[0].weight.grad, **PARITY_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_match_fp32_training_on_the_same_gradients(dtype):
    """bf16/fp16 model + master_weights == torch AdamW on fp32 copies fed the same (low-precision)
    gradients, with the params the rounded masters."""
    low = mlp(dtype)
    high = [p.detach().float().clone().requires_grad_() for p in low.parameters()]
    opt = AdamW(low.parameters(), lr=1e-3, master_weights=True, weight_decay=0.01)
    ref = torch.optim.AdamW(high, lr=1e-3, weight_decay=0.01, foreach=False)
    x, y = data(dtype=dtype)
    for i in range(30):
        opt.zero_grad()
        F.mse_loss(low(x + 0.01 * i), y).backward()
        for h, p in zip(high, low.parameters()):
            h.grad = p.grad.float()
        opt.step()
        ref.step()
    for h, p in zip(high, low.parameters()):
        st = opt.state[p]
        assert st["master_param"].dtype == st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(st["master_param"], h.detach(), **PARITY_TOL)
        assert torch.equal(p.detach(), st["master_param"].to(dtype))


def test_master_weights_checkpoints():
    low = mlp(torch.bfloat16)
    opt = AdamW(low.parameters(), lr=1e-3, master_weights=True)
    train(low, opt, 5)
    sd = opt.state_dict()
    assert sd["state"][0]["master_param"].dtype == torch.float32
    # effops -> effops: masters and moments stay fp32 (torch's loader alone would cast them to bf16).
    o2 = AdamW(low.parameters(), lr=1e-3, master_weights=True)
    o2.load_state_dict(sd)
    for p in low.parameters():
        assert o2.state[p]["master_param"].dtype == o2.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(o2.state[p]["master_param"], opt.state[p]["master_param"], atol=0, rtol=0)
    # effops -> torch: loads (moments cast to bf16, the master ignored) and steps.
    ot = torch.optim.AdamW(low.parameters(), lr=1e-3)
    ot.load_state_dict(sd)
    train(low, ot, 1)
    # torch -> effops with master_weights: masters are created from the params on the next step.
    o3 = AdamW(low.parameters(), lr=1e-3, master_weights=True)
    o3.load_state_dict(ot.state_dict())
    train(low, o3, 1)
    p0 = next(low.parameters())
    assert o3.state[p0]["master_param"].dtype == torch.float32 and o3.state[p0]["step"].item() == 7
    # A checkpoint of a torch optimizer that never saw effops (its groups have no master_weights key)
    # keeps this optimizer's master_weights=True.
    fresh = mlp(torch.bfloat16)
    plain = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    train(fresh, plain, 2)
    assert "master_weights" not in plain.state_dict()["param_groups"][0]
    o4 = AdamW(fresh.parameters(), lr=1e-3, master_weights=True)
    o4.load_state_dict(plain.state_dict())
    assert o4.param_groups[0]["master_weights"] is True
    train(fresh, o4, 1)
    p0 = next(fresh.parameters())
    assert o4.state[p0]["master_param"].dtype == o4.state[p0]["exp_avg"].dtype == torch.float32
    assert o4.state[p0]["step"].item() == 3


def test_complex_params_step_as_torch_does():
    """torch steps complex params through their real view; so do we."""
    g = torch.Generator().manual_seed(3)
    init = torch.randn(17, dtype=torch.complex64, generator=g).to(device())
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa, ob = AdamW([a], lr=1e-2, amsgrad=True), torch.optim.AdamW([b], lr=1e-2, amsgrad=True, foreach=False)
    for i in range(10):
        grad = torch.randn(17, dtype=torch.complex64, generator=g).to(device())
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), **PARITY_TOL)
    assert not torch.equal(a.detach(), init)


@pytest.mark.parametrize("backend_name", ["auto", "cpu", "reference"])
def test_channels_last_conv_weights_step_as_torch_does(backend_name):
    # A channels_last depthwise weight (C, 1, k, k) and autograd's gradient for it agree on every
    # dimension of size > 1 but not on the stride of the size-1 one: the same memory order, which the
    # kernels' layout check must accept (it raised "must be dense with the param's strides").
    if backend_name == "cpu" and (device().type != "cpu" or not effops.backends()["cpu"]):
        pytest.skip("cpu backend on CPU tensors only")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 1)).to(device())  # NCHW weights, channels_last input
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p, t in zip(model.parameters(), twin):
        t.data = t.data.as_strided(p.shape, p.stride())
    ours, theirs = AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin, lr=1e-2)
    x = torch.randn(2, 8, 6, 6, device=device()).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        model(x).square().mean().backward()
        y = F.conv2d(F.relu(F.conv2d(x, twin[0], twin[1], padding=1, groups=8)), twin[2], twin[3])
        y.square().mean().backward()
        assert model[0].weight.grad.stride() != model[0].weight.stride()  # autograd's size-1 stride differs
        if backend_name == "auto":
            ours.step()
        else:
            with effops.use_backend(backend_name):
                ours.step()
        theirs.step()
        ours.zero_grad(), theirs.zero_grad()
    for p, t in zip(model.parameters(), twin):
        torch.testing.assert_close(p, t, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# torch's full dtype range: float64 and complex128 (torch's optim_db configurations)
# ---------------------------------------------------------------------------------------------
WIDE_CONFIGS = {
    "default": dict(),
    "lr": dict(lr=1e-2),
    "weight_decay": dict(weight_decay=0.1),
    "maximize": dict(weight_decay=0.1, maximize=True),
    "amsgrad": dict(weight_decay=0.1, amsgrad=True),
    "tensor_lr_betas": dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99))),
    "foreach": dict(weight_decay=0.1, foreach=True),
    "grad_none": dict(weight_decay=0.1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.complex64])
@pytest.mark.parametrize("adamw", [True, False], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("config", list(WIDE_CONFIGS))
def test_float64_and_complex_match_torch(config, adamw, dtype):
    """Our optimizer against torch's with the same config, on the same gradients. float64 runs torch's
    foreach=False arithmetic in float64 (the reference route): bit-identical to torch's single-tensor
    path, except where torch does tensor-lr math in the lr tensor's float32 or runs its foreach path."""
    kw = WIDE_CONFIGS[config]
    ours_cls, torch_cls = (AdamW, torch.optim.AdamW) if adamw else (Adam, torch.optim.Adam)
    g = torch.Generator().manual_seed(7)
    shapes = [(1,), (5, 3), (257,)]
    init = [torch.randn(s, generator=g, dtype=dtype).to(device()) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    oa = ours_cls(ours, **kw)
    ob = torch_cls(theirs, **dict(dict(foreach=False), **kw))
    for i in range(15):
        for k, s in enumerate(shapes):
            grad = torch.randn(s, generator=g, dtype=dtype).to(device())
            skip = config == "grad_none" and k == 1 and i % 3 == 0
            ours[k].grad = None if skip else grad.clone()
            theirs[k].grad = None if skip else grad.clone()
        oa.step()
        ob.step()
    exact = dtype == torch.float64 and config not in ("tensor_lr_betas", "foreach") and device().type == "cpu"
    if exact:
        tol = dict(atol=0, rtol=0)
    elif dtype == torch.complex64 or config == "tensor_lr_betas":
        # torch computes a tensor lr's step size in the tensor's float32: float32 rounding of a scalar
        tol = TOL[torch.float32]
    else:
        tol = dict(atol=1e-12, rtol=1e-12)
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        assert not torch.equal(a.detach(), init[0]) or a.numel() != 1
    # Checkpoints carry float64 moments, as torch's do.
    if dtype == torch.float64:
        assert oa.state_dict()["state"][2]["exp_avg"].dtype == torch.float64


def test_float64_beside_fp32_keeps_fp32_on_the_compiled_kernel():
    """A group mixing float64 and fp32 params: the float64 ones run on the reference, the fp32 ones stay
    on the compiled kernel (not the whole group sent to the reference)."""
    if not effops.backends()["cpu"] or device().type != "cpu":
        pytest.skip("needs the cpu kernel")
    a64, a32 = torch.nn.Parameter(torch.ones(9, dtype=torch.float64)), torch.nn.Parameter(torch.ones(9))
    opt = AdamW([a64, a32], lr=1e-2)
    a64.grad, a32.grad = torch.full((9,), 0.5, dtype=torch.float64), torch.full((9,), 0.5)
    with _backends.record_choices() as tally:
        opt.step()
    assert tally["adam_step"] == {"reference": 1, "cpu": 1}
    b64, b32 = torch.nn.Parameter(torch.ones(9, dtype=torch.float64)), torch.nn.Parameter(torch.ones(9))
    ref = torch.optim.AdamW([b64, b32], lr=1e-2, foreach=False)
    b64.grad, b32.grad = a64.grad.clone(), a32.grad.clone()
    ref.step()
    assert torch.equal(a64.detach(), b64.detach())
    torch.testing.assert_close(a32.detach(), b32.detach(), **PARITY_TOL)


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_unsupported_dtypes_are_refused_at_construction_naming_the_dtype(cls):
    good = torch.nn.Parameter(torch.zeros(3))
    for bad, name in [(torch.zeros(3, dtype=torch.int32), "int32"),
                      (torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn)), "float8_e4m3fn"),
                      (torch.zeros(3, dtype=torch.complex32), "complex32")]:
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] has dtype %s" % name):
            cls([good, bad])
        opt = cls([good])
        with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype %s" % name):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("make", ["AdamW", "AdamW8bit"])
def test_a_bad_gradient_in_a_later_group_steps_no_group(make):
    # Each group is one op call; a gradient that does not match its param in the second group must
    # fail the step before the first group moves.
    import effops.optim
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(300, 300)), torch.nn.Parameter(torch.randn(8))
    opt = getattr(effops.optim, make)([{"params": [a]}, {"params": [b], "lr": 0.1}])
    a.grad, b.grad = torch.randn(300, 300), torch.randn(8)
    b.grad.data = torch.randn(9)  # (assigning .grad checks the shape; writing through .data does not)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=r"grads\[0\] must have shape \(8,\)"):
        opt.step()
    assert torch.equal(a, before) and not opt.state[a].get("step", torch.zeros(1)).item()


def test_plain_gathering_matches_the_checked_path_at_every_named_point():
    """The common-case gathering (state read at C speed over the whole list) hands the op the same
    tensors, in the same order, as the per-param checked path: at the first step, with params whose
    gradient is None at some steps, after add_param_group (new params without state), after
    load_state_dict (new state tensors) and after state replaced by hand (moved, as resume code does)."""
    model = mlp()
    opt = AdamW([dict(params=[model[0].weight, model[0].bias, model[2].weight])], lr=1e-3, amsgrad=True)

    def same(group):
        plain = opt._group_lists_plain(group)
        if plain is None:
            return None
        # the checked path, one param at a time, without the plain path
        want = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            s = opt.state[p]
            lists = want.setdefault((p.device, p.dtype == torch.float64), dict(
                params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[], steps=[]))
            for key, t in (("params", p), ("grads", p.grad), ("exp_avgs", s["exp_avg"]),
                           ("exp_avg_sqs", s["exp_avg_sq"]), ("max_exp_avg_sqs", s["max_exp_avg_sq"]),
                           ("steps", s["step"])):
                lists[key].append(t)
        assert plain.keys() == want.keys()
        for key in want:
            for name, tensors in want[key].items():
                assert len(plain[key][name]) == len(tensors)
                assert all(a is b for a, b in zip(plain[key][name], tensors)), name
        return True

    x, y = data()
    F.mse_loss(model(x), y).backward()
    assert opt._group_lists_plain(opt.param_groups[0]) is None  # no state yet: the checked path creates it
    train(model, opt, 2, skip_param=model[0].bias)  # bias: no gradient, no state
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model[0].bias.grad = None
    assert same(opt.param_groups[0])
    model[0].bias.grad = torch.ones_like(model[0].bias)
    assert opt._group_lists_plain(opt.param_groups[0]) is None  # a param with a gradient and no state
    opt.step()
    assert same(opt.param_groups[0])

    opt.add_param_group(dict(params=list(model[4].parameters()), amsgrad=True))
    train(model, opt, 1)
    assert same(opt.param_groups[1])

    saved = opt.state_dict()
    opt.load_state_dict(saved)
    train(model, opt, 1)
    assert same(opt.param_groups[0]) and same(opt.param_groups[1])
    for s in opt.state.values():  # resume code moving the state: the step must read the new tensors
        for k, v in list(s.items()):
            s[k] = v.clone()
    exp_avg = opt.state[model[2].weight]["exp_avg"]
    before = exp_avg.clone()
    train(model, opt, 1)
    assert not torch.equal(exp_avg, before)
    assert same(opt.param_groups[0])


def test_plain_gathering_steps_as_torch_with_gradients_coming_and_going():
    def run(model, opt):
        x, y = data()
        for i in range(12):
            opt.zero_grad()
            F.mse_loss(model(x + 0.01 * i), y).backward()
            for j, p in enumerate(model.parameters()):
                if (i + j) % 4 == 0:
                    p.grad = None
            opt.step()
    a, b = mlp(), mlp()
    oa = AdamW(a.parameters(), lr=1e-3, amsgrad=True)
    run(a, oa)
    run(b, torch.optim.AdamW(b.parameters(), lr=1e-3, amsgrad=True, foreach=False))
    torch.testing.assert_close(flat(a), flat(b), **PARITY_TOL)
    assert oa._group_lists_plain(oa.param_groups[0]) is not None  # the common case took the plain path
