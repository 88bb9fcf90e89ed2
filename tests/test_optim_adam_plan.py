"""The optimizer's eager CPU fast path (effops/optim/_adam_plan.py, csrc/bindings/adam_plan.cpp).

After a checked step the optimizer steps through a cached plan. Each test runs the same training
twice, once stepping through the plan and once with the plan dropped before every step (so every
step takes the checked path), and requires bit-identical params and state: both run the same kernel
with the same coefficients. Between steps the tests change what the plan caches (which params have
gradients, dtypes, groups, the state) and check that the plan notices.
"""
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import effops
from effops import _backends
from effops.optim import Adam, AdamW
from tests.conftest import device

pytestmark = pytest.mark.skipif(not effops.backends()["cpu"] or device().type != "cpu",
                                reason="the plan is the eager path of the cpu backend")


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 31), torch.nn.Tanh(),
                            torch.nn.Linear(31, 5))
    return m.to(dtype=dtype)


def backward(model, i):
    g = torch.Generator().manual_seed(i)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 13, generator=g).to(dtype), torch.randn(16, 5, generator=g).to(dtype)
    F.mse_loss(model(x), y).backward()


class Checked:
    """Wraps an optimizer so that every step takes the checked path (the plan dropped first)."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        self.opt._plan = None
        self.opt.step()


def state_tensors(opt):
    return [t for s in opt.state.values() for t in s.values()]


def assert_same(model_a, opt_a, model_b, opt_b):
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    sa, sb = state_tensors(opt_a), state_tensors(opt_b)
    assert len(sa) == len(sb)
    for s, t in zip(sa, sb):
        assert s.dtype == t.dtype and torch.equal(s, t)


def twin_run(make_opt, steps, between=None, dtype=torch.float32):
    """Train two identical models, one through the plan; `between(i, model, opt)` runs after step i's
    backward, before its optimizer step, in both. Returns (planned model, its optimizer)."""
    runs = []
    for checked in (False, True):
        model = mlp(dtype)
        opt = make_opt(model)
        stepper = Checked(opt) if checked else opt
        used_plan = 0
        for i in range(steps):
            opt.zero_grad()
            backward(model, i)
            if between is not None:
                between(i, model, opt)
            used_plan += opt._plan is not None
            stepper.step()
        runs.append((model, opt, used_plan))
    (ma, oa, used), (mb, ob, _) = runs
    assert used > 0, "the plan never ran"
    assert_same(ma, oa, mb, ob)
    return ma, oa


@pytest.mark.parametrize("kw", [dict(), dict(amsgrad=True, weight_decay=0.1), dict(maximize=True, betas=(0.8, 0.99)),
                                dict(lr=torch.tensor(2e-3))], ids=["defaults", "amsgrad_wd", "maximize", "tensor_lr"])
def test_plan_matches_checked_path(kw):
    twin_run(lambda m: AdamW(m.parameters(), **dict(dict(lr=1e-3), **kw)), 6)


def test_plan_with_groups_coupled_decay_and_master_weights():
    def make(m):
        return Adam([dict(params=m[0].parameters(), lr=2e-3, weight_decay=0.1),
                     dict(params=m[2].parameters(), amsgrad=True),
                     dict(params=m[4].parameters(), betas=(0.5, 0.9), maximize=True)], lr=1e-3, master_weights=True)
    _, opt = twin_run(make, 6, dtype=torch.bfloat16)
    assert all(s["master_param"].dtype == torch.float32 for s in opt.state.values())


def test_plan_follows_params_gaining_and_losing_gradients():
    def between(i, model, opt):
        if i % 3 == 1:
            model[2].weight.grad = None  # skipped this step, back the next
        if i < 3:
            model[4].bias.grad = None  # no gradient (so no state) before step 3
    model, opt = twin_run(lambda m: AdamW(m.parameters(), lr=1e-3), 8, between)
    assert opt.state[model[4].bias]["step"].item() == 5
    assert opt.state[model[2].weight]["step"].item() == 8 - 3


def test_plan_follows_lr_and_hyper_parameter_changes():
    def between(i, model, opt):
        opt.param_groups[0]["lr"] = 1e-3 * (i + 1)
        opt.param_groups[0]["betas"] = (0.9 - 0.05 * i, 0.999)
        opt.param_groups[0]["amsgrad"] = i >= 3  # switched on: max_exp_avg_sq created
    twin_run(lambda m: AdamW(m.parameters(), lr=1e-3), 6, between)


def test_plan_follows_add_param_group_and_dtype_change():
    def make(m):
        return AdamW(list(m[0].parameters()) + list(m[2].parameters()), lr=1e-3)

    def between(i, model, opt):
        if i == 2:
            opt.add_param_group(dict(params=list(model[4].parameters()), weight_decay=0.3))
        if i == 4:
            # The params change dtype in place (same Parameter objects, gradients converted too):
            # the state follows.
            model.to(torch.bfloat16)
    model, opt = twin_run(make, 7, between)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16


def test_plan_after_load_state_dict():
    a, b = mlp(), mlp()
    oa, ob = AdamW(a.parameters(), lr=1e-3), AdamW(b.parameters(), lr=1e-3)
    for i in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            backward(m, i)
            o.step()
    assert oa._plan is not None
    # Load b's state into a fresh-state copy: the plan must not keep stepping the old state tensors.
    b_sd = copy.deepcopy(ob.state_dict())  # (torch's loader keeps same-dtype tensors: no sharing)
    a.load_state_dict(b.state_dict())
    oa.load_state_dict(b_sd)
    assert oa._plan is None
    for i in range(3, 6):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            backward(m, i)
            o.step()
    assert_same(a, oa, b, ob)
    assert oa.state[next(iter(a.parameters()))]["step"].item() == 6


def test_errors_after_plan_are_the_checked_paths_and_touch_nothing():
    model = mlp()
    opt = AdamW([dict(params=model[0].parameters()), dict(params=model[4].parameters())], lr=1e-3)
    for i in range(2):
        opt.zero_grad()
        backward(model, i)
        opt.step()
    assert opt._plan is not None
    before = [p.detach().clone() for p in model.parameters()] + [t.clone() for t in state_tensors(opt)]

    def unchanged():
        after = [p.detach() for p in model.parameters()] + state_tensors(opt)
        return all(torch.equal(x, y) for x, y in zip(before, after))

    model[4].bias.grad_dtype = None  # (allows a gradient of another dtype)
    model[4].bias.grad = model[4].bias.grad.double()
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        opt.step()
    assert unchanged()
    model[4].bias.grad = model[4].bias.grad.float()
    opt.param_groups[1]["eps"] = "small"
    with pytest.raises(TypeError, match="eps must be a float"):
        opt.step()
    assert unchanged()
    opt.param_groups[1]["eps"] = 1e-8
    opt.param_groups[1]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        opt.step()
    assert unchanged()


def test_plan_bumps_version_counters_and_releases_gradients():
    model = mlp()
    opt = AdamW(model.parameters(), lr=1e-3)
    for i in range(2):
        opt.zero_grad()
        backward(model, i)
        opt.step()
    opt.zero_grad()
    backward(model, 2)
    p = model[0].weight
    state = opt.state[p]
    tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]]
    before = [t._version for t in tensors]
    assert opt._plan is not None
    opt.step()
    assert all(t._version > v for t, v in zip(tensors, before))
    # zero_grad(set_to_none=True) frees the gradients: the plan holds no reference to them.
    # (A tensor held from C++ keeps its Python object alive, so the weak reference tells.)
    del tensors
    grad = weakref.ref(p.grad)
    opt.zero_grad()
    assert grad() is None


def test_sparse_gradient_after_plan_is_the_same_error():
    emb = torch.nn.Embedding(10, 3)
    opt = AdamW(emb.parameters())
    for _ in range(2):
        opt.zero_grad()
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()
    emb.weight.grad = emb.weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_no_plan_where_the_op_would_not_run_the_cpu_kernel():
    model = mlp()
    opt = AdamW(model.parameters(), lr=1e-3)
    with effops.use_backend("reference"):
        for i in range(2):
            opt.zero_grad()
            backward(model, i)
            opt.step()
        assert opt._plan is None
    with _backends.record_choices() as tally:
        opt.zero_grad()
        backward(model, 3)
        opt.step()
    assert tally["adam_step"] == {"cpu": 1}


def test_plan_and_checked_path_count_steps_alike_past_float32_precision():
    """float32 step counts stop growing at 2**24 (torch: step_t += 1 in float32): both paths agree."""
    def between(i, model, opt):
        if i == 1:
            for s in opt.state.values():
                s["step"].fill_(2.0 ** 24 - 2)
    model, opt = twin_run(lambda m: AdamW(m.parameters(), lr=1e-3), 5, between)
    assert all(s["step"].item() == 2.0 ** 24 for s in opt.state.values())
