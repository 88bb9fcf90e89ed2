"""SeparableConv2d: depthwise k x k conv -> activation -> 1x1 conv as one fused op (effops.ops.dwpw_conv2d).

Its parameters live in two nn.Conv2d submodules, `depthwise` and `pointwise`, exactly as in the block
people write by hand, so a state_dict of that two-conv block loads as is.
"""
import torch
import torch.nn as nn

from effops.ops.dwpw_conv2d import ACTIVATIONS, dwpw_conv2d


class SeparableConv2d(nn.Module):
    """depthwise(groups=in_channels) -> activation -> pointwise(1x1), both with or without bias.

    activation: None, "relu", "relu6", "gelu" (exact erf form), "silu" or "hardswish".
    folded_batchnorm: True when effops.fuse_separable folded the BatchNorm statistics of an eval-mode
    model into the weights; such a block refuses .train(), where the original model normalizes by batch
    statistics.
    """

    folded_batchnorm = False

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, bias=True,
                 activation="relu", device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))
        if isinstance(padding, str):
            raise TypeError("padding must be an int or a pair of ints, got %r" % (padding,))
        kw = dict(device=device, dtype=dtype)
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                   groups=in_channels, bias=bias, **kw)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias, **kw)
        self.activation = activation

    @classmethod
    def from_convs(cls, depthwise, pointwise, activation="relu"):
        """A SeparableConv2d that uses these two convs' parameters (shared, not copied).

        depthwise: nn.Conv2d with groups == in_channels == out_channels and zero padding mode;
        pointwise: a 1x1 nn.Conv2d (stride 1, no padding, groups 1) taking depthwise's channels.
        """
        reason = check_depthwise(depthwise) or check_pointwise(pointwise, depthwise)
        if reason:
            raise ValueError(reason)
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (ACTIVATIONS, activation))
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.depthwise, self.pointwise, self.activation = depthwise, pointwise, activation
        return self

    @property
    def in_channels(self):
        return self.depthwise.in_channels

    @property
    def out_channels(self):
        return self.pointwise.out_channels

    def forward(self, x):
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes
            return self.forward(x.unsqueeze(0)).squeeze(0)
        self._checked_convs()
        dw, pw = self.depthwise, self.pointwise
        pw_weight = pw.weight
        mask = getattr(pw, "mask", None)
        if isinstance(mask, torch.Tensor):
            # A pruned pointwise conv (effops.prune makes it a SparseConv1x1): the fused op is dense, so
            # it runs weight * mask, whose gradient is masked as the layer's own forward would make it
            # (pruned weights stay exactly zero).
            pw_weight = pw_weight * mask.to(pw_weight.dtype)[:, :, None, None]
        return dwpw_conv2d(x, dw.weight, pw_weight, dw.bias, pw.bias, dw.stride, dw.padding, dw.dilation,
                           self.activation)

    def train(self, mode=True):
        if mode and self.folded_batchnorm:
            raise RuntimeError(
                "SeparableConv2d has BatchNorm running statistics folded into its weights (fuse_separable "
                "on an eval-mode model): in train mode the original normalizes by batch statistics, which "
                "this block cannot compute. Train the unfused model and fuse a copy for inference; to train "
                "with frozen BatchNorm, fuse_separable the model in train mode with its BatchNorms in eval mode.")
        return super().train(mode)

    def _checked_convs(self):
        """None; ValueError if a submodule was changed into something the fused op does not compute."""
        reason = check_depthwise(self.depthwise) or check_pointwise(self.pointwise, self.depthwise)
        if reason:
            raise ValueError("SeparableConv2d cannot run its convs as set: " + reason)

    def extra_repr(self):
        return "activation=%r" % (self.activation,)


def check_depthwise(conv):
    """None if `conv` is a depthwise conv SeparableConv2d can run, else the reason it is not."""
    if not isinstance(conv, nn.Conv2d):
        return "depthwise must be an nn.Conv2d, got %s" % type(conv).__name__
    if not (conv.groups == conv.in_channels == conv.out_channels):
        return ("depthwise must have groups == in_channels == out_channels, got groups=%d, %d -> %d channels"
                % (conv.groups, conv.in_channels, conv.out_channels))
    if conv.padding_mode != "zeros":
        return "depthwise must use padding_mode='zeros', got %r" % conv.padding_mode
    if isinstance(conv.padding, str):
        return "depthwise padding must be numeric, got %r" % conv.padding
    return None


def check_pointwise(conv, depthwise):
    """None if `conv` is a 1x1 conv that can follow `depthwise`, else the reason it is not."""
    if not isinstance(conv, nn.Conv2d):
        return "pointwise must be an nn.Conv2d, got %s" % type(conv).__name__
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1:
        return ("pointwise must be a 1x1 conv with stride 1 and groups 1, got kernel %s stride %s groups %d"
                % (tuple(conv.kernel_size), tuple(conv.stride), conv.groups))
    if isinstance(conv.padding, str) and conv.padding != "valid" or (
            not isinstance(conv.padding, str) and tuple(conv.padding) != (0, 0)):
        return "pointwise must have no padding, got %r" % (conv.padding,)
    if conv.in_channels != depthwise.out_channels:
        return "pointwise in_channels %d must equal depthwise channels %d" % (conv.in_channels,
                                                                              depthwise.out_channels)
    return None
