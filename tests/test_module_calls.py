"""Repeated calls through the modules and the functional ops, with one thing changed between them (a
mask edited in place, grad mode, a dtype, a setting, the layout, a copy, a move, a trace). Each test
compares with the reference computed afresh: nothing an op derives may outlive the call that derived
it, except the modules' explicit state, which must follow every change made through the module."""
import copy
import gc
import weakref
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effops
from effops.nn import SeparableConv2d, SparseLinear
from effops.reference import dwpw_conv2d as dwpw_reference
from tests.conftest import TOL

needs_cpu = pytest.mark.skipif(not effops.backends()["cpu"], reason="cpu backend not built")


def _sparse_layer(features=48, sparsity=0.75, seed=0):
    torch.manual_seed(seed)
    return SparseLinear.from_linear(nn.Linear(features, features), torch.rand(features, features) >= sparsity)


def _masked_expected(layer, x):
    return F.linear(x, layer.weight * layer.mask.to(layer.weight.dtype), layer.bias)


def _separable(activation="relu"):
    torch.manual_seed(1)
    return SeparableConv2d(6, 10, 3, padding=1, activation=activation)


def _separable_expected(m, x):
    dw, pw = m.depthwise, m.pointwise
    return dwpw_reference.dwpw_conv2d(x, dw.weight, pw.weight, dw.bias, pw.bias, dw.stride, dw.padding, dw.dilation,
                                      m.activation)


@pytest.mark.parametrize("training", [False, True])
def test_mask_edited_in_place_between_calls(training):
    # The mask's density steers the choice and its cached forms (W * mask, the mask in weight's dtype)
    # must follow an in-place edit. The weights are left as they are (no set_mask), so the old mask's
    # kept weights show in a stale W * mask, and a stale mask in the gradient's.
    layer = _sparse_layer()
    x = torch.randn(5, 48)
    with torch.set_grad_enabled(training):
        layer(x)
        layer.mask.copy_(torch.rand(48, 48) >= 0.5)
        y = layer(x)
        torch.testing.assert_close(y, _masked_expected(layer, x), **TOL[torch.float32])
    if training:
        gy = torch.randn_like(y)
        y.backward(gy)
        torch.testing.assert_close(layer.weight.grad, (gy.t() @ x) * layer.mask, **TOL[torch.float32])


def test_mask_replaced_by_another_tensor():
    layer = _sparse_layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        layer(x)
        layer.mask = torch.rand(48, 48) >= 0.5
        layer.weight.mul_(layer.mask)  # keep pruned weights at zero, as set_mask would
        torch.testing.assert_close(layer(x), _masked_expected(layer, x), **TOL[torch.float32])


def _block_sparse_mask():
    """A 90% block-32 mask of a 256 -> 512 layer: the cpu block kernel's, at 64 rows."""
    torch.manual_seed(3)
    return (torch.rand(16, 8) < 0.1).repeat_interleave(32, 0).repeat_interleave(32, 1)


def test_grad_mode_switch_between_calls():
    layer = _sparse_layer()
    x = torch.randn(5, 48, requires_grad=True)
    with torch.no_grad():
        layer(x)
    layer(x).square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    F.linear(xr, w * layer.mask.float(), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])
    torch.testing.assert_close(layer.weight.grad, w.grad * layer.mask, **TOL[torch.float32])  # masked gradient


def test_weight_data_swapped_to_another_dtype_between_calls():
    # `.data =` keeps the Parameter object (and x's dtype is unchanged): only the tensor's dtype and
    # pointer show the change, and the op's check must see it.
    layer = _sparse_layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        layer(x)
        layer.weight.data = layer.weight.data.bfloat16()
        with pytest.raises(TypeError, match="weight must have dtype"):
            layer(x)


def test_requires_grad_switched_on_between_calls():
    # Nothing required a gradient on the first call. A parameter that now requires one must get the op's
    # autograd (the masked gradient).
    layer = SparseLinear.from_linear(nn.Linear(256, 512), _block_sparse_mask())
    layer.requires_grad_(False)
    x = torch.randn(64, 256)
    layer(x)
    layer.weight.requires_grad_(True)
    y = layer(x)
    assert y.grad_fn is not None
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(layer.weight.grad, (gy.t() @ x) * layer.mask, atol=1e-4, rtol=1e-4)


@needs_cpu
def test_autocast_between_calls():
    # The cpu kernel ran in x's dtype on the first call: autocast must reach the op's cast.
    layer = SparseLinear.from_linear(nn.Linear(256, 512), _block_sparse_mask())
    x = torch.randn(64, 256)
    with torch.no_grad():
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _masked_expected(layer, x), atol=0.1, rtol=0.02)  # 256-term bf16 sums


def test_separable_settings_changed_between_calls():
    m = _separable("relu")
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        m(x)
        m.activation = "gelu"
        torch.testing.assert_close(m(x), _separable_expected(m, x), atol=1e-4, rtol=1e-4)
        m.depthwise.stride = (2, 2)
        y = m(x)
    assert y.shape == (2, 10, 5, 4)
    torch.testing.assert_close(y, _separable_expected(m, x), atol=1e-4, rtol=1e-4)


def test_separable_setting_list_edited_in_place_between_calls():
    m = _separable()
    m.depthwise.stride = [1, 1]
    x = torch.randn(1, 6, 8, 8)
    with torch.no_grad():
        m(x)
        m.depthwise.stride[0] = 2
        y = m(x)
    assert y.shape == (1, 10, 4, 8)
    torch.testing.assert_close(y, _separable_expected(m, x), atol=1e-4, rtol=1e-4)


def test_separable_layout_change_between_calls():
    m = _separable()
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        m(x)
        y = m(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _separable_expected(m, x), atol=1e-4, rtol=1e-4)


def test_non_strided_or_meta_input_gets_the_ops_answer():
    layer = _sparse_layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        layer(x)
        torch.testing.assert_close(layer(x.to_sparse_csr()), layer(x))  # the op takes it (reference)
        with pytest.raises(ValueError, match="weight must be on meta"):
            layer(x.to("meta"))


def test_torch_func_transforms_over_modules():
    # torch.func wraps tensors the key cannot describe and differentiates torch's ops, not our kernels:
    # model ensembles (vmap over stacked parameters), gradients with respect to parameters, and
    # forward-mode jvp through the cpu kernel's shape all give the reference's answers.
    from torch.func import functional_call, grad, jvp, stack_module_state, vmap
    torch.manual_seed(7)
    models = [SeparableConv2d(4, 8, 3, padding=1) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        models[0](x)  # an eager call on the first model first
        expected = torch.stack([_separable_expected(m, x) for m in models])
    got = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    sparse = [_sparse_layer(16, seed=s) for s in range(3)]  # masks too are stacked (buffers)
    sparse_params, sparse_buffers = stack_module_state(sparse)
    sparse_base = copy.deepcopy(sparse[0]).to("meta")
    x16 = torch.randn(4, 16)
    got = vmap(lambda p, b: functional_call(sparse_base, (p, b), (x16,)))(sparse_params, sparse_buffers)
    torch.testing.assert_close(got, torch.stack([_masked_expected(m, x16) for m in sparse]), **TOL[torch.float32])

    layer = _sparse_layer()
    xs = torch.randn(4, 48)
    weights = {k: v.detach() for k, v in layer.named_parameters()}
    g = grad(lambda p: functional_call(layer, p, (xs,)).square().sum())(weights)
    w = layer.weight.detach().clone().requires_grad_()
    F.linear(xs, w * layer.mask.float(), layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(g["weight"], w.grad, **TOL[torch.float32])

    if effops.backends()["cpu"]:
        big = SparseLinear.from_linear(nn.Linear(256, 512), _block_sparse_mask())
        xb, tb = torch.randn(64, 256), torch.randn(64, 256)
        with torch.no_grad():
            big(xb)
        _, tangent = jvp(big, (xb,), (tb,))
        torch.testing.assert_close(tangent, F.linear(tb, big.weight * big.mask), atol=1e-4, rtol=1e-4)


def test_copies_and_pickles_answer_for_themselves():
    layer = _sparse_layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        before = layer(x)
        twin = copy.deepcopy(layer)
        twin.weight.mul_(2)
        torch.testing.assert_close(twin(x), _masked_expected(twin, x), **TOL[torch.float32])
        torch.testing.assert_close(layer(x), before, atol=0, rtol=0)
        loaded = pickle.loads(pickle.dumps(layer))
        torch.testing.assert_close(loaded(x), before, atol=0, rtol=0)


def test_bad_input_still_raises_between_calls():
    layer = _sparse_layer()
    with torch.no_grad():
        layer(torch.randn(5, 48))
        with pytest.raises(ValueError, match="last dim"):
            layer(torch.randn(5, 47))
        with pytest.raises(TypeError):
            layer([1.0] * 48)
        with pytest.raises(TypeError):
            layer(torch.randn(5, 48, dtype=torch.float64))


def test_compile_after_eager_calls():
    layer = _sparse_layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), eager, **TOL[torch.float32])


def test_moving_a_module_frees_the_old_buffers():
    # .to() replaces the buffers: nothing derived from the old ones may keep them alive.
    layer = _sparse_layer()
    with torch.no_grad():
        layer(torch.randn(5, 48))
    old_mask = weakref.ref(layer.mask)
    layer.to("meta")
    gc.collect()
    assert old_mask() is None


# ---------------------------------------------------------------------------------------------
# The functional ops: no module, so nothing of the mask may be kept between calls.
# ---------------------------------------------------------------------------------------------
def _masked_tensors(features=48, seed=0):
    torch.manual_seed(seed)
    return torch.randn(features, features), (torch.rand(features, features) >= 0.75), torch.randn(features)


@pytest.mark.parametrize("training", [False, True])
def test_functional_mask_edited_in_place(training):
    # As for the module: the op must follow an in-place edit of the mask.
    w, mask, b = _masked_tensors()
    w.requires_grad_(training)
    x = torch.randn(5, 48)
    with torch.set_grad_enabled(training):
        effops.ops.masked_linear(x, w, mask, b)
        mask.copy_(torch.rand(48, 48) >= 0.5)
        y = effops.ops.masked_linear(x, w, mask, b)
        torch.testing.assert_close(y, F.linear(x, w.detach() * mask, b), **TOL[torch.float32])
    if training:
        gy = torch.randn_like(y)
        y.backward(gy)
        torch.testing.assert_close(w.grad, (gy.t() @ x) * mask, **TOL[torch.float32])


def test_functional_settings_keep_their_types():
    # 1 == True == 1.0 in Python: stride=True or padding=1.0 must not pass as 1.
    torch.manual_seed(5)
    x, dw, pw = torch.randn(1, 4, 7, 7), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    with pytest.raises(ValueError, match="pattern"):
        effops.ops.masked_linear(torch.randn(2, 48), *_masked_tensors(), pattern="blocks")


def test_functional_settings_and_shapes_between_calls():
    torch.manual_seed(6)
    x, dw, pw = torch.randn(2, 4, 9, 8), torch.randn(4, 1, 3, 3), torch.randn(6, 4, 1, 1)
    for stride, activation in [(1, None), (2, None), (2, "gelu"), (1, "gelu")]:
        got = effops.ops.dwpw_conv2d(x, dw, pw, stride=stride, padding=1, activation=activation)
        want = dwpw_reference.dwpw_conv2d(x, dw, pw, None, None, [stride] * 2, [1, 1], [1, 1], activation)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    cl = x.contiguous(memory_format=torch.channels_last)
    assert effops.ops.dwpw_conv2d(cl, dw, pw, padding=1).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="x's spatial size"):
        effops.ops.dwpw_conv2d(x[..., :1, :1], dw, pw)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_jit_trace_records_the_op(grad):
    # torch.jit.trace after eager calls: the graph must hold the op itself, never a W * mask frozen into it
    # as a constant (a traced module given new weights must compute with them).
    torch.manual_seed(0)
    cases = [(SparseLinear(16, 8), torch.randn(3, 16), "effops::masked_linear"),
             (SeparableConv2d(4, 8, 3, padding=1, activation="relu"), torch.randn(2, 4, 6, 6), "effops::dwpw_conv2d")]
    for module, x, op in cases:
        module.eval()
        with torch.set_grad_enabled(grad):
            module(x), module(x)  # eager calls first
            traced = torch.jit.trace(module, x)
            assert op in [n.kind() for n in traced.graph.nodes()]
            torch.testing.assert_close(traced(x), module(x))
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(1.5)
            traced.load_state_dict(module.state_dict())
            torch.testing.assert_close(traced(x), module(x))

