"""effops.nn.SeparableConv2d against the two-conv block people write by hand."""
import pytest
import torch
import torch.nn as nn

from effops.nn import SeparableConv2d
from conftest import TOL, device

# The ops these tests run, for conftest: a backend with no kernel for them is not offered (an instance
# that could run on no machine).
BACKEND_OPS = ("dwpw_conv2d",)

ACTS = {None: nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(), "silu": nn.SiLU(),
        "hardswish": nn.Hardswish()}


def two_conv_block(cin, cout, k, stride, padding, dilation, bias, activation):
    return nn.Sequential(nn.Conv2d(cin, cin, k, stride, padding, dilation, groups=cin, bias=bias), ACTS[activation],
                         nn.Conv2d(cin, cout, 1, bias=bias))


@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,bias,activation", [
    (8, 16, 3, 1, 1, 1, True, "relu"),
    (5, 7, 5, 2, (2, 1), 1, False, "gelu"),
    (6, 3, 4, 1, 0, 2, True, None),
    (7, 9, 3, 2, 1, 1, True, "silu"),
])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_matches_two_conv_block_and_loads_its_state_dict(backend, cin, cout, k, stride, padding, dilation, bias,
                                                         activation, layout):
    torch.manual_seed(0)
    plain = two_conv_block(cin, cout, k, stride, padding, dilation, bias, activation).to(device())
    sep = SeparableConv2d(cin, cout, k, stride, padding, dilation, bias, activation).to(device())
    state = {k.replace("0.", "depthwise.").replace("2.", "pointwise."): v for k, v in plain.state_dict().items()}
    sep.load_state_dict(state)
    x = torch.randn(2, cin, 9, 8, device=device())
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    if backend == "triton" and x.numel() > 300:
        x = x[:1, :, :7, :7].detach().requires_grad_()
    y, want = sep(x), plain(x)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    gy = torch.randn_like(want)
    got = torch.autograd.grad(y, [x, *sep.parameters()], gy)
    ref = torch.autograd.grad(want, [x, *plain.parameters()], gy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_from_convs_shares_parameters():
    dw, pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1)
    sep = SeparableConv2d.from_convs(dw, pw, activation="relu6")
    assert sep.depthwise.weight is dw.weight and sep.pointwise.weight is pw.weight
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(sep(x), pw(nn.functional.relu6(dw(x))), **TOL[torch.float32])
    assert (sep.in_channels, sep.out_channels) == (4, 6)


def test_from_convs_rejects_what_it_cannot_run():
    pw = nn.Conv2d(4, 6, 1)
    with pytest.raises(ValueError, match="groups == in_channels"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 4, 3), pw)
    with pytest.raises(ValueError, match="groups == in_channels"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 6, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), pw)
    with pytest.raises(ValueError, match="1x1"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 3))
    with pytest.raises(ValueError, match="in_channels 5"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(5, 6, 1))
    with pytest.raises(ValueError, match="activation"):
        SeparableConv2d.from_convs(nn.Conv2d(4, 4, 3, groups=4), pw, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        SeparableConv2d(4, 6, activation="tanh")
    with pytest.raises(TypeError, match="padding"):
        SeparableConv2d(4, 6, padding="same")


def test_module_bf16_and_repr():
    sep = SeparableConv2d(6, 10, 3, padding=1, dtype=torch.bfloat16)
    x = torch.randn(1, 6, 7, 7, dtype=torch.bfloat16)
    y = sep(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 10, 7, 7)
    assert "activation='relu'" in repr(sep)


def test_unbatched_input_and_channel_count_error():
    torch.manual_seed(0)
    sep = SeparableConv2d(8, 16, 3, padding=1)
    x = torch.randn(8, 5, 6)
    torch.testing.assert_close(sep(x), sep(x.unsqueeze(0))[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        sep(torch.randn(1, 7, 5, 5))


@pytest.mark.parametrize("edit", [
    lambda m: setattr(m.depthwise, "padding_mode", "circular"),
    lambda m: setattr(m.pointwise, "stride", (2, 2)),
    lambda m: setattr(m.pointwise, "padding", (1, 1)),
])
def test_submodule_settings_the_op_cannot_run_raise_after_a_memo(edit):
    # The fused op runs zero-padded depthwise + plain 1x1 convs: a submodule edited into something else
    # must not run as before (it gave the old block's output, or a wrong shape).
    sep = SeparableConv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    sep(x)
    edit(sep)
    with pytest.raises(ValueError, match="cannot run its convs"):
        sep(x)


def test_meta_device_answers_shapes():
    sep = SeparableConv2d(4, 6, 3, stride=2, padding=1, device="meta")
    y = sep(torch.empty(2, 4, 9, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 6, 5, 4)
