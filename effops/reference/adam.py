"""Reference: one Adam/AdamW step over lists of tensors, in plain PyTorch.

The definition of correct for every adam_step kernel. The arithmetic is that of
torch.optim.adam._single_tensor_adam (the foreach=False path), in the same order: weight decay,
lerp of the first moment, mul + addcmul of the second, bias corrections computed on the host in
double precision, then addcdiv. Two additions of the fused step:

* fp32 math for bf16/fp16/fp32: bf16/fp16 tensors are widened to fp32, stepped, and rounded once when
  stored (torch's own fused kernels do the same; its foreach=False path would round after every op).
  For fp32 and float64 tensors the widening is a no-op, so the ops run in place exactly as torch's
  do (float64 math for float64).
* master weights: when ``master_params[i]`` is an fp32 tensor, the step runs on it and the rounded
  result is written to ``params[i]``.
* ``grad_scale`` (GradScaler): gradients are divided by it first and the unscaled gradient is stored
  back, as torch's fused Adam does.

Steps are the already-incremented step counts, one per tensor.
"""
import torch

from effops.reference import stochastic_round

def _wide(t):
    """t in the dtype the step computes in: fp32, or float64 for float64 (t itself when it is already)."""
    return t if t.dtype == torch.float64 else t.float()


def bias_corrections(beta1, beta2, step):
    """(1 - beta1^t, sqrt(1 - beta2^t)) in Python double precision, as torch's single-tensor path."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return bias_correction1, bias_correction2 ** 0.5


def per_tensor_scalars(lr, beta1, beta2, steps):
    """Per tensor: step_size = lr / (1 - beta1^t) and sqrt(1 - beta2^t), in double as torch does."""
    if steps and steps.count(steps[0]) == len(steps):  # the usual case: every param at the same step
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, steps[0])
        return [lr / bc1] * len(steps), [bc2_sqrt] * len(steps)
    step_sizes, bc2_sqrts = [], []
    for step in steps:
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step)
        step_sizes.append(lr / bc1)
        bc2_sqrts.append(bc2_sqrt)
    return step_sizes, bc2_sqrts


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, *, lr, beta1,
              beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale=None,
              stochastic_round_seeds=None):
    """Update every tensor in place. steps: list of float step counts (already incremented).

    max_exp_avg_sqs is used only when amsgrad; master_params[i] is None or an fp32 tensor.
    grad_scale: None or a float the gradients are divided by (and stored back unscaled).
    stochastic_round_seeds: None, or per param a seed >= 0 (bf16 params without a master copy: the new
    param is rounded stochastically, effops/reference/stochastic_round.py) or -1 (round to nearest).
    """
    for i, param in enumerate(params):
        if param.numel() == 0:
            continue
        master = master_params[i] if master_params else None
        theta = master if master is not None else _wide(param)
        grad = _wide(grads[i])
        if grad_scale is not None:
            grad = grad / grad_scale
            grads[i].copy_(grad)
        if maximize:
            grad = -grad
        exp_avg = _wide(exp_avgs[i])
        exp_avg_sq = _wide(exp_avg_sqs[i])
        max_exp_avg_sq = _wide(max_exp_avg_sqs[i]) if amsgrad else None

        if weight_decay != 0:
            if decoupled_weight_decay:
                theta.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(theta, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1, bias_correction2_sqrt = bias_corrections(beta1, beta2, steps[i])
        step_size = lr / bias_correction1
        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        theta.addcdiv_(exp_avg, denom, value=-step_size)

        # Store back whatever was widened (for fp32 tensors these are the same tensors: no-ops).
        seed = -1 if stochastic_round_seeds is None else stochastic_round_seeds[i]
        if seed >= 0:
            param.copy_(stochastic_round.round_to_bf16(theta, seed))
            theta = param
        for dst, src in ((exp_avgs[i], exp_avg), (exp_avg_sqs[i], exp_avg_sq), (param, theta)):
            if dst is not src:
                dst.copy_(src)
        if amsgrad and max_exp_avg_sqs[i] is not max_exp_avg_sq:
            max_exp_avg_sqs[i].copy_(max_exp_avg_sq)
