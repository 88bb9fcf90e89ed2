"""int8_mm, int8_linear and Int8Linear's int8_linear_dynamic.

The ops are C++ (csrc/bindings/int8_gemm.cpp, int8_linear_dynamic.cpp): schema, checks, the CPU and CUDA
policies, autograd. Here: the Python functions, and the Triton routes those implementations call.
"""
import contextlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from effops import _ext
from effops.reference import int8 as reference

MAX_K = reference.MAX_K
_EXT = _ext.load()
_fwd_ad = torch.autograd.forward_ad
_interpreter_stack = torch._C._functorch.peek_interpreter_stack


def runs_reference():
    """True where the reference runs in place of the op: without the compiled extension, and inside
    torch.func transforms and forward-mode AD (torch batches and differentiates the reference's ops; the
    C++ op has no rules for them and would drop their tangents)."""
    if torch.compiler.is_compiling():
        return not _EXT
    return not _EXT or _interpreter_stack() is not None or _fwd_ad._current_level >= 0


def int8_mm(a, b):
    """a (M, K) int8 @ b (K, N) int8 -> (M, N) int32, exact (K <= MAX_K, so nothing overflows)."""
    if runs_reference():
        return reference.int8_mm(a, b)
    return torch.ops.effops.int8_mm.default(a, b)


def int8_linear(x_int8, x_scale, w_int8, w_scale, bias=None, out_dtype=torch.float32):
    """(x_int8 @ w_int8^T) * x_scale[..., None] * w_scale + bias, as out_dtype.

    x_int8 (..., K) int8; x_scale (...) fp32; w_int8 (N, K) int8; w_scale (N,) fp32; bias (N,) float or
    None (used in fp32). int32 accumulation (exact), then an fp32 epilogue fused into the GEMM. No
    gradient: scales or a bias that require one are refused.
    """
    if runs_reference():
        return reference.int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)
    return torch.ops.effops.int8_linear.default(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)


def int8_linear_dynamic(x, w_packed, w_scale, bias, out_features, weight_only=False, w_corr=None):
    """Int8Linear's forward: x (..., K) float, w_packed = reference.int8.pack_weight of an (N, K) int8
    weight, w_scale (N,) fp32, bias (N,) fp32 or None. Output in x's dtype (autocast's under autocast).
    x gets a straight-through gradient (x's rounding treated as identity); bias gets its usual gradient.

    w_corr: None, or reference.int8.weight_correction(w_packed) for weights that are all in [-63, 63]
    (Int8Linear's weight_bits=7), with which the CPU kernel skips the sign handling. It is a promise
    about w_packed, not checked per call: with other weights the CPU result is wrong.
    """
    if runs_reference():
        return reference.int8_linear_dynamic_straight_through(x, w_packed, w_scale, bias, out_features, weight_only,
                                                              w_corr)
    return torch.ops.effops.int8_linear_dynamic.default(x, w_packed, w_scale, bias, out_features, weight_only, w_corr)


# ---------------------------------------------------------------------------------------------
# Triton routes (effops/triton_kernels/int8_gemm.py, imported on first use), which the C++
# implementations call on CUDA tensors and, when triton is forced, in the interpreter on CPU tensors.
# ---------------------------------------------------------------------------------------------
def _kernels():
    from effops.triton_kernels import int8_gemm
    return int8_gemm


def on_device(t):
    """Triton launches on the current CUDA device, not the tensors': make theirs current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


if importlib.util.find_spec("triton") is not None:
    @torch.library.custom_op("effops::int8_mm_triton", mutates_args=())
    def _int8_mm_triton(a: Tensor, b: Tensor) -> Tensor:
        with on_device(a):
            return _kernels().int8_mm(a, b)

    @torch.library.custom_op("effops::int8_linear_triton", mutates_args=())
    def _int8_linear_triton(x_int8: Tensor, x_scale: Tensor, w_int8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                            out_dtype: torch.dtype) -> Tensor:
        with on_device(x_int8):
            return _kernels().int8_linear(x_int8, x_scale, w_int8, w_scale, bias, out_dtype)

    @torch.library.custom_op("effops::int8_linear_dynamic_triton", mutates_args=())
    def _int8_linear_dynamic_triton(x: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                                    out_features: int) -> Tensor:
        with on_device(x):
            return _kernels().int8_linear_dynamic(x, w_packed.contiguous(), w_scale.contiguous(),
                                                  None if bias is None else bias.contiguous(), out_features)
