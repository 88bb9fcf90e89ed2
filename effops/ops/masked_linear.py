"""effops.ops.masked_linear: F.linear(x, weight * mask, bias) touching only kept weights.

The op, its checks, speed policy, autograd and autocast are C++ (csrc/bindings/masked_linear.cpp); this
module holds what only Python can do: the pattern hints, the reference under torch.func transforms and
forward-mode AD (and without the compiled extension), and the Triton launchers the C++ op calls for the
triton backend (triton_kernels/masked_matmul.py, imported on first use).
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from effops import _ext
from effops.reference import masked_linear as reference

PATTERNS = ("unstructured", "block", "2:4")
BACKENDS = ("reference", "cpu", "triton")  # the backends with a kernel for this op (tests, `effops info`)


def masked_linear(x, weight, mask, bias=None, *, pattern=None, block_size=None, index=None, packed=None):
    """y = x @ (weight * mask)^T + bias for x of shape (..., in_features).

    weight: (out_features, in_features); mask: same shape, bool or 0/1 in weight's dtype;
    bias: (out_features,) or None. Output has x's leading dims and dtype (autocast's under autocast).
    pattern / block_size (optional): declare the mask's structure ("unstructured", "block" with
    block_size in 16/32/64, "2:4"); a mask that does not fit raises ValueError. The op detects the
    structure itself from the mask on every call, so the hint only validates.
    index (optional): masked_linear_index(mask), built once where the mask is set (SparseLinear holds
    it): the call then skips scanning the mask. It must be rebuilt whenever the mask changes.
    packed (optional, with index): masked_linear_pack(weight, index), the kept weights in the CPU kernels'
    layout, read instead of the weight by the forward; it must be rebuilt whenever the weight changes.
    """
    if pattern is not None or block_size is not None:
        check_pattern(pattern, block_size)
        if pattern is not None and isinstance(mask, Tensor) and _has_values(mask):
            why = mask_fits(mask, pattern, block_size)
            if why:
                raise ValueError("mask does not fit pattern=%r: %s" % (pattern, why))
    if torch.compiler.is_compiling():
        return torch.ops.effops.masked_linear(x, weight, mask, bias, index, packed)
    for name, value in (("x", x), ("weight", weight), ("mask", mask)):
        if not isinstance(value, Tensor):
            raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(value).__name__))
    if _OP is None or x.layout is not torch.strided or _under_transform():
        # torch differentiates and batches torch's own ops, not ours (a C++ op has no forward-mode rule);
        # F.linear also takes sparse x
        return reference.masked_linear(x, weight, mask, bias)
    return _OP(x, weight, mask, bias, index, packed)


def masked_linear_index(mask):
    """The mask's index for masked_linear(..., index=): block size, kept count and the kept lists per row
    and per column (a list of tensors on the mask's device). None without the compiled extension."""
    return None if _OP is None else torch.ops.effops.masked_linear_index(mask)


def masked_linear_pack(weight, index):
    """The kept weights of a CPU weight in the forward kernel's layout (block panels or CSR values), for
    masked_linear(..., index=index, packed=...): a copy of what they are now. None without the extension."""
    return None if _OP is None else torch.ops.effops.masked_linear_pack(weight, index)


def route_reason(x, weight, mask, device="cpu"):
    """Why the automatic choice runs plain PyTorch for this call on `device` ("cpu" or "cuda"), or ""
    where it runs effops' kernels. x and weight may be meta tensors; the mask's values are read."""
    return torch.ops.effops_cpu.masked_linear_route_reason(x, weight, mask, device)


def _under_transform():
    """Inside a torch.func transform (its tensors wrap others) or a forward-mode AD level (dual tensors)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd.forward_ad._current_level >= 0


def _has_values(mask):
    """Whether the mask's values can be read: not traced, wrapped by a transform, or on the meta device."""
    return not (torch.compiler.is_compiling() or _under_transform() or mask.device.type == "meta")


# ---------------------------------------------------------------------------------------------
# Mask checks shared with SparseLinear and prune
# ---------------------------------------------------------------------------------------------
def check_pattern(pattern, block_size):
    """Validate a pattern / block_size pair."""
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError("pattern must be one of %s, got %r" % (PATTERNS, pattern))
    if block_size is not None:
        if pattern not in (None, "block"):
            raise ValueError("block_size applies to pattern='block' only, got pattern=%r" % (pattern,))
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError("block_size must be an int, got %r" % (block_size,))
        if block_size not in (16, 32, 64):
            raise ValueError("block_size must be one of (16, 32, 64), got %r" % (block_size,))


def check_binary(mask):
    """ValueError unless a non-bool mask holds only 0 and 1."""
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError("mask must hold only 0 and 1 (or be bool), found %r" % bad)


def mask_fits(mask, pattern, block_size=None):
    """None when the 2-D mask fits `pattern` (and block_size), else why not."""
    m = mask if mask.dtype == torch.bool else mask != 0
    if pattern == "block":
        b = block_size or 32
        if not _block_constant(m, b):
            return "it is not constant over %d x %d blocks" % (b, b)
    elif pattern == "2:4" and not _keeps_at_most(m, 2, 4):
        return "some group of 4 consecutive inputs keeps more than 2 weights"
    return None


def _block_constant(m, b):
    n, k = m.shape
    if n == 0 or k == 0:
        return True
    nb, kb = -(-n // b), -(-k // b)
    counts = F.pad(m.to(torch.int32), (0, kb * b - k, 0, nb * b - n)).view(nb, b, kb, b).sum(dim=(1, 3))
    rows = torch.full((nb,), b, dtype=torch.int32, device=m.device)
    cols = torch.full((kb,), b, dtype=torch.int32, device=m.device)
    rows[-1], cols[-1] = n - (nb - 1) * b, k - (kb - 1) * b
    return bool(((counts == 0) | (counts == rows[:, None] * cols[None, :])).all())


def _keeps_at_most(m, keep, group):
    n, k = m.shape
    if m.numel() == 0:
        return True
    return bool((F.pad(m.to(torch.int32), (0, -k % group)).view(n, -1, group).sum(-1) <= keep).all())


# ---------------------------------------------------------------------------------------------
# The triton backend: the launchers the C++ op calls (dispatch::python_route), on CUDA tensors and,
# forced under TRITON_INTERPRET=1, on CPU tensors. index: [info (block, nnz), rows_ptr, rows_idx,
# cols_ptr, cols_idx] as masked_linear_index gives it.
# ---------------------------------------------------------------------------------------------
def _on_device(x):
    """Triton launches on the current CUDA device, not the tensors': make theirs current."""
    import contextlib
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _triton_forward(x, weight, mask, bias, index):
    from effops.triton_kernels import masked_matmul
    n, k = weight.shape
    if math.prod(x.shape[:-1]) == 0 or n == 0 or k == 0:
        y = x.new_zeros((*x.shape[:-1], n))
        return y if bias is None else y + bias
    with _on_device(x):
        return masked_matmul.masked_linear(x, weight, mask, bias, int(index[0][0]), index[1], index[2])


def _triton_backward(grad_y, x, weight, mask, index, need_x, need_w, need_b):
    from effops.triton_kernels import masked_matmul
    n, k = weight.shape
    rows = math.prod(x.shape[:-1])
    if rows == 0 or n == 0 or k == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(weight), grad_y.reshape(rows, n).sum(0))
    else:
        with _on_device(x):
            grads = masked_matmul.masked_linear_backward(grad_y, x, weight, mask, (need_x, need_w, need_b),
                                                         int(index[0][0]), *index[1:])
    # A Python op cannot return None: an unneeded gradient travels as an empty tensor.
    return tuple(g if need and g is not None else x.new_empty(0) for g, need in zip(grads, (need_x, need_w, need_b)))


_OP = None
if _ext.load():
    _OP = torch.ops.effops.masked_linear.default

    @torch.library.custom_op("effops::_masked_linear_triton", mutates_args=())
    def _masked_linear_triton(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor],
                              index: List[Tensor]) -> Tensor:
        return _triton_forward(x, weight, mask, bias, index)

    @torch.library.custom_op("effops::_masked_linear_backward_triton", mutates_args=())
    def _masked_linear_backward_triton(grad_y: Tensor, x: Tensor, weight: Tensor, mask: Tensor, index: List[Tensor],
                                       need_x: bool, need_w: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _triton_backward(grad_y, x, weight, mask, index, need_x, need_w, need_b)
