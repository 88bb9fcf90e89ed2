"""effops::adam_step on every backend against the reference step (effops/reference/adam.py).

The reference itself is checked against torch.optim in tests/test_optim_adam.py; every backend here,
the plain ATen route (`reference`) included, is checked against the Python reference. Tolerances:
fp32 results to TOL[fp32]; bf16/fp16 stored values to ROUNDED_ONCE (the kernels compute in fp32 and
round once when storing, so they sit within one unit in the last place of the reference: tight enough
that a kernel which never stores exp_avg_sq, or skips decoupled weight decay, fails). The Triton
interpreter truncates instead of rounding when it stores bf16 (the GPU rounds): also within one ulp.
"""

import pytest
import torch

import effops
from effops import _backends
from effops.ops import adam_step  # through the package first: the public function
from effops.reference import adam as reference
from tests.conftest import ROUNDED_ONCE, TOL, device, run_at_every_cpu_level

# (param dtype, master weights): every storage combination the kernels have.
CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
         (torch.float16, True)]
SIZES = [97, 1, 0, 2053, 8, 31]  # not multiples of 8 lanes or 2048-element blocks; 0 must be skipped
OPTIONS = {
    # lr * weight_decay = 2%: more than one bf16 ulp, so a kernel skipping the decay fails in bf16 too
    "adamw": dict(weight_decay=2.0, decoupled_weight_decay=True),
    "adam_l2_amsgrad": dict(weight_decay=0.05, amsgrad=True),
    "maximize_scaled": dict(maximize=True, grad_scale=4.0),
    "plain_low_beta1": dict(beta1=0.3, beta2=0.9),  # lerp weight >= 0.5 takes torch's other formula
}


def make_state(sizes, dtype, master, amsgrad, seed=0, dev=None):
    """Random params/grads/moments as a step in the middle of training would see them."""
    g = torch.Generator().manual_seed(seed)
    dev = dev or device()
    sdtype = torch.float32 if master else dtype
    rnd = lambda n, scale=1.0: (torch.randn(n, generator=g) * scale)  # noqa: E731
    s = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], max_exp_avg_sqs=[], master_params=[], steps=[])
    for n in sizes:
        master_p = rnd(n)
        s["params"].append(master_p.to(dtype).to(dev))
        s["master_params"].append(master_p.to(dev) if master else None)
        s["grads"].append(rnd(n).to(dtype).to(dev))
        s["exp_avgs"].append(rnd(n, 0.1).to(sdtype).to(dev))
        v = rnd(n, 0.01).square()
        s["exp_avg_sqs"].append(v.to(sdtype).to(dev))
        if amsgrad:
            s["max_exp_avg_sqs"].append((v * 1.5).to(sdtype).to(dev))
        s["steps"].append(torch.tensor(float(3 + len(s["steps"]))))
    if not amsgrad:
        s["max_exp_avg_sqs"] = None
    if not master:
        s["master_params"] = None
    return s


def drop_master(s, i):
    """Param i steps without a master copy: its moments take the param's dtype."""
    s["master_params"][i] = None
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        if s[key] is not None:
            s[key][i] = s[key][i].to(s["params"][i].dtype)


def clone_state(s):
    return {k: None if v is None else [None if t is None else t.clone() for t in v] for k, v in s.items()}


def run_step(s, backend, options):
    options = dict(options)
    if options.get("grad_scale") is not None:
        options["grad_scale"] = torch.tensor(options["grad_scale"])
    if options.get("found_inf") is not None:
        options["found_inf"] = torch.tensor(options["found_inf"])
    ctx = effops.use_backend(backend) if backend else _null()
    with ctx:
        adam_step(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["steps"], lr=1e-2,
                  max_exp_avg_sqs=s["max_exp_avg_sqs"], master_params=s["master_params"], **options)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
             decoupled_weight_decay=False)


def reference_step(s, options):
    """The definition of correct on state s: effops/reference/adam.py, then the step counts advanced."""
    options = dict(HYPER, **options)
    n = len(s["params"])
    with torch.no_grad():
        reference.adam_step(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max_exp_avg_sqs"] or [],
                            s["master_params"] or [None] * n, [t.item() + 1 for t in s["steps"]], lr=1e-2, **options)
    for t in s["steps"]:
        t.add_(1)


def assert_state_close(got, want):
    for key in want:
        if want[key] is None:
            continue
        for a, b in zip(got[key], want[key]):
            if b is None:
                assert a is None
                continue
            tol = ROUNDED_ONCE.get(b.dtype) or TOL.get(b.dtype) or {}
            torch.testing.assert_close(a, b, **tol, msg=lambda m: "%s: %s" % (key, m))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype,master", CASES, ids=[("%s%s" % (str(d)[6:], "+master" if m else "")) for d, m in CASES])
def test_matches_reference(backend, dtype, master, option):
    options = OPTIONS[option]
    s = make_state(SIZES, dtype, master, options.get("amsgrad", False))
    want = clone_state(s)
    reference_step(want, options)
    run_step(s, backend, options)
    assert_state_close(s, want)
    assert [t.item() for t in s["steps"]] == [4.0 + i for i in range(len(SIZES))]
    # The step really moved the params (a kernel doing nothing would fail above, but say it plainly).
    assert not torch.equal(s["params"][0], make_state(SIZES, dtype, master, False)["params"][0])


def test_mixed_dtype_list(backend):
    """One call over fp32, bf16 with a master copy, and fp16 without: each gets its own storage types."""
    parts = [make_state([33], torch.float32, False, True, 1), make_state([1025], torch.bfloat16, True, True, 2),
             make_state([7], torch.float16, False, True, 3)]
    s = {k: [] for k in parts[0]}
    for part in parts:
        for k in s:
            s[k] += part[k] if part[k] is not None else [None] * len(part["params"])
    want = clone_state(s)
    opts = dict(weight_decay=0.01, decoupled_weight_decay=True, amsgrad=True)
    reference_step(want, opts)
    run_step(s, backend, opts)
    assert_state_close(s, want)


def test_many_small_tensors_one_call(backend):
    s = make_state([3 + (i * 7) % 29 for i in range(300)], torch.float32, False, False, 5)
    want = clone_state(s)
    reference_step(want, OPTIONS["adamw"])
    run_step(s, backend, OPTIONS["adamw"])
    assert_state_close(s, want)


def test_dense_non_contiguous_layout_is_stepped(backend):
    """A transposed param whose grad and state share its strides is dense: kernels walk it flat."""
    base = make_state([6 * 35], torch.float32, False, False, 7)
    s = {k: None if v is None else [t if t.dim() == 0 else t.reshape(6, 35).t() for t in v] for k, v in base.items()}
    assert not s["params"][0].is_contiguous()
    want = clone_state(s)
    want = {k: None if v is None else [t if t.dim() == 0 else t.t().contiguous().t() for t in v] for k, v in want.items()}
    reference_step(want, OPTIONS["adamw"])
    run_step(s, backend, OPTIONS["adamw"])
    assert_state_close(s, want)


def test_strided_param_declined_by_kernels_and_right_automatically():
    def strided():
        base = make_state([2 * 97], torch.float32, False, False, 8)
        return {k: None if v is None else [t if t.dim() == 0 else t[::2] for t in v] for k, v in base.items()}

    s = strided()
    if effops.backends()["cpu"] and device().type == "cpu":
        with pytest.raises(effops.BackendError, match="declines.*dense"):
            run_step(s, "cpu", OPTIONS["adamw"])
        assert s["steps"][0].item() == 3.0  # declined before anything was touched
    want = clone_state(s)
    reference_step(want, OPTIONS["adamw"])
    with _backends.record_choices() as tally:
        run_step(s, None, OPTIONS["adamw"])  # automatic choice: the plain ATen route
    assert tally["adam_step"] == {"reference": 1}
    assert_state_close(s, want)


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_found_inf_reaches_the_chosen_kernel(backend, found):
    """GradScaler's flag on every backend: 0 steps (the gradients unscaled in the kernel), anything else
    skips the step whole, after the backend was chosen (the call is counted against it)."""
    s = make_state([97, 5, 0], torch.bfloat16, True, True, 9)
    drop_master(s, 1)
    before = clone_state(s)
    want = clone_state(s)
    reference_step(want, dict(amsgrad=True, weight_decay=0.1, grad_scale=8.0))
    with _backends.record_choices() as tally:
        run_step(s, backend, dict(amsgrad=True, weight_decay=0.1, grad_scale=8.0, found_inf=found))
    assert tally["adam_step"] == {backend: 1}
    if found:
        for key in s:
            for a, b in zip(s[key], before[key]):
                assert (a is None and b is None) or torch.equal(a, b), key
    else:
        assert_state_close(s, want)


def test_empty_lists_and_zero_size_params(backend):
    with _backends.record_choices() as tally:
        adam_step([], [], [], [], [], lr=1e-2)  # nothing to step: no error, no kernel
    assert not tally
    s = make_state([0, 0], torch.float32, False, True, 16)
    run_step(s, backend, dict(amsgrad=True))
    assert [t.item() for t in s["steps"]] == [4.0, 5.0]  # the counts advance, as torch's do


def test_failed_step_changes_nothing():
    s = make_state([97, 13], torch.float32, False, False, 10)
    before = clone_state(s)
    s["exp_avgs"][1] = s["exp_avgs"][1].double()  # wrong dtype in the second tensor
    with pytest.raises(TypeError, match=r"exp_avgs\[1\] must have dtype"):
        run_step(s, None, OPTIONS["adamw"])
    assert torch.equal(s["params"][0], before["params"][0]) and s["steps"][0].item() == before["steps"][0].item()
    if effops.backends()["cpu"] and device().type == "cpu":
        s = make_state([97], torch.float32, False, False, 10)
        s["params"][0] = s["params"][0][::1]
        s["grads"][0] = torch.randn(2 * 97)[::2]  # not dense: the forced cpu kernel declines
        with pytest.raises(effops.BackendError):
            run_step(s, "cpu", OPTIONS["adamw"])
        assert s["steps"][0].item() == before["steps"][0].item()


@pytest.mark.parametrize("forced", [None, "reference"])
def test_leaves_that_require_grad_step_outside_no_grad(forced):
    # A functional call outside torch.no_grad on params (and step counts) that require grad, as a
    # hand-written training loop has them: the step is not recorded by autograd and runs whole (the
    # reference path wrote the moments, then failed on the param: a half-done step).
    s = make_state([97, 13], torch.float32, False, False, 11)
    s["params"] = [t[::1].detach().clone().requires_grad_() if i == 0 else
                   torch.randn(2 * 13, device=device())[::2].requires_grad_() for i, t in enumerate(s["params"])]
    s["steps"] = [t.detach().clone().requires_grad_() for t in s["steps"]]
    want = {k: None if v is None else [t.detach().clone() for t in v] for k, v in s.items()}
    reference_step(want, OPTIONS["adamw"])
    run_step(s, forced, OPTIONS["adamw"])
    assert_state_close({k: None if v is None else [t.detach() for t in v] for k, v in s.items()}, want)
    assert all(p.grad_fn is None for p in s["params"])


@pytest.mark.parametrize("change,error,match", [
    (lambda s: s["grads"].pop(), ValueError, "grads must have one entry per param"),
    (lambda s: s["grads"].__setitem__(0, s["grads"][0][:5]), ValueError, r"grads\[0\] must have shape"),
    (lambda s: s["grads"].__setitem__(0, s["grads"][0].half()), TypeError, r"grads\[0\] must have dtype"),
    (lambda s: s["params"].__setitem__(0, s["params"][0].long()), TypeError, r"params\[0\] must have dtype"),
    (lambda s: s["steps"].__setitem__(0, torch.zeros(2)), ValueError, r"steps\[0\] must be a 1-element"),
    (lambda s: s.__setitem__("master_params", [torch.zeros(97, device=device()), None]), ValueError,
     "only for bf16/fp16"),
    (lambda s: s["grads"].__setitem__(0, torch.zeros(97).to_sparse()), RuntimeError, "sparse gradients"),
])
def test_bad_inputs(change, error, match):
    s = make_state([97, 3], torch.float32, False, False, 11)
    change(s)
    with pytest.raises(error, match=match):
        run_step(s, None, {})


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "lr must be >= 0"), (dict(beta1=1.0), "beta1 must be"),
                                          (dict(eps=-1e-8), "eps must be"), (dict(lr="x"), "lr must be a float"),
                                          (dict(amsgrad=1), "amsgrad must be a bool")])
def test_bad_hyperparameters(kwargs, match):
    s = make_state([5], torch.float32, False, False, 12)
    kwargs = dict(dict(lr=1e-3), **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        adam_step(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["steps"], **kwargs)


@pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")
def test_cpu_every_level_matches_reference():
    """Every instruction-set level this CPU runs (the scalar body included) against the reference."""
    code = (
        "import torch, effops, json\n"
        "from effops import _ext\n"
        "from tests.test_adam_step import make_state, clone_state, run_step, reference_step, assert_state_close, OPTIONS, CASES\n"
        "assert torch.ops.effops_cpu.cpu_isa() == LEVEL\n"
        "for dtype, master in CASES:\n"
        "    for opt in OPTIONS.values():\n"
        "        s = make_state([97, 8, 0, 13], dtype, master, opt.get('amsgrad', False), dev=torch.device('cpu'))\n"
        "        want = clone_state(s)\n"
        "        reference_step(want, opt)\n"
        "        run_step(s, 'cpu', opt)\n"
        "        assert_state_close(s, want)\n"
        "")
    run_at_every_cpu_level(code)


def _op_args(s, options):
    masters = [m for m in s["master_params"] or [] if m is not None]
    has_master = [m is not None for m in s["master_params"] or [None] * len(s["params"])]
    return (s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], s["max_exp_avg_sqs"] or [], masters, has_master,
            s["steps"], 1e-2, 0.9, 0.999, 1e-8,
            options.get("weight_decay", 0.0), options.get("amsgrad", False), False, True, None, None)


def test_opcheck():
    s = make_state([97, 5], torch.bfloat16, True, True, 13)
    drop_master(s, 1)  # a param without a master copy beside one with
    torch.library.opcheck(torch.ops.effops.adam_step.default, _op_args(s, dict(amsgrad=True, weight_decay=0.1)))


def test_torch_compile_fullgraph_no_graph_break():
    from torch._dynamo.utils import counters

    s = make_state([97, 5], torch.bfloat16, True, False, 14)
    drop_master(s, 1)
    want = clone_state(s)
    run_step(want, None, OPTIONS["adamw"])

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=1e-2, **OPTIONS["adamw"],
                  master_params=[s["master_params"][0], None])

    torch._dynamo.reset()
    counters.clear()
    torch.compile(step, fullgraph=True, backend="aot_eager")(s["params"], s["grads"], s["exp_avgs"],
                                                             s["exp_avg_sqs"], s["steps"])
    assert sum(counters["graph_break"].values()) == 0
    assert_state_close(s, want)


def test_autocast_does_not_change_the_step():
    """The step is no forward computation: autocast must neither cast its tensors nor change results."""
    s = make_state([97, 13], torch.float32, False, False, 15)
    want = clone_state(s)
    run_step(want, None, OPTIONS["adamw"])
    with torch.autocast(device().type, dtype=torch.bfloat16):
        run_step(s, None, OPTIONS["adamw"])
    assert all(p.dtype == torch.float32 for p in s["params"])
    assert_state_close(s, want)


@pytest.mark.parametrize("under_mode", [False, True])
def test_version_counters_bumped(under_mode):
    """Eager fast path (one C++ bump) and the custom-op path alike: autograd must see the in-place step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    p = torch.randn(5, requires_grad=True)
    w = p.detach()  # shares p's version counter
    saved = (w * 1.0).requires_grad_()
    y = saved * w  # saves w for backward
    g, m, v, s = torch.randn(5), torch.zeros(5), torch.zeros(5), torch.tensor(0.0)
    before = [t._version for t in (w, g, m, v, s)]
    if under_mode:
        with Watch():
            adam_step([w], [g], [m], [v], [s], lr=1e-2)
    else:
        adam_step([w], [g], [m], [v], [s], lr=1e-2)
    assert all(t._version > b for t, b in zip((w, g, m, v, s), before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
