"""SparseLinear: a Linear whose weight is multiplied by a fixed 0/1 `mask` buffer (pruned weights).

The forward is effops.ops.masked_linear, so the sparse kernels skip pruned weights and the weight
gradient is masked. Pruned weights are also kept at exactly zero in `weight` itself (from_linear and
set_mask zero them), so `to_linear()` and plain optimizers see the pruned model as it is.
SparseConv1x1 is the same for a 1x1 convolution (a Linear over channels), keeping Conv2d's parameters.

Each layer holds its mask's index (`masked_linear_index(mask)`: block size, kept count, the kept lists
per row and per column) as the plain attribute `mask_index`, so a call does not scan the mask. It is
built when the mask is set: at construction (`from_linear`, `from_conv`), `set_mask`,
`load_state_dict` and `.to()` / `.cuda()` / `.half()` (any `Module._apply`). Change the mask only
through these; a mask written in place otherwise (`layer.mask.copy_(new)`) needs `rebuild_index()`. A
mask in shared memory (`share_memory()`: another process may write it) is scanned on every call instead.

The weights are read on every call (the kernels pack the kept weights per call), unless `pack_weights()`
was called: then the forward reads `weight_packed`, the kept weights packed once in the CPU kernels'
layout, for inference on fixed weights. It is repacked at the same points as the index and by
`apply_mask_`, and dropped by `train()` (training changes the weights) and `unpack_weights()`; after
changing the weights any other way (an EMA update in eval mode, `copy_` into a parameter), call
`pack_weights()` again.
"""
import importlib

import torch
from torch import nn

_op = importlib.import_module("effops.ops.masked_linear")  # the module: masked_linear, its mask checks


def _validated_mask(mask, weight_shape, device, pattern, block_size, name="mask", conv=False):
    """A bool mask of `weight_shape` on `device`; TypeError/ValueError with the reason otherwise.
    conv: a 1x1 conv's mask may also come in its weight's own shape (out, in, 1, 1)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(mask).__name__))
    if conv and mask.dim() == 4 and tuple(mask.shape) == (*weight_shape, 1, 1):
        mask = mask.reshape(weight_shape)
    if tuple(mask.shape) != tuple(weight_shape):
        raise ValueError("%s must have the weight's shape %s, got %s" % (name, tuple(weight_shape), tuple(mask.shape)))
    if mask.dtype != torch.bool and not mask.is_floating_point() and mask.dtype not in (
            torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise TypeError("%s must be bool or hold 0/1 numbers, got dtype %s" % (name, mask.dtype))
    meta = "meta" in (mask.device.type, torch.device(device).type)  # shapes only: no values to check
    if not meta:
        _op.check_binary(mask)
    mask = mask.to(device=device, dtype=torch.bool, copy=True)  # own it: a caller's mask is not aliased
    _op.check_pattern(pattern, block_size)
    if pattern is not None and not meta:
        why = _op.mask_fits(mask, pattern, block_size)
        if why:
            raise ValueError("%s does not fit pattern=%r: %s" % (name, pattern, why))
    return mask


class _MaskedMixin:
    """Shared mask handling of SparseLinear and SparseConv1x1 (weight viewed as out x in)."""

    _conv = False  # SparseConv1x1: masks may come in the conv weight's shape (out, in, 1, 1)

    def rebuild_index(self):
        """Build `mask_index` from the current mask (done by every method that sets the mask), and
        `weight_packed` from the weights when packed."""
        mask = self.mask
        self.mask_index = None if mask.device.type == "meta" else _op.masked_linear_index(mask)
        if self.__dict__.get("weight_packed") is not None:  # packed for the CPU kernels only
            if self.weight.device.type == "cpu" and self.mask_index is not None:
                self.pack_weights()
            else:
                self.weight_packed = None

    @torch.no_grad()
    def pack_weights(self):
        """Pack the kept weights as they are now for the forward (CPU layers; see the module docstring)."""
        weight = self._weight2d()
        if weight.device.type != "cpu" or self.mask_index is None:
            raise ValueError("pack_weights packs CPU weights of a layer with a mask, got weight on %s" % weight.device)
        self.weight_packed = _op.masked_linear_pack(weight, self.mask_index)

    def unpack_weights(self):
        """Drop `weight_packed`: the forward reads the weights again."""
        self.weight_packed = None

    def train(self, mode=True):
        if mode:
            self.weight_packed = None  # training changes the weights
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.rebuild_index()  # the mask may have moved (its index lives on its device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A loaded mask must fit the declared pattern, as set_mask's must (a 2:4 layer loading an
        # unstructured mask would otherwise keep a label its mask breaks).
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor) and self.pattern is not None and mask.shape == self.mask.shape:
            _validated_mask(mask, self.mask.shape, self.mask.device, self.pattern, self.block_size,
                            name="state_dict's %smask" % prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.rebuild_index()

    def _index(self):
        """mask_index, or None where the op must scan the mask itself (another process may write it)."""
        mask = self.mask
        if torch.compiler.is_compiling() or not mask.is_cpu or torch._C._functorch.peek_interpreter_stack() is not None:
            return self.mask_index  # (under a transform the reference runs: a batched mask has no storage)
        return None if mask.untyped_storage().is_shared() else self.mask_index

    def _packed(self, index):
        """weight_packed where the op may read it (with the index it was packed with, on the CPU)."""
        packed = self.__dict__.get("weight_packed")
        return None if packed is None or index is None else packed

    def _weight2d(self):
        w = self.weight
        return w if w.dim() == 2 else w.view(w.shape[0], -1)  # Linear's as is (a view per call costs ~3 us)

    @property
    def density(self):
        """Fraction of weights kept (NaN on the meta device: no values)."""
        if self.mask.device.type == "meta":
            return float("nan")
        return float(self.mask.float().mean()) if self.mask.numel() else 1.0

    @property
    def sparsity(self):
        """Fraction of weights pruned."""
        return 1.0 - self.density

    @torch.no_grad()
    def set_mask(self, mask):
        """Replace the mask in place (its index follows) and zero the newly pruned weights."""
        mask = _validated_mask(mask, self.mask.shape, self.mask.device, self.pattern, self.block_size,
                               conv=self._conv)
        self.mask.copy_(mask)
        self.mask_index = _op.masked_linear_index(self.mask)
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self):
        """Set the pruned weights to exactly zero (after an optimizer step, say)."""
        self._weight2d().mul_(self.mask.to(self.weight.dtype))
        if self.__dict__.get("weight_packed") is not None:
            self.pack_weights()


class SparseLinear(_MaskedMixin, nn.Linear):
    """nn.Linear with a `mask` buffer: y = x @ (weight * mask)^T + bias.

    pattern / block_size record the mask's declared structure ("unstructured", "block" with
    block_size 16/32/64, "2:4", or None for any); masks set later are checked against it.
    state_dict holds weight, bias and mask; `mask_index` (see the module docstring) is rebuilt from it.
    """

    def __init__(self, in_features, out_features, bias=True, mask=None, *, pattern=None, block_size=None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pattern, self.block_size = pattern, block_size
        full = torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device)
        self.register_buffer("mask", full if mask is None else _validated_mask(
            mask, full.shape, full.device, pattern, block_size))
        self.rebuild_index()
        self.apply_mask_()

    @classmethod
    def from_linear(cls, linear, mask, *, pattern=None, block_size=None):
        """A SparseLinear sharing `linear`'s Parameter objects (an existing optimizer keeps working);
        the pruned weights are zeroed in place."""
        if not isinstance(linear, nn.Linear):
            raise TypeError("linear must be an nn.Linear, got %s" % type(linear).__name__)
        mask = _validated_mask(mask, linear.weight.shape, linear.weight.device, pattern, block_size)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.pattern, module.block_size = pattern, block_size
        module.register_buffer("mask", mask)
        module.rebuild_index()
        module.apply_mask_()
        module.train(linear.training)
        return module

    def to_linear(self):
        """A plain nn.Linear with weight * mask (new parameters)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask.to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def forward(self, x):
        index = self._index()
        return _op.masked_linear(x, self.weight, self.mask, self.bias, index=index, packed=self._packed(index))

    def extra_repr(self):
        return "%s, density=%.3f, pattern=%s" % (super().extra_repr(), self.density, self.pattern)


class SparseConv1x1(_MaskedMixin, nn.Conv2d):
    """A 1x1 nn.Conv2d (stride 1, no padding, groups 1) with a `mask` of shape (out, in) on its weight.

    Keeps Conv2d's parameters (weight of shape (out, in, 1, 1)), so a Conv2d state_dict plus a mask loads.
    A mask may be given as (out, in) or in the weight's shape (out, in, 1, 1).
    """

    _conv = True

    @classmethod
    def from_conv(cls, conv, mask, *, pattern=None, block_size=None):
        if not is_pointwise_conv(conv):
            raise TypeError("conv must be a 1x1 nn.Conv2d with stride 1, padding 0, dilation 1, groups 1")
        shape = conv.weight.shape[:2]
        mask = _validated_mask(mask, shape, conv.weight.device, pattern, block_size, conv=True)
        module = cls.__new__(cls)
        module.__dict__.update({k: v for k, v in conv.__dict__.items()})  # Conv2d's config, params, hooks
        for attr in ("_parameters", "_buffers", "_modules"):
            setattr(module, attr, dict(getattr(conv, attr)))
        module.pattern, module.block_size = pattern, block_size
        module.register_buffer("mask", mask)
        module.rebuild_index()
        module.apply_mask_()
        return module

    def to_conv(self):
        out = nn.Conv2d(self.in_channels, self.out_channels, 1, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask.to(self.weight.dtype)[:, :, None, None])
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self):
        return "%s, density=%.3f, pattern=%s" % (super().extra_repr(), self.density, self.pattern)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a torch.Tensor, got %s" % type(x).__name__)
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError("x must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape %s" % (tuple(x.shape),))
        if x.shape[1] != self.in_channels:
            raise ValueError("x must have %d channels (in_channels), got shape %s" % (self.in_channels, tuple(x.shape)))
        # The product over channels on x's channels-last (N, H, W, C) view.
        index = self._index()
        y = _op.masked_linear(x.permute(0, 2, 3, 1), _flat(self.weight), self.mask, self.bias, index=index,
                              packed=self._packed(index)).permute(0, 3, 1, 2)
        # In x's memory format, as nn.Conv2d returns it: the product comes out channels_last, so NCHW
        # input costs one copy of y (feed channels_last to a chain of these layers to spare it).
        return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()


def _flat(w):
    return w.view(w.shape[0], -1)


def is_pointwise_conv(module):
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")
