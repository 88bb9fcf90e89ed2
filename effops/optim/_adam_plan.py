"""The eager CPU fast path of effops.optim.Adam: a step with no per-tensor Python work.

After a checked step (the optimizer's normal path: gather the lists, create or adapt the state,
check every tensor in Python, dispatch the op) the optimizer builds a `Plan`: a C++ object
(``torch.classes.effops_cpu.AdamPlan``, csrc/bindings/adam_plan.cpp) holding every param with a
gradient and its state tensors, group by group, plus the params that had no gradient. The next steps
call ``Plan.step(optimizer)``: a few Python checks per param group, then one C++ call that reads each
param's gradient, re-checks every tensor, computes the bias corrections from the step counts, steps
all groups in one kernel call, increments the counts and bumps the version counters.

The plan declines (returns False, having touched nothing) when it no longer matches: a group added
or its params list changed, amsgrad or master_weights switched, ``optimizer.state`` replaced, a
param gained or lost its gradient, a dtype, shape, device or layout changed, a hyper-parameter out of
range or of the wrong type. The optimizer then drops it and takes the checked path, which adapts the
state or raises the same named error as always. load_state_dict, __setstate__ and add_param_group
drop the plan too. Not detected: a state tensor replaced by hand (``opt.state[p]["exp_avg"] = t``)
with one of the same dtype, shape and layout; the plan keeps stepping the old tensor.

Only where the op itself would run the cpu kernel eagerly: CPU tensors, no torch.compile, dispatch
or function mode, no other backend forced, no record_choices tally open, no GradScaler.
"""
from operator import is_

import torch

from effops import _backends
from effops.ops.adam_step import _eager_plain

_NUMBER = (float, int)


def may_run():
    """True when a plan may stand in for the op (see the module docstring)."""
    # _recorders: record_choices tallies (they count the op's dispatches, which the plan bypasses).
    return _eager_plain() and _backends.forced_backend() in (None, "cpu") and not _backends._recorders


class Plan:
    def __init__(self, optimizer, plan, groups):
        self._state = optimizer.state
        self._plan = plan
        self._groups = groups  # per group: (its params list copy, amsgrad, master_weights)

    @classmethod
    def build(cls, optimizer, per_group):
        """A plan for the step just taken, or None when some group cannot use one.

        per_group: for each param group, {(device, is float64): lists} as the checked step gathered them (its
        state created or adapted)."""
        params, exp_avgs, exp_avg_sqs, maxes, masters, has_master, steps = [], [], [], [], [], [], []
        group_ends, amsgrad, absent, groups = [], [], [], []
        for group, by_device in zip(optimizer.param_groups, per_group):
            if group.get("bf16_stochastic_round"):
                return None  # seeds change every step: the checked path passes them
            group_params = group["params"]
            with_grad = [p for p in group_params if p.grad is not None]
            absent += [p for p in group_params if p.grad is None]
            if by_device:
                if len(by_device) != 1:
                    return None
                ((device, wide), lists), = by_device.items()
                # The lists must hold the params themselves: not DTensor shards or complex views; and
                # no float64 (the kernel has no float64 body).
                if device.type != "cpu" or wide or len(lists["params"]) != len(with_grad) or \
                        not all(map(is_, lists["params"], with_grad)):
                    return None
                params += lists["params"]
                exp_avgs += lists["exp_avgs"]
                exp_avg_sqs += lists["exp_avg_sqs"]
                steps += lists["steps"]
                if group["amsgrad"]:
                    maxes += lists["max_exp_avg_sqs"]
                for m in lists["master_params"]:
                    has_master.append(0 if m is None else 1)
                    if m is not None:
                        masters.append(m)
            elif with_grad:
                return None
            group_ends.append(len(params))
            amsgrad.append(1 if group["amsgrad"] else 0)
            groups.append((list(group_params), group["amsgrad"], group["master_weights"]))
        if not params or not _backends.backends()["cpu"]:
            return None
        plan = torch.classes.effops_cpu.AdamPlan(params, exp_avgs, exp_avg_sqs, maxes, masters, has_master, steps,
                                                 group_ends, amsgrad, absent)
        return cls(optimizer, plan, groups)

    def step(self, optimizer):
        """Step every group; False (nothing touched) when the plan no longer matches."""
        param_groups = optimizer.param_groups
        if optimizer.state is not self._state or len(param_groups) != len(self._groups):
            return False
        hyper, flags = [], []
        for group, (params, amsgrad, master_weights) in zip(param_groups, self._groups):
            group_params = group["params"]
            if len(group_params) != len(params) or not all(map(is_, group_params, params)) \
                    or group["amsgrad"] is not amsgrad or group["master_weights"] != master_weights \
                    or group.get("bf16_stochastic_round"):
                return False
            # The same conversions, in the same order, as the checked path (so the same errors).
            beta1, beta2 = group["betas"]
            lr, beta1, beta2 = float(group["lr"]), float(beta1), float(beta2)
            eps, weight_decay = group["eps"], group["weight_decay"]
            maximize, decoupled = group["maximize"], group["decoupled_weight_decay"]
            if type(eps) not in _NUMBER or type(weight_decay) not in _NUMBER or type(amsgrad) is not bool \
                    or type(maximize) is not bool or type(decoupled) is not bool:
                return False  # the checked path names the problem
            hyper += (lr, beta1, beta2, float(eps), float(weight_decay))
            flags += (int(amsgrad), int(maximize), int(decoupled))
        return self._plan.step(hyper, flags)
