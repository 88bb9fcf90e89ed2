"""bf16 stochastic rounding in the Adam step: AdamW(bf16_stochastic_round=True) and adam_step's
stochastic_round_seeds, every backend against effops/reference/stochastic_round.py.

The CPU kernel and the plain ATen route draw the same bits as the reference and round the same fp32
value, so their params are bit-identical to the reference's (bf16 moments are stored rounded to
nearest by all). The Triton interpreter stores bf16 truncated (tests/test_adam_step.py): its bf16
moments drift from the reference's, so it is held to the bf16 tolerance.
"""
import pytest
import torch

import effops
from effops.ops import adam_step
from effops.optim import Adam, AdamW
from effops.reference import adam as reference
from effops.reference import stochastic_round as sr
from tests.conftest import TOL, device, run_at_every_cpu_level


def test_rounding_is_unbiased_with_the_discarded_bits_as_probability():
    lo = torch.tensor(1.0)
    ulp = 2.0 ** -7  # bf16's spacing in [1, 2)
    for frac in (0.1, 0.5, 0.9):
        x = torch.full((200_000,), 1.0 + frac * ulp)
        out = sr.round_to_bf16(x, seed=12345).float()
        assert set(out.unique().tolist()) == {1.0, 1.0 + ulp}
        up = (out > lo).float().mean().item()
        assert abs(up - frac) < 0.01, (frac, up)  # 200k draws: standard deviation below 0.0012
    # negative values: rounded away from zero with the same probability; exact values unchanged
    neg = sr.round_to_bf16(torch.full((100_000,), -(1.0 + 0.25 * ulp)), seed=1).float()
    assert abs((neg < -1.0).float().mean().item() - 0.25) < 0.01
    exact = torch.tensor([0.0, 1.0, -2.5, float("inf")])
    assert torch.equal(sr.round_to_bf16(exact, seed=3).float(), exact)
    assert torch.isnan(sr.round_to_bf16(torch.tensor([float("nan")]), seed=3)).all()
    # another seed, other bits
    assert not torch.equal(sr.round_to_bf16(torch.full((1000,), 1.0 + 0.5 * ulp), 1),
                           sr.round_to_bf16(torch.full((1000,), 1.0 + 0.5 * ulp), 2))


def _run(backend, seeds, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    sizes = (1, 37, 1000, 8)
    ps = [torch.randn(n, generator=g).to(dtype).to(device()) for n in sizes]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    for k in range(3):
        grads = [torch.randn(p.shape, generator=g).to(dtype).to(device()) for p in ps]
        step_seeds = [s + k if s >= 0 else -1 for s in seeds]
        if backend is None:  # the definition: effops/reference/adam.py
            with torch.no_grad():
                reference.adam_step(ps, grads, m, v, [], [None] * len(ps), [k + 1.0] * len(ps), lr=1e-3, beta1=0.9,
                                    beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
                                    decoupled_weight_decay=True, stochastic_round_seeds=step_seeds)
            continue
        with effops.use_backend(backend):
            adam_step(ps, grads, m, v, steps, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True,
                      stochastic_round_seeds=step_seeds)
    return ps


def test_every_backend_rounds_as_the_reference(backend):
    seeds = [5, 77, 123456789, -1]  # the last one rounds to nearest
    got, want = _run(backend, seeds), _run(None, seeds)
    nearest = _run(None, [-1] * 4)
    for a, b in zip(got, want):
        if backend == "triton":
            # The interpreter truncates its bf16 moment stores; over three steps a param off by that much
            # may round the other way at each step: a few ulps, the bf16 tolerance.
            torch.testing.assert_close(a, b, **TOL[torch.bfloat16])
        else:
            assert torch.equal(a, b)
    assert not torch.equal(want[2], nearest[2])  # stochastic differs from nearest ...
    assert torch.equal(want[3], nearest[3])      # ... and seed -1 is nearest


def test_cpu_every_level_rounds_as_the_reference():
    if not effops.backends()["cpu"]:
        pytest.skip("cpu kernel not built")
    run_at_every_cpu_level(
        "import torch\n"
        "from tests.test_stochastic_round import _run\n"
        "seeds = [5, 77, 123456789, -1]\n"
        "for a, b in zip(_run('cpu', seeds), _run('reference', seeds)):\n"
        "    assert torch.equal(a, b)\n")


def test_updates_below_bf16_resolution_stall_to_nearest_and_progress_stochastically():
    """p = 1 in bf16 (spacing 2^-7), Adam's step about lr = 1e-3 per step: rounded to nearest the
    param never moves; rounded stochastically it follows the fp32 trajectory on average."""
    ends = {}
    for name, kw in (("nearest", {}), ("stochastic", dict(bf16_stochastic_round=True))):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16, device=device()))
        opt = AdamW([p], lr=1e-3, weight_decay=0.0, **kw)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        ends[name] = p.detach().float()
    q = torch.nn.Parameter(torch.ones(4096, device=device()))
    opt = AdamW([q], lr=1e-3, weight_decay=0.0)
    for _ in range(100):
        q.grad = torch.ones_like(q)
        opt.step()
    assert torch.equal(ends["nearest"], torch.ones(4096, device=device()))
    assert abs(ends["stochastic"].mean().item() - q.detach().mean().item()) < 2e-3  # fp32: 0.9


def test_reproducible_per_step_and_param():
    def train(seed_model):
        torch.manual_seed(seed_model)
        model = torch.nn.Linear(64, 64).to(device=device(), dtype=torch.bfloat16)
        opt = Adam(model.parameters(), lr=1e-3, bf16_stochastic_round=True)
        x = torch.randn(16, 64, device=device(), dtype=torch.bfloat16)
        for _ in range(5):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
        return torch.cat([p.detach().float().flatten() for p in model.parameters()])
    assert torch.equal(train(0), train(0))


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="master_weights=True"):
        AdamW([p], master_weights=True, bf16_stochastic_round=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['bf16_stochastic_round'\]"):
        AdamW([p]).add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], master_weights=True,
                                        bf16_stochastic_round=True))
    f = torch.zeros(4)
    with pytest.raises(ValueError, match=r"stochastic_round_seeds\[0\]: stochastic rounding is for bf16"):
        adam_step([f], [f.clone()], [f.clone()], [f.clone()], [torch.tensor(0.0)], lr=1e-3,
                  stochastic_round_seeds=[1])
    with pytest.raises(ValueError, match=r"stochastic_round_seeds must be None or one int per param"):
        adam_step([f], [f.clone()], [f.clone()], [f.clone()], [torch.tensor(0.0)], lr=1e-3,
                  stochastic_round_seeds=[1, 2])


def test_fp32_params_beside_are_untouched_by_the_option():
    a32, b32 = torch.nn.Parameter(torch.ones(50)), torch.nn.Parameter(torch.ones(50))
    a16 = torch.nn.Parameter(torch.ones(50, dtype=torch.bfloat16))
    oa = AdamW([a32, a16], lr=1e-2, bf16_stochastic_round=True)
    ob = AdamW([b32], lr=1e-2)
    for _ in range(3):
        a32.grad, b32.grad, a16.grad = torch.ones(50), torch.ones(50), torch.ones(50, dtype=torch.bfloat16)
        oa.step()
        ob.step()
    assert torch.equal(a32.detach(), b32.detach())


def test_opcheck_with_seeds():
    from tests.test_adam_step import _op_args, make_state
    s = make_state([97, 5], torch.bfloat16, False, False, 13)
    torch.library.opcheck(torch.ops.effops.adam_step.default, _op_args(s, dict(weight_decay=0.1)) + ([3, -1],))


def test_switching_it_on_mid_training_takes_effect_on_the_next_step():
    p = torch.nn.Parameter(torch.ones(512, dtype=torch.bfloat16, device=device()))
    opt = AdamW([p], lr=1e-3, weight_decay=0.0)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(p.detach(), torch.ones_like(p))  # updates below bf16's resolution: nothing moves
    opt.param_groups[0]["bf16_stochastic_round"] = True
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    assert p.detach().float().mean().item() < 0.995  # nearest rounding alone would have stayed at 1.0
