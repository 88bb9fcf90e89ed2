"""effops.ops.adam_step: one fused Adam/AdamW step over lists of tensors, in place.

The op is `torch.ops.effops.adam_step` (csrc/bindings/adam_step.cpp: schema, checks, policy, routes;
a multi-tensor op as torch._fused_adamw_). This module is the Python function in front of it (the
arguments only Python can check), the Triton route the C++ implementation calls
(`effops::_adam_step_triton`), and the plain-PyTorch step for an install without the extension.
"""
import importlib.util
import numbers

import torch
from torch import Tensor

from effops import _backends, _ext
from effops.reference import adam as reference

BACKENDS = ("reference", "cpu", "cuda", "triton")  # the backends with a kernel for this op (tests, `effops info`)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False, decoupled_weight_decay=False,
              master_params=None, grad_scale=None, found_inf=None, stochastic_round_seeds=None):
    """One Adam (or AdamW with decoupled_weight_decay=True) step, updating every tensor in place.

    params, grads, exp_avgs, exp_avg_sqs: lists of same-shaped tensors on one device; params fp32, bf16,
    fp16 or float64 (a list may mix them; a list holding float64 steps on the plain ATen route, in
    float64), each grad in its param's dtype. steps: one scalar tensor per param holding the number of
    steps taken so far; it is incremented. Moments have the param's dtype, or fp32 where
    master_params[i] (None or an fp32 copy of a bf16/fp16 param) is given: the step then runs on the
    master and the rounded result is written into the param. amsgrad needs max_exp_avg_sqs.
    grad_scale / found_inf (1-element fp32 tensors, the GradScaler protocol): gradients are divided by
    grad_scale (and stored back unscaled); a nonzero found_inf skips the whole step, leaving every
    tensor and step count untouched. All math is fp32 (float64 for float64).
    stochastic_round_seeds: None, or one int per param: a seed in [0, 2^32) rounds that bf16 param
    (which must have no master copy) stochastically (effops/reference/stochastic_round.py), -1 to nearest.
    A call that fails a check changes nothing.
    """
    if type(amsgrad) is not bool or type(maximize) is not bool or type(decoupled_weight_decay) is not bool:
        _check_bools(amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    lr, beta1, beta2, eps, weight_decay = _floats(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    n = len(params)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs (one per param) is required when amsgrad=True")
    max_exp_avg_sqs = max_exp_avg_sqs if amsgrad else ()
    if master_params is None:
        masters, has_master = (), [False] * n
    else:
        if len(master_params) != n:
            raise ValueError("master_params must have one entry per param (%d), got %d" % (n, len(master_params)))
        masters = [m for m in master_params if m is not None]
        has_master = [m is not None for m in master_params]
    if stochastic_round_seeds is not None:
        stochastic_round_seeds = _check_seeds(stochastic_round_seeds, n)
    if not n:
        return
    if not _ext.load():
        return _reference_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr,
                               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                               grad_scale, found_inf, stochastic_round_seeds)
    torch.ops.effops.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr,
                               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
                               found_inf, stochastic_round_seeds)


def _check_bools(**flags):
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError("%s must be a bool, got %s" % (name, type(flag).__name__))


def _floats(**values):
    """The hyper-parameters as Python floats (numbers, numpy scalars and 1-element tensors, as torch's
    Adam takes them); their ranges are checked by the op."""
    out = []
    for name, value in values.items():
        if type(value) is not float:
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError("%s must be a number or a 1-element tensor, got shape %s"
                                     % (name, tuple(value.shape)))
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError("%s must be a float, got %s" % (name, type(value).__name__))
            value = float(value)
        out.append(value)
    return out


def _check_seeds(seeds, n):
    """stochastic_round_seeds: one int per param (the op checks the range and which params take one)."""
    if not isinstance(seeds, (list, tuple)) or len(seeds) != n:
        raise ValueError("stochastic_round_seeds must be None or one int per param (%d), got %r"
                         % (n, len(seeds) if isinstance(seeds, (list, tuple)) else seeds))
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError("stochastic_round_seeds[%d] must be an int in [0, 2^32) or -1, got %r" % (i, seed))
    return [int(s) for s in seeds]


def _reference_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr, beta1, beta2,
                    eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, seeds):
    """The step without the compiled extension: the reference, with the op's found_inf and step counts."""
    if found_inf is not None and found_inf.item() != 0:
        return
    with torch.no_grad():
        new_steps = [(s + 1).item() for s in steps]  # in the steps' own dtype, as torch's step_t += 1
        reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params or [None] * len(params),
                            new_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                            amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                            grad_scale=None if grad_scale is None else grad_scale.item(),
                            stochastic_round_seeds=seeds)
        torch._foreach_add_(list(steps), 1)


def _triton_route(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1, beta2,
                  eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, stochastic_round_seeds):
    from effops.triton_kernels.adam_step import adam_step as launch

    it = iter(masters)
    master_params = [next(it) if flag else None for flag in has_master]
    launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr=lr, beta1=beta1,
           beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
           decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
           stochastic_round_seeds=stochastic_round_seeds)


# The Triton route, called by the C++ implementation (steps: the counts after this step, as floats).
if importlib.util.find_spec("triton") is not None:
    _lib = torch.library.Library("effops", "FRAGMENT")
    _lib.define("_adam_step_triton(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
                "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, bool[] has_master, "
                "float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
                "bool maximize, bool decoupled_weight_decay, float? grad_scale, int[]? stochastic_round_seeds) -> ()")
    for _key in ("CPU", "CUDA"):
        _lib.impl("_adam_step_triton", _backends.on_tensors_device(_triton_route), _key)
