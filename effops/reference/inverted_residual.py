"""Reference: the inverted-residual block (MobileNetV2/V3, MNASNet, EfficientNet) with plain PyTorch. The
definition of correct.

    e = act(conv1x1(x, expand_weight, expand_bias))          skipped when expand_weight is None (e = x)
    d = act(depthwise(e, dw_weight, dw_bias, stride, padding))
    d = d * squeeze_excitation(d)                            when se_reduce_weight is given (below)
    y = conv1x1(d, project_weight, project_bias) [+ x]       residual: stride 1 and out channels == in

Squeeze-excitation (MobileNetV3, EfficientNet; torchvision.ops.SqueezeExcitation):
    g = se_gate(conv1x1(se_act(conv1x1(mean_hw(d), se_reduce_weight, se_reduce_bias)),
                        se_expand_weight, se_expand_bias))   one value per image and channel
with se_reduce_weight (squeeze, hidden, 1, 1), se_expand_weight (hidden, squeeze, 1, 1); se_activation
one of the block's activations ("relu" in MobileNetV3, "silu" in EfficientNet), se_gate "hardsigmoid"
(MobileNetV3) or "sigmoid" (EfficientNet).

Shapes follow nn.Conv2d: x (N, Cin, H, W); expand_weight (Ch, Cin, 1, 1); dw_weight (Ch, 1, kh, kw);
project_weight (Cout, Ch, 1, 1); biases (channels,). A BatchNorm after a conv is folded into that conv's
weight and bias before it gets here. One activation for both places, as in every network above; its
values at +-inf and NaN are those of effops.reference.dwpw_conv2d.activate (_AT_INFINITY). The output
takes x's memory format (channels_last in, channels_last out).
"""
import torch
import torch.nn.functional as F

from effops.reference.dwpw_conv2d import ACTIVATIONS, activate, memory_format

__all__ = ["ACTIVATIONS", "SE_GATES", "inverted_residual"]

SE_GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def inverted_residual(x, expand_weight, expand_bias, dw_weight, dw_bias, project_weight, project_bias,
                      stride=(1, 1), padding=(1, 1), activation="relu6", residual=False, se_reduce_weight=None,
                      se_reduce_bias=None, se_expand_weight=None, se_expand_bias=None, se_activation="relu",
                      se_gate="hardsigmoid"):
    e = x if expand_weight is None else activate(F.conv2d(x, expand_weight, expand_bias), activation)
    d = activate(F.conv2d(e, dw_weight, dw_bias, stride, padding, groups=e.shape[1]), activation)
    if se_reduce_weight is not None:
        pooled = d.mean((2, 3), keepdim=True)
        squeezed = activate(F.conv2d(pooled, se_reduce_weight, se_reduce_bias), se_activation)
        d = d * SE_GATES[se_gate](F.conv2d(squeezed, se_expand_weight, se_expand_bias))
    y = F.conv2d(d, project_weight, project_bias)
    if residual:
        y = y + x
    return y.contiguous(memory_format=memory_format(x))
