"""Int8Linear: a Linear with int8 weights (per-output-channel scales), for inference and frozen bases.

The weights are quantized once (symmetric, per output channel) and kept packed in the CPU kernel's
layout (reference.int8.pack_weight); the state_dict holds the plain (N, K) int8 weight instead, so it
is portable and about a quarter of the fp32 size, and loading repacks it.

State: weight_packed (int8 panels), weight_scale (fp32, per output channel), bias (fp32) and
weight_corr (int32, -128 x the weight's column sums: reference.int8.weight_correction), the starting
sums of the CPU kernels, which multiply a + 128 (unsigned) by the weights. The derived forms
(weight_packed, weight_corr) are built from the int8 weight at from_linear and at load_state_dict, move
with .to() and are not saved; write new weights through load_state_dict, not into them.

Modes:
* "dynamic": activations quantized per row (per token) at run time, int8 x int8 GEMM with the scales,
  bias and cast fused into its epilogue. Twice the arithmetic rate of fp32 on AVX2.
* "weight_only": activations stay floating; the int8 weights are dequantized on the fly. For small
  batches, where the GEMM is bound by reading the weights and quantizing activations does not pay.
* "auto": weight_only for inputs of at most AUTO_ROWS rows, dynamic above (AUTO_ROWS is 0: see there).

weight_bits=7 (opt-in): the weights are quantized to [-63, 63] (scale absmax / 63) instead of
[-127, 127]; activations keep the exact 8-bit spec. The CPU kernel then multiplies a + 128 (unsigned)
by the 7-bit weights without saturating, so it drops the sign handling that exact 8-bit x 8-bit
products need (3 vector operations per step instead of 4; see csrc/cpu/int8_gemm.h), with the
column-sum correction exact in int32. Why the weights and not the activations lose the bit: per-token
activation scales are set by outlier channels, so a 7-bit activation grid costs more accuracy than a
7-bit per-channel weight grid (docs/int8.md: digits MLP logits 0.88% vs 0.61% relative error;
activations with 20x outlier channels 8.1% vs 4.3%).

Gradients: the input gets a straight-through gradient (grad_y @ dequantized weight), so trainable
layers (adapters) can sit above and below a frozen int8 base; the int8 weights are buffers (frozen);
the bias is a Parameter with requires_grad=False unless the user enables it.
"""
import torch
from torch import nn

from effops.ops.int8_gemm import MAX_K, int8_linear_dynamic
from effops.ops.quantize_rowwise import quantize_rowwise
from effops.reference import int8 as reference

MODES = ("dynamic", "weight_only", "auto")
WEIGHT_BITS = (8, 7)
# "auto" switches to weight_only at or below this many rows. Since the int8 GEMM's 6-row |b| kernel and
# its weight prefetch, the dynamic path at M = 1 runs as fast as FBGEMM and about 1.5x faster than the
# weight-only kernel (single-threaded CPU time, K = 4096, N = 4096 and 11008: 0.86 vs 1.35 ms and 2.5
# vs 3.4 ms; docs/int8.md), so "auto" is dynamic at every size; weight_only stays available for
# inputs whose quantization error matters more than the time.
AUTO_ROWS = 0


class Int8Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, mode="auto", device=None, weight_bits=8):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError("%s must be a positive int, got %r" % (name, v))
            if v < 1:
                raise ValueError("%s must be a positive int, got %r" % (name, v))
        if mode not in MODES:
            raise ValueError("mode must be one of %s, got %r" % (MODES, mode))
        _check_weight_bits(weight_bits)
        if in_features > MAX_K:
            raise ValueError("in_features must be <= %d so that the int32 accumulator cannot overflow, got %d"
                             % (MAX_K, in_features))
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.weight_bits = weight_bits
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        # Not persistent: the state_dict carries the plain weight as "weight" (see _save_to_state_dict).
        self.register_buffer("weight_packed", None, persistent=False)
        # The CPU kernels' column correction (derived from the weights, so not saved).
        self.register_buffer("weight_corr", None, persistent=False)
        self._set_weight(w)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, mode="auto", weight_bits=8):
        """Quantize an nn.Linear's weight per output channel (absmax / 127, round half to even; with
        weight_bits=7, absmax / 63 and values in [-63, 63])."""
        if not isinstance(linear, nn.Linear):
            raise TypeError("linear must be an nn.Linear, got %s" % type(linear).__name__)
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode, device=w.device,
                weight_bits=weight_bits)
        with torch.no_grad():
            # 8 bits: the op (a kernel); 7 bits: the reference's definition (once per layer).
            q, scale = quantize_rowwise(w.float()) if weight_bits == 8 else reference.quantize_rowwise(w, 7)
            m._set_weight(q)
            m.weight_scale.copy_(scale)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        return m

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype), .half(), .bfloat16(), .double(): the int8 buffers are integers (float casts leave
        # them) and the scales and bias stay fp32, as the kernels take them (the output follows x's
        # dtype; torch's quantized Linear keeps fp32 scales too). Device moves apply to all.
        scale, bias = self.weight_scale, None if self.bias is None else self.bias.detach()
        out = super()._apply(fn, *args, **kwargs)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(device=self.weight_scale.device)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias.data = bias.to(device=self.bias.device)  # the fp32 values from before the cast
        return out

    @property
    def weight(self):
        """The (out_features, in_features) int8 weight (unpacked view of the packed storage)."""
        return reference.unpack_weight(self.weight_packed, self.out_features, self.in_features)

    def dequantized_weight(self):
        return self.weight.float() * self.weight_scale.unsqueeze(1)

    def forward(self, x):
        if x.dim() and x.shape[-1] != self.in_features:  # (a 0-dim x: the op says what it expects)
            raise ValueError("x's last dim must equal in_features %d, got shape %s" % (self.in_features, tuple(x.shape)))
        weight_only = self.mode == "weight_only" or (
            self.mode == "auto" and AUTO_ROWS > 0 and x.numel() // self.in_features <= AUTO_ROWS)
        # The buffers straight from _buffers: Module.__getattr__ costs ~0.45 us a tensor, and three of them
        # were a quarter of a one-row call's fixed cost (7.3 -> 5.8 us a call at 1 x 64 x 64, one thread).
        # The bias too, where it is a registered Parameter; otherwise (None, or a parametrization's
        # property) the attribute.
        buffers, params = self._buffers, self._parameters
        bias = params["bias"] if "bias" in params else self.bias
        return int8_linear_dynamic(x, buffers["weight_packed"], buffers["weight_scale"], bias, self.out_features,
                                   weight_only, buffers["weight_corr"], self.weight_bits)

    def _set_weight(self, w_int8):
        """Build the derived forms of an (out_features, in_features) int8 weight (in [-63, 63] for
        weight_bits=7): the packed panels and the column correction."""
        self.weight_packed = reference.pack_weight(w_int8)
        self.weight_corr = reference.weight_correction(self.weight_packed)

    # ---- state_dict: plain int8 weight on disk, packed in memory ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "weight"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or tuple(w.shape) != (self.out_features,
                                                                                          self.in_features):
            error_msgs.append("%s: expected an int8 tensor of shape %s, got %s" % (
                key, (self.out_features, self.in_features),
                "%s %s" % (w.dtype, tuple(w.shape)) if isinstance(w, torch.Tensor) else type(w).__name__))
            return
        # min/max, not abs(): an int8 abs(-128) wraps to -128 and would pass.
        if self.weight_bits == 7 and w.numel() and w.device.type != "meta" and (w.min().item() < -63
                                                                                  or w.max().item() > 63):
            # The 7-bit kernel's products of such weights would saturate: refuse rather than compute wrongly.
            error_msgs.append("%s: weight_bits=7 needs weights in [-63, 63], got values up to %d (an 8-bit "
                              "state_dict? load it into a module with weight_bits=8)"
                              % (key, max(-w.min().item(), w.max().item())))
            return
        # Outside inference_mode even when loaded inside it (as nn.Linear's in-place loading keeps its
        # parameters normal tensors): an inference-tensor buffer would break later calls that need grads.
        with torch.no_grad(), torch.inference_mode(False):
            self._set_weight(w.to(self.weight_scale.device))

    def extra_repr(self):
        return "in_features=%d, out_features=%d, bias=%s, mode=%s%s" % (
            self.in_features, self.out_features, self.bias is not None, self.mode,
            ", weight_bits=7" if self.weight_bits == 7 else "")


def _check_weight_bits(weight_bits):
    if not isinstance(weight_bits, int) or isinstance(weight_bits, bool) or weight_bits not in WEIGHT_BITS:
        raise ValueError("weight_bits must be 8 (the default) or 7, got %r" % (weight_bits,))
