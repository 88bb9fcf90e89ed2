"""effops.ops.adam8bit_step: one fused Adam/AdamW step with 8-bit moments over lists of tensors, in place.

The op is `torch.ops.effops.adam8bit_step` (csrc/bindings/adam8bit_step.cpp: schema, checks, policy,
routes). The moments are stored block-wise quantized (effops/reference/adam8bit.py defines the maps):
per param, exp_avg as flat int8 codes and exp_avg_sq as flat uint8 codes (one per element, in the
param's row-major order) with one fp32 scale per block of 256 elements each. This module is the
Python function in front of the op, the Triton route the C++ implementation calls
(`effops::_adam8bit_step_triton`), and the plain-PyTorch step for an install without the extension.
"""
import importlib.util

import torch

from effops import _backends, _ext
from effops.ops.adam_step import _check_bools, _floats
from effops.reference import adam8bit as reference

BACKENDS = ("reference", "cpu", "triton")  # the backends with a kernel for this op (tests, `effops info`)


def adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, steps, *, lr,
                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled_weight_decay=False,
                  master_params=None, grad_scale=None, found_inf=None):
    """One Adam (or AdamW, decoupled_weight_decay=True) step with 8-bit moments, in place.

    params fp32, bf16 or fp16 (grads alike); exp_avg_codes int8 and exp_avg_sq_codes uint8, flat, one
    per element; exp_avg_scales / exp_avg_sq_scales fp32, one per block of 256 elements (see
    effops/reference/adam8bit.py); all-zero codes and scales are the zero state. steps: scalar
    tensors, incremented. master_params, grad_scale, found_inf: as effops.ops.adam_step.
    """
    if type(maximize) is not bool or type(decoupled_weight_decay) is not bool:
        _check_bools(maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    lr, beta1, beta2, eps, weight_decay = _floats(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    n = len(params)
    if master_params is None:
        masters, has_master = (), [False] * n
    else:
        if len(master_params) != n:
            raise ValueError("master_params must have one entry per param (%d), got %d" % (n, len(master_params)))
        masters = [m for m in master_params if m is not None]
        has_master = [m is not None for m in master_params]
    if not n:
        return
    if not _ext.load():
        if found_inf is not None and found_inf.item() != 0:
            return
        with torch.no_grad():
            new_steps = [(s + 1).item() for s in steps]
            reference.adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
                                    master_params or [None] * n, new_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decay=weight_decay, maximize=maximize,
                                    decoupled_weight_decay=decoupled_weight_decay,
                                    grad_scale=None if grad_scale is None else grad_scale.item())
            torch._foreach_add_(list(steps), 1)
        return
    torch.ops.effops.adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
                                   masters, has_master, steps, lr, beta1, beta2, eps, weight_decay, maximize,
                                   decoupled_weight_decay, grad_scale, found_inf)


def _triton_route(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, masters,
                  has_master, steps, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, grad_scale):
    from effops.triton_kernels.adam8bit_step import adam8bit_step as launch

    it = iter(masters)
    master_params = [next(it) if flag else None for flag in has_master]
    launch(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, master_params, steps,
           lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
           decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale)


# The Triton route, called by the C++ implementation (steps: the counts after this step, as floats).
if importlib.util.find_spec("triton") is not None:
    _lib = torch.library.Library("effops", "FRAGMENT")
    _lib.define("_adam8bit_step_triton(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avg_codes, "
                "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_codes, Tensor(f!)[] exp_avg_sq_scales, "
                "Tensor(g!)[] masters, bool[] has_master, float[] steps, float lr, float beta1, float beta2, "
                "float eps, float weight_decay, bool maximize, bool decoupled_weight_decay, float? grad_scale) -> ()")
    for _key in ("CPU", "CUDA"):
        _lib.impl("_adam8bit_step_triton", _backends.on_tensors_device(_triton_route), _key)
