"""effops::adam_step: one fused Adam/AdamW step over lists of tensors, in place.

The public function checks every argument; the custom op (a mutating torch.library op with a fake
kernel, so torch.compile keeps it as one node) handles the GradScaler flag, dispatches to a backend
and only then advances the step counts. Every backend kernel receives the same arguments:

    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *, lr, beta1,
           beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
           stochastic_round_seeds)

with `steps` the incremented step counts as floats, `master_params` a list of None / fp32 tensors of
the same length as `params`, `grad_scale` None or a float, and `stochastic_round_seeds` None or one
int per param (>= 0: the bf16 param, which has no master copy, is rounded stochastically with that
seed, effops/reference/stochastic_round.py; -1: to nearest). A kernel checks what it needs before
writing anything, so a step that fails leaves every tensor untouched. Autocast does not apply (the
step is not a forward computation; its tensors keep their dtypes).
"""
import numbers
from typing import List, Optional

import torch
from torch import Tensor

from effops import _backends
from effops.ops import _checks
from effops.reference import adam as reference

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# What the op takes. float64 (and complex128, stepped through its float64 real view) runs on the
# reference only: no compiled kernel has a float64 body, and its math stays in float64 as torch's does.
ADAM_DTYPES = _checks.FLOAT_DTYPES + (torch.float64,)


def _float64_reason(params):
    """None when no param is float64 (which only the reference steps), else the reason to decline."""
    for i, p in enumerate(params):
        if p.dtype == torch.float64:
            return "params[%d] is float64: only the reference backend steps float64" % i
    return None


# ---------------------------------------------------------------------------------------------
# What the compiled kernels accept (declared once, used by every backend's `supports`)
# ---------------------------------------------------------------------------------------------
def _dense(t):
    """True when t's elements fill one block of memory with no gaps or overlap (any dim order)."""
    if t.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def flat_layout_reason(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, amsgrad):
    """None when every tensor can be walked as flat memory in the same element order, else why not.

    The step is elementwise, so any dense layout works provided a param, its gradient and its state
    share strides (zeros_like keeps the param's layout; autograd gives gradients the param's layout).
    """
    for i, p in enumerate(params):
        group = [p, grads[i], exp_avgs[i], exp_avg_sqs[i]]
        if amsgrad:
            group.append(max_exp_avg_sqs[i])
        if master_params[i] is not None:
            group.append(master_params[i])
        # Unrolled (not a generator): this runs per tensor on every step.
        if (p.is_contiguous() and group[1].is_contiguous() and group[2].is_contiguous()
                and group[3].is_contiguous() and (len(group) == 4 or all(t.is_contiguous() for t in group[4:]))) \
                or p.numel() == 0:
            continue  # the common case, checked cheaply
        if not _dense(p) or not all(_dense(t) and _same_order(t, p) for t in group[1:]):
            return "params[%d] or its grad/state is not dense with one shared layout (strides %s)" % (
                i, [tuple(t.stride()) for t in group])
    return None


def _same_order(t, p):
    """Dense t and p of one shape hold their elements in the same memory order: equal strides wherever
    a dimension has more than one element (a size-1 dimension's stride is arbitrary: a channels_last
    conv weight (C, 1, k, k) and autograd's gradient for it can differ there)."""
    return all(n == 1 or a == b for n, a, b in zip(p.shape, t.stride(), p.stride()))


def _stochastic_reason(params, seeds, kernel_has_it=True):
    """None when the kernel can round as the reference does: it has stochastic rounding, and every
    param it rounds stochastically is contiguous (the random bits follow the row-major index)."""
    if seeds is None:
        return None
    if not kernel_has_it:
        return "no stochastic rounding in this kernel"
    for i, p in enumerate(params):
        if seeds[i] >= 0 and not p.is_contiguous():
            return "params[%d] is rounded stochastically and is not contiguous" % i
    return None


def _compiled_supports(device_type):
    def supports(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, **kw):
        if params and params[0].device.type != device_type:
            return "tensors are on %s" % params[0].device.type
        seeds = kw.get("stochastic_round_seeds")
        return _stochastic_reason(params, seeds, kernel_has_it=device_type == "cpu") or _float64_reason(params) or flat_layout_reason(params, grads, exp_avgs, exp_avg_sqs,
                                                             max_exp_avg_sqs, master_params, kw["amsgrad"])
    return supports


def _cpu_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *, lr, beta1,
                beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
                stochastic_round_seeds=None):
    step_sizes, bc2_sqrts = reference.per_tensor_scalars(lr, beta1, beta2, steps)
    torch.ops.effops_cpu.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, step_sizes,
                                   bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                   decoupled_weight_decay, grad_scale, stochastic_round_seeds)


def _cuda_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *, lr, beta1,
                 beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale,
                 stochastic_round_seeds=None):  # declined by supports when not None
    step_sizes, bc2_sqrts = reference.per_tensor_scalars(lr, beta1, beta2, steps)
    torch.ops.effops_cuda.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                                    step_sizes, bc2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                                    decoupled_weight_decay, grad_scale)


_backends.register_kernel("adam_step", "reference", reference.adam_step)
_backends.register_kernel("adam_step", "cpu", _cpu_kernel, supports=_compiled_supports("cpu"))
_backends.register_kernel("adam_step", "cuda", _cuda_kernel, supports=_compiled_supports("cuda"))
_backends.register_kernel("adam_step", "triton", "effops.triton_kernels.adam_step:adam_step",
                          supports=lambda *a, **kw: _stochastic_reason(a[0], kw.get("stochastic_round_seeds"))
                          or _float64_reason(a[0]) or flat_layout_reason(*a[:6], kw["amsgrad"]))


# ---------------------------------------------------------------------------------------------
# Public function: checks, then the custom op
# ---------------------------------------------------------------------------------------------
def _check_bools(**flags):
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError("%s must be a bool, got %s" % (name, type(flag).__name__))


def _tensor_list(name, value, length=None):
    if not isinstance(value, (list, tuple)):
        raise TypeError("%s must be a list of tensors, got %s" % (name, type(value).__name__))
    if length is not None and len(value) != length:
        raise ValueError("%s must have one entry per param (%d), got %d" % (name, length, len(value)))
    return list(value)


def _number(name, value, low, high=None, high_open=True):
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError("%s must be a number or a 1-element tensor, got shape %s" % (name, tuple(value.shape)))
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too, as torch's Adam
        raise TypeError("%s must be a float, got %s" % (name, type(value).__name__))
    value = float(value)
    if not value >= low or (high is not None and not (value < high if high_open else value <= high)):
        bound = "" if high is None else (" and < %g" % high if high_open else " and <= %g" % high)
        raise ValueError("%s must be >= %g%s, got %r" % (name, low, bound, value))
    return value


def _check_scalar_tensor(name, value, device):
    if value is None:
        return None
    _checks.tensor(name, value, dtypes=(torch.float32,))
    if value.numel() != 1:
        raise ValueError("%s must have one element, got shape %s" % (name, tuple(value.shape)))
    return value


def _check_tensor_set(i, p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, master, s, amsgrad, dev):
    """The full checks of params[i] and its companions, each failure naming what is wrong."""
    _checks.tensor("params[%d]" % i, p, dtypes=ADAM_DTYPES, device=dev)
    _checks.tensor("grads[%d]" % i, g)
    if g.layout != torch.strided:
        raise RuntimeError("adam_step does not support sparse gradients (grads[%d] has layout %s); "
                           "use torch.optim.SparseAdam" % (i, g.layout))
    _checks.tensor("grads[%d]" % i, g, device=dev)
    _checks.same_dtype("grads[%d]" % i, g, p.dtype)
    if master is not None:
        _checks.tensor("master_params[%d]" % i, master, dtypes=(torch.float32,), device=dev)
        if p.dtype not in _LOW_PRECISION:
            raise ValueError("master_params[%d] is only for bf16/fp16 params; params[%d] is %s"
                             % (i, i, p.dtype))
    state_dtype = torch.float32 if master is not None else p.dtype
    state = [("exp_avgs", exp_avg), ("exp_avg_sqs", exp_avg_sq)]
    if amsgrad:
        state.append(("max_exp_avg_sqs", max_exp_avg_sq))
    for name, t in state:
        _checks.tensor("%s[%d]" % (name, i), t, device=dev)
        if t.dtype != state_dtype:
            raise TypeError("%s[%d] must have dtype %s (%s), got %s" % (
                name, i, state_dtype, "fp32 beside a master copy" if master is not None else "the param's",
                t.dtype))
    for name, t in [("grads", g), ("master_params", master)] + state:
        if t is not None:
            _checks.shape("%s[%d]" % (name, i), t, p.shape)
    _checks.tensor("steps[%d]" % i, s, dtypes=(torch.float32, torch.float64))
    if s.numel() != 1:
        raise ValueError("steps[%d] must be a 1-element tensor, got shape %s" % (i, tuple(s.shape)))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False, decoupled_weight_decay=False,
              master_params=None, grad_scale=None, found_inf=None, stochastic_round_seeds=None):
    """One Adam (or AdamW with decoupled_weight_decay=True) step, updating every tensor in place.

    params, grads, exp_avgs, exp_avg_sqs: lists of same-shaped tensors on one device; params fp32, bf16,
    fp16 or float64 (a list may mix them; float64 runs on the reference backend, in float64), each grad in its param's dtype. steps: one scalar tensor per param
    holding the number of steps taken so far; it is incremented. Moments have the param's dtype, or
    fp32 where master_params[i] (None or an fp32 copy of a bf16/fp16 param) is given: the step then
    runs on the master and the rounded result is written into the param. amsgrad needs
    max_exp_avg_sqs. grad_scale / found_inf (1-element fp32 tensors, the GradScaler protocol):
    gradients are divided by grad_scale (and stored back unscaled); a nonzero found_inf skips the
    whole step, leaving every tensor and step count untouched. All math is fp32 (float64 for float64).
    stochastic_round_seeds: None, or one int per param: a seed in [0, 2^32) rounds that bf16 param
    (which must have no master copy) stochastically (effops/reference/stochastic_round.py), -1 to nearest.
    """
    prepare_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, amsgrad=amsgrad, max_exp_avg_sqs=max_exp_avg_sqs, maximize=maximize,
                      decoupled_weight_decay=decoupled_weight_decay, master_params=master_params,
                      grad_scale=grad_scale, found_inf=found_inf, stochastic_round_seeds=stochastic_round_seeds)()


def prepare_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, amsgrad=False, max_exp_avg_sqs=None, maximize=False,
                      decoupled_weight_decay=False, master_params=None, grad_scale=None, found_inf=None,
                      stochastic_round_seeds=None):
    """Check adam_step's arguments without touching anything; returns a callable running the step.

    The optimizer checks every param group this way before stepping any of them.
    """
    _check_bools(amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    params = _tensor_list("params", params)
    n = len(params)
    grads = _tensor_list("grads", grads, n)
    exp_avgs = _tensor_list("exp_avgs", exp_avgs, n)
    exp_avg_sqs = _tensor_list("exp_avg_sqs", exp_avg_sqs, n)
    steps = _tensor_list("steps", steps, n)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("max_exp_avg_sqs (one per param) is required when amsgrad=True")
    max_exp_avg_sqs = _tensor_list("max_exp_avg_sqs", max_exp_avg_sqs, n) if amsgrad else []
    master_params = [None] * n if master_params is None else list(_tensor_list("master_params", master_params, n))
    lr = _number("lr", lr, 0.0)
    beta1 = _number("beta1", beta1, 0.0, 1.0)
    beta2 = _number("beta2", beta2, 0.0, 1.0)
    eps = _number("eps", eps, 0.0)
    weight_decay = _number("weight_decay", weight_decay, 0.0)

    dev = params[0].device if n else None
    float_dtypes, step_dtypes, fp32, strided = ADAM_DTYPES, (torch.float32, torch.float64), torch.float32, \
        torch.strided
    for i in range(n):
        # The common case in one expression (this loop runs per tensor on every optimizer step);
        # anything unusual goes through the full checks, which name the problem.
        p, g, m, v, master, s = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], master_params[i], steps[i]
        vm = max_exp_avg_sqs[i] if amsgrad else None
        try:
            sdtype = p.dtype if master is None else fp32
            shape = p.shape
            ok = (p.dtype in float_dtypes and g.dtype == p.dtype and g.layout == strided and m.dtype == sdtype
                  and v.dtype == sdtype and g.shape == shape and m.shape == shape and v.shape == shape
                  and p.device == dev and g.device == dev and m.device == dev and v.device == dev
                  and s.dtype in step_dtypes and s.numel() == 1
                  and (vm is None or (vm.dtype == sdtype and vm.shape == shape and vm.device == dev))
                  and (master is None or (p.dtype != fp32 and master.dtype == fp32 and master.shape == shape
                                          and master.device == dev)))
        except AttributeError:
            ok = False
        if not ok:
            _check_tensor_set(i, p, g, m, v, vm, master, s, amsgrad, dev)
    _check_scalar_tensor("grad_scale", grad_scale, dev)
    _check_scalar_tensor("found_inf", found_inf, dev)
    seeds = _check_seeds(stochastic_round_seeds, params, master_params)

    # The op takes the master copies that exist plus a flag per param: torch.compile's
    # auto-functionalization cannot take a mutable list holding None (Tensor?[]).
    has_master = [m is not None for m in master_params]
    masters = [m for m in master_params if m is not None]

    def run():
        if not n:
            return
        args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1,
                beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, seeds)
        if _eager_plain():
            # Eager with no mode or tracer watching: call the implementation directly and bump the
            # version counters of everything mutated in ONE C++ call. The custom-op wrapper does the
            # same bumps one Python call per tensor, which cost more than the step itself for
            # hundreds of small tensors.
            with torch.no_grad():  # in-place updates of leaves that require grad, as torch's optimizers
                _adam_step_impl(*args)
            torch._C._increment_version(params + grads + exp_avgs + exp_avg_sqs + max_exp_avg_sqs + masters + steps)
        else:
            torch.ops.effops.adam_step(*args)
    return run


def _check_seeds(seeds, params, master_params):
    """stochastic_round_seeds: None, or one int per param, in [0, 2^32) only for bf16 params without a
    master copy, else -1."""
    if seeds is None:
        return None
    if not isinstance(seeds, (list, tuple)) or len(seeds) != len(params):
        raise ValueError("stochastic_round_seeds must be None or one int per param (%d), got %r"
                         % (len(params), seeds if not isinstance(seeds, (list, tuple)) else len(seeds)))
    out = []
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -1 <= seed < 2 ** 32:
            raise ValueError("stochastic_round_seeds[%d] must be an int in [0, 2^32) or -1, got %r" % (i, seed))
        if seed >= 0 and (params[i].dtype != torch.bfloat16 or master_params[i] is not None):
            raise ValueError("stochastic_round_seeds[%d]: stochastic rounding is for bf16 params without a master "
                             "copy; params[%d] is %s%s" % (i, i, str(params[i].dtype).replace("torch.", ""),
                                                           " with a master copy" if master_params[i] is not None
                                                           else ""))
        out.append(int(seed))
    return out


def _eager_plain():
    """True when nothing (torch.compile, a dispatch or function mode) needs to see the op as one node."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled())


@torch.library.custom_op("effops::adam_step", mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs",
                                                            "max_exp_avg_sqs", "masters", "steps"))
def _adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], masters: List[Tensor], has_master: List[bool], steps: List[Tensor], lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
               decoupled_weight_decay: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
               stochastic_round_seeds: Optional[List[int]] = None) -> None:
    _adam_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1,
                    beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf,
                    stochastic_round_seeds)


def _adam_step_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1,
                    beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf,
                    stochastic_round_seeds=None):
    """The custom op's body (also run directly by the eager fast path in prepare_adam_step)."""
    if not params:
        return
    # The GradScaler flag is read on the host: a skipped step must not advance the (host) step counts.
    # On CUDA this is one sync per step, as in torch's non-fused GradScaler path.
    if found_inf is not None and found_inf.item() != 0:
        return
    scale = None if grad_scale is None else float(grad_scale.item())
    it = iter(masters)
    master_params = [next(it) if flag else None for flag in has_master]
    try:
        # One op and one host read, not n .item() (steps on one device; on CUDA one sync, not n).
        # The +1 in the steps' own dtype, as torch's `step_t += 1` (and the optimizer's plan) does.
        new_steps = (torch.stack(steps).reshape(-1) + 1).tolist()
    except RuntimeError:  # steps of mixed shapes (() and (1,)), dtypes or devices
        new_steps = [(s + 1).item() for s in steps]
    _backends.dispatch("adam_step", params[0].device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                       master_params, new_steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                       grad_scale=scale, **({} if stochastic_round_seeds is None
                                            else dict(stochastic_round_seeds=list(stochastic_round_seeds))))
    # Only after the kernel succeeded: a failed step leaves the counts as they were.
    torch._foreach_add_(steps, 1)


@_adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, has_master, steps, lr, beta1, beta2, eps,
      weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, stochastic_round_seeds=None):
    return None
