"""effops.ops.int8_mm, int8_linear and int8_linear_dynamic (Int8Linear's op).

The ops, their checks, their policies and autograd are C++ (csrc/bindings/int8_gemm.cpp,
int8_linear_dynamic.cpp). This module adds what only Python can do (the reference inside torch.func
transforms and without the extension) and registers the Triton routes the C++ ops call on CUDA
tensors (and on CPU tensors in Triton's interpreter, for tests).
"""
import importlib.util

import torch

from effops import _backends, _ext
from effops.reference import int8 as reference

MAX_K = reference.MAX_K
# The backends with a kernel (tests, `effops info`): int8_mm and int8_linear; int8_linear_dynamic has
# no CUDA C++ kernel (Triton serves CUDA tensors) and its weight_only mode no Triton one.
BACKENDS = ("reference", "cpu", "cuda", "triton")
DYNAMIC_BACKENDS = ("reference", "cpu", "triton")


def int8_mm(a, b):
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact (K <= MAX_K, so nothing overflows)."""
    if _backends.under_transform() or not _ext.load():
        return reference.int8_mm(a, b)
    return torch.ops.effops.int8_mm.default(a, b)


def int8_linear(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """(x_int8 @ w_int8^T) * x_scale[..., None] * w_scale + bias, as out_dtype.

    x_int8 (..., K) int8; x_scale (...) fp32; w_int8 (N, K) int8; w_scale (N,) fp32; bias (N,) float or
    None (used in fp32). int32 accumulation (exact), then an fp32 epilogue fused into the GEMM. No
    gradient: scales or a bias that require one are refused.
    """
    if _backends.under_transform() or not _ext.load():
        return reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    return torch.ops.effops.int8_linear.default(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


def int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only=False, w_corr=None, weight_bits=8):
    """Int8Linear's forward as an op: x (..., K) float against a packed int8 weight -> (..., N) in x's dtype.

    x: (..., K) fp32, bf16 or fp16, any leading dims (none, or empty ones, included); w_packed:
    reference.int8.pack_weight of an (N, K) int8 weight; w_scale: (N,) fp32 (per output channel);
    bias: (N,) fp32 or None; out_features: N (the packed weight is padded to multiples of 16 x 4).
    The output is in x's dtype (autocast's under autocast).

    weight_only=False: x is quantized per row at run time (quantize_rowwise), multiplied with int32
    accumulation, and dequantized in the GEMM's epilogue: (q @ w_int8^T) * x_scale[..., None] * w_scale
    + bias. weight_only=True: x stays floating, y = x @ (w_int8 * w_scale)^T + bias in fp32. Both as
    reference.int8.int8_linear_dynamic.

    Gradients: x gets a straight-through one, grad_y @ (w_int8 * w_scale) (x's rounding treated as
    identity); bias its usual one; the int8 weight and its scale none.

    w_corr: None, or reference.int8.weight_correction(w_packed) (int32, -128 x the weight's column sums;
    Int8Linear keeps it as module state): with it the CPU kernel starts its sums there instead of summing
    the weight's columns per call. Its dtype, device and shape are checked, its values are not (a pass
    over the weights per call): a w_corr of other weights gives a wrong CPU result.
    weight_bits: 8, or 7, a promise that every weight is in [-63, 63] (Int8Linear's weight_bits=7), with
    which the CPU kernel skips the sign handling below VNNI; 7 requires w_corr. Neither changes the
    definition (the result is the same integers either way).
    """
    if _backends.under_transform() or not _ext.load():
        # torch.func transforms and forward-mode AD differentiate and batch torch's own ops: the
        # reference, with the straight-through gradient written in them.
        return reference.int8_linear_dynamic_straight_through(x, w_packed, w_scale, bias, out_features, weight_only,
                                                              w_corr, weight_bits)
    op = _DYNAMIC_OP.get("op")
    if op is None:  # looked up once: torch.ops.effops.int8_linear_dynamic.default costs ~0.2 us a call
        op = torch.ops.effops.int8_linear_dynamic.default
        if not torch.compiler.is_compiling():  # (a store while dynamo traces would recompile the next call)
            _DYNAMIC_OP["op"] = op
    return op(x, w_packed, w_scale, bias, out_features, weight_only, w_corr, weight_bits)


_DYNAMIC_OP = {}


# ---------------------------------------------------------------------------------------------
# The Triton routes (the kernels are imported on first use: Triton stays out of `import effops`)
# ---------------------------------------------------------------------------------------------
def _triton_int8_mm(a, b):
    from effops.triton_kernels.int8_gemm import int8_mm as launch
    return launch(a, b)


def _triton_int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype):
    from effops.triton_kernels.int8_gemm import int8_linear as launch
    return launch(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


def _triton_int8_linear_dynamic(x, w_packed, w_scale, bias, out_features):
    from effops.triton_kernels.int8_gemm import int8_linear_dynamic as launch
    return launch(x, w_packed.contiguous(), w_scale.contiguous(), None if bias is None else bias.contiguous(),
                  out_features)


def _register_triton_routes():
    if importlib.util.find_spec("triton") is None or not _ext.load():
        return None
    lib = torch.library.Library("effops", "FRAGMENT")
    lib.define("_int8_mm_triton(Tensor a, Tensor b) -> Tensor")
    lib.define("_int8_linear_triton(Tensor x_int8, Tensor x_scale, Tensor w_int8, Tensor w_scale, Tensor? bias, "
               "ScalarType out_dtype) -> Tensor")
    lib.define("_int8_linear_dynamic_triton(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias, "
               "int out_features) -> Tensor")
    for name, fn in (("_int8_mm_triton", _triton_int8_mm), ("_int8_linear_triton", _triton_int8_linear),
                     ("_int8_linear_dynamic_triton", _triton_int8_linear_dynamic)):
        lib.impl(name, _backends.on_tensors_device(fn), "CompositeExplicitAutograd")
    return lib


_TRITON_LIBRARY = _register_triton_routes()  # kept: the registrations live as long as the Library object
