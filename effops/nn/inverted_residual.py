"""InvertedResidual: expand 1x1 -> act -> depthwise k x k -> act -> project 1x1 [+ x] as one fused op
(effops.ops.inverted_residual), the block of MobileNetV2/V3, MNASNet and EfficientNet (without
squeeze-excitation).

Its parameters live in three nn.Conv2d submodules, `expand` (None without expansion), `depthwise` and
`project`, with biases (a BatchNorm after a conv is folded into it by effops.fuse). The CPU kernel reads
the weights packed in its order: `packed`, a buffer this module builds at named points (construction,
from_convs, load_state_dict, .to() and the like, eval(), and repack()) and passes in eval mode; in train
mode, where the weights change every step, the op reads the weights themselves. After editing weights
in place in eval mode, call repack().
"""
import torch
import torch.nn as nn

from effops.ops.inverted_residual import ACTIVATIONS, inverted_residual, inverted_residual_pack


class InvertedResidual(nn.Module):
    """expand (in -> hidden, 1x1) -> act -> depthwise (k x k, stride) -> act -> project (hidden -> out, 1x1)
    [+ x when residual].

    activation: None, "relu", "relu6", "gelu" (exact erf form), "silu" or "hardswish", after the expand and
    after the depthwise conv. hidden_channels == in_channels and expand=False: no expand conv (MobileNetV2's
    first block). residual: add x (needs stride 1 and out_channels == in_channels).
    folded_batchnorm: True when effops.fuse folded the BatchNorm statistics of an eval-mode model into the
    weights; such a block refuses .train(), where the original normalizes by batch statistics.
    """

    folded_batchnorm = False

    def __init__(self, in_channels, hidden_channels, out_channels, kernel_size=3, stride=1, activation="relu6",
                 residual=False, expand=True, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        expand_conv = nn.Conv2d(in_channels, hidden_channels, 1, **kw) if expand else None
        if not expand and hidden_channels != in_channels:
            raise ValueError("without expand, hidden_channels must equal in_channels, got %d and %d"
                             % (hidden_channels, in_channels))
        depthwise = nn.Conv2d(hidden_channels, hidden_channels, kernel_size, stride, (kernel_size - 1) // 2,
                              groups=hidden_channels, **kw)
        project = nn.Conv2d(hidden_channels, out_channels, 1, **kw)
        self._set(expand_conv, depthwise, project, activation, residual)

    @classmethod
    def from_convs(cls, expand, depthwise, project, activation="relu6", residual=False):
        """A block that uses these convs' parameters (shared, not copied), in the depthwise conv's mode
        (train or eval). expand: a 1x1 nn.Conv2d or None; depthwise: groups == channels, zero padding;
        project: 1x1, stride 1."""
        reason = check_convs(expand, depthwise, project)
        if reason:
            raise ValueError(reason)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.training = depthwise.training  # the mode of the model the convs come from (eval: packed weights)
        self._set(expand, depthwise, project, activation, residual)
        return self

    def _set(self, expand, depthwise, project, activation, residual):
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))
        self.expand, self.depthwise, self.project = expand, depthwise, project
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
        e, d, p = self.expand, self.depthwise, self.project
        return inverted_residual(x, None if e is None else e.weight, None if e is None else e.bias, d.weight, d.bias,
                                 p.weight, p.bias, tuple(d.stride), tuple(d.padding), self.activation, self.residual,
                                 None if self.training else self.packed)

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
        return "activation=%r, residual=%s" % (self.activation, self.residual)


def _repack_after_load(module, incompatible_keys):
    module.repack()


def check_convs(expand, depthwise, project):
    """None if the three convs form a block InvertedResidual computes, else the reason they do not."""
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
    return None
