"""effops::masked_linear: F.linear(x, weight * mask, bias) touching only kept weights.

The public function checks arguments and applies autocast; the custom op (schema, fake kernel,
autograd) dispatches to a backend. The weight gradient is masked: pruned weights stay pruned.

Backends:
* reference: plain PyTorch (effops/reference/masked_linear.py).
* cpu: C++ kernels (csrc/cpu/masked_linear_*.cpp) walking a compressed index of the mask, built once
  per mask change (effops/ops/_sparse_index.py): a block-CSR index when the mask is constant over
  16/32/64 blocks, a CSR index otherwise (unstructured, 2:4). In automatic mode it declines where
  dense F.linear is faster (high density, tiny products: see _CPU_LIMITS); forced, it runs any mask.
* triton: block and 2:4 kernels, and a dense-with-mask kernel for other masks
  (triton_kernels/masked_matmul.py).
"""
from typing import List, Optional, Tuple

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from effops import _backends, _call_plan, cpu_isa
from effops.ops import _checks, _sparse_index
from effops.reference import masked_linear as reference

_backends.register_kernel("masked_linear", "reference", reference.masked_linear)
_backends.register_kernel("masked_linear_backward", "reference", reference.masked_linear_backward)


def masked_linear(x, weight, mask, bias=None, *, pattern=None, block_size=None):
    """y = x @ (weight * mask)^T + bias for x of shape (..., in_features).

    weight: (out_features, in_features); mask: same shape, bool or 0/1 in weight's dtype;
    bias: (out_features,) or None. Output has x's leading dims and dtype (autocast's under autocast).
    pattern / block_size (optional): declare the mask's structure ("unstructured", "block" with
    block_size in 16/32/64, "2:4"); a mask that does not fit raises ValueError. The kernels detect
    the structure themselves (once per mask change), so the hint only validates.
    """
    # Through the memo of recent calls (effops._call_plan.call_function): the checks and the choice
    # below run again only when a call differs in what they read (the mask by its version).
    return _call_plan.call_function(_MEMO, x, (weight, mask, bias), (pattern, block_size),
                                    lambda: plan(x, weight, mask, bias, pattern, block_size),
                                    lambda: _unmemoized(x, weight, mask, bias, pattern, block_size), autocast_args,
                                    versioned=(1,))


_MEMO = _call_plan.FunctionMemo()


def _unmemoized(x, weight, mask, bias, pattern, block_size):
    x, weight, mask, bias = _checked(x, weight, mask, bias, pattern, block_size)
    run = _runner(x, weight, mask, bias)
    return run(x, weight, mask, bias) if run is not None else torch.ops.effops.masked_linear(x, weight, mask, bias)


def plan(x, weight, mask, bias, pattern=None, block_size=None):
    """For effops._call_plan (SparseLinear's memo, masked_linear's own): masked_linear's checks and
    choice for this call, as a runner of (x, weight, mask, bias) (given them cast by autocast_args
    under autocast, unless it casts itself), or None where the custom op must run."""
    checked = _checked(x, weight, mask, bias, pattern, block_size)
    route = _route(*checked)
    if route is None:
        return None
    if checked[0] is not x and route.direct and route.name == "reference":
        # Autocast and plain PyTorch chosen: its own ops cast (in C++, to the same values: a 0/1 mask
        # multiplies exactly either side of the cast), sparing the Python casts a call.
        return _call_plan.CastsItself(_runner(x, weight, mask, bias, route))
    return _runner(*checked, route)


def conv1x1_plan(x, weight, mask, bias):
    """For SparseConv1x1's memo: its call on x (N, C, H, W) with the conv weight (O, C, 1, 1) and the
    (O, C) mask, as a runner of (x, weight, mask, bias) returning y in the product's layout, or None
    where the custom op must run. The op's checks and choice run on x's channels-last (N, H, W, C) view;
    where they choose plain PyTorch, F.conv2d on W * mask (oneDNN's 1x1 conv: no permutes or copies
    around F.linear, ~2x faster at 48 channels), else the chosen kernel on that view."""
    flat = lambda w: w.view(w.shape[0], -1)  # noqa: E731
    xp = x.permute(0, 2, 3, 1)
    checked = _checked(xp, flat(weight), mask, bias, None, None)
    route = _route(*checked)
    if route is None:
        return None
    if route.direct and route.name == "reference" and _describable(mask):
        # F.conv2d casts under autocast itself, in C++, as F.linear would
        return _call_plan.CastsItself(_plain_runner(weight, mask, F.conv2d))
    run = _runner(*checked, route)  # (checked: cast as the memo's autocast_args will cast the call's tensors)
    return lambda x, weight, mask, bias: run(x.permute(0, 2, 3, 1), flat(weight), mask, bias).permute(0, 3, 1, 2)


def autocast_args(x, tensors, dtype):
    """x and (weight, mask, bias) as the op casts them under autocast to `dtype` (a bool mask stays)."""
    weight, mask, bias = tensors
    return x.to(dtype), (weight.to(dtype), mask if mask.dtype == torch.bool else mask.to(dtype),
                         None if bias is None else bias.to(dtype))


def _checked(x, weight, mask, bias, pattern, block_size):
    """The arguments checked (TypeError/ValueError naming the bad one) and cast under autocast."""
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("weight", weight, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=x.device)
    _checks.tensor("mask", mask, device=x.device)
    _checks.shape("mask", mask, weight.shape)
    if mask.dtype not in (torch.bool, weight.dtype):
        raise TypeError("mask must be bool or have weight's dtype %s, got %s" % (weight.dtype, mask.dtype))
    if x.shape[-1] != weight.shape[1]:
        raise ValueError("x's last dim must equal weight's in_features %d, got shape %s"
                         % (weight.shape[1], tuple(x.shape)))
    _checks.optional_tensor("bias", bias, device=x.device)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],))
    check_pattern(pattern, block_size)
    if _describable(mask):
        # Cached per mask version, so this costs one pass over the mask only when the mask changes.
        info = _sparse_index.mask_info(mask)
        if pattern is not None:
            why = info.matches(pattern, block_size)
            if why:
                raise ValueError("mask does not fit pattern=%r: %s" % (pattern, why))
    cast = _checks.autocast_dtype(x.device.type)
    if cast is not None:
        x, (weight, mask, bias) = autocast_args(x, (weight, mask, bias), cast)
    _checks.same_dtype("weight", weight, x.dtype)
    _checks.same_dtype("bias", bias, x.dtype)
    return x, weight, mask, bias


def _route(x, weight, mask, bias):
    return _backends.eager_route("masked_linear", x.device, x, weight, mask, bias, reference_autograd=True)


def _runner(x, weight, mask, bias, route=None):
    """How this eager call runs (on `route`, else the one eager_route gives), as a function of (x, weight,
    mask, bias), or None where the custom op must choose for itself. It may keep what it derived from
    the mask (the memo's key holds the mask's identity and version), never the weight's values."""
    route = route or _route(x, weight, mask, bias)
    if route is None:
        return None
    if not route.direct:
        return lambda x, weight, mask, bias: _backends.through_custom_op(
            route, "masked_linear", torch.ops.effops.masked_linear, x, weight, mask, bias)
    if route.name != "reference":
        return route.fn  # no gradient needed: the kernel without the custom op
    if not _describable(mask):
        return reference.masked_linear  # no caches of wrapped or meta tensors
    return _plain_runner(weight, mask, F.linear)


def _plain_runner(weight, mask, product):
    """Plain PyTorch on W * mask as a runner of (x, weight, mask, bias): product(x, W * mask, bias), with
    product F.linear (masked_linear) or F.conv2d (SparseConv1x1's (out, in, 1, 1) weight: the (out, in)
    mask viewed in its shape). It keeps what it derives from the mask, never the weight's values."""
    info = _sparse_index.mask_info(mask)
    shape = weight.shape
    if torch.is_grad_enabled() and (weight.requires_grad or mask.requires_grad):
        # Training (a learned float mask too): W * mask changes every step. The reference's
        # product(x, weight * mask, bias) itself.
        if mask.dtype == weight.dtype:
            if mask.shape == shape:
                return lambda x, weight, mask, bias: product(x, weight * mask, bias)
            return lambda x, weight, mask, bias: product(x, weight * mask.view(shape), bias)
        # A bool mask multiplies ~5x slower (its promotion runs per element, every call): in weight's
        # dtype, made once per mask version. (The runner holds this derived copy, never the mask: the
        # functional memo holds its tensors weakly.)
        mask_w = _mask_as(info, mask, weight.dtype).view(shape)
        return lambda x, weight, mask, bias: product(x, weight * mask_w, bias)
    # Inference on a mask too dense for the sparse kernels: dense product on W * mask, made once per
    # weight version instead of per call (the cost plain PyTorch pays with a pre-masked weight).
    return lambda x, weight, mask, bias: product(x, _masked_weight(info, weight, mask), bias)


def _describable(mask):
    """Whether the mask's values can be read for its description (kept by data pointer): not under
    torch.compile (traced), inside a torch.func transform (a vmapped mask is a wrapper without storage)
    or on the meta device (no values: shapes only, the reference runs)."""
    return not (torch.compiler.is_compiling() or _backends.under_transform() or mask.device.type == "meta")


def check_pattern(pattern, block_size):
    """Validate a pattern / block_size pair (shared with SparseLinear and prune)."""
    if pattern is not None:
        _checks.choice("pattern", pattern, _sparse_index.PATTERNS)
    if block_size is not None:
        if pattern not in (None, "block"):
            raise ValueError("block_size applies to pattern='block' only, got pattern=%r" % (pattern,))
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError("block_size must be an int, got %r" % (block_size,))
        _checks.choice("block_size", block_size, (16, 32, 64))


@torch.library.custom_op("effops::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _backends.dispatch("masked_linear", x.device, x, weight, mask, bias)


@_masked_linear.register_fake
def _(x, weight, mask, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("effops::masked_linear_backward", mutates_args=())
def _masked_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mask: Tensor,
                            needs_input_grad: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    grads = _backends.dispatch("masked_linear_backward", x.device, grad_y, x, weight, mask, needs_input_grad)
    # A custom op cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_masked_linear_backward.register_fake
def _(grad_y, x, weight, mask, needs_input_grad):
    need_x, need_w, need_b = needs_input_grad
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_w else x.new_empty(0),
            x.new_empty(weight.shape[0]) if need_b else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, mask = ctx.saved_tensors
    need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
    grad_x, grad_w, grad_b = torch.ops.effops.masked_linear_backward(grad_y, x, weight, mask, need)
    grad_mask = None
    if ctx.needs_input_grad[2]:  # a float mask that requires grad: torch's autograd of weight * mask gives one
        grad_mask = reference.masked_linear_mask_gradient(grad_y, x, weight).to(mask.dtype)
    return (grad_x if need[0] else None, grad_w if need[1] else None, grad_mask, grad_b if need[2] else None)


_masked_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# cpu backend
# ---------------------------------------------------------------------------------------------
# Automatic choice: the highest density at which each cpu kernel still beats dense F.linear, and the
# smallest product (rows x out x in multiply-adds) worth the Python dispatch, index walk and packing.
# One table per kind of dense baseline, each measured at the level it names (2-core machines, set on the
# safe side):
# - "default" (fp32 and fp16 everywhere; bf16 where the CPU has no AVX512-BF16, so torch's bf16 GEMM is
#   slow): measured fp32 at the avx2 level (Zen 3) with density sweeps of the forced cpu backend against
#   F.linear. Block kernel, forward / forward+backward vs dense: 256 x 4096 x 4096 at 50% density
#   2.0-2.3x / 1.6x, at 70% 1.3-1.5x / 1.2-1.3x; 2048 rows at 75% 1.1-1.4x / 0.85-1.3x. The CSR kernel
#   1.7x at 10% and even at 20-25%; products under ~8M MACs were at best even. The CSR kernel vectorises
#   over 64 batch rows, so it also needs a batch (0.25x dense at 1 row, 1.96x at 32). At the avx512
#   level both kernels are faster than at avx2 and so is torch's fp32 GEMM; the table holds there
#   (benchmarks/bench_masked_linear.py runs every level).
# - "bf16_native" (bf16 on a CPU with AVX512-BF16, where torch's bf16 F.linear runs ~2.8x its fp32):
#   measured at the avx512_bf16 level (Zen 4), `python benchmarks/masked_bf16_crossover.py block32` and
#   `... unstructured`: block-32 forward / forward+backward 1.8x / 1.05-1.8x at 30% density, 1.2-1.4x /
#   0.93-1.46x at 45%; CSR 1.1-1.7x / 1.3-2.5x at 2%, 1.05-1.16x / 1.1-1.9x at 5%, 0.76-0.86x at 10%.
_CPU_LIMITS = {
    "default": {"block_max_density": 0.6, "csr_max_density": 0.15, "csr_min_rows": 32, "min_macs": 1 << 23},
    "bf16_native": {"block_max_density": 0.3, "csr_max_density": 0.04, "csr_min_rows": 32, "min_macs": 1 << 23},
}


def _cpu_limits(dtype):
    """The speed-rule table for products in `dtype` on this CPU (see _CPU_LIMITS)."""
    if dtype == torch.bfloat16 and cpu_isa.cpu_has_native_bf16():
        return _CPU_LIMITS["bf16_native"]
    return _CPU_LIMITS["default"]


def _cpu_decline(x, weight, mask):
    """A reason the cpu kernels cannot take this input, or None (they run any mask)."""
    if x.device.type != "cpu":
        return "cpu kernels take CPU tensors"
    if x.numel() == 0 or weight.numel() == 0:
        return "empty input"
    return None


def _cpu_slower(x, weight, mask):
    """Speed rule for the automatic choice: a reason dense F.linear is faster here, or None."""
    info = _sparse_index.mask_info(mask)
    rows = x.numel() // x.shape[-1]
    limits = _cpu_limits(x.dtype)
    if rows * weight.numel() < limits["min_macs"]:
        return "product too small (%d MACs): dense F.linear is faster" % (rows * weight.numel())
    if not info.block and rows < limits["csr_min_rows"]:
        return "%d rows: the CSR kernel needs >= %d to beat dense F.linear" % (rows, limits["csr_min_rows"])
    limit = limits["block_max_density"] if info.block else limits["csr_max_density"]
    if info.density > limit:
        return "mask %.0f%% dense, above the %.0f%% where the %s kernel beats dense F.linear" % (
            100 * info.density, 100 * limit, "block" if info.block else "csr")
    return None


def _masked_weight(info, w, mask):
    """W * mask (in w's shape) as the reference computes it, cached while the weight is unchanged (the
    automatic choice's dense path for inference, any device). Costs one dense copy of the weight while
    the mask lives."""
    return _sparse_index.cached_weight_form(info, w, ("masked", w.dtype),
                                            lambda: w * _mask_as(info, mask, w.dtype).view(w.shape))


def _mask_as(info, mask, dtype):
    """mask as 0/1 values of `dtype`, cached on the mask's description (rebuilt when the mask changes)."""
    if mask.dtype == dtype:
        return mask
    if mask.is_inference() or torch.is_inference_mode_enabled():
        return mask.to(dtype)  # an inference tensor: not kept (a later training call could not save it)
    converted = info.packs.get(("mask", dtype))
    if converted is None:
        converted = info.packs[("mask", dtype)] = mask.to(dtype)
    return converted


def _cpu_packed(info, w, transpose):
    """W (or W^T) kept blocks packed as fp32 panels for the cpu block kernel."""
    b = info.block
    ptr, idx = info.block_cols(b) if transpose else info.block_rows(b)
    return _sparse_index.cached_weight_form(info, w, ("block", transpose),
                         lambda: torch.ops.effops_cpu.masked_linear_block_pack(w, ptr, idx, b, transpose))


def _cpu_csr_values(info, w, transpose):
    """The kept weights in CSR (or, transposed, CSC) order: contiguous, read instead of W by index."""
    if transpose:  # CSC order: a permutation of the CSR values (W^T boolean indexing is much slower)
        return _sparse_index.cached_weight_form(info, w, ("csr", True),
                             lambda: _cpu_csr_values(info, w, False)[info.csr_to_csc()].contiguous())
    return _sparse_index.cached_weight_form(info, w, ("csr", False), lambda: w[info.bool_mask].contiguous())


def _padded_t(a, few_rows_ok=False, columns=None):
    """a[M, C] -> fp32 a^T in batch spans, [spans, C, width] (effops::cpu::SpannedT): width a multiple
    of 64 (the CSR kernels' chunk), at most 256, spans as even as 64-row chunks allow, rows past M zero.
    With few_rows_ok, up to 4 rows stay one unpadded span (the kernel's per-row path). Operands used
    together (grad_weight's gy^T and x^T) must share spans: pass the larger column count as `columns`."""
    m, c = a.shape
    if few_rows_ok and m <= 4:
        return a.t().to(torch.float32).contiguous().unsqueeze(0)
    # A span of ~6 MB at most: at 4096 inputs 256 rows; at 11008 inputs 128 rows (measured 256 x 4096 x
    # 11008, 90% unstructured: 1.4-2.2x dense with 256-row spans, 2.2-3.0x with 128).
    max_chunks = max(1, min(4, (6 << 20) // (4 * 64 * max(columns or c, 1))))
    chunks = -(-m // 64)
    spans = -(-chunks // max_chunks)
    width = 64 * -(-chunks // spans)
    out = a.new_zeros((spans, c, width), dtype=torch.float32)
    for s in range(spans):
        rows = a[s * width:(s + 1) * width]
        out[s, :, :rows.shape[0]] = rows.t()
    return out


def _cpu_masked_linear(x, weight, mask, bias):
    ops = torch.ops.effops_cpu
    info = _sparse_index.mask_info(mask)
    n, k = weight.shape
    x2, w, b = _sparse_index.linear_operands(x, weight, bias)
    if info.block:
        ptr, idx = info.block_rows(info.block)
        y = ops.masked_linear_block_mm(x2, _cpu_packed(info, w, False), n, b, ptr, idx, info.block)
    else:
        ptr, idx = info.csr()
        y = ops.masked_linear_csr_mm(_padded_t(x2, True), x2.shape[0], w, b, ptr, idx, False,
                                     _cpu_csr_values(info, w, False))
    return _checks.with_leading_dims(y, x)


def _cpu_masked_linear_backward(grad_y, x, weight, mask, needs_input_grad):
    ops = torch.ops.effops_cpu
    need_x, need_w, need_b = needs_input_grad
    info = _sparse_index.mask_info(mask)
    n, k = weight.shape
    g2 = grad_y.reshape(-1, n).contiguous()
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    grad_x = grad_w = None
    if info.block:
        b = info.block
        if need_x:
            grad_x = ops.masked_linear_block_mm(g2, _cpu_packed(info, w, True), k, None, *info.block_cols(b),
                                                b).reshape(x.shape)
        if need_w:
            grad_w = ops.masked_linear_block_grad_weight(g2, x2, *info.block_rows(b), b)
    else:
        gT = _padded_t(g2, columns=max(n, k))
        if need_x:
            grad_x = ops.masked_linear_csr_mm(_padded_t(g2, True) if g2.shape[0] <= 4 else gT, g2.shape[0], w, None, *info.csc(), True,
                                              _cpu_csr_values(info, w, True)).reshape(x.shape)
        if need_w:
            grad_w = ops.masked_linear_csr_grad_weight(gT, _padded_t(x2, columns=max(n, k)), *info.csr(),
                                                       weight.dtype)
    grad_b = g2.sum(0) if need_b else None
    return grad_x, grad_w, grad_b


_backends.register_kernel("masked_linear", "cpu", _cpu_masked_linear,
                          supports=lambda x, weight, mask, bias: _cpu_decline(x, weight, mask),
                          faster=lambda x, weight, mask, bias: _cpu_slower(x, weight, mask))
_backends.register_kernel("masked_linear_backward", "cpu", _cpu_masked_linear_backward,
                          supports=lambda grad_y, x, weight, mask, need: _cpu_decline(x, weight, mask),
                          faster=lambda grad_y, x, weight, mask, need: _cpu_slower(x, weight, mask))


# ---------------------------------------------------------------------------------------------
# triton backend (imported on first use: Triton stays out of `import effops`)
# ---------------------------------------------------------------------------------------------
def _triton_decline(x, weight, mask):
    """Automatic choice only where the Triton kernels should beat cuBLAS: block masks up to 50% dense.

    Not yet measured on a GPU (none here): the unstructured / 2:4 kernels do dense FLOPs and are left
    to forcing (use_backend("triton")) until a GPU run sets their crossover."""
    if x.numel() == 0:
        return None
    info = _sparse_index.mask_info(mask)
    if not info.block:
        return "unstructured / 2:4 Triton kernels are not chosen automatically (no GPU crossover measured yet)"
    if info.density > 0.5:
        return "block mask %.0f%% dense: cuBLAS on W * mask is expected to be faster" % (100 * info.density)
    return None


def _triton_supports(x, weight):
    """The Triton kernels index with int32 element offsets: every operand and result under 2**31 elements."""
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    if max(x.numel(), rows * n, n * k) >= 2 ** 31:
        return "tensors of 2**31 elements or more (int32 offsets in the Triton kernels)"
    return None


_backends.register_kernel("masked_linear", "triton", "effops.triton_kernels.masked_matmul:masked_linear",
                          supports=lambda x, weight, mask, bias: _triton_supports(x, weight),
                          faster=lambda x, weight, mask, bias: _triton_decline(x, weight, mask))
_backends.register_kernel("masked_linear_backward", "triton",
                          "effops.triton_kernels.masked_matmul:masked_linear_backward",
                          supports=lambda grad_y, x, weight, mask, need: _triton_supports(x, weight),
                          faster=lambda grad_y, x, weight, mask, need: _triton_decline(x, weight, mask))

