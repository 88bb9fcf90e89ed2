"""effops::int8_mm, effops::int8_linear and Int8Linear's effops::int8_linear_dynamic.

* int8_mm(a, b): (M, K) int8 @ (K, N) int8 -> (M, N) int32, exactly a.int() @ b.int() (like torch._int_mm).
* int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype): int32 accumulation, then the row and
  column scales, the bias and the cast to out_dtype in the kernel's epilogue.
* int8_linear_dynamic(x, w_packed, ...): the module's op on float x: per-row quantization of x, the
  int8 GEMM on prepacked weights (reference.int8.pack_weight) and the epilogue; or, with weight_only,
  float x times the dequantized int8 weights. Its autograd gives x a straight-through gradient.

Public functions check arguments; the custom ops (schema, fake kernel, autograd) dispatch to a backend.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from effops import _backends
from effops.ops import _checks
from effops.reference import int8 as reference

MAX_K = reference.MAX_K

for _op in ("int8_mm", "int8_linear", "int8_linear_dynamic", "int8_linear_dynamic_backward"):
    _backends.register_kernel(_op, "reference", getattr(reference, _op))


def _dense(t):
    """t with unit strides (the kernels index vectors and packed panels as dense arrays), or None."""
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------
# cpu backend (effops._C). Declines only where plain PyTorch is as fast (measured: see docs/int8.md).
# ---------------------------------------------------------------------------------------------
def _cpu_int8_mm(a, b):
    return torch.ops.effops_cpu.int8_mm(a.contiguous(), b.contiguous())


def _cpu_int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    k = x_int8.shape[-1]
    y = torch.ops.effops_cpu.int8_linear(x_int8.reshape(-1, k).contiguous(), x_scale.reshape(-1).contiguous(),
                                         w_int8.contiguous(), w_scale.contiguous(), _dense(bias), out_dtype)
    return _checks.with_leading_dims(y, x_int8)


def _cpu_int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None):
    k = x.shape[-1]
    y = torch.ops.effops_cpu.int8_linear_dynamic(x.reshape(-1, k).contiguous(), w_packed.contiguous(),
                                                 w_scale.contiguous(), _dense(bias), out_features, weight_only,
                                                 _dense(w_corr))
    return _checks.with_leading_dims(y, x)


_backends.register_kernel("int8_mm", "cpu", _cpu_int8_mm)
_backends.register_kernel("int8_linear", "cpu", _cpu_int8_linear)
# The weight-only kernel re-reads the int8 weights for every row: past 16 rows dequantizing once and an
# fp32 GEMM (the reference) is as fast or faster.
WEIGHT_ONLY_MAX_ROWS = 16
_backends.register_kernel("int8_linear_dynamic", "cpu", _cpu_int8_linear_dynamic,
                          supports=lambda x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None:
                          "weight_only with more than %d rows (reference: dequantize + fp32 GEMM is faster)"
                          % WEIGHT_ONLY_MAX_ROWS if weight_only and x.numel() // x.shape[-1] > WEIGHT_ONLY_MAX_ROWS
                          else None)

# ---------------------------------------------------------------------------------------------
# triton backend (imported lazily)
# ---------------------------------------------------------------------------------------------
_INT32_LIMIT = 2 ** 31


def _triton_declines(*tensors, out_numel=0):
    # The Triton kernel uses int32 element offsets.
    if max([t.numel() for t in tensors if t is not None] + [out_numel]) >= _INT32_LIMIT:
        return "tensors of 2**31 elements or more (int32 offsets in the Triton kernel)"
    return None


_backends.register_kernel("int8_mm", "triton", "effops.triton_kernels.int8_gemm:int8_mm",
                          supports=lambda a, b: _triton_declines(a, b, out_numel=a.shape[0] * b.shape[1]))
_backends.register_kernel("int8_linear", "triton", "effops.triton_kernels.int8_gemm:int8_linear",
                          supports=lambda x, xs, w, ws, bias, out_dtype: _triton_declines(
                              x, w, out_numel=x.numel() // x.shape[-1] * w.shape[0]))
def _triton_int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None):
    # The Triton GEMM is exact for any int8 weights, 7-bit ones included: w_corr (a CPU-kernel detail)
    # is not needed.
    from effops.triton_kernels.int8_gemm import int8_linear_dynamic as launch
    return launch(x, w_packed.contiguous(), w_scale.contiguous(), _dense(bias), out_features, weight_only)


_backends.register_kernel("int8_linear_dynamic", "triton", _triton_int8_linear_dynamic,
                          supports=lambda x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None:
                          "weight_only mode has no Triton kernel" if weight_only else _triton_declines(
                              x, w_packed, out_numel=x.numel() // x.shape[-1] * out_features))


# ---------------------------------------------------------------------------------------------
# cuda backend (effops._C built with CUDA kernels)
# ---------------------------------------------------------------------------------------------
def _cuda_int8_mm(a, b):
    return torch.ops.effops_cuda.int8_mm(a.contiguous(), b.contiguous())


def _cuda_int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    k = x_int8.shape[-1]
    y = torch.ops.effops_cuda.int8_linear(x_int8.reshape(-1, k).contiguous(), x_scale.reshape(-1).contiguous(),
                                          w_int8.contiguous(), w_scale.contiguous(), _dense(bias), out_dtype)
    return _checks.with_leading_dims(y, x_int8)


def _cuda_slower(op):
    """Automatic choice on CUDA: the Triton GEMM wherever it takes the input. This kernel stages 64 x 64
    tiles with plain loads and mma.sync, no asynchronous copies or pipelining; Triton's is autotuned
    over pipelined 128-wide tiles and compiles to warpgroup MMA (IGMMA) on sm_90 (the compile check's
    SASS). No GPU has measured either yet: forcing use_backend("cuda") runs this one, and it stays the
    automatic choice where Triton is missing or declines (2**31 elements and more: int32 offsets)."""
    def faster(*args):
        triton = _backends._kernels[op].get("triton")
        if triton is None or not _backends._usable("triton") or (triton.supports and triton.supports(*args)):
            return None
        return "the autotuned Triton GEMM is expected to be faster (no GPU measurement yet)"
    return faster


# The CUDA kernel puts column tiles (64 wide) on grid.y, which stops at 65535 (csrc/cuda/int8_gemm.cu).
CUDA_MAX_N = 65535 * 64


def _cuda_declines(n):
    if n > CUDA_MAX_N:
        return "%d output columns: the CUDA kernel launches at most %d (64-wide tiles on grid.y)" % (n, CUDA_MAX_N)
    return None


_backends.register_kernel("int8_mm", "cuda", _cuda_int8_mm, supports=lambda a, b: _cuda_declines(b.shape[1]),
                          faster=_cuda_slower("int8_mm"))
_backends.register_kernel("int8_linear", "cuda", _cuda_int8_linear,
                          supports=lambda x, xs, w, ws, bias, out_dtype: _cuda_declines(w.shape[0]),
                          faster=_cuda_slower("int8_linear"))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _check_k(name, k):
    if k < 1:
        raise ValueError("%s must be >= 1, got %d" % (name, k))
    if k > MAX_K:
        raise ValueError("%s must be <= %d so that the int32 accumulator cannot overflow, got %d" % (name, MAX_K, k))


def _check_out_dtype(out_dtype):
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError("out_dtype must be a torch.dtype, got %s" % type(out_dtype).__name__)
    if out_dtype not in _checks.FLOAT_DTYPES:
        raise ValueError("out_dtype must be one of %s, got %s" % (_checks.FLOAT_DTYPES, out_dtype))


# ---------------------------------------------------------------------------------------------
# int8_mm
# ---------------------------------------------------------------------------------------------
def int8_mm(a, b):
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact (K <= MAX_K, so nothing overflows)."""
    _checks.tensor("a", a, ndim=2, dtypes=(torch.int8,))
    _checks.tensor("b", b, ndim=2, dtypes=(torch.int8,), device=a.device)
    if a.shape[1] != b.shape[0]:
        raise ValueError("b's first dim must equal a's second dim %d, got b of shape %s" % (a.shape[1], tuple(b.shape)))
    _check_k("a's second dim (K)", a.shape[1])
    route = _backends.eager_route("int8_mm", a.device, a, b)
    if route is not None and route.direct:  # eager, no gradient needed: skip the custom op's dispatch
        return route.fn(a, b)
    return _backends.through_custom_op(route, "int8_mm", torch.ops.effops.int8_mm, a, b)


@torch.library.custom_op("effops::int8_mm", mutates_args=())
def _int8_mm(a: Tensor, b: Tensor) -> Tensor:
    return _backends.dispatch("int8_mm", a.device, a, b)


@_int8_mm.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# int8_linear
# ---------------------------------------------------------------------------------------------
def int8_linear(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """(x_int8 @ w_int8^T) * x_scale[..., None] * w_scale + bias, as out_dtype.

    x_int8 (..., K) int8; x_scale (...) fp32; w_int8 (N, K) int8; w_scale (N,) fp32; bias (N,) float or
    None (used in fp32). int32 accumulation (exact), then an fp32 epilogue fused into the GEMM.
    """
    _checks.tensor("x_int8", x_int8, min_ndim=1, dtypes=(torch.int8,))
    dev = x_int8.device
    _checks.tensor("x_scale", x_scale, dtypes=(torch.float32,), device=dev)
    _checks.shape("x_scale", x_scale, x_int8.shape[:-1])
    _checks.tensor("w_int8", w_int8, ndim=2, dtypes=(torch.int8,), device=dev)
    if w_int8.shape[1] != x_int8.shape[-1]:
        raise ValueError("w_int8 must have shape (N, %d) to match x_int8's last dim, got %s"
                         % (x_int8.shape[-1], tuple(w_int8.shape)))
    _check_k("x_int8's last dim (K)", x_int8.shape[-1])
    _checks.tensor("w_scale", w_scale, dtypes=(torch.float32,), device=dev)
    _checks.shape("w_scale", w_scale, (w_int8.shape[0],))
    _checks.optional_tensor("bias", bias, dtypes=_checks.FLOAT_DTYPES, device=dev)
    if bias is not None:
        _checks.shape("bias", bias, (w_int8.shape[0],))
        bias = bias.float()
    _check_out_dtype(out_dtype)
    if torch.is_grad_enabled():
        for name, t in (("x_scale", x_scale), ("w_scale", w_scale), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError("int8_linear has no gradient: %s requires grad (detach it; Int8Linear gives its "
                                 "floating input a straight-through gradient)" % name)
    route = _backends.eager_route("int8_linear", x_int8.device, x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    if route is not None and route.direct:  # eager, no gradient needed: skip the custom op's dispatch
        return route.fn(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    return _backends.through_custom_op(route, "int8_linear", torch.ops.effops.int8_linear, x_int8, x_scale, w_int8,
                                       w_scale, bias, out_dtype)


@torch.library.custom_op("effops::int8_linear", mutates_args=())
def _int8_linear(x_int8: Tensor, x_scale: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 out_dtype: torch.dtype) -> Tensor:
    return _backends.dispatch("int8_linear", x_int8.device, x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


@_int8_linear.register_fake
def _(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    return x_int8.new_empty((*x_int8.shape[:-1], w_int8.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# int8_linear_dynamic: Int8Linear's op (float in, float out, gradient to x)
# ---------------------------------------------------------------------------------------------
def int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only=False, w_corr=None):
    """Int8Linear's forward: x (..., K) float, w_packed from reference.int8.pack_weight of an (N, K) int8
    weight, w_scale (N,) fp32, bias (N,) fp32 or None. Output in x's dtype (autocast's under autocast).
    x gets a straight-through gradient (x's rounding treated as identity); bias gets its usual gradient.

    w_corr: None, or reference.int8.weight_correction(w_packed) for weights that are all in [-63, 63]
    (Int8Linear's weight_bits=7): a promise about the weights that lets the CPU kernel skip the sign
    handling (same result; with weights outside [-63, 63] the CPU result would be wrong)."""
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    k = x.shape[-1]
    _check_k("x's last dim (in_features)", k)
    _checks.tensor("w_packed", w_packed, ndim=4, dtypes=(torch.int8,), device=x.device)
    nr, kg = reference.PACK_NR, reference.PACK_KG
    expected = (-(-out_features // nr), -(-k // kg), nr, kg)
    _checks.shape("w_packed", w_packed, expected)
    _checks.tensor("w_scale", w_scale, dtypes=(torch.float32,), device=x.device)
    _checks.shape("w_scale", w_scale, (out_features,))
    _checks.optional_tensor("bias", bias, dtypes=(torch.float32,), device=x.device)
    if bias is not None:
        _checks.shape("bias", bias, (out_features,))
    _checks.optional_tensor("w_corr", w_corr, dtypes=(torch.int32,), device=x.device)
    if w_corr is not None:
        _checks.shape("w_corr", w_corr, (expected[0] * nr,))
        w_corr = w_corr.contiguous()
        # A promise the CPU kernel relies on: checked here (one pass over the weights; Int8Linear, whose
        # buffers hold it by construction, calls run_int8_linear_dynamic and skips this).
        if not torch.compiler.is_compiling():
            if w_packed.numel() and (int(w_packed.min()) < -63 or int(w_packed.max()) > 63):
                raise ValueError("w_corr is for weights in [-63, 63] (weight_bits=7); w_packed holds values in "
                                 "[%d, %d]" % (int(w_packed.min()), int(w_packed.max())))
            if not torch.equal(w_corr, reference.weight_correction(w_packed)):
                raise ValueError("w_corr must equal effops.reference.int8.weight_correction(w_packed)")
    return run_int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, bool(weight_only), w_corr)


def run_int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr):
    """int8_linear_dynamic after its checks (Int8Linear calls this directly: its buffers are valid by
    construction, and re-checking them costs microseconds per call that show at M = 1)."""
    cast = _checks.autocast_dtype(x.device.type)
    if cast is not None:
        x = x.to(cast)
    run = int8_linear_dynamic_runner(x, w_packed, w_scale, bias, out_features, weight_only, w_corr)
    if run is not None:
        return run(x, w_packed, w_scale, bias)
    return torch.ops.effops.int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only, w_corr)


def int8_linear_dynamic_runner(x, w_packed, w_scale, bias, out_features, weight_only, w_corr):
    """How this eager call runs, as a function of (x, w_packed, w_scale, bias) (out_features, weight_only
    and w_corr, derived from w_packed, bound), or None where the custom op must choose for itself
    (_backends.eager_route). No autocast cast here: the caller's (x only)."""
    if _backends.under_transform():
        # vmap, grad, jvp and forward-mode AD see torch's ops only: a custom op (or kernel) would drop
        # their tangents silently. The op in plain PyTorch, with the straight-through gradient.
        return lambda x, w_packed, w_scale, bias: reference.int8_linear_dynamic_straight_through(
            x, w_packed, w_scale, bias, out_features, weight_only, w_corr)
    route = _backends.eager_route("int8_linear_dynamic", x.device, x, w_packed, w_scale, bias, out_features,
                                  weight_only, w_corr)
    if route is None:
        return None
    if route.direct:
        # Eager and no gradient needed: the chosen kernel without the custom op's Python machinery.
        kernel = route.fn
        return lambda x, w_packed, w_scale, bias: kernel(x, w_packed, w_scale, bias, out_features, weight_only,
                                                         w_corr)
    return lambda x, w_packed, w_scale, bias: _backends.through_custom_op(
        route, "int8_linear_dynamic", torch.ops.effops.int8_linear_dynamic, x, w_packed, w_scale, bias,
        out_features, weight_only, w_corr)


@torch.library.custom_op("effops::int8_linear_dynamic", mutates_args=())
def _int8_linear_dynamic(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor], out_features: int,
                         weight_only: bool, w_corr: Optional[Tensor] = None) -> Tensor:
    return _backends.dispatch("int8_linear_dynamic", x.device, x, w_packed, w_scale, bias, out_features, weight_only,
                              w_corr)


@_int8_linear_dynamic.register_fake
def _(x, w_packed, w_scale, bias, out_features, weight_only, w_corr=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("effops::int8_linear_dynamic_backward", mutates_args=())
def _int8_linear_dynamic_backward(grad_y: Tensor, w_packed: Tensor, w_scale: Tensor, in_features: int,
                                  need_bias: bool) -> Tuple[Tensor, Tensor]:
    grad_x, grad_b = _backends.dispatch("int8_linear_dynamic_backward", grad_y.device, grad_y, w_packed, w_scale,
                                        in_features, need_bias)
    # A custom op cannot return None: an unneeded gradient travels as an empty tensor.
    return grad_x, grad_b if grad_b is not None else grad_y.new_empty(0, dtype=torch.float32)


@_int8_linear_dynamic_backward.register_fake
def _(grad_y, w_packed, w_scale, in_features, need_bias):
    grad_x = grad_y.new_empty((*grad_y.shape[:-1], in_features))
    return grad_x, grad_y.new_empty(w_scale.shape[0] if need_bias else 0, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, w_packed, w_scale, bias, out_features, weight_only, w_corr = inputs
    ctx.save_for_backward(w_packed, w_scale)
    ctx.in_features = x.shape[-1]
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    w_packed, w_scale = ctx.saved_tensors
    need_bias = ctx.has_bias and ctx.needs_input_grad[3]
    grad_x, grad_b = torch.ops.effops.int8_linear_dynamic_backward(grad_y.contiguous(), w_packed, w_scale,
                                                                   ctx.in_features, need_bias)
    return (grad_x if ctx.needs_input_grad[0] else None, None, None, grad_b if need_bias else None, None, None,
            None)


_int8_linear_dynamic.register_autograd(_backward, setup_context=_setup_context)
