"""The Triton forward of effops.ops.inverted_residual with squeeze-excitation (triton_kernels/inverted_residual.py:
the means pass, the gate in torch, the forward with d scaled) against the float64 reference.

On CPU tensors the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), at Python speed:
small shapes, chosen so that the output pixels span several BLOCK_P blocks (several partial sums per
image) and the hidden channels several BLOCK_H chunks. With EFFOPS_TEST_DEVICE=cuda the same tests run the
compiled kernels on the GPU.
"""
import pytest
import torch

import effops
from effops import _backends, _ext
from effops.ops import inverted_residual
from conftest import TOL, device
from test_inverted_residual_se import expected, make_se

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(not _ext.load(), reason="effops._C not built: %s" % _ext.reason()),
    pytest.mark.skipif(not _backends.runs_on("triton", device().type),
                       reason="triton cannot run on %s tensors here" % device().type),
]

# ((N, Cin, hidden, Cout, H, W, kernel, stride, activation, residual), squeeze, se activation, gate); hidden
# is Cin without expansion. N = 2 where the gates of two images must not mix.
CASES = [
    ((2, 8, 40, 8, 6, 7, 3, 1, "hardswish", True), 10, "relu", "hardsigmoid"),  # MobileNetV3
    ((2, 5, 20, 12, 5, 6, 5, 2, "silu", False), 5, "silu", "sigmoid"),  # EfficientNet
    ((1, 6, 36, 6, 9, 8, 3, 1, "relu", True), 9, "silu", "hardsigmoid"),
    ((2, 4, 24, 7, 7, 6, 3, 2, "relu6", False), 4, "relu", "sigmoid"),
]
IDS = ["%s_k%d_s%d%s_%s_%s" % (c[8], c[6], c[7], "_res" if c[9] else "", a, g) for c, _, a, g in CASES]
VARIANTS = [("channels_last", True, torch.float32), ("nchw", True, torch.float32),
            ("channels_last", False, torch.float32), ("channels_last", True, torch.float16),
            ("nchw", False, torch.float16)]
VARIANT_IDS = ["cl", "nchw", "noexpand", "fp16", "fp16_nchw_noexpand"]


def on_device(tensors):
    return [None if t is None else t.to(device()) for t in tensors]


def triton_op(tensors, kw):
    """effops.ops.inverted_residual with "triton" forced (the interpreter on CPU tensors)."""
    se = dict(zip(("se_reduce_weight", "se_reduce_bias", "se_expand_weight", "se_expand_bias"), tensors[7:]))
    with effops.use_backend("triton"), _backends.record_choices() as tally:
        y = inverted_residual(*tensors[:7], **kw, **se)
    if device().type == "cpu":  # the C++ CPU implementation counts its route: the Triton one, not a fallback
        assert tally["inverted_residual"] == {"triton": 1}, dict(tally)
    return y


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout, expand, dtype", VARIANTS, ids=VARIANT_IDS)
def test_matches_reference(case, layout, expand, dtype):
    tensors, kw = make_se(*case, dtype=dtype, layout=layout, expand=expand)
    tensors = on_device(tensors)
    got = triton_op(tensors, kw)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected(tensors, kw), **TOL[dtype])
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)


@pytest.mark.parametrize("expand", [True, False], ids=["expand", "noexpand"])
def test_means_pass(expand):
    """The first pass alone: d's per-image, per-channel means (fp32), against the reference's d."""
    from effops.reference.dwpw_conv2d import activate
    from effops.triton_kernels.inverted_residual import inverted_residual_means
    case = (2, 5, 40, 5, 9, 8, 3, 1, "silu", False)  # 72 output pixels: three blocks of 32, the last partial
    tensors, kw = make_se(case, 8, "relu", "sigmoid", expand=expand)
    x, ew, eb, dw, db = on_device(tensors[:5])
    pad = [kw["padding"]] * 2
    got = inverted_residual_means(x, ew, eb, dw, db, [1, 1], pad, "silu")
    t64 = [None if t is None else t.double() for t in (x, ew, eb, dw, db)]
    e = t64[0] if ew is None else activate(torch.nn.functional.conv2d(t64[0], t64[1], t64[2]), "silu")
    d = activate(torch.nn.functional.conv2d(e, t64[3], t64[4], 1, pad, groups=e.shape[1]), "silu")
    assert got.dtype == torch.float32 and got.shape == (2, dw.shape[0])
    torch.testing.assert_close(got.double(), d.mean((2, 3)), **TOL[torch.float32])


def test_the_gate_changes_the_output():
    """The gate reaches the project: the same block without squeeze-excitation gives another answer, and
    each image gets its own gate (swapping the images swaps the outputs)."""
    tensors, kw = make_se(*CASES[0])
    tensors = on_device(tensors)
    se_kw = dict(kw, se_activation="relu", se_gate="hardsigmoid")
    got = triton_op(tensors, se_kw)
    plain_kw = {k: v for k, v in kw.items() if not k.startswith("se_")}
    with effops.use_backend("triton"):
        plain = inverted_residual(*tensors[:7], **plain_kw)
    assert (got - plain).abs().max() > 0.1
    swapped = triton_op([tensors[0].flip(0)] + tensors[1:], se_kw)
    torch.testing.assert_close(swapped, got.flip(0), **TOL[torch.float32])
