"""effops.optim.Adam8bit / AdamW8bit: Adam/AdamW with 8-bit moments, stepped by effops::adam8bit_step.

The moments of every tensor with at least ``min_8bit_size`` elements are stored block-wise quantized
(effops/reference/adam8bit.py: blocks of 256 values, one fp32 scale each, a signed map for exp_avg
and an unsigned one for sqrt(exp_avg_sq)): about 2 bytes of state per parameter instead of 8.
Smaller tensors (biases, norms) keep fp32 moments and take the fused adam_step: their share of the
memory is small and their moments would be dominated by the per-block scales.

Same constructor as effops.optim.Adam / AdamW plus ``min_8bit_size``; ``amsgrad`` is refused (its
running max would be a third quantized state). Params: fp32, bf16, fp16 and complex64 (stepped
through its real view); float64 and complex128 are refused at construction (8-bit states defeat the
purpose of float64 params: use effops.optim.AdamW for them), and so are DTensor (FSDP2) params.
``master_weights`` and the GradScaler protocol work as in AdamW.

State per quantized param: ``step``, ``exp_avg_codes`` (int8, flat), ``exp_avg_scales`` (fp32, one
per block), ``exp_avg_sq_codes`` (uint8, flat), ``exp_avg_sq_scales`` (fp32: the block maxima of
sqrt(exp_avg_sq)), and ``master_param`` with master weights. ``state_dict`` holds exactly these, and
``load_state_dict`` restores them bit for bit; a torch.optim.Adam/AdamW checkpoint (fp32 ``exp_avg`` /
``exp_avg_sq``) is quantized when it is loaded.
"""
import numbers
from itertools import chain

import torch
from torch.optim.optimizer import _get_scalar_dtype

from effops.ops import adam8bit_step, adam_step
from effops.optim.adam import _LOW_PRECISION, Adam, _is_dtensor, group_hyper
from effops.reference import adam8bit as quant

CODE_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")
# The size below which moments stay fp32. bitsandbytes and torchao use 4096 as well; here it keeps
# every bias and norm weight of the benchmark's transformer in fp32 for under 0.1% of the state bytes
# (docs/adam.md, "8-bit states").
MIN_8BIT_SIZE = 4096


def _lists():
    return dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], master_params=[], steps=[])


def _lists8():
    return dict(params=[], grads=[], exp_avg_codes=[], exp_avg_scales=[], exp_avg_sq_codes=[], exp_avg_sq_scales=[],
                master_params=[], steps=[])


class Adam8bit(Adam):
    """torch.optim.Adam with 8-bit moments (see the module docstring)."""

    PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.complex64)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, master_weights=False, min_8bit_size=MIN_8BIT_SIZE):
        if amsgrad:
            raise ValueError("%s does not support amsgrad=True (use effops.optim.%s)"
                             % (type(self).__name__, type(self).__name__.replace("8bit", "")))
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) or min_8bit_size < 1:
            raise ValueError("min_8bit_size must be an int >= 1, got %r" % (min_8bit_size,))
        self.min_8bit_size = int(min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, False, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("min_8bit_size", MIN_8BIT_SIZE)  # not in torch's pickled state

    def add_param_group(self, param_group):
        index = len(self.param_groups)
        if param_group.get("amsgrad"):
            raise ValueError("param_groups[%d]['amsgrad']: %s does not support amsgrad" % (index, type(self).__name__))
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            if _is_dtensor(p):
                raise TypeError("param_groups[%d]['params'][%d] is a DTensor (FSDP2): %s does not step sharded "
                                "params; use effops.optim.AdamW" % (index, i, type(self).__name__))
        super().add_param_group(dict(param_group, params=params))

    def _quantized(self, p):
        return p.numel() * (2 if p.is_complex() else 1) >= self.min_8bit_size

    def load_state_dict(self, state_dict):
        """As Adam's; codes and scales keep their dtypes (torch's loader would cast them to the param's),
        and fp32 moments of a tensor that is quantized here (a torch checkpoint) are quantized now."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)):
            saved = saved_state.get(pid)
            if not saved:
                continue
            state = self.state[p]
            if all(key in saved for key in CODE_KEYS):
                for key in CODE_KEYS:
                    state[key] = saved[key].to(device=p.device, copy=True)
            elif "exp_avg" in saved and self._quantized(p):
                codes = quant.quantize_state(_real(saved["exp_avg"]), _real(saved["exp_avg_sq"]))
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    state.pop(key, None)
                for key, value in zip(CODE_KEYS, codes):
                    state[key] = value.to(p.device)

    def _prepare_state8(self, group, p):
        """The state of p: created on the first step, adapted (master copies added or removed) after."""
        state = self.state[p]
        wants_master = bool(group["master_weights"]) and p.dtype in _LOW_PRECISION
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            if self._quantized(p):
                numel = p.numel() * (2 if p.is_complex() else 1)
                blocks = quant.num_blocks(numel)
                state["exp_avg_codes"] = torch.zeros(numel, dtype=torch.int8, device=p.device)
                state["exp_avg_scales"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_codes"] = torch.zeros(numel, dtype=torch.uint8, device=p.device)
                state["exp_avg_sq_scales"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        if wants_master != ("master_param" in state):
            if wants_master:
                state["master_param"] = p.detach().to(torch.float32, copy=True)
            else:
                del state["master_param"]
        if "exp_avg_codes" not in state:
            state_dtype = torch.float32 if wants_master else p.dtype
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in state:
                    state[key] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                elif state[key].dtype != state_dtype:
                    state[key] = state[key].to(state_dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (closure: reevaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        calls = []
        # Gather (and check) every group before stepping any: a bad group fails the whole step.
        for index, group in enumerate(self.param_groups):
            hyper = group_hyper(group, index)
            hyper.update(maximize=group["maximize"], decoupled_weight_decay=group["decoupled_weight_decay"])
            small, quantized = {}, {}
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("%s does not support sparse gradients" % type(self).__name__)
                state = self._prepare_state8(group, p)
                master = state.get("master_param")
                tensors = [p, grad, master]
                if p.is_complex():
                    tensors = [torch.view_as_real(t) if t is not None else None for t in tensors]
                if "exp_avg_codes" in state:
                    lists = quantized.setdefault(p.device, _lists8())
                    for key in CODE_KEYS:
                        lists[key].append(state[key])
                else:
                    lists = small.setdefault(p.device, _lists())
                    moments = [state["exp_avg"], state["exp_avg_sq"]]
                    if p.is_complex():
                        moments = [torch.view_as_real(t) for t in moments]
                    lists["exp_avgs"].append(moments[0])
                    lists["exp_avg_sqs"].append(moments[1])
                lists["params"].append(tensors[0])
                lists["grads"].append(tensors[1])
                lists["master_params"].append(tensors[2])
                lists["steps"].append(state["step"])
            for device, lists in small.items():
                calls.append((adam_step, dict(lists, amsgrad=False, **hyper), device))
            for device, lists in quantized.items():
                calls.append((adam8bit_step, dict(lists, **hyper), device))
        for op, kwargs, device in calls:
            op(**kwargs, grad_scale=None if grad_scale is None else grad_scale.to(device),
               found_inf=None if found_inf is None else found_inf.to(device))
        return loss


def _real(t):
    return torch.view_as_real(t) if t.is_complex() else t


class AdamW8bit(Adam8bit):
    """torch.optim.AdamW with 8-bit moments: Adam8bit with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 master_weights=False, min_8bit_size=MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights, min_8bit_size=min_8bit_size)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
