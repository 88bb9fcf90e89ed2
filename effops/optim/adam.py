"""effops.optim.Adam / AdamW: torch.optim.Adam / AdamW with the step done by the fused effops::adam_step.

Same constructor arguments, same param-group keys and the same state layout as torch's (`step` a
scalar float tensor on the CPU, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq`), so checkpoints move
between the two in both directions. Additions:

* ``master_weights=True``: bf16/fp16 params get an fp32 copy (``state["master_param"]``, so it is in
  checkpoints) and fp32 moments; the step runs on the copy and writes the rounded result into the
  param in the same pass. A torch checkpoint loaded into such an optimizer gets its master copies
  created from the params on the next step.
* The GradScaler fused protocol (``_step_supports_amp_scaling``): the scaler hands over ``grad_scale``
  and ``found_inf``; gradients are unscaled inside the kernel, and a step with an inf/NaN gradient
  leaves params, moments and step counts untouched.
* DTensor params (FSDP2's ``fully_shard``) are stepped through their local shards.
* ``bf16_stochastic_round=True`` (bf16 params without master weights): the new param is rounded to
  bf16 stochastically, with bits from a counter-based generator seeded per step and param
  (effops/reference/stochastic_round.py), so updates below bf16's resolution are not lost.
* float64 and complex128 params step in float64 on the plain ATen route (no kernel has a float64
  body); any dtype outside torch's range is refused where its group is added.

A step gathers every group's lists (creating or adapting the state) and checks every group's
hyper-parameters before stepping any, then calls the op once per group and device.

``foreach`` and ``fused`` are accepted for compatibility and ignored (the step is always fused);
``capturable`` and ``differentiable`` are not supported.
"""
import numbers
from itertools import chain, compress, repeat
from operator import attrgetter, contains, is_not, itemgetter

import numpy as np
import torch
from torch.optim.optimizer import Optimizer, _get_scalar_dtype

from effops.ops import adam_step
from effops.reference.stochastic_round import mix32_int

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# What the step takes: torch.optim.Adam's range. float64 (and complex128, through its float64 real
# view) runs on the reference backend in float64 math (no compiled float64 body).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.complex128)
_MASTER_KEYS = ("master_param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _is_dtensor(t):
    """True for a DTensor (FSDP2 params): its local shard (a view sharing storage) is what we step."""
    return type(t) is not torch.nn.Parameter and type(t) is not torch.Tensor and hasattr(t, "device_mesh")


class Adam(Optimizer):
    """Drop-in for torch.optim.Adam (see the module docstring for what is added)."""

    PARAM_DTYPES = PARAM_DTYPES  # what add_param_group accepts (subclasses narrow it)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False, bf16_stochastic_round=False):
        if bf16_stochastic_round and master_weights:
            raise ValueError("bf16_stochastic_round=True rounds bf16 params that have no master copy: it does "
                             "nothing with master_weights=True (choose one)")
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        elif not isinstance(lr, numbers.Real) or isinstance(lr, bool):  # numbers.Real: numpy scalars too
            raise TypeError("lr must be a float or a 1-element tensor, got %s" % type(lr).__name__)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError("betas must be a pair (beta1, beta2), got %r" % (betas,))
        betas = tuple(b.item() if isinstance(b, torch.Tensor) else b for b in betas)
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError("effops Adam does not support capturable=True (CUDA graph capture)")
        if differentiable:
            raise ValueError("effops Adam does not support differentiable=True")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=False, differentiable=False, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
                        bf16_stochastic_round=bf16_stochastic_round)
        super().__init__(params, defaults)
        # GradScaler: hand us grad_scale/found_inf instead of unscaling the gradients itself.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)  # torch's load_state_dict ends here too
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("master_weights", False)
            group.setdefault("bf16_stochastic_round", False)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_get_scalar_dtype())

    def load_state_dict(self, state_dict):
        """As torch's, except that fp32 master copies and moments of low-precision params stay fp32
        (torch's loader casts every floating state tensor to its param's dtype)."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved_state = state_dict["state"]
        # A torch checkpoint's groups have no master_weights: they keep this optimizer's setting (torch's
        # loader replaces the groups, and __setstate__'s default would switch master weights off).
        # Unequal group counts: torch's loader raises its own error below.
        if len(state_dict["param_groups"]) == len(self.param_groups):
            state_dict = dict(state_dict, param_groups=[
                g if "master_weights" in g else dict(g, master_weights=current["master_weights"])
                for g, current in zip(state_dict["param_groups"], self.param_groups)])
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)):
            saved = saved_state.get(pid)
            if saved and "master_param" in saved:
                for key in _MASTER_KEYS:
                    if key in saved:
                        self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1], len(self.param_groups) - 1)
            _check_param_dtypes(self.param_groups[-1], len(self.param_groups) - 1, type(self).__name__,
                                self.PARAM_DTYPES)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a bad group is not left half-added
            raise

    # -----------------------------------------------------------------------------------------
    def _prepare_state(self, group, p):
        """The state of p, created or adapted (amsgrad switched on, master copies added/removed)."""
        state = self.state[p]
        if len(state) != 0 and not group["master_weights"] and "master_param" not in state and \
                (not group["amsgrad"] or "max_exp_avg_sq" in state) and state["exp_avg"].dtype == p.dtype:
            return state  # the common case: nothing to create or adapt
        wants_master = bool(group["master_weights"]) and p.dtype in _LOW_PRECISION
        state_dtype = torch.float32 if wants_master else p.dtype
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            if wants_master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        elif wants_master != ("master_param" in state):
            # A torch checkpoint (no masters) or master_weights switched: rebuild from the params.
            if wants_master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            else:
                del state["master_param"]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state and state[key].dtype != state_dtype:
                state[key] = state[key].to(state_dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
        return state

    def _group_lists_plain(self, group):
        """_group_lists for the common group, or None where the checked path must run: every param with a
        gradient is a plain fp32/bf16/fp16 tensor, all on one device, whose state exists with moments of
        the param's dtype and nothing to adapt (no master copy, amsgrad's max present where asked). The
        state is read afresh (nothing is kept between steps); each test runs over the whole list at C
        speed (map, itemgetter), not as a Python statement per param: with thousands of small tensors
        the per-param Python work was most of the step."""
        if group["master_weights"] or group["bf16_stochastic_round"]:
            return None
        params = group["params"]
        grads = list(map(_GRAD, params))
        keep = list(map(is_not, grads, repeat(None)))  # (`None in grads` would call Tensor.__eq__ per grad)
        if not all(keep):
            params, grads = list(compress(params, keep)), list(compress(grads, keep))
            if not params:
                return {}
        if not _PLAIN_TYPES.issuperset(map(type, params)) or len(set(map(_GET_DEVICE, params))) != 1:
            return None
        dtypes = list(map(_DTYPE, params))
        if not _PLAIN_DTYPES.issuperset(dtypes) or (torch.float64 in dtypes and len(set(dtypes)) > 1):
            return None  # complex params step through real views; float64 beside other dtypes is split off
        if any(map(_IS_SPARSE, grads)):
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        states = list(map(self.state.get, params))
        if None in states or any(map(contains, states, repeat("master_param"))):
            return None
        try:
            exp_avgs = list(map(_EXP_AVG, states))
            exp_avg_sqs = list(map(_EXP_AVG_SQ, states))
            max_exp_avg_sqs = list(map(_MAX_EXP_AVG_SQ, states)) if group["amsgrad"] else []
            steps = list(map(_STEP, states))
        except KeyError:  # a state without moments (a torch checkpoint for another layout): the checked path
            return None
        if list(map(_DTYPE, exp_avgs)) != dtypes:
            return None
        return {(params[0].device, dtypes[0] == torch.float64): dict(
            params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs,
            master_params=None, steps=steps)}

    def _group_lists(self, group, first_index=0):
        """{(device, is float64): argument lists for adam_step} for the params of `group` that have a
        gradient. float64 params (complex128 ones through their real views) get lists of their own:
        they run on the reference backend, and fp32 params beside them keep the compiled kernels.
        first_index: the optimizer-wide index of the group's first param (stochastic rounding's seeds)."""
        by_device = {}
        amsgrad = group["amsgrad"]
        master_weights = group["master_weights"]
        last_dev, lists = None, None
        tensor_types = (torch.nn.Parameter, torch.Tensor)
        plain = lambda t: type(t) in tensor_types  # noqa: E731  (not a DTensor or other subclass)
        if group["bf16_stochastic_round"]:
            return self._group_lists_stochastic(group, first_index)
        fast = self._group_lists_plain(group)
        if fast is not None:
            return fast
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
            state = self.state.get(p)
            if state and not master_weights and plain(p) and not p.is_complex() and "master_param" not in state \
                    and (not amsgrad or "max_exp_avg_sq" in state):
                # The common case (fp32/bf16 params, state already built): straight into the lists.
                exp_avg = state["exp_avg"]
                if exp_avg.dtype == p.dtype:
                    dev = (p.device, p.dtype == torch.float64)
                    if dev != last_dev:
                        lists = by_device.get(dev)
                        if lists is None:
                            lists = by_device[dev] = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[],
                                                          max_exp_avg_sqs=[], master_params=[], steps=[])
                        last_dev = dev
                    lists["params"].append(p)
                    lists["grads"].append(grad)
                    lists["exp_avgs"].append(exp_avg)
                    lists["exp_avg_sqs"].append(state["exp_avg_sq"])
                    if amsgrad:
                        lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                    lists["master_params"].append(None)
                    lists["steps"].append(state["step"])
                    continue
            state = self._prepare_state(group, p)
            tensors = [p, grad, state["exp_avg"], state["exp_avg_sq"]]
            if amsgrad:
                tensors.append(state["max_exp_avg_sq"])
            master = state.get("master_param")
            if _is_dtensor(p):
                tensors = [t.to_local() for t in tensors]
                master = None if master is None else master.to_local()
            if p.is_complex():
                tensors = [torch.view_as_real(t) for t in tensors]
            last_dev = None  # the fast path re-looks its lists up
            key = (tensors[0].device, tensors[0].dtype == torch.float64)
            lists = by_device.get(key)
            if lists is None:
                lists = by_device[key] = dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[],
                                              max_exp_avg_sqs=[], master_params=[], steps=[])
            lists["params"].append(tensors[0])
            lists["grads"].append(tensors[1])
            lists["exp_avgs"].append(tensors[2])
            lists["exp_avg_sqs"].append(tensors[3])
            if amsgrad:
                lists["max_exp_avg_sqs"].append(tensors[4])
            lists["master_params"].append(master)
            lists["steps"].append(state["step"])
        return by_device

    def _group_lists_stochastic(self, group, first_index):
        """_group_lists for a group with bf16_stochastic_round: the checked path, plus per param the
        seed of this step's rounding (-1 where the param is not a bf16 param without a master copy)."""
        by_device = {}
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            # One param at a time through the checked path (it adapts the state and splits devices).
            lists = self._group_lists(dict(group, params=[p], bf16_stochastic_round=False))
            (key, one), = lists.items()
            if one["master_params"] is None:  # the plain path's "no master copies"
                one["master_params"] = [None]
            state = self.state[p]
            seed = -1
            if one["params"][0].dtype == torch.bfloat16 and one["master_params"][0] is None:
                seed = stochastic_round_seed(int(state["step"].item()) + 1, first_index + j)
            target = by_device.setdefault(key, {k: [] for k in one})
            for k, v in one.items():
                target[k] += v
            target.setdefault("stochastic_round_seeds", []).append(seed)
        return by_device

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (closure: reevaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Every group gathered (its state created or adapted) and its hyper-parameters checked before
        # any is stepped: a bad group fails the whole step instead of leaving earlier groups stepped.
        calls = []
        first_index = 0
        for index, group in enumerate(self.param_groups):
            hyper = group_hyper(group, index)
            hyper.update(amsgrad=group["amsgrad"], maximize=group["maximize"],
                         decoupled_weight_decay=group["decoupled_weight_decay"])
            for lists in self._group_lists(group, first_index).values():
                calls.append((lists, hyper))
            first_index += len(group["params"])
        if len(calls) > 1:
            _check_grads(calls)
        for lists, hyper in calls:
            device = lists["params"][0].device
            adam_step(**lists, **hyper, grad_scale=None if grad_scale is None else grad_scale.to(device),
                      found_inf=None if found_inf is None else found_inf.to(device))
        return loss


def _check_grads(calls):
    """Each call's gradients against its params, before any call steps, in the op's words: the op checks
    them too, but one call at a time, so a bad gradient in a later group would leave the earlier groups
    stepped. Compared list against list at C speed; the per-param loop below runs only to name a mismatch."""
    for lists, _ in calls:
        params, grads = lists["params"], lists["grads"]
        if list(map(_DTYPE, grads)) == list(map(_DTYPE, params)) and \
                list(map(_SHAPE, grads)) == list(map(_SHAPE, params)) and \
                list(map(_DEVICE, grads)) == list(map(_DEVICE, params)):
            continue
        for i, (p, g) in enumerate(zip(params, grads)):
            if g.dtype != p.dtype:
                raise TypeError("grads[%d] must have dtype %s like params[%d], got %s"
                                % (i, str(p.dtype).replace("torch.", ""), i, str(g.dtype).replace("torch.", "")))
            if g.shape != p.shape or g.device != p.device:
                raise ValueError("grads[%d] must have shape %s on %s like params[%d], got shape %s on %s"
                                 % (i, tuple(p.shape), p.device, i, tuple(g.shape), g.device))


def group_hyper(group, index):
    """A group's lr, betas, eps and weight_decay as the op takes them, checked (a scheduler or the user
    may have changed them since the group was added)."""
    beta1, beta2 = group["betas"]
    hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
    for name, value in hyper.items():
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
            raise TypeError("%s must be a float, got %r (param_groups[%d])" % (name, value, index))
        value = hyper[name] = float(value)
        if not (value >= 0.0 and (value < 1.0 or not name.startswith("beta"))):
            raise ValueError("%s must be >= 0%s, got %r (param_groups[%d])"
                             % (name, " and < 1" if name.startswith("beta") else "", value, index))
    return hyper


_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_IS_SPARSE = attrgetter("is_sparse")
_SHAPE = attrgetter("shape")
_DEVICE = attrgetter("device")
_GET_DEVICE = torch.Tensor.get_device
_EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ, _STEP = map(itemgetter, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"))
_PLAIN_TYPES = frozenset((torch.nn.Parameter, torch.Tensor))
_PLAIN_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))
_FLAGS = ("amsgrad", "maximize", "decoupled_weight_decay", "master_weights", "bf16_stochastic_round")


def stochastic_round_seed(step, index):
    """The 32-bit seed of param `index` (its position in the optimizer, over all groups) at step
    `step` (the count after this step): a function of the two only, so a run is reproducible and
    every backend rounds alike."""
    return mix32_int(step * 0x9E3779B1 + index)


def _check_group(group, index):
    """A param group's settings, checked where it is added (not at the first step): TypeError/ValueError
    naming the group and the setting. Flags given as 0/1 become bools (torch's Adam takes any truthy)."""
    where = "param_groups[%d]['%%s']" % index
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("%s must be a float or a 1-element tensor, got shape %s" % (where % "lr", tuple(lr.shape)))
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError("%s must be a float or a 1-element tensor, got %r" % (where % "lr", lr))
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError("%s must be a pair (beta1, beta2), got %r" % (where % "betas", betas))
    for name, value, high in (("betas", betas[0], 1.0), ("betas", betas[1], 1.0), ("eps", group["eps"], None),
                              ("weight_decay", group["weight_decay"], None)):
        value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError("%s must be a float, got %r" % (where % name, value))
        if not value >= 0.0 or (high is not None and not value < high):
            raise ValueError("%s must be >= 0%s, got %r" % (where % name, "" if high is None else " and < 1", value))
    for flag in _FLAGS:
        value = group.setdefault(flag, False) if flag == "bf16_stochastic_round" else group[flag]
        if not isinstance(value, bool):
            if isinstance(value, (numbers.Integral, np.bool_)) and value in (0, 1):  # 0/1, numpy bools
                group[flag] = bool(value)
            else:
                raise TypeError("%s must be a bool, got %r" % (where % flag, value))
    if group["bf16_stochastic_round"] and group["master_weights"]:
        raise ValueError("%s: stochastic rounding is for bf16 params without master weights; this group has "
                         "master_weights=True" % (where % "bf16_stochastic_round"))


def _check_param_dtypes(group, index, name, dtypes):
    """Every param of a group has a dtype the step takes: a TypeError naming the param and its dtype
    here, where the group is added, never at the first step."""
    for i, p in enumerate(group["params"]):
        if p.dtype not in dtypes:
            raise TypeError("param_groups[%d]['params'][%d] has dtype %s; %s steps %s" % (
                index, i, str(p.dtype).replace("torch.", ""), name,
                ", ".join(str(d).replace("torch.", "") for d in dtypes)))


class AdamW(Adam):
    """Drop-in for torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False, bf16_stochastic_round=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         bf16_stochastic_round=bf16_stochastic_round)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
