"""effops::adam8bit_step: one fused Adam/AdamW step with 8-bit moments over lists of tensors, in place.

The moments are stored block-wise quantized (effops/reference/adam8bit.py defines the maps): per
param, exp_avg as flat int8 codes and exp_avg_sq as flat uint8 codes (one per element, in the param's
row-major order) with one fp32 scale per block of 256 elements each. The public function checks
every argument; the custom op (a mutating torch.library op with a fake kernel, so torch.compile
keeps it as one node) handles the GradScaler flag, dispatches to a backend and only then advances
the step counts. Every backend kernel receives the same arguments:

    kernel(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
           master_params, steps, *, lr, beta1, beta2, eps, weight_decay, maximize,
           decoupled_weight_decay, grad_scale)

with `steps` the incremented step counts as floats, `master_params` None or fp32 tensors, and
`grad_scale` None or a float. A step that fails leaves every tensor untouched.
"""
from typing import List, Optional

import torch
from torch import Tensor

from effops import _backends
from effops.ops import _checks
from effops.ops.adam_step import _check_bools, _check_scalar_tensor, _eager_plain, _number, _tensor_list
from effops.reference import adam as adam_reference
from effops.reference import adam8bit as reference

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _contiguous_reason(params, grads, master_params):
    """None when every param, gradient and master copy is contiguous (the codes follow row-major order)."""
    for i, p in enumerate(params):
        if not (p.is_contiguous() and grads[i].is_contiguous()
                and (master_params[i] is None or master_params[i].is_contiguous())):
            return "params[%d], its grad or master copy is not contiguous" % i
    return None


def _cpu_supports(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, master_params,
                  steps, **kw):
    if params and params[0].device.type != "cpu":
        return "tensors are on %s" % params[0].device.type
    return _contiguous_reason(params, grads, master_params)


def _cpu_kernel(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, master_params,
                steps, *, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, grad_scale):
    step_sizes, bc2_sqrts = adam_reference.per_tensor_scalars(lr, beta1, beta2, steps)
    torch.ops.effops_cpu.adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes,
                                       exp_avg_sq_scales, master_params, step_sizes, bc2_sqrts, lr, beta1, beta2, eps,
                                       weight_decay, maximize, decoupled_weight_decay, grad_scale)


_backends.register_kernel("adam8bit_step", "reference", reference.adam8bit_step)
_backends.register_kernel("adam8bit_step", "cpu", _cpu_kernel, supports=_cpu_supports)
_backends.register_kernel("adam8bit_step", "triton", "effops.triton_kernels.adam8bit_step:adam8bit_step",
                          supports=lambda *a, **kw: _contiguous_reason(a[0], a[1], a[6]))


def _check_tensor_set(i, p, g, mc, ms, vc, vs, master, s, dev):
    """The checks of params[i] and its companions, each failure naming what is wrong."""
    _checks.tensor("params[%d]" % i, p, dtypes=_checks.FLOAT_DTYPES, device=dev)
    _checks.tensor("grads[%d]" % i, g)
    if g.layout != torch.strided:
        raise RuntimeError("adam8bit_step does not support sparse gradients (grads[%d] has layout %s)" % (i, g.layout))
    _checks.tensor("grads[%d]" % i, g, device=dev)
    _checks.same_dtype("grads[%d]" % i, g, p.dtype)
    _checks.shape("grads[%d]" % i, g, p.shape)
    if master is not None:
        _checks.tensor("master_params[%d]" % i, master, dtypes=(torch.float32,), device=dev)
        _checks.shape("master_params[%d]" % i, master, p.shape)
        if p.dtype not in _LOW_PRECISION:
            raise ValueError("master_params[%d] is only for bf16/fp16 params; params[%d] is %s" % (i, i, p.dtype))
    blocks = reference.num_blocks(p.numel())
    for name, t, dtype, numel in (("exp_avg_codes", mc, torch.int8, p.numel()),
                                  ("exp_avg_scales", ms, torch.float32, blocks),
                                  ("exp_avg_sq_codes", vc, torch.uint8, p.numel()),
                                  ("exp_avg_sq_scales", vs, torch.float32, blocks)):
        _checks.tensor("%s[%d]" % (name, i), t, ndim=1, dtypes=(dtype,), device=dev)
        _checks.shape("%s[%d]" % (name, i), t, (numel,))
        if not t.is_contiguous():
            raise ValueError("%s[%d] must be contiguous" % (name, i))
    _checks.tensor("steps[%d]" % i, s, dtypes=(torch.float32, torch.float64))
    if s.numel() != 1:
        raise ValueError("steps[%d] must be a 1-element tensor, got shape %s" % (i, tuple(s.shape)))


def adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, steps, *, lr,
                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False, decoupled_weight_decay=False,
                  master_params=None, grad_scale=None, found_inf=None):
    """One Adam (or AdamW, decoupled_weight_decay=True) step with 8-bit moments, in place.

    params fp32, bf16 or fp16 (grads alike); exp_avg_codes int8 and exp_avg_sq_codes uint8, flat, one
    per element; exp_avg_scales / exp_avg_sq_scales fp32, one per block of 256 elements (see
    effops/reference/adam8bit.py); all-zero codes and scales are the zero state. steps: scalar
    tensors, incremented. master_params, grad_scale, found_inf: as effops.ops.adam_step.
    """
    prepare_adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, steps,
                          lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize,
                          decoupled_weight_decay=decoupled_weight_decay, master_params=master_params,
                          grad_scale=grad_scale, found_inf=found_inf)()


def prepare_adam8bit_step(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, steps, *,
                          lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, maximize=False,
                          decoupled_weight_decay=False, master_params=None, grad_scale=None, found_inf=None):
    """Check adam8bit_step's arguments without touching anything; returns a callable running the step."""
    _check_bools(maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    params = _tensor_list("params", params)
    n = len(params)
    grads = _tensor_list("grads", grads, n)
    exp_avg_codes = _tensor_list("exp_avg_codes", exp_avg_codes, n)
    exp_avg_scales = _tensor_list("exp_avg_scales", exp_avg_scales, n)
    exp_avg_sq_codes = _tensor_list("exp_avg_sq_codes", exp_avg_sq_codes, n)
    exp_avg_sq_scales = _tensor_list("exp_avg_sq_scales", exp_avg_sq_scales, n)
    steps = _tensor_list("steps", steps, n)
    master_params = [None] * n if master_params is None else _tensor_list("master_params", master_params, n)
    lr = _number("lr", lr, 0.0)
    beta1 = _number("beta1", beta1, 0.0, 1.0)
    beta2 = _number("beta2", beta2, 0.0, 1.0)
    eps = _number("eps", eps, 0.0)
    weight_decay = _number("weight_decay", weight_decay, 0.0)
    dev = params[0].device if n else None
    for i in range(n):
        _check_tensor_set(i, params[i], grads[i], exp_avg_codes[i], exp_avg_scales[i], exp_avg_sq_codes[i],
                          exp_avg_sq_scales[i], master_params[i], steps[i], dev)
    _check_scalar_tensor("grad_scale", grad_scale, dev)
    _check_scalar_tensor("found_inf", found_inf, dev)
    has_master = [m is not None for m in master_params]
    masters = [m for m in master_params if m is not None]

    def run():
        if not n:
            return
        args = (params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, masters,
                has_master, steps, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, grad_scale,
                found_inf)
        if _eager_plain():
            # As adam_step: eager with nothing watching, run the body directly and bump the version
            # counters of everything mutated in one C++ call.
            with torch.no_grad():
                _adam8bit_step_impl(*args)
            torch._C._increment_version(params + grads + exp_avg_codes + exp_avg_scales + exp_avg_sq_codes
                                        + exp_avg_sq_scales + masters + steps)
        else:
            torch.ops.effops.adam8bit_step(*args)
    return run


@torch.library.custom_op("effops::adam8bit_step", mutates_args=("params", "grads", "exp_avg_codes", "exp_avg_scales",
                                                                "exp_avg_sq_codes", "exp_avg_sq_scales", "masters",
                                                                "steps"))
def _adam8bit_step(params: List[Tensor], grads: List[Tensor], exp_avg_codes: List[Tensor],
                   exp_avg_scales: List[Tensor], exp_avg_sq_codes: List[Tensor], exp_avg_sq_scales: List[Tensor],
                   masters: List[Tensor], has_master: List[bool], steps: List[Tensor], lr: float, beta1: float,
                   beta2: float, eps: float, weight_decay: float, maximize: bool, decoupled_weight_decay: bool,
                   grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    _adam8bit_step_impl(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, masters,
                        has_master, steps, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay,
                        grad_scale, found_inf)


def _adam8bit_step_impl(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, masters,
                        has_master, steps, lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay,
                        grad_scale, found_inf):
    if not params:
        return
    if found_inf is not None and found_inf.item() != 0:
        return  # GradScaler found inf/NaN: skip, counts untouched (read on the host, as adam_step)
    scale = None if grad_scale is None else float(grad_scale.item())
    it = iter(masters)
    master_params = [next(it) if flag else None for flag in has_master]
    try:
        new_steps = (torch.stack(steps).reshape(-1) + 1).tolist()
    except RuntimeError:  # steps of mixed shapes, dtypes or devices
        new_steps = [(s + 1).item() for s in steps]
    _backends.dispatch("adam8bit_step", params[0].device, params, grads, exp_avg_codes, exp_avg_scales,
                       exp_avg_sq_codes, exp_avg_sq_scales, master_params, new_steps, lr=lr, beta1=beta1, beta2=beta2,
                       eps=eps, weight_decay=weight_decay, maximize=maximize,
                       decoupled_weight_decay=decoupled_weight_decay, grad_scale=scale)
    torch._foreach_add_(steps, 1)  # only after the kernel succeeded


@_adam8bit_step.register_fake
def _(params, grads, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales, masters, has_master, steps,
      lr, beta1, beta2, eps, weight_decay, maximize, decoupled_weight_decay, grad_scale, found_inf):
    return None
