"""InvertedResidual: expand 1x1 -> act -> depthwise k x k -> act -> [squeeze-excitation] -> project 1x1 [+ x]
as one fused op (effops.ops.inverted_residual), the block of MobileNetV2/V3, MNASNet and EfficientNet.

Its parameters live in nn.Conv2d submodules, `expand` (None without expansion), `depthwise` and
`project`, and for squeeze-excitation `se_reduce` and `se_expand` (else None), with biases (a BatchNorm after a conv is folded into it by effops.fuse). The CPU kernel reads
the weights packed in its order: `packed`, a buffer this module builds at named points (construction,
from_convs, load_state_dict, .to() and the like, eval(), and repack()) and passes in eval mode; in train
mode, where the weights change every step, the op reads the weights themselves. After editing weights
in place in eval mode, call repack().
"""
import torch
import torch.nn as nn

from effops.ops.inverted_residual import ACTIVATIONS, SE_GATES, inverted_residual, inverted_residual_pack


class InvertedResidual(nn.Module):
    """expand (in -> hidden, 1x1) -> act -> depthwise (k x k, stride) -> act -> project (hidden -> out, 1x1)
    [+ x when residual].

    activation: None, "relu", "relu6", "gelu" (exact erf form), "silu" or "hardswish", after the expand and
    after the depthwise conv. hidden_channels == in_channels and expand=False: no expand conv (MobileNetV2's
    first block). residual: add x (needs stride 1 and out_channels == in_channels).
    squeeze_channels: a squeeze-excitation block between the depthwise and the project conv (MobileNetV3:
    hidden // 4 rounded to 8, se_activation "relu", se_gate "hardsigmoid"; EfficientNet: in_channels // 4,
    "silu", "sigmoid"); None: none.
    folded_batchnorm: True when effops.fuse folded the BatchNorm statistics of an eval-mode model into the
    weights; such a block refuses .train(), where the original normalizes by batch statistics.
    """

    folded_batchnorm = False

    def __init__(self, in_channels, hidden_channels, out_channels, kernel_size=3, stride=1, activation="relu6",
                 residual=False, expand=True, squeeze_channels=None, se_activation="relu", se_gate="hardsigmoid",
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        expand_conv = nn.Conv2d(in_channels, hidden_channels, 1, **kw) if expand else None
        if not expand and hidden_channels != in_channels:
            raise ValueError("without expand, hidden_channels must equal in_channels, got %d and %d"
                             % (hidden_channels, in_channels))
        depthwise = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, stride, (kernel_size - 1) // 2,
                              groups=hidden_channels, **kw)
        project = nn.Conv2d(hidden_channels, out_channels, 1, **kw)
        se = None
        if squeeze_channels is not None:
            se = (nn.Conv2d(hidden_channels, squeeze_channels, 1, **kw),
                  nn.Conv2d(squeeze_channels, hidden_channels, 1, **kw), se_activation, se_gate)
        self._set(expand_conv, depthwise, project, activation, residual, se)

    @classmethod
    def from_convs(cls, expand, depthwise, project, activation="relu6", residual=False, se=None):
        """A block that uses these convs' parameters (shared, not copied), in the depthwise conv's mode
        (train or eval). expand: a 1x1 nn.Conv2d or None; depthwise: groups == channels, zero padding;
        project: 1x1, stride 1. se: (reduce conv, expand conv, activation, gate) of a squeeze-excitation
        between depthwise and project (1x1 convs hidden -> squeeze -> hidden), or None."""
        reason = check_convs(expand, depthwise, project, se)
        if reason:
            raise ValueError(reason)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.training = depthwise.training  # the mode of the model the convs come from (eval: packed weights)
        self._set(expand, depthwise, project, activation, residual, se)
        return self

    def _set(self, expand, depthwise, project, activation, residual, se=None):
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))
        reason = check_convs(expand, depthwise, project, se)
        if reason:
            raise ValueError(reason)
        self.expand, self.depthwise, self.project = expand, depthwise, project
        self.se_reduce, self.se_expand, self.se_activation, self.se_gate = se or (None, None, "relu", "hardsigmoid")
        self.activation, self.residual = activation, bool(residual)
        in_channels = depthwise.in_channels if expand is None else expand.in_channels
        if self.residual and (tuple(depthwise.stride) != (1, 1) or project.out_channels != in_channels):
            raise ValueError("residual needs stride 1 and out_channels == in_channels, got stride %s, %d -> %d"
                             % (tuple(depthwise.stride), in_channels, project.out_channels))
        self.register_buffer("packed", None, persistent=False)
        self.register_load_state_dict_post_hook(_repack_after_load)
        self.repack()

    def repack(self):
        """Rebuild `packed` from the current weights (the CPU kernel's order; None where it has none)."""
        e, d, p = self.expand, self.depthwise, self.project
        packed = None
        if d.weight.device.type == "cpu" and d.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
            with torch.no_grad():
                packed = inverted_residual_pack(None if e is None else e.weight, None if e is None else e.bias,
                                                d.weight, d.bias, p.weight, p.bias)
        self.packed = packed
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # .to(), .float(), ...: the weights may have changed form
        return self.repack()

    @property
    def in_channels(self):
        return self.depthwise.in_channels if self.expand is None else self.expand.in_channels

    @property
    def out_channels(self):
        return self.project.out_channels

    def forward(self, x):
        e, d, p, r, u = self.expand, self.depthwise, self.project, self.se_reduce, self.se_expand
        return inverted_residual(x, None if e is None else e.weight, None if e is None else e.bias, d.weight, d.bias,
                                 p.weight, p.bias, tuple(d.stride), tuple(d.padding), self.activation, self.residual,
                                 None if self.training else self.packed, None if r is None else r.weight,
                                 None if r is None else r.bias, None if u is None else u.weight,
                                 None if u is None else u.bias, self.se_activation, self.se_gate)

    def train(self, mode=True):
        if mode and self.folded_batchnorm:
            raise RuntimeError(
                "InvertedResidual has BatchNorm running statistics folded into its weights (effops.fuse on an "
                "eval-mode model): in train mode the original normalizes by batch statistics, which this block "
                "cannot compute. Train the unfused model and fuse a copy for inference; to train with frozen "
                "BatchNorm, fuse the model in train mode with its BatchNorms in eval mode.")
        super().train(mode)
        if not mode:
            self.repack()  # eval() after training steps: the weights the packed form was built from changed
        return self

    def extra_repr(self):
        se = "" if self.se_reduce is None else ", se_activation=%r, se_gate=%r" % (self.se_activation, self.se_gate)
        return "activation=%r, residual=%s%s" % (self.activation, self.residual, se)


def _repack_after_load(module, incompatible_keys):
    module.repack()


def check_convs(expand, depthwise, project, se=None):
    """None if the convs (and the squeeze-excitation se, as from_convs takes it) form a block
    InvertedResidual computes, else the reason they do not."""
    for name, conv in (("expand", expand), ("depthwise", depthwise), ("project", project)):
        if not isinstance(conv, nn.Conv2d) and not (name == "expand" and conv is None):
            return "%s must be an nn.Conv2d, got %s" % (name, type(conv).__name__)
    hidden = depthwise.in_channels
    if not (depthwise.groups == hidden == depthwise.out_channels):
        return "depthwise must have groups == in_channels == out_channels, got groups=%d, %d -> %d" % (
            depthwise.groups, hidden, depthwise.out_channels)
    if depthwise.padding_mode != "zeros" or isinstance(depthwise.padding, str):
        return "depthwise must use numeric zero padding, got %r (%s)" % (depthwise.padding, depthwise.padding_mode)
    if tuple(depthwise.dilation) != (1, 1):
        return "depthwise dilation must be 1, got %s" % (tuple(depthwise.dilation),)
    for name, conv, cin in (("expand", expand, None), ("project", project, hidden)):
        if conv is None:
            continue
        if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 or (
                not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0)):
            return "%s must be a 1x1 conv with stride 1, no padding and groups 1" % name
        if cin is not None and conv.in_channels != cin:
            return "%s in_channels %d must equal the depthwise channels %d" % (name, conv.in_channels, cin)
    if expand is not None and expand.out_channels != hidden:
        return "expand out_channels %d must equal the depthwise channels %d" % (expand.out_channels, hidden)
    if se is not None:
        return _check_se(se, hidden)
    return None


def _check_se(se, hidden):
    reduce, expand, activation, gate = se
    for name, conv in (("se reduce", reduce), ("se expand", expand)):
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1 or \
                tuple(conv.stride) != (1, 1) or isinstance(conv.padding, str) or tuple(conv.padding) != (0, 0):
            return "%s must be a 1x1 nn.Conv2d with stride 1, no padding and groups 1, got %r" % (name, conv)
    if reduce.in_channels != hidden or expand.out_channels != hidden or reduce.out_channels != expand.in_channels:
        return "squeeze-excitation convs must map the %d depthwise channels to a squeeze and back, got %d -> %d, " \
               "%d -> %d" % (hidden, reduce.in_channels, reduce.out_channels, expand.in_channels, expand.out_channels)
    if activation not in ACTIVATIONS or activation is None:
        return "se_activation must be one of %s, got %r" % (ACTIVATIONS[1:], activation)
    if gate not in SE_GATES:
        return "se_gate must be one of %s, got %r" % (tuple(SE_GATES), gate)
    return None
