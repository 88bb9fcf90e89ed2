"""effops::dwpw_conv2d: depthwise conv -> activation -> 1x1 pointwise conv, fused.

The public function checks arguments and applies autocast; the custom op (schema, fake kernel,
autograd) dispatches to a backend. The backward is its own custom op that recomputes the depthwise
output instead of saving it, so a training step keeps only x (not the N x C x H' x W' intermediate).
"""
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from effops import _backends, _call_plan, cpu_isa
from effops.ops import _checks
from effops.reference import dwpw_conv2d as reference

ACTIVATIONS = reference.ACTIVATIONS

_backends.register_kernel("dwpw_conv2d", "reference", reference.dwpw_conv2d)
_backends.register_kernel("dwpw_conv2d_backward", "reference", reference.dwpw_conv2d_backward)
_ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2, "gelu": 3, "silu": 4, "hardswish": 5}  # csrc/cpu/dwpw_conv2d.h


_CPU_MAX_AUTO_MACS = 1 << 20  # see _cpu_faster
_CPU_MIN_AUTO_TENSOR_BYTES = 32 << 20  # see _cpu_faster


def _cpu_supports(x, dw_weight, pw_weight, dw_bias=None, pw_bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), activation=None):
    """Why the cpu kernels decline this input (None: they take it)."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if max(dw_weight.shape[2:]) > 7:
        return "kernel larger than 7x7"
    if x.numel() == 0 or pw_weight.shape[0] == 0:
        return "empty tensor"
    return None


def _cpu_faster(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    """Speed rule of the FORWARD, for the automatic choice only (a forced "cpu" still runs, so its tests
    and benchmarks can exercise the kernel): a reason the reference is faster, or None.

    Measured 06:00 UTC on the shared 2-core machine, fp32, 3x3, ReLU6, one thread, CPU time of the
    thread (robust against the other helpers' load; PYTHONPATH=. python benchmarks/dwpw_crossover.py
    3 1,4,16,32 cpu, plus 32x144->24@56, 32x96->96@56 s2, 8x64->128@56, 8x32->64@112):
    - where torch's largest tensor (the depthwise output or y, N * max(C, O) * H' * W' elements) is
      32 MiB or more, the fused kernel was 2.2-4.7x faster than torch's convolutions in the same layout
      (and 2.2-4.4x than torch's faster layout): glibc mmaps every allocation above its 32 MiB
      threshold, so each of torch's big outputs page-faults and is zeroed by the kernel in every call
      (33 ms for a fresh 51 MB tensor vs 4 ms reused), while the fused kernel writes only y, on
      transparent huge pages (csrc/bindings/dwpw_conv2d.cpp).
    - below that, everything torch touches is recycled by malloc and oneDNN's convolutions are as fast
      or faster: 0.6-1.0x (channels_last) and 0.7-0.9x (NCHW) at batch 1-8, 0.75-1.07x at 256->256@14 and
      512->512@7 even at batch 32; 1.38x/2.6x at 16x64->128@56 (25.7 MB) was left out to keep one rule.
    - under ~1M multiply-adds the cost is per-call overhead and the fused op beat the reference op by
      1.3-1.4x (1 x 16 -> 16 at 8x8, 1 x 32 -> 32 at 16x16).
    """
    N, C = x.shape[:2]
    O = pw_weight.shape[0]
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    macs = N * out_hw[0] * out_hw[1] * C * O
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, dw_weight, pw_weight, dw_bias, pw_bias))
    if macs < _CPU_MAX_AUTO_MACS:
        # Tiny inputs: per-call overhead decides. Inference runs the fused kernel directly (eager_route);
        # a training step would go through the custom op and its autograd (~0.3 ms of Python a step),
        # which cost more than the kernels save there (benchmarks/bench_small_calls.py, 24->48 at 32x32 s2,
        # batch 1: the fused pair 0.76-0.89x of torch's step in four runs; torch's ops through our op
        # layer 0.88x in one, the rest being the layer's argument checks and choice).
        return "training step of a tiny input: the custom op's autograd costs more than it saves" if training \
            else None
    if training:
        # Training step: the fused forward is taken exactly where the fused backward is (same rule), so a
        # step runs either the fused pair or torch's own autograd (which keeps the depthwise output).
        # Eager only: eager_route applies this (through_custom_op); inside the custom op grad mode
        # is off, so under torch.compile the forward gets the inference rule below.
        return _cpu_step_slower(x, dw_weight, pw_weight, stride, padding, dilation)
    largest = N * max(C, O) * out_hw[0] * out_hw[1] * x.element_size()
    if largest >= _CPU_MIN_AUTO_TENSOR_BYTES:
        if not torch_uses_huge_pages():
            return None
        return ("THP_MEM_ALLOC_ENABLE=1: torch's large tensors are on huge pages, and there its convolutions "
                "measured about as fast as the fused cpu kernel")
    return ("torch's largest tensor is %d bytes (< %d, malloc recycles it): there torch's convolutions measured "
            "as fast as the fused cpu kernel or faster" % (largest, _CPU_MIN_AUTO_TENSOR_BYTES))


def torch_uses_huge_pages():
    """THP_MEM_ALLOC_ENABLE=1 makes torch's CPU allocator put large tensors on huge pages too: its big
    outputs then no longer fault page by page, and the fused forward measured 0.82-1.20x of torch's
    convolutions (32x64->128@56 and 32x32->64@112, channels_last, one thread, CPU time), so the
    size rule above does not apply. (Read per call: it is an environment switch of torch's.)"""
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def _step_largest_bytes(x, dw_weight, pw_weight, stride, padding, dilation):
    """Bytes of the largest tensor torch allocates in a training step of the block: grad_x (x's size),
    or the depthwise output / y / their gradients (N x max(C, O) x H' x W')."""
    N, C = x.shape[:2]
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    return max(x.numel(), N * max(C, pw_weight.shape[0]) * out_hw[0] * out_hw[1]) * x.element_size()


def _cpu_step_slower(x, dw_weight, pw_weight, stride, padding, dilation):
    """Speed rule of a TRAINING STEP (fused forward + fused backward vs torch's autograd), for inputs
    of 1M multiply-adds or more: a reason to run torch's, or None.

    Measured 09:23-09:25 UTC, fp32, 3x3, ReLU6, one thread, CPU time of the thread (page faults
    included), steady state (each timed step after an untimed one of the same kind), the benchmark's six
    block shapes: `PYTHONPATH=. python benchmarks/dwpw_crossover.py 4 32,8 cpu train` (the table is in
    docs/dwpw_conv2d.md):
    - batch 32 where torch's largest tensor of the step is 32 MiB or more (32->64@112, 64->128@56,
      96->96@56 s2, 144->24@56): fused 1.66-2.65x torch's faster layout in channels_last, 1.45-2.50x in
      NCHW. torch's steps there spend most of their CPU time in the kernel faulting in and zeroing fresh
      4 KB pages (glibc mmaps every allocation above 32 MiB; 280 of 460 ms at 32->64@112 channels_last);
      the fused step allocates only y and grad_x, on huge pages. Batch 21 (the line: y of 64->128@56 is
      33.7 MB): 1.60-1.65x.
    - batch 32 at 256->256@14 and 512->512@7 (under 32 MiB: malloc recycles torch's memory) and every
      shape at batch 8: fused 0.83-1.09x: the pointwise products dominate, oneDNN's run as fast as the
      fused kernel's, and the fused step does the same three products plus a depthwise recompute.
    - THP_MEM_ALLOC_ENABLE=1 (torch's large tensors on huge pages too; same command with it set, batch
      32, 09:24 UTC): channels_last fused 0.93-1.08x torch's channels_last step (1.31x at 144->24), so
      torch's step runs there; with an NCHW x the fused step stayed 1.17-1.37x torch's NCHW step, so it
      runs.
    """
    if x.dtype == torch.bfloat16 and cpu_isa.cpu_has_native_bf16():
        # Measured at the avx512_bf16 level (Zen 4), `python benchmarks/dwpw_bf16_crossover.py`: torch's
        # bf16 convolutions run natively there while the fused kernels compute in fp32; the fused step
        # was 0.34-0.42x torch's at 64->128@56 and 256->256@14 and 0.81-1.17x at 32->64@112 (batch 32).
        return "bf16 training step on a CPU with AVX512-BF16: torch's native bf16 convolutions measured as fast or faster"
    largest = _step_largest_bytes(x, dw_weight, pw_weight, stride, padding, dilation)
    if largest < _CPU_MIN_AUTO_TENSOR_BYTES:
        return ("training step: torch's largest tensor is %d bytes (< %d, malloc recycles it): there torch's "
                "autograd measured as fast as the fused forward + backward or faster"
                % (largest, _CPU_MIN_AUTO_TENSOR_BYTES))
    if torch_uses_huge_pages() and reference.memory_format(x) == torch.channels_last:
        return ("training step with THP_MEM_ALLOC_ENABLE=1 on channels_last: torch's large tensors are on huge "
                "pages, and there its autograd measured about as fast as the fused forward + backward")
    return None


def _cpu_backward_faster(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation,
                         needs_input_grad):
    """Speed rule of the BACKWARD (automatic choice only): the training-step rule (_cpu_step_slower), so
    the backward of a fused forward is fused too; under ~1M multiply-adds the cost is per-call overhead
    and the fused backward is taken."""
    N, C = x.shape[:2]
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    if N * out_hw[0] * out_hw[1] * C * pw_weight.shape[0] < _CPU_MAX_AUTO_MACS:
        return None
    return _cpu_step_slower(x, dw_weight, pw_weight, stride, padding, dilation)


def _cpu_forward(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    return torch.ops.effops_cpu.dwpw_conv2d(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                                            _ACTIVATION_CODES[activation])


def _cpu_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation, needs_input_grad):
    needs = sum(1 << i for i, wanted in enumerate(needs_input_grad) if wanted)
    grads = torch.ops.effops_cpu.dwpw_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding,
                                                      dilation, _ACTIVATION_CODES[activation], needs)
    return tuple(g if wanted else None for g, wanted in zip(grads, needs_input_grad))


_backends.register_kernel("dwpw_conv2d", "cpu", _cpu_forward, supports=_cpu_supports, faster=_cpu_faster)


def _image_span(t):
    """1 + the largest element offset within one image of t (N, C, H, W), through its strides."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _triton_supports(x, dw_weight, pw_weight, stride, padding, dilation, grad_y=None):
    """The Triton kernels put the batch on grid z (at most 65535) and index within one image with int32
    offsets through the tensors' strides (a view of a wider tensor spans more than its elements)."""
    N, C, H, W = x.shape
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    if N > 65535:
        return "batch of %d images: the Triton kernels take at most 65535 (CUDA grid z)" % N
    spans = [_image_span(x), C * H * W, pw_weight.shape[0] * out_hw[0] * out_hw[1]]  # x, grad_x, y
    if grad_y is not None:
        spans.append(_image_span(grad_y))
    if max(spans) >= 2 ** 31:
        return "an image spanning 2**31 elements or more (int32 offsets in the Triton kernels)"
    return None


def _triton_slower(x):
    """Automatic choice on CUDA: the 16-bit kernels only, until a GPU run measures the crossover (none has
    run yet). In fp32 the fused kernel multiplies in exact fp32 on the CUDA cores while cuDNN's
    convolutions take TF32 tensor cores by default (torch.backends.cudnn.allow_tf32), so it is not
    expected to win; forcing use_backend("triton") runs it."""
    if x.dtype == torch.float32:
        return "fp32: cuDNN's TF32 convolutions are expected to be faster (no GPU measurement yet)"
    return None


# Triton: imported on first use (effops.triton_kernels is the top-level triton_kernels folder).
_backends.register_kernel("dwpw_conv2d", "triton", "effops.triton_kernels.dwpw_conv2d:dwpw_conv2d_forward",
                          supports=lambda x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                          activation: _triton_supports(x, dw_weight, pw_weight, stride, padding, dilation),
                          faster=lambda x, *rest: _triton_slower(x))
_backends.register_kernel("dwpw_conv2d_backward", "triton", "effops.triton_kernels.dwpw_conv2d:dwpw_conv2d_backward",
                          supports=lambda grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation,
                          activation, needs_input_grad: _triton_supports(x, dw_weight, pw_weight, stride, padding,
                                                                         dilation, grad_y),
                          faster=lambda grad_y, x, *rest: _triton_slower(x))
_backends.register_kernel("dwpw_conv2d_backward", "cpu", _cpu_backward,
                          supports=lambda grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation,
                          activation, needs_input_grad: _cpu_supports(x, dw_weight, pw_weight, None, None, stride,
                                                                      padding, dilation, activation),
                          faster=_cpu_backward_faster)


def dwpw_conv2d(x, dw_weight, pw_weight, dw_bias=None, pw_bias=None, stride=1, padding=0, dilation=1,
                activation=None):
    """y = conv1x1(act(depthwise_conv(x))) in one op.

    x: (N, C, H, W), NCHW or channels_last, or unbatched (C, H, W); dw_weight: (C, 1, kh, kw); pw_weight: (O, C, 1, 1);
    dw_bias: (C,) or None; pw_bias: (O,) or None; stride/padding/dilation: int or pair (of the
    depthwise conv); activation: None, "relu", "relu6", "gelu" (exact erf form), "silu" or "hardswish".
    Returns (N, O, H', W') in x's memory format and dtype (autocast's under autocast).
    """
    if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as F.conv2d takes
        return dwpw_conv2d(x.unsqueeze(0), dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation,
                           activation).squeeze(0)
    # Through the memo of recent calls (effops._call_plan.call_function): the checks and the choice
    # below run again only when a call differs in what they read.
    tensors, config = (dw_weight, pw_weight, dw_bias, pw_bias), (stride, padding, dilation, activation)
    return _call_plan.call_function(_MEMO, x, tensors, config + (torch_uses_huge_pages(),),
                                    lambda: plan(x, *tensors, *config), lambda: _unmemoized(x, *tensors, *config),
                                    autocast_args)


_MEMO = _call_plan.FunctionMemo()


def _unmemoized(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    args = _checked(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)
    run = _runner(args)
    return run(*args[:5]) if run is not None else torch.ops.effops.dwpw_conv2d(*args)


def plan(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    """For effops._call_plan (SeparableConv2d's memo, dwpw_conv2d's own): dwpw_conv2d's checks and choice for this call, as a
    runner of (x, dw_weight, pw_weight, dw_bias, pw_bias) (given them cast by autocast_args under
    autocast), or None where the custom op must run."""
    checked = _checked(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation)
    route = _route(checked)
    if route is None:
        return None
    if checked[0] is not x and route.direct and route.name == "reference":
        # Autocast and plain PyTorch chosen: its convolutions cast inside (in C++, to the same values),
        # sparing the Python casts a call.
        return _call_plan.CastsItself(_runner((x, dw_weight, pw_weight, dw_bias, pw_bias) + checked[5:], route))
    return _runner(checked, route)


def autocast_args(x, tensors, dtype):
    """x and (dw_weight, pw_weight, dw_bias, pw_bias) as the op casts them under autocast to `dtype`."""
    return x.to(dtype), tuple(None if t is None else t.to(dtype) for t in tensors)


def _checked(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    """The op's arguments checked (TypeError/ValueError naming the bad one), stride/padding/dilation as
    pairs, cast under autocast."""
    _checks.tensor("x", x, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    C = x.shape[1]
    _checks.tensor("dw_weight", dw_weight, ndim=4, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    if dw_weight.shape[1] != 1:
        raise ValueError("dw_weight must have shape (C, 1, kh, kw) (one filter per channel), got %s"
                         % (tuple(dw_weight.shape),))
    if dw_weight.shape[0] != C:
        raise ValueError("x must have %d channels for dw_weight of shape %s, got x of shape %s"
                         % (dw_weight.shape[0], tuple(dw_weight.shape), tuple(x.shape)))
    _checks.tensor("pw_weight", pw_weight, ndim=4, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    if pw_weight.shape[1] != C or tuple(pw_weight.shape[2:]) != (1, 1):
        raise ValueError("pw_weight must have shape (out_channels, C=%d, 1, 1), got %s" % (C, tuple(pw_weight.shape)))
    _checks.optional_tensor("dw_bias", dw_bias, device=x.device)
    if dw_bias is not None:
        _checks.shape("dw_bias", dw_bias, (C,))
    _checks.optional_tensor("pw_bias", pw_bias, device=x.device)
    if pw_bias is not None:
        _checks.shape("pw_bias", pw_bias, (pw_weight.shape[0],))
    stride = _checks.int_pair("stride", stride, minimum=1)
    padding = _checks.int_pair("padding", padding, minimum=0)
    dilation = _checks.int_pair("dilation", dilation, minimum=1)
    _checks.choice("activation", activation, ACTIVATIONS)
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    if min(out_hw) < 1:
        raise ValueError("x's spatial size %s is too small for kernel %s with padding %s and dilation %s"
                         % (tuple(x.shape[2:]), tuple(dw_weight.shape[2:]), padding, dilation))
    cast = _checks.autocast_dtype(x.device.type)
    if cast is not None:
        x, (dw_weight, pw_weight, dw_bias, pw_bias) = autocast_args(x, (dw_weight, pw_weight, dw_bias, pw_bias), cast)
    for name, value in (("dw_weight", dw_weight), ("pw_weight", pw_weight), ("dw_bias", dw_bias),
                        ("pw_bias", pw_bias)):
        _checks.same_dtype(name, value, x.dtype)
    return x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation


def _route(args):
    return _backends.eager_route("dwpw_conv2d", args[0].device, *args, reference_autograd=True)


def _runner(args, route=None):
    """How this eager call runs (on `route`, else the one eager_route gives), as a function of (x,
    dw_weight, pw_weight, dw_bias, pw_bias) (the geometry and activation bound), or None where the custom
    op must choose for itself."""
    config = args[5:]
    route = route or _route(args)
    if route is None:
        return None
    kernel = route.fn
    if route.direct and route.name == "reference":
        return lambda x, *tensors: kernel(x, *tensors, *config)  # plain PyTorch, under torch's autograd
    if route.direct:
        return lambda x, *tensors: _in_format_of(x, kernel(x, *tensors, *config))  # no gradient needed
    # A training step through our kernels: the route carries _cpu_faster's step rule, which sees
    # autograd only out here, into the custom op.
    return lambda x, *tensors: _backends.through_custom_op(route, "dwpw_conv2d", torch.ops.effops.dwpw_conv2d, x,
                                                           *tensors, *config)


def _in_format_of(x, y):
    # The fake kernel promises x's memory format; every backend is held to it.
    return y.contiguous(memory_format=reference.memory_format(x))


def output_size(in_hw, kernel_hw, stride, padding, dilation):
    return [(in_hw[i] + 2 * padding[i] - dilation[i] * (kernel_hw[i] - 1) - 1) // stride[i] + 1 for i in range(2)]


@torch.library.custom_op("effops::dwpw_conv2d", mutates_args=())
def _dwpw_conv2d(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, dw_bias: Optional[Tensor],
                 pw_bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                 activation: Optional[str]) -> Tensor:
    return _in_format_of(x, _backends.dispatch("dwpw_conv2d", x.device, x, dw_weight, pw_weight, dw_bias, pw_bias,
                                               stride, padding, dilation, activation))


@_dwpw_conv2d.register_fake
def _(x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation):
    out_hw = output_size(x.shape[2:], dw_weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], pw_weight.shape[0], *out_hw)).contiguous(
        memory_format=reference.memory_format(x))


@torch.library.custom_op("effops::dwpw_conv2d_backward", mutates_args=())
def _dwpw_conv2d_backward(grad_y: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                          dw_bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                          activation: Optional[str], needs_input_grad: List[bool]
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backends.dispatch("dwpw_conv2d_backward", x.device, grad_y, x, dw_weight, pw_weight, dw_bias, stride,
                               padding, dilation, activation, needs_input_grad)
    # A custom op cannot return None: an unneeded gradient travels as an empty tensor.
    grad_x, grad_dw, grad_pw, grad_dwb, grad_pwb = (g if g is not None else x.new_empty(0) for g in grads)
    if needs_input_grad[0]:
        grad_x = grad_x.contiguous(memory_format=reference.memory_format(x))
    return (grad_x, grad_dw.contiguous(), grad_pw.contiguous(), grad_dwb.contiguous(), grad_pwb.contiguous())


@_dwpw_conv2d_backward.register_fake
def _(grad_y, x, dw_weight, pw_weight, dw_bias, stride, padding, dilation, activation, needs_input_grad):
    need_x, need_dw, need_pw, need_dwb, need_pwb = needs_input_grad
    empty = x.new_empty(0)
    return (torch.empty_like(x, memory_format=reference.memory_format(x)) if need_x else empty,
            x.new_empty(dw_weight.shape) if need_dw else x.new_empty(0),
            x.new_empty(pw_weight.shape) if need_pw else x.new_empty(0),
            x.new_empty(dw_weight.shape[0]) if need_dwb else x.new_empty(0),
            x.new_empty(pw_weight.shape[0]) if need_pwb else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, dw_weight, pw_weight, dw_bias, pw_bias, stride, padding, dilation, activation = inputs
    # Only the inputs are kept: the backward recomputes the depthwise output tile by tile.
    ctx.save_for_backward(x, dw_weight, pw_weight, dw_bias)
    ctx.has_dw_bias, ctx.has_pw_bias = dw_bias is not None, pw_bias is not None
    ctx.conv = (stride, padding, dilation, activation)


def _backward(ctx, grad_y):
    x, dw_weight, pw_weight, dw_bias = ctx.saved_tensors
    n = ctx.needs_input_grad
    need = [n[0], n[1], n[2], ctx.has_dw_bias and n[3], ctx.has_pw_bias and n[4]]
    grads = torch.ops.effops.dwpw_conv2d_backward(grad_y, x, dw_weight, pw_weight, dw_bias, *ctx.conv, need)
    return tuple(g if wanted else None for g, wanted in zip(grads, need)) + (None,) * 4


_dwpw_conv2d.register_autograd(_backward, setup_context=_setup_context)
